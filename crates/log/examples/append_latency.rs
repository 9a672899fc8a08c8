//! Measures single-writer append latency of the engine against a plain pwrite + fdatasync loop
//! on the same file system (a quick check; the benchmark harness is crates/bench).
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::{io::Write as _, os::unix::fs::FileExt as _, time::Instant};

use factline_core::{EventData, EventStore, ExpectedVersion, StreamId};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir =
        tempfile::tempdir_in(std::env::args().nth(1).unwrap_or_else(|| "/tmp".into())).unwrap();
    let store = factline_log::LogStore::open(dir.path().join("log"))
        .await
        .unwrap();
    let stream = StreamId::new("latency-1").unwrap();
    let payload = serde_json::json!({ "pad": "x".repeat(180) });
    let raw = std::fs::File::options()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(dir.path().join("raw"))
        .unwrap();
    let record = vec![7u8; 260];
    let mut raw_offset = 0u64;
    let (mut engine, mut plain) = (Vec::new(), Vec::new());
    for round in 0..2000 {
        if round % 2 == 0 {
            let event = EventData::json("Measured", &payload).unwrap();
            let start = Instant::now();
            store
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await
                .unwrap();
            engine.push(start.elapsed().as_micros());
        } else {
            let start = Instant::now();
            raw.write_all_at(&record, raw_offset).unwrap();
            raw.sync_data().unwrap();
            raw_offset += record.len() as u64;
            plain.push(start.elapsed().as_micros());
        }
    }
    engine.sort_unstable();
    plain.sort_unstable();
    let p = |v: &Vec<u128>, q: f64| v[((v.len() as f64) * q) as usize];
    println!(
        "engine append   p50 {} µs  p99 {} µs",
        p(&engine, 0.5),
        p(&engine, 0.99)
    );
    println!(
        "pwrite+fdatasync p50 {} µs  p99 {} µs",
        p(&plain, 0.5),
        p(&plain, 0.99)
    );
    std::io::stdout().flush().unwrap();
    store.close().await;
}
