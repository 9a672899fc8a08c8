//! MariaDB beyond the conformance suite: late commits, transactions, the outbox, bad settings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mysql_common;
mod outbox_common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use factline_messaging::{
    Forwarder, ForwarderConfig, InMemoryConfig, InMemoryPubSub, Message, MessageStream, Publisher,
    Subscriber,
};
use factline_sql::DedupConfig;
use factline_sql::mysql::{ConnectError, MySqlDedupStore, MySqlPubSub, MySqlPubSubConfig};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

fn unique(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::now_v7().simple())
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
#[ignore = "needs MariaDB: set FACTLINE_TEST_MYSQL_URL"]
async fn a_publish_that_commits_late_is_neither_skipped_nor_overtaken() {
    let pubsub = mysql_common::pubsub().await;
    let topic = unique("late");
    let subscriber = pubsub.subscriber_in_group("g").unwrap();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    let mut early = pubsub.pool().begin().await.unwrap();
    pubsub
        .publisher()
        .publish_in(&mut early, &topic, vec![Message::new("early")])
        .await
        .unwrap();
    // A second publish to the topic waits for the first transaction: offsets follow commits.
    let late = tokio::spawn({
        let pubsub = pubsub.clone();
        let topic = topic.clone();
        async move {
            pubsub
                .publisher()
                .publish(&topic, vec![Message::new("late")])
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !late.is_finished(),
        "the later publish waits for the open transaction"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next())
            .await
            .is_err()
    );
    early.commit().await.unwrap();
    late.await.unwrap().unwrap();
    let got = receive(&mut stream, 2).await;
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), ["early", "late"]);
    subscriber.close().await.unwrap();
}

#[tokio::test]
#[ignore = "needs MariaDB: set FACTLINE_TEST_MYSQL_URL"]
async fn concurrent_transactions_lose_nothing_whatever_commits() {
    let pubsub = mysql_common::pubsub().await;
    let topic = unique("many");
    let subscriber = pubsub.subscriber_in_group("g").unwrap();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let pubsub = pubsub.clone();
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = pubsub.pool().begin().await.unwrap();
            let messages: Vec<Message> = (0..3).map(|n| Message::new(format!("{t}-{n}"))).collect();
            pubsub
                .publisher()
                .publish_in(&mut tx, &topic, messages.clone())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5 * (t % 4))).await;
            if t % 3 == 2 {
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
    assert_eq!(ids.len(), got.len());
    assert_eq!(ids, committed);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.next())
            .await
            .is_err(),
        "nothing of the rolled-back transactions"
    );
    subscriber.close().await.unwrap();
}

#[tokio::test]
#[ignore = "needs MariaDB: set FACTLINE_TEST_MYSQL_URL"]
async fn the_outbox_forwards_committed_messages_in_order() {
    let pubsub = mysql_common::pubsub().await;
    let outbox = unique("outbox");
    let broker = InMemoryPubSub::new(InMemoryConfig::default().persistent(true));
    let mut consumer = broker.subscriber().subscribe("orders").await.unwrap();
    let mut staged = Vec::new();
    for n in 0..12 {
        let mut tx = pubsub.pool().begin().await.unwrap();
        let message = Message::new(format!("order {n}"));
        pubsub
            .stage(&mut tx, &outbox, "orders", vec![message.clone()])
            .await
            .unwrap();
        if n % 4 == 3 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
            staged.push(message);
        }
    }
    let forwarder = Forwarder::new(
        ForwarderConfig::new(outbox.clone()),
        Arc::new(pubsub.subscriber_in_group("forwarder").unwrap()),
        Arc::new(broker.publisher()) as Arc<dyn Publisher>,
    );
    let shutdown = CancellationToken::new();
    let run = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { forwarder.run(shutdown).await }
    });
    let got = receive(&mut consumer, staged.len()).await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    let ids: Vec<_> = got.iter().map(|m| m.id.clone()).collect();
    let wanted: Vec<_> = staged.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids, wanted);
}

#[tokio::test]
#[ignore = "needs MariaDB: set FACTLINE_TEST_MYSQL_URL"]
async fn one_outbox_forwarder_runs_at_a_time_and_a_standby_takes_over() {
    let pubsub = mysql_common::pubsub().await;
    let outbox = unique("outbox");
    let start = |target: Arc<dyn Publisher>, shutdown: CancellationToken| {
        let pubsub = pubsub.clone();
        let outbox = outbox.clone();
        tokio::spawn(async move {
            pubsub
                .run_forwarder(
                    &outbox,
                    "forwarder",
                    ForwarderConfig::new("x"),
                    target,
                    shutdown,
                )
                .await
        })
    };
    let stage = |payload: &'static str| {
        let pubsub = pubsub.clone();
        let outbox = outbox.clone();
        async move {
            let mut tx = pubsub.pool().begin().await.unwrap();
            pubsub
                .stage(&mut tx, &outbox, "dest", vec![Message::new(payload)])
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    };
    outbox_common::one_forwarder_at_a_time(start, stage).await;
}

#[tokio::test]
#[ignore = "needs MariaDB: set FACTLINE_TEST_MYSQL_URL"]
async fn the_dedup_store_keeps_the_contract_across_instances() {
    let config = DedupConfig::default()
        .ttl(Duration::from_secs(2))
        .claim_ttl(Duration::from_secs(1));
    let first = MySqlDedupStore::new(&mysql_common::pubsub().await, config.clone());
    let second = MySqlDedupStore::new(&mysql_common::pubsub().await, config.clone());
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
#[ignore = "needs MariaDB: set FACTLINE_TEST_MYSQL_URL"]
async fn bad_settings_fail_at_connect_with_a_clear_error() {
    let server = mysql_common::server_url();
    let base = server
        .rsplit_once('/')
        .map_or(server.as_str(), |(base, _)| base);
    let missing = MySqlPubSub::connect(MySqlPubSubConfig::new(format!(
        "{base}/no_such_database_factline"
    )))
    .await
    .unwrap_err();
    assert!(matches!(missing, ConnectError::Open { .. }), "{missing}");
    assert!(
        missing.to_string().contains("no_such_database_factline"),
        "{missing}"
    );
    let refused = MySqlPubSub::connect(MySqlPubSubConfig::new(
        "mysql://root:secret@127.0.0.1:1/test",
    ))
    .await
    .unwrap_err();
    assert!(!refused.to_string().contains("secret"), "{refused}");
    let wrong_user = MySqlPubSub::connect(MySqlPubSubConfig::new(
        "mysql://nobody_factline:bad@127.0.0.1:3306/test",
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(wrong_user, ConnectError::Open { .. }),
        "{wrong_user}"
    );
    let zero = MySqlPubSub::connect(
        MySqlPubSubConfig::new(mysql_common::url().await).poll_interval(Duration::ZERO),
    )
    .await
    .unwrap_err();
    assert!(zero.to_string().contains("poll_interval"), "{zero}");
}
