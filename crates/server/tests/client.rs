//! `HttpStore` beyond the conformance suite: subscriptions that survive a server restart, and
//! `https://` with a server's own certificate.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

mod common;

use std::{sync::Arc, time::Duration};

use factline_core::{
    EventData, EventFilter, EventStore, ExpectedVersion, InMemoryStore, Position, ReadAllOptions,
    Revision, StreamId, SubscribeFrom, Subscription,
};
use factline_server::{
    ServerOptions, TlsConfig,
    client::{ClientOptions, ConnectError, HttpStore},
};

use crate::common::TestServer;

fn events(prefix: &str, count: usize) -> Vec<EventData> {
    (0..count)
        .map(|i| EventData::json(format!("{prefix}{i}"), &serde_json::json!({ "i": i })).unwrap())
        .collect()
}

async fn next_types(subscription: &mut Subscription, count: usize) -> Vec<String> {
    let mut types = Vec::new();
    for _ in 0..count {
        let event = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .expect("an event within 10 s")
            .expect("the subscription goes on")
            .expect("an event, not an error");
        types.push(event.event_type.to_string());
    }
    types
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_resume_after_the_last_event_across_a_server_restart() {
    let store = Arc::new(InMemoryStore::new());
    let first = TestServer::start(store.clone(), ServerOptions::default()).await;
    let addr = first.addr;
    let client = HttpStore::connect(&format!("http://{addr}")).await.unwrap();
    let order = StreamId::new("order-1").unwrap();
    store
        .append(&order, ExpectedVersion::NoStream, events("Before", 2))
        .await
        .unwrap();

    let mut all_from_start = client
        .subscribe_to_all(SubscribeFrom::Start, EventFilter::all())
        .await
        .unwrap();
    let mut stream_from_start = client
        .subscribe_to_stream(&order, SubscribeFrom::Start)
        .await
        .unwrap();
    // From the end, and the connection drops before it delivers anything: the reconnect must
    // not start from the end again (that would skip what was appended meanwhile).
    let mut all_from_end = client
        .subscribe_to_all(SubscribeFrom::End, EventFilter::all())
        .await
        .unwrap();
    let mut stream_from_end = client
        .subscribe_to_stream(&order, SubscribeFrom::End)
        .await
        .unwrap();
    assert_eq!(
        next_types(&mut all_from_start, 2).await,
        ["Before0", "Before1"]
    );
    assert_eq!(
        next_types(&mut stream_from_start, 2).await,
        ["Before0", "Before1"]
    );

    // The server goes away (its graceful stop ends every SSE response) ...
    first.stop().await;
    // ... events are appended while no server runs ...
    store
        .append(
            &order,
            ExpectedVersion::Exact(Revision(1)),
            events("During", 2),
        )
        .await
        .unwrap();
    // ... and it comes back on the same address.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = TestServer::start_on(store.clone(), ServerOptions::default(), addr).await;
    store
        .append(
            &order,
            ExpectedVersion::Exact(Revision(3)),
            events("After", 1),
        )
        .await
        .unwrap();

    let rest = ["During0", "During1", "After0"];
    assert_eq!(next_types(&mut all_from_start, 3).await, rest);
    assert_eq!(next_types(&mut stream_from_start, 3).await, rest);
    assert_eq!(next_types(&mut all_from_end, 3).await, rest);
    assert_eq!(next_types(&mut stream_from_end, 3).await, rest);
    // Nothing twice: the next event is the next append.
    store
        .append(
            &order,
            ExpectedVersion::Exact(Revision(4)),
            events("Last", 1),
        )
        .await
        .unwrap();
    for subscription in [
        &mut all_from_start,
        &mut stream_from_start,
        &mut all_from_end,
        &mut stream_from_end,
    ] {
        assert_eq!(next_types(subscription, 1).await, ["Last0"]);
    }
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_ends_with_its_error_once_reconnects_are_used_up() {
    let store = Arc::new(InMemoryStore::new());
    let server = TestServer::start(store.clone(), ServerOptions::default()).await;
    let client = HttpStore::connect_with(
        &format!("http://{}", server.addr),
        ClientOptions::default().subscription_reconnects_max(2),
    )
    .await
    .unwrap();
    let mut subscription = client
        .subscribe_to_all(SubscribeFrom::Start, EventFilter::all())
        .await
        .unwrap();
    server.stop().await;
    // Two reconnects (100 ms, then 200 ms) find nothing listening; then the error.
    let ended = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("the subscription ends within 10 s");
    assert!(matches!(ended, Some(Err(_))), "{ended:?}");
    assert!(subscription.next().await.is_none());
}

struct Certificate {
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    pem: String,
}

fn self_signed() -> Certificate {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key_pair.serialize_pem()).unwrap();
    Certificate {
        _dir: dir,
        cert: cert_path,
        key: key_path,
        pem: cert.pem(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_servers_certificate_as_a_root() {
    let certificate = self_signed();
    let store = Arc::new(InMemoryStore::new());
    let server = TestServer::start(
        store.clone(),
        ServerOptions::default().tls(TlsConfig::new(&certificate.cert, &certificate.key)),
    )
    .await;
    let url = format!("https://{}", server.addr);

    // Not trusted by the system's roots: connecting fails, naming the server.
    let untrusted = HttpStore::connect(&url).await;
    assert!(
        matches!(untrusted, Err(ConnectError::Server { .. })),
        "{untrusted:?}"
    );
    // Not a certificate at all: a clear error before any connection.
    let garbage =
        HttpStore::connect_with(&url, ClientOptions::default().root_certificate_pem("nope")).await;
    assert!(
        matches!(garbage, Err(ConnectError::InvalidRootCertificate { .. })),
        "{garbage:?}"
    );

    let client = HttpStore::connect_with(
        &url,
        ClientOptions::default().root_certificate_pem(certificate.pem.as_bytes()),
    )
    .await
    .unwrap();
    let stream = StreamId::new("secure-1").unwrap();
    let mut live = client
        .subscribe_to_all(SubscribeFrom::Start, EventFilter::all())
        .await
        .unwrap();
    let appended = client
        .append(&stream, ExpectedVersion::NoStream, events("Sealed", 2))
        .await
        .unwrap();
    assert_eq!(appended.position, Position(1));
    let page = client.read_all(ReadAllOptions::forwards()).await.unwrap();
    assert_eq!(page.events.len(), 2);
    assert_eq!(next_types(&mut live, 2).await, ["Sealed0", "Sealed1"]);
    server.stop().await;
}
