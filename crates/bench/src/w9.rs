//! W9: projection rebuilds. A log of `events` order events (200-byte JSON payloads, 1,000 per
//! stream) is preloaded, untimed; then a fresh projection is caught up from position 0 with
//! `ProjectionRunner::catch_up` and timed to the end. Read models:
//!
//! - `memory`: totals per stream in a `HashMap` (the in-memory read model of the target);
//! - `postgres`: one row per event in a history table plus a totals table, written in batches
//!   by `Projection::flush` in the same transaction as the checkpoint (`save_in`), every
//!   `checkpoint_every_events` events — exactly once.
//!
//! Sources: the in-memory store and factline-log. Beside each runner row, a `raw-scan` row
//! folds the same events with a bare `read_all` loop and `serde_json` (no runner, no
//! subscription, no checkpoint): the ratio is what the runner costs.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use factline_core::{
    CheckpointStore, EventData, EventStore, ExpectedVersion, InMemoryCheckpointStore,
    InMemoryStore, Position, ReadAllOptions, RecordedEvent, StreamId,
};
use factline_domain::{DomainEvent, Projection, ProjectionRunner, RunnerOptions};
use factline_postgres::{PostgresCheckpointStore, PostgresOptions, PostgresStore, SchemaName};
use serde::{Deserialize, Serialize};
use sqlx::AssertSqlSafe;

/// The event every W9 stream holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
pub enum W9Event {
    /// An amount recorded against the stream.
    AmountRecorded {
        /// Cents.
        amount_cents: u64,
        /// Filler to a 200-byte payload.
        pad: String,
    },
}

/// Sizes of a W9 run.
#[derive(Debug, Clone)]
pub struct W9Options {
    /// Events preloaded and rebuilt.
    pub events: u64,
    /// Rounds (the median is reported).
    pub rounds: usize,
    /// Events per checkpoint (and per PostgreSQL batch).
    pub checkpoint_every_events: u64,
    /// The PostgreSQL server for the `postgres` read model; `None` skips it.
    pub postgres_url: Option<String>,
}

impl W9Options {
    /// 1M events, 3 rounds.
    pub fn full(postgres_url: Option<String>) -> Self {
        Self {
            events: 1_000_000,
            rounds: 3,
            checkpoint_every_events: 10_000,
            postgres_url,
        }
    }

    /// 100k events, 1 round.
    pub fn quick(postgres_url: Option<String>) -> Self {
        Self {
            events: 100_000,
            rounds: 1,
            ..Self::full(postgres_url)
        }
    }
}

/// One measured rebuild.
#[derive(Debug, Clone, Serialize)]
pub struct W9Row {
    /// Where the events come from.
    pub source: &'static str,
    /// The read model, or `raw-scan` for the bare loop.
    pub model: &'static str,
    /// Events processed per second (median round).
    pub events_per_sec: f64,
    /// The median round's duration.
    pub seconds: f64,
}

const EVENTS_PER_STREAM: u64 = 1_000;
const PAD: &str = "W9 filler W9 filler W9 filler W9 filler W9 filler W9 filler W9 filler W9 filler W9 filler W9 filler W9 filler W9 filler W9 filler W9 filler W9 filler ";

fn event(n: u64) -> Result<EventData> {
    let event = W9Event::AmountRecorded {
        amount_cents: n % 10_000,
        pad: PAD.to_owned(),
    };
    Ok(event.to_event_data(Default::default())?)
}

async fn preload(store: &dyn EventStore, events: u64) -> Result<()> {
    let mut written = 0;
    while written < events {
        let count = EVENTS_PER_STREAM.min(events - written);
        let stream = StreamId::new(format!("w9-{}", written / EVENTS_PER_STREAM))?;
        let batch = (written..written + count)
            .map(event)
            .collect::<Result<Vec<_>>>()?;
        store
            .append(&stream, ExpectedVersion::NoStream, batch)
            .await?;
        written += count;
    }
    Ok(())
}

/// Totals per stream, in memory.
struct MemoryTotals {
    name: String,
    totals: HashMap<String, u64>,
    events: u64,
}

impl Projection for MemoryTotals {
    type Event = W9Event;
    type Error = std::convert::Infallible;

    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(
        &mut self,
        event: W9Event,
        recorded: &RecordedEvent,
    ) -> Result<(), std::convert::Infallible> {
        let W9Event::AmountRecorded { amount_cents, .. } = event;
        match self.totals.get_mut(recorded.stream.as_str()) {
            Some(total) => *total += amount_cents,
            None => {
                self.totals
                    .insert(recorded.stream.as_str().to_owned(), amount_cents);
            }
        }
        self.events += 1;
        Ok(())
    }
}

/// A history row per event and totals per stream in PostgreSQL, flushed with the checkpoint.
struct PostgresHistory {
    name: String,
    store: PostgresStore,
    checkpoints: PostgresCheckpointStore,
    history_sql: Arc<str>,
    totals_sql: Arc<str>,
    positions: Vec<i64>,
    streams: Vec<String>,
    amounts: Vec<i64>,
    events: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("the read model's database: {0}")]
struct ModelError(#[from] sqlx::Error);

#[derive(Debug, thiserror::Error)]
#[error("the read model's checkpoint: {0}")]
struct ModelCheckpointError(#[from] factline_core::CheckpointError);

/// Why the PostgreSQL model failed.
#[derive(Debug, thiserror::Error)]
enum PostgresModelError {
    #[error(transparent)]
    Sql(#[from] ModelError),
    #[error(transparent)]
    Checkpoint(#[from] ModelCheckpointError),
}

impl Projection for PostgresHistory {
    type Event = W9Event;
    type Error = PostgresModelError;

    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(
        &mut self,
        event: W9Event,
        recorded: &RecordedEvent,
    ) -> Result<(), PostgresModelError> {
        let W9Event::AmountRecorded { amount_cents, .. } = event;
        self.positions
            .push(i64::try_from(recorded.position.value()).unwrap_or(i64::MAX));
        self.streams.push(recorded.stream.as_str().to_owned());
        self.amounts
            .push(i64::try_from(amount_cents).unwrap_or(i64::MAX));
        self.events += 1;
        Ok(())
    }

    async fn flush(&mut self, position: Position) -> Result<(), PostgresModelError> {
        let mut tx = self.store.pool().begin().await.map_err(ModelError)?;
        if !self.positions.is_empty() {
            sqlx::query(AssertSqlSafe(Arc::clone(&self.history_sql)))
                .bind(&self.positions)
                .bind(&self.streams)
                .bind(&self.amounts)
                .execute(&mut *tx)
                .await
                .map_err(ModelError)?;
            sqlx::query(AssertSqlSafe(Arc::clone(&self.totals_sql)))
                .bind(&self.streams)
                .bind(&self.amounts)
                .execute(&mut *tx)
                .await
                .map_err(ModelError)?;
        }
        self.checkpoints
            .save_in(&mut tx, &self.name, position)
            .await
            .map_err(ModelCheckpointError)?;
        tx.commit().await.map_err(ModelError)?;
        self.positions.clear();
        self.streams.clear();
        self.amounts.clear();
        Ok(())
    }
}

/// The bare loop: `read_all` pages, `serde_json` into the typed event, the same fold.
async fn raw_scan(store: &dyn EventStore) -> Result<u64> {
    let page = store.limits().read_count_max;
    let mut from = Position(0);
    let mut totals: HashMap<String, u64> = HashMap::new();
    let mut count = 0_u64;
    loop {
        let slice = store
            .read_all(ReadAllOptions::forwards().from(from).limit(page))
            .await?;
        for recorded in &slice.events {
            let W9Event::AmountRecorded { amount_cents, .. } = W9Event::from_recorded(recorded)?;
            *totals
                .entry(recorded.stream.as_str().to_owned())
                .or_default() += amount_cents;
            count += 1;
        }
        if slice.is_end || slice.events.is_empty() {
            break;
        }
        from = slice.next_position;
    }
    Ok(count)
}

fn median(mut durations: Vec<Duration>) -> Duration {
    durations.sort();
    durations
        .get(durations.len() / 2)
        .copied()
        .unwrap_or_default()
}

fn row(source: &'static str, model: &'static str, events: u64, taken: Duration) -> W9Row {
    let seconds = taken.as_secs_f64();
    W9Row {
        source,
        model,
        events_per_sec: events as f64 / seconds.max(1e-9),
        seconds,
    }
}

async fn memory_rounds(
    source: &'static str,
    store: &Arc<dyn EventStore>,
    options: &W9Options,
) -> Result<Vec<W9Row>> {
    let mut runner_times = Vec::new();
    let mut raw_times = Vec::new();
    for round in 0..options.rounds {
        let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
        let projection = MemoryTotals {
            name: format!("w9-memory-{round}"),
            totals: HashMap::new(),
            events: 0,
        };
        let started = Instant::now();
        let done = ProjectionRunner::new(projection, Arc::clone(store), checkpoints)
            .options(
                RunnerOptions::default().checkpoint_every_events(options.checkpoint_every_events),
            )
            .catch_up()
            .await?;
        runner_times.push(started.elapsed());
        if done.projection.events != options.events {
            bail!(
                "{source}: the projection applied {} events of {}",
                done.projection.events,
                options.events
            );
        }
        let started = Instant::now();
        let scanned = raw_scan(&**store).await?;
        raw_times.push(started.elapsed());
        if scanned != options.events {
            bail!(
                "{source}: the raw scan read {scanned} events of {}",
                options.events
            );
        }
        eprintln!(
            "[factline-bench-w9] {source} round {}: runner {:.2} s, raw scan {:.2} s",
            round + 1,
            runner_times[round].as_secs_f64(),
            raw_times[round].as_secs_f64()
        );
    }
    Ok(vec![
        row(source, "memory", options.events, median(runner_times)),
        row(source, "raw-scan", options.events, median(raw_times)),
    ])
}

async fn postgres_rounds(
    source: &'static str,
    store: &Arc<dyn EventStore>,
    options: &W9Options,
    url: &str,
) -> Result<W9Row> {
    let schema = SchemaName::new(format!("bench_w9_{}", std::process::id()))
        .map_err(|error| anyhow::anyhow!("schema name: {error}"))?;
    // The PostgreSQL store is opened only for its pool, schema and checkpoint table.
    let model_store = PostgresStore::open(PostgresOptions::new(url).schema(schema.clone()))
        .await
        .context("open the read model's database")?;
    let s = schema.quoted();
    let result = async {
        let mut times = Vec::new();
        for round in 0..options.rounds {
            for sql in [
                format!("DROP TABLE IF EXISTS {s}.w9_history, {s}.w9_totals"),
                format!(
                    "CREATE TABLE {s}.w9_history (position bigint PRIMARY KEY, stream text NOT NULL, amount_cents bigint NOT NULL)"
                ),
                format!(
                    "CREATE TABLE {s}.w9_totals (stream text PRIMARY KEY, amount_cents bigint NOT NULL, events bigint NOT NULL)"
                ),
            ] {
                sqlx::query(AssertSqlSafe(sql))
                    .execute(model_store.pool())
                    .await?;
            }
            let projection = PostgresHistory {
                name: format!("w9-postgres-{round}"),
                store: model_store.clone(),
                checkpoints: model_store.checkpoints(),
                history_sql: format!(
                    "INSERT INTO {s}.w9_history (position, stream, amount_cents) \
                     SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[])"
                )
                .into(),
                totals_sql: format!(
                    "INSERT INTO {s}.w9_totals (stream, amount_cents, events) \
                     SELECT stream, sum(amount), count(*) FROM unnest($1::text[], $2::bigint[]) \
                         AS b(stream, amount) GROUP BY stream \
                     ON CONFLICT (stream) DO UPDATE SET \
                         amount_cents = {s}.w9_totals.amount_cents + EXCLUDED.amount_cents, \
                         events = {s}.w9_totals.events + EXCLUDED.events"
                )
                .into(),
                positions: Vec::new(),
                streams: Vec::new(),
                amounts: Vec::new(),
                events: 0,
            };
            let checkpoints: Arc<dyn CheckpointStore> = Arc::new(model_store.checkpoints());
            let started = Instant::now();
            ProjectionRunner::new(projection, Arc::clone(store), checkpoints)
                .options(
                    RunnerOptions::default()
                        .checkpoint_every_events(options.checkpoint_every_events),
                )
                .catch_up()
                .await?;
            times.push(started.elapsed());
            let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT count(*) FROM {s}.w9_history"
            )))
            .fetch_one(model_store.pool())
            .await?;
            if u64::try_from(rows).unwrap_or(0) != options.events {
                bail!("{source}: the history table holds {rows} rows of {}", options.events);
            }
            eprintln!(
                "[factline-bench-w9] {source} → postgres round {}: {:.2} s",
                round + 1,
                times[round].as_secs_f64()
            );
        }
        Ok(row(source, "postgres", options.events, median(times)))
    }
    .await;
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {s} CASCADE")))
        .execute(model_store.pool())
        .await
        .ok();
    model_store.close().await;
    result
}

/// Runs W9 on both sources; data directories go under `root`.
pub async fn run_w9(options: &W9Options, root: &std::path::Path) -> Result<Vec<W9Row>> {
    let mut rows = Vec::new();
    let memory: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let started = Instant::now();
    preload(&*memory, options.events).await?;
    eprintln!(
        "[factline-bench-w9] preloaded {} events in memory in {:.1} s",
        options.events,
        started.elapsed().as_secs_f64()
    );
    rows.extend(memory_rounds("in-memory", &memory, options).await?);
    drop(memory);

    let dir = tempfile::tempdir_in(root)?;
    let log = factline_log::LogStore::open(dir.path()).await?;
    let log_store: Arc<dyn EventStore> = Arc::new(log.clone());
    let started = Instant::now();
    preload(&*log_store, options.events).await?;
    eprintln!(
        "[factline-bench-w9] preloaded {} events into factline-log in {:.1} s",
        options.events,
        started.elapsed().as_secs_f64()
    );
    rows.extend(memory_rounds("factline-log", &log_store, options).await?);
    if let Some(url) = &options.postgres_url {
        rows.push(postgres_rounds("factline-log", &log_store, options, url).await?);
    }
    log.close().await;
    Ok(rows)
}

/// The rows as a table, with the runner's ratio to the raw scan.
pub fn render_w9(rows: &[W9Row]) -> String {
    let mut out = format!(
        "{:<13} {:<9} {:>14} {:>9}\n",
        "source", "model", "events/s", "seconds"
    );
    for row in rows {
        out.push_str(&format!(
            "{:<13} {:<9} {:>14.0} {:>9.3}\n",
            row.source, row.model, row.events_per_sec, row.seconds
        ));
    }
    for source in ["in-memory", "factline-log"] {
        let rate = |model: &str| {
            rows.iter()
                .find(|r| r.source == source && r.model == model)
                .map(|r| r.events_per_sec)
        };
        if let (Some(runner), Some(raw)) = (rate("memory"), rate("raw-scan")) {
            out.push_str(&format!(
                "{source}: the runner at {:.2}x the raw scan's rate\n",
                runner / raw
            ));
        }
    }
    out
}
