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
    let options = || {
        let mut options = LogOptions::default();
        options.idempotency_window_events = 2;
        options.segment_size_bytes_max = 4096;
        options
    };
    check_against_model_with(
        move || async move {
            LogStore::open_with(Arc::new(FaultyStorage::new()), Path::new("/d"), options())
                .await
                .unwrap()
                .0
        },
        256,
        ModelConfig {
            idempotency_window_events: Some(2),
        },
    );
}

#[test]
fn passes_the_suite_on_the_real_disk() {
    let root = tempfile::tempdir().unwrap();
    let counter = AtomicU64::new(0);
    let report = testkit::run_suite(|| {
        let dir = root
            .path()
            .join(counter.fetch_add(1, Ordering::Relaxed).to_string());
        async move {
            LogStore::open_with(Arc::new(DiskStorage), &dir, LogOptions::default())
                .await
                .unwrap()
                .0
        }
    });
    assert!(report.failed.is_empty(), "{:#?}", report.failed);
    assert_eq!(report.passed.len(), testkit::all_cases::<LogStore>().len());
}
