//! The embedded engine under the shared conformance suite and the reference model: on the
//! in-memory fault-injecting storage (fast, one test per case) and on the real disk.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use factline_core::testkit::{
    self,
    model::{ModelConfig, check_against_model_with},
};
use factline_log::{DiskStorage, LogOptions, LogStore, faulty::FaultyStorage};

async fn in_memory_log() -> LogStore {
    LogStore::open_with(
        Arc::new(FaultyStorage::new()),
        Path::new("/data"),
        LogOptions::default(),
    )
    .await
    .unwrap()
    .0
}

factline_core::event_store_conformance!(in_memory_log());

#[test]
fn agrees_with_the_model() {
    check_against_model_with(
        in_memory_log,
        256,
        ModelConfig {
            idempotency_window_events: Some(LogOptions::default().idempotency_window_events),
        },
    );
}

#[test]
fn agrees_with_the_model_with_a_tiny_idempotency_window_and_segments() {
    model_with_window_2(LogOptions::default());
}

/// The model test with an idempotency window of 2 events and 4 KiB segments on top of `base`.
fn model_with_window_2(base: LogOptions) {
    let options = move || {
        let mut options = base.clone();
        options.idempotency_window_events = 2;
        options.segment_size_bytes_max = 4096;
        options
    };
    check_against_model_with(
        move || {
            let options = options();
            async move {
                LogStore::open_with(Arc::new(FaultyStorage::new()), Path::new("/d"), options)
                    .await
                    .unwrap()
                    .0
            }
        },
        256,
        ModelConfig {
            idempotency_window_events: Some(2),
        },
    );
}

#[test]
fn passes_the_suite_on_the_real_disk() {
    suite_on_disk(LogOptions::default());
}

/// Runs every case of the suite on the real disk, each in a fresh directory.
fn suite_on_disk(options: LogOptions) {
    let root = tempfile::tempdir().unwrap();
    let counter = AtomicU64::new(0);
    let report = testkit::run_suite(|| {
        let dir = root
            .path()
            .join(counter.fetch_add(1, Ordering::Relaxed).to_string());
        let options = options.clone();
        async move {
            LogStore::open_with(Arc::new(DiskStorage), &dir, options)
                .await
                .unwrap()
                .0
        }
    });
    assert!(report.failed.is_empty(), "{:#?}", report.failed);
    assert_eq!(
        report.passed.len(),
        testkit::contract_cases::<LogStore>().len()
    );
}

/// Options that flush the memtable every few entries and keep tiny caches, so that every case
/// runs across memtable, frozen memtable, index tables, merges and cache misses.
fn tiny_index_options() -> LogOptions {
    let mut options = LogOptions::default();
    options.index_memtable_entries_max = 3;
    options.stream_cache_streams_max = 2;
    options
}

mod tiny_index {
    use super::*;

    async fn tiny_index_log() -> LogStore {
        LogStore::open_with(
            Arc::new(FaultyStorage::new()),
            Path::new("/data"),
            tiny_index_options(),
        )
        .await
        .unwrap()
        .0
    }

    factline_core::event_store_conformance!(tiny_index_log());
}

#[test]
fn agrees_with_the_model_with_a_tiny_memtable_and_caches() {
    model_with_window_2(tiny_index_options());
}

#[test]
fn passes_the_suite_on_the_real_disk_with_a_tiny_memtable() {
    suite_on_disk(tiny_index_options());
}
