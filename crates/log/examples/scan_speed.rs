//! Writes N events (default 200,000) in batches of 100, then times full `$all` scans and loads
//! of one 1,000-event stream. A quick check of the read path; the benchmark harness is
//! crates/bench (W4, W5).
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use factline_core::{
    EventData, EventStore, ExpectedVersion, ReadAllOptions, ReadStreamOptions, StreamId,
};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .map_or(200_000, |n| n.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = factline_log::LogStore::open(dir.path()).await.unwrap();
    let payload = serde_json::json!({ "pad": "x".repeat(180) });
    for batch in 0..count / 100 {
        let stream = StreamId::new(format!("scan-{}", batch % 50)).unwrap();
        let events = (0..100)
            .map(|_| EventData::json("Scanned", &payload).unwrap())
            .collect();
        store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .unwrap();
    }
    for _ in 0..5 {
        let start = Instant::now();
        let mut seen = 0usize;
        let mut options = ReadAllOptions::forwards().limit(10_000);
        loop {
            let slice = store.read_all(options.clone()).await.unwrap();
            seen += slice.events.len();
            if slice.is_end {
                break;
            }
            options = options.from(slice.next_position);
        }
        let elapsed = start.elapsed();
        println!(
            "scanned {seen} events in {:.1} ms: {:.0} events/s",
            elapsed.as_secs_f64() * 1e3,
            seen as f64 / elapsed.as_secs_f64()
        );
    }
    let loaded = StreamId::new("load-1").unwrap();
    for _ in 0..10 {
        let events = (0..100)
            .map(|_| EventData::json("Loaded", &payload).unwrap())
            .collect();
        store
            .append(&loaded, ExpectedVersion::Any, events)
            .await
            .unwrap();
    }
    let mut load_us = Vec::new();
    for _ in 0..3_000 {
        let start = Instant::now();
        let slice = store
            .read_stream(&loaded, ReadStreamOptions::forwards().limit(10_000))
            .await
            .unwrap();
        assert_eq!(slice.events.len(), 1_000);
        load_us.push(start.elapsed().as_secs_f64() * 1e6);
    }
    load_us.sort_by(f64::total_cmp);
    println!(
        "loaded a 1,000-event stream 3,000 times: p50 {:.0} µs, p99 {:.0} µs",
        load_us[load_us.len() / 2],
        load_us[load_us.len() * 99 / 100]
    );
    store.close().await;
}
