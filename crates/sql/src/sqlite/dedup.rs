//! A persistent [`DedupStore`] on SQLite, for the deduplication middleware.

use async_trait::async_trait;
use factline_messaging::BoxError;
use factline_messaging::middleware::{Claim, DedupStore};

use super::{SqlitePubSub, boxed, micros, now_micros};
use crate::dedup::{DedupConfig, stored_key};

/// Keys of handled messages in the table `fl_dedup` (made by [`SqlitePubSub::connect`]), shared
/// by every connection and process on the database file. Times are this machine's clock.
/// Expired entries are taken over in place; [`SqliteDedupStore::delete_expired`] removes them
/// in bulk.
#[derive(Debug, Clone)]
pub struct SqliteDedupStore {
    pubsub: SqlitePubSub,
    config: DedupConfig,
}

impl SqliteDedupStore {
    /// A store on `pubsub`'s database.
    pub fn new(pubsub: &SqlitePubSub, config: DedupConfig) -> Self {
        Self {
            pubsub: pubsub.clone(),
            config,
        }
    }

    /// Deletes done keys older than the ttl and abandoned claims; returns how many.
    pub async fn delete_expired(&self) -> Result<u64, BoxError> {
        let now = now_micros();
        let deleted = sqlx::query(
            "DELETE FROM fl_dedup WHERE (done = 1 AND at_us < ?1 - ?2) \
             OR (done = 0 AND at_us < ?1 - ?3)",
        )
        .bind(now)
        .bind(micros(self.config.ttl))
        .bind(micros(self.config.claim_ttl))
        .execute(&self.pubsub.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(deleted.rows_affected())
    }
}

#[async_trait]
impl DedupStore for SqliteDedupStore {
    async fn begin(&self, scope: &str, key: &str) -> Result<Claim, BoxError> {
        let (scope, key) = (stored_key(scope, usize::MAX), stored_key(key, usize::MAX));
        // Takes the row when it is absent, an expired claim or an expired done key (one
        // statement: SQLite runs it under its write lock); otherwise says what is there.
        let taken = sqlx::query(
            "INSERT INTO fl_dedup (scope, dkey, done, at_us) VALUES (?1, ?2, 0, ?3) \
             ON CONFLICT (scope, dkey) DO UPDATE SET done = 0, at_us = ?3 \
             WHERE (fl_dedup.done = 0 AND fl_dedup.at_us < ?3 - ?4) \
                OR (fl_dedup.done = 1 AND fl_dedup.at_us < ?3 - ?5)",
        )
        .bind(scope.as_ref())
        .bind(key.as_ref())
        .bind(now_micros())
        .bind(micros(self.config.claim_ttl))
        .bind(micros(self.config.ttl))
        .execute(&self.pubsub.shared.pool)
        .await
        .map_err(boxed)?;
        if taken.rows_affected() == 1 {
            return Ok(Claim::New);
        }
        let done: Option<bool> =
            sqlx::query_scalar("SELECT done FROM fl_dedup WHERE scope = ?1 AND dkey = ?2")
                .bind(scope.as_ref())
                .bind(key.as_ref())
                .fetch_optional(&self.pubsub.shared.pool)
                .await
                .map_err(boxed)?;
        // Gone since (released): someone else's claim ended a moment ago; the redelivery
        // that InProgress asks for finds it free.
        Ok(if done == Some(true) {
            Claim::AlreadyDone
        } else {
            Claim::InProgress
        })
    }

    async fn complete(&self, scope: &str, key: &str) -> Result<(), BoxError> {
        sqlx::query(
            "INSERT INTO fl_dedup (scope, dkey, done, at_us) VALUES (?1, ?2, 1, ?3) \
             ON CONFLICT (scope, dkey) DO UPDATE SET done = 1, at_us = ?3",
        )
        .bind(stored_key(scope, usize::MAX).as_ref())
        .bind(stored_key(key, usize::MAX).as_ref())
        .bind(now_micros())
        .execute(&self.pubsub.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(())
    }

    async fn release(&self, scope: &str, key: &str) -> Result<(), BoxError> {
        sqlx::query("DELETE FROM fl_dedup WHERE scope = ?1 AND dkey = ?2 AND done = 0")
            .bind(stored_key(scope, usize::MAX).as_ref())
            .bind(stored_key(key, usize::MAX).as_ref())
            .execute(&self.pubsub.shared.pool)
            .await
            .map_err(boxed)?;
        Ok(())
    }
}
