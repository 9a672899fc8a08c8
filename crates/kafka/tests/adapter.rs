//! What the Kafka adapter promises beyond the shared suite: bad configuration fails at connect
//! (or at first use of a missing topic) with an error that says what is wrong, and no hang;
//! one key's messages keep their order while several keys spread over the partitions; records
//! other clients produce are delivered with an id of their own; and a group's committed offset
//! never passes a message that was not acked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{config, next, url};
use factline_kafka::{ConnectError, ID_HEADER, KafkaConfig, KafkaPubSub};
use factline_messaging::testkit::support::unique_name;
use factline_messaging::{
    Message, MessageStream, Metadata, PublishError, Publisher as _, SubscribeError, Subscriber as _,
};
use futures::StreamExt as _;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Nothing more arrives within `quiet`.
async fn assert_silent(stream: &mut MessageStream, quiet: Duration, what: &str) {
    if let Ok(Some(item)) = tokio::time::timeout(quiet, stream.next()).await {
        panic!("{what}: expected nothing more, got {item:?}");
    }
}

fn keyed(key: &str, seq: usize) -> Message {
    Message::new(format!("{key}/{seq}"))
        .with_metadata(Metadata::PARTITION_KEY, key)
        .with_metadata("seq", seq.to_string())
}

fn seq(message: &Message) -> usize {
    message.metadata.get("seq").unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: set FACTLINE_TEST_KAFKA_URL"]
async fn bad_configuration_is_an_error_at_connect() {
    let started = Instant::now();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = KafkaPubSub::connect(
        KafkaConfig::new(format!("127.0.0.1:{port}")).connect_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            refused,
            ConnectError::Unreachable {
                timeout_ms: 2000,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(
        refused.to_string().contains(&format!("127.0.0.1:{port}")),
        "names the address: {refused}"
    );

    let scheme = KafkaPubSub::connect(KafkaConfig::new("http://127.0.0.1:9092"))
        .await
        .unwrap_err();
    assert!(
        matches!(scheme, ConnectError::InvalidUrl { .. }),
        "{scheme:?}"
    );
    let no_port = KafkaPubSub::connect(KafkaConfig::new("kafka://127.0.0.1"))
        .await
        .unwrap_err();
    assert!(
        matches!(no_port, ConnectError::InvalidUrl { .. }),
        "{no_port:?}"
    );

    let zero = KafkaPubSub::connect(config().in_flight_max(0))
        .await
        .unwrap_err();
    assert!(
        matches!(
            zero,
            ConnectError::InvalidConfig {
                field: "in_flight_max",
                ..
            }
        ),
        "{zero:?}"
    );

    let unknown = KafkaPubSub::connect(config().client_option("no.such.setting", "1"))
        .await
        .unwrap_err();
    assert!(matches!(unknown, ConnectError::Client(_)), "{unknown:?}");
    assert!(
        unknown.to_string().contains("no.such.setting"),
        "names the setting: {unknown}"
    );

    // A login the broker cannot take (this broker speaks plaintext only): a clear error within
    // the connect timeout, the password not shown.
    let login = KafkaPubSub::connect(
        config()
            .connect_timeout(Duration::from_secs(3))
            .client_option("security.protocol", "SASL_PLAINTEXT")
            .client_option("sasl.mechanism", "PLAIN")
            .client_option("sasl.username", "factline")
            .client_option("sasl.password", "hunter2-secret"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(login, ConnectError::Unreachable { .. }),
        "{login:?}"
    );
    assert!(
        !login.to_string().contains("hunter2-secret"),
        "the password is not shown: {login}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "no hang: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: set FACTLINE_TEST_KAFKA_URL"]
async fn a_missing_topic_is_an_error_that_names_it_when_creation_is_off() {
    let kafka = KafkaPubSub::connect(config().create_topics(false))
        .await
        .unwrap();
    let topic = unique_name("missing");
    let published = kafka
        .publisher()
        .publish(&topic, vec![Message::new("x")])
        .await
        .unwrap_err();
    assert!(
        matches!(published, PublishError::Transport(_)),
        "{published:?}"
    );
    assert!(
        published.to_string().contains(&topic),
        "names the topic: {published}"
    );
    let subscriber = kafka.subscriber_in_group("missing").unwrap();
    let subscribed = subscriber.subscribe(&topic).await.unwrap_err();
    assert!(
        matches!(subscribed, SubscribeError::Transport(_)),
        "{subscribed:?}"
    );
    assert!(
        subscribed.to_string().contains(&topic),
        "names the topic: {subscribed}"
    );

    // Once it exists (made by a connection that may create topics), it is used.
    let creating = KafkaPubSub::connect(config()).await.unwrap();
    creating
        .publisher()
        .publish(&topic, vec![Message::new("made")])
        .await
        .unwrap();
    kafka
        .publisher()
        .publish(&topic, vec![Message::new("now it exists")])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: set FACTLINE_TEST_KAFKA_URL"]
async fn topic_and_group_names_kafka_cannot_take_are_refused() {
    let kafka = KafkaPubSub::connect(config()).await.unwrap();
    let publisher = kafka.publisher();
    for bad in [
        "with space",
        "slash/topic",
        "ümlaut",
        "..",
        &"x".repeat(250),
    ] {
        let error = publisher
            .publish(bad, vec![Message::new("x")])
            .await
            .unwrap_err();
        assert!(
            matches!(error, PublishError::InvalidTopic(_)),
            "{bad:?}: {error:?}"
        );
        let subscribed = kafka.subscriber().subscribe(bad).await.unwrap_err();
        assert!(
            matches!(subscribed, SubscribeError::InvalidTopic(_)),
            "{bad:?}: {subscribed:?}"
        );
    }
    assert!(kafka.subscriber_in_group("").is_err());
    assert!(kafka.subscriber_in_group("bell\u{7}").is_err());
    assert!(kafka.subscriber_in_group(&"g".repeat(300)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: set FACTLINE_TEST_KAFKA_URL"]
async fn too_large_a_message_is_refused_before_it_is_sent() {
    let kafka = KafkaPubSub::connect(config().message_size_bytes_max(10_000))
        .await
        .unwrap();
    let error = kafka
        .publisher()
        .publish(
            &unique_name("large"),
            vec![Message::new(vec![0_u8; 20_000])],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            PublishError::MessageTooLarge {
                size_bytes_max: 10_000,
                ..
            }
        ),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: set FACTLINE_TEST_KAFKA_URL"]
async fn each_key_keeps_its_order_while_keys_spread_over_partitions() {
    let kafka = KafkaPubSub::connect(config()).await.unwrap();
    let topic = unique_name("keys");
    let subscriber = kafka.subscriber_in_group(&unique_name("keys")).unwrap();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    let keys: Vec<String> = (0..8).map(|k| format!("stream-{k}")).collect();
    let per_key = 40;
    let publisher = kafka.publisher();
    // Interleaved calls, each with a run of every key.
    for round in 0..(per_key / 4) {
        let mut batch = Vec::new();
        for key in &keys {
            for i in 0..4 {
                batch.push(keyed(key, round * 4 + i));
            }
        }
        publisher.publish(&topic, batch).await.unwrap();
    }
    let total = keys.len() * per_key;
    let mut next_seq: HashMap<String, usize> = HashMap::new();
    for _ in 0..total {
        let message = next(&mut stream, "keyed").await;
        let key = message.partition_key().unwrap().to_owned();
        let expected = next_seq.entry(key.clone()).or_insert(0);
        assert_eq!(seq(&message), *expected, "key {key} out of order");
        *expected += 1;
        assert!(message.ack());
    }
    assert!(next_seq.values().all(|&n| n == per_key), "{next_seq:?}");
    subscriber.close().await.unwrap();

    // The keys really were spread (so the order above held across partitions, not inside a
    // single one): murmur2 sends these 8 keys to more than one of the 4 partitions.
    let partitions = partitions_holding(&topic).await;
    assert!(
        partitions > 1,
        "8 keys landed in {partitions} of the topic's partitions"
    );
}

/// How many partitions of `topic` hold records (their high watermark is above 0).
async fn partitions_holding(topic: &str) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", url())
            .set("group.id", unique_name("watermarks"))
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .unwrap();
        let partitions: Vec<i32> = metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| p.id())
            .collect();
        partitions
            .into_iter()
            .filter(|&p| {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(5))
                    .unwrap();
                high > 0
            })
            .count()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: set FACTLINE_TEST_KAFKA_URL"]
async fn records_from_other_clients_arrive_with_an_id_of_their_own() {
    let kafka = KafkaPubSub::connect(config()).await.unwrap();
    let topic = unique_name("foreign");
    let subscriber = kafka.subscriber();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", url())
        .create()
        .unwrap();
    let bare = FutureRecord::<str, str>::to(&topic)
        .key("account-7")
        .payload("no headers at all");
    let bare_delivery = producer
        .send(bare, Duration::from_secs(10))
        .await
        .map_err(|(error, _)| error)
        .unwrap();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: ID_HEADER,
            value: Some(""),
        })
        .insert(Header {
            key: "trace",
            value: Some("abc"),
        });
    let odd = FutureRecord::<str, str>::to(&topic)
        .key("account-7")
        .payload("an empty id header")
        .headers(headers);
    let odd_delivery = producer
        .send(odd, Duration::from_secs(10))
        .await
        .map_err(|(error, _)| error)
        .unwrap();

    let first = next(&mut stream, "bare record").await;
    assert_eq!(
        first.id.to_text(),
        format!(
            "kafka-{topic}-{}-{}",
            bare_delivery.partition, bare_delivery.offset
        )
    );
    assert_eq!(&first.payload[..], b"no headers at all");
    assert_eq!(first.partition_key(), Some("account-7"));
    assert!(first.ack());
    let second = next(&mut stream, "record with a bad id header").await;
    assert_eq!(
        second.id.to_text(),
        format!(
            "kafka-{topic}-{}-{}",
            odd_delivery.partition, odd_delivery.offset
        )
    );
    assert_eq!(second.metadata.get("trace"), Some("abc"));
    assert!(second.ack());

    // Another client may name its records itself: any non-empty text is an id.
    let named = FutureRecord::<str, str>::to(&topic)
        .key("account-7")
        .payload("named by its producer")
        .headers(OwnedHeaders::new().insert(Header {
            key: ID_HEADER,
            value: Some("order-42-placed"),
        }));
    producer
        .send(named, Duration::from_secs(10))
        .await
        .map_err(|(error, _)| error)
        .unwrap();
    let third = next(&mut stream, "record named by its producer").await;
    assert_eq!(third.id.to_text(), "order-42-placed");
    assert!(third.ack());
    subscriber.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: set FACTLINE_TEST_KAFKA_URL"]
async fn a_group_resumes_at_the_first_message_it_did_not_ack() {
    let kafka = KafkaPubSub::connect(config()).await.unwrap();
    let topic = unique_name("resume");
    let group = unique_name("resume");
    let publisher = kafka.publisher();
    let sent: Vec<Message> = (0..10).map(|i| keyed("one-key", i)).collect();

    let subscriber = kafka.subscriber_in_group(&group).unwrap();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    publisher.publish(&topic, sent.clone()).await.unwrap();
    let mut held = Vec::new();
    for expected in 0..10 {
        let message = next(&mut stream, "first member").await;
        assert_eq!(seq(&message), expected);
        // Acks 0, 1, 2 and 4, 5: 3 stays unacked, so the committed offset stops before it.
        if [0, 1, 2, 4, 5].contains(&expected) {
            assert!(message.ack());
        } else {
            held.push(message);
        }
    }
    // Let the stored offsets be committed (every 100 ms here) before the member leaves; the
    // unsettled messages are dropped with the subscription.
    tokio::time::sleep(Duration::from_millis(500)).await;
    subscriber.close().await.unwrap();
    drop(held);

    let again = kafka.subscriber_in_group(&group).unwrap();
    let mut resumed = again.subscribe(&topic).await.unwrap();
    for expected in 3..10 {
        let message = next(&mut resumed, "second member").await;
        assert_eq!(
            seq(&message),
            expected,
            "resumes at the first unacked message (3) and redelivers what came after it"
        );
        assert!(message.ack());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    again.close().await.unwrap();

    // All acked: a third member gets nothing old.
    let third = kafka.subscriber_in_group(&group).unwrap();
    let mut fresh = third.subscribe(&topic).await.unwrap();
    let last = keyed("one-key", 10);
    publisher.publish(&topic, vec![last.clone()]).await.unwrap();
    let received = next(&mut fresh, "third member").await;
    assert_eq!(received.id, last.id);
    assert!(received.ack());
    assert_silent(&mut fresh, Duration::from_secs(2), "third member").await;
    third.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka: set FACTLINE_TEST_KAFKA_URL"]
async fn a_subscription_holds_at_in_flight_max_and_goes_on_when_acks_come() {
    let kafka = KafkaPubSub::connect(config().in_flight_max(8))
        .await
        .unwrap();
    let topic = unique_name("in_flight");
    let publisher = kafka.publisher();
    let sent: Vec<Message> = (0..30).map(|i| keyed("one-key", i)).collect();
    publisher.publish(&topic, sent).await.unwrap();
    let subscriber = kafka
        .subscriber_in_group(&unique_name("in_flight"))
        .unwrap();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    let mut held = Vec::new();
    for expected in 0..8 {
        let message = next(&mut stream, "up to the limit").await;
        assert_eq!(seq(&message), expected);
        held.push(message);
    }
    // At the limit nothing more comes, also once the assignment is paused (after 1 s).
    assert_silent(&mut stream, Duration::from_secs(2), "at in_flight_max").await;
    // Acking down to half resumes; the rest arrives in order.
    for message in held.drain(..4) {
        assert!(message.ack());
    }
    for expected in 8..30 {
        let message = next(&mut stream, "after the acks").await;
        assert_eq!(seq(&message), expected);
        held.push(message);
        if held.len() >= 6 {
            for message in held.drain(..) {
                assert!(message.ack());
            }
        }
    }
    for message in held {
        assert!(message.ack());
    }
    subscriber.close().await.unwrap();
}
