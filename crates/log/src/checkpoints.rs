//! Checkpoint files: one per name in `DIR/checkpoints/`, replaced atomically (write a temporary
//! file, `fdatasync`, rename, sync the directory), checked by a CRC32C on load — the same
//! discipline as snapshot files, through the same [`Storage`] (so fault-injection tests reach
//! them).
//!
//! Layout: magic `FLCKPT\0\x01` (8) | CRC32C of the rest (4) | name (u16 len + bytes) |
//! position u64 (little-endian).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use factline_core::{
    CheckpointError, CheckpointStore, Position, StorageError, Uuid, check_checkpoint_name,
};

use crate::{
    small_file::{self, ReadError},
    storage::Storage,
};

const MAGIC: [u8; 8] = *b"FLCKPT\0\x01";
/// Namespace of the UUIDv5 that names a checkpoint's file.
const FILE_NAMESPACE: Uuid = Uuid::from_u128(0x3b9e_71c2_58a4_4f0d_8e16_c2a9_7d54_0b3f);

/// The embedded log's [`CheckpointStore`], from [`crate::LogStore::checkpoints`]: one small
/// file per name in the data directory, durable when a save returns.
#[derive(Debug, Clone)]
pub struct LogCheckpointStore {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    /// Serializes the file operations of this process (a save is write-then-rename).
    lock: Arc<Mutex<()>>,
}

fn storage_error(error: std::io::Error) -> CheckpointError {
    CheckpointError::Storage(StorageError::backend(error))
}

fn corrupt(path: &Path, reason: &str) -> CheckpointError {
    CheckpointError::Storage(StorageError::Backend(
        format!("checkpoint file {} is corrupt: {reason}", path.display()).into(),
    ))
}

impl LogCheckpointStore {
    pub(crate) fn new(storage: Arc<dyn Storage>, data_dir: &Path) -> Self {
        Self {
            storage,
            dir: data_dir.join("checkpoints"),
            lock: Arc::new(Mutex::new(())),
        }
    }

    fn file_path(&self, name: &str) -> PathBuf {
        let id = Uuid::new_v5(&FILE_NAMESPACE, name.as_bytes());
        self.dir.join(format!("{}.ckpt", id.simple()))
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn load(&self, name: &str) -> Result<Option<Position>, CheckpointError> {
        check_checkpoint_name(name)?;
        let _guard = self.guard();
        match self.read_file(&self.file_path(name))? {
            Some((stored_name, position)) if stored_name == name.as_bytes() => Ok(Some(position)),
            // Absent, or two names whose hashes collide: not this name's checkpoint.
            _ => Ok(None),
        }
    }

    /// The name and position a checkpoint file holds (`None`: no such file).
    fn read_file(&self, path: &Path) -> Result<Option<(Vec<u8>, Position)>, CheckpointError> {
        // Magic, checksum, name length, the longest name, position.
        let bytes_max = (8 + 4 + 2 + factline_core::CHECKPOINT_NAME_BYTES_MAX + 8) as u64;
        let body = match small_file::read(&*self.storage, path, &MAGIC, bytes_max) {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(None),
            Err(ReadError::Io(error)) => return Err(storage_error(error)),
            Err(ReadError::Corrupt(reason)) => return Err(corrupt(path, reason)),
        };
        let name_len = body
            .get(..2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
            .ok_or_else(|| corrupt(path, "too short"))?;
        let stored_name = body
            .get(2..2 + name_len)
            .ok_or_else(|| corrupt(path, "too short"))?;
        let position: [u8; 8] = body
            .get(2 + name_len..2 + name_len + 8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| corrupt(path, "too short"))?;
        Ok(Some((
            stored_name.to_vec(),
            Position(u64::from_le_bytes(position)),
        )))
    }

    fn list(&self, count_max: usize) -> Result<Vec<(String, Position)>, CheckpointError> {
        let _guard = self.guard();
        let files = match self.storage.list_dir(&self.dir) {
            Ok(files) => files,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(storage_error(error)),
        };
        let mut saved = Vec::new();
        for file in files.iter().filter(|file| file.ends_with(".ckpt")) {
            let path = self.dir.join(file);
            let read = self.read_file(&path).and_then(|read| {
                read.map(|(name, position)| {
                    String::from_utf8(name)
                        .map(|name| (name, position))
                        .map_err(|_| corrupt(&path, "the name is not UTF-8"))
                })
                .transpose()
            });
            match read {
                Ok(Some(checkpoint)) => saved.push(checkpoint),
                Ok(None) => {}
                // One damaged file does not hide the others (its own load reports it).
                Err(error) => tracing::warn!(%error, "a checkpoint file is left out of the list"),
            }
        }
        saved.sort();
        saved.truncate(count_max);
        Ok(saved)
    }

    fn save(&self, name: &str, position: Position) -> Result<(), CheckpointError> {
        check_checkpoint_name(name)?;
        let _guard = self.guard();
        let mut body = Vec::with_capacity(2 + name.len() + 8);
        // check_checkpoint_name bounds the name to 255 bytes.
        body.extend_from_slice(&(name.len() as u16).to_le_bytes());
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&position.value().to_le_bytes());
        small_file::replace(
            &*self.storage,
            &self.dir,
            &self.file_path(name),
            &MAGIC,
            &body,
        )
        .map_err(storage_error)
    }

    fn delete(&self, name: &str) -> Result<(), CheckpointError> {
        check_checkpoint_name(name)?;
        let _guard = self.guard();
        match self.storage.remove_file(&self.file_path(name)) {
            Ok(()) => self.storage.sync_dir(&self.dir).map_err(storage_error),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(storage_error(error)),
        }
    }
}

#[async_trait]
impl CheckpointStore for LogCheckpointStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, CheckpointError> {
        self.load(name)
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), CheckpointError> {
        self.save(name, position)
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<(), CheckpointError> {
        self.delete(name)
    }

    async fn list_checkpoints(
        &self,
        count_max: usize,
    ) -> Result<Vec<(String, Position)>, CheckpointError> {
        self.list(count_max)
    }
}
