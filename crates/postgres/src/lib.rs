//! factline's PostgreSQL event store: the [`EventStore`](factline_core::EventStore) contract for
//! teams that already run PostgreSQL, with its replication and backups.
//!
//! - [`PostgresStore`]: streams, `$all`, optimistic concurrency, idempotent retries, atomic
//!   multi-stream appends, stream metadata, soft delete and tombstones, snapshots, catch-up and
//!   live subscriptions woken by LISTEN/NOTIFY.
//! - Positions are gapless and handed out in commit order: a reader never passes over an event
//!   that commits late (the known failure of stores that number events with a sequence). Every
//!   writer takes one row lock before it numbers its events and keeps it until it commits; the
//!   argument is in `docs/design/postgres.md`.
//! - Appends from many callers share one transaction (one WAL flush): a single writer task
//!   batches whatever queued up while the previous transaction ran.
//! - [`PostgresStore::append_in`] appends inside the caller's own transaction, so state changes,
//!   events and outbox rows commit together; [`InlineProjection`]s update read models in the
//!   append's transaction; [`PostgresCheckpointStore::save_in`] saves a checkpoint in the caller's.
//! - The schema is versioned ([`schema::MIGRATIONS`]), applied on open or by `factline migrate`.
//!
//! ```no_run
//! use factline_core::{EventData, EventStore, ExpectedVersion, StreamId};
//! use factline_postgres::{PostgresOptions, PostgresStore};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PostgresStore::open(PostgresOptions::new("postgres://localhost/app")).await?;
//! let order = StreamId::new("order-42")?;
//! let placed = EventData::json("OrderPlaced", &serde_json::json!({"total_cents": 1250}))?;
//! store.append(&order, ExpectedVersion::NoStream, vec![placed]).await?;
//!
//! // State, events and outbox rows in one transaction:
//! let mut tx = store.pool().begin().await?;
//! sqlx::query("UPDATE orders SET status = 'paid' WHERE id = 42").execute(&mut *tx).await?;
//! let paid = EventData::json("OrderPaid", &serde_json::json!({}))?;
//! let request = factline_core::AppendRequest::new(order, ExpectedVersion::Exact(factline_core::Revision(0)), vec![paid]);
//! store.append_in(&mut tx, vec![request]).await?;
//! tx.commit().await?;
//! # Ok(())
//! # }
//! ```

mod append;
mod error;
mod rows;
pub mod schema;
mod sql;
mod store;
mod writer;

pub use error::{DatabaseError, MigrateError, OpenError, redact_url};
/// Re-exported: the checkpoint contract lives in core.
pub use factline_core::{CHECKPOINT_NAME_BYTES_MAX, CheckpointError};
pub use rows::CorruptRow;
pub use schema::{SchemaName, SchemaNameError};
pub use store::{
    PostgresCheckpointStore, PostgresOptions, PostgresStore, applied_migrations, migrate,
};
pub use writer::WriterStats;

/// Re-exported so that callers name the same sqlx version for transactions.
pub use sqlx;

use async_trait::async_trait;
use factline_core::RecordedEvent;
use sqlx::PgConnection;

/// A read-model update that runs inside every append transaction of a [`PostgresStore`]
/// (configured with [`PostgresOptions::inline_projection`]), so the read model is never behind
/// the events and never ahead of them.
///
/// `apply` gets the events the transaction writes, in position order, and the transaction's
/// connection. An error rolls the append back: the caller's `append` fails with a storage
/// error wrapping [`InlineProjectionError`] and nothing is written. Keep it quick — it runs
/// while the store's log lock is held.
#[async_trait]
pub trait InlineProjection: Send + Sync + 'static {
    /// A name for logs and errors.
    fn name(&self) -> &str;

    /// Applies `events` to the read model through `conn`.
    async fn apply(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), InlineProjectionError>;
}

/// An inline projection refused or failed; the append was rolled back.
#[derive(Debug, thiserror::Error)]
#[error("inline projection {projection} failed: {source}")]
pub struct InlineProjectionError {
    /// The projection's name.
    pub projection: String,
    /// What went wrong.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl InlineProjectionError {
    /// Wraps `source` as a failure of `projection`.
    pub fn new(
        projection: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            projection: projection.into(),
            source: source.into(),
        }
    }
}
