//! Test support for MariaDB: one database per test process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use factline_sql::mysql::{MySqlPubSub, MySqlPubSubConfig};

/// The server URL from `FACTLINE_TEST_MYSQL_URL`.
pub(crate) fn server_url() -> String {
    std::env::var("FACTLINE_TEST_MYSQL_URL")
        .expect("FACTLINE_TEST_MYSQL_URL must name a MariaDB database (see scripts/test-all)")
}

/// Test databases are `fsql_{unix seconds}_{pid}`; older than this, a later run drops them.
const STALE_SECONDS: u64 = 3_600;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn database() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| format!("fsql_{}_{}", now_secs(), std::process::id()))
        .clone()
}

/// The URL of this process's database (made on first use).
pub(crate) async fn url() -> String {
    static MADE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    MADE.get_or_init(|| async {
        let server = server_url();
        let pool = sqlx::MySqlPool::connect(&server).await.unwrap();
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT CAST(schema_name AS CHAR) FROM information_schema.schemata WHERE schema_name LIKE 'fsql\\_%'",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        let cutoff = now_secs().saturating_sub(STALE_SECONDS);
        for name in names {
            let created = name.split('_').nth(1).and_then(|s| s.parse::<u64>().ok());
            if created.is_some_and(|secs| secs < cutoff) {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
                    .execute(&pool)
                    .await;
            }
        }
        let name = database();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE IF NOT EXISTS {name}")))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let base = server.rsplit_once('/').map_or(server.as_str(), |(base, _)| base);
        format!("{base}/{name}")
    })
    .await
    .clone()
}

/// A pub/sub on this process's database, polling every 100 ms.
pub(crate) async fn pubsub() -> MySqlPubSub {
    MySqlPubSub::connect(
        MySqlPubSubConfig::new(url().await).poll_interval(std::time::Duration::from_millis(100)),
    )
    .await
    .expect("MariaDB is running (see scripts/test-all)")
}
