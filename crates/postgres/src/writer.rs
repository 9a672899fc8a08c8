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
    append::{BatchError, JobResult, append_jobs},
    error::storage,
    sql::Sql,
};

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
    /// Keeps the pool alive for as long as the writer runs (reads share it).
    pub(crate) _pool: PgPool,
}

/// Runs until every sender is gone.
pub(crate) async fn run(config: WriterConfig, mut jobs: mpsc::Receiver<Job>) {
    let mut conn: Option<PgConnection> = None;
    let mut batch: Vec<Job> = Vec::new();
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
        let healthy = run_batch(connection, &config, &mut batch).await;
        if !healthy {
            // The connection may be mid-transaction or broken: start over with a new one.
            conn = None;
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
async fn run_batch(conn: &mut PgConnection, config: &WriterConfig, batch: &mut Vec<Job>) -> bool {
    let requests: Vec<&[AppendRequest]> = batch.iter().map(|j| j.requests.as_slice()).collect();
    match transaction(conn, config, &requests).await {
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
                let result = match transaction(conn, config, &single).await {
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
            let (message, healthy) = match error {
                BatchError::Projection(error) => (StorageError::backend(error), true),
                BatchError::Storage(error) => (error, false),
            };
            let reason = message.to_string();
            let mut first = Some(message);
            for job in batch.drain(..) {
                let error = first
                    .take()
                    .unwrap_or_else(|| StorageError::Backend(reason.clone().into()));
                let _ = job.reply.send(Err(AppendError::Storage(error)));
            }
            healthy
        }
    }
}

async fn transaction(
    conn: &mut PgConnection,
    config: &WriterConfig,
    jobs: &[&[AppendRequest]],
) -> Result<Vec<JobResult>, BatchError> {
    let mut tx = conn
        .begin()
        .await
        .map_err(storage("beginning a transaction"))?;
    let results = append_jobs(&mut tx, &config.sql, jobs, &config.projections).await?;
    tx.commit().await.map_err(storage(
        "committing appends (the outcome is unknown: retry with the same event ids)",
    ))?;
    Ok(results)
}
