//! The pub/sub conformance suite against a real NATS JetStream server
//! (`FACTLINE_TEST_NATS_URL`; the reconnect case restarts it with `FACTLINE_TEST_NATS_RESTART`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::testkit::{Features, PubSubFixture, run_restart_command};
use factline_messaging::{Publisher, Subscriber};
use factline_nats::{NatsConfig, NatsPubSub};

/// Streams of earlier runs older than this are deleted by the first fixture of a run.
const STALE_SECONDS: i64 = 3_600;
const PREFIX: &str = "fltest_";

fn url() -> String {
    std::env::var("FACTLINE_TEST_NATS_URL").expect(
        "FACTLINE_TEST_NATS_URL must name a NATS server with JetStream (see scripts/test-all)",
    )
}

struct NatsFixture {
    pubsub: NatsPubSub,
    restart_command: Option<String>,
}

async fn delete_stale_streams(pubsub: &NatsPubSub) {
    use futures::TryStreamExt as _;
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let jetstream = async_nats::jetstream::new(pubsub.client().clone());
        let names: Vec<String> = jetstream
            .stream_names()
            .try_collect()
            .await
            .unwrap_or_default();
        let cutoff = time_now() - STALE_SECONDS;
        for name in names.into_iter().filter(|n| n.starts_with(PREFIX)) {
            if let Ok(mut stream) = jetstream.get_stream(&name).await
                && let Ok(info) = stream.info().await
                && info.created.unix_timestamp() < cutoff
            {
                let _ = jetstream.delete_stream(&name).await;
            }
        }
    })
    .await;
}

fn time_now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

impl NatsFixture {
    async fn connect() -> Self {
        let config = NatsConfig::new(url())
            .stream_prefix(PREFIX)
            // A test run's streams expire by themselves.
            .topic_age_max(Some(Duration::from_secs(STALE_SECONDS as u64)))
            .ack_wait(Duration::from_secs(30));
        let pubsub = NatsPubSub::connect(config)
            .await
            .expect("NATS with JetStream is running (see scripts/test-all)");
        delete_stale_streams(&pubsub).await;
        Self {
            pubsub,
            restart_command: std::env::var("FACTLINE_TEST_NATS_RESTART").ok(),
        }
    }
}

#[async_trait]
impl PubSubFixture for NatsFixture {
    fn features(&self) -> Features {
        Features::none()
            .ordering(true)
            .persistent(true)
            .durable_groups(true)
            .consumer_groups(true)
            .redelivery_on_nack(true)
            .concurrent_subscribe(true)
            .close_while_in_flight(true)
            .fan_out(true)
            .reconnect(self.restart_command.is_some())
            .payload_size_bytes_max(self.pubsub.payload_size_bytes_max())
    }

    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.pubsub.publisher())
    }

    async fn subscriber(&self, group: Option<&str>) -> Arc<dyn Subscriber> {
        match group {
            Some(group) => Arc::new(self.pubsub.subscriber_in_group(group).unwrap()),
            None => Arc::new(self.pubsub.subscriber()),
        }
    }

    async fn restart_broker(&self) -> Result<(), String> {
        run_restart_command(
            self.restart_command.as_deref(),
            "FACTLINE_TEST_NATS_RESTART",
        )
        .await?;
        // Wait for the client to be connected again.
        for _ in 0..200 {
            if self.pubsub.client().connection_state() == async_nats::connection::State::Connected {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the client did not reconnect within 10 s".into())
    }

    fn delivery_timeout(&self) -> Duration {
        Duration::from_secs(15)
    }

    fn time_scale(&self) -> f64 {
        2.0
    }
}

mod nats {
    use super::NatsFixture;
    factline_messaging::pubsub_conformance!(
        #[ignore = "needs NATS JetStream: set FACTLINE_TEST_NATS_URL"]
        async {
            NatsFixture::connect().await
        }
    );
}
