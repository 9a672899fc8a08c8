//! Snapshot files: one per stream in `DIR/snapshots/`, replaced atomically (write a temporary
//! file, `fdatasync`, rename, sync the directory), checked by a CRC32C on load.
//!
//! Layout: magic `FLSNAP\0\x01` (8) | CRC32C of the rest (4) | stream id (u16 len + bytes) |
//! revision u64 | state version u32 | taken at i64 µs | state (u32 len + bytes).

use std::path::{Path, PathBuf};

use factline_core::{
    Bytes, Revision, Snapshot, SnapshotError, StorageError, StreamId, Timestamp, Uuid,
};

use crate::{
    small_file::{self, ReadError},
    storage::Storage,
};

const MAGIC: [u8; 8] = *b"FLSNAP\0\x01";
/// Largest snapshot file read: a state of the largest event size plus the header and name.
const SNAPSHOT_FILE_BYTES_MAX: u64 = 1 << 31;
/// Namespace of the UUIDv5 that names a stream's snapshot file.
const FILE_NAMESPACE: Uuid = Uuid::from_u128(0x6a0f_3c4e_2b1d_4e8a_9c7b_5d3e_1f20_a4b6);

fn snapshots_dir(dir: &Path) -> PathBuf {
    dir.join("snapshots")
}

fn file_path(dir: &Path, stream: &StreamId) -> PathBuf {
    let name = Uuid::new_v5(&FILE_NAMESPACE, stream.as_str().as_bytes());
    snapshots_dir(dir).join(format!("{}.snap", name.simple()))
}

fn storage_error(error: impl std::error::Error + Send + Sync + 'static) -> SnapshotError {
    SnapshotError::Storage(StorageError::backend(error))
}

fn corrupt(path: &Path, reason: &str) -> SnapshotError {
    SnapshotError::Storage(StorageError::Backend(
        format!("snapshot file {} is corrupt: {reason}", path.display()).into(),
    ))
}

/// Writes `snapshot` for `stream`, replacing any previous one atomically.
pub(crate) fn save(
    storage: &dyn Storage,
    dir: &Path,
    stream: &StreamId,
    snapshot: &Snapshot,
) -> Result<(), SnapshotError> {
    let folder = snapshots_dir(dir);
    let mut body = Vec::with_capacity(snapshot.state.len() + 300);
    body.extend_from_slice(&(stream.as_str().len() as u16).to_le_bytes());
    body.extend_from_slice(stream.as_str().as_bytes());
    body.extend_from_slice(&snapshot.revision.0.to_le_bytes());
    body.extend_from_slice(&snapshot.state_version.to_le_bytes());
    body.extend_from_slice(&snapshot.taken_at.as_unix_micros().to_le_bytes());
    body.extend_from_slice(&(snapshot.state.len() as u32).to_le_bytes());
    body.extend_from_slice(&snapshot.state);
    small_file::replace(storage, &folder, &file_path(dir, stream), &MAGIC, &body)
        .map_err(storage_error)
}

/// Reads the snapshot of `stream`, if there is one.
pub(crate) fn load(
    storage: &dyn Storage,
    dir: &Path,
    stream: &StreamId,
) -> Result<Option<Snapshot>, SnapshotError> {
    let path = file_path(dir, stream);
    let body = match small_file::read(storage, &path, &MAGIC, SNAPSHOT_FILE_BYTES_MAX) {
        Ok(Some(body)) => body,
        Ok(None) => return Ok(None),
        Err(ReadError::Io(error)) => return Err(storage_error(error)),
        Err(ReadError::Corrupt(reason)) => return Err(corrupt(&path, reason)),
    };
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], SnapshotError> {
        let slice = body
            .get(at..at + n)
            .ok_or_else(|| corrupt(&path, "too short"))?;
        at += n;
        Ok(slice)
    };
    let name_len = u16::from_le_bytes(take(2)?.try_into().unwrap_or_default()) as usize;
    let name = take(name_len)?;
    if name != stream.as_str().as_bytes() {
        // Two streams whose names hash alike: not this stream's snapshot.
        return Ok(None);
    }
    let revision = u64::from_le_bytes(take(8)?.try_into().unwrap_or_default());
    let state_version = u32::from_le_bytes(take(4)?.try_into().unwrap_or_default());
    let taken_at = i64::from_le_bytes(take(8)?.try_into().unwrap_or_default());
    let state_len = u32::from_le_bytes(take(4)?.try_into().unwrap_or_default()) as usize;
    let state = Bytes::copy_from_slice(take(state_len)?);
    Ok(Some(Snapshot {
        revision: Revision(revision),
        state_version,
        state,
        taken_at: Timestamp::from_unix_micros(taken_at),
    }))
}

/// Removes the snapshot of `stream`, if there is one.
pub(crate) fn remove(storage: &dyn Storage, dir: &Path, stream: &StreamId) -> std::io::Result<()> {
    let path = file_path(dir, stream);
    match storage.remove_file(&path) {
        Ok(()) => storage.sync_dir(&snapshots_dir(dir)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}
