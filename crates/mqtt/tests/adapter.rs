//! What the MQTT adapter promises beyond the shared suite: bad configuration fails at connect
//! (typed, within the connect timeout), publishes from other MQTT clients are received with an
//! id of their own, a named session gets what was published while it was away and what it left
//! unacknowledged, and topics MQTT cannot name are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use factline_messaging::{
    Message, MessageStream, PublishError, Publisher as _, SubscribeError, Subscriber as _,
};
use factline_mqtt::{ConnectError, MqttConfig, MqttPubSub};
use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn url() -> String {
    std::env::var("FACTLINE_TEST_MQTT_URL")
        .expect("FACTLINE_TEST_MQTT_URL must name an MQTT broker (see scripts/test-all)")
}

fn unique(label: &str) -> String {
    format!("fl_{label}_{}", uuid::Uuid::new_v4().simple())
}

fn config() -> MqttConfig {
    MqttConfig::new(url())
        .topic_prefix("fltest/")
        .client_id_prefix("fltest-")
        .session_expiry(Duration::from_secs(300))
}

async fn next(stream: &mut MessageStream) -> Message {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a message within 10 s")
        .expect("the stream goes on")
        .expect("no receive error")
}

async fn quiet(stream: &mut MessageStream) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
        panic!("expected nothing, got {item:?}");
    }
}

/// A TCP server on a free port that answers every CONNECT with `reply` (or nothing).
async fn fake_broker(reply: Option<&'static [u8]>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 1024];
                let _ = socket.read(&mut buffer).await;
                if let Some(reply) = reply {
                    let _ = socket.write_all(reply).await;
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_an_error_at_connect() {
    let started = Instant::now();
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = MqttPubSub::connect(
        MqttConfig::new(format!("mqtt://127.0.0.1:{port}")).connect_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(refused, ConnectError::Connect { .. }),
        "{refused:?}"
    );

    for bad in [
        "http://127.0.0.1:1883",
        "mqtts://127.0.0.1",
        "mqtt://",
        "127.0.0.1:1883",
    ] {
        let error = MqttPubSub::connect(MqttConfig::new(bad)).await.unwrap_err();
        assert!(
            matches!(error, ConnectError::InvalidUrl { .. }),
            "{bad}: {error:?}"
        );
    }
    let zero = MqttPubSub::connect(MqttConfig::new("mqtt://127.0.0.1:1883").in_flight_max(0))
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

    // A broker that refuses the credentials (CONNACK, MQTT 5 reason 0x87 "not authorized").
    let refusing = fake_broker(Some(&[0x20, 0x03, 0x00, 0x87, 0x00])).await;
    let error = MqttPubSub::connect(
        MqttConfig::new(format!("mqtt://user:hunter2@127.0.0.1:{refusing}"))
            .connect_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, ConnectError::Refused { .. }), "{error:?}");
    assert!(
        !text.contains("hunter2"),
        "the password is not shown: {text}"
    );

    // A server that accepts the connection and never answers: a timeout, not a hang.
    let silent = fake_broker(None).await;
    let before = Instant::now();
    let error = MqttPubSub::connect(
        MqttConfig::new(format!("mqtt://127.0.0.1:{silent}"))
            .connect_timeout(Duration::from_millis(1_500)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            error,
            ConnectError::TimedOut {
                timeout_ms: 1_500,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        before.elapsed() < Duration::from_secs(3),
        "{:?}",
        before.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(10), "no hang");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: set FACTLINE_TEST_MQTT_URL"]
async fn publishes_from_other_clients_get_an_id_and_keep_their_payload() {
    let pubsub = MqttPubSub::connect(config()).await.unwrap();
    let topic = unique("foreign");
    let subscriber = pubsub.subscriber();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();

    let (host, port) = ("127.0.0.1", 1883);
    let mut options = rumqttc::v5::MqttOptions::new(unique("fltest-raw"), host, port);
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 10);
    let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
        .publish(
            format!("fltest/{topic}"),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            bytes::Bytes::from_static(b"plain \x00 bytes"),
        )
        .await
        .unwrap();

    let received = next(&mut stream).await;
    assert_eq!(&received.payload[..], b"plain \x00 bytes");
    assert!(received.metadata.is_empty(), "{:?}", received.metadata);
    assert!(
        received.id.as_uuid().is_some(),
        "a generated id: {}",
        received.id
    );
    // A nack keeps the message (and its id) for a redelivery on the same subscription.
    received.nack();
    let again = next(&mut stream).await;
    assert_eq!(again.id, received.id);
    again.ack();
    quiet(&mut stream).await;
    subscriber.close().await.unwrap();
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: set FACTLINE_TEST_MQTT_URL"]
async fn a_named_session_gets_what_was_published_while_it_was_away() {
    let pubsub = MqttPubSub::connect(config()).await.unwrap();
    let topic = unique("session");
    let session = unique("worker");
    let publisher = pubsub.publisher();

    let first = pubsub.subscriber_with_session(&session).unwrap();
    let mut stream = first.subscribe(&topic).await.unwrap();
    let before: Vec<Message> = (0..3)
        .map(|i| Message::new(format!("before {i}")))
        .collect();
    publisher.publish(&topic, before.clone()).await.unwrap();
    let one = next(&mut stream).await;
    assert!(one.same_content(&before[0]));
    one.ack();
    let two = next(&mut stream).await;
    let three = next(&mut stream).await;
    // The second is left unsettled (no PUBACK), the third nacked: both stay with the session.
    three.nack();
    first.close().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .is_none()
    );
    drop((two, three, stream));

    let away: Vec<Message> = (0..2).map(|i| Message::new(format!("away {i}"))).collect();
    publisher.publish(&topic, away.clone()).await.unwrap();

    let second = pubsub.subscriber_with_session(&session).unwrap();
    let mut stream = second.subscribe(&topic).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        let message = next(&mut stream).await;
        message.ack();
        got.push(message);
    }
    let expected = [&before[1], &before[2], &away[0], &away[1]];
    for message in expected {
        assert!(
            got.iter().any(|m| m.same_content(message)),
            "{:?} missing from {got:?}",
            message.id
        );
    }
    quiet(&mut stream).await;
    second.close().await.unwrap();
    drop(stream);

    // Everything acked: a third subscription of the session gets nothing.
    let third = pubsub.subscriber_with_session(&session).unwrap();
    let mut stream = third.subscribe(&topic).await.unwrap();
    quiet(&mut stream).await;
    third.close().await.unwrap();
    assert!(pubsub.subscriber_with_session("bad name").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: set FACTLINE_TEST_MQTT_URL"]
async fn topics_mqtt_cannot_name_and_oversized_messages_are_refused() {
    let pubsub = MqttPubSub::connect(config().message_size_bytes_max(64 * 1024))
        .await
        .unwrap();
    let publisher = pubsub.publisher();
    let subscriber = pubsub.subscriber();
    for bad in ["a/+/b", "a/#", "#", "+"] {
        let published = publisher.publish(bad, vec![Message::new("x")]).await;
        assert!(
            matches!(published, Err(PublishError::InvalidTopic(_))),
            "{bad}"
        );
        let subscribed = subscriber.subscribe(bad).await;
        assert!(
            matches!(subscribed, Err(SubscribeError::InvalidTopic(_))),
            "{bad}"
        );
    }
    // `$` is reserved only at the start of the full name: under a prefix it is fine.
    assert_eq!(pubsub.topic_name("$x").unwrap(), "fltest/$x");
    let unprefixed = MqttPubSub::connect(MqttConfig::new(url())).await.unwrap();
    assert!(unprefixed.topic_name("$SYS/x").is_err());

    let topic = unique("too_large");
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    let large = Message::new(vec![0u8; 64 * 1024]);
    match publisher.publish(&topic, vec![large]).await {
        Err(PublishError::MessageTooLarge {
            size_bytes,
            size_bytes_max,
            ..
        }) => {
            assert_eq!(size_bytes_max, 64 * 1024);
            assert!(size_bytes > size_bytes_max);
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    // The connection is still good.
    let small = Message::new(vec![1u8; 60 * 1024]);
    publisher
        .publish(&topic, vec![small.clone()])
        .await
        .unwrap();
    let got = next(&mut stream).await;
    assert!(got.same_content(&small));
    got.ack();
    subscriber.close().await.unwrap();
}
