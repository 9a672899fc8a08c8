//! [`PostgresStore`]: the [`EventStore`] contract on PostgreSQL.

use std::{str::FromStr as _, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use factline_core::{
    AllSlice, AppendError, AppendRequest, AppendResult, ChangeNotifier, CheckpointError,
    DeleteError, DeleteMode, Direction, EventFilter, EventStore, ExpectedVersion, Limit,
    LimitExceeded, Limits, MetadataError, Position, ReadAllError, ReadAllOptions, ReadStreamError,
    ReadStreamOptions, Revision, Snapshot, SnapshotError, SnapshotStore, StorageError, StreamId,
    StreamMetadata, StreamSlice, StreamView, SubscribeError, SubscribeFrom, Subscription,
    Timestamp, check_append_requests, check_checkpoint_name, decide_delete, follow_all,
    follow_stream,
};
use sqlx::{
    AssertSqlSafe, Connection as _, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::{
    InlineProjection,
    append::{BatchError, append_jobs},
    error::{OpenError, redact_url, storage},
    rows::{
        Interner, StreamRow, decode_event, from_sql, get, metadata_columns, offset_date_time,
        timestamp, to_sql,
    },
    schema::{self, SchemaName},
    sql::Sql,
    writer::{self, Job, WriterConfig, WriterStats},
};

/// How to open a [`PostgresStore`].
#[derive(Clone)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// `postgres://user:password@host:port/database`.
    pub url: String,
    /// The schema holding the store's tables. Default `factline`.
    pub schema: SchemaName,
    /// Apply missing migrations when opening (default true). Off: opening an out-of-date
    /// schema fails with [`OpenError::NotMigrated`].
    pub migrate_on_open: bool,
    /// Most pooled connections for reads, deletes and metadata. Default 10.
    pub pool_connections_max: u32,
    /// Most appends (`append` / `append_multi` calls) one transaction commits. Default 512.
    pub batch_appends_max: usize,
    /// A batch stops taking appends once it holds this many events. Default 10,000.
    pub batch_events_max: usize,
    /// Most appends waiting for the writer; callers wait for room beyond. Default 8,192.
    pub write_queue_appends_max: usize,
    /// How long an append waits for the log lock (held by another writer or an open caller
    /// transaction) before failing. Default 30 s.
    pub lock_timeout: Duration,
    /// Connecting, and waiting for a pooled connection, fail after this. Default 10 s.
    pub connect_timeout: Duration,
    /// Most positions a filtered `$all` read examines (forwards or backwards) before it returns
    /// a short page; keeps a sparse filter from scanning the whole log in one query.
    /// Default 65,536.
    pub filtered_scan_positions_max: u64,
    /// The store's limits.
    pub limits: Limits,
    /// Read-model updates run inside every append transaction.
    pub inline_projections: Vec<Arc<dyn InlineProjection>>,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("migrate_on_open", &self.migrate_on_open)
            .field("pool_connections_max", &self.pool_connections_max)
            .field("batch_appends_max", &self.batch_appends_max)
            .field("batch_events_max", &self.batch_events_max)
            .field("write_queue_appends_max", &self.write_queue_appends_max)
            .field("lock_timeout", &self.lock_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field(
                "filtered_scan_positions_max",
                &self.filtered_scan_positions_max,
            )
            .field("limits", &self.limits)
            .field(
                "inline_projections",
                &self
                    .inline_projections
                    .iter()
                    .map(|p| p.name().to_owned())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl PostgresOptions {
    /// Defaults for the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: SchemaName::default(),
            migrate_on_open: true,
            pool_connections_max: 10,
            batch_appends_max: 512,
            batch_events_max: 10_000,
            write_queue_appends_max: 8_192,
            lock_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            filtered_scan_positions_max: 65_536,
            limits: Limits::default(),
            inline_projections: Vec::new(),
        }
    }

    /// Uses `schema` instead of `factline`.
    #[must_use]
    pub fn schema(mut self, schema: SchemaName) -> Self {
        self.schema = schema;
        self
    }

    /// Sets [`PostgresOptions::migrate_on_open`].
    #[must_use]
    pub fn migrate_on_open(mut self, migrate: bool) -> Self {
        self.migrate_on_open = migrate;
        self
    }

    /// Sets [`PostgresOptions::limits`].
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets [`PostgresOptions::pool_connections_max`].
    #[must_use]
    pub fn pool_connections_max(mut self, connections: u32) -> Self {
        self.pool_connections_max = connections.max(1);
        self
    }

    /// Runs `projection` inside every append transaction.
    #[must_use]
    pub fn inline_projection(mut self, projection: Arc<dyn InlineProjection>) -> Self {
        self.inline_projections.push(projection);
        self
    }

    /// One connection, within `connect_timeout`.
    async fn connect_one(&self) -> Result<PgConnection, OpenError> {
        let connect = self.connect_options()?;
        timed(
            self.connect_timeout,
            &self.url,
            PgConnection::connect_with(&connect),
        )
        .await
    }

    fn connect_options(&self) -> Result<PgConnectOptions, OpenError> {
        let options =
            PgConnectOptions::from_str(&self.url).map_err(|source| OpenError::InvalidUrl {
                url: redact_url(&self.url),
                source,
            })?;
        Ok(options.application_name("factline"))
    }
}

/// The event store on PostgreSQL. Cheap to clone; clones share the pool and the writer.
///
/// See the crate docs for the design and `docs/design/postgres.md` for the ordering argument.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    sql: Arc<Sql>,
    limits: Limits,
    jobs: mpsc::Sender<Job>,
    changes: Arc<ChangeNotifier>,
    projections: Vec<Arc<dyn InlineProjection>>,
    stats: Arc<WriterStats>,
    filtered_scan_positions_max: u64,
    closed: CancellationToken,
    _stop_tasks: DropGuard,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.inner.sql.schema)
            .finish_non_exhaustive()
    }
}

async fn timed<T>(
    timeout: Duration,
    url: &str,
    future: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, OpenError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(OpenError::Unreachable {
            url: redact_url(url),
            source,
        }),
        Err(_) => Err(OpenError::Unreachable {
            url: redact_url(url),
            source: sqlx::Error::PoolTimedOut,
        }),
    }
}

/// Applies missing migrations to `options.schema` without opening a store (for
/// `factline migrate`). Returns every known migration with whether it was applied now.
pub async fn migrate(
    options: &PostgresOptions,
) -> Result<Vec<schema::AppliedMigration>, OpenError> {
    let mut conn = options.connect_one().await?;
    let applied = schema::migrate(&mut conn, &options.schema).await?;
    conn.close().await.ok();
    Ok(applied)
}

/// The versions of the migrations applied to `options.schema` (empty for a new schema),
/// changing nothing.
pub async fn applied_migrations(options: &PostgresOptions) -> Result<Vec<i64>, OpenError> {
    let mut conn = options.connect_one().await?;
    let applied = schema::applied(&mut conn, &options.schema).await?;
    conn.close().await.ok();
    Ok(applied.into_iter().map(|(version, _, _)| version).collect())
}

impl PostgresStore {
    /// Connects, migrates (unless told not to) and starts the writer and the listener.
    pub async fn open(options: PostgresOptions) -> Result<Self, OpenError> {
        let connect = options.connect_options()?;
        let mut conn = options.connect_one().await?;
        if options.migrate_on_open {
            schema::migrate(&mut conn, &options.schema).await?;
        } else {
            let current = schema::applied(&mut conn, &options.schema)
                .await?
                .last()
                .map_or(0, |(version, _, _)| *version);
            if current < schema::latest_version() {
                return Err(OpenError::NotMigrated {
                    schema: options.schema.as_str().to_owned(),
                    current,
                    required: schema::latest_version(),
                });
            }
        }
        warn_if_not_durable(&mut conn).await;
        conn.close().await.ok();

        let pool = timed(
            options.connect_timeout,
            &options.url,
            PgPoolOptions::new()
                .max_connections(options.pool_connections_max.max(1))
                .acquire_timeout(options.connect_timeout)
                .connect_with(connect.clone()),
        )
        .await?;
        let sql = Arc::new(Sql::new(&options.schema));
        let changes = Arc::new(ChangeNotifier::new());
        let closed = CancellationToken::new();
        let stats = Arc::new(WriterStats::default());
        let (jobs, receiver) = mpsc::channel(options.write_queue_appends_max.max(1));
        let lock_timeout_ms = options.lock_timeout.as_millis().to_string();
        let writer_options = connect
            .clone()
            .options([("lock_timeout", lock_timeout_ms.as_str())]);
        let writer = WriterConfig {
            options: writer_options,
            sql: Arc::clone(&sql),
            projections: options.inline_projections.clone(),
            batch_appends_max: options.batch_appends_max.max(1),
            batch_events_max: options.batch_events_max.max(1),
            connect_timeout: options.connect_timeout,
            committed: Arc::clone(&changes),
            stats: Arc::clone(&stats),
            _pool: pool.clone(),
        };
        tokio::spawn(writer::run(writer, receiver));
        tokio::spawn(listen(
            pool.clone(),
            sql.channel.clone(),
            Arc::clone(&changes),
            closed.clone(),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                sql,
                limits: options.limits,
                jobs,
                changes,
                projections: options.inline_projections,
                stats,
                filtered_scan_positions_max: options.filtered_scan_positions_max.max(1),
                _stop_tasks: closed.clone().drop_guard(),
                closed,
            }),
        })
    }

    /// The connection pool (for the caller's own queries and transactions: read models,
    /// outbox rows, [`PostgresStore::append_in`]).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// How the batching writer's batches went.
    pub fn writer_stats(&self) -> &WriterStats {
        &self.inner.stats
    }

    /// The schema the store lives in.
    pub fn schema(&self) -> &SchemaName {
        &self.inner.sql.schema
    }

    /// Stops the listener and closes the pool. Later calls fail with [`StorageError::Closed`].
    pub async fn close(&self) {
        self.inner.closed.cancel();
        self.inner.pool.close().await;
        // Caught-up subscriptions wake, read, and end with `Closed`.
        self.inner.changes.notify();
    }

    /// Appends inside the caller's transaction, so that state changes, events and outbox rows
    /// commit together: pass `&mut *tx` of a `sqlx::Transaction`. The events become visible,
    /// and subscribers are notified, when the caller commits; a rollback leaves no trace.
    ///
    /// The append takes the log lock, which every writer needs, and holds it until the
    /// caller's transaction ends: append last, just before committing, and keep the
    /// transaction short. Inline projections run too. Under REPEATABLE READ or SERIALIZABLE a
    /// concurrent append makes this fail with a serialization error
    /// ([`DatabaseError::is_retryable`](crate::DatabaseError::is_retryable)): retry the
    /// whole transaction.
    pub async fn append_in(
        &self,
        conn: &mut PgConnection,
        requests: Vec<AppendRequest>,
    ) -> Result<Vec<AppendResult>, AppendError> {
        check_append_requests(&self.inner.limits, &requests)?;
        let jobs = [requests.as_slice()];
        match append_jobs(conn, &self.inner.sql, &jobs, &self.inner.projections).await {
            Ok(applied) => applied.results.into_iter().next().unwrap_or_else(|| {
                Err(StorageError::Backend("a batch of one returned no result".into()).into())
            }),
            Err(BatchError::Storage(error)) => Err(error.into()),
            Err(BatchError::Projection(error)) => Err(StorageError::backend(error).into()),
        }
    }

    /// The checkpoint store of this schema.
    pub fn checkpoints(&self) -> PostgresCheckpointStore {
        PostgresCheckpointStore::new(self.inner.pool.clone(), Arc::clone(&self.inner.sql))
    }

    fn ensure_open(&self) -> Result<(), StorageError> {
        if self.inner.closed.is_cancelled() {
            Err(StorageError::Closed)
        } else {
            Ok(())
        }
    }

    async fn stream_row(&self, stream: &StreamId) -> Result<Option<StreamRow>, StorageError> {
        self.ensure_open()?;
        read_stream_row(&self.inner.pool, &self.inner.sql, stream).await
    }

    async fn next_position(&self) -> Result<u64, StorageError> {
        self.ensure_open()?;
        let next: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.inner.sql.head)))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(storage("reading the log head"))?;
        from_sql("next_position", next)
    }

    /// The first visible revision of a stream with events, given its row.
    async fn first_visible(
        &self,
        stream: &StreamId,
        row: &StreamRow,
        last: Revision,
        now: Timestamp,
    ) -> Result<Revision, StorageError> {
        let mut first = row.metadata.truncate_before.unwrap_or(Revision::FIRST);
        if let Some(max_count) = row.metadata.max_count {
            first = first.max(Revision((last.0 + 1).saturating_sub(max_count)));
        }
        if let Some(max_age) = row.metadata.max_age
            && first <= last
        {
            let cutoff = offset_date_time(now.saturating_sub(max_age));
            let unexpired: Option<i64> =
                sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.inner.sql.first_unexpired)))
                    .bind(stream.as_str())
                    .bind(to_sql(first.value()))
                    .bind(to_sql(last.value()))
                    .bind(cutoff)
                    .fetch_one(&self.inner.pool)
                    .await
                    .map_err(storage("finding the first unexpired event"))?;
            first = match unexpired {
                Some(revision) => Revision(from_sql("revision", revision)?),
                None => last.next(),
            };
        }
        Ok(first.min(last.next()))
    }

    /// Runs `body` in a transaction that holds the log lock (deletes and metadata changes,
    /// which appends must not interleave with), notifying subscribers on commit.
    async fn locked<T, E>(
        &self,
        body: impl AsyncFnOnce(&mut PgConnection, Timestamp) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StorageError>,
    {
        self.ensure_open()?;
        let mut tx = self
            .inner
            .pool
            .begin()
            .await
            .map_err(storage("beginning a transaction"))?;
        let head = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.lock_head)))
            .fetch_one(&mut *tx)
            .await
            .map_err(storage("locking the log head"))?;
        let now: time::OffsetDateTime = get(&head, 2, "clock_timestamp")?;
        let value = body(&mut *tx, timestamp(now)).await?;
        sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.notify)))
            .bind(&self.inner.sql.channel)
            .execute(&mut *tx)
            .await
            .map_err(storage("notifying subscribers"))?;
        tx.commit().await.map_err(storage("committing"))?;
        self.inner.changes.notify();
        Ok(value)
    }

    /// Reads up to `limit` events of `$all` from `from`, decoding rows as they arrive (so the
    /// decoding overlaps the server's work). Returns the events and the log head (0 without
    /// events).
    /// Up to `limit` events from position `from` on, and whether more follow: one row beyond
    /// `limit` is asked for and, when it comes, counted but not decoded. One extra row per
    /// page costs less than the log head as a column of every row (this read streams millions
    /// of rows in a scan).
    async fn read_all_forwards(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<factline_core::RecordedEvent>, bool), StorageError> {
        use futures::TryStreamExt as _;
        let mut rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.read_all_forwards)))
            .bind(to_sql(from))
            .bind(to_sql(limit as u64).saturating_add(1))
            .fetch(&self.inner.pool);
        let mut events = Vec::with_capacity(limit);
        let mut more = false;
        let mut interner = Interner::default();
        while let Some(row) = rows.try_next().await.map_err(storage("reading $all"))? {
            if events.len() == limit {
                more = true;
            } else {
                events.push(decode_event(&row, None, &mut interner)?);
            }
        }
        Ok((events, more))
    }

    async fn read_all_filtered(
        &self,
        options: &ReadAllOptions,
        filter: &EventFilter,
    ) -> Result<AllSlice, ReadAllError> {
        // No stream id or event type holds a control character, so a filter that does
        // matches nothing (and a NUL could not even be sent as text).
        let impossible = [
            filter.category.as_deref(),
            filter.stream_prefix.as_deref(),
            filter.event_type_prefix.as_deref(),
        ]
        .into_iter()
        .flatten()
        .any(|value| value.chars().any(char::is_control));
        let head = self.next_position().await?;
        let window = self.inner.filtered_scan_positions_max;
        let forwards = options.direction == Direction::Forwards;
        let (bound_a, bound_b) = if forwards {
            let from = options.from.map_or(0, |p| p.0);
            (from, from.saturating_add(window).min(head))
        } else {
            if head == 0 {
                return Ok(AllSlice {
                    events: Vec::new(),
                    next_position: Position(0),
                    is_end: true,
                });
            }
            let start = options.from.map_or(head - 1, |p| p.0.min(head - 1));
            (start, start.saturating_sub(window - 1))
        };
        let mut events = Vec::new();
        let empty_range = forwards && bound_a >= bound_b;
        if !impossible && !empty_range && options.limit > 0 {
            let text = self.inner.sql.read_all_filtered(
                forwards,
                filter.category.is_some(),
                filter.stream_prefix.is_some(),
                filter.event_type_prefix.is_some(),
            );
            let mut query = sqlx::query(AssertSqlSafe(text))
                .bind(to_sql(bound_a))
                .bind(to_sql(bound_b))
                .bind(to_sql(options.limit as u64));
            for value in [
                &filter.category,
                &filter.stream_prefix,
                &filter.event_type_prefix,
            ]
            .into_iter()
            .flatten()
            {
                query = query.bind(value.as_str());
            }
            let rows = query
                .fetch_all(&self.inner.pool)
                .await
                .map_err(storage("reading $all"))?;
            events = decode_all(&rows, None)?;
        }
        let full = options.limit > 0 && events.len() == options.limit;
        Ok(if forwards {
            let from = options.from.map_or(0, |p| p.0);
            let next = match events.last() {
                Some(last) if full => last.position.0 + 1,
                _ if options.limit == 0 => from,
                _ => bound_b.max(from),
            };
            AllSlice {
                events,
                next_position: Position(next),
                is_end: next >= head,
            }
        } else {
            let lowest = match events.last() {
                Some(last) if full => last.position.0,
                _ if options.limit == 0 => bound_a.saturating_add(1),
                _ => bound_b,
            };
            AllSlice {
                events,
                next_position: Position(lowest.saturating_sub(1)),
                is_end: lowest == 0,
            }
        })
    }
}

async fn warn_if_not_durable(conn: &mut PgConnection) {
    for (setting, durable) in [("fsync", "on"), ("synchronous_commit", "on")] {
        let value: Result<String, _> = sqlx::query_scalar(AssertSqlSafe(format!("SHOW {setting}")))
            .fetch_one(&mut *conn)
            .await;
        if let Ok(value) = value
            && value != durable
            && !(setting == "synchronous_commit"
                && matches!(value.as_str(), "remote_apply" | "remote_write"))
        {
            tracing::warn!(
                setting,
                value,
                "PostgreSQL acknowledges commits before they are durable: appends may be lost in a crash"
            );
        }
    }
}

/// Keeps one LISTEN connection and wakes subscribers on every notification (commits of any
/// process writing to this schema). After a lost connection it reconnects with backoff and
/// wakes everyone once, since notifications sent meanwhile are lost.
async fn listen(
    pool: PgPool,
    channel: String,
    changes: Arc<ChangeNotifier>,
    closed: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            changes.notify();
            loop {
                match listener.try_recv().await? {
                    Some(_) => changes.notify(),
                    // The connection was lost; the next call reconnects and re-listens.
                    None => changes.notify(),
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            () = closed.cancelled() => return,
            result = session => {
                if let Err(error) = result {
                    if closed.is_cancelled() {
                        return;
                    }
                    tracing::warn!(%error, backoff_ms = backoff.as_millis() as u64, "LISTEN connection failed; reconnecting");
                }
            }
        }
        tokio::select! {
            () = closed.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
        changes.notify();
    }
}

/// PostgreSQL stores the values as `bigint`: refuse what does not fit instead of clamping.
fn check_metadata_fits(metadata: &StreamMetadata) -> Result<(), MetadataError> {
    let too_big = |value: u64| i64::try_from(value).is_err();
    if metadata.max_count.is_some_and(too_big) {
        return Err(MetadataError::Invalid {
            field: "max_count",
            reason: "must be at most 2^63 - 1",
        });
    }
    if metadata.truncate_before.is_some_and(|r| too_big(r.value())) {
        return Err(MetadataError::Invalid {
            field: "truncate_before",
            reason: "must be at most 2^63 - 1",
        });
    }
    if metadata
        .max_age
        .is_some_and(|age| i64::try_from(age.as_micros()).is_err())
    {
        return Err(MetadataError::Invalid {
            field: "max_age",
            reason: "must be at most 2^63 - 1 microseconds",
        });
    }
    Ok(())
}

fn decode_all(
    rows: &[sqlx::postgres::PgRow],
    stream: Option<&StreamId>,
) -> Result<Vec<factline_core::RecordedEvent>, StorageError> {
    let mut interner = Interner::default();
    rows.iter()
        .map(|row| decode_event(row, stream, &mut interner))
        .collect()
}

/// A stream row as the shared rules see it (deletes only need the head).
struct RowView<'a> {
    row: Option<&'a StreamRow>,
    now: Timestamp,
}

impl StreamView for RowView<'_> {
    fn is_tombstoned(&self) -> bool {
        self.row.is_some_and(|r| r.tombstoned)
    }
    fn last_revision(&self) -> Option<Revision> {
        self.row.and_then(|r| r.last_revision)
    }
    fn has_visible_events(&self) -> bool {
        self.row.is_some_and(|r| r.has_visible_events(self.now))
    }
    fn revision_of(&self, _event_id: &uuid::Uuid) -> Option<Revision> {
        None
    }
    fn id_at(&self, _revision: Revision) -> Option<uuid::Uuid> {
        None
    }
}

/// The `streams` row of `stream`, on the pool or inside a transaction.
async fn read_stream_row<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    sql: &Sql,
    stream: &StreamId,
) -> Result<Option<StreamRow>, StorageError> {
    let row = sqlx::query(AssertSqlSafe(Arc::clone(&sql.stream_row)))
        .bind(stream.as_str())
        .fetch_optional(executor)
        .await
        .map_err(storage("reading a stream head"))?;
    row.map(|row| StreamRow::decode(&row, 0)).transpose()
}

#[async_trait]
impl EventStore for PostgresStore {
    fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    async fn append_multi(
        &self,
        requests: Vec<AppendRequest>,
    ) -> Result<Vec<AppendResult>, AppendError> {
        check_append_requests(&self.inner.limits, &requests)?;
        self.ensure_open()?;
        let (reply, answer) = oneshot::channel();
        self.inner
            .jobs
            .send(Job { requests, reply })
            .await
            .map_err(|_| StorageError::Closed)?;
        answer.await.map_err(|_| StorageError::Closed)?
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadStreamOptions,
    ) -> Result<StreamSlice, ReadStreamError> {
        self.inner.limits.check_read_count(options.limit)?;
        let now = Timestamp::now();
        let row = self.stream_row(stream).await?;
        let not_found = || ReadStreamError::NotFound {
            stream: stream.clone(),
        };
        let Some(row) = row else {
            return Err(not_found());
        };
        if row.tombstoned {
            return Err(ReadStreamError::Deleted {
                stream: stream.clone(),
            });
        }
        let Some(last) = row.last_revision else {
            return Err(not_found());
        };
        let first = self.first_visible(stream, &row, last, now).await?;
        if first > last {
            return Err(not_found());
        }
        let page = options.page(first, last);
        let revisions = page.revisions.clone();
        // Rows come in the requested order (the backwards query sorts descending).
        let mut slice = page.slice(Vec::new(), last);
        if revisions.is_empty() {
            return Ok(slice);
        }
        let sql = if page.backwards {
            &self.inner.sql.read_stream_backwards
        } else {
            &self.inner.sql.read_stream_forwards
        };
        let count = revisions.end - revisions.start;
        use futures::TryStreamExt as _;
        let mut rows = sqlx::query(AssertSqlSafe(Arc::clone(sql)))
            .bind(stream.as_str())
            .bind(to_sql(revisions.start))
            .bind(to_sql(revisions.end - 1))
            .bind(to_sql(count))
            .fetch(&self.inner.pool);
        slice.events = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        let mut interner = Interner::default();
        // Decoded as the rows arrive, overlapping the server's work.
        while let Some(row) = rows.try_next().await.map_err(storage("reading a stream"))? {
            slice
                .events
                .push(decode_event(&row, Some(stream), &mut interner)?);
        }
        if slice.events.len() as u64 != count {
            return Err(StorageError::Backend(
                format!(
                    "stream {stream}: revisions {revisions:?} should all be stored, found {}",
                    slice.events.len()
                )
                .into(),
            )
            .into());
        }
        Ok(slice)
    }

    async fn read_all(&self, options: ReadAllOptions) -> Result<AllSlice, ReadAllError> {
        self.inner.limits.check_read_count(options.limit)?;
        self.ensure_open()?;
        if !options.filter.is_all() {
            let filter = options.filter.clone();
            return self.read_all_filtered(&options, &filter).await;
        }
        if options.limit == 0 {
            let head = self.next_position().await?;
            return Ok(match options.direction {
                Direction::Forwards => {
                    let from = options.from.map_or(0, |p| p.0);
                    AllSlice {
                        events: Vec::new(),
                        next_position: Position(from),
                        is_end: from >= head,
                    }
                }
                Direction::Backwards => {
                    let start = options
                        .from
                        .map_or(head, |p| p.0.saturating_add(1).min(head));
                    AllSlice {
                        events: Vec::new(),
                        next_position: Position(start.saturating_sub(1)),
                        is_end: start == 0,
                    }
                }
            });
        }
        let limit = options.limit;
        match options.direction {
            Direction::Forwards => {
                let from = options.from.map_or(0, |p| p.0);
                let (events, more) = self.read_all_forwards(from, limit).await?;
                // Positions are gapless and commit-ordered: when no row follows the page, the
                // page is everything committed at the read, so it ends the log.
                let next = events.last().map_or(from, |last| last.position.0 + 1);
                Ok(AllSlice {
                    events,
                    next_position: Position(next),
                    is_end: !more,
                })
            }
            Direction::Backwards => {
                let start = options.from.map_or(i64::MAX, |p| to_sql(p.0));
                let rows = sqlx::query(AssertSqlSafe(Arc::clone(
                    &self.inner.sql.read_all_backwards,
                )))
                .bind(start)
                .bind(to_sql(limit as u64))
                .fetch_all(&self.inner.pool)
                .await
                .map_err(storage("reading $all"))?;
                let events = decode_all(&rows, None)?;
                Ok(match events.last() {
                    Some(last) if events.len() == limit => AllSlice {
                        next_position: Position(last.position.0.saturating_sub(1)),
                        is_end: last.position.0 == 0,
                        events,
                    },
                    _ => AllSlice {
                        events,
                        next_position: Position(0),
                        is_end: true,
                    },
                })
            }
        }
    }

    async fn head_position(&self) -> Result<Option<Position>, StorageError> {
        Ok(self.next_position().await?.checked_sub(1).map(Position))
    }

    async fn subscribe_to_stream(
        &self,
        stream: &StreamId,
        from: SubscribeFrom<Revision>,
    ) -> Result<Subscription, SubscribeError> {
        let mut changes = self.inner.changes.listen();
        changes.mark_seen();
        let row = self.stream_row(stream).await?;
        if row.as_ref().is_some_and(|r| r.tombstoned) {
            return Err(SubscribeError::Deleted {
                stream: stream.clone(),
            });
        }
        let next = from.first_revision(row.and_then(|r| r.last_revision));
        Ok(follow_stream(self.clone(), changes, stream.clone(), next))
    }

    async fn subscribe_to_all(
        &self,
        from: SubscribeFrom<Position>,
        filter: EventFilter,
    ) -> Result<Subscription, SubscribeError> {
        let mut changes = self.inner.changes.listen();
        changes.mark_seen();
        let next = from.first_position(Position(self.next_position().await?));
        Ok(follow_all(self.clone(), changes, next, filter))
    }

    async fn stream_metadata(&self, stream: &StreamId) -> Result<StreamMetadata, MetadataError> {
        match self.stream_row(stream).await? {
            Some(row) if row.tombstoned => Err(MetadataError::Deleted {
                stream: stream.clone(),
            }),
            Some(row) => Ok(row.metadata),
            None => Ok(StreamMetadata::default()),
        }
    }

    async fn set_stream_metadata(
        &self,
        stream: &StreamId,
        metadata: StreamMetadata,
    ) -> Result<(), MetadataError> {
        metadata.validate()?;
        check_metadata_fits(&metadata)?;
        let sql = Arc::clone(&self.inner.sql);
        self.locked(async |conn: &mut PgConnection, _now| {
            let row = read_stream_row(&mut *conn, &sql, stream).await?;
            if row.is_some_and(|r| r.tombstoned) {
                return Err(MetadataError::Deleted {
                    stream: stream.clone(),
                });
            }
            let (max_count, max_age, truncate_before) = metadata_columns(&metadata);
            sqlx::query(AssertSqlSafe(Arc::clone(&sql.set_metadata)))
                .bind(stream.as_str())
                .bind(max_count)
                .bind(max_age)
                .bind(truncate_before)
                .execute(&mut *conn)
                .await
                .map_err(storage("writing stream metadata"))?;
            Ok(())
        })
        .await
    }

    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<(), DeleteError> {
        let sql = Arc::clone(&self.inner.sql);
        self.locked(async |conn: &mut PgConnection, now| {
            let row = read_stream_row(&mut *conn, &sql, stream).await?;
            let view = RowView {
                row: row.as_ref(),
                now,
            };
            let last = decide_delete(stream, expected, mode, &view)?;
            let statement = match mode {
                DeleteMode::Soft => sqlx::query(AssertSqlSafe(Arc::clone(&sql.soft_delete)))
                    .bind(stream.as_str())
                    .bind(last.map(|r| to_sql(r.next().value()))),
                DeleteMode::Tombstone => {
                    sqlx::query(AssertSqlSafe(Arc::clone(&sql.tombstone))).bind(stream.as_str())
                }
            };
            statement
                .execute(&mut *conn)
                .await
                .map_err(storage("deleting a stream"))?;
            sqlx::query(AssertSqlSafe(Arc::clone(&sql.delete_snapshot)))
                .bind(stream.as_str())
                .execute(&mut *conn)
                .await
                .map_err(storage("deleting a snapshot"))?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl SnapshotStore for PostgresStore {
    async fn save_snapshot(
        &self,
        stream: &StreamId,
        snapshot: Snapshot,
    ) -> Result<bool, SnapshotError> {
        LimitExceeded::check(
            Limit::EventSizeBytes,
            self.inner.limits.event_size_bytes_max,
            snapshot.state.len(),
        )?;
        self.ensure_open()?;
        let sql = &self.inner.sql;
        let mut tx = self
            .inner
            .pool
            .begin()
            .await
            .map_err(storage("beginning a transaction"))?;
        // The stream's row stays locked until commit: a tombstone cannot commit between the
        // check and the write.
        let tombstoned: bool = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&sql.lock_stream_row)))
            .bind(stream.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(storage("checking a stream for a snapshot"))?;
        if tombstoned {
            return Err(SnapshotError::Deleted {
                stream: stream.clone(),
            });
        }
        let written = sqlx::query(AssertSqlSafe(Arc::clone(&sql.save_snapshot)))
            .bind(stream.as_str())
            .bind(to_sql(snapshot.revision.value()))
            .bind(i32::from_ne_bytes(snapshot.state_version.to_ne_bytes()))
            .bind(snapshot.state.as_ref())
            .bind(offset_date_time(snapshot.taken_at))
            .execute(&mut *tx)
            .await
            .map_err(storage("saving a snapshot"))?
            .rows_affected();
        tx.commit()
            .await
            .map_err(storage("committing a snapshot"))?;
        Ok(written == 1)
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        self.ensure_open()?;
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.load_snapshot)))
            .bind(stream.as_str())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(storage("loading a snapshot"))?;
        let Some(row) = row else { return Ok(None) };
        let revision: i64 = get(&row, 0, "revision")?;
        let state_version: i32 = get(&row, 1, "state_version")?;
        let state: Vec<u8> = get(&row, 2, "state")?;
        let taken_at: time::OffsetDateTime = get(&row, 3, "taken_at")?;
        Ok(Some(Snapshot {
            revision: Revision(from_sql("revision", revision)?),
            state_version: u32::from_ne_bytes(state_version.to_ne_bytes()),
            state: Bytes::from(state),
            taken_at: timestamp(taken_at),
        }))
    }

    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), SnapshotError> {
        self.ensure_open()?;
        sqlx::query(AssertSqlSafe(Arc::clone(&self.inner.sql.delete_snapshot)))
            .bind(stream.as_str())
            .execute(&self.inner.pool)
            .await
            .map_err(storage("deleting a snapshot"))?;
        Ok(())
    }
}

/// Named checkpoints (the position of the last event a projection or subscriber processed),
/// in the store's schema: a [`factline_core::CheckpointStore`]. Save one with
/// [`PostgresCheckpointStore::save_in`] in the transaction that updates a read model, and the
/// two commit together.
#[derive(Debug, Clone)]
pub struct PostgresCheckpointStore {
    pool: PgPool,
    sql: Arc<Sql>,
}

impl PostgresCheckpointStore {
    pub(crate) fn new(pool: PgPool, sql: Arc<Sql>) -> Self {
        Self { pool, sql }
    }

    /// The saved position of `name`, if any.
    pub async fn load(&self, name: &str) -> Result<Option<Position>, CheckpointError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(storage("acquiring a connection"))?;
        self.load_in(&mut conn, name).await
    }

    /// [`PostgresCheckpointStore::load`] on the caller's connection or transaction.
    pub async fn load_in(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<Option<Position>, CheckpointError> {
        check_checkpoint_name(name)?;
        let position: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.load_checkpoint)))
                .bind(name)
                .fetch_optional(conn)
                .await
                .map_err(storage("loading a checkpoint"))?;
        Ok(position
            .map(|p| from_sql("position", p).map(Position))
            .transpose()?)
    }

    /// Saves `position` as the checkpoint of `name`.
    pub async fn save(&self, name: &str, position: Position) -> Result<(), CheckpointError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(storage("acquiring a connection"))?;
        self.save_in(&mut conn, name, position).await
    }

    /// [`PostgresCheckpointStore::save`] on the caller's connection or transaction: it commits (or
    /// rolls back) with everything else the transaction does.
    pub async fn save_in(
        &self,
        conn: &mut PgConnection,
        name: &str,
        position: Position,
    ) -> Result<(), CheckpointError> {
        check_checkpoint_name(name)?;
        sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.save_checkpoint)))
            .bind(name)
            .bind(to_sql(position.value()))
            .execute(conn)
            .await
            .map_err(storage("saving a checkpoint"))?;
        Ok(())
    }

    /// Forgets the checkpoint of `name` (a rebuild starts from the beginning).
    pub async fn delete(&self, name: &str) -> Result<(), CheckpointError> {
        check_checkpoint_name(name)?;
        sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.delete_checkpoint)))
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(storage("deleting a checkpoint"))?;
        Ok(())
    }
}

#[async_trait]
impl factline_core::CheckpointStore for PostgresCheckpointStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, CheckpointError> {
        self.load(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), CheckpointError> {
        self.save(name, position).await
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<(), CheckpointError> {
        self.delete(name).await
    }

    async fn list_checkpoints(
        &self,
        count_max: usize,
    ) -> Result<Vec<(String, Position)>, CheckpointError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as(AssertSqlSafe(Arc::clone(&self.sql.list_checkpoints)))
                .bind(i64::try_from(count_max).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await
                .map_err(storage("listing checkpoints"))?;
        rows.into_iter()
            .map(|(name, position)| Ok((name, Position(from_sql("position", position)?))))
            .collect()
    }
}
