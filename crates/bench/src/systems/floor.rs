//! The durability floor: every append is one `write` of its bytes followed by one `fdatasync`,
//! serialized by a mutex. No group commit, no index: the cost of "acknowledged means on disk"
//! for one append at a time on this machine's disk. The file grows with every append (as
//! factline-log's segments do), so each fdatasync also commits the new file size.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::Write as _,
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Mutex;

use super::{Expected, Feed, Outcome, System, json_payload};
use crate::config::{SystemKind, WorkloadKind};

const WRITE_ONLY: &str = "the floor only writes and fsyncs a file; it keeps nothing to read";

struct FloorState {
    file: File,
    /// Last revision of each stream: the in-memory check that gives W3 its conflicts.
    heads: HashMap<String, u64>,
    buffer: Vec<u8>,
}

/// See the module docs.
pub(crate) struct FloorSystem {
    state: Arc<Mutex<FloorState>>,
    payload: Bytes,
}

impl FloorSystem {
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("floor.log");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        Ok(Self {
            state: Arc::new(Mutex::new(FloorState {
                file,
                heads: HashMap::new(),
                buffer: Vec::new(),
            })),
            payload: json_payload(),
        })
    }
}

/// Runs blocking file I/O on the current thread: through `block_in_place` on a multi-thread
/// runtime (other tasks move to another worker), inline on a current-thread runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Frames one event: length, stream, revision, payload.
fn frame(buffer: &mut Vec<u8>, stream: &str, revision: u64, payload: &[u8]) {
    let length = (stream.len() + 8 + payload.len()) as u32;
    buffer.extend_from_slice(&length.to_le_bytes());
    buffer.extend_from_slice(&(stream.len() as u16).to_le_bytes());
    buffer.extend_from_slice(stream.as_bytes());
    buffer.extend_from_slice(&revision.to_le_bytes());
    buffer.extend_from_slice(payload);
}

#[async_trait]
impl System for FloorSystem {
    fn kind(&self) -> SystemKind {
        SystemKind::FsyncFloor
    }

    fn not_applicable(&self, workload: WorkloadKind) -> Option<&'static str> {
        match workload {
            WorkloadKind::W1 | WorkloadKind::W2 | WorkloadKind::W3 => None,
            WorkloadKind::W4 | WorkloadKind::W5 | WorkloadKind::W6 => Some(WRITE_ONLY),
        }
    }

    async fn append(&self, stream: &str, expected: Expected, count: usize) -> Result<Outcome> {
        // Writers queue on the async mutex (FIFO); the holder does its write + fdatasync on its
        // own thread (no hand-off to another thread inside the measured operation).
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        let actual = state
            .heads
            .get(stream)
            .map_or(Expected::NoStream, |&head| Expected::Exact(head));
        if actual != expected {
            return Ok(Outcome::Conflict {
                actual: Some(actual),
            });
        }
        state.buffer.clear();
        let first = expected.next_revision();
        for revision in first..first + count as u64 {
            frame(&mut state.buffer, stream, revision, &self.payload);
        }
        let FloorState { file, buffer, .. } = state;
        blocking(|| {
            file.write_all(buffer).context("fsync-floor write")?;
            file.sync_data().context("fsync-floor fdatasync")
        })?;
        state
            .heads
            .insert(stream.to_owned(), first + count as u64 - 1);
        Ok(Outcome::Written)
    }

    async fn stream_version(&self, stream: &str) -> Result<Expected> {
        let state = self.state.lock().await;
        Ok(state
            .heads
            .get(stream)
            .map_or(Expected::NoStream, |&head| Expected::Exact(head)))
    }

    async fn read_stream(&self, _stream: &str) -> Result<u64> {
        bail!(WRITE_ONLY)
    }

    async fn scan_all(&self, _max_events: u64) -> Result<u64> {
        bail!(WRITE_ONLY)
    }

    async fn subscribe(&self) -> Result<Box<dyn Feed>> {
        bail!(WRITE_ONLY)
    }

    fn describe(&self) -> String {
        "one write(2) + fdatasync(2) per append, appends serialized by a mutex, no group commit"
            .to_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn floor_writes_frames_and_checks_expected_versions() {
        let dir = tempfile::tempdir().unwrap();
        let floor = FloorSystem::open(dir.path()).unwrap();
        assert_eq!(
            floor.append("s-1", Expected::NoStream, 2).await.unwrap(),
            Outcome::Written
        );
        assert_eq!(
            floor.append("s-1", Expected::NoStream, 1).await.unwrap(),
            Outcome::Conflict {
                actual: Some(Expected::Exact(1))
            }
        );
        assert_eq!(
            floor.stream_version("s-1").await.unwrap(),
            Expected::Exact(1)
        );
        let size = std::fs::metadata(dir.path().join("floor.log"))
            .unwrap()
            .len();
        assert_eq!(size, 2 * (4 + 2 + 3 + 8 + 200));
    }
}
