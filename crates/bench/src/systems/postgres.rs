//! PostgreSQL through sqlx 0.9: one table with a `bigserial` position and
//! `UNIQUE (stream, revision)`, `synchronous_commit=on` set on every session, a fresh schema per
//! run (dropped at the end).
//!
//! An append is one statement: it reads the stream's last revision, inserts the next revisions
//! only if that is the expected one, and reports both. Two racing appends that read the same
//! revision collide on the unique index (SQLSTATE 23505): a conflict. Both are honest
//! expected-version checks and leave no gap.
//!
//! W6 uses LISTEN/NOTIFY: while a subscription is open, appends also `pg_notify` in the same
//! statement (delivered at commit); the subscriber wakes on the notification and reads the new
//! rows. Caveat: a `bigserial` position is assigned at insert, not at commit, so with
//! concurrent writers a reader can see a later position before an earlier one commits (and
//! skip it). W6 has a single writer, so it is not affected; a real store on this design
//! needs more than this.

use std::{
    str::FromStr as _,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use sqlx::{
    AssertSqlSafe, Connection as _, PgPool, Row as _,
    postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions, PgRow},
};

pub(crate) use factline_postgres::redact_url;

use super::{
    EVENT_TYPE, Expected, Feed, Outcome, SetupContext, System, is_unique_violation, json_payload,
    postgres_connection_cap,
};
use crate::config::{SystemKind, WorkloadKind};

/// Waiting for a pooled connection longer than this is an error.
pub(crate) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

struct Sql {
    append: Arc<str>,
    append_notify: Arc<str>,
    version: Arc<str>,
    read: Arc<str>,
    scan: Arc<str>,
    head: Arc<str>,
}

impl Sql {
    fn new(table: &str, channel: &str) -> Self {
        let append_with = |notify: &str, notified: &str| -> Arc<str> {
            format!(
                "WITH cur AS (
                     SELECT coalesce(max(revision), -1) AS r FROM {table} WHERE stream = $1
                 ),
                 ins AS (
                     INSERT INTO {table} (stream, revision, type, data)
                     SELECT $1, cur.r + d.ord, $3, d.data
                     FROM cur, unnest($4::bytea[]) WITH ORDINALITY AS d(data, ord)
                     WHERE cur.r = $2
                     RETURNING position
                 ){notify}
                 SELECT (SELECT r FROM cur) AS current, (SELECT count(*) FROM ins) AS inserted{notified}"
            )
            .into()
        };
        Self {
            append: append_with("", ""),
            append_notify: append_with(
                &format!(
                    ",
                 n AS (
                     SELECT pg_notify('{channel}', max(position)::text) FROM ins HAVING count(*) > 0
                 )"
                ),
                ", (SELECT count(*) FROM n) AS notified",
            ),
            version: format!("SELECT coalesce(max(revision), -1) FROM {table} WHERE stream = $1")
                .into(),
            read: format!(
                "SELECT position, revision, type, data FROM {table} WHERE stream = $1 ORDER BY revision"
            )
            .into(),
            scan: format!(
                "SELECT position, revision, type, data, stream FROM {table}
                 WHERE position > $1 ORDER BY position LIMIT $2"
            )
            .into(),
            head: format!("SELECT coalesce(max(position), 0) FROM {table}").into(),
        }
    }
}

/// Server facts every PostgreSQL-backed system checks before it runs.
pub(crate) struct ServerFacts {
    pub(crate) version: String,
    pub(crate) wal_sync_method: String,
    pub(crate) cap: usize,
}

async fn show(conn: &mut PgConnection, name: &str) -> Result<String> {
    sqlx::query_scalar(AssertSqlSafe(format!("SHOW {name}")))
        .fetch_one(conn)
        .await
        .with_context(|| format!("SHOW {name}"))
}

/// Checks that the server's acknowledgements mean fsynced and how many connections it allows.
pub(crate) async fn server_facts(conn: &mut PgConnection) -> Result<ServerFacts> {
    let fsync = show(conn, "fsync").await?;
    let synchronous_commit = show(conn, "synchronous_commit").await?;
    if fsync != "on" {
        bail!("the server runs with fsync={fsync}: its acknowledgements are not durable");
    }
    if synchronous_commit != "on" {
        bail!(
            "synchronous_commit is {synchronous_commit} on the session although it was set to on"
        );
    }
    let max_connections: i64 = show(conn, "max_connections").await?.parse()?;
    let reserved: i64 = show(conn, "superuser_reserved_connections")
        .await?
        .parse()?;
    let in_use: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity")
        .fetch_one(&mut *conn)
        .await?;
    Ok(ServerFacts {
        version: show(conn, "server_version").await?,
        wal_sync_method: show(conn, "wal_sync_method").await?,
        cap: postgres_connection_cap(max_connections, reserved, in_use),
    })
}

/// Connects with a bound, turning "unreachable" into a clear error.
pub(crate) async fn connect(
    options: &PgConnectOptions,
    url: &str,
    timeout: Duration,
) -> Result<PgConnection> {
    match tokio::time::timeout(timeout, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(error)) => Err(anyhow!(
            "PostgreSQL at {} is unreachable: {error}",
            redact_url(url)
        )),
        Err(_) => Err(anyhow!(
            "PostgreSQL at {} did not answer within {}s",
            redact_url(url),
            timeout.as_secs()
        )),
    }
}

/// See the module docs.
pub(crate) struct PgSystem {
    options: PgConnectOptions,
    url: String,
    schema: String,
    channel: String,
    cap: usize,
    pool: RwLock<Option<PgPool>>,
    notify: Arc<AtomicBool>,
    sql: Arc<Sql>,
    payload: Bytes,
    page: i64,
    connect_timeout: Duration,
    description: String,
}

impl PgSystem {
    pub(crate) async fn open(ctx: &SetupContext<'_>) -> Result<Self> {
        let options = PgConnectOptions::from_str(ctx.postgres_url)
            .with_context(|| format!("bad PostgreSQL URL {}", redact_url(ctx.postgres_url)))?
            .options([("synchronous_commit", "on")])
            .application_name("factline-bench");
        let timeout = ctx.sizes.connect_timeout;
        let mut conn = connect(&options, ctx.postgres_url, timeout).await?;
        let facts = server_facts(&mut conn).await?;
        let schema = format!("bench_{}_pg", ctx.run_id);
        let table = format!("{schema}.events");
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("create schema {schema}"))?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {table} (
                position bigserial PRIMARY KEY,
                stream text NOT NULL,
                revision bigint NOT NULL,
                type text NOT NULL,
                data bytea NOT NULL,
                UNIQUE (stream, revision)
            )"
        )))
        .execute(&mut conn)
        .await
        .context("create table")?;
        conn.close().await.ok();
        let channel = format!("bench_{}", ctx.run_id);
        Ok(Self {
            sql: Arc::new(Sql::new(&table, &channel)),
            description: format!(
                "PostgreSQL {} (fsync=on, wal_sync_method={}), synchronous_commit=on per session, \
                 schema {schema}, one statement per append, pool = writers (at most {})",
                facts.version, facts.wal_sync_method, facts.cap
            ),
            options,
            url: ctx.postgres_url.to_owned(),
            schema,
            channel,
            cap: facts.cap,
            pool: RwLock::new(None),
            notify: Arc::new(AtomicBool::new(false)),
            payload: json_payload(),
            page: i64::try_from(ctx.sizes.read_page).unwrap_or(10_000),
            connect_timeout: timeout,
        })
    }

    fn pool(&self) -> Result<PgPool> {
        self.pool
            .read()
            .map_err(|_| anyhow!("pool lock poisoned"))?
            .clone()
            .ok_or_else(|| anyhow!("postgres: no pool (prepare was not called)"))
    }

    fn take_pool(&self) -> Result<Option<PgPool>> {
        Ok(self
            .pool
            .write()
            .map_err(|_| anyhow!("pool lock poisoned"))?
            .take())
    }
}

/// A pool of exactly `size` open connections, each checked for `synchronous_commit=on`.
pub(crate) async fn warm_pool(options: &PgConnectOptions, size: u32) -> Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .idle_timeout(None)
        .max_lifetime(None)
        .test_before_acquire(false)
        .connect_lazy_with(options.clone());
    let mut connections = Vec::with_capacity(size as usize);
    for _ in 0..size {
        let mut conn = pool.acquire().await.context("open pool connection")?;
        let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
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

#[async_trait]
impl System for PgSystem {
    fn kind(&self) -> SystemKind {
        SystemKind::Postgres
    }

    fn not_applicable(&self, _workload: WorkloadKind) -> Option<&'static str> {
        None
    }

    async fn prepare(&self, writers: usize) -> Result<()> {
        self.release().await?;
        let size = u32::try_from(writers.clamp(1, self.cap)).unwrap_or(1);
        let pool = tokio::time::timeout(ACQUIRE_TIMEOUT, warm_pool(&self.options, size))
            .await
            .map_err(|_| anyhow!("opening {size} connections took over 30s"))??;
        *self
            .pool
            .write()
            .map_err(|_| anyhow!("pool lock poisoned"))? = Some(pool);
        Ok(())
    }

    async fn release(&self) -> Result<()> {
        if let Some(pool) = self.take_pool()? {
            tokio::time::timeout(Duration::from_secs(10), pool.close())
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

    async fn append(&self, stream: &str, expected: Expected, count: usize) -> Result<Outcome> {
        let pool = self.pool()?;
        let sql = if self.notify.load(Ordering::Relaxed) {
            &self.sql.append_notify
        } else {
            &self.sql.append
        };
        let data: Vec<&[u8]> = vec![self.payload.as_ref(); count];
        let result = sqlx::query(AssertSqlSafe(Arc::clone(sql)))
            .bind(stream)
            .bind(expected.as_sql())
            .bind(EVENT_TYPE)
            .bind(data)
            .fetch_one(&pool)
            .await;
        match result {
            Ok(row) => {
                let current: i64 = row.try_get(0)?;
                let inserted: i64 = row.try_get(1)?;
                if inserted == count as i64 {
                    Ok(Outcome::Written)
                } else if inserted == 0 {
                    Ok(Outcome::Conflict {
                        actual: Some(Expected::from_sql(current)),
                    })
                } else {
                    bail!("inserted {inserted} of {count} events: not atomic")
                }
            }
            Err(error) if is_unique_violation(&error) => Ok(Outcome::Conflict { actual: None }),
            Err(error) => Err(error.into()),
        }
    }

    async fn stream_version(&self, stream: &str) -> Result<Expected> {
        let current: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.version)))
            .bind(stream)
            .fetch_one(&self.pool()?)
            .await?;
        Ok(Expected::from_sql(current))
    }

    async fn read_stream(&self, stream: &str) -> Result<u64> {
        let rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.read)))
            .bind(stream)
            .fetch_all(&self.pool()?)
            .await?;
        for row in &rows {
            decode_row(row)?;
        }
        Ok(rows.len() as u64)
    }

    async fn scan_all(&self, max_events: u64) -> Result<u64> {
        let pool = self.pool()?;
        let mut after: i64 = 0;
        let mut count: u64 = 0;
        while count < max_events {
            let limit = self
                .page
                .min(i64::try_from(max_events - count).unwrap_or(i64::MAX));
            let rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.scan)))
                .bind(after)
                .bind(limit)
                .fetch_all(&pool)
                .await?;
            for row in &rows {
                after = decode_scan_row(row)?;
            }
            count += rows.len() as u64;
            if (rows.len() as i64) < limit {
                break;
            }
        }
        Ok(count)
    }

    async fn subscribe(&self) -> Result<Box<dyn Feed>> {
        // The listener holds its own connection (a pool of one, as PgListener wants).
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.connect_timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .test_before_acquire(false)
            .connect_with(self.options.clone())
            .await
            .with_context(|| format!("listener connection to {}", redact_url(&self.url)))?;
        let mut listener = PgListener::connect_with(&listen_pool).await?;
        listener.listen(&self.channel).await?;
        // From here on appends notify; rows committed before the cursor below are not delivered.
        self.notify.store(true, Ordering::SeqCst);
        let cursor: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.head)))
            .fetch_one(&mut listener)
            .await?;
        Ok(Box::new(PgFeed {
            listener,
            _listen_pool: listen_pool,
            cursor,
            page: self.page,
            sql: Arc::clone(&self.sql),
            notify: Arc::clone(&self.notify),
        }))
    }

    async fn teardown(&self) -> Result<()> {
        self.release().await?;
        let mut conn = connect(&self.options, &self.url, self.connect_timeout).await?;
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

/// Decodes the columns a reader of an event store would (position, revision, type, data).
fn decode_row(row: &PgRow) -> Result<(i64, i64, String, Vec<u8>)> {
    Ok((
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
    ))
}

/// Decodes a `$all` row (with its stream) and returns its position.
fn decode_scan_row(row: &PgRow) -> Result<i64> {
    let (position, ..) = decode_row(row)?;
    let _stream: String = row.try_get(4)?;
    Ok(position)
}

struct PgFeed {
    listener: PgListener,
    _listen_pool: PgPool,
    cursor: i64,
    page: i64,
    sql: Arc<Sql>,
    notify: Arc<AtomicBool>,
}

impl Drop for PgFeed {
    fn drop(&mut self) {
        self.notify.store(false, Ordering::SeqCst);
    }
}

#[async_trait]
impl Feed for PgFeed {
    async fn next_batch(&mut self) -> Result<usize> {
        loop {
            let rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.scan)))
                .bind(self.cursor)
                .bind(self.page)
                .fetch_all(&mut self.listener)
                .await?;
            if !rows.is_empty() {
                for row in &rows {
                    self.cursor = decode_scan_row(row)?;
                }
                return Ok(rows.len());
            }
            self.listener.recv().await?;
            while self.listener.next_buffered().is_some() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://user:secret@host:5432/db"),
            "postgres://user:***@host:5432/db"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1:5432/test"),
            "postgres://postgres@127.0.0.1:5432/test"
        );
    }
}
