//! Batched reads share buffers between the events of a batch (one buffer of payloads per batch,
//! one copy of each stream id and event type): every event must still come back with exactly its
//! own bytes, whatever mix of streams, types, sizes and filters the batch holds.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{path::Path, sync::Arc};

use factline_core::{
    EventData, EventFilter, EventStore, ExpectedVersion, ReadAllOptions, ReadStreamOptions,
    RecordedEvent, StreamId,
};
use factline_log::{LogOptions, LogStore, faulty::FaultyStorage};

/// The `i`-th appended event: sizes from empty to larger than the read chunk, JSON and binary,
/// more event types than the decoder keeps for reuse.
fn event(i: usize) -> EventData {
    let size = match i % 7 {
        0 => 0,
        1 => 1,
        2 => 9_000,
        _ => 50 + i % 300,
    };
    let payload: Vec<u8> = (0..size).map(|b| (b * 31 + i) as u8).collect();
    let event_type = format!("Happened{}", i % 11);
    if i.is_multiple_of(2) {
        EventData::binary(event_type, payload)
    } else {
        EventData::json(
            event_type,
            &serde_json::json!({ "i": i, "pad": payload.len() }),
        )
        .unwrap()
    }
}

fn assert_same(read: &RecordedEvent, appended: &EventData) {
    assert_eq!(read.id, appended.id);
    assert_eq!(read.event_type, appended.event_type);
    assert_eq!(read.content_type, appended.content_type);
    assert_eq!(read.data, appended.data, "payload of event {}", read.id);
}

#[tokio::test]
async fn every_event_of_a_batch_gets_its_own_payload_and_names() {
    let mut options = LogOptions::default();
    options.read_chunk_bytes = 4096;
    let (store, _) =
        LogStore::open_with(Arc::new(FaultyStorage::new()), Path::new("/data"), options)
            .await
            .unwrap();
    let streams = [
        StreamId::new("order-1").unwrap(),
        StreamId::new("order-2").unwrap(),
        StreamId::new("invoice-1").unwrap(),
    ];
    let mut appended: Vec<(usize, EventData)> = Vec::new();
    for batch in 0..40 {
        let which = batch % streams.len();
        let events: Vec<EventData> = (0..5).map(|k| event(batch * 5 + k)).collect();
        store
            .append(&streams[which], ExpectedVersion::Any, events.clone())
            .await
            .unwrap();
        appended.extend(events.into_iter().map(|e| (which, e)));
    }

    // One stream, read in pages of several sizes (batched reads of known offsets).
    for (which, stream) in streams.iter().enumerate() {
        let expected: Vec<&EventData> = appended
            .iter()
            .filter(|(w, _)| *w == which)
            .map(|(_, e)| e)
            .collect();
        for page in [1, 3, 1000] {
            let mut read = Vec::new();
            let mut options = ReadStreamOptions::forwards().limit(page);
            loop {
                let slice = store.read_stream(stream, options).await.unwrap();
                read.extend(slice.events);
                if slice.is_end {
                    break;
                }
                options = options.from(slice.next_revision);
            }
            assert_eq!(read.len(), expected.len());
            for (read, appended) in read.iter().zip(&expected) {
                assert_eq!(&read.stream, stream);
                assert_same(read, appended);
            }
        }
    }

    // `$all` with and without filters (sequential scans in 4 KiB chunks).
    let filters = [
        EventFilter::all(),
        EventFilter::all().category("order"),
        EventFilter::all().event_type_prefix("Happened1"),
    ];
    for filter in filters {
        let expected: Vec<&EventData> = appended
            .iter()
            .filter(|(w, e)| {
                let stream = &streams[*w];
                filter
                    .stream_prefix
                    .as_deref()
                    .is_none_or(|p| stream.as_str().starts_with(p))
                    && filter
                        .category
                        .as_deref()
                        .is_none_or(|c| stream.category() == c)
                    && filter
                        .event_type_prefix
                        .as_deref()
                        .is_none_or(|p| e.event_type.starts_with(p))
            })
            .map(|(_, e)| e)
            .collect();
        for page in [2, 1000] {
            let mut read = Vec::new();
            let mut options = ReadAllOptions::forwards()
                .limit(page)
                .filter(filter.clone());
            loop {
                let slice = store.read_all(options.clone()).await.unwrap();
                read.extend(slice.events);
                if slice.is_end {
                    break;
                }
                options = options.from(slice.next_position);
            }
            assert_eq!(read.len(), expected.len(), "filter {filter:?}");
            for (read, appended) in read.iter().zip(&expected) {
                assert_same(read, appended);
            }
        }
    }
    store.close().await;
}
