//! The pub/sub conformance suite on SQLite: a fresh database file per case (no service needed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::testkit::{Features, PubSubFixture};
use factline_messaging::{Publisher, Subscriber};
use factline_sql::sqlite::{SqlitePubSub, SqlitePubSubConfig};

struct SqliteFixture {
    pubsub: SqlitePubSub,
    _dir: tempfile::TempDir,
}

impl SqliteFixture {
    async fn open() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("messages.db").display());
        let pubsub = SqlitePubSub::connect(SqlitePubSubConfig::new(url))
            .await
            .expect("open the SQLite database");
        Self { pubsub, _dir: dir }
    }
}

#[async_trait]
impl PubSubFixture for SqliteFixture {
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
        Err("SQLite is a file, not a server: nothing to restart".into())
    }

    fn delivery_timeout(&self) -> Duration {
        Duration::from_secs(10)
    }

    fn time_scale(&self) -> f64 {
        2.0
    }
}

mod sqlite_tables {
    use super::SqliteFixture;
    factline_messaging::pubsub_conformance!(async { SqliteFixture::open().await });
}
