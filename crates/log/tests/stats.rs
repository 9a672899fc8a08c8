//! The writer's counters ([`LogStore::stats`]).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{path::Path, sync::Arc};

use factline_core::{EventData, EventStore, ExpectedVersion, StreamId};
use factline_log::{LogOptions, LogStore, faulty::FaultyStorage};

fn event() -> EventData {
    EventData::json("Counted", &serde_json::json!({ "n": 1 })).unwrap()
}

#[tokio::test]
async fn stats_count_committed_events_and_groups() {
    let (store, _) = LogStore::open_with(
        Arc::new(FaultyStorage::new()),
        Path::new("/data"),
        LogOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(store.stats().events_committed, 0);
    assert_eq!(store.stats().commit_groups, 0);
    let stream = StreamId::new("counted-1").unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![event(), event(), event()],
        )
        .await
        .unwrap();
    store
        .append(&stream, ExpectedVersion::Any, vec![event()])
        .await
        .unwrap();
    // A refused append writes nothing and counts nothing.
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event()])
        .await
        .unwrap_err();
    let stats = store.stats();
    assert_eq!(stats.events_committed, 4);
    assert_eq!(
        stats.commit_groups, 2,
        "two sequential appends, two fdatasyncs"
    );
    store.close().await;
}
