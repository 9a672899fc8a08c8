//! Pub/sub on PostgreSQL: see the crate documentation and `docs/design/sql-pubsub.md`.

mod dedup;
mod outbox;
mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::{BoxError, CloseError, Message, PublishError, Publisher, check_topic};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection as _};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use dedup::{PgDedupConfig, PgDedupStore};
pub use factline_messaging::DeliverFrom;
pub use outbox::{OUTBOX_DESTINATION_KEY, PgOutbox, RunForwarderError};

pub use crate::engine::SqlSubscriber;
pub use crate::engine::{GROUP_BYTES_MAX, InvalidGroup, TooManyMessages};
use crate::engine::{Rows, Settings, Store, check_group, check_settings};
pub(crate) use crate::engine::{boxed, millis};
use crate::names::{InvalidSchemaName, check_schema_name, table_for_topic};
use store::PgStore;

/// Settings of a [`PgPubSub`]; every value is checked by [`PgPubSub::connect`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PgPubSubConfig {
    /// The database, e.g. `postgres://user:password@127.0.0.1:5432/app`.
    pub url: String,
    /// The schema holding the topic tables and the group state (made when missing). Default
    /// `factline_pubsub`.
    pub schema: String,
    /// How long connecting may take. Default 5 s.
    pub connect_timeout: Duration,
    /// Connections in the pool (publishes, claims, acknowledgements); one more listens.
    /// Default 8.
    pub pool_connections_max: u32,
    /// Longest a statement may run (`statement_timeout`). Default 10 s.
    pub statement_timeout: Duration,
    /// Largest message accepted (payload, id and metadata). Default 1 MiB.
    pub message_size_bytes_max: usize,
    /// Messages per publish call at most (one `INSERT`). Default 10,000.
    pub publish_messages_max: usize,
    /// Unsettled deliveries per subscription. Default 1,024.
    pub in_flight_max: usize,
    /// Rows claimed per round trip. Default 256.
    pub fetch_batch: usize,
    /// How often a subscription looks without having been notified (rows that became
    /// visible without a notification, redeliveries that came due). Default 1 s.
    pub poll_interval: Duration,
    /// How long a delivery stays claimed by a subscription that stopped renewing it (its
    /// process died) before another member takes it. Default 30 s.
    pub claim_lease: Duration,
    /// Where new groups start. Default [`DeliverFrom::Oldest`].
    pub deliver_from: DeliverFrom,
    /// A group of an ungrouped subscription whose process died is removed after this long
    /// untouched. Default 1 h.
    pub private_group_idle_max: Duration,
    /// How long [`factline_messaging::Subscriber::close`] waits for acknowledgements and
    /// handovers. Default 5 s.
    pub close_timeout: Duration,
}

impl PgPubSubConfig {
    /// The defaults, for the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "factline_pubsub".to_owned(),
            connect_timeout: Duration::from_secs(5),
            pool_connections_max: 8,
            statement_timeout: Duration::from_secs(10),
            message_size_bytes_max: 1 << 20,
            publish_messages_max: 10_000,
            in_flight_max: 1_024,
            fetch_batch: 256,
            poll_interval: Duration::from_secs(1),
            claim_lease: Duration::from_secs(30),
            deliver_from: DeliverFrom::Oldest,
            private_group_idle_max: Duration::from_secs(3_600),
            close_timeout: Duration::from_secs(5),
        }
    }

    /// Builder: see [`PgPubSubConfig::schema`].
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Builder: see [`PgPubSubConfig::connect_timeout`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Builder: see [`PgPubSubConfig::pool_connections_max`].
    #[must_use]
    pub fn pool_connections_max(mut self, connections: u32) -> Self {
        self.pool_connections_max = connections;
        self
    }

    /// Builder: see [`PgPubSubConfig::in_flight_max`].
    #[must_use]
    pub fn in_flight_max(mut self, deliveries: usize) -> Self {
        self.in_flight_max = deliveries;
        self
    }

    /// Builder: see [`PgPubSubConfig::poll_interval`].
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Builder: see [`PgPubSubConfig::claim_lease`].
    #[must_use]
    pub fn claim_lease(mut self, lease: Duration) -> Self {
        self.claim_lease = lease;
        self
    }

    /// Builder: see [`PgPubSubConfig::deliver_from`].
    #[must_use]
    pub fn deliver_from(mut self, from: DeliverFrom) -> Self {
        self.deliver_from = from;
        self
    }

    fn check(&self) -> Result<(), ConnectError> {
        check_schema_name(&self.schema)?;
        check_settings(
            &[
                ("connect_timeout", self.connect_timeout),
                ("statement_timeout", self.statement_timeout),
                ("poll_interval", self.poll_interval),
                ("private_group_idle_max", self.private_group_idle_max),
                ("close_timeout", self.close_timeout),
            ],
            &[
                ("pool_connections_max", self.pool_connections_max as usize),
                ("message_size_bytes_max", self.message_size_bytes_max),
                ("publish_messages_max", self.publish_messages_max),
                ("in_flight_max", self.in_flight_max),
                ("fetch_batch", self.fetch_batch),
            ],
            self.claim_lease,
            self.message_size_bytes_max,
        )
        .map_err(|(field, reason)| ConnectError::InvalidConfig { field, reason })
    }
}

/// Why [`PgPubSub::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// A setting cannot work.
    #[error("invalid SQL pub/sub setting {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The schema name is not a plain identifier.
    #[error(transparent)]
    InvalidSchema(#[from] InvalidSchemaName),
    /// The URL is not a PostgreSQL URL, or the server refused (authentication, a missing
    /// database) or could not be reached.
    #[error("cannot connect to PostgreSQL at {url}: {source}")]
    Connect {
        /// The server (password hidden).
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Connecting took longer than [`PgPubSubConfig::connect_timeout`].
    #[error("connecting to PostgreSQL at {url} took over {timeout_ms} ms")]
    TimedOut {
        /// The server (password hidden).
        url: String,
        /// The limit.
        timeout_ms: u64,
    },
    /// Making the schema and its tables failed (no privilege, an incompatible table of the
    /// same name).
    #[error("preparing schema {schema:?} failed: {source}")]
    Schema {
        /// The schema.
        schema: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
}

/// The SQL of one topic's table, built once.
#[derive(Debug)]
pub(crate) struct TopicSql {
    pub(crate) table: String,
    /// `$1` ids, `$2` payloads, `$3` metadata (JSON or NULL), `$4` channel, `$5` table.
    pub(crate) insert: Arc<str>,
    /// Rows after the frontier `($1 tx, $2 offset)` of transactions before `$4` (a snapshot's
    /// xmin: every transaction before it has ended), `$3` at most.
    pub(crate) select_new: Arc<str>,
    /// Whether rows of transactions from `$1` on are visible (committed, but not claimable
    /// until every transaction before them has ended).
    pub(crate) select_blocked: Arc<str>,
    /// Rows by offset, `$1` the offsets.
    pub(crate) select_offsets: Arc<str>,
}

impl TopicSql {
    fn new(schema: &str, table: String) -> Self {
        let qualified = format!("{schema}.{table}");
        Self {
            insert: format!(
                "WITH inserted AS (INSERT INTO {qualified} (id, payload, metadata) \
                 SELECT id, payload, metadata::jsonb \
                 FROM UNNEST($1::text[], $2::bytea[], $3::text[]) WITH ORDINALITY AS m(id, payload, metadata, n) \
                 ORDER BY n RETURNING 1) \
                 SELECT pg_notify($4, $5) FROM (SELECT count(*) FROM inserted) AS done"
            )
            .into(),
            select_new: format!(
                "SELECT msg_offset, tx::text, id, payload, metadata::text FROM {qualified} \
                 WHERE (tx, msg_offset) > ($1::text::xid8, $2) \
                 AND tx < $4::text::xid8 \
                 ORDER BY tx, msg_offset LIMIT $3"
            )
            .into(),
            select_blocked: format!(
                "SELECT EXISTS (SELECT 1 FROM {qualified} WHERE tx >= $1::text::xid8)"
            )
            .into(),
            select_offsets: format!(
                "SELECT msg_offset, tx::text, id, payload, metadata::text FROM {qualified} \
                 WHERE msg_offset = ANY($1) ORDER BY tx, msg_offset"
            )
            .into(),
            table,
        }
    }
}

pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    pub(crate) config: PgPubSubConfig,
    /// `NOTIFY` channel of this schema.
    pub(crate) channel: String,
    /// Topics whose table is known to exist.
    topics: Mutex<KnownTopics>,
    /// Table names notified (by the listener; `""` after a reconnect: anything may have
    /// changed).
    pub(crate) notified: broadcast::Sender<Arc<str>>,
    listener_started: AtomicBool,
    pub(crate) closed: CancellationToken,
}

/// The topics a process has seen, by topic (for publishing) and by table (for claims).
#[derive(Default)]
struct KnownTopics {
    by_topic: HashMap<String, Arc<TopicSql>>,
    by_table: HashMap<String, Arc<TopicSql>>,
}

impl Shared {
    pub(crate) fn schema(&self) -> &str {
        &self.config.schema
    }

    /// The topic's SQL, making its table (and registering it) when this process has not
    /// seen it yet.
    pub(crate) async fn topic(&self, topic: &str) -> Result<Arc<TopicSql>, BoxError> {
        if let Some(known) = self
            .topics
            .lock()
            .ok()
            .and_then(|known| known.by_topic.get(topic).cloned())
        {
            return Ok(known);
        }
        let table = table_for_topic(topic);
        let schema = self.schema();
        let mut tx = self.pool.begin().await.map_err(boxed)?;
        // Concurrent CREATE TABLE IF NOT EXISTS of one name can fail on the catalog's unique
        // index: one process at a time makes tables of this schema.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("factline_sql:{schema}"))
            .execute(&mut *tx)
            .await
            .map_err(boxed)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {schema}.fl_topics (topic, table_name) VALUES ($1, $2) \
             ON CONFLICT (topic) DO NOTHING"
        )))
        .bind(topic)
        .bind(&table)
        .execute(&mut *tx)
        .await
        .map_err(|error| -> BoxError {
            match &error {
                sqlx::Error::Database(db) if db.is_unique_violation() => Box::new(TableCollision {
                    topic: topic.to_owned(),
                    table: table.clone(),
                }),
                _ => boxed(error),
            }
        })?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{table} (
                msg_offset bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                tx xid8 NOT NULL DEFAULT pg_current_xact_id(),
                id text NOT NULL,
                payload bytea NOT NULL,
                metadata jsonb,
                published_at timestamptz NOT NULL DEFAULT now()
            )"
        )))
        .execute(&mut *tx)
        .await
        .map_err(boxed)?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE INDEX IF NOT EXISTS {table}_tx ON {schema}.{table} (tx, msg_offset)"
        )))
        .execute(&mut *tx)
        .await
        .map_err(boxed)?;
        tx.commit().await.map_err(boxed)?;
        let sql = Arc::new(TopicSql::new(schema, table));
        if let Ok(mut known) = self.topics.lock() {
            known.by_topic.insert(topic.to_owned(), Arc::clone(&sql));
            known.by_table.insert(sql.table.clone(), Arc::clone(&sql));
        }
        Ok(sql)
    }

    /// The SQL of the topic whose table is `table`, when this process knows it.
    pub(crate) fn topic_sql(&self, table: &str) -> Option<Arc<TopicSql>> {
        self.topics.lock().ok()?.by_table.get(table).cloned()
    }

    /// Starts the `LISTEN` task once.
    pub(crate) fn start_listener(self: &Arc<Self>) {
        if self.listener_started.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(listen(Arc::clone(self)));
    }
}

/// Two topics whose tables would have the same name.
#[derive(Debug, Clone, thiserror::Error)]
#[error("topic {topic:?} maps to table {table}, which another topic already uses")]
pub struct TableCollision {
    /// The topic.
    pub topic: String,
    /// Its table name.
    pub table: String,
}

/// Keeps one `LISTEN` connection and forwards every notification (the table that got rows);
/// after a lost connection it reconnects with backoff and wakes everyone once.
async fn listen(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&shared.pool).await?;
            listener.listen(&shared.channel).await?;
            let _ = shared.notified.send(Arc::from(""));
            loop {
                match listener.try_recv().await? {
                    Some(notification) => {
                        let _ = shared.notified.send(Arc::from(notification.payload()));
                    }
                    None => {
                        let _ = shared.notified.send(Arc::from(""));
                    }
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            () = shared.closed.cancelled() => return,
            result = session => {
                if let Err(error) = result {
                    if shared.closed.is_cancelled() {
                        return;
                    }
                    tracing::warn!(%error, backoff_ms = millis(backoff), "LISTEN connection failed; reconnecting");
                }
            }
        }
        tokio::select! {
            () = shared.closed.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
        let _ = shared.notified.send(Arc::from(""));
    }
}

/// Pub/sub on one PostgreSQL schema, from which publishers and subscribers are made. Cheap to
/// clone.
#[derive(Clone)]
pub struct PgPubSub {
    shared: Arc<Shared>,
    store: Arc<PgStore>,
}

impl std::fmt::Debug for PgPubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgPubSub")
            .field(
                "url",
                &factline_messaging::redact_url(&self.shared.config.url),
            )
            .field("schema", &self.shared.config.schema)
            .finish_non_exhaustive()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

impl PgPubSub {
    /// Checks the settings, connects and makes the schema's shared tables when missing, within
    /// [`PgPubSubConfig::connect_timeout`].
    pub async fn connect(config: PgPubSubConfig) -> Result<Self, ConnectError> {
        config.check()?;
        let url = factline_messaging::redact_url(&config.url);
        let options: PgConnectOptions =
            config.url.parse().map_err(|source| ConnectError::Connect {
                url: url.clone(),
                source,
            })?;
        let statement_timeout_ms = millis(config.statement_timeout).to_string();
        let options = options
            .options([("statement_timeout", statement_timeout_ms.as_str())])
            .application_name("factline-sql");
        let timed_out = || ConnectError::TimedOut {
            url: url.clone(),
            timeout_ms: millis(config.connect_timeout),
        };
        // One connection first: a wrong password or database fails here, at once, instead of
        // the pool retrying until its timeout.
        let mut first =
            tokio::time::timeout(config.connect_timeout, PgConnection::connect_with(&options))
                .await
                .map_err(|_| timed_out())?
                .map_err(|source| ConnectError::Connect {
                    url: url.clone(),
                    source,
                })?;
        let schema_error = |source| ConnectError::Schema {
            schema: config.schema.clone(),
            source,
        };
        tokio::time::timeout(
            config.connect_timeout.max(config.statement_timeout),
            prepare_schema(&mut first, &config.schema),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(schema_error)?;
        first.close().await.ok();
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_connections_max)
            .acquire_timeout(config.connect_timeout)
            .connect_lazy_with(options);
        let channel = format!("fl_{}", &config.schema[..config.schema.len().min(60)]);
        let (notified, _) = broadcast::channel(1_024);
        let settings = Settings {
            in_flight_max: config.in_flight_max,
            fetch_batch: config.fetch_batch,
            poll_interval: config.poll_interval,
            claim_lease: config.claim_lease,
            deliver_from: config.deliver_from,
            close_timeout: config.close_timeout,
        };
        let shared = Arc::new(Shared {
            pool,
            config,
            channel,
            topics: Mutex::new(KnownTopics::default()),
            notified,
            listener_started: AtomicBool::new(false),
            closed: CancellationToken::new(),
        });
        let store = Arc::new(PgStore::new(Arc::clone(&shared), settings));
        Ok(Self { shared, store })
    }

    /// A publisher on this schema.
    pub fn publisher(&self) -> PgPublisher {
        PgPublisher {
            shared: Arc::clone(&self.shared),
            closed: AtomicBool::new(false),
        }
    }

    /// A subscriber whose every subscription reads all of its topic (a group of its own,
    /// removed when the subscription ends).
    pub fn subscriber(&self) -> SqlSubscriber {
        SqlSubscriber::new(self.store(), None)
    }

    fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store) as Arc<dyn Store>
    }

    /// A subscriber in consumer group `group`: its subscriptions share the group's messages
    /// with every other member, in this process or another; the group's offsets are kept in
    /// the database.
    pub fn subscriber_in_group(&self, group: &str) -> Result<SqlSubscriber, InvalidGroup> {
        check_group(group)?;
        Ok(SqlSubscriber::new(self.store(), Some(group.to_owned())))
    }

    /// The largest message accepted ([`PgPubSubConfig::message_size_bytes_max`]).
    pub fn message_size_bytes_max(&self) -> usize {
        self.shared.config.message_size_bytes_max
    }

    /// The pool this pub/sub uses, e.g. to begin the transactions that
    /// [`PgPublisher::publish_in`] publishes in.
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    /// The outbox on this schema: stage messages in the application's transactions, forward
    /// them with a [`factline_messaging::Forwarder`].
    pub fn outbox(&self, topic: impl Into<String>) -> PgOutbox {
        PgOutbox::new(self.publisher(), topic.into())
    }

    /// Deletes the messages of `topic` published more than `age` ago that no group still
    /// holds as a delivery, and returns how many. Groups that have not read them yet lose
    /// them: choose `age` beyond any consumer's lag.
    pub async fn delete_older_than(&self, topic: &str, age: Duration) -> Result<u64, BoxError> {
        check_topic(topic).map_err(boxed)?;
        let sql = self.shared.topic(topic).await?;
        let schema = self.shared.schema();
        let table = &sql.table;
        let done = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {schema}.{table} t WHERE published_at < now() - make_interval(secs => $1) \
             AND NOT EXISTS (SELECT 1 FROM {schema}.fl_deliveries d \
               WHERE d.table_name = $2 AND d.msg_offset = t.msg_offset)"
        )))
        .bind(age.as_secs_f64())
        .bind(table)
        .execute(&self.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(done.rows_affected())
    }

    /// Stops the listener and closes the pool.
    pub async fn close(&self) {
        self.shared.closed.cancel();
        self.shared.pool.close().await;
    }
}

/// Makes the schema and its shared tables, one process at a time.
async fn prepare_schema(conn: &mut PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("factline_sql:{schema}"))
        .execute(&mut *tx)
        .await?;
    for statement in [
        format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.fl_topics (
                topic text PRIMARY KEY,
                table_name text NOT NULL UNIQUE,
                created_at timestamptz NOT NULL DEFAULT now()
            )"
        ),
        // A group's frontier: every row at or before (frontier_tx, frontier_offset) has been
        // handed to a member (and is acked, or listed in fl_deliveries).
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.fl_groups (
                table_name text NOT NULL,
                group_name text NOT NULL,
                frontier_tx xid8 NOT NULL,
                frontier_offset bigint NOT NULL,
                touched_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (table_name, group_name)
            )"
        ),
        // Rows handed to a member and not acked yet: claimed by `consumer` until `due_at`,
        // or free (consumer NULL) to be taken by any member from `due_at` on.
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.fl_deliveries (
                table_name text NOT NULL,
                group_name text NOT NULL,
                msg_offset bigint NOT NULL,
                consumer uuid,
                due_at timestamptz NOT NULL,
                attempts integer NOT NULL DEFAULT 1,
                PRIMARY KEY (table_name, group_name, msg_offset)
            )"
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS fl_deliveries_due ON {schema}.fl_deliveries \
             (table_name, group_name, due_at)"
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS fl_deliveries_consumer ON {schema}.fl_deliveries (consumer)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.fl_dedup (
                scope text NOT NULL,
                key text NOT NULL,
                done boolean NOT NULL,
                at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (scope, key)
            )"
        ),
    ] {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// Publishes to topic tables; see [`PgPubSub::publisher`]. Each publish is one statement (its
/// own transaction), or part of the caller's with [`PgPublisher::publish_in`].
pub struct PgPublisher {
    shared: Arc<Shared>,
    closed: AtomicBool,
}

impl std::fmt::Debug for PgPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgPublisher").finish_non_exhaustive()
    }
}

impl PgPublisher {
    fn rows(&self, topic: &str, messages: &[Message]) -> Result<Rows, PublishError> {
        let config = &self.shared.config;
        Rows::of(
            self.closed.load(Ordering::Acquire),
            topic,
            messages,
            config.message_size_bytes_max,
            config.publish_messages_max,
        )
    }

    async fn insert(
        &self,
        conn: &mut PgConnection,
        sql: &TopicSql,
        rows: Rows,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(Arc::clone(&sql.insert)))
            .bind(rows.ids)
            .bind(rows.payloads)
            .bind(rows.metadata)
            .bind(&self.shared.channel)
            .bind(&sql.table)
            .execute(conn)
            .await
            .map(|_| ())
    }

    /// Publishes `messages` to `topic` inside the caller's transaction (pass `&mut *tx`):
    /// they become visible to subscribers when it commits, and vanish if it rolls back.
    ///
    /// The topic's table is made beforehand on a connection of the pool (not in the caller's
    /// transaction) the first time this process publishes to the topic. While the caller's
    /// transaction is open, subscribers of the schema's topics see no row of a later
    /// transaction (visibility goes by transaction id): keep it short.
    pub async fn publish_in(
        &self,
        conn: &mut PgConnection,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<(), PublishError> {
        let rows = self.rows(topic, &messages)?;
        if messages.is_empty() {
            return Ok(());
        }
        let sql = self
            .shared
            .topic(topic)
            .await
            .map_err(PublishError::Transport)?;
        self.insert(conn, &sql, rows)
            .await
            .map_err(|error| PublishError::Transport(boxed(error)))
    }
}

#[async_trait]
impl Publisher for PgPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<(), PublishError> {
        let rows = self.rows(topic, &messages)?;
        if messages.is_empty() {
            return Ok(());
        }
        let sql = self
            .shared
            .topic(topic)
            .await
            .map_err(PublishError::Transport)?;
        let mut conn = self
            .shared
            .pool
            .acquire()
            .await
            .map_err(|error| PublishError::Transport(boxed(error)))?;
        // One statement: its own transaction.
        self.insert(&mut conn, &sql, rows)
            .await
            .map_err(|error| PublishError::Transport(boxed(error)))
    }

    async fn close(&self) -> Result<(), CloseError> {
        // Every publish that returned was committed: nothing is buffered.
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}
