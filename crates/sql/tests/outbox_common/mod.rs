//! The single-forwarder rule, the same for every SQL backend: while one forwarder runs, a
//! second waits as a standby and forwards nothing; when the first stops, the standby takes over.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::{CloseError, Message, PublishError, Publisher};
use factline_sql::RunForwarderError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the forwarders published: (forwarder, payload), in order.
#[derive(Clone, Default)]
pub(crate) struct Recorded(Arc<Mutex<Vec<(&'static str, String)>>>);

impl Recorded {
    /// A publisher that records under `forwarder`.
    pub(crate) fn publisher(&self, forwarder: &'static str) -> Arc<dyn Publisher> {
        Arc::new(Recording {
            forwarder,
            recorded: self.clone(),
        })
    }

    fn snapshot(&self) -> Vec<(&'static str, String)> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (up to 15 s) until `payload` was published; returns who published it first.
    pub(crate) async fn wait_for(&self, payload: &str) -> &'static str {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some((who, _)) = self.snapshot().into_iter().find(|(_, p)| p == payload) {
                return who;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{payload:?} was not forwarded within 15 s: {:?}",
                self.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Recording {
    forwarder: &'static str,
    recorded: Recorded,
}

#[async_trait]
impl Publisher for Recording {
    async fn publish(&self, _topic: &str, messages: Vec<Message>) -> Result<(), PublishError> {
        let mut recorded = self.recorded.0.lock().unwrap();
        for message in messages {
            recorded.push((
                self.forwarder,
                String::from_utf8_lossy(&message.payload).into_owned(),
            ));
        }
        Ok(())
    }

    async fn close(&self) -> Result<(), CloseError> {
        Ok(())
    }
}

/// Runs the rule: `start(target, shutdown)` spawns a backend's `run_forwarder` on one outbox
/// topic and group; `stage(payload)` commits one staged message to that outbox.
pub(crate) async fn one_forwarder_at_a_time<Start, Stage, Staged>(start: Start, stage: Stage)
where
    Start: Fn(Arc<dyn Publisher>, CancellationToken) -> JoinHandle<Result<(), RunForwarderError>>,
    Stage: Fn(&'static str) -> Staged,
    Staged: Future<Output = ()>,
{
    let recorded = Recorded::default();
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let a = start(recorded.publisher("a"), stop_a.clone());
    stage("first").await;
    assert_eq!(recorded.wait_for("first").await, "a");

    let b = start(recorded.publisher("b"), stop_b.clone());
    // b has tried the lock (it tries every second) and waits as a standby.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for payload in ["second", "third", "fourth"] {
        stage(payload).await;
    }
    for payload in ["second", "third", "fourth"] {
        assert_eq!(
            recorded.wait_for(payload).await,
            "a",
            "only the lock holder forwards: {:?}",
            recorded.snapshot()
        );
    }
    assert!(!b.is_finished(), "the standby waits");

    // The active one stops; the standby takes the lock and forwards what comes next.
    stop_a.cancel();
    a.await.unwrap().unwrap();
    stage("fifth").await;
    assert_eq!(
        recorded.wait_for("fifth").await,
        "b",
        "the standby took over"
    );
    stop_b.cancel();
    b.await.unwrap().unwrap();

    // At least once, in order: each payload's first forwarding in staging order, and b never
    // forwarded before a stopped.
    let mut firsts: Vec<String> = Vec::new();
    for (_, payload) in recorded.snapshot() {
        if !firsts.contains(&payload) {
            firsts.push(payload);
        }
    }
    assert_eq!(firsts, ["first", "second", "third", "fourth", "fifth"]);
}
