//! Positions are handed out in commit order: transactions that commit late are never passed
//! over by a reader that already saw a higher position. The last test runs the same schedule
//! against a plain `bigserial` table and shows the skip this store prevents.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::BTreeSet, time::Duration};

use factline_core::{
    AppendRequest, EventFilter, EventStore, ExpectedVersion, Position, ReadAllOptions,
    SubscribeFrom,
    testkit::{self, all_events, next_event},
};
use factline_postgres::{PostgresStore, sqlx};

fn request(stream: &str, count: usize) -> AppendRequest {
    AppendRequest::new(
        testkit::stream(stream),
        ExpectedVersion::Any,
        testkit::events(count),
    )
}

/// Reads `$all` after `after` (exclusive), the way a polling reader does.
async fn poll_after(store: &PostgresStore, after: Option<Position>) -> Vec<Position> {
    let from = after.map_or(Position(0), Position::next);
    let slice = store
        .read_all(ReadAllOptions::forwards().from(from).limit(1_000))
        .await
        .unwrap();
    slice.events.iter().map(|e| e.position).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn a_transaction_that_commits_late_is_not_skipped() {
    let store = common::fresh_store().await;
    let mut subscription = store
        .subscribe_to_all(SubscribeFrom::Start, EventFilter::all())
        .await
        .unwrap();

    // A: appends first, inside its own transaction, and does not commit yet.
    let mut late = store.pool().begin().await.unwrap();
    let a = store
        .append_in(&mut late, vec![request("late-1", 2)])
        .await
        .unwrap();
    assert_eq!(a[0].position, Position(1));

    // B: a second transaction and a plain append start after A and try to commit first.
    let b_store = store.clone();
    let b_tx = tokio::spawn(async move {
        let mut tx = b_store.pool().begin().await.unwrap();
        let result = b_store
            .append_in(&mut tx, vec![request("early-1", 1)])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        result[0].position
    });
    let c_store = store.clone();
    let c_append = tokio::spawn(async move {
        c_store
            .append(
                &testkit::stream("early-2"),
                ExpectedVersion::Any,
                testkit::events(1),
            )
            .await
            .unwrap()
            .position
    });

    // Neither can number its events while A holds the log: nothing is visible, nothing done.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b_tx.is_finished() && !c_append.is_finished());
    assert_eq!(poll_after(&store, None).await, Vec::<Position>::new());
    testkit::assert_quiet(&mut subscription, Duration::from_millis(100)).await;

    late.commit().await.unwrap();
    let b = b_tx.await.unwrap();
    let c = c_append.await.unwrap();
    let mut later: Vec<u64> = vec![b.0, c.0];
    later.sort_unstable();
    assert_eq!(
        later,
        vec![2, 3],
        "B and C come after A's positions 0 and 1"
    );

    // Readers see A's events first, and everything once, in order.
    let mut delivered = Vec::new();
    for _ in 0..4 {
        delivered.push(next_event(&mut subscription).await);
    }
    let positions: Vec<u64> = delivered.iter().map(|e| e.position.0).collect();
    assert_eq!(positions, vec![0, 1, 2, 3]);
    assert_eq!(delivered[0].stream.as_str(), "late-1");
    assert_eq!(delivered[1].stream.as_str(), "late-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn a_rolled_back_transaction_leaves_no_gap() {
    let store = common::fresh_store().await;
    let mut tx = store.pool().begin().await.unwrap();
    store
        .append_in(&mut tx, vec![request("gone-1", 3)])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let kept = store
        .append(
            &testkit::stream("kept-1"),
            ExpectedVersion::NoStream,
            testkit::events(1),
        )
        .await
        .unwrap();
    assert_eq!(
        kept.position,
        Position(0),
        "the rolled-back positions are reused"
    );
    assert!(
        store
            .read_stream(&testkit::stream("gone-1"), Default::default())
            .await
            .is_err()
    );
    assert_eq!(store.head_position().await.unwrap(), Some(Position(0)));
}

/// Many writers commit (or roll back) after random delays while a subscriber and a polling
/// reader follow `$all`; both must see exactly the final log, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn readers_see_every_commit_once_in_order_under_random_commit_delays() {
    const WRITERS: usize = 6;
    const TRANSACTIONS: usize = 25;
    let store = common::fresh_store().await;
    let mut subscription = store
        .subscribe_to_all(SubscribeFrom::Start, EventFilter::all())
        .await
        .unwrap();

    let poller_store = store.clone();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let poller = tokio::spawn(async move {
        let mut seen: Vec<Position> = Vec::new();
        loop {
            let done = stopped.try_recv().is_ok();
            let page = poll_after(&poller_store, seen.last().copied()).await;
            seen.extend(page);
            if done {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut committed = 0usize;
            for i in 0..TRANSACTIONS {
                // A pseudo-random schedule: delays of 0..7 ms, every fifth rolled back.
                let delay = ((writer * 31 + i * 17) % 8) as u64;
                if (writer + i) % 3 == 0 {
                    store
                        .append(
                            &testkit::stream(&format!("plain-{writer}")),
                            ExpectedVersion::Any,
                            testkit::events(1 + i % 3),
                        )
                        .await
                        .unwrap();
                    committed += 1 + i % 3;
                    continue;
                }
                let mut tx = store.pool().begin().await.unwrap();
                store
                    .append_in(&mut tx, vec![request(&format!("tx-{writer}"), 1 + i % 2)])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(delay)).await;
                if (writer * 7 + i) % 5 == 0 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    committed += 1 + i % 2;
                }
            }
            committed
        }));
    }
    let mut committed = 0;
    for writer in writers {
        committed += writer.await.unwrap();
    }
    stop.send(()).unwrap();
    let polled = poller.await.unwrap();

    let log = all_events(&store).await;
    assert_eq!(log.len(), committed);
    let expected: Vec<Position> = (0..committed as u64).map(Position).collect();
    assert_eq!(
        log.iter().map(|e| e.position).collect::<Vec<_>>(),
        expected,
        "positions are gapless"
    );
    assert_eq!(
        polled, expected,
        "the polling reader saw every event once, in order"
    );
    let mut subscribed = Vec::with_capacity(committed);
    for _ in 0..committed {
        subscribed.push(next_event(&mut subscription).await.position);
    }
    assert_eq!(
        subscribed, expected,
        "the subscriber saw every event once, in order"
    );
    testkit::assert_quiet(&mut subscription, Duration::from_millis(100)).await;
}

/// The same schedule on a `bigserial` table: the second transaction commits first, a reader
/// moves past the first one's number, and never sees it. This is what the test above guards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn a_sequence_numbered_table_skips_a_late_commit() {
    let schema = common::fresh_schema();
    let pool = sqlx::PgPool::connect(&common::url()).await.unwrap();
    let table = format!("{}.naive_events", schema.quoted());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA {}",
        schema.quoted()
    )))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (position bigserial PRIMARY KEY, body text NOT NULL)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let insert = format!("INSERT INTO {table} (body) VALUES ($1) RETURNING position");
    let read = format!("SELECT position FROM {table} WHERE position > $1 ORDER BY position");

    let mut first = pool.begin().await.unwrap();
    let first_position: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(insert.clone()))
        .bind("late")
        .fetch_one(&mut *first)
        .await
        .unwrap();
    let mut second = pool.begin().await.unwrap();
    let second_position: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(insert.clone()))
        .bind("early")
        .fetch_one(&mut *second)
        .await
        .unwrap();
    second.commit().await.unwrap();

    let mut seen: BTreeSet<i64> = BTreeSet::new();
    let page: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(read.clone()))
        .bind(0_i64)
        .fetch_all(&pool)
        .await
        .unwrap();
    seen.extend(&page);
    let checkpoint = *seen.last().unwrap();
    first.commit().await.unwrap();
    let page: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(read))
        .bind(checkpoint)
        .fetch_all(&pool)
        .await
        .unwrap();
    seen.extend(&page);

    assert!(first_position < second_position);
    assert!(
        !seen.contains(&first_position),
        "the reader skipped the late commit, as sequence-numbered stores do"
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA {} CASCADE",
        schema.quoted()
    )))
    .execute(&pool)
    .await
    .unwrap();
}
