//! The fixture the Kafka tests share.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factline_kafka::{KafkaConfig, KafkaPubSub};
use factline_messaging::testkit::{Features, PubSubFixture, run_restart_command};
use factline_messaging::{Message, MessageStream, Publisher, Subscriber};
use futures::StreamExt as _;

/// How long the tests wait for one message.
pub(crate) const RECEIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// The next message of `stream`, within [`RECEIVE_TIMEOUT`]; panics naming `what` otherwise.
pub(crate) async fn next(stream: &mut MessageStream, what: &str) -> Message {
    match tokio::time::timeout(RECEIVE_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(message))) => message,
        Ok(Some(Err(error))) => panic!("{what}: receive error {error}"),
        Ok(None) => panic!("{what}: the stream ended"),
        Err(_) => panic!("{what}: nothing within {RECEIVE_TIMEOUT:?}"),
    }
}

pub(crate) fn url() -> String {
    std::env::var("FACTLINE_TEST_KAFKA_URL")
        .expect("FACTLINE_TEST_KAFKA_URL must name a Kafka broker (see scripts/test-all)")
}

/// The settings of the tests: quick group rebalances.
pub(crate) fn config() -> KafkaConfig {
    KafkaConfig::new(url())
        .session_timeout(Duration::from_secs(6))
        .commit_interval(Duration::from_millis(100))
        .publish_timeout(Duration::from_secs(20))
}

/// The settings of the restart tests: a publish that the restarted broker refuses fails after
/// 5 s and is retried through a new producer.
pub(crate) fn restart_config() -> KafkaConfig {
    config().publish_timeout(Duration::from_secs(5))
}

pub(crate) fn restart_command() -> Option<String> {
    std::env::var("FACTLINE_TEST_KAFKA_RESTART").ok()
}

pub(crate) struct KafkaFixture {
    pub(crate) kafka: KafkaPubSub,
    pub(crate) restart_command: Option<String>,
}

impl KafkaFixture {
    pub(crate) async fn connect() -> Self {
        Self::connect_with(config()).await
    }

    async fn connect_with(config: KafkaConfig) -> Self {
        let kafka = KafkaPubSub::connect(config)
            .await
            .expect("Kafka is running (see scripts/test-all)");
        Self {
            kafka,
            restart_command: None,
        }
    }

    pub(crate) async fn restartable() -> Self {
        let mut fixture = Self::connect_with(restart_config()).await;
        fixture.restart_command = restart_command();
        fixture
    }
}

#[async_trait]
impl PubSubFixture for KafkaFixture {
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
            .payload_size_bytes_max(self.kafka.message_size_bytes_max() - 4 * 1024)
    }

    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.kafka.publisher())
    }

    async fn subscriber(&self, group: Option<&str>) -> Arc<dyn Subscriber> {
        match group {
            Some(group) => Arc::new(self.kafka.subscriber_in_group(group).unwrap()),
            None => Arc::new(self.kafka.subscriber()),
        }
    }

    async fn restart_broker(&self) -> Result<(), String> {
        run_restart_command(
            self.restart_command.as_deref(),
            "FACTLINE_TEST_KAFKA_RESTART",
        )
        .await
    }

    fn delivery_timeout(&self) -> Duration {
        // A group's first assignment, or a rebalance after a member left, takes a few seconds.
        Duration::from_secs(20)
    }

    fn time_scale(&self) -> f64 {
        2.0
    }
}
