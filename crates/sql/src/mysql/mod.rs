//! Pub/sub on MariaDB (and MySQL 8): the tables and the subscriber of [`crate::postgres`].
//!
//! MariaDB has no transaction-id horizon to read by, so offsets are made to follow commit order
//! instead: a publish takes its offsets from the topic's row of `fl_topics` under `FOR UPDATE`
//! and holds that lock until its transaction commits. A later publish to the same topic waits,
//! takes higher offsets and commits later; so a group that reads past its frontier by offset
//! never skips a row that commits late. The price: publishes to one topic are serialized for as
//! long as their transactions run (keep transactions that call
//! [`MySqlPublisher::publish_in`] short). Connections use `READ COMMITTED`. DDL commits
//! implicitly in MariaDB, so a topic's table is made on a connection of the pool, never in the
//! caller's transaction. There is no `LISTEN`: subscriptions in the publishing process are woken
//! at once, others look every [`MySqlPubSubConfig::poll_interval`].

mod dedup;

use std::collections::HashMap;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::{
    BoxError, CloseError, DeliverFrom, ForwarderConfig, Message, PublishError, Publisher,
    Subscriber,
};
use sqlx::mysql::{MySql, MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, Connection as _, QueryBuilder, Row as _};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::engine::{
    Claimed, InvalidGroup, Row, Rows, Settings, SqlSubscriber, Store, boxed, check_group,
    check_settings, millis, staged,
};
use crate::forwarding::{
    LOCK_CHECK_INTERVAL, RunForwarderError, forward_while_locked, wait_for_next_try,
};
use crate::names::table_for_topic;
pub use dedup::MySqlDedupStore;

/// Settings of a [`MySqlPubSub`]; every value is checked by [`MySqlPubSub::connect`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MySqlPubSubConfig {
    /// The database, e.g. `mysql://app:password@127.0.0.1:3306/app` (its tables are made
    /// when missing).
    pub url: String,
    /// How long connecting may take. Default 5 s.
    pub connect_timeout: Duration,
    /// How long a statement waits for a row lock (`innodb_lock_wait_timeout`, whole seconds,
    /// at least 1). Default 10 s.
    pub lock_wait_timeout: Duration,
    /// Connections in the pool. Default 8.
    pub pool_connections_max: u32,
    /// Largest message accepted (payload, id and metadata). Default 1 MiB.
    pub message_size_bytes_max: usize,
    /// Messages per publish call at most. Default 10,000.
    pub publish_messages_max: usize,
    /// Unsettled deliveries per subscription. Default 1,024.
    pub in_flight_max: usize,
    /// Rows claimed per transaction. Default 256.
    pub fetch_batch: usize,
    /// How often a subscription looks for rows it was not told of. Default 200 ms.
    pub poll_interval: Duration,
    /// How long a delivery stays claimed by a subscription that stopped renewing it. Default
    /// 30 s.
    pub claim_lease: Duration,
    /// Where new groups start. Default [`DeliverFrom::Oldest`].
    pub deliver_from: DeliverFrom,
    /// A group of an ungrouped subscription whose process died is removed after this long
    /// untouched. Default 1 h.
    pub private_group_idle_max: Duration,
    /// How long closing a subscriber waits for its acknowledgements. Default 5 s.
    pub close_timeout: Duration,
}

impl MySqlPubSubConfig {
    /// The defaults, for the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect_timeout: Duration::from_secs(5),
            lock_wait_timeout: Duration::from_secs(10),
            pool_connections_max: 8,
            message_size_bytes_max: 1 << 20,
            publish_messages_max: 10_000,
            in_flight_max: 1_024,
            fetch_batch: 256,
            poll_interval: Duration::from_millis(200),
            claim_lease: Duration::from_secs(30),
            deliver_from: DeliverFrom::Oldest,
            private_group_idle_max: Duration::from_secs(3_600),
            close_timeout: Duration::from_secs(5),
        }
    }

    /// Builder: see [`MySqlPubSubConfig::claim_lease`].
    #[must_use]
    pub fn claim_lease(mut self, lease: Duration) -> Self {
        self.claim_lease = lease;
        self
    }

    /// Builder: see [`MySqlPubSubConfig::poll_interval`].
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    fn check(&self) -> Result<(), ConnectError> {
        check_settings(
            &[
                ("connect_timeout", self.connect_timeout),
                ("lock_wait_timeout", self.lock_wait_timeout),
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

/// Why [`MySqlPubSub::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// A setting cannot work.
    #[error("invalid MariaDB pub/sub setting {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL is not a MySQL URL, or the server refused (authentication, a missing database)
    /// or could not be reached, or the tables could not be made.
    #[error("cannot connect to MariaDB at {url}: {source}")]
    Open {
        /// The server (password hidden).
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Connecting took longer than [`MySqlPubSubConfig::connect_timeout`].
    #[error("connecting to MariaDB at {url} took over {timeout_ms} ms")]
    TimedOut {
        /// The server (password hidden).
        url: String,
        /// The limit.
        timeout_ms: u64,
    },
}

/// The database's clock in microseconds since the epoch: leases and nack delays are measured
/// on the one clock every member compares them with.
const NOW_US: &str = "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)";

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// `sql` followed by `(?, ?, …)` binding `values`, then `tail`.
fn with_list(sql: &str, values: &[i64], tail: &str) -> QueryBuilder<MySql> {
    let mut query: QueryBuilder<MySql> = QueryBuilder::new(sql);
    query.push("(");
    let mut list = query.separated(", ");
    for value in values {
        list.push_bind(*value);
    }
    query.push(")");
    query.push(tail);
    query
}

struct Shared {
    pool: MySqlPool,
    config: MySqlPubSubConfig,
    settings: Settings,
    /// Topics whose table is known to exist.
    topics: Mutex<HashMap<String, Arc<str>>>,
    wakeups: broadcast::Sender<Arc<str>>,
}

impl Shared {
    /// The topic's table, made (and the topic registered) on a pool connection when this
    /// process has not seen it: DDL commits implicitly, so never in a caller's transaction.
    async fn table(&self, topic: &str) -> Result<Arc<str>, BoxError> {
        if let Some(known) = self.topics.lock().ok().and_then(|t| t.get(topic).cloned()) {
            return Ok(known);
        }
        let table = table_for_topic(topic);
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                msg_offset BIGINT NOT NULL PRIMARY KEY,
                id VARCHAR(255) NOT NULL,
                payload LONGBLOB NOT NULL,
                metadata LONGTEXT NULL,
                published_at BIGINT NOT NULL
            ) ENGINE = InnoDB"
        )))
        .execute(&self.pool)
        .await
        .map_err(boxed)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT IGNORE INTO fl_topics (topic, table_name, next_offset, created_at) \
             VALUES (?, ?, 1, {NOW_US})"
        )))
        .bind(topic.as_bytes())
        .bind(&table)
        .execute(&self.pool)
        .await
        .map_err(boxed)?;
        let registered: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT topic FROM fl_topics WHERE table_name = ?")
                .bind(&table)
                .fetch_optional(&self.pool)
                .await
                .map_err(boxed)?;
        if registered.as_deref() != Some(topic.as_bytes()) {
            return Err(Box::new(crate::postgres::TableCollision {
                topic: topic.to_owned(),
                table,
            }));
        }
        let table: Arc<str> = Arc::from(table);
        if let Ok(mut topics) = self.topics.lock() {
            topics.insert(topic.to_owned(), Arc::clone(&table));
        }
        Ok(table)
    }
}

/// Pub/sub on one MariaDB database. Cheap to clone.
#[derive(Clone)]
pub struct MySqlPubSub {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MySqlPubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlPubSub")
            .field(
                "url",
                &factline_messaging::redact_url(&self.shared.config.url),
            )
            .finish_non_exhaustive()
    }
}

impl MySqlPubSub {
    /// Checks the settings, connects (one connection first: a wrong password or database fails
    /// at once) and makes the shared tables when missing, within
    /// [`MySqlPubSubConfig::connect_timeout`].
    pub async fn connect(config: MySqlPubSubConfig) -> Result<Self, ConnectError> {
        config.check()?;
        let url = factline_messaging::redact_url(&config.url);
        let open_error = |source| ConnectError::Open {
            url: url.clone(),
            source,
        };
        let options = MySqlConnectOptions::from_str(&config.url).map_err(open_error)?;
        let lock_wait_secs = config.lock_wait_timeout.as_secs().max(1);
        let open = async {
            let mut first = MySqlConnection::connect_with(&options).await?;
            for statement in [
                "CREATE TABLE IF NOT EXISTS fl_topics (
                    topic VARBINARY(255) NOT NULL PRIMARY KEY,
                    table_name VARCHAR(64) NOT NULL UNIQUE,
                    next_offset BIGINT NOT NULL,
                    created_at BIGINT NOT NULL
                ) ENGINE = InnoDB",
                "CREATE TABLE IF NOT EXISTS fl_groups (
                    table_name VARCHAR(64) NOT NULL,
                    group_name VARBINARY(255) NOT NULL,
                    frontier BIGINT NOT NULL,
                    touched_at BIGINT NOT NULL,
                    PRIMARY KEY (table_name, group_name)
                ) ENGINE = InnoDB",
                "CREATE TABLE IF NOT EXISTS fl_deliveries (
                    table_name VARCHAR(64) NOT NULL,
                    group_name VARBINARY(255) NOT NULL,
                    msg_offset BIGINT NOT NULL,
                    consumer BINARY(16) NULL,
                    due_at BIGINT NOT NULL,
                    attempts INT NOT NULL DEFAULT 1,
                    PRIMARY KEY (table_name, group_name, msg_offset),
                    KEY fl_deliveries_consumer (consumer)
                ) ENGINE = InnoDB",
                "CREATE TABLE IF NOT EXISTS fl_dedup (
                    scope VARBINARY(255) NOT NULL,
                    dkey VARBINARY(255) NOT NULL,
                    done BOOLEAN NOT NULL,
                    at_us BIGINT NOT NULL,
                    PRIMARY KEY (scope, dkey)
                ) ENGINE = InnoDB",
            ] {
                sqlx::query(statement).execute(&mut first).await?;
            }
            first.close().await.ok();
            let lock_wait = format!("SET SESSION innodb_lock_wait_timeout = {lock_wait_secs}");
            MySqlPoolOptions::new()
                .max_connections(config.pool_connections_max)
                .acquire_timeout(config.connect_timeout)
                .after_connect(move |conn, _| {
                    let lock_wait = lock_wait.clone();
                    Box::pin(async move {
                        sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query(AssertSqlSafe(lock_wait))
                            .execute(&mut *conn)
                            .await?;
                        Ok(())
                    })
                })
                .connect_with(options.clone())
                .await
        };
        let pool = tokio::time::timeout(config.connect_timeout, open)
            .await
            .map_err(|_| ConnectError::TimedOut {
                url: url.clone(),
                timeout_ms: millis(config.connect_timeout),
            })?
            .map_err(open_error)?;
        let settings = Settings {
            in_flight_max: config.in_flight_max,
            fetch_batch: config.fetch_batch,
            poll_interval: config.poll_interval,
            claim_lease: config.claim_lease,
            deliver_from: config.deliver_from,
            close_timeout: config.close_timeout,
        };
        let (wakeups, _) = broadcast::channel(1_024);
        Ok(Self {
            shared: Arc::new(Shared {
                pool,
                config,
                settings,
                topics: Mutex::new(HashMap::new()),
                wakeups,
            }),
        })
    }

    /// The pool, e.g. to begin the transactions [`MySqlPublisher::publish_in`] publishes in.
    pub fn pool(&self) -> &MySqlPool {
        &self.shared.pool
    }

    /// A publisher.
    pub fn publisher(&self) -> MySqlPublisher {
        MySqlPublisher {
            shared: Arc::clone(&self.shared),
            closed: AtomicBool::new(false),
        }
    }

    fn store(&self) -> Arc<dyn Store> {
        Arc::new(MySqlStore {
            shared: Arc::clone(&self.shared),
        })
    }

    /// A subscriber whose every subscription reads all of its topic.
    pub fn subscriber(&self) -> SqlSubscriber {
        SqlSubscriber::new(self.store(), None)
    }

    /// A subscriber in consumer group `group`.
    pub fn subscriber_in_group(&self, group: &str) -> Result<SqlSubscriber, InvalidGroup> {
        check_group(group)?;
        Ok(SqlSubscriber::new(self.store(), Some(group.to_owned())))
    }

    /// The largest message accepted.
    pub fn message_size_bytes_max(&self) -> usize {
        self.shared.config.message_size_bytes_max
    }

    /// Stages `messages` for `destination` on the outbox topic `outbox_topic` in the caller's
    /// transaction; [`MySqlPubSub::run_forwarder`] forwards them once it commits.
    pub async fn stage(
        &self,
        conn: &mut MySqlConnection,
        outbox_topic: &str,
        destination: &str,
        messages: Vec<Message>,
    ) -> Result<(), PublishError> {
        let messages = staged(destination, messages)?;
        self.publisher()
            .publish_in(conn, outbox_topic, messages)
            .await
    }

    /// Runs a [`Forwarder`](factline_messaging::Forwarder) from the outbox topic
    /// `outbox_topic` to `target` until `shutdown`, as the only one on the server: it first
    /// takes the named lock (`GET_LOCK`) of this database, outbox topic and group on a
    /// connection of its own (others wait, as standbys, trying every second, and take over
    /// when that connection ends — at a stop or a crash alike), so that order per key holds.
    /// While forwarding it checks every second that its connection still holds the lock; if
    /// not, it stops with [`RunForwarderError::LockLost`]. The forwarder reads the outbox as
    /// the consumer group `group`; `config.outbox_topic` is replaced by `outbox_topic`.
    pub async fn run_forwarder(
        &self,
        outbox_topic: &str,
        group: &str,
        config: ForwarderConfig,
        target: Arc<dyn Publisher>,
        shutdown: CancellationToken,
    ) -> Result<(), RunForwarderError> {
        let lock_error = |error| RunForwarderError::Lock(boxed(error));
        let subscriber: Arc<dyn Subscriber> = Arc::new(
            self.subscriber_in_group(group)
                .map_err(|error| RunForwarderError::Lock(Box::new(error)))?,
        );
        let mut conn = self
            .shared
            .pool
            .acquire()
            .await
            .map_err(lock_error)?
            .detach();
        let database: Option<String> = sqlx::query_scalar("SELECT DATABASE()")
            .fetch_one(&mut conn)
            .await
            .map_err(lock_error)?;
        let lock_name = forwarder_lock_name(database.as_deref().unwrap_or(""), outbox_topic, group);
        loop {
            let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 0)")
                .bind(&lock_name)
                .fetch_one(&mut conn)
                .await
                .map_err(lock_error)?;
            if locked == Some(1) {
                break;
            }
            if !wait_for_next_try(&shutdown).await {
                let _ = conn.close().await;
                return Ok(());
            }
        }
        let lock_lost = async {
            loop {
                tokio::time::sleep(LOCK_CHECK_INTERVAL).await;
                let held: Result<Option<i64>, _> =
                    sqlx::query_scalar("SELECT IS_USED_LOCK(?) = CONNECTION_ID()")
                        .bind(&lock_name)
                        .fetch_one(&mut conn)
                        .await;
                match held {
                    Ok(Some(1)) => {}
                    Ok(_) => return BoxError::from("the named lock is held by another session"),
                    Err(error) => return boxed(error),
                }
            }
        };
        let result = forward_while_locked(
            outbox_topic,
            group,
            config,
            subscriber,
            target,
            shutdown,
            lock_lost,
        )
        .await;
        // Ending the session releases the lock.
        let _ = conn.close().await;
        result
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.shared.pool.close().await;
    }
}

/// The name of the outbox forwarder's lock: named locks are server-wide and at most 64
/// characters, so a hash of database, outbox topic and group.
fn forwarder_lock_name(database: &str, outbox_topic: &str, group: &str) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for part in [database, outbox_topic, group] {
        hasher.update(part.len().to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut name = String::from("fl_outbox_");
    for byte in &digest[..16] {
        use std::fmt::Write as _;
        let _ = write!(name, "{byte:02x}");
    }
    name
}

/// Publishes to topic tables of a [`MySqlPubSub`].
pub struct MySqlPublisher {
    shared: Arc<Shared>,
    closed: AtomicBool,
}

impl std::fmt::Debug for MySqlPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlPublisher").finish_non_exhaustive()
    }
}

/// Rows per `INSERT` (4 values each, well below the 65,535 placeholders of a statement).
const INSERT_ROWS_MAX: usize = 1_000;

impl MySqlPublisher {
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

    /// Takes offsets under the topic row's lock (held to the end of the transaction) and
    /// inserts the rows.
    async fn insert(
        conn: &mut MySqlConnection,
        topic: &str,
        table: &str,
        rows: Rows,
    ) -> Result<(), sqlx::Error> {
        let first: i64 =
            sqlx::query_scalar("SELECT next_offset FROM fl_topics WHERE topic = ? FOR UPDATE")
                .bind(topic.as_bytes())
                .fetch_one(&mut *conn)
                .await?;
        let count = i64::try_from(rows.ids.len()).unwrap_or(i64::MAX);
        let mut offset = first;
        let mut all = rows
            .ids
            .into_iter()
            .zip(rows.payloads)
            .zip(rows.metadata)
            .peekable();
        while all.peek().is_some() {
            let chunk: Vec<_> = all.by_ref().take(INSERT_ROWS_MAX).collect();
            let mut insert: QueryBuilder<MySql> = QueryBuilder::new(format!(
                "INSERT INTO {table} (msg_offset, id, payload, metadata, published_at) "
            ));
            insert.push_values(chunk, |mut row, ((id, payload), metadata)| {
                row.push_bind(offset)
                    .push_bind(id)
                    .push_bind(payload)
                    .push_bind(metadata)
                    .push(NOW_US);
                offset += 1;
            });
            insert.build().execute(&mut *conn).await?;
        }
        sqlx::query("UPDATE fl_topics SET next_offset = ? WHERE topic = ?")
            .bind(first.saturating_add(count))
            .bind(topic.as_bytes())
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Publishes `messages` to `topic` inside the caller's transaction (pass `&mut *tx`):
    /// visible when it commits, gone if it rolls back. Until then, other publishes to the topic
    /// wait for it (offsets follow commit order).
    pub async fn publish_in(
        &self,
        conn: &mut MySqlConnection,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<(), PublishError> {
        let rows = self.rows(topic, &messages)?;
        if messages.is_empty() {
            return Ok(());
        }
        let table = self
            .shared
            .table(topic)
            .await
            .map_err(PublishError::Transport)?;
        Self::insert(conn, topic, &table, rows)
            .await
            .map_err(|error| PublishError::Transport(boxed(error)))
    }
}

#[async_trait]
impl Publisher for MySqlPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<(), PublishError> {
        let rows = self.rows(topic, &messages)?;
        if messages.is_empty() {
            return Ok(());
        }
        let table = self
            .shared
            .table(topic)
            .await
            .map_err(PublishError::Transport)?;
        let transport = |error| PublishError::Transport(boxed(error));
        let mut tx = self.shared.pool.begin().await.map_err(transport)?;
        Self::insert(&mut tx, topic, &table, rows)
            .await
            .map_err(transport)?;
        tx.commit().await.map_err(transport)?;
        let _ = self.shared.wakeups.send(table);
        Ok(())
    }

    async fn close(&self) -> Result<(), CloseError> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

struct MySqlStore {
    shared: Arc<Shared>,
}

/// Tries of a claim that InnoDB rolled back for a deadlock or a lock wait timeout.
const CLAIM_ATTEMPTS_MAX: u64 = 5;

/// A deadlock (1213) or a lock wait timeout (1205): the transaction was rolled back and may be
/// run again.
fn is_retryable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|db| matches!(db.number(), 1213 | 1205)),
        _ => false,
    }
}

fn read_row(found: &sqlx::mysql::MySqlRow) -> Result<Row, sqlx::Error> {
    Ok(Row {
        offset: found.try_get(0)?,
        id: found.try_get(1)?,
        payload: found.try_get(2)?,
        metadata: found.try_get(3)?,
    })
}

impl MySqlStore {
    fn lease_us(&self) -> i64 {
        micros(self.shared.settings.claim_lease)
    }

    async fn claim_in_one_transaction(
        &self,
        table: &str,
        group: &str,
        consumer: Uuid,
        limit: usize,
        touch: bool,
    ) -> Result<Claimed, sqlx::Error> {
        let limit_i64 = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut tx = self.shared.pool.begin().await?;
        let frontier: Option<i64> = sqlx::query_scalar(
            "SELECT frontier FROM fl_groups WHERE table_name = ? AND group_name = ? FOR UPDATE",
        )
        .bind(table)
        .bind(group.as_bytes())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(frontier) = frontier else {
            tx.rollback().await.ok();
            self.create_group(table, group)
                .await
                .map_err(|error| sqlx::Error::Protocol(error.to_string()))?;
            return Ok(Claimed {
                rows: Vec::new(),
                blocked: false,
            });
        };
        let due: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT msg_offset FROM fl_deliveries WHERE table_name = ? AND group_name = ? \
             AND due_at <= {NOW_US} ORDER BY msg_offset LIMIT ? FOR UPDATE SKIP LOCKED"
        )))
        .bind(table)
        .bind(group.as_bytes())
        .bind(limit_i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut rows = Vec::new();
        if !due.is_empty() {
            let mut take = QueryBuilder::<MySql>::new(format!(
                "UPDATE fl_deliveries SET due_at = {NOW_US} + "
            ));
            take.push_bind(self.lease_us())
                .push(", attempts = attempts + 1, consumer = ")
                .push_bind(consumer)
                .push(" WHERE table_name = ")
                .push_bind(table)
                .push(" AND group_name = ")
                .push_bind(group.as_bytes())
                .push(" AND msg_offset IN (");
            let mut list = take.separated(", ");
            for offset in &due {
                list.push_bind(*offset);
            }
            take.push(")");
            take.build().execute(&mut *tx).await?;
            let found = with_list(
                &format!(
                    "SELECT msg_offset, id, payload, metadata FROM {table} WHERE msg_offset IN "
                ),
                &due,
                " ORDER BY msg_offset",
            )
            .build()
            .fetch_all(&mut *tx)
            .await?;
            for found in &found {
                rows.push(read_row(found)?);
            }
        }
        let remaining = limit.saturating_sub(due.len());
        let mut advanced = false;
        if remaining > 0 {
            let found = sqlx::query(AssertSqlSafe(format!(
                "SELECT msg_offset, id, payload, metadata FROM {table} \
                 WHERE msg_offset > ? ORDER BY msg_offset LIMIT ?"
            )))
            .bind(frontier)
            .bind(i64::try_from(remaining).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
            if !found.is_empty() {
                let mut offsets = Vec::with_capacity(found.len());
                for found in &found {
                    let row = read_row(found)?;
                    offsets.push(row.offset);
                    rows.push(row);
                }
                let last = offsets.last().copied().unwrap_or(frontier);
                let mut insert = QueryBuilder::<MySql>::new(
                    "INSERT IGNORE INTO fl_deliveries \
                     (table_name, group_name, msg_offset, consumer, due_at) ",
                );
                let lease_us = self.lease_us();
                insert.push_values(&offsets, |mut row, offset| {
                    row.push_bind(table)
                        .push_bind(group.as_bytes())
                        .push_bind(*offset)
                        .push_bind(consumer)
                        .push(format!("{NOW_US} + {lease_us}"));
                });
                insert.build().execute(&mut *tx).await?;
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE fl_groups SET frontier = ?, touched_at = {NOW_US} \
                     WHERE table_name = ? AND group_name = ?"
                )))
                .bind(last)
                .bind(table)
                .bind(group.as_bytes())
                .execute(&mut *tx)
                .await?;
                advanced = true;
            }
        }
        if touch && !advanced {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE fl_groups SET touched_at = {NOW_US} WHERE table_name = ? AND group_name = ?"
            )))
            .bind(table)
            .bind(group.as_bytes())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Claimed {
            rows,
            blocked: false,
        })
    }
}

#[async_trait]
impl Store for MySqlStore {
    fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    async fn table(&self, topic: &str) -> Result<Arc<str>, BoxError> {
        self.shared.table(topic).await
    }

    async fn create_group(&self, table: &str, group: &str) -> Result<(), BoxError> {
        let frontier = match self.shared.settings.deliver_from {
            DeliverFrom::Oldest => "0".to_owned(),
            // Every row committed so far (offsets follow commit order).
            DeliverFrom::New => format!("COALESCE((SELECT max(msg_offset) FROM {table}), 0)"),
        };
        sqlx::query(AssertSqlSafe(format!(
            "INSERT IGNORE INTO fl_groups (table_name, group_name, frontier, touched_at) \
             VALUES (?, ?, {frontier}, {NOW_US})"
        )))
        .bind(table)
        .bind(group.as_bytes())
        .execute(&self.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(())
    }

    async fn remove_abandoned_private_groups(&self) -> Result<(), BoxError> {
        let idle_us = micros(self.shared.config.private_group_idle_max);
        let mut tx = self.shared.pool.begin().await.map_err(boxed)?;
        sqlx::query(AssertSqlSafe(format!(
            "DELETE d FROM fl_deliveries d JOIN fl_groups g \
             ON d.table_name = g.table_name AND d.group_name = g.group_name \
             WHERE g.group_name LIKE 's:%' AND g.touched_at < {NOW_US} - ?"
        )))
        .bind(idle_us)
        .execute(&mut *tx)
        .await
        .map_err(boxed)?;
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM fl_groups WHERE group_name LIKE 's:%' AND touched_at < {NOW_US} - ?"
        )))
        .bind(idle_us)
        .execute(&mut *tx)
        .await
        .map_err(boxed)?;
        tx.commit().await.map_err(boxed)
    }

    async fn claim(
        &self,
        table: &str,
        group: &str,
        consumer: Uuid,
        limit: usize,
        touch: bool,
    ) -> Result<Claimed, BoxError> {
        // InnoDB resolves lock cycles (a claim against another member's claim or an ack) by
        // rolling one transaction back; that one is simply tried again.
        let mut attempt = 0;
        loop {
            match self
                .claim_in_one_transaction(table, group, consumer, limit, touch)
                .await
            {
                Err(error) if attempt < CLAIM_ATTEMPTS_MAX && is_retryable(&error) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(5 * attempt)).await;
                }
                other => return other.map_err(boxed),
            }
        }
    }

    async fn ack(&self, table: &str, group: &str, offsets: &[i64]) -> Result<(), BoxError> {
        for chunk in offsets.chunks(1_000) {
            let mut delete =
                QueryBuilder::<MySql>::new("DELETE FROM fl_deliveries WHERE table_name = ");
            delete
                .push_bind(table)
                .push(" AND group_name = ")
                .push_bind(group.as_bytes())
                .push(" AND msg_offset IN (");
            let mut list = delete.separated(", ");
            for offset in chunk {
                list.push_bind(*offset);
            }
            delete.push(")");
            delete
                .build()
                .execute(&self.shared.pool)
                .await
                .map_err(boxed)?;
        }
        Ok(())
    }

    async fn nack(
        &self,
        table: &str,
        group: &str,
        offset: i64,
        consumer: Uuid,
        delay: Duration,
    ) -> Result<(), BoxError> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE fl_deliveries SET consumer = NULL, due_at = {NOW_US} + ? \
             WHERE table_name = ? AND group_name = ? AND msg_offset = ? AND consumer = ?"
        )))
        .bind(micros(delay))
        .bind(table)
        .bind(group.as_bytes())
        .bind(offset)
        .bind(consumer)
        .execute(&self.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(())
    }

    async fn handover(&self, consumer: Uuid) -> Result<(), BoxError> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE fl_deliveries SET consumer = NULL, due_at = {NOW_US} WHERE consumer = ?"
        )))
        .bind(consumer)
        .execute(&self.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(())
    }

    async fn drop_group(&self, table: &str, group: &str) -> Result<(), BoxError> {
        let mut tx = self.shared.pool.begin().await.map_err(boxed)?;
        for statement in [
            "DELETE FROM fl_deliveries WHERE table_name = ? AND group_name = ?",
            "DELETE FROM fl_groups WHERE table_name = ? AND group_name = ?",
        ] {
            sqlx::query(statement)
                .bind(table)
                .bind(group.as_bytes())
                .execute(&mut *tx)
                .await
                .map_err(boxed)?;
        }
        tx.commit().await.map_err(boxed)
    }

    async fn renew(&self, consumers: &[Uuid]) -> Result<(), BoxError> {
        let mut renew =
            QueryBuilder::<MySql>::new(format!("UPDATE fl_deliveries SET due_at = {NOW_US} + "));
        renew
            .push_bind(self.lease_us())
            .push(" WHERE consumer IN (");
        let mut list = renew.separated(", ");
        for consumer in consumers {
            list.push_bind(*consumer);
        }
        renew.push(")");
        renew
            .build()
            .execute(&self.shared.pool)
            .await
            .map_err(boxed)?;
        Ok(())
    }

    fn wakeups(&self) -> broadcast::Receiver<Arc<str>> {
        self.shared.wakeups.subscribe()
    }

    fn id_prefix(&self) -> &'static str {
        "mysql"
    }
}
