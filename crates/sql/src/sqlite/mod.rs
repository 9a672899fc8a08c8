//! Pub/sub on SQLite: the tables and the subscriber of [`crate::postgres`], for one database
//! file shared by the processes of one machine.
//!
//! SQLite lets one transaction write at a time, and a row's offset (`INTEGER PRIMARY KEY
//! AUTOINCREMENT`) is taken while its transaction holds that lock: offsets are in commit order,
//! so a group that reads past its frontier by offset never skips a row that commits late. Claims
//! and publishes begin with `BEGIN IMMEDIATE` (the write lock first, so that two transactions
//! never both read and then fail to upgrade). There is no `LISTEN`: subscriptions in the process
//! that published are woken at once; others look every
//! [`SqlitePubSubConfig::poll_interval`].

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
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, QueryBuilder, Row as _, Sqlite};
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
pub use dedup::SqliteDedupStore;

/// Settings of a [`SqlitePubSub`]; every value is checked by [`SqlitePubSub::connect`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqlitePubSubConfig {
    /// The database, e.g. `sqlite:/var/lib/app/messages.db` (made when missing).
    pub url: String,
    /// How long opening may take. Default 5 s.
    pub connect_timeout: Duration,
    /// How long a statement waits for another process's write lock. Default 5 s.
    pub busy_timeout: Duration,
    /// Connections in the pool. Default 4.
    pub pool_connections_max: u32,
    /// Largest message accepted (payload, id and metadata). Default 1 MiB.
    pub message_size_bytes_max: usize,
    /// Messages per publish call at most. Default 10,000.
    pub publish_messages_max: usize,
    /// Unsettled deliveries per subscription. Default 1,024.
    pub in_flight_max: usize,
    /// Rows claimed per transaction. Default 256.
    pub fetch_batch: usize,
    /// How often a subscription looks for rows it was not told of. Default 100 ms.
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

impl SqlitePubSubConfig {
    /// The defaults, for the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect_timeout: Duration::from_secs(5),
            busy_timeout: Duration::from_secs(5),
            pool_connections_max: 4,
            message_size_bytes_max: 1 << 20,
            publish_messages_max: 10_000,
            in_flight_max: 1_024,
            fetch_batch: 256,
            poll_interval: Duration::from_millis(100),
            claim_lease: Duration::from_secs(30),
            deliver_from: DeliverFrom::Oldest,
            private_group_idle_max: Duration::from_secs(3_600),
            close_timeout: Duration::from_secs(5),
        }
    }

    /// Builder: see [`SqlitePubSubConfig::claim_lease`].
    #[must_use]
    pub fn claim_lease(mut self, lease: Duration) -> Self {
        self.claim_lease = lease;
        self
    }

    /// Builder: see [`SqlitePubSubConfig::poll_interval`].
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    fn check(&self) -> Result<(), ConnectError> {
        check_settings(
            &[
                ("connect_timeout", self.connect_timeout),
                ("busy_timeout", self.busy_timeout),
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

/// Why [`SqlitePubSub::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// A setting cannot work.
    #[error("invalid SQLite pub/sub setting {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL is not a SQLite URL, or the file cannot be opened or made.
    #[error("cannot open SQLite database {url}: {source}")]
    Open {
        /// The database.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Opening took longer than [`SqlitePubSubConfig::connect_timeout`].
    #[error("opening SQLite database {url} took over {timeout_ms} ms")]
    TimedOut {
        /// The database.
        url: String,
        /// The limit.
        timeout_ms: u64,
    },
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX)
        })
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// Offsets as a JSON array, for `json_each`.
fn json_offsets(offsets: &[i64]) -> String {
    serde_json::to_string(offsets).unwrap_or_else(|_| "[]".to_owned())
}

struct Shared {
    pool: SqlitePool,
    config: SqlitePubSubConfig,
    settings: Settings,
    /// Topics whose table is known to exist.
    topics: Mutex<HashMap<String, Arc<str>>>,
    wakeups: broadcast::Sender<Arc<str>>,
}

impl Shared {
    fn known(&self, topic: &str) -> Option<Arc<str>> {
        self.topics.lock().ok().and_then(|t| t.get(topic).cloned())
    }

    /// The topic's table, made in a transaction of its own when this process has not seen it.
    async fn table(&self, topic: &str) -> Result<Arc<str>, BoxError> {
        if let Some(known) = self.known(topic) {
            return Ok(known);
        }
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(boxed)?;
        let table = make_table(&mut tx, topic).await.map_err(boxed)?;
        tx.commit().await.map_err(boxed)?;
        let table: Arc<str> = Arc::from(table);
        if let Ok(mut topics) = self.topics.lock() {
            topics.insert(topic.to_owned(), Arc::clone(&table));
        }
        Ok(table)
    }
}

/// Registers `topic` and makes its table unless they exist, on `conn` (inside whatever
/// transaction it is in: SQLite's DDL is transactional, and a second connection would wait for
/// the write lock this one may hold).
async fn make_table(conn: &mut SqliteConnection, topic: &str) -> Result<String, sqlx::Error> {
    let table = table_for_topic(topic);
    sqlx::query(
        "INSERT INTO fl_topics (topic, table_name, created_at) VALUES (?, ?, ?) \
         ON CONFLICT (topic) DO NOTHING",
    )
    .bind(topic)
    .bind(&table)
    .bind(now_micros())
    .execute(&mut *conn)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            msg_offset INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL,
            payload BLOB NOT NULL,
            metadata TEXT,
            published_at INTEGER NOT NULL
        )"
    )))
    .execute(&mut *conn)
    .await?;
    Ok(table)
}

/// Pub/sub on one SQLite database. Cheap to clone.
#[derive(Clone)]
pub struct SqlitePubSub {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SqlitePubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlitePubSub")
            .field("url", &self.shared.config.url)
            .finish_non_exhaustive()
    }
}

impl SqlitePubSub {
    /// Checks the settings, opens (or makes) the database in WAL mode with full syncs, and
    /// makes the shared tables when missing.
    pub async fn connect(config: SqlitePubSubConfig) -> Result<Self, ConnectError> {
        config.check()?;
        let url = config.url.clone();
        let open_error = |source| ConnectError::Open {
            url: url.clone(),
            source,
        };
        let options = SqliteConnectOptions::from_str(&config.url)
            .map_err(open_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(config.busy_timeout);
        let open = async {
            let pool = SqlitePoolOptions::new()
                .max_connections(config.pool_connections_max)
                .acquire_timeout(config.connect_timeout)
                .connect_with(options)
                .await?;
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            for statement in [
                "CREATE TABLE IF NOT EXISTS fl_topics (
                    topic TEXT PRIMARY KEY,
                    table_name TEXT NOT NULL UNIQUE,
                    created_at INTEGER NOT NULL
                )",
                "CREATE TABLE IF NOT EXISTS fl_groups (
                    table_name TEXT NOT NULL,
                    group_name TEXT NOT NULL,
                    frontier INTEGER NOT NULL,
                    touched_at INTEGER NOT NULL,
                    PRIMARY KEY (table_name, group_name)
                )",
                "CREATE TABLE IF NOT EXISTS fl_deliveries (
                    table_name TEXT NOT NULL,
                    group_name TEXT NOT NULL,
                    msg_offset INTEGER NOT NULL,
                    consumer BLOB,
                    due_at INTEGER NOT NULL,
                    attempts INTEGER NOT NULL DEFAULT 1,
                    PRIMARY KEY (table_name, group_name, msg_offset)
                )",
                "CREATE INDEX IF NOT EXISTS fl_deliveries_consumer ON fl_deliveries (consumer)",
                "CREATE TABLE IF NOT EXISTS fl_dedup (
                    scope TEXT NOT NULL,
                    dkey TEXT NOT NULL,
                    done INTEGER NOT NULL,
                    at_us INTEGER NOT NULL,
                    PRIMARY KEY (scope, dkey)
                )",
                "CREATE TABLE IF NOT EXISTS fl_forwarders (
                    name TEXT PRIMARY KEY,
                    owner BLOB NOT NULL,
                    expires_at INTEGER NOT NULL
                )",
            ] {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(pool)
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

    /// The pool, e.g. to begin the transactions [`SqlitePublisher::publish_in`] publishes in
    /// (begin them with `BEGIN IMMEDIATE`: `pool().begin_with("BEGIN IMMEDIATE")`).
    pub fn pool(&self) -> &SqlitePool {
        &self.shared.pool
    }

    /// A publisher.
    pub fn publisher(&self) -> SqlitePublisher {
        SqlitePublisher {
            shared: Arc::clone(&self.shared),
            closed: AtomicBool::new(false),
        }
    }

    fn store(&self) -> Arc<dyn Store> {
        Arc::new(SqliteStore {
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
    /// transaction; [`SqlitePubSub::run_forwarder`] forwards them once it commits.
    pub async fn stage(
        &self,
        conn: &mut SqliteConnection,
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
    /// `outbox_topic` to `target` until `shutdown`, as the only one on the database: it first
    /// takes the lease row of this outbox topic and group in `fl_forwarders` (others wait, as
    /// standbys, trying every second; a stop gives the lease up at once, a crash after
    /// [`SqlitePubSubConfig::claim_lease`]), so that order per key holds. While forwarding it
    /// renews the lease every second (or every third of the lease, if shorter); when the lease
    /// was taken over (not renewed in time) it stops with [`RunForwarderError::LockLost`]. The
    /// forwarder reads the outbox as the consumer group `group`; `config.outbox_topic` is
    /// replaced by `outbox_topic`.
    pub async fn run_forwarder(
        &self,
        outbox_topic: &str,
        group: &str,
        config: ForwarderConfig,
        target: Arc<dyn Publisher>,
        shutdown: CancellationToken,
    ) -> Result<(), RunForwarderError> {
        let subscriber: Arc<dyn Subscriber> = Arc::new(
            self.subscriber_in_group(group)
                .map_err(|error| RunForwarderError::Lock(Box::new(error)))?,
        );
        let pool = &self.shared.pool;
        let lease = self.shared.config.claim_lease;
        let name = serde_json::json!([outbox_topic, group]).to_string();
        let owner = Uuid::now_v7();
        loop {
            let now = now_micros();
            let taken = sqlx::query(
                "INSERT INTO fl_forwarders (name, owner, expires_at) VALUES (?1, ?2, ?3)                  ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,                      expires_at = excluded.expires_at                  WHERE fl_forwarders.expires_at < ?4 OR fl_forwarders.owner = excluded.owner",
            )
            .bind(&name)
            .bind(owner)
            .bind(now.saturating_add(micros(lease)))
            .bind(now)
            .execute(pool)
            .await
            .map_err(|error| RunForwarderError::Lock(boxed(error)))?;
            if taken.rows_affected() == 1 {
                break;
            }
            if !wait_for_next_try(&shutdown).await {
                return Ok(());
            }
        }
        let renew_every = LOCK_CHECK_INTERVAL.min(lease / 3);
        let lock_lost = async {
            let mut renewed_at = now_micros();
            loop {
                tokio::time::sleep(renew_every).await;
                let now = now_micros();
                let renewed = sqlx::query(
                    "UPDATE fl_forwarders SET expires_at = ?1 WHERE name = ?2 AND owner = ?3",
                )
                .bind(now.saturating_add(micros(lease)))
                .bind(&name)
                .bind(owner)
                .execute(pool)
                .await;
                match renewed {
                    Ok(done) if done.rows_affected() == 1 => renewed_at = now,
                    Ok(_) => {
                        return BoxError::from(
                            "the forwarder's lease was taken over by another forwarder",
                        );
                    }
                    // A busy database: the lease still holds until it runs out.
                    Err(error) if now.saturating_sub(renewed_at) < micros(lease) => {
                        tracing::warn!(%error, "renewing the outbox forwarder's lease failed");
                    }
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
        // Give the lease up at once, for a standby.
        let _ = sqlx::query("DELETE FROM fl_forwarders WHERE name = ?1 AND owner = ?2")
            .bind(&name)
            .bind(owner)
            .execute(pool)
            .await;
        result
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.shared.pool.close().await;
    }
}

/// Publishes to topic tables of a [`SqlitePubSub`].
pub struct SqlitePublisher {
    shared: Arc<Shared>,
    closed: AtomicBool,
}

impl std::fmt::Debug for SqlitePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlitePublisher").finish_non_exhaustive()
    }
}

/// Rows per `INSERT` (4 values each, below SQLite's limit of bound values).
const INSERT_ROWS_MAX: usize = 1_000;

impl SqlitePublisher {
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
        conn: &mut SqliteConnection,
        table: &str,
        rows: Rows,
    ) -> Result<(), sqlx::Error> {
        let at = now_micros();
        let mut all = rows
            .ids
            .into_iter()
            .zip(rows.payloads)
            .zip(rows.metadata)
            .peekable();
        while all.peek().is_some() {
            let chunk: Vec<_> = all.by_ref().take(INSERT_ROWS_MAX).collect();
            let mut insert: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
                "INSERT INTO {table} (id, payload, metadata, published_at) "
            ));
            insert.push_values(chunk, |mut row, ((id, payload), metadata)| {
                row.push_bind(id)
                    .push_bind(payload)
                    .push_bind(metadata)
                    .push_bind(at);
            });
            insert.build().execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// Publishes `messages` to `topic` inside the caller's transaction (begun with
    /// `BEGIN IMMEDIATE`; pass `&mut *tx`): visible when it commits, gone if it rolls back.
    pub async fn publish_in(
        &self,
        conn: &mut SqliteConnection,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<(), PublishError> {
        let rows = self.rows(topic, &messages)?;
        if messages.is_empty() {
            return Ok(());
        }
        let transport = |error| PublishError::Transport(boxed(error));
        // An unknown topic's table is made in the caller's transaction (and not remembered:
        // it is gone if that rolls back).
        let table: Arc<str> = match self.shared.known(topic) {
            Some(table) => table,
            None => Arc::from(make_table(conn, topic).await.map_err(transport)?),
        };
        Self::insert(conn, &table, rows).await.map_err(transport)
    }
}

#[async_trait]
impl Publisher for SqlitePublisher {
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
        let mut tx = self
            .shared
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(transport)?;
        Self::insert(&mut tx, &table, rows)
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

struct SqliteStore {
    shared: Arc<Shared>,
}

impl SqliteStore {
    async fn claim_in_one_transaction(
        &self,
        table: &str,
        group: &str,
        consumer: Uuid,
        limit: usize,
        touch: bool,
    ) -> Result<Claimed, sqlx::Error> {
        let now = now_micros();
        let lease_until = now.saturating_add(micros(self.shared.settings.claim_lease));
        let limit_i64 = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut tx = self.shared.pool.begin_with("BEGIN IMMEDIATE").await?;
        let frontier: Option<i64> = sqlx::query_scalar(
            "SELECT frontier FROM fl_groups WHERE table_name = ? AND group_name = ?",
        )
        .bind(table)
        .bind(group)
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
        let due: Vec<i64> = sqlx::query_scalar(
            "UPDATE fl_deliveries SET consumer = ?, due_at = ?, attempts = attempts + 1 \
             WHERE table_name = ? AND group_name = ? AND msg_offset IN \
               (SELECT msg_offset FROM fl_deliveries WHERE table_name = ? AND group_name = ? \
                AND due_at <= ? ORDER BY msg_offset LIMIT ?) \
             RETURNING msg_offset",
        )
        .bind(consumer)
        .bind(lease_until)
        .bind(table)
        .bind(group)
        .bind(table)
        .bind(group)
        .bind(now)
        .bind(limit_i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut rows = Vec::new();
        let read = |found: &sqlx::sqlite::SqliteRow| -> Result<Row, sqlx::Error> {
            Ok(Row {
                offset: found.try_get(0)?,
                id: found.try_get(1)?,
                payload: found.try_get(2)?,
                metadata: found.try_get(3)?,
            })
        };
        if !due.is_empty() {
            let found = sqlx::query(AssertSqlSafe(format!(
                "SELECT msg_offset, id, payload, metadata FROM {table} \
                 WHERE msg_offset IN (SELECT value FROM json_each(?)) ORDER BY msg_offset"
            )))
            .bind(json_offsets(&due))
            .fetch_all(&mut *tx)
            .await?;
            for found in &found {
                rows.push(read(found)?);
            }
            if rows.len() < due.len() {
                let present: std::collections::HashSet<i64> =
                    rows.iter().map(|row| row.offset).collect();
                let gone: Vec<i64> = due
                    .iter()
                    .copied()
                    .filter(|offset| !present.contains(offset))
                    .collect();
                sqlx::query(
                    "DELETE FROM fl_deliveries WHERE table_name = ? AND group_name = ? \
                     AND msg_offset IN (SELECT value FROM json_each(?))",
                )
                .bind(table)
                .bind(group)
                .bind(json_offsets(&gone))
                .execute(&mut *tx)
                .await?;
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
                    let row = read(found)?;
                    offsets.push(row.offset);
                    rows.push(row);
                }
                let last = offsets.last().copied().unwrap_or(frontier);
                sqlx::query(
                    "INSERT OR IGNORE INTO fl_deliveries \
                     (table_name, group_name, msg_offset, consumer, due_at) \
                     SELECT ?, ?, value, ?, ? FROM json_each(?)",
                )
                .bind(table)
                .bind(group)
                .bind(consumer)
                .bind(lease_until)
                .bind(json_offsets(&offsets))
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE fl_groups SET frontier = ?, touched_at = ? \
                     WHERE table_name = ? AND group_name = ?",
                )
                .bind(last)
                .bind(now)
                .bind(table)
                .bind(group)
                .execute(&mut *tx)
                .await?;
                advanced = true;
            }
        }
        if touch && !advanced {
            sqlx::query(
                "UPDATE fl_groups SET touched_at = ? WHERE table_name = ? AND group_name = ?",
            )
            .bind(now)
            .bind(table)
            .bind(group)
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
impl Store for SqliteStore {
    fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    async fn table(&self, topic: &str) -> Result<Arc<str>, BoxError> {
        self.shared.table(topic).await
    }

    async fn create_group(&self, table: &str, group: &str) -> Result<(), BoxError> {
        let frontier = match self.shared.settings.deliver_from {
            DeliverFrom::Oldest => "0",
            DeliverFrom::New => {
                // Every row committed so far (the write lock orders commits).
                "COALESCE((SELECT max(msg_offset) FROM {table}), 0)"
            }
        };
        let frontier = frontier.replace("{table}", table);
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO fl_groups (table_name, group_name, frontier, touched_at) \
             VALUES (?, ?, {frontier}, ?) ON CONFLICT DO NOTHING"
        )))
        .bind(table)
        .bind(group)
        .bind(now_micros())
        .execute(&self.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(())
    }

    async fn remove_abandoned_private_groups(&self) -> Result<(), BoxError> {
        let cutoff = now_micros().saturating_sub(micros(self.shared.config.private_group_idle_max));
        let mut tx = self
            .shared
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(boxed)?;
        sqlx::query(
            "DELETE FROM fl_deliveries WHERE (table_name, group_name) IN \
             (SELECT table_name, group_name FROM fl_groups \
              WHERE group_name LIKE 's:%' AND touched_at < ?)",
        )
        .bind(cutoff)
        .execute(&mut *tx)
        .await
        .map_err(boxed)?;
        sqlx::query("DELETE FROM fl_groups WHERE group_name LIKE 's:%' AND touched_at < ?")
            .bind(cutoff)
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
        self.claim_in_one_transaction(table, group, consumer, limit, touch)
            .await
            .map_err(boxed)
    }

    async fn ack(&self, table: &str, group: &str, offsets: &[i64]) -> Result<(), BoxError> {
        sqlx::query(
            "DELETE FROM fl_deliveries WHERE table_name = ? AND group_name = ? \
             AND msg_offset IN (SELECT value FROM json_each(?))",
        )
        .bind(table)
        .bind(group)
        .bind(json_offsets(offsets))
        .execute(&self.shared.pool)
        .await
        .map_err(boxed)?;
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
        sqlx::query(
            "UPDATE fl_deliveries SET consumer = NULL, due_at = ? \
             WHERE table_name = ? AND group_name = ? AND msg_offset = ? AND consumer = ?",
        )
        .bind(now_micros().saturating_add(micros(delay)))
        .bind(table)
        .bind(group)
        .bind(offset)
        .bind(consumer)
        .execute(&self.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(())
    }

    async fn handover(&self, consumer: Uuid) -> Result<(), BoxError> {
        sqlx::query("UPDATE fl_deliveries SET consumer = NULL, due_at = ? WHERE consumer = ?")
            .bind(now_micros())
            .bind(consumer)
            .execute(&self.shared.pool)
            .await
            .map_err(boxed)?;
        Ok(())
    }

    async fn drop_group(&self, table: &str, group: &str) -> Result<(), BoxError> {
        let mut tx = self
            .shared
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(boxed)?;
        for statement in [
            "DELETE FROM fl_deliveries WHERE table_name = ? AND group_name = ?",
            "DELETE FROM fl_groups WHERE table_name = ? AND group_name = ?",
        ] {
            sqlx::query(statement)
                .bind(table)
                .bind(group)
                .execute(&mut *tx)
                .await
                .map_err(boxed)?;
        }
        tx.commit().await.map_err(boxed)
    }

    async fn renew(&self, consumers: &[Uuid]) -> Result<(), BoxError> {
        let lease_until = now_micros().saturating_add(micros(self.shared.settings.claim_lease));
        let mut renew: QueryBuilder<Sqlite> =
            QueryBuilder::new("UPDATE fl_deliveries SET due_at = ");
        renew.push_bind(lease_until).push(" WHERE consumer IN (");
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
        "sqlite"
    }
}
