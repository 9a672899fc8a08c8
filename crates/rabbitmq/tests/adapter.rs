//! What the RabbitMQ adapter promises beyond the shared suite: bad configuration fails at
//! connect with a typed error within the connect timeout, messages other AMQP clients publish
//! are delivered sensibly, and a message over the size limit is refused before it is sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use factline_messaging::{Message, PublishError, Publisher as _, Subscriber as _};
use factline_rabbitmq::{ConnectError, RabbitConfig, RabbitPubSub};
use futures::StreamExt as _;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const PREFIX: &str = "fltest.";

fn url() -> String {
    std::env::var("FACTLINE_TEST_AMQP_URL")
        .expect("FACTLINE_TEST_AMQP_URL must name a RabbitMQ broker (see scripts/test-all)")
}

fn unique(label: &str) -> String {
    format!("fl_{label}_{}", uuid::Uuid::new_v4().simple())
}

fn config(url: impl Into<String>) -> RabbitConfig {
    RabbitConfig::new(url)
        .name_prefix(PREFIX)
        .auto_delete_exchanges(true)
        .connect_timeout(Duration::from_secs(3))
}

async fn next(stream: &mut factline_messaging::MessageStream) -> Message {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a message within 10 s")
        .expect("the stream goes on")
        .expect("no receive error")
}

/// Connects with `config`, which must fail within its connect timeout (and a little).
async fn refused(config: RabbitConfig) -> ConnectError {
    let started = Instant::now();
    let limit = config.connect_timeout * 2 + Duration::from_secs(1);
    let error = RabbitPubSub::connect(config).await.unwrap_err();
    assert!(
        started.elapsed() < limit,
        "failed only after {:?}: {error}",
        started.elapsed()
    );
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs RabbitMQ: set FACTLINE_TEST_AMQP_URL"]
async fn an_unparsable_url_is_an_invalid_url_error() {
    for bad in [
        "http://127.0.0.1:5672",
        "not a url",
        "amqp://guest:secret@[::1",
    ] {
        let error = refused(config(bad)).await;
        assert!(
            matches!(error, ConnectError::InvalidUrl { .. }),
            "{bad}: {error:?}"
        );
        assert!(!error.to_string().contains("secret"), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs RabbitMQ: set FACTLINE_TEST_AMQP_URL"]
async fn a_port_nobody_listens_on_is_a_connect_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let error = refused(config(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))).await;
    assert!(
        matches!(
            error,
            ConnectError::Connect { .. } | ConnectError::TimedOut { .. }
        ),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs RabbitMQ: set FACTLINE_TEST_AMQP_URL"]
async fn a_host_that_never_answers_times_out() {
    // A listener that accepts TCP but never speaks AMQP: the handshake never completes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let error = refused(
        config(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
            .connect_timeout(Duration::from_millis(1_500)),
    )
    .await;
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
    silent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs RabbitMQ: set FACTLINE_TEST_AMQP_URL"]
async fn a_wrong_password_is_access_refused() {
    let wrong = url().replacen("guest:guest@", "guest:wrong-secret@", 1);
    assert_ne!(wrong, url(), "the test URL carries guest:guest");
    let error = refused(config(wrong)).await;
    assert!(
        matches!(error, ConnectError::AccessRefused { .. }),
        "{error:?}"
    );
    assert!(!error.to_string().contains("wrong-secret"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs RabbitMQ: set FACTLINE_TEST_AMQP_URL"]
async fn an_unknown_vhost_is_vhost_refused() {
    let base = url();
    let root = base.trim_end_matches("%2f").trim_end_matches('/');
    let error = refused(config(format!("{root}/fl-no-such-vhost"))).await;
    assert!(
        matches!(&error, ConnectError::VhostRefused { vhost, .. } if vhost == "fl-no-such-vhost"),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs RabbitMQ: set FACTLINE_TEST_AMQP_URL"]
async fn impossible_limits_are_refused_before_connecting() {
    for (config, field) in [
        (config(url()).in_flight_max(0), "in_flight_max"),
        (config(url()).in_flight_max(70_000), "in_flight_max"),
        (
            config(url()).message_size_bytes_max(0),
            "message_size_bytes_max",
        ),
        (
            config(url()).connect_timeout(Duration::ZERO),
            "connect_timeout",
        ),
        (
            config(url()).publish_timeout(Duration::ZERO),
            "publish_timeout",
        ),
        (
            config(url()).heartbeat_timeout(Duration::from_millis(10)),
            "heartbeat_timeout",
        ),
        (config(url()).name_prefix("amq.mine"), "name_prefix"),
    ] {
        let error = refused(config).await;
        assert!(
            matches!(error, ConnectError::InvalidConfig { field: got, .. } if got == field),
            "{field}: {error:?}"
        );
    }
    let pubsub = RabbitPubSub::connect(config(url())).await.unwrap();
    assert!(pubsub.subscriber_in_group("a.b").is_err());
    assert!(pubsub.subscriber_in_group("").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs RabbitMQ: set FACTLINE_TEST_AMQP_URL"]
async fn messages_from_other_clients_are_received() {
    let pubsub = RabbitPubSub::connect(config(url())).await.unwrap();
    let topic = unique("foreign");
    let subscriber = pubsub.subscriber();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();

    let raw = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = raw.create_channel().await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        "trace".into(),
        AMQPValue::LongString(LongString::from("t-1")),
    );
    headers.insert("attempt".into(), AMQPValue::LongInt(3));
    headers.insert("urgent".into(), AMQPValue::Boolean(true));
    let properties = BasicProperties::default()
        .with_headers(headers)
        .with_content_type(ShortString::from("application/json"))
        .with_correlation_id(ShortString::from("corr-9"));
    let exchange = format!("{PREFIX}{topic}");
    for _ in 0..2 {
        channel
            .basic_publish(
                exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                b"{\"plain\":true}",
                properties.clone(),
            )
            .await
            .unwrap();
    }
    let with_id = BasicProperties::default().with_message_id(ShortString::from("their-id-1"));
    channel
        .basic_publish(
            exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            b"with an id",
            with_id,
        )
        .await
        .unwrap();

    let first = next(&mut stream).await;
    assert!(first.id.to_text().starts_with("amqp-"), "{:?}", first.id);
    assert_eq!(first.metadata.get("trace"), Some("t-1"));
    assert_eq!(first.metadata.get("attempt"), Some("3"));
    assert_eq!(first.metadata.get("urgent"), Some("true"));
    assert_eq!(first.metadata.get("content_type"), Some("application/json"));
    assert_eq!(first.metadata.get("correlation_id"), Some("corr-9"));
    assert_eq!(&first.payload[..], b"{\"plain\":true}");
    // A redelivery keeps the id (it comes from the content), and identical copies share it.
    first.nack();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let message = next(&mut stream).await;
        if message.id.to_text() == "their-id-1" {
            assert!(message.metadata.is_empty(), "{:?}", message.metadata);
            assert_eq!(&message.payload[..], b"with an id");
        }
        ids.push(message.id.to_text());
        message.ack();
    }
    ids.sort();
    let first_id = first.id.to_text();
    assert_eq!(
        ids,
        vec![first_id.clone(), first_id, "their-id-1".to_owned()]
    );
    subscriber.close().await.unwrap();
    let _ = raw.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs RabbitMQ: set FACTLINE_TEST_AMQP_URL"]
async fn a_message_over_the_limit_is_refused_and_the_publisher_goes_on() {
    let pubsub = RabbitPubSub::connect(config(url()).message_size_bytes_max(1_000))
        .await
        .unwrap();
    let topic = unique("too_large");
    let subscriber = pubsub.subscriber();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    let publisher = pubsub.publisher();
    let large = Message::new(vec![0u8; 1_000]);
    let error = publisher
        .publish(&topic, vec![Message::new("small"), large.clone()])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, PublishError::MessageTooLarge { message_id, size_bytes_max: 1_000, .. } if *message_id == large.id.to_text()),
        "{error:?}"
    );
    let small = Message::new("small");
    publisher
        .publish(&topic, vec![small.clone()])
        .await
        .unwrap();
    let received = next(&mut stream).await;
    assert!(
        received.same_content(&small),
        "nothing of the refused call was sent"
    );
    received.ack();
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
}
