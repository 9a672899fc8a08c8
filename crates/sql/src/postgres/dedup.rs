//! A persistent [`DedupStore`] on PostgreSQL, for the deduplication middleware.

use async_trait::async_trait;
use factline_messaging::BoxError;
use factline_messaging::middleware::{Claim, DedupStore};
use sqlx::AssertSqlSafe;

use super::{PgPubSub, boxed};
/// Settings of a [`PgDedupStore`] (the same for every SQL backend).
pub use crate::dedup::DedupConfig as PgDedupConfig;
use crate::dedup::stored_key;

/// Keys of handled messages in `{schema}.fl_dedup`, shared by every process on the database:
/// a redelivery, to this consumer or another, finds the key done. Expired entries are taken
/// over in place; [`PgDedupStore::delete_expired`] removes them in bulk. Scopes and keys with a NUL
/// (which PostgreSQL's text cannot hold) are kept as their SHA-256.
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
            .bind(stored_key(scope, usize::MAX).as_ref())
            .bind(stored_key(key, usize::MAX).as_ref())
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
        .bind(stored_key(scope, usize::MAX).as_ref())
        .bind(stored_key(key, usize::MAX).as_ref())
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
        .bind(stored_key(scope, usize::MAX).as_ref())
        .bind(stored_key(key, usize::MAX).as_ref())
        .execute(&self.pubsub.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(())
    }
}
