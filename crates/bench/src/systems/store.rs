//! factline's own stores, through the [`EventStore`] trait: `factline-log` and `factline-memory`.

use std::{path::Path, str::FromStr as _, sync::Arc};

use anyhow::{Context as _, Result, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use factline_core::{
    AppendError, ContentType, EventData, EventFilter, EventStore, EventType, ExpectedVersion,
    Metadata, ReadAllOptions, ReadStreamError, ReadStreamOptions, Revision, StreamId, StreamState,
    SubscribeFrom, Subscription, Uuid,
};

use factline_postgres::{PostgresOptions, PostgresStore, SchemaName, redact_url};
use sqlx::{AssertSqlSafe, Connection as _, postgres::PgConnectOptions};

use super::{
    EVENT_TYPE, Expected, Feed, Outcome, SetupContext, System, json_payload,
    postgres::{connect, server_facts},
};
use crate::config::{SystemKind, WorkloadKind};

/// Opens the embedded engine on `dir` (an empty directory the harness created for it).
pub async fn open_factline_log(dir: &Path) -> Result<Arc<factline_log::LogStore>> {
    Ok(Arc::new(factline_log::LogStore::open(dir).await?))
}

/// Serves `log` over HTTP on a free loopback port (on the current runtime, for as long as it
/// runs) and connects the API's client to it.
pub(crate) async fn serve_over_http(
    log: Arc<factline_log::LogStore>,
) -> Result<Arc<dyn EventStore>> {
    let options = factline_server::ServerOptions::default().listen(([127, 0, 0, 1], 0).into());
    let server = factline_server::Server::bind(log, options).await?;
    let url = format!("http://{}", server.local_addr());
    tokio::spawn(server.run(std::future::pending()));
    Ok(Arc::new(
        factline_server::client::HttpStore::connect(&url).await?,
    ))
}

/// Opens factline's PostgreSQL store on a fresh schema of the run (dropped at teardown).
pub(crate) async fn open_factline_postgres(ctx: &SetupContext<'_>) -> Result<StoreSystem> {
    let options = PgConnectOptions::from_str(ctx.postgres_url)
        .with_context(|| format!("bad PostgreSQL URL {}", redact_url(ctx.postgres_url)))?
        .options([("synchronous_commit", "on")]);
    let mut conn = connect(&options, ctx.postgres_url, ctx.sizes.connect_timeout).await?;
    let facts = server_facts(&mut conn).await?;
    conn.close().await.ok();
    let schema = SchemaName::new(format!("bench_{}_fl", ctx.run_id))
        .map_err(|error| anyhow!("schema name: {error}"))?;
    let store = PostgresStore::open(
        PostgresOptions::new(ctx.postgres_url)
            .schema(schema.clone())
            .pool_connections_max(16),
    )
    .await
    .context("open factline-postgres")?;
    let description = format!(
        "factline-postgres on PostgreSQL {} (fsync=on, wal_sync_method={}, synchronous_commit \
         as the server sets it: on), schema {schema}; one writer connection batches the appends \
         that queue up into one transaction (one commit for many appends), reads on a pool of 16",
        facts.version, facts.wal_sync_method
    );
    let mut system = StoreSystem::new(
        SystemKind::FactlinePostgres,
        Arc::new(store.clone()),
        description,
    );
    system.postgres = Some(store);
    Ok(system)
}

/// A factline [`EventStore`] under test.
pub(crate) struct StoreSystem {
    kind: SystemKind,
    store: Arc<dyn EventStore>,
    payload: Bytes,
    event_type: EventType,
    description: String,
    /// factline-postgres: its schema is dropped at teardown.
    postgres: Option<PostgresStore>,
}

impl StoreSystem {
    pub(crate) fn new(kind: SystemKind, store: Arc<dyn EventStore>, description: String) -> Self {
        Self {
            kind,
            store,
            payload: json_payload(),
            event_type: EventType::from(EVENT_TYPE),
            description,
            postgres: None,
        }
    }

    fn events(&self, count: usize) -> Vec<EventData> {
        (0..count)
            .map(|_| EventData {
                id: Uuid::now_v7(),
                event_type: self.event_type.clone(),
                content_type: ContentType::Json,
                data: self.payload.clone(),
                metadata: Metadata::new(),
            })
            .collect()
    }
}

fn stream_id(stream: &str) -> Result<StreamId> {
    StreamId::new(stream).map_err(|error| anyhow!("bad stream id {stream:?}: {error}"))
}

fn from_state(state: StreamState) -> Expected {
    match state {
        StreamState::NoStream => Expected::NoStream,
        StreamState::At(revision) => Expected::Exact(revision.value()),
    }
}

#[async_trait]
impl System for StoreSystem {
    fn kind(&self) -> SystemKind {
        self.kind
    }

    fn not_applicable(&self, _workload: WorkloadKind) -> Option<&'static str> {
        None
    }

    async fn append(&self, stream: &str, expected: Expected, count: usize) -> Result<Outcome> {
        let stream = stream_id(stream)?;
        let expected = match expected {
            Expected::NoStream => ExpectedVersion::NoStream,
            Expected::Exact(revision) => ExpectedVersion::Exact(Revision(revision)),
        };
        match self
            .store
            .append(&stream, expected, self.events(count))
            .await
        {
            Ok(_) => Ok(Outcome::Written),
            Err(AppendError::WrongExpectedVersion { actual, .. }) => Ok(Outcome::Conflict {
                actual: Some(from_state(actual)),
            }),
            Err(error) => Err(error.into()),
        }
    }

    async fn stream_version(&self, stream: &str) -> Result<Expected> {
        let stream = stream_id(stream)?;
        match self
            .store
            .read_stream(&stream, ReadStreamOptions::backwards().limit(1))
            .await
        {
            Ok(slice) => Ok(Expected::Exact(slice.last_revision.value())),
            Err(ReadStreamError::NotFound { .. }) => Ok(Expected::NoStream),
            Err(error) => Err(error.into()),
        }
    }

    async fn read_stream(&self, stream: &str) -> Result<u64> {
        let stream = stream_id(stream)?;
        let page = self.store.limits().read_count_max;
        let mut options = ReadStreamOptions::forwards().limit(page);
        let mut count = 0;
        loop {
            let slice = self.store.read_stream(&stream, options).await?;
            count += slice.events.len() as u64;
            if slice.is_end || slice.events.is_empty() {
                return Ok(count);
            }
            options = options.from(slice.next_revision);
        }
    }

    async fn scan_all(&self, max_events: u64) -> Result<u64> {
        let page = self.store.limits().read_count_max as u64;
        let mut from = None;
        let mut count = 0;
        while count < max_events {
            let mut options =
                ReadAllOptions::forwards().limit(page.min(max_events - count) as usize);
            if let Some(position) = from {
                options = options.from(position);
            }
            let slice = self.store.read_all(options).await?;
            count += slice.events.len() as u64;
            if slice.is_end || slice.events.is_empty() {
                break;
            }
            from = Some(slice.next_position);
        }
        Ok(count)
    }

    async fn subscribe(&self) -> Result<Box<dyn Feed>> {
        let subscription = self
            .store
            .subscribe_to_all(SubscribeFrom::End, EventFilter::all())
            .await
            .context("subscribe_to_all")?;
        Ok(Box::new(StoreFeed { subscription }))
    }

    async fn release(&self) -> Result<()> {
        if let Some(store) = &self.postgres {
            let stats = store.writer_stats();
            let load =
                |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!(
                "[factline-bench] factline-postgres writer so far: {} appends in {} one-statement + {} locked batches ({} fallbacks), {} ms in batches",
                load(&stats.appends),
                load(&stats.fast_batches),
                load(&stats.locked_batches),
                load(&stats.fast_misses),
                load(&stats.batch_time_us) / 1_000
            );
        }
        Ok(())
    }

    async fn teardown(&self) -> Result<()> {
        if let Some(store) = &self.postgres {
            sqlx::query(AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                store.schema().quoted()
            )))
            .execute(store.pool())
            .await
            .context("drop the factline-postgres schema")?;
            store.close().await;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

struct StoreFeed {
    subscription: Subscription,
}

#[async_trait]
impl Feed for StoreFeed {
    async fn next_batch(&mut self) -> Result<usize> {
        match self.subscription.next().await {
            Some(Ok(_event)) => Ok(1),
            Some(Err(error)) => Err(error.into()),
            None => bail!("the subscription ended"),
        }
    }
}
