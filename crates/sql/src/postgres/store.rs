//! The subscriber's statements on PostgreSQL.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::{BoxError, DeliverFrom};
use sqlx::{AssertSqlSafe, Row as _};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::Shared;
use crate::engine::{Claimed, Row, Settings, Store, boxed};

/// [`Store`] on the schema of a [`super::PgPubSub`].
pub(crate) struct PgStore {
    pub(crate) shared: Arc<Shared>,
    pub(crate) settings: Settings,
    sql: Statements,
}

/// The statements that do not depend on the topic, built once.
struct Statements {
    frontier: String,
    take_due: String,
    forget: String,
    insert_deliveries: String,
    advance: String,
    touch: String,
    ack: String,
    nack: String,
    handover: String,
    drop_deliveries: String,
    drop_group: String,
    renew: String,
}

impl PgStore {
    pub(crate) fn new(shared: Arc<Shared>, settings: Settings) -> Self {
        let schema = shared.schema().to_owned();
        let sql = Statements {
            frontier: format!(
                "SELECT frontier_tx::text, frontier_offset FROM {schema}.fl_groups \
                 WHERE table_name = $1 AND group_name = $2 FOR UPDATE"
            ),
            take_due: format!(
                "WITH due AS (SELECT msg_offset FROM {schema}.fl_deliveries \
                   WHERE table_name = $1 AND group_name = $2 AND due_at <= now() \
                   ORDER BY msg_offset LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 UPDATE {schema}.fl_deliveries d SET consumer = $4, \
                   due_at = now() + make_interval(secs => $5), attempts = d.attempts + 1 \
                 FROM due WHERE d.table_name = $1 AND d.group_name = $2 \
                   AND d.msg_offset = due.msg_offset RETURNING d.msg_offset"
            ),
            forget: format!(
                "DELETE FROM {schema}.fl_deliveries WHERE table_name = $1 \
                 AND group_name = $2 AND msg_offset = ANY($3)"
            ),
            insert_deliveries: format!(
                "INSERT INTO {schema}.fl_deliveries \
                 (table_name, group_name, msg_offset, consumer, due_at) \
                 SELECT $1, $2, o, $3, now() + make_interval(secs => $4) \
                 FROM UNNEST($5::bigint[]) AS o ON CONFLICT DO NOTHING"
            ),
            advance: format!(
                "UPDATE {schema}.fl_groups SET frontier_tx = $3::text::xid8, \
                 frontier_offset = $4, touched_at = now() \
                 WHERE table_name = $1 AND group_name = $2"
            ),
            touch: format!(
                "UPDATE {schema}.fl_groups SET touched_at = now() \
                 WHERE table_name = $1 AND group_name = $2"
            ),
            ack: format!(
                "DELETE FROM {schema}.fl_deliveries WHERE table_name = $1 AND group_name = $2 \
                 AND msg_offset = ANY($3)"
            ),
            nack: format!(
                "UPDATE {schema}.fl_deliveries SET consumer = NULL, \
                 due_at = now() + make_interval(secs => $4) \
                 WHERE table_name = $1 AND group_name = $2 AND msg_offset = $3 AND consumer = $5"
            ),
            handover: format!(
                "UPDATE {schema}.fl_deliveries SET consumer = NULL, due_at = now() \
                 WHERE consumer = $1"
            ),
            drop_deliveries: format!(
                "DELETE FROM {schema}.fl_deliveries WHERE table_name = $1 AND group_name = $2"
            ),
            drop_group: format!(
                "DELETE FROM {schema}.fl_groups WHERE table_name = $1 AND group_name = $2"
            ),
            renew: format!(
                "UPDATE {schema}.fl_deliveries SET due_at = now() + make_interval(secs => $2) \
                 WHERE consumer = ANY($1)"
            ),
        };
        Self {
            shared,
            settings,
            sql,
        }
    }

    fn lease_secs(&self) -> f64 {
        self.settings.claim_lease.as_secs_f64()
    }
}

fn row(found: &sqlx::postgres::PgRow) -> Result<Row, sqlx::Error> {
    Ok(Row {
        offset: found.try_get(0)?,
        id: found.try_get(2)?,
        payload: found.try_get(3)?,
        metadata: found.try_get(4)?,
    })
}

#[async_trait]
impl Store for PgStore {
    fn settings(&self) -> &Settings {
        &self.settings
    }

    async fn table(&self, topic: &str) -> Result<Arc<str>, BoxError> {
        let sql = self.shared.topic(topic).await?;
        self.shared.start_listener();
        Ok(Arc::from(sql.table.as_str()))
    }

    async fn create_group(&self, table: &str, group: &str) -> Result<(), BoxError> {
        let schema = self.shared.schema();
        let frontier = match self.settings.deliver_from {
            DeliverFrom::Oldest => "'0'::xid8",
            DeliverFrom::New => "pg_snapshot_xmin(pg_current_snapshot())",
        };
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {schema}.fl_groups (table_name, group_name, frontier_tx, frontier_offset) \
             VALUES ($1, $2, {frontier}, 0) ON CONFLICT DO NOTHING"
        )))
        .bind(table)
        .bind(group)
        .execute(&self.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(())
    }

    async fn remove_abandoned_private_groups(&self) -> Result<(), BoxError> {
        let schema = self.shared.schema();
        let idle_secs = self.shared.config.private_group_idle_max.as_secs_f64();
        sqlx::query(AssertSqlSafe(format!(
            "WITH gone AS (DELETE FROM {schema}.fl_groups WHERE group_name LIKE 's:%' \
               AND touched_at < now() - make_interval(secs => $1) RETURNING table_name, group_name) \
             DELETE FROM {schema}.fl_deliveries d USING gone \
             WHERE d.table_name = gone.table_name AND d.group_name = gone.group_name"
        )))
        .bind(idle_secs)
        .execute(&self.shared.pool)
        .await
        .map_err(boxed)?;
        Ok(())
    }

    /// One transaction: the horizon, the group's frontier under `FOR UPDATE`, due deliveries,
    /// then rows past the frontier of transactions before the horizon.
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
        sqlx::query(AssertSqlSafe(self.sql.ack.as_str()))
            .bind(table)
            .bind(group)
            .bind(offsets)
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
        sqlx::query(AssertSqlSafe(self.sql.nack.as_str()))
            .bind(table)
            .bind(group)
            .bind(offset)
            .bind(delay.as_secs_f64())
            .bind(consumer)
            .execute(&self.shared.pool)
            .await
            .map_err(boxed)?;
        Ok(())
    }

    async fn handover(&self, consumer: Uuid) -> Result<(), BoxError> {
        sqlx::query(AssertSqlSafe(self.sql.handover.as_str()))
            .bind(consumer)
            .execute(&self.shared.pool)
            .await
            .map_err(boxed)?;
        Ok(())
    }

    async fn drop_group(&self, table: &str, group: &str) -> Result<(), BoxError> {
        let mut tx = self.shared.pool.begin().await.map_err(boxed)?;
        for statement in [&self.sql.drop_deliveries, &self.sql.drop_group] {
            sqlx::query(AssertSqlSafe(statement.as_str()))
                .bind(table)
                .bind(group)
                .execute(&mut *tx)
                .await
                .map_err(boxed)?;
        }
        tx.commit().await.map_err(boxed)
    }

    async fn renew(&self, consumers: &[Uuid]) -> Result<(), BoxError> {
        sqlx::query(AssertSqlSafe(self.sql.renew.as_str()))
            .bind(consumers)
            .bind(self.lease_secs())
            .execute(&self.shared.pool)
            .await
            .map_err(boxed)?;
        Ok(())
    }

    fn wakeups(&self) -> broadcast::Receiver<Arc<str>> {
        self.shared.notified.subscribe()
    }

    fn id_prefix(&self) -> &'static str {
        "pg"
    }
}

impl PgStore {
    async fn claim_in_one_transaction(
        &self,
        table: &str,
        group: &str,
        consumer: Uuid,
        limit: usize,
        touch: bool,
    ) -> Result<Claimed, sqlx::Error> {
        let topic_sql = self.shared.topic_sql(table);
        let lease_secs = self.lease_secs();
        let limit_i64 = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut tx = self.shared.pool.begin().await?;
        // The horizon first, before this transaction has an id of its own (its row lock
        // takes one, and a snapshot's xmin counts the own transaction): rows of transactions
        // before it can never be joined by rows of a transaction that commits later.
        let horizon: String =
            sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
                .fetch_one(&mut *tx)
                .await?;
        let frontier = sqlx::query(AssertSqlSafe(self.sql.frontier.as_str()))
            .bind(table)
            .bind(group)
            .fetch_optional(&mut *tx)
            .await?;
        let (Some(frontier), Some(topic_sql)) = (frontier, topic_sql) else {
            // The group is gone (its schema was reset): make it again and look next time.
            tx.rollback().await.ok();
            self.create_group(table, group)
                .await
                .map_err(|error| sqlx::Error::Protocol(error.to_string()))?;
            return Ok(Claimed {
                rows: Vec::new(),
                blocked: false,
            });
        };
        let frontier_tx: String = frontier.try_get(0)?;
        let frontier_offset: i64 = frontier.try_get(1)?;
        let due: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.take_due.as_str()))
            .bind(table)
            .bind(group)
            .bind(limit_i64)
            .bind(consumer)
            .bind(lease_secs)
            .fetch_all(&mut *tx)
            .await?;
        let mut rows = Vec::new();
        if !due.is_empty() {
            let found = sqlx::query(AssertSqlSafe(Arc::clone(&topic_sql.select_offsets)))
                .bind(&due)
                .fetch_all(&mut *tx)
                .await?;
            for found in &found {
                rows.push(row(found)?);
            }
            if rows.len() < due.len() {
                // Rows deleted by retention while a delivery waited: nothing to deliver.
                let present: HashSet<i64> = rows.iter().map(|row| row.offset).collect();
                let gone: Vec<i64> = due
                    .iter()
                    .copied()
                    .filter(|offset| !present.contains(offset))
                    .collect();
                sqlx::query(AssertSqlSafe(self.sql.forget.as_str()))
                    .bind(table)
                    .bind(group)
                    .bind(&gone)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let remaining = limit.saturating_sub(due.len());
        let mut blocked = false;
        let mut advanced = false;
        if remaining > 0 {
            let found = sqlx::query(AssertSqlSafe(Arc::clone(&topic_sql.select_new)))
                .bind(&frontier_tx)
                .bind(frontier_offset)
                .bind(i64::try_from(remaining).unwrap_or(i64::MAX))
                .bind(&horizon)
                .fetch_all(&mut *tx)
                .await?;
            if found.len() < remaining {
                blocked = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&topic_sql.select_blocked)))
                    .bind(&horizon)
                    .fetch_one(&mut *tx)
                    .await?;
            }
            if let Some(last) = found.last() {
                let last_tx: String = last.try_get(1)?;
                let last_offset: i64 = last.try_get(0)?;
                let mut offsets = Vec::with_capacity(found.len());
                for found in &found {
                    let row = row(found)?;
                    offsets.push(row.offset);
                    rows.push(row);
                }
                sqlx::query(AssertSqlSafe(self.sql.insert_deliveries.as_str()))
                    .bind(table)
                    .bind(group)
                    .bind(consumer)
                    .bind(lease_secs)
                    .bind(&offsets)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(AssertSqlSafe(self.sql.advance.as_str()))
                    .bind(table)
                    .bind(group)
                    .bind(&last_tx)
                    .bind(last_offset)
                    .execute(&mut *tx)
                    .await?;
                advanced = true;
            }
        }
        if touch && !advanced {
            sqlx::query(AssertSqlSafe(self.sql.touch.as_str()))
                .bind(table)
                .bind(group)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Claimed { rows, blocked })
    }
}
