//! The pub/sub conformance suite against a real RabbitMQ (`FACTLINE_TEST_AMQP_URL`); the
//! reconnect case restarts it with `FACTLINE_TEST_AMQP_RESTART` when that is set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::testkit::{Features, PubSubFixture, run_restart_command};
use factline_messaging::{Publisher, Subscriber};
use factline_rabbitmq::{RabbitConfig, RabbitPubSub};

/// Every exchange and queue of the tests starts with this.
const PREFIX: &str = "fltest.";

fn url() -> String {
    std::env::var("FACTLINE_TEST_AMQP_URL")
        .expect("FACTLINE_TEST_AMQP_URL must name a RabbitMQ broker (see scripts/test-all)")
}

struct RabbitFixture {
    pubsub: RabbitPubSub,
    restart_command: Option<String>,
}

/// Deletes the test exchanges earlier runs left without bindings (those published to while
/// nobody subscribed: auto-delete removes an exchange only when its last binding goes), once
/// per test binary, before any case declares one. Needs `rabbitmqctl`; skipped without it.
async fn delete_unused_test_exchanges(pubsub: &RabbitPubSub) {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let Ok(output) = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "list_exchanges", "name"])
            .output()
            .await
        else {
            return;
        };
        let Ok(connection) = pubsub.consuming_connection().await else {
            return;
        };
        let listing = String::from_utf8_lossy(&output.stdout);
        for name in listing.lines().filter(|name| name.starts_with(PREFIX)) {
            let Ok(channel) = connection.create_channel().await else {
                return;
            };
            // if-unused: an exchange with a binding stays (the broker refuses and closes the
            // channel).
            let options = lapin::options::ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            };
            if channel.exchange_delete(name.into(), options).await.is_ok() {
                let _ = channel.close(200, "done".into()).await;
            }
        }
    })
    .await;
}

impl RabbitFixture {
    async fn connect() -> Self {
        // Test exchanges go with their last queue; test group queues expire after 10 minutes
        // unused: nothing the suite makes stays for long.
        let config = RabbitConfig::new(url())
            .name_prefix(PREFIX)
            .auto_delete_exchanges(true)
            .group_queue_expires(Some(Duration::from_secs(600)))
            .publish_timeout(Duration::from_secs(20));
        let pubsub = RabbitPubSub::connect(config)
            .await
            .expect("RabbitMQ is running (see scripts/test-all)");
        delete_unused_test_exchanges(&pubsub).await;
        Self {
            pubsub,
            restart_command: std::env::var("FACTLINE_TEST_AMQP_RESTART").ok(),
        }
    }
}

#[async_trait]
impl PubSubFixture for RabbitFixture {
    fn features(&self) -> Features {
        Features::none()
            .ordering(true)
            .durable_groups(true)
            .consumer_groups(true)
            .redelivery_on_nack(true)
            .concurrent_subscribe(true)
            .close_while_in_flight(true)
            .fan_out(true)
            .reconnect(self.restart_command.is_some())
            .payload_size_bytes_max(self.pubsub.message_size_bytes_max() - 4 * 1024)
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
            "FACTLINE_TEST_AMQP_RESTART",
        )
        .await
    }

    fn delivery_timeout(&self) -> Duration {
        Duration::from_secs(15)
    }

    fn time_scale(&self) -> f64 {
        2.0
    }
}

mod rabbitmq {
    use super::RabbitFixture;
    factline_messaging::pubsub_conformance!(
        #[ignore = "needs RabbitMQ: set FACTLINE_TEST_AMQP_URL"]
        async {
            RabbitFixture::connect().await
        }
    );
}
