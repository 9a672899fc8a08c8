//! Process-crash test: runs the engine in a child process (`examples/crash_writer.rs`) under
//! concurrent appends, kills it with SIGKILL at varying moments over many cycles, reopens the
//! log and checks that every acknowledged event is present, intact, in order, and that `$all`
//! stays gapless. (Power loss, where the page cache is lost too, is covered by the crash images
//! of `tests/failures.rs`.) `FACTLINE_KILL9_CYCLES` sets the number of cycles (default 12).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use factline_core::{
    StreamId, Uuid,
    testkit::{all_events, stream_events},
};
use factline_log::LogStore;

fn child_binary() -> PathBuf {
    // target/<profile>/deps/kill9-<hash> → target/<profile>/examples/crash_writer
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let child = profile_dir.join("examples").join("crash_writer");
    {
        // Always: `cargo test` builds examples, but not when only this test target was
        // selected, and a stale child would test old code. A no-op when it is fresh.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "-p", "factline-log", "--example", "crash_writer"])
            .status()
            .unwrap();
        assert!(status.success(), "building examples/crash_writer failed");
    }
    assert!(child.exists(), "{} is missing", child.display());
    child
}

struct Ack {
    writer: usize,
    first_revision: u64,
    count: u64,
    first_id: Uuid,
}

fn parse(line: &str) -> Option<Ack> {
    let mut parts = line.split(' ');
    (parts.next()? == "ack").then_some(())?;
    Some(Ack {
        writer: parts.next()?.parse().ok()?,
        first_revision: parts.next()?.parse().ok()?,
        count: parts.next()?.parse().ok()?,
        first_id: parts.next()?.parse().ok()?,
    })
}

#[test]
fn acknowledged_events_survive_kill_9() {
    let cycles: u64 = std::env::var("FACTLINE_KILL9_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let child = child_binary();
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut acknowledged: Vec<Ack> = Vec::new();
    for cycle in 0..cycles {
        let mut process = Command::new(&child)
            .arg(dir.path())
            .arg("8")
            // A small memtable: the kill also lands in index flushes, checkpoints and merges.
            .arg("500")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = process.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            // Only complete lines count: the last one may be cut by the kill.
            let mut lines = Vec::new();
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if line.ends_with('\n') {
                    lines.push(line.trim_end().to_owned());
                }
                line.clear();
            }
            lines
        });
        // Vary the moment of the kill: 150..=610 ms after start, in a fixed pseudo-random order.
        let wait_ms = 150 + (cycle * 7919) % 461;
        std::thread::sleep(Duration::from_millis(wait_ms));
        process.kill().unwrap();
        process.wait().unwrap();
        let lines = reader.join().unwrap();
        let before = acknowledged.len();
        acknowledged.extend(lines.iter().filter_map(|l| parse(l)));
        assert!(
            acknowledged.len() > before,
            "cycle {cycle}: the child acknowledged nothing"
        );

        runtime.block_on(async {
            let store = LogStore::open(dir.path()).await.unwrap();
            let all = all_events(&store).await;
            for (i, e) in all.iter().enumerate() {
                assert_eq!(e.position.0, i as u64, "cycle {cycle}: $all has a gap");
            }
            let mut streams = std::collections::HashMap::new();
            for ack in &acknowledged {
                let events = streams.entry(ack.writer).or_insert_with(|| {
                    let stream = StreamId::new(format!("kill-{}", ack.writer)).unwrap();
                    futures_lite_block(&store, stream)
                });
                let events: &Vec<(u64, Uuid, u64)> = events;
                let first = ack.first_revision as usize;
                assert!(
                    events.len() >= first + ack.count as usize,
                    "cycle {cycle}: acknowledged events of kill-{} are missing",
                    ack.writer
                );
                assert_eq!(events[first].1, ack.first_id, "cycle {cycle}: wrong event");
                for k in 0..ack.count as usize {
                    assert_eq!(events[first + k].0, (first + k) as u64);
                    assert_eq!(events[first + k].2, (first + k) as u64, "payload intact");
                }
            }
            store.close().await;
        });
    }
    eprintln!(
        "kill -9: {cycles} cycles, {} acknowledged appends checked",
        acknowledged.len()
    );
    let report = factline_log::verify(dir.path()).unwrap();
    assert!(report.events as usize >= acknowledged.iter().map(|a| a.count as usize).sum::<usize>());
}

/// (revision, id, revision in the payload) of every event of `stream`, read synchronously
/// inside the caller's `block_on` through a nested current-thread runtime.
fn futures_lite_block(store: &LogStore, stream: StreamId) -> Vec<(u64, Uuid, u64)> {
    let store = store.clone();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async move {
                stream_events(&store, &stream)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|e| {
                        let payload: serde_json::Value = e.data_json().unwrap();
                        (e.revision.0, e.id, payload["revision"].as_u64().unwrap())
                    })
                    .collect()
            })
    })
    .join()
    .unwrap()
}
