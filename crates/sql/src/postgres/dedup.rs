//! A persistent [`DedupStore`] on PostgreSQL, for the deduplication middleware.

use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::BoxError;
use factline_messaging::middleware::{Claim, DedupStore};
use sqlx::AssertSqlSafe;

use super::{PgPubSub, boxed};

/// Settings of a [`PgDedupStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgDedupConfig {
    /// How long a done key is remembered; a redelivery after that is handled again.
    /// Default 7 days.
    pub ttl: Duration,
    /// How long a claim holds without being completed or released before the next `begin`
    /// takes it over (it must outlast the handler and its retries). Default 5 minutes.
    pub claim_ttl: Duration,
}

impl Default for PgDedupConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(7 * 24 * 3_600),
            claim_ttl: Duration::from_secs(5 * 60),
        }
    }
}

impl PgDedupConfig {
    /// Builder: see [`PgDedupConfig::ttl`].
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Builder: see [`PgDedupConfig::claim_ttl`].
    #[must_use]
    pub fn claim_ttl(mut self, ttl: Duration) -> Self {
        self.claim_ttl = ttl;
        self
    }
}

/// Keys of handled messages in `{schema}.fl_dedup`, shared by every process on the database:
/// a redelivery, to this consumer or another, finds the key done. Expired entries are taken
/// over in place; [`PgDedupStore::delete_expired`] removes them in bulk.
#[derive(Debug, Clone)]
pub struct PgDedupStore {
    pubsub: PgPubSub,
    config: PgDedupConfig,
    begin_sql: String,
}

impl PgDedupStore {
    /// A store in `pubsub`'s schema.
    pub fn new(pubsub: &PgPubSub, config: PgDedupConfig) -> Self {
        let schema = pubsub.shared.schema();
        // Takes the row when it is absent, a claim older than claim_ttl or a done key older
        // than ttl; otherwise says what is there.
        let begin_sql = format!(
            "WITH taken AS (
               INSERT INTO {schema}.fl_dedup AS d (scope, key, done, at) VALUES ($1, $2, false, now())
               ON CONFLICT (scope, key) DO UPDATE SET done = false, at = now()
               WHERE (NOT d.done AND d.at < now() - make_interval(secs => $3))
                  OR (d.done AND d.at < now() - make_interval(secs => $4))
               RETURNING 1)
             SELECT CASE WHEN EXISTS (SELECT 1 FROM taken) THEN 'new'
                    WHEN (SELECT done FROM {schema}.fl_dedup WHERE scope = $1 AND key = $2) THEN 'done'
                    ELSE 'claimed' END"
        );
        Self {
            pubsub: pubsub.clone(),
            config,
            begin_sql,
        }
    }

    /// Deletes done keys older than the ttl and abandoned claims; returns how many.
    pub async fn delete_expired(&self) -> Result<u64, BoxError> {
        let schema = self.pubsub.shared.schema();
        let done = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {schema}.fl_dedup WHERE (done AND at < now() - make_interval(secs => $1)) \
             OR (NOT done AND at < now() - make_interval(secs => $2))"
        )))
        .bind(self.config.ttl.as_secs_f64())
        .bind(self.config.claim_ttl.as_secs_f64())
        .execute(&self.pubsub.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl DedupStore for PgDedupStore {
    async fn begin(&self, scope: &str, key: &str) -> Result<Claim, BoxError> {
        let state: String = sqlx::query_scalar(AssertSqlSafe(self.begin_sql.as_str()))
            .bind(scope)
            .bind(key)
            .bind(self.config.claim_ttl.as_secs_f64())
            .bind(self.config.ttl.as_secs_f64())
            .fetch_one(&self.pubsub.shared.pool)
            .await
            .map_err(boxed)?;
        Ok(match state.as_str() {
            "new" => Claim::New,
            "done" => Claim::AlreadyDone,
            _ => Claim::InProgress,
        })
    }

    async fn complete(&self, scope: &str, key: &str) -> Result<(), BoxError> {
        let schema = self.pubsub.shared.schema();
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {schema}.fl_dedup (scope, key, done, at) VALUES ($1, $2, true, now()) \
             ON CONFLICT (scope, key) DO UPDATE SET done = true, at = now()"
        )))
        .bind(scope)
        .bind(key)
        .execute(&self.pubsub.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(())
    }

    async fn release(&self, scope: &str, key: &str) -> Result<(), BoxError> {
        let schema = self.pubsub.shared.schema();
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {schema}.fl_dedup WHERE scope = $1 AND key = $2 AND NOT done"
        )))
        .bind(scope)
        .bind(key)
        .execute(&self.pubsub.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(())
    }
}
