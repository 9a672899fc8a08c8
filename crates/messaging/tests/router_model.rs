//! Per-key lanes against a model: for any interleaving of keys (and keyless messages), any lane
//! count and any handler timing, when every call succeeds each message is handled and acked
//! exactly once, messages of one key are handled in publish order and never two at once, and
//! no more calls run at once than there are lanes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use factline_messaging::{
    Acknowledger, CloseError, Concurrency, InMemoryPubSub, Message, MessageId, MessageStream,
    Metadata, Outcome, Publisher, Router, SubscribeError, Subscriber, consumer_fn,
};
use futures::StreamExt;
use proptest::prelude::*;

const WAIT: Duration = Duration::from_secs(10);

/// Settlements seen by [`Recording`], by message id.
#[derive(Clone, Default)]
struct Settled(Arc<Mutex<HashMap<MessageId, Vec<Outcome>>>>);

struct Forward {
    id: MessageId,
    original: Mutex<Option<Message>>,
    settled: Settled,
}

impl Acknowledger for Forward {
    fn settled(&self, outcome: Outcome) {
        self.settled
            .0
            .lock()
            .unwrap()
            .entry(self.id.clone())
            .or_default()
            .push(outcome);
        let Some(original) = self.original.lock().unwrap().take() else {
            return;
        };
        match outcome {
            Outcome::Acked => {
                original.ack();
            }
            Outcome::Nacked { .. } => {
                original.nack();
            }
            _ => drop(original),
        }
    }
}

/// Records the settlement of every delivery, forwarding it to the real one.
struct Recording {
    inner: Arc<dyn Subscriber>,
    settled: Settled,
}

#[async_trait]
impl Subscriber for Recording {
    async fn subscribe(&self, topic: &str) -> Result<MessageStream, SubscribeError> {
        let settled = self.settled.clone();
        let stream = self.inner.subscribe(topic).await?;
        Ok(MessageStream::new(stream.map(move |item| {
            item.map(|message| {
                let id = message.id.clone();
                message.detached().delivered(Forward {
                    id,
                    original: Mutex::new(Some(message)),
                    settled: settled.clone(),
                })
            })
        })))
    }

    async fn close(&self) -> Result<(), CloseError> {
        self.inner.close().await
    }
}

/// What the handler saw.
#[derive(Default)]
struct Observed {
    /// Payloads in handling order.
    handled: Mutex<Vec<String>>,
    running: AtomicUsize,
    running_max: AtomicUsize,
    keys_running: Mutex<Vec<String>>,
    same_key_overlaps: AtomicUsize,
}

/// One generated message: its key (`None`: no key) and how the handler spends its time.
type Spec = (Option<u8>, u8);

fn key_of(key: u8) -> String {
    format!("k{key}")
}

async fn run_case(specs: Vec<Spec>, lanes: usize) -> Result<(), TestCaseError> {
    let pubsub = InMemoryPubSub::default();
    let settled = Settled::default();
    let observed = Arc::new(Observed::default());
    let mut router = Router::default();
    {
        let observed = observed.clone();
        router
            .add_consumer_handler(
                "model",
                "in",
                Arc::new(Recording {
                    inner: Arc::new(pubsub.subscriber()),
                    settled: settled.clone(),
                }),
                consumer_fn(move |message: Message| {
                    let observed = observed.clone();
                    async move {
                        let key = message.partition_key().map(str::to_owned);
                        let now = observed.running.fetch_add(1, Ordering::SeqCst) + 1;
                        observed.running_max.fetch_max(now, Ordering::SeqCst);
                        if let Some(key) = &key {
                            let mut running = observed.keys_running.lock().unwrap();
                            if running.contains(key) {
                                observed.same_key_overlaps.fetch_add(1, Ordering::SeqCst);
                            }
                            running.push(key.clone());
                        }
                        let pause = message.metadata.get("pause").unwrap_or("0");
                        match pause {
                            "1" => tokio::task::yield_now().await,
                            "2" => tokio::time::sleep(Duration::from_millis(1)).await,
                            _ => {}
                        }
                        if let Some(key) = &key {
                            let mut running = observed.keys_running.lock().unwrap();
                            if let Some(at) = running.iter().position(|k| k == key) {
                                running.swap_remove(at);
                            }
                        }
                        observed
                            .handled
                            .lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&message.payload).into_owned());
                        observed.running.fetch_sub(1, Ordering::SeqCst);
                        Ok(())
                    }
                }),
            )
            .unwrap()
            .concurrency(Concurrency::per_key(lanes));
    }
    let running = router.start().await.unwrap();

    let messages: Vec<Message> = specs
        .iter()
        .enumerate()
        .map(|(i, (key, pause))| {
            let message = Message::new(format!("{i}")).with_metadata("pause", pause.to_string());
            match key {
                Some(key) => message.with_metadata(Metadata::PARTITION_KEY, key_of(*key)),
                None => message,
            }
        })
        .collect();
    let ids: Vec<MessageId> = messages.iter().map(|m| m.id.clone()).collect();
    tokio::time::timeout(WAIT, pubsub.publisher().publish("in", messages))
        .await
        .expect("publish timed out")
        .unwrap();

    let deadline = Instant::now() + WAIT;
    while settled.0.lock().unwrap().len() < specs.len() {
        prop_assert!(Instant::now() < deadline, "timed out waiting for acks");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let report = tokio::time::timeout(WAIT, running.shutdown())
        .await
        .expect("shutdown timed out");
    prop_assert_eq!(report.aborted_tasks, 0);

    // Every message handled exactly once, and acked exactly once.
    let handled = observed.handled.lock().unwrap().clone();
    let mut sorted: Vec<usize> = handled.iter().map(|p| p.parse().unwrap()).collect();
    sorted.sort_unstable();
    prop_assert_eq!(sorted, (0..specs.len()).collect::<Vec<_>>());
    let settled = settled.0.lock().unwrap().clone();
    for id in &ids {
        prop_assert_eq!(settled.get(id).cloned(), Some(vec![Outcome::Acked]));
    }

    // The model: per key, handling order is publish order.
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for (i, (key, _)) in specs.iter().enumerate() {
        if let Some(key) = key {
            expected
                .entry(key_of(*key))
                .or_default()
                .push(i.to_string());
        }
    }
    let mut actual: HashMap<String, Vec<String>> = HashMap::new();
    for payload in &handled {
        let i: usize = payload.parse().unwrap();
        if let Some(key) = specs[i].0 {
            actual.entry(key_of(key)).or_default().push(payload.clone());
        }
    }
    prop_assert_eq!(actual, expected);
    prop_assert_eq!(observed.same_key_overlaps.load(Ordering::SeqCst), 0);
    let running_max = observed.running_max.load(Ordering::SeqCst);
    prop_assert!(
        running_max <= lanes,
        "{} at once on {} lanes",
        running_max,
        lanes
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        ..ProptestConfig::default()
    })]

    #[test]
    fn per_key_lanes_match_the_model(
        specs in prop::collection::vec((prop::option::weighted(0.85, 0u8..5), 0u8..3), 1..40),
        lanes in 1usize..5,
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_case(specs, lanes))?;
    }
}
