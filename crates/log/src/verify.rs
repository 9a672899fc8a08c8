//! `verify`: checks every record of a data directory without changing it.

use std::{path::Path, sync::Arc};

use crate::{
    index::{EVENT_REVISION_MAX, INDEX_DIR},
    recovery::{OpenError, Repair, ScanMode, ScanOptions, scan},
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
    /// Index table entries read and checked (checksums and order).
    pub index_entries: u64,
    /// Events whose index entries (by stream and by position) were checked against the log.
    pub index_events_checked: u64,
    /// What opening the log would repair (a torn tail from an interrupted write is normal
    /// after a crash and loses nothing acknowledged; a rebuilt index loses nothing either).
    pub pending_repairs: Vec<Repair>,
}

/// Checks every record, header, position and revision of the log in `dir` on disk, and the
/// index against it. Corruption is an `Err(OpenError::Corrupt { file, offset, .. })`.
pub fn verify(dir: &Path) -> Result<VerifyReport, OpenError> {
    verify_with(Arc::new(DiskStorage), dir)
}

/// [`verify`] on any storage.
pub fn verify_with(storage: Arc<dyn Storage>, dir: &Path) -> Result<VerifyReport, OpenError> {
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
    let recovered = scan(
        &storage,
        dir,
        ScanOptions {
            memtable_entries_max: usize::MAX,
            cache_entries_max: 4096,
            verify_covered: true,
        },
        ScanMode::ReadOnly,
    )?;
    // Every table block, and the number of event entries against the positions covered.
    let mut index_entries = 0u64;
    let mut event_entries = 0u64;
    for table in &recovered.index_files.tables {
        let mut in_table = 0u64;
        for entry in table.iter() {
            let entry = entry?;
            in_table += 1;
            if entry.revision <= EVENT_REVISION_MAX {
                event_entries += 1;
            }
        }
        if in_table != table.entry_count {
            return Err(OpenError::Corrupt {
                file: table.path().to_path_buf(),
                offset: 0,
                reason: format!(
                    "the trailer says {} entries, the blocks hold {in_table}",
                    table.entry_count
                ),
            });
        }
        index_entries += in_table;
    }
    if event_entries != recovered.index_files.positions_count {
        let file = recovered
            .index_files
            .tables
            .last()
            .map_or_else(|| dir.join(INDEX_DIR), |t| t.path().to_path_buf());
        return Err(OpenError::Corrupt {
            file,
            offset: 0,
            reason: format!(
                "the index tables hold {event_entries} event entries, the checkpoint covers {} \
                 events",
                recovered.index_files.positions_count
            ),
        });
    }
    drop(lock);
    Ok(VerifyReport {
        segments: recovered.files.into_segments().len(),
        records: recovered.records,
        events: recovered.next_position,
        index_entries,
        index_events_checked: recovered.index_checked,
        pending_repairs: recovered.repairs,
    })
}
