//! The checkpointed index: reopening replays only the log after the checkpoint and answers
//! exactly as before; a damaged checkpoint or table is rebuilt from the log or reported by
//! verify, never trusted.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{path::Path, sync::Arc, time::Duration};

use factline_core::{
    DeleteMode, EventData, EventStore, ExpectedVersion, ReadAllOptions, ReadStreamOptions,
    RecordedEvent, Revision, StreamId, StreamMetadata,
    testkit::{all_events, stream_events},
};
use factline_log::{
    LogOptions, LogStore, OpenError, Repair, Storage, faulty::FaultyStorage, verify_with,
};

const DIR: &str = "/data";

fn options(memtable_entries: usize) -> LogOptions {
    let mut options = LogOptions::default();
    options.index_memtable_entries_max = memtable_entries;
    options.stream_cache_streams_max = 4;
    options.idempotency_window_events = 4;
    options
}

async fn open(
    storage: &FaultyStorage,
    options: LogOptions,
) -> Result<(LogStore, factline_log::OpenReport), OpenError> {
    LogStore::open_with(Arc::new(storage.clone()), Path::new(DIR), options).await
}

fn stream(i: usize) -> StreamId {
    StreamId::new(format!("account-{i}")).unwrap()
}

fn event(n: usize) -> EventData {
    EventData::json("Deposited", &serde_json::json!({ "n": n })).unwrap()
}

/// Everything a reader can observe, for comparing a store before and after a reopen.
#[derive(Debug, PartialEq)]
struct Observed {
    all: Vec<RecordedEvent>,
    all_backwards: Vec<RecordedEvent>,
    streams: Vec<(String, String, String)>,
}

async fn observe(store: &LogStore, streams: usize) -> Observed {
    let all = all_events(store).await;
    let all_backwards = store
        .read_all(ReadAllOptions::backwards().limit(10_000))
        .await
        .unwrap()
        .events;
    let mut per_stream = Vec::new();
    for i in 0..streams {
        let s = stream(i);
        let forwards = format!("{:?}", stream_events(store, &s).await.map(|e| e.len()));
        let backwards = format!(
            "{:?}",
            store
                .read_stream(&s, ReadStreamOptions::backwards().limit(7))
                .await
                .map(|slice| slice
                    .events
                    .iter()
                    .map(|e| (e.revision, e.id))
                    .collect::<Vec<_>>())
        );
        let metadata = format!("{:?}", store.stream_metadata(&s).await);
        per_stream.push((forwards, backwards, metadata));
    }
    Observed {
        all,
        all_backwards,
        streams: per_stream,
    }
}

/// 30 streams, ~600 events, metadata, soft deletes and tombstones, with a memtable of 16.
async fn fill(store: &LogStore) {
    for round in 0..20usize {
        for i in 0..30usize {
            let s = stream(i);
            if i % 10 == 9 && round == 10 {
                store
                    .delete_stream(&s, ExpectedVersion::Any, DeleteMode::Tombstone)
                    .await
                    .unwrap();
            }
            if i % 10 == 9 && round >= 10 {
                continue;
            }
            let batch = (0..1 + (i + round) % 2)
                .map(|j| event(round * 100 + j))
                .collect();
            store.append(&s, ExpectedVersion::Any, batch).await.unwrap();
            if i % 7 == 3 && round % 5 == 0 {
                let metadata = StreamMetadata {
                    max_count: Some(5 + round as u64),
                    ..StreamMetadata::default()
                };
                store.set_stream_metadata(&s, metadata).await.unwrap();
            }
            if i % 10 == 4 && round == 12 {
                store
                    .delete_stream(&s, ExpectedVersion::Any, DeleteMode::Soft)
                    .await
                    .unwrap();
            }
        }
    }
}

#[tokio::test]
async fn a_reopen_replays_only_the_log_after_the_checkpoint() {
    let storage = FaultyStorage::new();
    let (store, _) = open(&storage, options(16)).await.unwrap();
    fill(&store).await;
    let before = observe(&store, 30).await;
    store.close().await;

    let index_files = storage.list_dir(&Path::new(DIR).join("index")).unwrap();
    assert!(
        index_files.iter().any(|n| n == "CHECKPOINT"),
        "{index_files:?}"
    );
    let tables = index_files.iter().filter(|n| n.ends_with(".ixt")).count();
    // ~40 flushes merged four at a time: a few tables, not one per flush.
    assert!(
        (1..=12).contains(&tables),
        "{tables} tables: {index_files:?}"
    );

    let (reopened, report) = open(&storage, options(16)).await.unwrap();
    assert!(!report.index_rebuilt);
    assert!(report.repairs.is_empty(), "{:?}", report.repairs);
    assert!(
        report.records < 40,
        "replayed {} records: more than one memtable's worth",
        report.records
    );
    assert_eq!(report.events as usize, before.all.len());
    assert_eq!(observe(&reopened, 30).await, before);

    // The writer's heads come back from the index: expected versions and retries work.
    let s = stream(0);
    let last = before.all.iter().filter(|e| e.stream == s).count() as u64 - 1;
    let retried = vec![event(9_000)];
    let first = reopened
        .append(&s, ExpectedVersion::Exact(Revision(last)), retried.clone())
        .await
        .unwrap();
    let again = reopened
        .append(&s, ExpectedVersion::Any, retried)
        .await
        .unwrap();
    assert_eq!(first, again, "an idempotent retry after reopen");
    assert!(
        reopened
            .append(
                &s,
                ExpectedVersion::Exact(Revision(last)),
                vec![event(9_001)]
            )
            .await
            .is_err()
    );
    assert!(
        reopened
            .append(&stream(9), ExpectedVersion::Any, vec![event(1)])
            .await
            .is_err(),
        "stream 9 stays tombstoned"
    );
    reopened.close().await;

    let verified = verify_with(Arc::new(storage.clone()), Path::new(DIR)).unwrap();
    assert!(verified.index_events_checked > 400, "{verified:?}");
    assert!(verified.index_entries > 400, "{verified:?}");
}

#[tokio::test]
async fn reopening_with_a_different_memtable_size_gives_the_same_answers() {
    let storage = FaultyStorage::new();
    let (store, _) = open(&storage, options(5)).await.unwrap();
    fill(&store).await;
    let before = observe(&store, 30).await;
    store.close().await;
    for memtable in [1_000_000, 3, 64] {
        let (reopened, _) = open(&storage, options(memtable)).await.unwrap();
        assert_eq!(observe(&reopened, 30).await, before, "memtable {memtable}");
        reopened.close().await;
    }
}

#[tokio::test]
async fn a_damaged_checkpoint_is_rebuilt_from_the_log() {
    let storage = FaultyStorage::new();
    let (store, _) = open(&storage, options(16)).await.unwrap();
    fill(&store).await;
    let before = observe(&store, 30).await;
    store.close().await;
    storage
        .corrupt(
            &Path::new(DIR).join("index").join("CHECKPOINT"),
            20,
            &[0xee],
        )
        .unwrap();
    let (reopened, report) = open(&storage, options(16)).await.unwrap();
    assert!(report.index_rebuilt);
    assert!(
        matches!(&report.repairs[..], [Repair::RebuiltIndex { reason }] if reason.contains("checksum")),
        "{:?}",
        report.repairs
    );
    assert_eq!(observe(&reopened, 30).await, before);
    reopened.close().await;
    // The rebuilt index was checkpointed again.
    let (again, report) = open(&storage, options(16)).await.unwrap();
    assert!(!report.index_rebuilt);
    assert_eq!(observe(&again, 30).await, before);
}

#[tokio::test]
async fn a_checkpoint_beyond_the_log_is_not_trusted() {
    let storage = FaultyStorage::new();
    let (store, _) = open(&storage, options(16)).await.unwrap();
    fill(&store).await;
    store.close().await;
    // A log shorter than its checkpoint (a medium that lost synced data): the index would
    // point past the end, so it is rebuilt from what the log holds.
    let segment = Path::new(DIR).join("segments").join("0000000000.seg");
    let image = storage.clone();
    image.open(&segment, false).unwrap().set_len(64).unwrap();
    let (reopened, report) = open(&image, options(16)).await.unwrap();
    assert!(
        matches!(&report.repairs[..], [Repair::RebuiltIndex { .. }]),
        "{:?}",
        report.repairs
    );
    assert!(all_events(&reopened).await.is_empty());
}

#[tokio::test]
async fn a_damaged_index_table_is_reported_by_verify_naming_the_file() {
    let storage = FaultyStorage::new();
    let (store, _) = open(&storage, options(16)).await.unwrap();
    fill(&store).await;
    store.close().await;
    let index_dir = Path::new(DIR).join("index");
    let table = storage
        .list_dir(&index_dir)
        .unwrap()
        .into_iter()
        .find(|n| n.ends_with(".ixt"))
        .unwrap();
    storage
        .corrupt(&index_dir.join(&table), 100, &[0x5a])
        .unwrap();
    let error = verify_with(Arc::new(storage.clone()), Path::new(DIR)).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&table) && message.contains("offset 0"),
        "{message}"
    );
}

#[tokio::test]
async fn verify_finds_an_index_that_disagrees_with_the_log() {
    let storage = FaultyStorage::new();
    let (store, _) = open(&storage, options(16)).await.unwrap();
    fill(&store).await;
    store.close().await;
    // Point position 3 at position 4's record.
    let positions = Path::new(DIR).join("index").join("positions");
    let bytes = storage.contents(&positions).unwrap();
    storage
        .corrupt(&positions, 3 * 8, &bytes[4 * 8..5 * 8])
        .unwrap();
    let error = verify_with(Arc::new(storage.clone()), Path::new(DIR)).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("positions file does not point at event 3"),
        "{error}"
    );
}

/// Subscriptions and reads stay correct while flushes and merges happen under them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_every_event_while_the_index_is_flushed_and_merged() {
    let storage = FaultyStorage::new();
    let (store, _) = open(&storage, options(4)).await.unwrap();
    let mut subscription = store
        .subscribe_to_all(
            factline_core::SubscribeFrom::Start,
            factline_core::EventFilter::default(),
        )
        .await
        .unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for n in 0..600usize {
                store
                    .append(&stream(n % 5), ExpectedVersion::Any, vec![event(n)])
                    .await
                    .unwrap();
            }
        })
    };
    let reader = {
        let store = store.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                for i in 0..5 {
                    if let Ok(events) = stream_events(&store, &stream(i)).await {
                        for (r, e) in events.iter().enumerate() {
                            assert_eq!(e.revision.0, r as u64);
                            assert_eq!(e.stream, stream(i));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        })
    };
    for expected in 0..600u64 {
        let event = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(event.position.0, expected);
    }
    writer.await.unwrap();
    reader.await.unwrap();
}

/// Damage in records the checkpoint covers: open does not read them (unless asked to), a read
/// of them fails naming file and offset, verify finds them, and `verify_on_open` refuses.
#[tokio::test]
async fn damage_before_the_checkpoint_is_found_by_reads_verify_and_verify_on_open() {
    let storage = FaultyStorage::new();
    let (store, _) = open(&storage, options(16)).await.unwrap();
    fill(&store).await;
    let victim = stream_events(&store, &stream(2)).await.unwrap()[1].clone();
    store.close().await;
    // Find the victim's record in segment 0 by its id and flip a byte of its body.
    let segment = Path::new(DIR).join("segments").join("0000000000.seg");
    let bytes = storage.contents(&segment).unwrap();
    let id = victim.id.as_bytes();
    let at = bytes.windows(16).position(|w| w == id).unwrap();
    storage.corrupt(&segment, at, &[!bytes[at]]).unwrap();

    let (reopened, report) = open(&storage, options(16)).await.unwrap();
    assert!(!report.index_rebuilt);
    let error = stream_events(&reopened, &stream(2)).await.unwrap_err();
    assert!(
        error.to_string().contains("corrupt record in segment 0"),
        "{error}"
    );
    reopened.close().await;

    let error = verify_with(Arc::new(storage.clone()), Path::new(DIR)).unwrap_err();
    assert!(
        matches!(&error, OpenError::Corrupt { file, .. } if *file == segment),
        "{error}"
    );
    let mut strict = options(16);
    strict.verify_on_open = true;
    match open(&storage, strict).await {
        Err(OpenError::Corrupt { file, offset, .. }) => {
            assert_eq!(file, segment);
            assert!(
                offset <= at as u64 && at as u64 - offset < 512,
                "{offset} vs {at}"
            );
        }
        other => panic!("expected a refusal, got {:?}", other.map(|(_, r)| r)),
    }
}
