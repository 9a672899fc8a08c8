//! The pub/sub conformance suite against a real Redis server (`FACTLINE_TEST_REDIS_URL`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::testkit::{Features, PubSubFixture, run_restart_command};
use factline_messaging::{Publisher, Subscriber};
use factline_redis::{RedisConfig, RedisPubSub};

const PREFIX: &str = "fltest:";
/// Test streams untouched for this long are deleted by the first fixture of a run.
const STALE_SECONDS: i64 = 3_600;

fn url() -> String {
    std::env::var("FACTLINE_TEST_REDIS_URL")
        .expect("FACTLINE_TEST_REDIS_URL must name a Redis server (see scripts/test-all)")
}

struct RedisFixture {
    pubsub: RedisPubSub,
    restart_command: Option<String>,
}

async fn delete_stale_streams() {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let Ok(client) = redis::Client::open(url()) else {
            return;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{PREFIX}*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        for key in keys {
            let idle: i64 = redis::cmd("OBJECT")
                .arg("IDLETIME")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap_or(0);
            if idle > STALE_SECONDS {
                let _: Result<i64, _> = redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
            }
        }
    })
    .await;
}

impl RedisFixture {
    async fn connect() -> Self {
        delete_stale_streams().await;
        let pubsub = RedisPubSub::connect(RedisConfig::new(url()).key_prefix(PREFIX))
            .await
            .expect("Redis is running (see scripts/test-all)");
        Self {
            pubsub,
            restart_command: std::env::var("FACTLINE_TEST_REDIS_RESTART").ok(),
        }
    }
}

#[async_trait]
impl PubSubFixture for RedisFixture {
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
        run_restart_command(
            self.restart_command.as_deref(),
            "FACTLINE_TEST_REDIS_RESTART",
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

mod redis_streams {
    use super::RedisFixture;
    factline_messaging::pubsub_conformance!(
        #[ignore = "needs Redis: set FACTLINE_TEST_REDIS_URL"]
        async {
            RedisFixture::connect().await
        }
    );
}
