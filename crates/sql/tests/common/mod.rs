//! Test support: one schema per test process, so runs do not see each other's rows.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use factline_sql::postgres::{PgPubSub, PgPubSubConfig};

/// The database URL from `FACTLINE_TEST_POSTGRES_URL`.
pub(crate) fn url() -> String {
    std::env::var("FACTLINE_TEST_POSTGRES_URL")
        .expect("FACTLINE_TEST_POSTGRES_URL must name a PostgreSQL database (see scripts/test-all)")
}

/// Test schemas are `fsql_{unix seconds}_{pid}`; those older than this are dropped by the
/// first fixture of a later run.
const STALE_SECONDS: u64 = 3_600;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// This process's schema.
pub(crate) fn schema() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| format!("fsql_{}_{}", now_secs(), std::process::id()))
        .clone()
}

async fn drop_stale_schemas() {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let Ok(pool) = sqlx::PgPool::connect(&url()).await else {
            return;
        };
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'fsql\\_%'",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        let cutoff = now_secs().saturating_sub(STALE_SECONDS);
        for name in names {
            let created = name.split('_').nth(1).and_then(|s| s.parse::<u64>().ok());
            if created.is_some_and(|secs| secs < cutoff) {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {name} CASCADE"
                )))
                .execute(&pool)
                .await;
            }
        }
        pool.close().await;
    })
    .await;
}

/// The settings tests use: this process's schema, a small pool, fast polls.
pub(crate) fn config() -> PgPubSubConfig {
    PgPubSubConfig::new(url())
        .schema(schema())
        .pool_connections_max(4)
        .poll_interval(std::time::Duration::from_millis(500))
}

/// A pub/sub on this process's schema.
pub(crate) async fn pubsub() -> PgPubSub {
    pubsub_with(config()).await
}

/// A pub/sub with `config`.
pub(crate) async fn pubsub_with(config: PgPubSubConfig) -> PgPubSub {
    drop_stale_schemas().await;
    PgPubSub::connect(config)
        .await
        .expect("PostgreSQL is running (see scripts/test-all)")
}
