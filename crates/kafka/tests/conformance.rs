//! The pub/sub conformance suite against a real Kafka-protocol broker
//! (`FACTLINE_TEST_KAFKA_URL`). The restart case runs in `tests/restart.rs`, against a fixture
//! that knows the test broker keeps nothing across a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod kafka {
    use super::common::KafkaFixture;
    factline_messaging::pubsub_conformance!(
        #[ignore = "needs Kafka: set FACTLINE_TEST_KAFKA_URL"]
        async {
            KafkaFixture::connect().await
        }
    );
}
