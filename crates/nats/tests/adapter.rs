//! What the NATS adapter promises beyond the shared suite: bad configuration fails at connect
//! (not on first use), JetStream drops a second publish of one message id, and messages other
//! clients publish are delivered with an id of their own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use factline_messaging::{Message, MessageId, Publisher, SubscribeError, Subscriber};
use factline_nats::{ConnectError, NatsConfig, NatsPubSub};
use futures::StreamExt as _;

fn url() -> String {
    std::env::var("FACTLINE_TEST_NATS_URL").expect(
        "FACTLINE_TEST_NATS_URL must name a NATS server with JetStream (see scripts/test-all)",
    )
}

fn unique(label: &str) -> String {
    format!("fl_{label}_{}", uuid::Uuid::new_v4().simple())
}

async fn connect() -> NatsPubSub {
    NatsPubSub::connect(NatsConfig::new(url()).stream_prefix("fltest_"))
        .await
        .unwrap()
}

async fn next(stream: &mut factline_messaging::MessageStream) -> Message {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a message within 10 s")
        .expect("the stream goes on")
        .expect("no receive error")
}

/// A NATS server of our own on a free port, with extra arguments; killed on drop.
struct OwnServer {
    child: std::process::Child,
    port: u16,
}

impl OwnServer {
    fn start(args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let binary = std::env::var("FACTLINE_TEST_NATS_SERVER_BIN")
            .unwrap_or_else(|_| "/usr/sbin/nats-server".to_owned());
        let mut child = std::process::Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("start {binary}: {error}"));
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Self { child, port };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("{binary} did not listen on {port}");
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS JetStream: set FACTLINE_TEST_NATS_URL"]
async fn bad_configuration_is_an_error_at_connect() {
    let started = std::time::Instant::now();
    // Nothing listens on this port (a listener was bound and dropped).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = NatsPubSub::connect(
        NatsConfig::new(format!("nats://127.0.0.1:{port}")).connect_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            refused,
            ConnectError::Connect { .. } | ConnectError::TimedOut { .. }
        ),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "no hang");

    let unparsable = NatsPubSub::connect(NatsConfig::new("nats://[::1"))
        .await
        .unwrap_err();
    assert!(
        matches!(unparsable, ConnectError::Connect { .. }),
        "{unparsable:?}"
    );

    let zero = NatsPubSub::connect(NatsConfig::new(url()).in_flight_max(0))
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
    let prefix = NatsPubSub::connect(NatsConfig::new(url()).stream_prefix("a.b"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            prefix,
            ConnectError::InvalidConfig {
                field: "stream_prefix",
                ..
            }
        ),
        "{prefix:?}"
    );

    // Credentials the server refuses, and a server without JetStream.
    let guarded = OwnServer::start(&[
        "--user",
        "app",
        "--pass",
        "right",
        "-js",
        "-sd",
        "/tmp/factline-nats-auth-test",
    ]);
    let wrong = NatsPubSub::connect(
        NatsConfig::new(format!("nats://app:wrong@127.0.0.1:{}", guarded.port))
            .connect_timeout(Duration::from_secs(3)),
    )
    .await
    .unwrap_err();
    let text = wrong.to_string();
    assert!(matches!(wrong, ConnectError::Connect { .. }), "{wrong:?}");
    assert!(!text.contains("wrong"), "the password is not shown: {text}");
    assert!(text.contains("app:***@"), "{text}");
    let plain = OwnServer::start(&[]);
    let no_jetstream =
        NatsPubSub::connect(NatsConfig::new(format!("nats://127.0.0.1:{}", plain.port)))
            .await
            .unwrap_err();
    assert!(
        matches!(no_jetstream, ConnectError::NoJetStream { .. }),
        "{no_jetstream:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "no hang");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS JetStream: set FACTLINE_TEST_NATS_URL"]
async fn a_missing_stream_is_named_when_streams_are_not_created() {
    let pubsub = NatsPubSub::connect(
        NatsConfig::new(url())
            .stream_prefix("fltest_")
            .create_streams(false),
    )
    .await
    .unwrap();
    let topic = unique("missing");
    let refused = pubsub.subscriber().subscribe(&topic).await.unwrap_err();
    let SubscribeError::Transport(source) = &refused else {
        panic!("{refused:?}");
    };
    assert!(
        source.to_string().contains(&format!("fltest_{topic}")),
        "{source}"
    );
    let published = pubsub
        .publisher()
        .publish(&topic, vec![Message::new("x")])
        .await
        .unwrap_err();
    assert!(
        published.to_string().contains("does not exist"),
        "{published}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS JetStream: set FACTLINE_TEST_NATS_URL"]
async fn a_retried_publish_is_dropped_by_message_id() {
    let pubsub = connect().await;
    let topic = unique("dedup");
    let subscriber = pubsub.subscriber();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    let publisher = pubsub.publisher();
    let message = Message::new("once").with_metadata("k", "v");
    publisher
        .publish(&topic, vec![message.clone()])
        .await
        .unwrap();
    // The retry after an error that hid a success: same id.
    publisher
        .publish(&topic, vec![message.clone()])
        .await
        .unwrap();
    let marker = Message::new("after");
    publisher
        .publish(&topic, vec![marker.clone()])
        .await
        .unwrap();
    let first = next(&mut stream).await;
    assert!(first.same_content(&message));
    first.ack();
    let second = next(&mut stream).await;
    assert_eq!(second.id, marker.id, "the duplicate was dropped");
    second.ack();
    subscriber.close().await.unwrap();
    pubsub.delete_topics(&[&topic]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS JetStream: set FACTLINE_TEST_NATS_URL"]
async fn messages_from_other_clients_get_a_stable_id() {
    let pubsub = connect().await;
    let topic = unique("foreign");
    let subscriber = pubsub.subscriber();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    let subject = factline_nats::stream_name("fltest_", &topic).unwrap();
    let jetstream = async_nats::jetstream::new(pubsub.client().clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("trace", "t-1");
    jetstream
        .publish_with_headers(subject.clone(), headers, "plain".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let received = next(&mut stream).await;
    assert_eq!(
        received.id,
        MessageId::parse(&format!("nats-{subject}-1")).unwrap()
    );
    assert_eq!(received.metadata.get("trace"), Some("t-1"));
    assert_eq!(&received.payload[..], b"plain");
    // A nack brings it back with the same id.
    received.nack();
    let again = next(&mut stream).await;
    assert_eq!(again.id, received.id);
    again.ack();
    subscriber.close().await.unwrap();
    pubsub.delete_topics(&[&topic]).await.unwrap();
}
