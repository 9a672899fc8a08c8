//! cqrs-es 0.5 with postgres-es 0.5: a minimal aggregate whose one command emits `count` events
//! of ~200 bytes, persisted by `PostgresEventRepository` through `PersistedEventStore` into the
//! events table of postgres-es's documented schema (`db/init.sql`), created in the run's own
//! schema. postgres-es takes a sqlx 0.8 pool (the `sqlx-08` dependency); sessions get
//! `synchronous_commit=on` like the `postgres` system.
//!
//! Every command loads the aggregate (all its events: no snapshots, as in postgres-es's
//! default `postgres_cqrs`), decides, and inserts the new events in one transaction; a
//! concurrent writer that inserted the same sequence first makes it fail with
//! `AggregateConflict` (the primary key). The framework tracks versions itself, so the
//! harness's expected version is ignored here.

use std::{
    str::FromStr as _,
    sync::{Arc, LazyLock, RwLock},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use async_trait::async_trait;
use cqrs_es::{
    Aggregate, AggregateError, CqrsFramework, DomainEvent, EventStore as _, event_sink::EventSink,
    persist::PersistedEventStore,
};
use postgres_es::{PostgresCqrs, PostgresEventRepository};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Connection as _};
use sqlx_08::postgres::{PgConnectOptions as PgConnectOptions08, PgPool as PgPool08};

use super::{
    Expected, Feed, Outcome, PAYLOAD_BYTES, SetupContext, System,
    postgres::{ACQUIRE_TIMEOUT, connect, redact_url, server_facts},
};
use crate::config::{SystemKind, WorkloadKind};

/// The aggregate: it only counts what it recorded.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct BenchAggregate {
    recorded: u64,
}

/// The one command.
#[derive(Debug)]
pub(crate) enum BenchCommand {
    /// Record `count` events.
    Record { count: usize },
}

/// The one event; serialized by postgres-es as `{"Recorded":{"note":"…"}}`, 200 bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum BenchEvent {
    Recorded { note: String },
}

impl DomainEvent for BenchEvent {
    fn event_type(&self) -> String {
        "Recorded".to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// The command never fails; the framework wants an error type anyway.
#[derive(Debug)]
pub(crate) struct BenchError;

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bench command failed")
    }
}

impl std::error::Error for BenchError {}

/// The note that makes one serialized event [`PAYLOAD_BYTES`] long.
static NOTE: LazyLock<String> = LazyLock::new(|| {
    let empty = serde_json::to_string(&BenchEvent::Recorded {
        note: String::new(),
    })
    .map_or(0, |json| json.len());
    "x".repeat(PAYLOAD_BYTES.saturating_sub(empty))
});

impl Aggregate for BenchAggregate {
    const TYPE: &'static str = "BenchAggregate";
    type Command = BenchCommand;
    type Event = BenchEvent;
    type Error = BenchError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        match command {
            BenchCommand::Record { count } => {
                for _ in 0..count {
                    let event = BenchEvent::Recorded { note: NOTE.clone() };
                    sink.write(event, self).await;
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, _event: Self::Event) {
        self.recorded += 1;
    }
}

type Loader = PersistedEventStore<PostgresEventRepository, BenchAggregate>;

struct Active {
    pool: PgPool08,
    cqrs: PostgresCqrs<BenchAggregate>,
    loader: Loader,
}

/// See the module docs.
pub(crate) struct CqrsSystem {
    options: PgConnectOptions08,
    url: String,
    schema: String,
    cap: usize,
    active: RwLock<Option<Arc<Active>>>,
    connect_timeout: Duration,
    description: String,
}

impl CqrsSystem {
    pub(crate) async fn open(ctx: &SetupContext<'_>) -> Result<Self> {
        let url = ctx.postgres_url;
        let timeout = ctx.sizes.connect_timeout;
        // Checks and schema through sqlx 0.9 (same server); the pool for postgres-es is 0.8.
        let options09 = sqlx::postgres::PgConnectOptions::from_str(url)
            .with_context(|| format!("bad PostgreSQL URL {}", redact_url(url)))?
            .options([("synchronous_commit", "on")])
            .application_name("factline-bench");
        let mut conn = connect(&options09, url, timeout).await?;
        let facts = server_facts(&mut conn).await?;
        let schema = format!("bench_{}_cqrs", ctx.run_id);
        for statement in [
            format!("CREATE SCHEMA {schema}"),
            // postgres-es's documented schema (db/init.sql), in our schema.
            format!(
                "CREATE TABLE {schema}.events (
                    aggregate_type text NOT NULL,
                    aggregate_id text NOT NULL,
                    sequence bigint CHECK (sequence >= 0) NOT NULL,
                    event_type text NOT NULL,
                    event_version text NOT NULL,
                    payload json NOT NULL,
                    metadata json NOT NULL,
                    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
                )"
            ),
            format!(
                "CREATE TABLE {schema}.snapshots (
                    aggregate_type text NOT NULL,
                    aggregate_id text NOT NULL,
                    last_sequence bigint CHECK (last_sequence >= 0) NOT NULL,
                    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
                    payload json NOT NULL,
                    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
                )"
            ),
        ] {
            sqlx::query(AssertSqlSafe(statement))
                .execute(&mut conn)
                .await
                .context("create the postgres-es schema")?;
        }
        conn.close().await.ok();
        let options = PgConnectOptions08::from_str(url)
            .with_context(|| format!("bad PostgreSQL URL {}", redact_url(url)))?
            .options([("synchronous_commit", "on")])
            .application_name("factline-bench-cqrs");
        Ok(Self {
            options,
            url: url.to_owned(),
            description: format!(
                "cqrs-es 0.5 + postgres-es 0.5 (sqlx 0.8) on PostgreSQL {}, synchronous_commit=on \
                 per session, schema {schema}, no snapshots, pool = writers (at most {})",
                facts.version, facts.cap
            ),
            schema,
            cap: facts.cap,
            active: RwLock::new(None),
            connect_timeout: timeout,
        })
    }

    fn active(&self) -> Result<Arc<Active>> {
        self.active
            .read()
            .map_err(|_| anyhow!("lock poisoned"))?
            .clone()
            .ok_or_else(|| anyhow!("cqrs-es: no pool (prepare was not called)"))
    }

    fn repository(&self, pool: PgPool08) -> PostgresEventRepository {
        PostgresEventRepository::new(pool).with_tables(
            &format!("{}.events", self.schema),
            &format!("{}.snapshots", self.schema),
        )
    }
}

/// A sqlx 0.8 pool of exactly `size` open connections, each checked for `synchronous_commit=on`.
async fn warm_pool(options: &PgConnectOptions08, size: u32) -> Result<PgPool08> {
    let pool = sqlx_08::postgres::PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .idle_timeout(None)
        .max_lifetime(None)
        .test_before_acquire(false)
        .connect_lazy_with(options.clone());
    let mut connections = Vec::with_capacity(size as usize);
    for _ in 0..size {
        let mut conn = pool.acquire().await.context("open pool connection")?;
        let setting: String = sqlx_08::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut *conn)
            .await?;
        if setting != "on" {
            bail!("a pooled session has synchronous_commit={setting}");
        }
        connections.push(conn);
    }
    drop(connections);
    Ok(pool)
}

fn framework_error(error: AggregateError<BenchError>) -> anyhow::Error {
    anyhow!("cqrs-es: {error}")
}

#[async_trait]
impl System for CqrsSystem {
    fn kind(&self) -> SystemKind {
        SystemKind::CqrsEs
    }

    fn not_applicable(&self, workload: WorkloadKind) -> Option<&'static str> {
        match workload {
            WorkloadKind::W5 => Some(
                "cqrs-es has no global order ($all) to scan: events are replayed per aggregate type",
            ),
            WorkloadKind::W6 => Some(
                "cqrs-es has no store subscription: queries run in-process after the command commits",
            ),
            _ => None,
        }
    }

    async fn prepare(&self, writers: usize) -> Result<()> {
        self.release().await?;
        let size = u32::try_from(writers.clamp(1, self.cap)).unwrap_or(1);
        let pool = tokio::time::timeout(ACQUIRE_TIMEOUT, warm_pool(&self.options, size))
            .await
            .map_err(|_| anyhow!("opening {size} connections took over 30s"))??;
        let store = PersistedEventStore::new_event_store(self.repository(pool.clone()));
        let active = Active {
            cqrs: CqrsFramework::new(store, vec![], ()),
            loader: PersistedEventStore::new_event_store(self.repository(pool.clone())),
            pool,
        };
        *self.active.write().map_err(|_| anyhow!("lock poisoned"))? = Some(Arc::new(active));
        Ok(())
    }

    async fn release(&self) -> Result<()> {
        let active = self
            .active
            .write()
            .map_err(|_| anyhow!("lock poisoned"))?
            .take();
        if let Some(active) = active {
            tokio::time::timeout(Duration::from_secs(10), active.pool.close())
                .await
                .ok();
        }
        Ok(())
    }

    fn phase_note(&self, writers: usize) -> Option<String> {
        (writers > self.cap).then(|| {
            format!(
                "pool capped at {} connections (server max_connections)",
                self.cap
            )
        })
    }

    async fn append(&self, stream: &str, _expected: Expected, count: usize) -> Result<Outcome> {
        let active = self.active()?;
        match active
            .cqrs
            .execute(stream, BenchCommand::Record { count })
            .await
        {
            Ok(()) => Ok(Outcome::Written),
            Err(AggregateError::AggregateConflict) => Ok(Outcome::Conflict { actual: None }),
            Err(error) => Err(framework_error(error)),
        }
    }

    async fn stream_version(&self, _stream: &str) -> Result<Expected> {
        // The framework reloads the aggregate on every command; nothing to track.
        Ok(Expected::NoStream)
    }

    async fn read_stream(&self, stream: &str) -> Result<u64> {
        let active = self.active()?;
        let events = active
            .loader
            .load_events(stream)
            .await
            .map_err(framework_error)?;
        Ok(events.len() as u64)
    }

    async fn scan_all(&self, _max_events: u64) -> Result<u64> {
        bail!("not applicable")
    }

    async fn subscribe(&self) -> Result<Box<dyn Feed>> {
        bail!("not applicable")
    }

    async fn teardown(&self) -> Result<()> {
        self.release().await?;
        let options09 = sqlx::postgres::PgConnectOptions::from_str(&self.url)?;
        let mut conn = connect(&options09, &self.url, self.connect_timeout).await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.schema
        )))
        .execute(&mut conn)
        .await
        .with_context(|| format!("drop schema {}", self.schema))?;
        conn.close().await.ok();
        Ok(())
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn one_event_serializes_to_200_bytes() {
        let event = BenchEvent::Recorded { note: NOTE.clone() };
        assert_eq!(serde_json::to_string(&event).unwrap().len(), PAYLOAD_BYTES);
    }
}
