//! SQLite through sqlx: WAL, `synchronous=FULL` (every commit fsyncs the WAL), one table with
//! `UNIQUE (stream, revision)`. Appends run in `BEGIN IMMEDIATE` transactions that check the
//! stream's last revision and insert the next ones (one multi-row INSERT per append).
//!
//! Writes go through a pool of one connection: SQLite has one writer at a time, and queueing
//! writers on the pool is fairer to SQLite than letting them spin in its busy handler. Reads
//! use a separate pool (WAL readers do not block the writer).

use std::{
    collections::HashMap,
    path::Path,
    str::FromStr as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use sqlx::{
    AssertSqlSafe, Row as _, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use super::{EVENT_TYPE, Expected, Feed, Outcome, System, is_unique_violation, json_payload};
use crate::config::{Sizes, SystemKind, WorkloadKind};

const READ_CONNECTIONS: u32 = 2;

/// Rows per multi-row INSERT (4 parameters each, well under SQLite's 32,766).
const ROWS_PER_INSERT: usize = 1_000;

/// See the module docs.
pub(crate) struct SqliteSystem {
    write: SqlitePool,
    read: SqlitePool,
    payload: Bytes,
    page: i64,
    description: String,
    /// `INSERT … VALUES (?, ?, ?, ?), …` by row count (sqlx caches the prepared statements).
    inserts: Mutex<HashMap<usize, Arc<str>>>,
}

impl SqliteSystem {
    pub(crate) async fn open(dir: &Path, sizes: &Sizes) -> Result<Self> {
        let path = dir.join("events.db");
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30));
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(options.clone())
            .await
            .with_context(|| format!("open {}", path.display()))?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS events (
                position INTEGER PRIMARY KEY AUTOINCREMENT,
                stream TEXT NOT NULL,
                revision INTEGER NOT NULL,
                type TEXT NOT NULL,
                data BLOB NOT NULL,
                UNIQUE (stream, revision)
            )",
        )
        .execute(&write)
        .await
        .context("create table")?;
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&write)
            .await?;
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&write)
            .await?;
        if !journal.eq_ignore_ascii_case("wal") || synchronous != 2 {
            bail!(
                "SQLite did not accept WAL + synchronous=FULL (journal_mode={journal}, synchronous={synchronous})"
            );
        }
        let version: String = sqlx::query_scalar("SELECT sqlite_version()")
            .fetch_one(&write)
            .await?;
        let read = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(options.create_if_missing(false).read_only(true))
            .await
            .context("open read pool")?;
        Ok(Self {
            write,
            read,
            payload: json_payload(),
            page: i64::try_from(sizes.read_page).unwrap_or(10_000),
            inserts: Mutex::new(HashMap::new()),
            description: format!(
                "SQLite {version} via sqlx, journal_mode=WAL, synchronous=FULL, \
                 BEGIN IMMEDIATE appends on 1 write connection, {READ_CONNECTIONS} read connections"
            ),
        })
    }
}

impl SqliteSystem {
    fn insert_sql(&self, rows: usize) -> Result<Arc<str>> {
        let mut inserts = self
            .inserts
            .lock()
            .map_err(|_| anyhow!("statement cache lock poisoned"))?;
        Ok(Arc::clone(inserts.entry(rows).or_insert_with(|| {
            let values = vec!["(?, ?, ?, ?)"; rows].join(", ");
            format!("INSERT INTO events (stream, revision, type, data) VALUES {values}").into()
        })))
    }
}

#[async_trait]
impl System for SqliteSystem {
    fn kind(&self) -> SystemKind {
        SystemKind::Sqlite
    }

    fn not_applicable(&self, workload: WorkloadKind) -> Option<&'static str> {
        match workload {
            WorkloadKind::W6 => Some(
                "SQLite has no change notification across connections; a subscriber would have to poll",
            ),
            _ => None,
        }
    }

    async fn append(&self, stream: &str, expected: Expected, count: usize) -> Result<Outcome> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let current: i64 =
            sqlx::query_scalar("SELECT coalesce(max(revision), -1) FROM events WHERE stream = ?")
                .bind(stream)
                .fetch_one(&mut *tx)
                .await?;
        if current != expected.as_sql() {
            tx.rollback().await?;
            return Ok(Outcome::Conflict {
                actual: Some(Expected::from_sql(current)),
            });
        }
        let mut next = current + 1;
        let mut remaining = count;
        while remaining > 0 {
            let rows = remaining.min(ROWS_PER_INSERT);
            let mut insert = sqlx::query(AssertSqlSafe(self.insert_sql(rows)?));
            for _ in 0..rows {
                insert = insert
                    .bind(stream)
                    .bind(next)
                    .bind(EVENT_TYPE)
                    .bind(self.payload.as_ref());
                next += 1;
            }
            match insert.execute(&mut *tx).await {
                Ok(_) => {}
                Err(error) if is_unique_violation(&error) => {
                    tx.rollback().await?;
                    return Ok(Outcome::Conflict { actual: None });
                }
                Err(error) => return Err(error.into()),
            }
            remaining -= rows;
        }
        tx.commit().await?;
        Ok(Outcome::Written)
    }

    async fn stream_version(&self, stream: &str) -> Result<Expected> {
        let current: i64 =
            sqlx::query_scalar("SELECT coalesce(max(revision), -1) FROM events WHERE stream = ?")
                .bind(stream)
                .fetch_one(&self.read)
                .await?;
        Ok(Expected::from_sql(current))
    }

    async fn read_stream(&self, stream: &str) -> Result<u64> {
        let rows = sqlx::query(
            "SELECT position, revision, type, data FROM events WHERE stream = ? ORDER BY revision",
        )
        .bind(stream)
        .fetch_all(&self.read)
        .await?;
        for row in &rows {
            decode_row(row)?;
        }
        Ok(rows.len() as u64)
    }

    async fn scan_all(&self, max_events: u64) -> Result<u64> {
        let mut after: i64 = 0;
        let mut count: u64 = 0;
        while count < max_events {
            let limit = self
                .page
                .min(i64::try_from(max_events - count).unwrap_or(i64::MAX));
            let rows = sqlx::query(
                "SELECT position, revision, type, data, stream FROM events
                 WHERE position > ? ORDER BY position LIMIT ?",
            )
            .bind(after)
            .bind(limit)
            .fetch_all(&self.read)
            .await?;
            for row in &rows {
                let (position, ..) = decode_row(row)?;
                let _stream: String = row.try_get(4)?;
                after = position;
            }
            count += rows.len() as u64;
            if (rows.len() as i64) < limit {
                break;
            }
        }
        Ok(count)
    }

    async fn subscribe(&self) -> Result<Box<dyn Feed>> {
        bail!("not applicable")
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// Decodes the columns a reader of an event store would (position, revision, type, data).
fn decode_row(row: &sqlx::sqlite::SqliteRow) -> Result<(i64, i64, String, Vec<u8>)> {
    Ok((
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
    ))
}
