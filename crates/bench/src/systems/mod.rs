//! The systems under test, behind one small interface that every workload drives.

use std::{path::Path, sync::Arc};

use anyhow::Result;
use async_trait::async_trait;

use crate::config::{Sizes, SystemKind, WorkloadKind};

mod cqrs;
mod floor;
mod postgres;
mod sqlite;
mod store;

pub use store::open_factline_log;

/// The event type every system stores.
pub(crate) const EVENT_TYPE: &str = "BenchEvent";

/// Size of every event's JSON payload.
pub(crate) const PAYLOAD_BYTES: usize = 200;

/// A 200-byte JSON object: the payload of every event.
pub(crate) fn json_payload() -> bytes::Bytes {
    let prefix = r#"{"customer_id":"customer-4711","order_id":"order-000042","amount_cents":125000,"currency":"EUR","note":""#;
    let suffix = r#""}"#;
    let pad = PAYLOAD_BYTES.saturating_sub(prefix.len() + suffix.len());
    bytes::Bytes::from(format!("{prefix}{}{suffix}", "x".repeat(pad)))
}

/// The optimistic-concurrency condition of an append, as the harness tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expected {
    /// The stream must be empty.
    NoStream,
    /// The stream's last revision must be this one.
    Exact(u64),
}

impl Expected {
    /// The revision the next event gets.
    pub(crate) fn next_revision(self) -> u64 {
        match self {
            Self::NoStream => 0,
            Self::Exact(revision) => revision + 1,
        }
    }

    /// The condition after `count` more events were written.
    pub(crate) fn after(self, count: usize) -> Self {
        Self::Exact(self.next_revision() + count as u64 - 1)
    }

    /// SQL form: the last revision, -1 for an empty stream.
    pub(crate) fn as_sql(self) -> i64 {
        match self {
            Self::NoStream => -1,
            Self::Exact(revision) => i64::try_from(revision).unwrap_or(i64::MAX),
        }
    }

    /// From the SQL form.
    pub(crate) fn from_sql(last: i64) -> Self {
        u64::try_from(last).map_or(Self::NoStream, Self::Exact)
    }
}

/// How an append ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Written and acknowledged (durably, for a durable system).
    Written,
    /// Refused: the stream was not at the expected version. `actual` when the system said.
    Conflict { actual: Option<Expected> },
}

/// A live subscription to everything appended after it was opened.
#[async_trait]
pub(crate) trait Feed: Send {
    /// Waits for the next delivery; returns how many events it brought (at least one).
    async fn next_batch(&mut self) -> Result<usize>;
}

/// What the workloads drive. Streams are plain names; payloads are the system's own copy of
/// [`json_payload`].
#[async_trait]
pub(crate) trait System: Send + Sync {
    /// Which system this is.
    fn kind(&self) -> SystemKind;

    /// `Some(reason)` when the system cannot run `workload` honestly.
    fn not_applicable(&self, workload: WorkloadKind) -> Option<&'static str>;

    /// Called before each phase with its writer count (sizes connection pools).
    async fn prepare(&self, _writers: usize) -> Result<()> {
        Ok(())
    }

    /// Called after each phase (closes connection pools).
    async fn release(&self) -> Result<()> {
        Ok(())
    }

    /// A remark on a phase with this many writers (e.g. a capped pool), for the table.
    fn phase_note(&self, _writers: usize) -> Option<String> {
        None
    }

    /// Appends `count` events to `stream` if it is at `expected`.
    async fn append(&self, stream: &str, expected: Expected, count: usize) -> Result<Outcome>;

    /// The stream's current version (to retry after a conflict).
    async fn stream_version(&self, stream: &str) -> Result<Expected>;

    /// Reads the whole stream; returns the number of events.
    async fn read_stream(&self, stream: &str) -> Result<u64>;

    /// Reads `$all` from the start, up to `max_events`; returns the number of events.
    async fn scan_all(&self, max_events: u64) -> Result<u64>;

    /// Subscribes to everything appended from now on.
    async fn subscribe(&self) -> Result<Box<dyn Feed>>;

    /// Removes what the system created outside the data directory (PostgreSQL schemas).
    async fn teardown(&self) -> Result<()> {
        Ok(())
    }

    /// Facts about the configuration, for the report header.
    fn describe(&self) -> String;
}

/// Where systems keep their files and what they share.
#[derive(Debug)]
pub(crate) struct SetupContext<'a> {
    pub(crate) data_dir: &'a Path,
    pub(crate) postgres_url: &'a str,
    pub(crate) sizes: &'a Sizes,
    /// Unique per run: names PostgreSQL schemas and channels.
    pub(crate) run_id: &'a str,
}

/// Opens `kind`. An error means the system is skipped, with the error as the reason.
pub(crate) async fn open(kind: SystemKind, ctx: &SetupContext<'_>) -> Result<Arc<dyn System>> {
    let dir = ctx.data_dir.join(kind.name());
    Ok(match kind {
        SystemKind::FactlineLog => {
            std::fs::create_dir_all(&dir)?;
            Arc::new(store::StoreSystem::new(
                kind,
                open_factline_log(&dir).await?,
                "factline-log embedded engine; acknowledged after fdatasync (group commit)"
                    .to_owned(),
            ))
        }
        SystemKind::FactlineHttp => {
            std::fs::create_dir_all(&dir)?;
            let log = open_factline_log(&dir).await?;
            Arc::new(store::StoreSystem::new(
                kind,
                store::serve_over_http(log).await?,
                "factline serve over factline-log, in process on 127.0.0.1, through the HTTP \
                 API and its client HttpStore (keep-alive); acknowledged after fdatasync"
                    .to_owned(),
            ))
        }
        SystemKind::FactlineMemory => Arc::new(store::StoreSystem::new(
            kind,
            Arc::new(factline_core::InMemoryStore::new()),
            "InMemoryStore: NOT durable, reference only".to_owned(),
        )),
        SystemKind::FsyncFloor => {
            std::fs::create_dir_all(&dir)?;
            Arc::new(floor::FloorSystem::open(&dir)?)
        }
        SystemKind::Sqlite => {
            std::fs::create_dir_all(&dir)?;
            Arc::new(sqlite::SqliteSystem::open(&dir, ctx.sizes).await?)
        }
        SystemKind::Postgres => Arc::new(postgres::PgSystem::open(ctx).await?),
        SystemKind::CqrsEs => Arc::new(cqrs::CqrsSystem::open(ctx).await?),
        SystemKind::FactlinePostgres => Arc::new(store::open_factline_postgres(ctx).await?),
    })
}

/// How many connections a PostgreSQL-backed system may open: what the server allows, less the
/// reserved slots, what is in use and some headroom for other clients.
pub(crate) fn postgres_connection_cap(max_connections: i64, reserved: i64, in_use: i64) -> usize {
    const HEADROOM: i64 = 8;
    usize::try_from(max_connections - reserved - in_use - HEADROOM)
        .unwrap_or(1)
        .max(1)
}

/// True when a sqlx 0.9 error is a unique-constraint violation (PostgreSQL 23505, SQLite 2067).
pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// The in-memory store as a system, for unit tests of the workloads.
#[cfg(test)]
pub(crate) fn store_system_for_tests() -> impl System {
    store::StoreSystem::new(
        SystemKind::FactlineMemory,
        Arc::new(factline_core::InMemoryStore::new()),
        String::new(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_200_bytes_of_json() {
        let payload = json_payload();
        assert_eq!(payload.len(), PAYLOAD_BYTES);
        let value: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert!(value.is_object());
    }

    #[test]
    fn expected_versions_advance_and_map_to_sql() {
        assert_eq!(Expected::NoStream.after(1), Expected::Exact(0));
        assert_eq!(Expected::NoStream.after(100), Expected::Exact(99));
        assert_eq!(Expected::Exact(99).after(1), Expected::Exact(100));
        assert_eq!(Expected::NoStream.as_sql(), -1);
        assert_eq!(Expected::from_sql(-1), Expected::NoStream);
        assert_eq!(Expected::from_sql(7), Expected::Exact(7));
        assert_eq!(Expected::Exact(7).next_revision(), 8);
    }

    #[test]
    fn connection_cap_leaves_headroom() {
        assert_eq!(postgres_connection_cap(100, 3, 5), 84);
        assert_eq!(postgres_connection_cap(10, 3, 5), 1);
    }
}
