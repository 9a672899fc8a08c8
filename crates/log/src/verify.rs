//! `verify`: checks every record of a data directory without changing it.

use std::path::Path;

use crate::{
    recovery::{OpenError, Repair, ScanMode, scan},
    storage::{DiskStorage, Storage},
};

/// What [`verify`] found in a log that is not corrupt.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Segment files checked.
    pub segments: usize,
    /// Records checked (events, metadata, tombstones).
    pub records: u64,
    /// Events in the log.
    pub events: u64,
    /// Streams in the log.
    pub streams: usize,
    /// What opening the log would repair (a torn tail from an interrupted write is normal
    /// after a crash and loses nothing acknowledged).
    pub pending_repairs: Vec<Repair>,
}

/// Checks every record, header, position and revision of the log in `dir` on disk.
/// Corruption is an `Err(OpenError::Corrupt { file, offset, .. })`.
pub fn verify(dir: &Path) -> Result<VerifyReport, OpenError> {
    verify_with(&DiskStorage, dir, 32)
}

/// [`verify`] on any storage.
pub fn verify_with(
    storage: &dyn Storage,
    dir: &Path,
    window: usize,
) -> Result<VerifyReport, OpenError> {
    let lock = storage.lock(&dir.join("LOCK")).map_err(|source| {
        if source.kind() == std::io::ErrorKind::WouldBlock {
            OpenError::Locked {
                dir: dir.to_path_buf(),
            }
        } else {
            OpenError::Io {
                action: "locking",
                path: dir.join("LOCK"),
                source,
            }
        }
    })?;
    let recovered = scan(storage, dir, window, ScanMode::ReadOnly)?;
    drop(lock);
    Ok(VerifyReport {
        segments: recovered.segments.len(),
        records: recovered.records,
        events: recovered.next_position,
        streams: recovered.index.streams.len(),
        pending_repairs: recovered.repairs,
    })
}
