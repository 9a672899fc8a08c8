//! The shared event-store conformance suite, run through HTTP: every case drives
//! [`HttpStore`] (the API's client, itself an `EventStore`) against a server on a loopback port,
//! once over the in-memory store and once over the embedded log. A rule the API loses on the
//! way (an error code that maps back to the wrong typed error, a payload that does not
//! round-trip byte for byte, a subscription that skips or repeats at the catch-up switch)
//! fails here.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{path::Path, sync::Arc};

use factline_core::InMemoryStore;
use factline_log::{LogOptions, LogStore, faulty::FaultyStorage};
use factline_server::{Server, ServerOptions, Store, client::HttpStore};

/// Starts a server over `store` on the current runtime and connects a client to it. The
/// server lives as long as the runtime (one per case).
async fn served(store: Arc<dyn Store>) -> HttpStore {
    let options = ServerOptions::default().listen("127.0.0.1:0".parse().unwrap());
    let server = Server::bind(store, options).await.unwrap();
    let url = format!("http://{}", server.local_addr());
    tokio::spawn(server.run(std::future::pending()));
    HttpStore::connect(&url).await.unwrap()
}

async fn over_memory() -> HttpStore {
    served(Arc::new(InMemoryStore::new())).await
}

async fn over_log() -> HttpStore {
    let (log, _) = LogStore::open_with(
        Arc::new(FaultyStorage::new()),
        Path::new("/data"),
        LogOptions::default(),
    )
    .await
    .unwrap();
    served(Arc::new(log)).await
}

mod memory {
    use super::*;
    factline_core::event_store_conformance!(over_memory());
}

mod log {
    use super::*;
    factline_core::event_store_conformance!(over_log());
}

#[test]
fn agrees_with_the_model_over_http() {
    factline_core::testkit::model::check_against_model_with(
        over_memory,
        32,
        factline_core::testkit::model::ModelConfig::default(),
    );
}

/// A store that refuses writes answers 503 with its state, and the client turns that back into
/// the storage error it was: `Failed` after a failed fsync, `Closed` after close.
#[tokio::test]
async fn an_unavailable_store_is_a_typed_storage_error_through_http() {
    use factline_core::{
        AppendError, EventData, EventStore, ExpectedVersion, StorageError, StreamId,
    };

    let storage = FaultyStorage::new();
    let (log, _) = LogStore::open_with(
        Arc::new(storage.clone()),
        Path::new("/data"),
        LogOptions::default(),
    )
    .await
    .unwrap();
    let client = served(Arc::new(log.clone())).await;
    let stream = StreamId::new("order-1").unwrap();
    let event = || EventData::json("Placed", &serde_json::json!({})).unwrap();
    storage.fail_syncs_after(0);
    let failed = client
        .append(&stream, ExpectedVersion::Any, vec![event()])
        .await;
    assert!(
        matches!(
            failed,
            Err(AppendError::Storage(StorageError::Failed { .. }))
        ),
        "{failed:?}"
    );

    let (log, _) = LogStore::open_with(
        Arc::new(FaultyStorage::new()),
        Path::new("/data"),
        LogOptions::default(),
    )
    .await
    .unwrap();
    let client = served(Arc::new(log.clone())).await;
    log.close().await;
    let closed = client
        .append(&stream, ExpectedVersion::Any, vec![event()])
        .await;
    assert!(
        matches!(closed, Err(AppendError::Storage(StorageError::Closed))),
        "{closed:?}"
    );
}
