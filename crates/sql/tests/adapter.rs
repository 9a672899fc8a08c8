//! What the conformance suite does not cover: transactions that commit out of order, publishing
//! inside the caller's transaction, nacks that must not hold up the group, a member that died,
//! the outbox with its forwarder, the deduplication store, and bad settings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use factline_messaging::{
    ForwarderConfig, InMemoryConfig, InMemoryPubSub, Message, MessageStream, Publisher, Subscriber,
};
use factline_sql::postgres::{ConnectError, PgDedupConfig, PgDedupStore, PgPubSubConfig};
use futures::StreamExt as _;
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

const NEEDS_POSTGRES: &str = "needs postgres: set FACTLINE_TEST_POSTGRES_URL";

fn unique(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::now_v7().simple())
}

fn text(message: &Message) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

/// Receives `count` messages (acking each), failing after `timeout` without one.
async fn receive(stream: &mut MessageStream, count: usize, timeout: Duration) -> Vec<Message> {
    let mut got = Vec::new();
    while got.len() < count {
        let message = tokio::time::timeout(timeout, stream.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} messages arrived", got.len()))
            .expect("the stream goes on")
            .expect("no receive error");
        message.ack();
        got.push(message);
    }
    got
}

/// Asserts nothing arrives within `wait`.
async fn nothing_within(stream: &mut MessageStream, wait: Duration) {
    if let Ok(Some(item)) = tokio::time::timeout(wait, stream.next()).await {
        panic!("unexpected delivery: {:?}", item.map(|m| text(&m)));
    }
}

#[tokio::test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn a_transaction_that_commits_late_is_not_skipped() {
    let _ = NEEDS_POSTGRES;
    let pubsub = common::pubsub().await;
    let topic = unique("late");
    let publisher = pubsub.publisher();
    let subscriber = pubsub.subscriber_in_group("readers").unwrap();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();

    // The early transaction takes its id and its row's offset first, and commits last.
    let mut early = pubsub.pool().begin().await.unwrap();
    publisher
        .publish_in(&mut early, &topic, vec![Message::new("early")])
        .await
        .unwrap();
    publisher
        .publish(&topic, vec![Message::new("late-1"), Message::new("late-2")])
        .await
        .unwrap();
    // The later rows are committed, but a reader that took them now and moved its frontier
    // past them would skip "early": they wait.
    nothing_within(&mut stream, Duration::from_millis(1_500)).await;
    early.commit().await.unwrap();
    let got = receive(&mut stream, 3, Duration::from_secs(10)).await;
    let texts: Vec<String> = got.iter().map(text).collect();
    assert_eq!(texts, ["early", "late-1", "late-2"]);
    nothing_within(&mut stream, Duration::from_millis(500)).await;
    subscriber.close().await.unwrap();
}

#[tokio::test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn publish_in_commits_and_rolls_back_with_the_callers_transaction() {
    let pubsub = common::pubsub().await;
    let topic = unique("in-tx");
    let publisher = pubsub.publisher();
    let subscriber = pubsub.subscriber();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    let state = format!(
        "{}.state_{}",
        common::schema(),
        uuid::Uuid::now_v7().simple()
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {state} (id int PRIMARY KEY, note text)"
    )))
    .execute(pubsub.pool())
    .await
    .unwrap();

    let mut rolled_back = pubsub.pool().begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {state} VALUES (1, 'rolled back')"
    )))
    .execute(&mut *rolled_back)
    .await
    .unwrap();
    publisher
        .publish_in(&mut rolled_back, &topic, vec![Message::new("never")])
        .await
        .unwrap();
    rolled_back.rollback().await.unwrap();

    let mut committed = pubsub.pool().begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {state} VALUES (2, 'committed')"
    )))
    .execute(&mut *committed)
    .await
    .unwrap();
    publisher
        .publish_in(&mut committed, &topic, vec![Message::new("kept")])
        .await
        .unwrap();
    committed.commit().await.unwrap();

    let got = receive(&mut stream, 1, Duration::from_secs(10)).await;
    assert_eq!(text(&got[0]), "kept");
    nothing_within(&mut stream, Duration::from_millis(700)).await;
    let rows: Vec<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM {state} ORDER BY id"
    )))
    .fetch_all(pubsub.pool())
    .await
    .unwrap();
    assert_eq!(rows, [2], "state and message committed together");
    subscriber.close().await.unwrap();
}

#[tokio::test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn a_nack_holds_up_only_its_own_message() {
    let pubsub = common::pubsub().await;
    let topic = unique("nack");
    let subscriber = pubsub.subscriber_in_group("workers").unwrap();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    let messages: Vec<Message> = (0..5).map(|n| Message::new(format!("m{n}"))).collect();
    pubsub
        .publisher()
        .publish(&topic, messages.clone())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(text(&first), "m0");
    first.nack_with_delay(Duration::from_secs(3));
    let started = std::time::Instant::now();
    let rest = receive(&mut stream, 4, Duration::from_secs(2)).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    let texts: Vec<String> = rest.iter().map(text).collect();
    assert_eq!(texts, ["m1", "m2", "m3", "m4"]);
    let again = receive(&mut stream, 1, Duration::from_secs(10)).await;
    assert_eq!(again[0].id, first.id);
    assert!(
        started.elapsed() >= Duration::from_millis(2_900),
        "redelivered after {:?}, before its delay",
        started.elapsed()
    );
    subscriber.close().await.unwrap();
}

#[tokio::test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn a_member_that_stopped_renewing_loses_its_messages_to_the_group() {
    let pubsub = common::pubsub_with(common::config().claim_lease(Duration::from_secs(1))).await;
    let topic = unique("lease");
    let holder = pubsub.subscriber_in_group("g").unwrap();
    let mut held = holder.subscribe(&topic).await.unwrap();
    pubsub
        .publisher()
        .publish(&topic, vec![Message::new("a"), Message::new("b")])
        .await
        .unwrap();
    let mut taken = Vec::new();
    for _ in 0..2 {
        taken.push(
            tokio::time::timeout(Duration::from_secs(10), held.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    // The holder's process "dies": its claims pass to a consumer nobody renews (as a crash
    // leaves them), and the holder itself stays alive but silent.
    let schema = common::schema();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {schema}.fl_deliveries SET consumer = gen_random_uuid(), \
         due_at = now() + interval '1 second' \
         WHERE group_name = 'g' AND table_name = $1"
    )))
    .bind(factline_sql::table_for_topic(&topic))
    .execute(pubsub.pool())
    .await
    .unwrap();
    let other = pubsub.subscriber_in_group("g").unwrap();
    let mut stream = other.subscribe(&topic).await.unwrap();
    let got = receive(&mut stream, 2, Duration::from_secs(10)).await;
    let ids: HashSet<_> = got.iter().map(|m| m.id.clone()).collect();
    let wanted: HashSet<_> = taken.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids, wanted);
    other.close().await.unwrap();
    drop(taken);
    holder.close().await.unwrap();
}

#[tokio::test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn the_outbox_forwards_committed_messages_in_order_across_restarts() {
    let pubsub = common::pubsub().await;
    let outbox_topic = unique("outbox");
    let outbox = pubsub.outbox(&outbox_topic);
    let broker = InMemoryPubSub::new(InMemoryConfig::default().persistent(true));
    let mut consumer = broker
        .subscriber_in_group("consumer")
        .subscribe("orders")
        .await
        .unwrap();

    let mut staged = Vec::new();
    for n in 0..40 {
        let mut tx = pubsub.pool().begin().await.unwrap();
        let message = Message::new(format!("order {n}")).with_metadata("partition_key", "o-1");
        outbox
            .stage(&mut tx, "orders", vec![message.clone()])
            .await
            .unwrap();
        if n % 10 == 9 {
            // A rolled-back transaction stages nothing.
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
            staged.push(message);
        }
    }

    // First forwarder: stopped after some messages went out.
    let run = |shutdown: CancellationToken| {
        let pubsub = pubsub.clone();
        let outbox = pubsub.outbox(&outbox_topic);
        let target: Arc<dyn Publisher> = Arc::new(broker.publisher());
        async move {
            outbox
                .run_forwarder(
                    &pubsub,
                    "forwarder",
                    ForwarderConfig::new("ignored").batch_messages_max(5),
                    target,
                    shutdown,
                )
                .await
        }
    };
    let shutdown = CancellationToken::new();
    let first = tokio::spawn(run(shutdown.clone()));
    let mut got = receive(&mut consumer, 10, Duration::from_secs(10)).await;
    shutdown.cancel();
    first.await.unwrap().unwrap();

    // A second forwarder (a restarted process) goes on from where the group stood.
    let shutdown = CancellationToken::new();
    let second = tokio::spawn(run(shutdown.clone()));
    while got.len() < staged.len() || !got.iter().any(|m| m.id == staged[staged.len() - 1].id) {
        let more = receive(&mut consumer, 1, Duration::from_secs(10)).await;
        got.extend(more);
    }
    shutdown.cancel();
    second.await.unwrap().unwrap();

    // At least once, in order: drop the redeliveries a stop between publish and ack may
    // bring, and what is left is the staged sequence.
    let mut seen = HashSet::new();
    let unique_ids: Vec<_> = got
        .iter()
        .filter(|m| seen.insert(m.id.clone()))
        .map(|m| m.id.clone())
        .collect();
    let wanted: Vec<_> = staged.iter().map(|m| m.id.clone()).collect();
    assert_eq!(
        unique_ids, wanted,
        "every committed message, in staging order"
    );
    for message in &got {
        assert!(
            !message
                .metadata
                .contains_key(factline_sql::postgres::OUTBOX_DESTINATION_KEY)
        );
        assert_eq!(message.metadata.get("partition_key"), Some("o-1"));
    }
}

/// Sessions holding the advisory lock of the forwarder of `topic` and `group`.
async fn forwarder_lock_holders(
    pubsub: &factline_sql::postgres::PgPubSub,
    topic: &str,
    group: &str,
) -> i64 {
    let name = format!("factline_outbox:{}:{topic}:{group}", common::schema());
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
         AND ((classid::bigint << 32) | objid::bigint) = hashtext($1)::bigint",
    )
    .bind(name)
    .fetch_one(pubsub.pool())
    .await
    .unwrap()
}

#[tokio::test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn only_one_forwarder_runs_at_a_time_and_a_standby_takes_over() {
    let pubsub = common::pubsub().await;
    let outbox_topic = unique("outbox-lock");
    let outbox = pubsub.outbox(&outbox_topic);
    let broker = InMemoryPubSub::new(InMemoryConfig::default().persistent(true));
    let mut consumer = broker.subscriber().subscribe("dest").await.unwrap();
    let start = |shutdown: CancellationToken| {
        let pubsub = pubsub.clone();
        let outbox = pubsub.outbox(&outbox_topic);
        let target: Arc<dyn Publisher> = Arc::new(broker.publisher());
        tokio::spawn(async move {
            outbox
                .run_forwarder(&pubsub, "f", ForwarderConfig::new("x"), target, shutdown)
                .await
        })
    };
    let stage = |text: &'static str| {
        let pubsub = pubsub.clone();
        let outbox = pubsub.outbox(&outbox_topic);
        async move {
            let mut tx = pubsub.pool().begin().await.unwrap();
            outbox
                .stage(&mut tx, "dest", vec![Message::new(text)])
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    };
    let (stop_one, stop_two) = (CancellationToken::new(), CancellationToken::new());
    let one = start(stop_one.clone());
    stage("first").await;
    assert_eq!(
        text(&receive(&mut consumer, 1, Duration::from_secs(10)).await[0]),
        "first"
    );
    let two = start(stop_two.clone());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        forwarder_lock_holders(&pubsub, &outbox_topic, "f").await,
        1,
        "one active forwarder"
    );
    // The active one stops; the standby takes the lock and forwards what comes next.
    stop_one.cancel();
    one.await.unwrap().unwrap();
    stage("second").await;
    assert_eq!(
        text(&receive(&mut consumer, 1, Duration::from_secs(10)).await[0]),
        "second"
    );
    assert_eq!(forwarder_lock_holders(&pubsub, &outbox_topic, "f").await, 1);
    stop_two.cancel();
    two.await.unwrap().unwrap();
    assert_eq!(
        forwarder_lock_holders(&pubsub, &outbox_topic, "f").await,
        0,
        "released on stop"
    );
    let _ = outbox;
}

#[tokio::test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn the_dedup_store_keeps_the_contract_across_instances() {
    let config = PgDedupConfig::default()
        .ttl(Duration::from_secs(2))
        .claim_ttl(Duration::from_secs(1));
    let store = PgDedupStore::new(&common::pubsub().await, config.clone());
    let other = PgDedupStore::new(&common::pubsub().await, config.clone());
    factline_messaging::testkit::dedup::check_dedup_store(
        &store,
        &other,
        config.claim_ttl,
        config.ttl,
    )
    .await;
    store.delete_expired().await.unwrap();
}

#[tokio::test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn a_forwarder_whose_session_ends_stops_with_lock_lost() {
    let pubsub = common::pubsub().await;
    let outbox_topic = unique("outbox-lost");
    let outbox = pubsub.outbox(&outbox_topic);
    let broker = InMemoryPubSub::new(InMemoryConfig::default());
    let target: Arc<dyn Publisher> = Arc::new(broker.publisher());
    let shutdown = CancellationToken::new();
    let run = tokio::spawn({
        let pubsub = pubsub.clone();
        let shutdown = shutdown.clone();
        async move {
            outbox
                .run_forwarder(&pubsub, "f", ForwarderConfig::new("x"), target, shutdown)
                .await
        }
    });
    let name = format!("factline_outbox:{}:{outbox_topic}:f", common::schema());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while forwarder_lock_holders(&pubsub, &outbox_topic, "f").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the forwarder took its lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The lock's session dies (a failover, an administrator, a network cut).
    let killed: bool = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = hashtext($1)::bigint",
    )
    .bind(name)
    .fetch_one(pubsub.pool())
    .await
    .unwrap();
    assert!(killed);
    let stopped = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the forwarder stops within 10 s of losing its lock")
        .unwrap();
    assert!(
        matches!(stopped, Err(factline_sql::RunForwarderError::LockLost(_))),
        "{stopped:?}"
    );
    shutdown.cancel();
}

#[tokio::test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn bad_settings_fail_at_connect_with_a_clear_error() {
    let started = std::time::Instant::now();
    let refused = factline_sql::postgres::PgPubSub::connect(PgPubSubConfig::new(
        "postgres://postgres:secret@127.0.0.1:1/test",
    ))
    .await
    .unwrap_err();
    let text = refused.to_string();
    assert!(matches!(refused, ConnectError::Connect { .. }), "{text}");
    assert!(
        text.contains("127.0.0.1:1") && !text.contains("secret"),
        "{text}"
    );

    let missing = factline_sql::postgres::PgPubSub::connect(PgPubSubConfig::new(format!(
        "{}_no_such_database",
        common::url()
    )))
    .await
    .unwrap_err();
    assert!(
        missing.to_string().contains("no_such_database"),
        "{missing}"
    );

    let not_a_url = factline_sql::postgres::PgPubSub::connect(PgPubSubConfig::new("mysql://x"))
        .await
        .unwrap_err();
    assert!(
        matches!(not_a_url, ConnectError::Connect { .. }),
        "{not_a_url}"
    );

    let schema = factline_sql::postgres::PgPubSub::connect(
        PgPubSubConfig::new(common::url()).schema("Bad-Name"),
    )
    .await
    .unwrap_err();
    assert!(matches!(schema, ConnectError::InvalidSchema(_)), "{schema}");

    let zero = factline_sql::postgres::PgPubSub::connect(
        PgPubSubConfig::new(common::url()).poll_interval(Duration::ZERO),
    )
    .await
    .unwrap_err();
    assert!(zero.to_string().contains("poll_interval"), "{zero}");

    // An address that drops packets: the connect timeout, not a hang.
    let unreachable = factline_sql::postgres::PgPubSub::connect(
        PgPubSubConfig::new("postgres://postgres@10.255.255.1:5432/test")
            .connect_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            unreachable,
            ConnectError::TimedOut { .. } | ConnectError::Connect { .. }
        ),
        "{unreachable}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn oversized_and_too_many_messages_are_refused_and_nothing_is_written() {
    let pubsub = common::pubsub_with(common::config()).await;
    let topic = unique("limits");
    let publisher = pubsub.publisher();
    let big = Message::new(vec![0u8; pubsub.message_size_bytes_max() + 1]);
    let error = publisher
        .publish(&topic, vec![Message::new("small"), big])
        .await
        .unwrap_err();
    assert!(error.to_string().contains("exceeds the limit"), "{error}");
    let many: Vec<Message> = (0..10_001).map(|_| Message::new("x")).collect();
    let error = publisher.publish(&topic, many).await.unwrap_err();
    assert!(error.to_string().contains("limit of 10000"), "{error}");
    let subscriber = pubsub.subscriber();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    nothing_within(&mut stream, Duration::from_millis(700)).await;
    subscriber.close().await.unwrap();
}

/// One scripted transaction of the property test.
#[derive(Debug, Clone)]
struct Script {
    messages: usize,
    commit: bool,
    hold_ms: u64,
}

fn scripts() -> impl Strategy<Value = Vec<Script>> {
    prop::collection::vec(
        (1usize..4, prop::bool::weighted(0.8), 0u64..60).prop_map(|(messages, commit, hold_ms)| {
            Script {
                messages,
                commit,
                hold_ms,
            }
        }),
        2..10,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// Concurrent transactions that publish, wait a random time and commit or roll back: a
    /// group reading all along gets every committed message exactly once and no rolled-back
    /// one, whatever the commit order (the model: the set of committed messages).
    #[test]
    #[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
    fn a_group_gets_every_committed_message_once_whatever_the_commit_order(scripts in scripts()) {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let pubsub = common::pubsub().await;
            let topic = unique("model");
            let subscriber = pubsub.subscriber_in_group("model").unwrap();
            let mut stream = subscriber.subscribe(&topic).await.unwrap();
            // The group reads all along, while the transactions commit.
            let received = Arc::new(std::sync::Mutex::new(Vec::<Message>::new()));
            let reader = tokio::spawn({
                let received = Arc::clone(&received);
                async move {
                    while let Some(item) = stream.next().await {
                        let message = item.expect("no receive error");
                        message.ack();
                        received.lock().unwrap().push(message);
                    }
                }
            });
            let mut tasks = Vec::new();
            for (t, script) in scripts.iter().cloned().enumerate() {
                let pubsub = pubsub.clone();
                let topic = topic.clone();
                tasks.push(tokio::spawn(async move {
                    let publisher = pubsub.publisher();
                    let mut tx = pubsub.pool().begin().await.unwrap();
                    let messages: Vec<Message> = (0..script.messages)
                        .map(|n| Message::new(format!("t{t}-{n}")))
                        .collect();
                    publisher.publish_in(&mut tx, &topic, messages.clone()).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(script.hold_ms)).await;
                    if script.commit {
                        tx.commit().await.unwrap();
                        messages
                    } else {
                        tx.rollback().await.unwrap();
                        Vec::new()
                    }
                }));
            }
            let mut committed = Vec::new();
            for task in tasks {
                committed.extend(task.await.unwrap());
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while received.lock().unwrap().len() < committed.len() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "only {} of {} committed messages arrived",
                    received.lock().unwrap().len(),
                    committed.len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            subscriber.close().await.unwrap();
            reader.await.unwrap();
            let got = received.lock().unwrap().clone();
            let got_ids: Vec<_> = got.iter().map(|m| m.id.clone()).collect();
            let unique_ids: HashSet<_> = got_ids.iter().cloned().collect();
            assert_eq!(unique_ids.len(), got_ids.len(), "a message came twice");
            let wanted: HashSet<_> = committed.iter().map(|m| m.id.clone()).collect();
            assert_eq!(unique_ids, wanted);
            // Within one transaction, publish order holds.
            for (t, _) in scripts.iter().enumerate() {
                let own: Vec<String> = got.iter().map(text).filter(|s| s.starts_with(&format!("t{t}-"))).collect();
                let mut sorted = own.clone();
                sorted.sort();
                assert_eq!(own, sorted);
            }
        });
    }
}
