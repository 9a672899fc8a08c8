//! The batching writer: one task per store owns one connection and turns the appends that
//! queue up while a transaction runs into the next transaction — group commit across callers.
//!
//! Every append of the process goes through the `log_head` lock anyway (see `append`), so one
//! connection loses nothing; batching is what lets one commit (one WAL flush) acknowledge many
//! appends. A job's own refusal (wrong expected version, idempotency conflict, tombstone) is
//! its result alone; a failure of the transaction fails every job of the batch. When an inline
//! projection fails, the batch is rolled back and its jobs are run again one transaction each,
//! so that only the appends the projection refuses fail.

use std::{sync::Arc, time::Duration};

use factline_core::{AppendError, AppendRequest, StorageError};
use sqlx::{
    Connection as _, PgConnection,
    postgres::{PgConnectOptions, PgPool},
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    InlineProjection,
    append::{BatchError, Cache, JobResult, append_fast, append_jobs},
    error::storage,
    sql::Sql,
};

/// How the writer's batches went, for tests, benchmarks and metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Batches written by the one-statement path (decided against the cache).
    pub fast_batches: std::sync::atomic::AtomicU64,
    /// Batches written under the lock in a transaction (first batch, after another writer,
    /// retries of stored ids, streams with `max_age`, inline projections).
    pub locked_batches: std::sync::atomic::AtomicU64,
    /// One-statement attempts that found the log moved or an id stored, and fell back.
    pub fast_misses: std::sync::atomic::AtomicU64,
    /// Appends (jobs) answered.
    pub appends: std::sync::atomic::AtomicU64,
    /// Time spent running batches (statements and commits), in microseconds.
    pub batch_time_us: std::sync::atomic::AtomicU64,
}

impl WriterStats {
    fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

pub(crate) struct Job {
    pub(crate) requests: Vec<AppendRequest>,
    pub(crate) reply: oneshot::Sender<JobResult>,
}

pub(crate) struct WriterConfig {
    pub(crate) options: PgConnectOptions,
    pub(crate) sql: Arc<Sql>,
    pub(crate) projections: Vec<Arc<dyn InlineProjection>>,
    pub(crate) batch_appends_max: usize,
    pub(crate) batch_events_max: usize,
    pub(crate) connect_timeout: Duration,
    /// Woken after every commit, so local subscribers need not wait for the notification.
    pub(crate) committed: Arc<factline_core::ChangeNotifier>,
    pub(crate) stats: Arc<WriterStats>,
    /// Keeps the pool alive for as long as the writer runs (reads share it).
    pub(crate) _pool: PgPool,
}

/// Runs until every sender is gone.
pub(crate) async fn run(config: WriterConfig, mut jobs: mpsc::Receiver<Job>) {
    let mut conn: Option<PgConnection> = None;
    let mut batch: Vec<Job> = Vec::new();
    let mut cache = Cache::default();
    while let Some(first) = jobs.recv().await {
        let mut events = first.requests.iter().map(|r| r.events.len()).sum::<usize>();
        batch.push(first);
        while batch.len() < config.batch_appends_max && events < config.batch_events_max {
            match jobs.try_recv() {
                Ok(job) => {
                    events += job.requests.iter().map(|r| r.events.len()).sum::<usize>();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let connection = match conn.as_mut() {
            Some(connection) => connection,
            None => match connect(&config).await {
                Ok(connection) => conn.insert(connection),
                Err(error) => {
                    let reason = error.to_string();
                    for job in batch.drain(..) {
                        let _ = job
                            .reply
                            .send(Err(AppendError::Storage(StorageError::Backend(
                                reason.clone().into(),
                            ))));
                    }
                    continue;
                }
            },
        };
        let started = std::time::Instant::now();
        let appends = batch.len() as u64;
        let healthy = run_batch(connection, &config, &mut cache, &mut batch).await;
        let elapsed = started.elapsed();
        WriterStats::add(
            &config.stats.batch_time_us,
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        );
        metrics::histogram!("factline_postgres_batch_duration_seconds")
            .record(elapsed.as_secs_f64());
        metrics::histogram!("factline_postgres_batch_appends").record(appends as f64);
        if !healthy {
            // The connection may be mid-transaction or broken: start over with a new one.
            conn = None;
            cache.invalidate();
        }
        config.committed.notify();
    }
}

async fn connect(config: &WriterConfig) -> Result<PgConnection, StorageError> {
    match tokio::time::timeout(
        config.connect_timeout,
        PgConnection::connect_with(&config.options),
    )
    .await
    {
        Ok(result) => result.map_err(storage("connecting the writer")),
        Err(_) => Err(StorageError::Backend(
            format!(
                "the writer could not connect within {} ms",
                config.connect_timeout.as_millis()
            )
            .into(),
        )),
    }
}

/// Runs `batch` (emptying it) and answers every job. Returns false when the connection should
/// be replaced.
async fn run_batch(
    conn: &mut PgConnection,
    config: &WriterConfig,
    cache: &mut Cache,
    batch: &mut Vec<Job>,
) -> bool {
    let requests: Vec<&[AppendRequest]> = batch.iter().map(|j| j.requests.as_slice()).collect();
    WriterStats::add(&config.stats.appends, batch.len() as u64);
    if config.projections.is_empty() {
        let attempted = cache.is_exact();
        match append_fast(conn, &config.sql, &requests, cache).await {
            Ok(Some(results)) => {
                WriterStats::add(&config.stats.fast_batches, 1);
                metrics::counter!("factline_postgres_batches_total", "path" => "one_statement")
                    .increment(1);
                drop(requests);
                for (job, result) in batch.drain(..).zip(results) {
                    let _ = job.reply.send(result);
                }
                return true;
            }
            Ok(None) => {
                if attempted {
                    WriterStats::add(&config.stats.fast_misses, 1);
                    metrics::counter!("factline_postgres_one_statement_fallbacks_total")
                        .increment(1);
                }
            }
            Err(error) => {
                drop(requests);
                answer_all(batch, error);
                return false;
            }
        }
    }
    WriterStats::add(&config.stats.locked_batches, 1);
    metrics::counter!("factline_postgres_batches_total", "path" => "locked").increment(1);
    match transaction(conn, config, cache, &requests).await {
        Ok(results) => {
            for (job, result) in batch.drain(..).zip(results) {
                let _ = job.reply.send(result);
            }
            true
        }
        Err(BatchError::Projection(error)) if batch.len() > 1 => {
            tracing::debug!(%error, jobs = batch.len(), "inline projection failed; retrying the batch one append at a time");
            let mut healthy = true;
            for job in batch.drain(..) {
                let single = [job.requests.as_slice()];
                let result = match transaction(conn, config, cache, &single).await {
                    Ok(mut results) => results.pop().unwrap_or_else(|| {
                        Err(
                            StorageError::Backend("a batch of one returned no result".into())
                                .into(),
                        )
                    }),
                    Err(BatchError::Projection(error)) => {
                        Err(AppendError::Storage(StorageError::backend(error)))
                    }
                    Err(BatchError::Storage(error)) => {
                        healthy = false;
                        Err(AppendError::Storage(error))
                    }
                };
                let _ = job.reply.send(result);
            }
            healthy
        }
        Err(error) => {
            let (error, healthy) = match error {
                BatchError::Projection(error) => (StorageError::backend(error), true),
                BatchError::Storage(error) => (error, false),
            };
            drop(requests);
            answer_all(batch, error);
            healthy
        }
    }
}

/// Fails every job of `batch` with `error` (the first gets it, the others its text).
fn answer_all(batch: &mut Vec<Job>, error: StorageError) {
    let reason = error.to_string();
    let mut first = Some(error);
    for job in batch.drain(..) {
        let error = first
            .take()
            .unwrap_or_else(|| StorageError::Backend(reason.clone().into()));
        let _ = job.reply.send(Err(AppendError::Storage(error)));
    }
}

async fn transaction(
    conn: &mut PgConnection,
    config: &WriterConfig,
    cache: &mut Cache,
    jobs: &[&[AppendRequest]],
) -> Result<Vec<JobResult>, BatchError> {
    // Until this commits, the cache is not known to be exact.
    let previous = cache.take_head();
    let mut tx = conn
        .begin()
        .await
        .map_err(storage("beginning a transaction"))?;
    let applied = append_jobs(&mut tx, &config.sql, jobs, &config.projections).await?;
    tx.commit().await.map_err(storage(
        "committing appends (the outcome is unknown: retry with the same event ids)",
    ))?;
    cache.restore_head(previous);
    cache.absorb(&applied);
    Ok(applied.results)
}
