//! Closed-loop single-event appends from 1, 8, 32 and 128 concurrent writers on distinct
//! streams: throughput, latency and the mean group size (events per fdatasync). A quick check
//! of group commit; the benchmark harness is crates/bench (W1).
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use factline_core::{EventData, EventStore, ExpectedVersion, StreamId};
use factline_log::LogStore;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir =
        tempfile::tempdir_in(std::env::args().nth(1).unwrap_or_else(|| "/tmp".into())).unwrap();
    let store = Arc::new(LogStore::open(dir.path().join("log")).await.unwrap());
    let payload = serde_json::json!({ "pad": "x".repeat(180) });
    for writers in [1usize, 8, 32, 128] {
        let before = store.stats();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut tasks = Vec::new();
        for w in 0..writers {
            let store = Arc::clone(&store);
            let payload = payload.clone();
            tasks.push(tokio::spawn(async move {
                let stream = StreamId::new(format!("w{writers}-{w}")).unwrap();
                let mut latencies_us = Vec::new();
                while Instant::now() < deadline {
                    let event = EventData::json("Measured", &payload).unwrap();
                    let started = Instant::now();
                    store
                        .append(&stream, ExpectedVersion::Any, vec![event])
                        .await
                        .unwrap();
                    latencies_us.push(started.elapsed().as_micros() as u64);
                }
                latencies_us
            }));
        }
        let mut latencies_us = Vec::new();
        for task in tasks {
            latencies_us.extend(task.await.unwrap());
        }
        let after = store.stats();
        latencies_us.sort_unstable();
        println!(
            "{writers:>4} writers: {:>8.0} events/s  p50 {:>5} µs  p99 {:>6} µs  {:.1} events per group",
            latencies_us.len() as f64 / 2.0,
            latencies_us[latencies_us.len() / 2],
            latencies_us[latencies_us.len() * 99 / 100],
            (after.events_committed - before.events_committed) as f64
                / (after.commit_groups - before.commit_groups) as f64
        );
    }
    store.close().await;
}
