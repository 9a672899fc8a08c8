//! Snapshot files: one per stream in `DIR/snapshots/`, replaced atomically (write a temporary
//! file, `fdatasync`, rename, sync the directory), checked by a CRC32C on load.
//!
//! Layout: magic `FLSNAP\0\x01` (8) | CRC32C of the rest (4) | stream id (u16 len + bytes) |
//! revision u64 | state version u32 | taken at i64 µs | state (u32 len + bytes).

use std::path::{Path, PathBuf};

use factline_core::{
    Bytes, Revision, Snapshot, SnapshotError, StorageError, StreamId, Timestamp, Uuid,
};

use crate::storage::{Storage, read_exact_at, write_all_at};

const MAGIC: [u8; 8] = *b"FLSNAP\0\x01";
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
    storage.create_dir_all(&folder).map_err(storage_error)?;
    let mut body = Vec::with_capacity(snapshot.state.len() + 300);
    body.extend_from_slice(&(stream.as_str().len() as u16).to_le_bytes());
    body.extend_from_slice(stream.as_str().as_bytes());
    body.extend_from_slice(&snapshot.revision.0.to_le_bytes());
    body.extend_from_slice(&snapshot.state_version.to_le_bytes());
    body.extend_from_slice(&snapshot.taken_at.as_unix_micros().to_le_bytes());
    body.extend_from_slice(&(snapshot.state.len() as u32).to_le_bytes());
    body.extend_from_slice(&snapshot.state);
    let mut bytes = Vec::with_capacity(body.len() + 12);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    let path = file_path(dir, stream);
    let temporary = path.with_extension("tmp");
    let file = storage.open(&temporary, true).map_err(storage_error)?;
    file.set_len(0).map_err(storage_error)?;
    write_all_at(&*file, &bytes, 0).map_err(storage_error)?;
    file.sync_data().map_err(storage_error)?;
    storage.rename(&temporary, &path).map_err(storage_error)?;
    storage.sync_dir(&folder).map_err(storage_error)?;
    Ok(())
}

/// Reads the snapshot of `stream`, if there is one.
pub(crate) fn load(
    storage: &dyn Storage,
    dir: &Path,
    stream: &StreamId,
) -> Result<Option<Snapshot>, SnapshotError> {
    let path = file_path(dir, stream);
    let file = match storage.open(&path, false) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(storage_error(error)),
    };
    let len = file.size_bytes().map_err(storage_error)? as usize;
    let mut bytes = vec![0u8; len];
    read_exact_at(&*file, &mut bytes, 0).map_err(storage_error)?;
    if len < 12 || bytes[..8] != MAGIC {
        return Err(corrupt(&path, "bad magic"));
    }
    let stored_crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let body = &bytes[12..];
    if crc32c::crc32c(body) != stored_crc {
        return Err(corrupt(&path, "checksum mismatch"));
    }
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
