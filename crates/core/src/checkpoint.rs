//! Checkpoints: where a named projection or subscriber has got to in `$all` — the position of
//! the last event it processed — so that it resumes there after a restart.
//!
//! [`CheckpointStore`] is the contract; [`InMemoryCheckpointStore`] the reference (and the
//! store for read models that live in memory and are rebuilt at start anyway). Backends with
//! transactions also save a checkpoint in the transaction that updates a read model (e.g.
//! `factline_postgres::PostgresCheckpointStore::save_in`), which makes the pair exactly-once.
//! `testkit::checkpoint_store_conformance` checks an implementation.

use std::{collections::HashMap, sync::Mutex};

use async_trait::async_trait;

use crate::{Position, StorageError};

/// Longest checkpoint name, in bytes.
pub const CHECKPOINT_NAME_BYTES_MAX: usize = 255;

/// Why a checkpoint could not be loaded, saved or deleted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The name is empty, too long or holds a control character.
    #[error("checkpoint name {name:?} must have 1..={max} bytes and no control characters")]
    InvalidName {
        /// The name given.
        name: String,
        /// The length limit in bytes.
        max: usize,
    },
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Checks a checkpoint name: 1..=[`CHECKPOINT_NAME_BYTES_MAX`] bytes, no control characters.
pub fn check_checkpoint_name(name: &str) -> Result<(), CheckpointError> {
    if name.is_empty()
        || name.len() > CHECKPOINT_NAME_BYTES_MAX
        || name.chars().any(char::is_control)
    {
        return Err(CheckpointError::InvalidName {
            name: name.to_owned(),
            max: CHECKPOINT_NAME_BYTES_MAX,
        });
    }
    Ok(())
}

/// Named positions in `$all`, durable as the backend is.
///
/// A saved position is the last event processed: resume with
/// `SubscribeFrom::After(position)`. Saving overwrites (a rebuild may move a checkpoint back).
/// Every operation checks the name first ([`check_checkpoint_name`]).
#[async_trait]
pub trait CheckpointStore: Send + Sync {
    /// The saved position of `name`, if any.
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, CheckpointError>;

    /// Saves `position` as the checkpoint of `name`; once this returns, a later load (by this
    /// or, for a durable backend, another process) returns it.
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), CheckpointError>;

    /// Forgets the checkpoint of `name` (a rebuild then starts from the beginning). Deleting
    /// a name never saved is not an error.
    async fn delete_checkpoint(&self, name: &str) -> Result<(), CheckpointError>;

    /// The saved checkpoints in name order (by bytes), at most `count_max` of them (what a
    /// status page shows: projections, process managers, subscribers and how far each has
    /// come). The default answers that this store cannot list.
    async fn list_checkpoints(
        &self,
        count_max: usize,
    ) -> Result<Vec<(String, Position)>, CheckpointError> {
        let _ = count_max;
        Err(CheckpointError::Storage(StorageError::backend(
            std::io::Error::other("this checkpoint store cannot list its checkpoints"),
        )))
    }
}

/// Checkpoints in memory (lost with the process).
#[derive(Debug, Default)]
pub struct InMemoryCheckpointStore {
    saved: Mutex<HashMap<String, Position>>,
}

impl InMemoryCheckpointStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn saved(&self) -> std::sync::MutexGuard<'_, HashMap<String, Position>> {
        // A panic while holding the lock cannot leave the map half-updated (every change is
        // one insert or remove), so a poisoned lock is still consistent.
        self.saved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl CheckpointStore for InMemoryCheckpointStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, CheckpointError> {
        check_checkpoint_name(name)?;
        Ok(self.saved().get(name).copied())
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), CheckpointError> {
        check_checkpoint_name(name)?;
        self.saved().insert(name.to_owned(), position);
        Ok(())
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<(), CheckpointError> {
        check_checkpoint_name(name)?;
        self.saved().remove(name);
        Ok(())
    }

    async fn list_checkpoints(
        &self,
        count_max: usize,
    ) -> Result<Vec<(String, Position)>, CheckpointError> {
        let mut saved: Vec<(String, Position)> = self
            .saved()
            .iter()
            .map(|(name, position)| (name.clone(), *position))
            .collect();
        saved.sort();
        saved.truncate(count_max);
        Ok(saved)
    }
}

#[async_trait]
impl<T: CheckpointStore + ?Sized> CheckpointStore for std::sync::Arc<T> {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, CheckpointError> {
        (**self).load_checkpoint(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), CheckpointError> {
        (**self).save_checkpoint(name, position).await
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<(), CheckpointError> {
        (**self).delete_checkpoint(name).await
    }

    async fn list_checkpoints(
        &self,
        count_max: usize,
    ) -> Result<Vec<(String, Position)>, CheckpointError> {
        (**self).list_checkpoints(count_max).await
    }
}
