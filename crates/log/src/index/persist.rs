//! The index on disk: tables, the positions file and the checkpoint that names them.
//!
//! ```text
//! index/CHECKPOINT    which tables form the index and the log offset they cover
//! index/positions     the log offset of every covered position, 8 bytes each
//! index/NNNNNNNNNN.ixt index tables (see table.rs)
//! ```
//!
//! Every file is written and synced before the checkpoint that names it; the checkpoint is
//! replaced atomically (write a temporary file, sync, rename, sync the directory). A crash at
//! any point leaves the previous checkpoint, whose files are all intact; files it does not name
//! are leftovers and are removed on open. The index is derived data: if the checkpoint or a
//! file it names is unusable, open rebuilds the index from the log.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use factline_core::Timestamp;

use super::{
    LogOffset, MemTable, PositionsFile,
    table::{IndexTable, TableError, io_error, le_u32, le_u64, merge, parse_table_name},
};
use crate::storage::{Storage, StorageFile, read_exact_at, write_all_at};

/// The index folder inside a data directory.
pub(crate) const INDEX_DIR: &str = "index";
const CHECKPOINT_NAME: &str = "CHECKPOINT";
const CHECKPOINT_TMP_NAME: &str = "CHECKPOINT.tmp";
const POSITIONS_NAME: &str = "positions";
const CHECKPOINT_MAGIC: &[u8; 8] = b"FLCKPT\0\0";
const CHECKPOINT_VERSION: u32 = 1;
/// Tables of one level merged into one table of the next level.
pub(crate) const MERGE_FAN_IN: usize = 4;
/// Tables a checkpoint may name (far more than the merge policy ever keeps).
const TABLES_MAX: usize = 4096;

/// What a checkpoint records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// The tables cover every record before this log offset (a transaction boundary).
    pub(crate) covered_end: LogOffset,
    /// The position of the first event after `covered_end`.
    pub(crate) next_position: u64,
    /// The newest recorded time before `covered_end`.
    pub(crate) last_recorded_at: Option<Timestamp>,
    /// The id the next table gets.
    pub(crate) next_table_id: u64,
    /// The tables, oldest records first: (id, level).
    pub(crate) tables: Vec<(u64, u8)>,
}

impl Checkpoint {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.tables.len() * 16);
        out.extend_from_slice(CHECKPOINT_MAGIC);
        out.extend_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tables.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.covered_end.to_u64().to_le_bytes());
        out.extend_from_slice(&self.next_position.to_le_bytes());
        let at = self
            .last_recorded_at
            .map_or(i64::MIN, Timestamp::as_unix_micros);
        out.extend_from_slice(&at.to_le_bytes());
        out.extend_from_slice(&self.next_table_id.to_le_bytes());
        for (id, level) in &self.tables {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&u64::from(*level).to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 52 || &bytes[..8] != CHECKPOINT_MAGIC {
            return Err("not a checkpoint file".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != le_u32(crc, 0) {
            return Err("checksum mismatch".into());
        }
        let u32_at = |i: usize| le_u32(body, i);
        let u64_at = |i: usize| le_u64(body, i);
        if u32_at(8) != CHECKPOINT_VERSION {
            return Err(format!(
                "checkpoint version {} is not {CHECKPOINT_VERSION}",
                u32_at(8)
            ));
        }
        let count = u32_at(12) as usize;
        if count > TABLES_MAX || body.len() != 48 + count * 16 {
            return Err("table count does not match the file length".into());
        }
        let at = u64_at(32) as i64;
        let tables = (0..count)
            .map(|i| {
                let level = u64_at(48 + i * 16 + 8);
                u8::try_from(level)
                    .map(|level| (u64_at(48 + i * 16), level))
                    .map_err(|_| format!("table level {level} is impossible"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            covered_end: LogOffset::from_u64(u64_at(16)),
            next_position: u64_at(24),
            last_recorded_at: (at != i64::MIN).then(|| Timestamp::from_unix_micros(at)),
            next_table_id: u64_at(40),
            tables,
        })
    }
}

/// The index files of a data directory, owned by whoever writes them (recovery, then the
/// indexer's threads, under a lock).
#[derive(Debug)]
pub(crate) struct IndexFiles {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    /// The tables, oldest records first.
    pub(crate) tables: Vec<Arc<IndexTable>>,
    positions: Option<Arc<dyn StorageFile>>,
    /// Positions the positions file covers.
    pub(crate) positions_count: u64,
    next_table_id: u64,
    /// What the tables cover: (log offset, next position, last recorded time).
    pub(crate) covered: Option<(LogOffset, Option<Timestamp>)>,
    /// Tables replaced by a merge, removed once no reader holds them.
    retired: Vec<Arc<IndexTable>>,
}

/// What opening the index files found.
#[derive(Debug)]
pub(crate) enum Loaded {
    /// A usable checkpoint.
    Checkpoint(Checkpoint),
    /// No checkpoint: the index is built from the whole log.
    Empty,
    /// The checkpoint or a file it names was unusable: the index is rebuilt from the log.
    Discarded(String),
}

impl IndexFiles {
    /// Opens the index of the data directory `data_dir`. With `writable`, creates what is
    /// missing and removes leftovers; otherwise changes nothing.
    pub(crate) fn open(
        storage: Arc<dyn Storage>,
        data_dir: &Path,
        writable: bool,
    ) -> Result<(Self, Loaded), TableError> {
        let dir = data_dir.join(INDEX_DIR);
        if writable {
            storage
                .create_dir_all(&dir)
                .map_err(io_error("creating the folder of", &dir))?;
        }
        let mut files = Self {
            storage: Arc::clone(&storage),
            dir: dir.clone(),
            tables: Vec::new(),
            positions: None,
            positions_count: 0,
            next_table_id: 0,
            covered: None,
            retired: Vec::new(),
        };
        let loaded = match files.load_checkpoint() {
            Ok(Some(checkpoint)) => Loaded::Checkpoint(checkpoint),
            Ok(None) => Loaded::Empty,
            Err(reason) => {
                tracing::warn!(dir = %dir.display(), %reason, "the index is unusable; rebuilding it from the log");
                files.tables.clear();
                files.positions = None;
                files.positions_count = 0;
                files.covered = None;
                files.next_table_id = 0;
                Loaded::Discarded(reason)
            }
        };
        if writable {
            let keep: Vec<String> = files
                .tables
                .iter()
                .filter_map(|t| t.path().file_name()?.to_str().map(str::to_owned))
                .collect();
            let names = storage.list_dir(&dir).map_err(io_error("listing", &dir))?;
            for name in names {
                let leftover = name == CHECKPOINT_TMP_NAME
                    || (parse_table_name(&name).is_some() && !keep.contains(&name))
                    || (!matches!(loaded, Loaded::Checkpoint(_))
                        && (name == CHECKPOINT_NAME || name == POSITIONS_NAME));
                if leftover {
                    let path = dir.join(&name);
                    storage
                        .remove_file(&path)
                        .map_err(io_error("removing", &path))?;
                }
            }
            if files.positions.is_none() {
                let path = dir.join(POSITIONS_NAME);
                files.positions = Some(
                    storage
                        .open(&path, true)
                        .map_err(io_error("creating", &path))?,
                );
            }
            storage.sync_dir(&dir).map_err(io_error("syncing", &dir))?;
        }
        Ok((files, loaded))
    }

    /// Reads the checkpoint and opens what it names; `Err` says why they are unusable.
    fn load_checkpoint(&mut self) -> Result<Option<Checkpoint>, String> {
        let path = self.dir.join(CHECKPOINT_NAME);
        let names = match self.storage.list_dir(&self.dir) {
            Ok(names) => names,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(format!("listing {}: {error}", self.dir.display())),
        };
        if !names.iter().any(|n| n == CHECKPOINT_NAME) {
            return Ok(None);
        }
        let bytes = read_whole(&*self.storage, &path)
            .map_err(|error| format!("reading {}: {error}", path.display()))?;
        let checkpoint = Checkpoint::decode(&bytes)
            .map_err(|reason| format!("checkpoint {}: {reason}", path.display()))?;
        for (id, level) in &checkpoint.tables {
            let table =
                IndexTable::open(&*self.storage, &self.dir, *id).map_err(|e| e.to_string())?;
            if table.level != *level || *id >= checkpoint.next_table_id {
                return Err(format!(
                    "{} does not match the checkpoint",
                    table.path().display()
                ));
            }
            self.tables.push(Arc::new(table));
        }
        let positions_path = self.dir.join(POSITIONS_NAME);
        let positions = self
            .storage
            .open(&positions_path, false)
            .map_err(|error| format!("opening {}: {error}", positions_path.display()))?;
        let len = positions
            .size_bytes()
            .map_err(|error| format!("reading {}: {error}", positions_path.display()))?;
        if len < checkpoint.next_position * 8 {
            return Err(format!(
                "{} holds {} positions, the checkpoint covers {}",
                positions_path.display(),
                len / 8,
                checkpoint.next_position
            ));
        }
        self.positions = Some(positions);
        self.positions_count = checkpoint.next_position;
        self.next_table_id = checkpoint.next_table_id;
        self.covered = Some((checkpoint.covered_end, checkpoint.last_recorded_at));
        Ok(Some(checkpoint))
    }

    /// Forgets the checkpoint and every table so the index is rebuilt from the log; with
    /// `writable`, removes their files too.
    pub(crate) fn discard(&mut self, writable: bool) -> Result<(), TableError> {
        let tables = std::mem::take(&mut self.tables);
        self.positions_count = 0;
        self.covered = None;
        self.next_table_id = 0;
        if !writable {
            return Ok(());
        }
        let checkpoint = self.dir.join(CHECKPOINT_NAME);
        match self.storage.remove_file(&checkpoint) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                return Err(io_error("removing", &checkpoint)(error));
            }
            _ => {}
        }
        self.storage
            .sync_dir(&self.dir)
            .map_err(io_error("syncing", &self.dir))?;
        for table in tables {
            self.storage
                .remove_file(table.path())
                .map_err(io_error("removing", table.path()))?;
        }
        if let Some(positions) = &self.positions {
            positions
                .set_len(0)
                .map_err(io_error("truncating", &self.dir.join(POSITIONS_NAME)))?;
        }
        Ok(())
    }

    /// The positions file as readers see it.
    pub(crate) fn positions_snapshot(&self) -> PositionsFile {
        PositionsFile {
            file: self.positions.clone(),
            count: self.positions_count,
        }
    }

    /// Writes `mem` as a new table, appends its positions, and checkpoints: afterwards the
    /// index files cover the log up to `covered_end`.
    pub(crate) fn flush(
        &mut self,
        mem: &MemTable,
        covered_end: LogOffset,
        last_recorded_at: Option<Timestamp>,
    ) -> Result<(), TableError> {
        debug_assert_eq!(mem.base_position, self.positions_count);
        let path = self.dir.join(POSITIONS_NAME);
        let positions = self.positions.clone().ok_or_else(|| TableError::Io {
            action: "writing",
            path: path.clone(),
            source: io::Error::other("the index was opened read-only"),
        })?;
        let entries = mem.sorted_entries();
        if !entries.is_empty() {
            let id = self.next_table_id;
            self.next_table_id += 1;
            let table = IndexTable::write(
                &*self.storage,
                &self.dir,
                id,
                0,
                entries.into_iter().map(Ok),
            )?;
            self.tables.push(Arc::new(table));
        }
        let mut bytes = Vec::with_capacity(mem.positions.len() * 8);
        for offset in &mem.positions {
            bytes.extend_from_slice(&offset.to_u64().to_le_bytes());
        }
        let io = |action: &'static str| io_error(action, &path);
        write_all_at(&*positions, &bytes, self.positions_count * 8).map_err(io("writing"))?;
        positions.sync_data().map_err(io("syncing"))?;
        self.positions_count = mem.next_position();
        self.covered = Some((covered_end, last_recorded_at));
        self.write_checkpoint()
    }

    /// Merges `MERGE_FAN_IN` tables of one level, if there are that many; returns whether it
    /// merged. (Recovery's path; the indexer splits it so the merge I/O runs without a lock.)
    pub(crate) fn merge_step(&mut self) -> Result<bool, TableError> {
        let Some(plan) = self.plan_merge() else {
            return Ok(false);
        };
        let merged = plan.write()?;
        self.finish_merge(plan, merged)?;
        Ok(true)
    }

    /// Picks the oldest run of `MERGE_FAN_IN` tables of one level and reserves an id for the
    /// merged table. Flushes may append tables while the plan is written: they only append.
    pub(crate) fn plan_merge(&mut self) -> Option<MergePlan> {
        // Levels never increase towards newer tables, so equal levels are adjacent.
        let start = (0..self.tables.len().saturating_sub(MERGE_FAN_IN - 1)).find(|&i| {
            let level = self.tables[i].level;
            self.tables[i..i + MERGE_FAN_IN]
                .iter()
                .all(|t| t.level == level)
        })?;
        let inputs = self.tables[start..start + MERGE_FAN_IN].to_vec();
        let id = self.next_table_id;
        self.next_table_id += 1;
        Some(MergePlan {
            storage: Arc::clone(&self.storage),
            dir: self.dir.clone(),
            id,
            level: inputs[0].level.saturating_add(1),
            inputs,
        })
    }

    /// Replaces the plan's inputs with the merged table and checkpoints.
    pub(crate) fn finish_merge(
        &mut self,
        plan: MergePlan,
        merged: IndexTable,
    ) -> Result<(), TableError> {
        let start = self
            .tables
            .iter()
            .position(|t| Arc::ptr_eq(t, &plan.inputs[0]))
            .filter(|&start| {
                self.tables.len() >= start + MERGE_FAN_IN
                    && self.tables[start..start + MERGE_FAN_IN]
                        .iter()
                        .zip(&plan.inputs)
                        .all(|(a, b)| Arc::ptr_eq(a, b))
            });
        let Some(start) = start else {
            // Only the merger removes tables, so this is a bug; keep the index as it is.
            debug_assert!(false, "merge inputs changed under the merger");
            return Ok(());
        };
        let replaced: Vec<Arc<IndexTable>> = self
            .tables
            .splice(start..start + MERGE_FAN_IN, [Arc::new(merged)])
            .collect();
        self.write_checkpoint()?;
        self.retired.extend(replaced);
        self.remove_retired();
        Ok(())
    }

    /// Removes retired tables no reader holds any more.
    pub(crate) fn remove_retired(&mut self) {
        let storage = Arc::clone(&self.storage);
        self.retired.retain(|table| {
            if Arc::strong_count(table) > 1 {
                return true;
            }
            if let Err(error) = storage.remove_file(table.path()) {
                tracing::warn!(file = %table.path().display(), %error, "removing a merged index table failed; open removes it");
            }
            false
        });
    }

    fn write_checkpoint(&self) -> Result<(), TableError> {
        let Some((covered_end, last_recorded_at)) = self.covered else {
            return Ok(());
        };
        let checkpoint = Checkpoint {
            covered_end,
            next_position: self.positions_count,
            last_recorded_at,
            next_table_id: self.next_table_id,
            tables: self.tables.iter().map(|t| (t.id, t.level)).collect(),
        };
        let tmp = self.dir.join(CHECKPOINT_TMP_NAME);
        let path = self.dir.join(CHECKPOINT_NAME);
        let file = self
            .storage
            .open(&tmp, true)
            .map_err(io_error("creating", &tmp))?;
        file.set_len(0).map_err(io_error("truncating", &tmp))?;
        write_all_at(&*file, &checkpoint.encode(), 0).map_err(io_error("writing", &tmp))?;
        file.sync_data().map_err(io_error("syncing", &tmp))?;
        self.storage
            .rename(&tmp, &path)
            .map_err(io_error("renaming", &tmp))?;
        self.storage
            .sync_dir(&self.dir)
            .map_err(io_error("syncing", &self.dir))?;
        Ok(())
    }
}

/// A merge chosen by [`IndexFiles::plan_merge`], written without holding the index files.
#[derive(Debug)]
pub(crate) struct MergePlan {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    id: u64,
    level: u8,
    inputs: Vec<Arc<IndexTable>>,
}

impl MergePlan {
    /// Writes the merged table.
    pub(crate) fn write(&self) -> Result<IndexTable, TableError> {
        IndexTable::write(
            &*self.storage,
            &self.dir,
            self.id,
            self.level,
            merge(self.inputs.iter().map(IndexTable::iter).collect()),
        )
    }
}

fn read_whole(storage: &dyn Storage, path: &Path) -> io::Result<Vec<u8>> {
    let file = storage.open(path, false)?;
    let len = file.size_bytes()?;
    if len > 1 << 20 {
        return Err(io::Error::other("larger than a checkpoint can be"));
    }
    let mut bytes = vec![0u8; len as usize];
    read_exact_at(&*file, &mut bytes, 0)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn checkpoints_round_trip_and_damage_is_detected() {
        let checkpoint = Checkpoint {
            covered_end: LogOffset::new(3, 4096),
            next_position: 1234,
            last_recorded_at: Some(Timestamp::from_unix_micros(99)),
            next_table_id: 9,
            tables: vec![(1, 2), (7, 0), (8, 0)],
        };
        let bytes = checkpoint.encode();
        assert_eq!(Checkpoint::decode(&bytes).unwrap(), checkpoint);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(
                Checkpoint::decode(&bad).is_err(),
                "flip at {i} not detected"
            );
        }
        assert!(Checkpoint::decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
