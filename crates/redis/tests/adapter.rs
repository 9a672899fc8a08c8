//! What the Redis adapter promises beyond the shared suite: bad configuration fails at connect,
//! entries other clients add are delivered with an id of their own, and an entry that stayed
//! pending with a consumer that died is claimed by another member.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use factline_messaging::{Message, MessageId, Publisher as _, Subscriber as _};
use factline_redis::{ConnectError, RedisConfig, RedisPubSub};
use futures::StreamExt as _;

fn url() -> String {
    std::env::var("FACTLINE_TEST_REDIS_URL")
        .expect("FACTLINE_TEST_REDIS_URL must name a Redis server (see scripts/test-all)")
}

fn unique(label: &str) -> String {
    format!("fl_{label}_{}", uuid::Uuid::new_v4().simple())
}

async fn next(stream: &mut factline_messaging::MessageStream) -> Message {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a message within 10 s")
        .expect("the stream goes on")
        .expect("no receive error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: set FACTLINE_TEST_REDIS_URL"]
async fn bad_configuration_is_an_error_at_connect() {
    let started = std::time::Instant::now();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = RedisPubSub::connect(
        RedisConfig::new(format!("redis://127.0.0.1:{port}"))
            .connect_timeout(Duration::from_secs(2)),
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
    let unparsable = RedisPubSub::connect(RedisConfig::new("http://127.0.0.1:6379"))
        .await
        .unwrap_err();
    assert!(
        matches!(unparsable, ConnectError::Connect { .. }),
        "{unparsable:?}"
    );
    let zero = RedisPubSub::connect(RedisConfig::new(url()).in_flight_max(0))
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
    // A password the server refuses (this server has none: AUTH fails).
    let with_password = url().replacen("redis://", "redis://:wrong@", 1);
    let wrong = RedisPubSub::connect(RedisConfig::new(with_password))
        .await
        .unwrap_err();
    let text = wrong.to_string();
    assert!(matches!(wrong, ConnectError::Connect { .. }), "{wrong:?}");
    assert!(!text.contains("wrong"), "the password is not shown: {text}");
    assert!(started.elapsed() < Duration::from_secs(10), "no hang");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: set FACTLINE_TEST_REDIS_URL"]
async fn entries_from_other_clients_get_a_stable_id() {
    let pubsub = RedisPubSub::connect(RedisConfig::new(url()).key_prefix("fltest:"))
        .await
        .unwrap();
    let topic = unique("foreign");
    let subscriber = pubsub.subscriber();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("fltest:{topic}");
    let entry: String = redis::cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg("p")
        .arg("plain")
        .arg("trace")
        .arg("t-1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let received = next(&mut stream).await;
    assert_eq!(
        received.id,
        MessageId::parse(&format!("redis-{key}-{entry}")).unwrap()
    );
    assert_eq!(received.metadata.get("trace"), Some("t-1"));
    assert_eq!(&received.payload[..], b"plain");
    received.nack();
    let again = next(&mut stream).await;
    assert_eq!(again.id, received.id);
    again.ack();
    subscriber.close().await.unwrap();
    pubsub.delete_topics(&[&topic]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: set FACTLINE_TEST_REDIS_URL"]
async fn entries_of_a_member_that_died_are_claimed_after_claim_idle() {
    let pubsub = RedisPubSub::connect(
        RedisConfig::new(url())
            .key_prefix("fltest:")
            .claim_idle(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    let topic = unique("stale");
    let group = unique("stale_group");
    // A member that read an entry and died: it never acked, and nobody handed it over.
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("fltest:{topic}");
    let sent = Message::new("kept");
    pubsub
        .publisher()
        .publish(&topic, vec![sent.clone()])
        .await
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg(&group)
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&group)
        .arg("dead")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let subscriber = pubsub.subscriber_in_group(&group).unwrap();
    let mut stream = subscriber.subscribe(&topic).await.unwrap();
    let received = next(&mut stream).await;
    assert!(received.same_content(&sent));
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "claimed only once idle"
    );
    received.ack();
    subscriber.close().await.unwrap();
    pubsub.delete_topics(&[&topic]).await.unwrap();
}
