//! Writes N events (default 10,000,000) into a log at DIR with 16 concurrent writers appending
//! batches of 100 (skipped when the log already holds N), then times `LogStore::open` three
//! times, and once more after removing the index (a full rebuild from the log).
//!   cargo run --release -p factline-log --example reopen_time -- DIR [N]
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use factline_core::{EventData, EventStore, ExpectedVersion, StreamId};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: reopen_time DIR [N]"));
    let target: u64 = args.next().map_or(10_000_000, |n| n.parse().unwrap());
    let store = factline_log::LogStore::open(&dir).await.unwrap();
    let present = store.head_position().await.unwrap().map_or(0, |p| p.0 + 1);
    if present < target {
        let start = Instant::now();
        let per_writer = (target - present).div_ceil(16 * 100);
        let mut writers = Vec::new();
        for w in 0..16u64 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                let payload = serde_json::json!({ "pad": "x".repeat(180) });
                for i in 0..per_writer {
                    let stream = StreamId::new(format!("reopen-{w}-{}", i % 1000)).unwrap();
                    let events = (0..100)
                        .map(|_| EventData::json("Reopened", &payload).unwrap())
                        .collect();
                    store
                        .append(&stream, ExpectedVersion::Any, events)
                        .await
                        .unwrap();
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        println!(
            "wrote {} events in {:.1} s",
            target - present,
            start.elapsed().as_secs_f64()
        );
    }
    let events = store.head_position().await.unwrap().map_or(0, |p| p.0 + 1);
    store.close().await;
    drop(store);
    for round in 0..4 {
        if round == 3 {
            std::fs::remove_dir_all(dir.join("index")).unwrap();
        }
        let start = Instant::now();
        let (store, report) = factline_log::LogStore::open_with(
            std::sync::Arc::new(factline_log::DiskStorage),
            &dir,
            factline_log::LogOptions::default(),
        )
        .await
        .unwrap();
        let elapsed = start.elapsed();
        println!(
            "{} a log of {events} events in {:.3} s ({} records read after the checkpoint)",
            if report.index_rebuilt {
                "rebuilt the index and opened"
            } else {
                "reopened"
            },
            elapsed.as_secs_f64(),
            report.records
        );
        store.close().await;
    }
}
