//! Child process of the kill -9 crash test (`tests/kill9.rs`): opens the log in the directory
//! given as the first argument and appends forever from several tasks, printing one line per
//! acknowledged append: `ack <writer> <first revision> <event count> <first event id>`.
//! It continues each writer's stream where the previous (killed) run left it.
#![allow(clippy::print_stdout, clippy::expect_used, clippy::unwrap_used)]

use std::{io::Write as _, path::Path, sync::Arc};

use factline_core::{
    EventData, EventStore, ExpectedVersion, ReadStreamError, ReadStreamOptions, StreamId,
};
use factline_log::{DiskStorage, LogOptions, LogStore};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .expect("usage: crash_writer DIR [WRITERS [MEMTABLE_ENTRIES]]");
    let writers: usize = args
        .next()
        .map_or(8, |w| w.parse().expect("WRITERS is a number"));
    let mut options = LogOptions::default();
    if let Some(entries) = args.next() {
        options.index_memtable_entries_max = entries.parse().expect("MEMTABLE_ENTRIES is a number");
    }
    let store = LogStore::open_with(Arc::new(DiskStorage), Path::new(&dir), options)
        .await
        .expect("open the log")
        .0;
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new(format!("kill-{writer}")).unwrap();
            let mut next = match store
                .read_stream(&stream, ReadStreamOptions::backwards().limit(1))
                .await
            {
                Ok(slice) => slice.last_revision.0 + 1,
                Err(ReadStreamError::NotFound { .. }) => 0,
                Err(error) => panic!("reading {stream}: {error}"),
            };
            for i in 0u64.. {
                let count = 1 + (i % 3) as usize;
                let batch: Vec<EventData> = (0..count)
                    .map(|j| {
                        EventData::json(
                            "CrashTested",
                            &serde_json::json!({ "writer": writer, "revision": next + j as u64 }),
                        )
                        .unwrap()
                    })
                    .collect();
                let first_id = batch[0].id;
                let expected = match next {
                    0 => ExpectedVersion::NoStream,
                    n => ExpectedVersion::Exact(factline_core::Revision(n - 1)),
                };
                let result = store
                    .append(&stream, expected, batch)
                    .await
                    .expect("append");
                let line = format!("ack {writer} {next} {count} {first_id}\n");
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(line.as_bytes()).unwrap();
                stdout.flush().unwrap();
                next = result.next_expected_version.0 + 1;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}
