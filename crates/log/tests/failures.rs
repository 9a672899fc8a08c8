//! Every failure row of docs/design/log-format.md, driven through the fault-injecting storage:
//! failed fsync, short writes, a full disk, crash images, torn tails, unfinished transactions,
//! torn segment headers, corruption before the tail, and the directory lock.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use factline_core::{
    AppendError, EventData, EventStore, ExpectedVersion, ReadStreamOptions, Revision,
    SnapshotStore, StorageError, StreamId, Uuid,
    testkit::{all_events, stream_events},
};
use factline_log::{
    DiskStorage, LogOptions, LogStore, OpenError, Repair,
    faulty::{FaultyStorage, Torn},
    format::{Record, encode_record},
    verify_with,
};

const DIR: &str = "/data";

fn segment(n: u64) -> PathBuf {
    Path::new(DIR).join("segments").join(format!("{n:010}.seg"))
}

fn stream(name: &str) -> StreamId {
    StreamId::new(name).unwrap()
}

fn event(n: usize) -> EventData {
    EventData::json(
        "Happened",
        &serde_json::json!({ "n": n, "pad": "x".repeat(100) }),
    )
    .unwrap()
}

async fn open(storage: &FaultyStorage) -> Result<(LogStore, factline_log::OpenReport), OpenError> {
    open_with_options(storage, LogOptions::default()).await
}

async fn open_with_options(
    storage: &FaultyStorage,
    options: LogOptions,
) -> Result<(LogStore, factline_log::OpenReport), OpenError> {
    LogStore::open_with(Arc::new(storage.clone()), Path::new(DIR), options).await
}

/// Options whose memtable is flushed to index tables every few events (and tables merged).
fn tiny_index_options() -> LogOptions {
    let mut options = LogOptions::default();
    options.index_memtable_entries_max = 7;
    options.stream_cache_streams_max = 2;
    options
}

async fn open_ok(storage: &FaultyStorage) -> LogStore {
    open(storage).await.unwrap().0
}

#[tokio::test]
async fn a_failed_fsync_fails_the_store_and_acknowledges_nothing() {
    let storage = FaultyStorage::new();
    let store = open_ok(&storage).await;
    let s = stream("order-1");
    store
        .append(&s, ExpectedVersion::NoStream, vec![event(0)])
        .await
        .unwrap();
    storage.fail_syncs_after(0);
    let failed = store.append(&s, ExpectedVersion::Any, vec![event(1)]).await;
    match failed {
        Err(AppendError::Storage(StorageError::Failed { reason })) => {
            assert!(reason.contains("segment 0"), "{reason}");
        }
        other => panic!("expected the store to fail, got {other:?}"),
    }
    // Even once the disk would sync again, the store never retries and refuses every write.
    storage.fail_syncs_after(u64::MAX);
    let syncs = storage.sync_calls();
    let again = store.append(&s, ExpectedVersion::Any, vec![event(2)]).await;
    assert!(
        matches!(
            again,
            Err(AppendError::Storage(StorageError::Failed { .. }))
        ),
        "{again:?}"
    );
    assert_eq!(storage.sync_calls(), syncs, "no fsync is retried");
    // Reads serve what was acknowledged, and only that.
    let events = stream_events(&store, &s).await.unwrap();
    assert_eq!(events.len(), 1);
    store.close().await;
    // A power loss now keeps the acknowledged event; reopening works.
    let image = storage.crash_image(Torn::Nothing);
    let reopened = open_ok(&image).await;
    assert_eq!(stream_events(&reopened, &s).await.unwrap().len(), 1);
    reopened
        .append(&s, ExpectedVersion::Exact(Revision(0)), vec![event(3)])
        .await
        .unwrap();
}

#[tokio::test]
async fn short_writes_are_completed() {
    let storage = FaultyStorage::new();
    let store = open_ok(&storage).await;
    storage.set_short_writes(true);
    let s = stream("order-short");
    for i in 0..20 {
        store
            .append(&s, ExpectedVersion::Any, vec![event(i), event(i + 100)])
            .await
            .unwrap();
    }
    store.close().await;
    let reopened = open_ok(&storage.crash_image(Torn::Nothing)).await;
    assert_eq!(stream_events(&reopened, &s).await.unwrap().len(), 40);
}

#[tokio::test]
async fn a_full_disk_is_a_clear_error_and_loses_nothing() {
    let storage = FaultyStorage::new();
    let store = open_ok(&storage).await;
    let s = stream("order-full");
    for i in 0..10 {
        store
            .append(&s, ExpectedVersion::Any, vec![event(i)])
            .await
            .unwrap();
    }
    let used: u64 = storage.contents(&segment(0)).unwrap().len() as u64;
    storage.set_space_bytes_max(Some(used + 1_000));
    let mut acknowledged = 10;
    let error = loop {
        match store
            .append(&s, ExpectedVersion::Any, vec![event(acknowledged)])
            .await
        {
            Ok(_) => acknowledged += 1,
            Err(error) => break error,
        }
    };
    let text = error.to_string();
    assert!(text.contains("disk full"), "{text}");
    assert!(text.contains("acknowledged data is intact"), "{text}");
    store.close().await;
    storage.set_space_bytes_max(None);
    for torn in [Torn::Nothing, Torn::Everything] {
        let (reopened, report) = open(&storage.crash_image(torn)).await.unwrap();
        let events = stream_events(&reopened, &s).await.unwrap();
        assert_eq!(
            events.len(),
            acknowledged,
            "with {torn:?}: {:?}",
            report.repairs
        );
        reopened.close().await;
    }
}

/// Appends from several tasks while crash images are taken at random moments; every image must
/// open and hold every event acknowledged before it was taken, with no partial transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_images_keep_every_acknowledged_event() {
    crash_images_with(LogOptions::default()).await;
}

/// The same while the index is flushed, checkpointed and merged all the time: every image's
/// index (checkpoint, tables, positions file, replayed tail) must agree with its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_images_with_index_flushes_keep_every_acknowledged_event() {
    crash_images_with(tiny_index_options()).await;
}

async fn crash_images_with(options: LogOptions) {
    let storage = FaultyStorage::new();
    let store = open_with_options(&storage, options.clone())
        .await
        .unwrap()
        .0;
    // (stream, first revision, first event id, event count) of every acknowledged append.
    type Acknowledged = Vec<(String, u64, Uuid, usize)>;
    let acknowledged: Arc<Mutex<Acknowledged>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let (store, acknowledged) = (store.clone(), acknowledged.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..150usize {
                let name = format!("crash-{w}");
                let batch: Vec<EventData> = (0..1 + i % 3).map(|j| event(i * 10 + j)).collect();
                let first = batch[0].id;
                let n = batch.len();
                let result = store
                    .append(&stream(&name), ExpectedVersion::Any, batch)
                    .await
                    .unwrap();
                let first_revision = result.next_expected_version.0 + 1 - n as u64;
                acknowledged
                    .lock()
                    .unwrap()
                    .push((name, first_revision, first, n));
            }
        }));
    }
    let mut images = Vec::new();
    for round in 0..40usize {
        tokio::time::sleep(std::time::Duration::from_micros(
            300 + (round as u64 * 97) % 900,
        ))
        .await;
        let acked_before = acknowledged.lock().unwrap().clone();
        let torn = match round % 4 {
            0 => Torn::Nothing,
            1 => Torn::Everything,
            2 => Torn::Prefix(round * 37),
            _ => Torn::PrefixThenZeros(round * 11),
        };
        images.push((storage.crash_image(torn), acked_before, torn));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    for (image, acked, torn) in images {
        let verified = verify_with(Arc::new(image.clone()), Path::new(DIR))
            .unwrap_or_else(|e| panic!("image with {torn:?} does not verify: {e}"));
        let (reopened, _) = open_with_options(&image, options.clone())
            .await
            .unwrap_or_else(|e| panic!("image with {torn:?} did not open: {e}"));
        let head = reopened
            .head_position()
            .await
            .unwrap()
            .map_or(0, |p| p.0 + 1);
        assert_eq!(verified.events, head, "verify and open agree ({torn:?})");
        let all = all_events(&reopened).await;
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.position.0, i as u64, "gapless after recovery ({torn:?})");
        }
        let mut by_stream: HashMap<String, Vec<Uuid>> = HashMap::new();
        for e in &all {
            by_stream
                .entry(e.stream.to_string())
                .or_default()
                .push(e.id);
        }
        // The stream index agrees with the positions.
        for (name, ids) in &by_stream {
            let read: Vec<Uuid> = stream_events(&reopened, &stream(name))
                .await
                .unwrap()
                .iter()
                .map(|e| e.id)
                .collect();
            assert_eq!(&read, ids, "{name} read by stream with {torn:?}");
        }
        for (name, first_revision, first_id, n) in acked {
            let ids = by_stream.get(&name).map(Vec::as_slice).unwrap_or_default();
            assert!(
                ids.len() >= (first_revision as usize + n),
                "acknowledged events of {name} lost with {torn:?}"
            );
            assert_eq!(
                ids[first_revision as usize], first_id,
                "{name} with {torn:?}"
            );
        }
        // Appends are atomic: batch i of a writer holds 1 + i % 3 events numbered i * 10 + j,
        // and after recovery every batch is there whole or not at all.
        let mut batch_sizes: HashMap<(String, u64), usize> = HashMap::new();
        for e in &all {
            let n = e.data_json::<serde_json::Value>().unwrap()["n"]
                .as_u64()
                .unwrap();
            *batch_sizes
                .entry((e.stream.to_string(), n / 10))
                .or_default() += 1;
        }
        for ((name, i), size) in batch_sizes {
            assert_eq!(
                size as u64,
                1 + i % 3,
                "batch {i} of {name} is partial ({torn:?})"
            );
        }
        reopened.close().await;
    }
}

#[tokio::test]
async fn a_torn_tail_is_truncated_on_open() {
    let storage = FaultyStorage::new();
    let store = open_ok(&storage).await;
    let s = stream("order-torn");
    store
        .append(&s, ExpectedVersion::Any, vec![event(0), event(1)])
        .await
        .unwrap();
    store.close().await;
    let valid_len = storage.contents(&segment(0)).unwrap().len();
    // Half of a valid record, as an interrupted write leaves it.
    let recorded = factline_core::RecordedEvent::new(
        s.clone(),
        Revision(2),
        factline_core::Position(2),
        factline_core::Timestamp::now(),
        event(2),
    );
    let mut record = Vec::new();
    encode_record(&mut record, &Record::Event(recorded), true);
    storage
        .corrupt(&segment(0), valid_len, &record[..record.len() / 2])
        .unwrap();
    let (reopened, report) = open(&storage).await.unwrap();
    assert_eq!(
        report.repairs,
        vec![Repair::TruncatedTail {
            file: segment(0),
            valid_end: valid_len as u64,
            length_before: (valid_len + record.len() / 2) as u64,
        }]
    );
    assert_eq!(stream_events(&reopened, &s).await.unwrap().len(), 2);
    reopened
        .append(&s, ExpectedVersion::Exact(Revision(1)), vec![event(3)])
        .await
        .unwrap();
    reopened.close().await;
    let (again, report) = open(&storage).await.unwrap();
    assert!(report.repairs.is_empty());
    assert_eq!(stream_events(&again, &s).await.unwrap().len(), 3);
}

#[tokio::test]
async fn an_unfinished_transaction_is_dropped() {
    let storage = FaultyStorage::new();
    let store = open_ok(&storage).await;
    let s = stream("order-unfinished");
    store
        .append(&s, ExpectedVersion::Any, vec![event(0)])
        .await
        .unwrap();
    store.close().await;
    let valid_len = storage.contents(&segment(0)).unwrap().len();
    // A complete record of a transaction whose COMMIT record never arrived.
    let recorded = factline_core::RecordedEvent::new(
        s.clone(),
        Revision(1),
        factline_core::Position(1),
        factline_core::Timestamp::now(),
        event(1),
    );
    let mut record = Vec::new();
    encode_record(&mut record, &Record::Event(recorded), false);
    storage.corrupt(&segment(0), valid_len, &record).unwrap();
    let (reopened, report) = open(&storage).await.unwrap();
    assert!(
        matches!(report.repairs[..], [Repair::TruncatedTail { .. }]),
        "{report:?}"
    );
    assert_eq!(stream_events(&reopened, &s).await.unwrap().len(), 1);
}

#[tokio::test]
async fn corruption_before_the_tail_refuses_to_open_naming_file_and_offset() {
    let storage = FaultyStorage::new();
    let store = open_ok(&storage).await;
    let s = stream("order-rot");
    for i in 0..5 {
        store
            .append(&s, ExpectedVersion::Any, vec![event(i)])
            .await
            .unwrap();
    }
    store.close().await;
    // Flip a byte inside the first record's body; valid records follow it.
    let bytes = storage.contents(&segment(0)).unwrap();
    storage
        .corrupt(&segment(0), 64 + 40, &[bytes[64 + 40] ^ 0xff])
        .unwrap();
    let error = open(&storage).await.unwrap_err();
    match &error {
        OpenError::Corrupt { file, offset, .. } => {
            assert_eq!(file, &segment(0));
            assert_eq!(*offset, 64);
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    let text = error.to_string();
    assert!(
        text.contains("0000000000.seg") && text.contains("offset 64"),
        "{text}"
    );
    // Nothing was changed: the file is as it was, and verify reports the same.
    assert_eq!(storage.contents(&segment(0)).unwrap().len(), bytes.len());
    let verified = verify_with(Arc::new(storage.clone()), Path::new(DIR));
    assert!(
        matches!(verified, Err(OpenError::Corrupt { offset: 64, .. })),
        "{verified:?}"
    );
}

#[tokio::test]
async fn a_sealed_segment_with_damage_refuses_to_open() {
    let storage = FaultyStorage::new();
    let mut options = LogOptions::default();
    options.segment_size_bytes_max = 4096;
    let (store, _) =
        LogStore::open_with(Arc::new(storage.clone()), Path::new(DIR), options.clone())
            .await
            .unwrap();
    let s = stream("order-sealed");
    for i in 0..100 {
        store
            .append(&s, ExpectedVersion::Any, vec![event(i)])
            .await
            .unwrap();
    }
    store.close().await;
    assert!(
        storage.contents(&segment(2)).is_some(),
        "several segments were written"
    );
    let len = storage.contents(&segment(0)).unwrap().len();
    // Damage the last bytes of segment 0: a sealed segment, so this is not a torn tail.
    storage.corrupt(&segment(0), len - 3, &[0, 0, 0]).unwrap();
    let error = LogStore::open_with(Arc::new(storage.clone()), Path::new(DIR), options)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, OpenError::Corrupt { file, .. } if file == &segment(0)),
        "{error}"
    );
}

#[tokio::test]
async fn a_torn_segment_header_is_removed() {
    let storage = FaultyStorage::new();
    let store = open_ok(&storage).await;
    let s = stream("order-roll");
    store
        .append(&s, ExpectedVersion::Any, vec![event(0)])
        .await
        .unwrap();
    store.close().await;
    // A crash right after creating segment 1, before its header was durable.
    storage
        .corrupt(&segment(1), 0, &[b'F', b'L', 0, 0, 0])
        .unwrap();
    let verified = verify_with(Arc::new(storage.clone()), Path::new(DIR)).unwrap();
    assert_eq!(
        verified.pending_repairs,
        vec![Repair::RemovedTornSegment { file: segment(1) }]
    );
    let (reopened, report) = open(&storage).await.unwrap();
    assert_eq!(report.repairs, verified.pending_repairs);
    assert!(storage.contents(&segment(1)).is_none());
    reopened
        .append(&s, ExpectedVersion::Exact(Revision(0)), vec![event(1)])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_newer_format_is_refused() {
    let storage = FaultyStorage::new();
    open_ok(&storage).await.close().await;
    let mut header = storage.contents(&segment(0)).unwrap()[..64].to_vec();
    header[8] = 99; // format version
    let crc = crc32c::crc32c(&header[..60]);
    header[60..64].copy_from_slice(&crc.to_le_bytes());
    storage.corrupt(&segment(0), 0, &header).unwrap();
    let error = open(&storage).await.unwrap_err();
    assert!(
        matches!(error, OpenError::UnsupportedVersion { found: 99, .. }),
        "{error}"
    );
}

#[tokio::test]
async fn everything_survives_a_reopen_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).await.unwrap();
    let (a, b, c) = (stream("keep-a"), stream("keep-b"), stream("keep-c"));
    store
        .append(&a, ExpectedVersion::NoStream, vec![event(0), event(1)])
        .await
        .unwrap();
    store
        .append(&b, ExpectedVersion::NoStream, vec![event(2)])
        .await
        .unwrap();
    store
        .append(&c, ExpectedVersion::NoStream, vec![event(3)])
        .await
        .unwrap();
    let metadata = factline_core::StreamMetadata {
        max_count: Some(1),
        ..Default::default()
    };
    store
        .set_stream_metadata(&a, metadata.clone())
        .await
        .unwrap();
    store
        .delete_stream(&b, ExpectedVersion::Any, factline_core::DeleteMode::Soft)
        .await
        .unwrap();
    store
        .delete_stream(
            &c,
            ExpectedVersion::Any,
            factline_core::DeleteMode::Tombstone,
        )
        .await
        .unwrap();
    let snapshot = factline_core::Snapshot {
        revision: Revision(1),
        state_version: 2,
        state: factline_core::Bytes::from_static(b"state"),
        taken_at: factline_core::Timestamp::now(),
    };
    store.save_snapshot(&a, snapshot.clone()).await.unwrap();
    let before = all_events(&store).await;
    store.close().await;

    // The directory is locked while open.
    let reopened = LogStore::open(dir.path()).await.unwrap();
    let locked =
        LogStore::open_with(Arc::new(DiskStorage), dir.path(), LogOptions::default()).await;
    assert!(
        matches!(locked, Err(OpenError::Locked { .. })),
        "{locked:?}"
    );

    assert_eq!(all_events(&reopened).await, before);
    assert_eq!(reopened.stream_metadata(&a).await.unwrap(), metadata);
    let visible = reopened
        .read_stream(&a, ReadStreamOptions::forwards())
        .await
        .unwrap();
    assert_eq!(visible.events.len(), 1);
    assert!(
        reopened
            .read_stream(&b, ReadStreamOptions::forwards())
            .await
            .is_err()
    );
    let tombstoned = reopened
        .append(&c, ExpectedVersion::Any, vec![event(4)])
        .await;
    assert!(matches!(tombstoned, Err(AppendError::StreamDeleted { .. })));
    assert_eq!(reopened.load_snapshot(&a).await.unwrap(), Some(snapshot));
    // A retry of the first append is still recognized after the reopen.
    let r = reopened
        .append(&b, ExpectedVersion::NoStream, vec![event(5)])
        .await
        .unwrap();
    assert_eq!(
        r.next_expected_version,
        Revision(1),
        "revisions continue after a soft delete"
    );
    reopened.close().await;
    let report = factline_log::verify(dir.path()).unwrap();
    assert_eq!(report.events, 5);
    assert!(report.pending_repairs.is_empty());
}

/// Recovery reads segments in 4 MiB windows: records cross window boundaries, and a torn tail
/// or damage far into a large segment must be found the same way.
#[tokio::test]
async fn large_segments_are_recovered_through_windows() {
    let storage = FaultyStorage::new();
    let store = open_ok(&storage).await;
    let s = stream("order-large");
    let big = |n: usize| {
        EventData::json(
            "Large",
            &serde_json::json!({ "n": n, "pad": "y".repeat(1_000) }),
        )
        .unwrap()
    };
    for i in 0..600 {
        let batch = (0..10).map(|j| big(i * 10 + j)).collect();
        store.append(&s, ExpectedVersion::Any, batch).await.unwrap();
    }
    store.close().await;
    let len = storage.contents(&segment(0)).unwrap().len();
    assert!(
        len > 6 * 1024 * 1024,
        "the segment spans several windows ({len} bytes)"
    );
    let (reopened, report) = open(&storage).await.unwrap();
    assert!(report.repairs.is_empty());
    assert_eq!(stream_events(&reopened, &s).await.unwrap().len(), 6_000);
    reopened.close().await;

    // A torn tail after more than one window of data.
    storage
        .corrupt(&segment(0), len, &[200, 4, 0, 0, 1, 2, 3])
        .unwrap();
    let (reopened, report) = open(&storage).await.unwrap();
    assert!(
        matches!(report.repairs[..], [Repair::TruncatedTail { valid_end, .. }] if valid_end == len as u64)
    );
    reopened.close().await;

    // Damage past the first window is corruption, reported at the damaged record.
    let at = 4 * 1024 * 1024 + 500_000;
    let bytes = storage.contents(&segment(0)).unwrap();
    storage
        .corrupt(&segment(0), at, &[bytes[at] ^ 0x55])
        .unwrap();
    match open(&storage).await {
        Err(OpenError::Corrupt { offset, .. }) => {
            assert!(
                offset <= at as u64 && offset + 1_200 > at as u64,
                "offset {offset}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// `$all` scans read in chunks; a record larger than a chunk is read whole.
#[tokio::test]
async fn records_larger_than_the_read_chunk_are_scanned() {
    let storage = FaultyStorage::new();
    let mut options = LogOptions::default();
    options.read_chunk_bytes = 4096;
    let (store, _) = LogStore::open_with(Arc::new(storage.clone()), Path::new(DIR), options)
        .await
        .unwrap();
    let s = stream("order-wide");
    for i in 0..20 {
        let size = if i % 3 == 0 { 10_000 } else { 100 };
        let event = EventData::json(
            "Wide",
            &serde_json::json!({ "n": i, "pad": "z".repeat(size) }),
        )
        .unwrap();
        store
            .append(&s, ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    }
    let all = all_events(&store).await;
    assert_eq!(all.len(), 20);
    for (i, e) in all.iter().enumerate() {
        let n = e.data_json::<serde_json::Value>().unwrap()["n"]
            .as_u64()
            .unwrap();
        assert_eq!(n, i as u64);
    }
}
