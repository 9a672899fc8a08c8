//! SQLite beyond the conformance suite: transactions, the outbox across a reopen of the file,
//! nacks that do not hold up the group, concurrent writers, bad settings. No service needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use factline_messaging::{
    Forwarder, ForwarderConfig, InMemoryConfig, InMemoryPubSub, Message, MessageStream, Publisher,
    Subscriber,
};
use factline_sql::sqlite::{ConnectError, SqliteDedupStore, SqlitePubSub, SqlitePubSubConfig};
use factline_sql::{DedupConfig, RunForwarderError};

mod outbox_common;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

fn url(dir: &tempfile::TempDir) -> String {
    format!("sqlite:{}", dir.path().join("app.db").display())
}

async fn open(dir: &tempfile::TempDir) -> SqlitePubSub {
    SqlitePubSub::connect(SqlitePubSubConfig::new(url(dir)))
        .await
        .unwrap()
}

fn text(message: &Message) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

async fn receive(stream: &mut MessageStream, count: usize) -> Vec<Message> {
    let mut got = Vec::new();
    while got.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} arrived", got.len()))
            .unwrap()
            .unwrap();
        message.ack();
        got.push(message);
    }
    got
}

#[tokio::test]
async fn publish_in_commits_and_rolls_back_with_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let pubsub = open(&dir).await;
    sqlx::query("CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
        .execute(pubsub.pool())
        .await
        .unwrap();
    let subscriber = pubsub.subscriber();
    let mut stream = subscriber.subscribe("accounts").await.unwrap();
    let publisher = pubsub.publisher();
    for (id, commit) in [(1, false), (2, true)] {
        let mut tx = pubsub.pool().begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("INSERT INTO accounts VALUES (?, 10)")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
        publisher
            .publish_in(
                &mut tx,
                "accounts",
                vec![Message::new(format!("opened {id}"))],
            )
            .await
            .unwrap();
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
    }
    let got = receive(&mut stream, 1).await;
    assert_eq!(text(&got[0]), "opened 2");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.next())
            .await
            .is_err()
    );
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM accounts")
        .fetch_all(pubsub.pool())
        .await
        .unwrap();
    assert_eq!(ids, [2]);
    subscriber.close().await.unwrap();
}

#[tokio::test]
async fn concurrent_writers_lose_nothing_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pubsub = open(&dir).await;
    let subscriber = pubsub.subscriber_in_group("g").unwrap();
    let mut stream = subscriber.subscribe("t").await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let pubsub = pubsub.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = pubsub.pool().begin_with("BEGIN IMMEDIATE").await.unwrap();
            let messages: Vec<Message> = (0..5).map(|n| Message::new(format!("{t}-{n}"))).collect();
            pubsub
                .publisher()
                .publish_in(&mut tx, "t", messages.clone())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10 * (t % 3))).await;
            if t % 4 == 3 {
                tx.rollback().await.unwrap();
                Vec::new()
            } else {
                tx.commit().await.unwrap();
                messages
            }
        }));
    }
    let mut committed = HashSet::new();
    for task in tasks {
        committed.extend(task.await.unwrap().into_iter().map(|m| m.id));
    }
    let got = receive(&mut stream, committed.len()).await;
    let ids: HashSet<_> = got.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids.len(), got.len(), "no duplicate");
    assert_eq!(ids, committed);
    subscriber.close().await.unwrap();
}

#[tokio::test]
async fn a_nack_holds_up_only_its_own_message() {
    let dir = tempfile::tempdir().unwrap();
    let pubsub = open(&dir).await;
    let subscriber = pubsub.subscriber_in_group("w").unwrap();
    let mut stream = subscriber.subscribe("jobs").await.unwrap();
    let messages: Vec<Message> = (0..4).map(|n| Message::new(format!("m{n}"))).collect();
    pubsub.publisher().publish("jobs", messages).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    first.nack_with_delay(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let rest = receive(&mut stream, 3).await;
    assert!(started.elapsed() < Duration::from_millis(1_500));
    assert_eq!(
        rest.iter().map(text).collect::<Vec<_>>(),
        ["m1", "m2", "m3"]
    );
    let again = receive(&mut stream, 1).await;
    assert_eq!(again[0].id, first.id);
    assert!(started.elapsed() >= Duration::from_millis(1_900));
    subscriber.close().await.unwrap();
}

#[tokio::test]
async fn the_outbox_forwards_in_order_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let broker = InMemoryPubSub::new(InMemoryConfig::default().persistent(true));
    let mut consumer = broker.subscriber().subscribe("orders").await.unwrap();
    let mut staged = Vec::new();
    let mut first_run;
    {
        let pubsub = open(&dir).await;
        for n in 0..20 {
            let mut tx = pubsub.pool().begin_with("BEGIN IMMEDIATE").await.unwrap();
            let message = Message::new(format!("order {n}"));
            pubsub
                .stage(&mut tx, "outbox", "orders", vec![message.clone()])
                .await
                .unwrap();
            tx.commit().await.unwrap();
            staged.push(message);
        }
        let forwarder = Forwarder::new(
            ForwarderConfig::new("outbox").batch_messages_max(3),
            Arc::new(pubsub.subscriber_in_group("forwarder").unwrap()),
            Arc::new(broker.publisher()) as Arc<dyn Publisher>,
        );
        let shutdown = CancellationToken::new();
        let run = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { forwarder.run(shutdown).await }
        });
        first_run = receive(&mut consumer, 6).await;
        shutdown.cancel();
        run.await.unwrap().unwrap();
        pubsub.close().await;
    }
    // The process "restarts": the file is opened again and a new forwarder goes on.
    let pubsub = open(&dir).await;
    let forwarder = Forwarder::new(
        ForwarderConfig::new("outbox"),
        Arc::new(pubsub.subscriber_in_group("forwarder").unwrap()),
        Arc::new(broker.publisher()) as Arc<dyn Publisher>,
    );
    let shutdown = CancellationToken::new();
    let run = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { forwarder.run(shutdown).await }
    });
    let mut got: Vec<Message> = std::mem::take(&mut first_run);
    while !got.iter().any(|m| m.id == staged[19].id) {
        got.extend(receive(&mut consumer, 1).await);
    }
    shutdown.cancel();
    run.await.unwrap().unwrap();
    // Both runs together: every staged message, in staging order, once the redeliveries a
    // stop between publish and ack may bring are dropped.
    let mut all = Vec::new();
    let mut seen = HashSet::new();
    for message in got {
        if seen.insert(message.id.clone()) {
            all.push(message.id);
        }
    }
    let wanted: Vec<_> = staged.iter().map(|m| m.id.clone()).collect();
    assert_eq!(
        all, wanted,
        "the second run continues where the first stopped, in order"
    );
}

#[tokio::test]
async fn one_outbox_forwarder_runs_at_a_time_and_a_standby_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    // Two processes on one file: two pools.
    let (first, second) = (open(&dir).await, open(&dir).await);
    let starts = std::sync::atomic::AtomicUsize::new(0);
    let start = |target: Arc<dyn Publisher>, shutdown: CancellationToken| {
        // The first forwarder runs on the first pool, the standby on the second.
        let pubsub = if starts.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            first.clone()
        } else {
            second.clone()
        };
        tokio::spawn(async move {
            pubsub
                .run_forwarder(
                    "outbox",
                    "forwarder",
                    ForwarderConfig::new("x"),
                    target,
                    shutdown,
                )
                .await
        })
    };
    let stage = |payload: &'static str| {
        let pubsub = first.clone();
        async move {
            let mut tx = pubsub.pool().begin_with("BEGIN IMMEDIATE").await.unwrap();
            pubsub
                .stage(&mut tx, "outbox", "dest", vec![Message::new(payload)])
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    };
    outbox_common::one_forwarder_at_a_time(start, stage).await;
}

#[tokio::test]
async fn a_forwarder_whose_lease_is_taken_over_stops_with_lock_lost() {
    let dir = tempfile::tempdir().unwrap();
    let pubsub = open(&dir).await;
    let broker = InMemoryPubSub::new(InMemoryConfig::default());
    let target: Arc<dyn Publisher> = Arc::new(broker.publisher());
    let shutdown = CancellationToken::new();
    let run = tokio::spawn({
        let pubsub = pubsub.clone();
        let shutdown = shutdown.clone();
        async move {
            pubsub
                .run_forwarder("outbox", "f", ForwarderConfig::new("x"), target, shutdown)
                .await
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let held: i64 = sqlx::query_scalar("SELECT count(*) FROM fl_forwarders")
            .fetch_one(pubsub.pool())
            .await
            .unwrap();
        if held == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the forwarder took its lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another forwarder took the lease over (as if this one had stalled past the lease).
    sqlx::query("UPDATE fl_forwarders SET owner = x'00'")
        .execute(pubsub.pool())
        .await
        .unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the forwarder stops within 10 s of losing its lease")
        .unwrap();
    assert!(
        matches!(stopped, Err(RunForwarderError::LockLost(_))),
        "{stopped:?}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn the_dedup_store_keeps_the_contract_across_instances() {
    let dir = tempfile::tempdir().unwrap();
    let config = DedupConfig::default()
        .ttl(Duration::from_secs(2))
        .claim_ttl(Duration::from_secs(1));
    let first = SqliteDedupStore::new(&open(&dir).await, config.clone());
    let second = SqliteDedupStore::new(&open(&dir).await, config.clone());
    factline_messaging::testkit::dedup::check_dedup_store(
        &first,
        &second,
        config.claim_ttl,
        config.ttl,
    )
    .await;
    first.delete_expired().await.unwrap();
}

#[tokio::test]
async fn bad_settings_are_refused_at_connect() {
    let not_sqlite = SqlitePubSub::connect(SqlitePubSubConfig::new("postgres://x"))
        .await
        .unwrap_err();
    assert!(
        matches!(not_sqlite, ConnectError::Open { .. }),
        "{not_sqlite}"
    );
    let missing_dir = SqlitePubSub::connect(SqlitePubSubConfig::new(
        "sqlite:/nonexistent-dir-factline/x.db",
    ))
    .await
    .unwrap_err();
    assert!(
        missing_dir.to_string().contains("nonexistent-dir-factline"),
        "{missing_dir}"
    );
    let dir = tempfile::tempdir().unwrap();
    let zero =
        SqlitePubSub::connect(SqlitePubSubConfig::new(url(&dir)).poll_interval(Duration::ZERO))
            .await
            .unwrap_err();
    assert!(zero.to_string().contains("poll_interval"), "{zero}");
}
