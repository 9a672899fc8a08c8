//! The embedded checkpoint store: the shared contract on disk and on the fault-injecting
//! storage, durability across reopen and crash images, and failures that leave the previous
//! checkpoint in place.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{path::Path, sync::Arc};

use factline_core::{
    CheckpointError, CheckpointStore as _, Position, testkit::checkpoint_store_conformance,
};
use factline_log::{
    LogOptions, LogStore,
    faulty::{FaultyStorage, Torn},
};

const DIR: &str = "/data";

async fn open_faulty(storage: &FaultyStorage) -> LogStore {
    LogStore::open_with(
        Arc::new(storage.clone()),
        Path::new(DIR),
        LogOptions::default(),
    )
    .await
    .unwrap()
    .0
}

/// The checkpoint `orders-view` in the log a power loss now would leave.
async fn after_a_crash(storage: &FaultyStorage, torn: Torn) -> Option<Position> {
    let reopened = open_faulty(&storage.crash_image(torn)).await;
    let position = reopened
        .checkpoints()
        .load_checkpoint("orders-view")
        .await
        .unwrap();
    reopened.close().await;
    position
}

#[tokio::test]
async fn checkpoints_keep_the_contract_on_disk_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogStore::open(dir.path()).await.unwrap();
    checkpoint_store_conformance(&log.checkpoints()).await;
    log.checkpoints()
        .save_checkpoint("orders-view", Position(41))
        .await
        .unwrap();
    log.close().await;
    drop(log);
    let log = LogStore::open(dir.path()).await.unwrap();
    assert_eq!(
        log.checkpoints()
            .load_checkpoint("orders-view")
            .await
            .unwrap(),
        Some(Position(41))
    );
    log.close().await;
}

#[tokio::test]
async fn a_saved_checkpoint_survives_a_crash_and_a_failed_save_keeps_the_previous_one() {
    let storage = FaultyStorage::new();
    let log = open_faulty(&storage).await;
    let checkpoints = log.checkpoints();
    checkpoint_store_conformance(&checkpoints).await;
    checkpoints
        .save_checkpoint("orders-view", Position(10))
        .await
        .unwrap();
    // Whatever a power loss leaves of unsynced bytes, a returned save is there.
    for torn in [Torn::Nothing, Torn::Everything] {
        assert_eq!(after_a_crash(&storage, torn).await, Some(Position(10)));
    }
    // A save whose fdatasync fails is an error, and the previous checkpoint stays.
    storage.fail_syncs_after(0);
    let failed = checkpoints
        .save_checkpoint("orders-view", Position(20))
        .await;
    assert!(
        matches!(failed, Err(CheckpointError::Storage(_))),
        "{failed:?}"
    );
    assert_eq!(
        after_a_crash(&storage, Torn::Nothing).await,
        Some(Position(10))
    );
}

#[tokio::test]
async fn a_corrupt_checkpoint_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogStore::open(dir.path()).await.unwrap();
    let checkpoints = log.checkpoints();
    checkpoints
        .save_checkpoint("orders-view", Position(3))
        .await
        .unwrap();
    let file = std::fs::read_dir(dir.path().join("checkpoints"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|e| e == "ckpt"))
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let error = checkpoints
        .load_checkpoint("orders-view")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("checksum mismatch"), "{error}");
    assert!(error.contains(&file.display().to_string()), "{error}");
    log.close().await;
}
