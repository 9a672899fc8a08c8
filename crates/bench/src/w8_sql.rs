//! W8 on PostgreSQL tables: `factline-sql` against `sqlx` running the same statements by hand.
//!
//! The broker here is the schema itself (a table per topic, a group frontier, a row per held
//! delivery), so the raw side does that work directly: the same multi-row `INSERT … UNNEST` with
//! its `NOTIFY` per publish call, and for consuming the same claim transaction (horizon, frontier
//! under `FOR UPDATE`, rows, delivery rows, new frontier) of the adapter's batch size followed
//! by one `DELETE` of the batch's delivery rows — what the adapter does for a group, minus the
//! adapter and the router around it.

use super::*;
use factline_messaging::Subscriber as _;
use factline_sql::postgres::{PgPubSub, PgPubSubConfig};
use factline_sql::sqlx::{self, AssertSqlSafe, Row as _};

const SCHEMA: &str = "factline_bench_w8";
/// The adapter's default, which the raw side copies.
const FETCH_BATCH: i64 = 256;

async fn raw_publish(
    pool: &sqlx::PgPool,
    table: &str,
    channel: &str,
    count: usize,
    batch: usize,
) -> Result<()> {
    let body = payload().to_vec();
    let sql = format!(
        "WITH inserted AS (INSERT INTO {SCHEMA}.{table} (id, payload, metadata) \
         SELECT id, payload, metadata::jsonb \
         FROM UNNEST($1::text[], $2::bytea[], $3::text[]) WITH ORDINALITY AS m(id, payload, metadata, n) \
         ORDER BY n RETURNING 1) \
         SELECT pg_notify($4, $5) FROM (SELECT count(*) FROM inserted) AS done"
    );
    let mut sent = 0;
    while sent < count {
        let n = batch.min(count - sent);
        let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::now_v7().to_string()).collect();
        let payloads: Vec<Vec<u8>> = (0..n).map(|_| body.clone()).collect();
        let metadata: Vec<Option<String>> = vec![None; n];
        sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(ids)
            .bind(payloads)
            .bind(metadata)
            .bind(channel)
            .bind(table)
            .execute(pool)
            .await
            .context("raw INSERT")?;
        sent += n;
    }
    Ok(())
}

/// The raw consumer: the adapter's claim transaction and one `DELETE` per batch.
async fn raw_consume(pool: &sqlx::PgPool, table: &str, count: usize) -> Result<f64> {
    let started = Instant::now();
    let consumer = uuid::Uuid::now_v7();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {SCHEMA}.fl_groups (table_name, group_name, frontier_tx, frontier_offset) \
         VALUES ($1, 'raw', '0'::xid8, 0) ON CONFLICT DO NOTHING"
    )))
    .bind(table)
    .execute(pool)
    .await
    .context("raw group")?;
    let frontier_sql = format!(
        "SELECT frontier_tx::text, frontier_offset FROM {SCHEMA}.fl_groups \
         WHERE table_name = $1 AND group_name = 'raw' FOR UPDATE"
    );
    let rows_sql = format!(
        "SELECT msg_offset, tx::text, id, payload, metadata::text FROM {SCHEMA}.{table} \
         WHERE (tx, msg_offset) > ($1::text::xid8, $2) AND tx < $4::text::xid8 \
         ORDER BY tx, msg_offset LIMIT $3"
    );
    let deliveries_sql = format!(
        "INSERT INTO {SCHEMA}.fl_deliveries (table_name, group_name, msg_offset, consumer, due_at) \
         SELECT $1, 'raw', o, $2, now() + interval '30 seconds' FROM UNNEST($3::bigint[]) AS o"
    );
    let advance_sql = format!(
        "UPDATE {SCHEMA}.fl_groups SET frontier_tx = $2::text::xid8, frontier_offset = $3, \
         touched_at = now() WHERE table_name = $1 AND group_name = 'raw'"
    );
    let ack_sql = format!(
        "DELETE FROM {SCHEMA}.fl_deliveries WHERE table_name = $1 AND group_name = 'raw' \
         AND msg_offset = ANY($2)"
    );
    let mut handled = 0;
    while handled < count {
        let mut tx = pool.begin().await.context("raw BEGIN")?;
        let horizon: String =
            sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
                .fetch_one(&mut *tx)
                .await
                .context("raw horizon")?;
        let frontier = sqlx::query(AssertSqlSafe(frontier_sql.as_str()))
            .bind(table)
            .fetch_one(&mut *tx)
            .await
            .context("raw frontier")?;
        let frontier_tx: String = frontier.try_get(0)?;
        let frontier_offset: i64 = frontier.try_get(1)?;
        let rows = sqlx::query(AssertSqlSafe(rows_sql.as_str()))
            .bind(&frontier_tx)
            .bind(frontier_offset)
            .bind(FETCH_BATCH)
            .bind(&horizon)
            .fetch_all(&mut *tx)
            .await
            .context("raw rows")?;
        let Some(last) = rows.last() else {
            bail!("the raw read found nothing after {handled} rows");
        };
        let last_tx: String = last.try_get(1)?;
        let last_offset: i64 = last.try_get(0)?;
        let mut offsets = Vec::with_capacity(rows.len());
        for row in &rows {
            let offset: i64 = row.try_get(0)?;
            let _id: String = row.try_get(2)?;
            let _payload: Vec<u8> = row.try_get(3)?;
            let _metadata: Option<String> = row.try_get(4)?;
            offsets.push(offset);
        }
        sqlx::query(AssertSqlSafe(deliveries_sql.as_str()))
            .bind(table)
            .bind(consumer)
            .bind(&offsets)
            .execute(&mut *tx)
            .await
            .context("raw deliveries")?;
        sqlx::query(AssertSqlSafe(advance_sql.as_str()))
            .bind(table)
            .bind(&last_tx)
            .bind(last_offset)
            .execute(&mut *tx)
            .await
            .context("raw frontier update")?;
        tx.commit().await.context("raw COMMIT")?;
        sqlx::query(AssertSqlSafe(ack_sql.as_str()))
            .bind(table)
            .bind(&offsets)
            .execute(pool)
            .await
            .context("raw ack")?;
        handled += offsets.len();
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

pub(super) async fn measure(phase: Phase, side: Side, options: &W8Options) -> Result<f64> {
    let pubsub =
        PgPubSub::connect(PgPubSubConfig::new(options.postgres_url.clone()).schema(SCHEMA))
            .await
            .with_context(|| {
                format!(
                    "connect to PostgreSQL at {}",
                    factline_messaging::redact_url(&options.postgres_url)
                )
            })?;
    let pool = pubsub.pool().clone();
    let topic = format!("w8_{}", uuid::Uuid::now_v7().simple());
    let table = factline_sql::table_for_topic(&topic);
    // The topic's table, made by the adapter for both sides.
    let setup = pubsub.subscriber();
    drop(
        setup
            .subscribe(&topic)
            .await
            .context("make the topic table")?,
    );
    setup.close().await.context("close the setup subscriber")?;
    let channel = format!("fl_{SCHEMA}");
    let count = options.messages;
    let rate = match phase {
        Phase::Publish => {
            let started = Instant::now();
            match side {
                Side::Factline => {
                    factline_publish(&pubsub.publisher(), &topic, count, options.publish_batch)
                        .await?
                }
                Side::Raw => {
                    raw_publish(&pool, &table, &channel, count, options.publish_batch).await?
                }
            }
            count as f64 / started.elapsed().as_secs_f64()
        }
        Phase::Consume => {
            raw_publish(&pool, &table, &channel, count, options.publish_batch).await?;
            match side {
                Side::Factline => {
                    let subscriber = pubsub.subscriber_in_group("w8").context("group name")?;
                    router_consume(Arc::new(subscriber), &topic, count).await?
                }
                Side::Raw => raw_consume(&pool, &table, count).await?,
            }
        }
    };
    for statement in [
        format!("DROP TABLE IF EXISTS {SCHEMA}.{table}"),
        format!("DELETE FROM {SCHEMA}.fl_deliveries WHERE table_name = '{table}'"),
        format!("DELETE FROM {SCHEMA}.fl_groups WHERE table_name = '{table}'"),
        format!("DELETE FROM {SCHEMA}.fl_topics WHERE table_name = '{table}'"),
    ] {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&pool)
            .await
            .context("drop the W8 table")?;
    }
    pubsub.close().await;
    Ok(rate)
}
