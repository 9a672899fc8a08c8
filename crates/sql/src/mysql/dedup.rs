//! A persistent [`DedupStore`] on MariaDB, for the deduplication middleware.

use async_trait::async_trait;
use factline_messaging::BoxError;
use factline_messaging::middleware::{Claim, DedupStore};
use sqlx::AssertSqlSafe;

use super::{MySqlPubSub, NOW_US, boxed, micros};
use crate::dedup::{DedupConfig, stored_key};

/// The key columns' width (`VARBINARY(255)`).
const KEY_BYTES_MAX: usize = 255;

/// Keys of handled messages in the table `fl_dedup` (made by [`MySqlPubSub::connect`]), shared
/// by every process on the database: a redelivery, to this consumer or another, finds the key
/// done. Times are the database's clock. Expired entries are taken over in place;
/// [`MySqlDedupStore::delete_expired`] removes them in bulk. Scopes and keys over 255 bytes are
/// kept as their SHA-256.
#[derive(Debug, Clone)]
pub struct MySqlDedupStore {
    pubsub: MySqlPubSub,
    config: DedupConfig,
}

impl MySqlDedupStore {
    /// A store on `pubsub`'s database.
    pub fn new(pubsub: &MySqlPubSub, config: DedupConfig) -> Self {
        Self {
            pubsub: pubsub.clone(),
            config,
        }
    }

    /// Deletes done keys older than the ttl and abandoned claims; returns how many.
    pub async fn delete_expired(&self) -> Result<u64, BoxError> {
        let deleted = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM fl_dedup WHERE (done AND at_us < {NOW_US} - ?) \
             OR (NOT done AND at_us < {NOW_US} - ?)"
        )))
        .bind(micros(self.config.ttl))
        .bind(micros(self.config.claim_ttl))
        .execute(&self.pubsub.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(deleted.rows_affected())
    }
}

#[async_trait]
impl DedupStore for MySqlDedupStore {
    async fn begin(&self, scope: &str, key: &str) -> Result<Claim, BoxError> {
        let (scope, key) = (
            stored_key(scope, KEY_BYTES_MAX),
            stored_key(key, KEY_BYTES_MAX),
        );
        let mut tx = self.pubsub.shared.pool.begin().await.map_err(boxed)?;
        // The row, locked (READ COMMITTED: a missing row locks nothing, and a concurrent
        // first claim then meets this one in the INSERT below, not in a deadlock).
        let found: Option<(bool, bool)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT done, \
                    (NOT done AND at_us < {NOW_US} - ?) OR (done AND at_us < {NOW_US} - ?) \
             FROM fl_dedup WHERE scope = ? AND dkey = ? FOR UPDATE"
        )))
        .bind(micros(self.config.claim_ttl))
        .bind(micros(self.config.ttl))
        .bind(scope.as_ref())
        .bind(key.as_ref())
        .fetch_optional(&mut *tx)
        .await
        .map_err(boxed)?;
        let claim = match found {
            Some((_, true)) => {
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE fl_dedup SET done = FALSE, at_us = {NOW_US} \
                     WHERE scope = ? AND dkey = ?"
                )))
                .bind(scope.as_ref())
                .bind(key.as_ref())
                .execute(&mut *tx)
                .await
                .map_err(boxed)?;
                Claim::New
            }
            Some((true, false)) => Claim::AlreadyDone,
            Some((false, false)) => Claim::InProgress,
            None => {
                let inserted = sqlx::query(AssertSqlSafe(format!(
                    "INSERT IGNORE INTO fl_dedup (scope, dkey, done, at_us) \
                     VALUES (?, ?, FALSE, {NOW_US})"
                )))
                .bind(scope.as_ref())
                .bind(key.as_ref())
                .execute(&mut *tx)
                .await
                .map_err(boxed)?;
                if inserted.rows_affected() == 1 {
                    Claim::New
                } else {
                    // Another begin claimed it between the two statements: say what it made.
                    let done: bool = sqlx::query_scalar(
                        "SELECT done FROM fl_dedup WHERE scope = ? AND dkey = ?",
                    )
                    .bind(scope.as_ref())
                    .bind(key.as_ref())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(boxed)?
                    .unwrap_or(false);
                    if done {
                        Claim::AlreadyDone
                    } else {
                        Claim::InProgress
                    }
                }
            }
        };
        tx.commit().await.map_err(boxed)?;
        Ok(claim)
    }

    async fn complete(&self, scope: &str, key: &str) -> Result<(), BoxError> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO fl_dedup (scope, dkey, done, at_us) VALUES (?, ?, TRUE, {NOW_US}) \
             ON DUPLICATE KEY UPDATE done = TRUE, at_us = {NOW_US}"
        )))
        .bind(stored_key(scope, KEY_BYTES_MAX).as_ref())
        .bind(stored_key(key, KEY_BYTES_MAX).as_ref())
        .execute(&self.pubsub.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(())
    }

    async fn release(&self, scope: &str, key: &str) -> Result<(), BoxError> {
        sqlx::query("DELETE FROM fl_dedup WHERE scope = ? AND dkey = ? AND NOT done")
            .bind(stored_key(scope, KEY_BYTES_MAX).as_ref())
            .bind(stored_key(key, KEY_BYTES_MAX).as_ref())
            .execute(&self.pubsub.shared.pool)
            .await
            .map_err(boxed)?;
        Ok(())
    }
}
