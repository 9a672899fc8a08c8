//! Broker restarts, with the restart command in `FACTLINE_TEST_KAFKA_RESTART`.
//!
//! tansu, the broker scripts/test-all starts, keeps everything in memory: after a restart every
//! topic, message and committed offset is gone, which to a client looks as if every topic was
//! deleted and created again under the same name. librdkafka does not support a topic being
//! re-created under a live client (confluentinc/librdkafka#4898: clients must be restarted;
//! here its consumer crashed with SIGSEGV once the topic came back with a new topic id). So the
//! conformance suite's restart case, which keeps using one topic across the restart, runs only
//! against a broker that keeps its data (Apache Kafka, Redpanda): set
//! `FACTLINE_TEST_KAFKA_DURABLE=1` with the restart command.
//!
//! Against tansu, [`clients_recover_after_a_volatile_broker_restart`] checks what a restart
//! without data can show: the connection's producer, admin client and subscribers made before
//! the restart publish and receive again afterwards — on topics created after it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{KafkaFixture, next, restart_command, restart_config};
use factline_kafka::KafkaPubSub;
use factline_messaging::testkit::support::unique_name;
use factline_messaging::testkit::{Verdict, cases, run_restart_command};
use factline_messaging::{Message, MessageStream, Publisher as _, Subscriber as _};

const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kafka broker that keeps its data: set FACTLINE_TEST_KAFKA_URL, \
            FACTLINE_TEST_KAFKA_RESTART and FACTLINE_TEST_KAFKA_DURABLE=1"]
async fn reconnect_after_broker_restart_loses_nothing() {
    if std::env::var("FACTLINE_TEST_KAFKA_DURABLE").is_err() {
        println!(
            "skipped: FACTLINE_TEST_KAFKA_DURABLE is not set (the test broker, tansu, keeps \
             nothing across a restart; see clients_recover_after_a_volatile_broker_restart)"
        );
        return;
    }
    let fixture = KafkaFixture::restartable().await;
    assert!(
        fixture.restart_command.is_some(),
        "FACTLINE_TEST_KAFKA_DURABLE needs FACTLINE_TEST_KAFKA_RESTART"
    );
    let verdict = cases::reconnect_after_broker_restart_loses_nothing(Arc::new(fixture)).await;
    assert_eq!(verdict, Verdict::Passed);
}

async fn receive(stream: &mut MessageStream, what: &str) -> Message {
    let message = next(stream, what).await;
    assert!(message.ack(), "{what}: the ack was not taken");
    message
}

async fn publish_retrying(kafka: &KafkaPubSub, topic: &str, message: &Message) {
    let publisher = kafka.publisher();
    let deadline = tokio::time::Instant::now() + PUBLISH_RETRY_FOR;
    loop {
        match publisher.publish(topic, vec![message.clone()]).await {
            Ok(()) => return,
            Err(error) if tokio::time::Instant::now() < deadline => {
                println!("publish after the restart failed, retrying: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => {
                panic!("publishing after the restart failed for {PUBLISH_RETRY_FOR:?}: {error}")
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: set FACTLINE_TEST_KAFKA_URL and FACTLINE_TEST_KAFKA_RESTART"]
async fn clients_recover_after_a_volatile_broker_restart() {
    let Some(command) = restart_command() else {
        println!("skipped: FACTLINE_TEST_KAFKA_RESTART is not set");
        return;
    };
    let kafka = KafkaPubSub::connect(restart_config()).await.unwrap();
    let publisher = kafka.publisher();
    let grouped = kafka
        .subscriber_in_group(&unique_name("restart_group"))
        .unwrap();
    let plain = kafka.subscriber();

    let before = unique_name("restart_before");
    let mut grouped_before = grouped.subscribe(&before).await.unwrap();
    let mut plain_before = plain.subscribe(&before).await.unwrap();
    let first = Message::new("before the restart").with_metadata("partition_key", "k");
    publisher
        .publish(&before, vec![first.clone()])
        .await
        .unwrap();
    assert_eq!(
        receive(&mut grouped_before, "group, before").await.id,
        first.id
    );
    assert_eq!(
        receive(&mut plain_before, "plain, before").await.id,
        first.id
    );
    // Their topic is gone with the restart; they must not be used with it again (see above).
    drop((grouped_before, plain_before));

    run_restart_command(Some(&command), "FACTLINE_TEST_KAFKA_RESTART")
        .await
        .unwrap();

    let after = unique_name("restart_after");
    let second = Message::new("after the restart").with_metadata("partition_key", "k");
    publish_retrying(&kafka, &after, &second).await;
    let mut grouped_after = grouped.subscribe(&after).await.unwrap();
    let mut plain_after = plain.subscribe(&after).await.unwrap();
    assert_eq!(
        receive(&mut grouped_after, "group, after").await.id,
        second.id
    );
    assert_eq!(
        receive(&mut plain_after, "plain, after").await.id,
        second.id
    );

    // And live: published while both subscriptions wait.
    let third = Message::new("live after the restart").with_metadata("partition_key", "k");
    publisher
        .publish(&after, vec![third.clone()])
        .await
        .unwrap();
    assert_eq!(
        receive(&mut grouped_after, "group, live").await.id,
        third.id
    );
    assert_eq!(receive(&mut plain_after, "plain, live").await.id, third.id);

    grouped.close().await.unwrap();
    plain.close().await.unwrap();
    publisher.close().await.unwrap();
}
