//! The pub/sub conformance suite against a real MQTT broker (`FACTLINE_TEST_MQTT_URL`,
//! Mosquitto 2.0 on the project machines). The restart case runs when
//! `FACTLINE_TEST_MQTT_RESTART` names a command that restarts the broker (scripts/test-all sets
//! it to scripts/services/restart-mosquitto).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::testkit::{Features, PubSubFixture, run_restart_command};
use factline_messaging::{Publisher, Subscriber};
use factline_mqtt::{MqttConfig, MqttPubSub};

fn url() -> String {
    std::env::var("FACTLINE_TEST_MQTT_URL")
        .expect("FACTLINE_TEST_MQTT_URL must name an MQTT broker (see scripts/test-all)")
}

struct MqttFixture {
    pubsub: MqttPubSub,
    restart_command: Option<String>,
}

impl MqttFixture {
    async fn connect() -> Self {
        // Unique topic names per case come from the suite; the prefix keeps them apart from
        // anything else on the broker. Short sessions: the suite's leave nothing for long.
        let config = MqttConfig::new(url())
            .topic_prefix("fltest/")
            .client_id_prefix("fltest-")
            .session_expiry(Duration::from_secs(300));
        let pubsub = MqttPubSub::connect(config)
            .await
            .expect("Mosquitto is running (see scripts/test-all)");
        Self {
            pubsub,
            restart_command: std::env::var("FACTLINE_TEST_MQTT_RESTART").ok(),
        }
    }
}

#[async_trait]
impl PubSubFixture for MqttFixture {
    fn features(&self) -> Features {
        Features::none()
            .ordering(true)
            .redelivery_on_nack(true)
            .concurrent_subscribe(true)
            .fan_out(true)
            .reconnect(self.restart_command.is_some())
            .payload_size_bytes_max(self.pubsub.message_size_bytes_max() - 4 * 1024)
    }

    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.pubsub.publisher())
    }

    async fn subscriber(&self, group: Option<&str>) -> Arc<dyn Subscriber> {
        assert!(group.is_none(), "consumer groups are not declared");
        Arc::new(self.pubsub.subscriber())
    }

    async fn restart_broker(&self) -> Result<(), String> {
        run_restart_command(
            self.restart_command.as_deref(),
            "FACTLINE_TEST_MQTT_RESTART",
        )
        .await
    }

    fn delivery_timeout(&self) -> Duration {
        Duration::from_secs(10)
    }

    fn time_scale(&self) -> f64 {
        2.0
    }
}

mod mosquitto {
    use super::MqttFixture;
    factline_messaging::pubsub_conformance!(
        #[ignore = "needs Mosquitto: set FACTLINE_TEST_MQTT_URL"]
        async {
            MqttFixture::connect().await
        }
    );
}
