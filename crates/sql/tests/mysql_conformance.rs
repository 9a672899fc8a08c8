//! The pub/sub conformance suite against a real MariaDB (`FACTLINE_TEST_MYSQL_URL`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mysql_common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::testkit::{Features, PubSubFixture};
use factline_messaging::{Publisher, Subscriber};
use factline_sql::mysql::MySqlPubSub;

struct MySqlFixture {
    pubsub: MySqlPubSub,
    restart_command: Option<String>,
}

#[async_trait]
impl PubSubFixture for MySqlFixture {
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
        factline_messaging::testkit::run_restart_command(
            self.restart_command.as_deref(),
            "FACTLINE_TEST_MYSQL_RESTART",
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

mod mariadb_tables {
    use super::MySqlFixture;
    factline_messaging::pubsub_conformance!(
        #[ignore = "needs MariaDB: set FACTLINE_TEST_MYSQL_URL"]
        async {
            MySqlFixture {
                pubsub: super::mysql_common::pubsub().await,
                restart_command: std::env::var("FACTLINE_TEST_MYSQL_RESTART").ok(),
            }
        }
    );
}
