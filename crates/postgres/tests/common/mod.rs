//! Test support: a fresh schema per store, so tests run in parallel against one database.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};

use factline_postgres::{PostgresOptions, PostgresStore, SchemaName, sqlx};

/// The reason every test here is ignored by default.
pub(crate) const NEEDS_POSTGRES: &str = "needs postgres: set FACTLINE_TEST_POSTGRES_URL";

/// The database URL from `FACTLINE_TEST_POSTGRES_URL`.
pub(crate) fn url() -> String {
    std::env::var("FACTLINE_TEST_POSTGRES_URL")
        .expect("FACTLINE_TEST_POSTGRES_URL must name a PostgreSQL database (see scripts/test-all)")
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Test schemas are named `ft_{unix seconds}_{pid}_{n}`; ones older than this are dropped by
/// later runs (a test that panicked leaves its schema behind).
const STALE_SECONDS: u64 = 3_600;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A new, unique schema name.
pub(crate) fn fresh_schema() -> SchemaName {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    SchemaName::new(format!("ft_{}_{}_{n}", now_secs(), std::process::id())).unwrap()
}

async fn drop_stale_schemas(pool: &sqlx::PgPool) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'ft\\_%'")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    let cutoff = now_secs().saturating_sub(STALE_SECONDS);
    for name in names {
        let created = name
            .split('_')
            .nth(1)
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|secs| secs < cutoff) {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
            )))
            .execute(pool)
            .await;
        }
    }
}

/// Options for a fresh schema, small pools.
pub(crate) fn options(schema: SchemaName) -> PostgresOptions {
    PostgresOptions::new(url())
        .schema(schema)
        .pool_connections_max(4)
}

/// A store on a fresh schema.
pub(crate) async fn fresh_store() -> PostgresStore {
    fresh_store_with(|options| options).await
}

/// A store on a fresh schema, with options adjusted by `adjust`.
pub(crate) async fn fresh_store_with(
    adjust: impl FnOnce(PostgresOptions) -> PostgresOptions,
) -> PostgresStore {
    let store = PostgresStore::open(adjust(options(fresh_schema())))
        .await
        .expect("open a PostgresStore on a fresh schema");
    if COUNTER.load(Ordering::Relaxed) == 1 {
        drop_stale_schemas(store.pool()).await;
    }
    store
}
