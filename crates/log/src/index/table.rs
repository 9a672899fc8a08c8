//! Index tables: immutable files of `(stream hash, revision) → log offset` entries, sorted, in
//! CRC-checked 4 KiB blocks, with the first key of every block (the fences) at the end.
//!
//! ```text
//! [block 0][block 1]…[block n-1][fence 0]…[fence n-1][trailer]
//! block   = crc32c(bytes 4..4096) u32 | count u16 | 0 u16 | count × entry | zeros
//! entry   = hash u64 | revision u64 | log offset u64            (little endian, 24 bytes)
//! fence   = hash u64 | revision u64                             (first key of the block)
//! trailer = "FLINDEX\0" | version u32 | level u8 | 0 ×3 | entries u64 | blocks u64
//!           | crc32c(fences) u32 | 0 ×24 | crc32c(trailer bytes 0..60) u32   (64 bytes)
//! ```
//!
//! Only the fences are held in memory (16 bytes per 170 entries); a lookup reads the blocks its
//! key range touches. Several streams may share a hash: callers check the stream id in the
//! record an entry points at.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::LogOffset;
use crate::storage::{Storage, StorageFile, read_exact_at, write_all_at};

/// Bytes per block.
pub(crate) const BLOCK_BYTES: usize = 4096;
const BLOCK_HEADER_BYTES: usize = 8;
const ENTRY_BYTES: usize = 24;
/// Entries per block (170).
pub(crate) const ENTRIES_PER_BLOCK: usize = (BLOCK_BYTES - BLOCK_HEADER_BYTES) / ENTRY_BYTES;
const FENCE_BYTES: usize = 16;
const TRAILER_BYTES: usize = 64;
const MAGIC: &[u8; 8] = b"FLINDEX\0";
/// The table format version.
pub(crate) const TABLE_VERSION: u32 = 1;
/// Blocks written with one `pwrite`.
const WRITE_BLOCKS: usize = 64;

/// One index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Entry {
    /// `stream_hash` of the stream.
    pub(crate) hash: u64,
    /// The event's revision, or one of the slots `METADATA_SLOT` / `TOMBSTONE_SLOT`.
    pub(crate) revision: u64,
    /// Where the record starts.
    pub(crate) offset: LogOffset,
}

impl Entry {
    fn key(&self) -> (u64, u64) {
        (self.hash, self.revision)
    }

    fn encode(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.hash.to_le_bytes());
        out[8..16].copy_from_slice(&self.revision.to_le_bytes());
        out[16..24].copy_from_slice(&self.offset.to_u64().to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Self {
        Self {
            hash: le_u64(bytes, 0),
            revision: le_u64(bytes, 8),
            offset: LogOffset::from_u64(le_u64(bytes, 16)),
        }
    }
}

/// Why an index table cannot be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum TableError {
    /// A file operation failed.
    #[error("{action} index file {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is damaged.
    #[error("index file {path} is damaged at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

/// A `map_err` adapter: an I/O error while doing `action` to the index file `path`.
pub(crate) fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> TableError {
    let path = path.to_path_buf();
    move |source| TableError::Io {
        action,
        path,
        source,
    }
}

/// The little-endian `u64` at `bytes[at..at + 8]`.
pub(crate) fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// The little-endian `u32` at `bytes[at..at + 4]`.
pub(crate) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// An open index table.
#[derive(Debug)]
pub(crate) struct IndexTable {
    /// Its number (the file name).
    pub(crate) id: u64,
    /// Its merge level: 0 for a flushed memtable, n + 1 for a merge of level-n tables.
    pub(crate) level: u8,
    /// Entries in it.
    pub(crate) entry_count: u64,
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    fences: Vec<(u64, u64)>,
}

/// The file name of table `id`.
pub(crate) fn table_name(id: u64) -> String {
    format!("{id:010}.ixt")
}

/// The id in a table file name.
pub(crate) fn parse_table_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".ixt")?;
    (digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

impl IndexTable {
    /// Writes `entries` (sorted ascending) as table `id` in `dir` and makes the file durable
    /// (its directory entry becomes durable with the next checkpoint).
    pub(crate) fn write(
        storage: &dyn Storage,
        dir: &Path,
        id: u64,
        level: u8,
        entries: impl Iterator<Item = Result<Entry, TableError>>,
    ) -> Result<Self, TableError> {
        let path = dir.join(table_name(id));
        let io = io_error;
        let file = storage.open(&path, true).map_err(io("creating", &path))?;
        file.set_len(0).map_err(io("truncating", &path))?;
        let mut fences = Vec::new();
        let mut buffer = Vec::with_capacity(WRITE_BLOCKS * BLOCK_BYTES);
        let mut written = 0u64;
        let mut entry_count = 0u64;
        let mut block = [0u8; BLOCK_BYTES];
        let mut in_block = 0usize;
        let mut previous: Option<Entry> = None;
        let flush_block = |block: &mut [u8; BLOCK_BYTES], in_block: usize, buffer: &mut Vec<u8>| {
            block[4..6].copy_from_slice(&(in_block as u16).to_le_bytes());
            let crc = crc32c::crc32c(&block[4..]);
            block[0..4].copy_from_slice(&crc.to_le_bytes());
            buffer.extend_from_slice(block);
            *block = [0u8; BLOCK_BYTES];
        };
        for entry in entries {
            let entry = entry?;
            debug_assert!(previous.is_none_or(|p| p < entry), "entries must be sorted");
            previous = Some(entry);
            if in_block == 0 {
                fences.push(entry.key());
            }
            let at = BLOCK_HEADER_BYTES + in_block * ENTRY_BYTES;
            entry.encode(&mut block[at..at + ENTRY_BYTES]);
            in_block += 1;
            entry_count += 1;
            if in_block == ENTRIES_PER_BLOCK {
                flush_block(&mut block, in_block, &mut buffer);
                in_block = 0;
                if buffer.len() >= WRITE_BLOCKS * BLOCK_BYTES {
                    write_all_at(&*file, &buffer, written).map_err(io("writing", &path))?;
                    written += buffer.len() as u64;
                    buffer.clear();
                }
            }
        }
        if in_block > 0 {
            flush_block(&mut block, in_block, &mut buffer);
        }
        let mut fence_bytes = Vec::with_capacity(fences.len() * FENCE_BYTES);
        for (hash, revision) in &fences {
            fence_bytes.extend_from_slice(&hash.to_le_bytes());
            fence_bytes.extend_from_slice(&revision.to_le_bytes());
        }
        let mut trailer = [0u8; TRAILER_BYTES];
        trailer[0..8].copy_from_slice(MAGIC);
        trailer[8..12].copy_from_slice(&TABLE_VERSION.to_le_bytes());
        trailer[12] = level;
        trailer[16..24].copy_from_slice(&entry_count.to_le_bytes());
        trailer[24..32].copy_from_slice(&(fences.len() as u64).to_le_bytes());
        trailer[32..36].copy_from_slice(&crc32c::crc32c(&fence_bytes).to_le_bytes());
        let crc = crc32c::crc32c(&trailer[..60]);
        trailer[60..64].copy_from_slice(&crc.to_le_bytes());
        buffer.extend_from_slice(&fence_bytes);
        buffer.extend_from_slice(&trailer);
        write_all_at(&*file, &buffer, written).map_err(io("writing", &path))?;
        file.sync_data().map_err(io("syncing", &path))?;
        Ok(Self {
            id,
            level,
            entry_count,
            path,
            file,
            fences,
        })
    }

    /// Opens table `id` in `dir`, checking its trailer and fences.
    pub(crate) fn open(storage: &dyn Storage, dir: &Path, id: u64) -> Result<Self, TableError> {
        let path = dir.join(table_name(id));
        let io = |action: &'static str| io_error(action, &path);
        let corrupt = |offset: u64, reason: &str| TableError::Corrupt {
            path: path.clone(),
            offset,
            reason: reason.to_owned(),
        };
        let file = storage.open(&path, false).map_err(io("opening"))?;
        let len = file.size_bytes().map_err(io("reading the length of"))?;
        if len < TRAILER_BYTES as u64 {
            return Err(corrupt(0, "shorter than its trailer"));
        }
        let trailer_at = len - TRAILER_BYTES as u64;
        let mut trailer = [0u8; TRAILER_BYTES];
        read_exact_at(&*file, &mut trailer, trailer_at).map_err(io("reading"))?;
        if &trailer[0..8] != MAGIC {
            return Err(corrupt(trailer_at, "no table trailer"));
        }
        let word32 = |i: usize| le_u32(&trailer, i);
        let word64 = |i: usize| le_u64(&trailer, i);
        if word32(60) != crc32c::crc32c(&trailer[..60]) {
            return Err(corrupt(trailer_at, "trailer checksum mismatch"));
        }
        if word32(8) != TABLE_VERSION {
            return Err(corrupt(
                trailer_at,
                &format!("table version {} is not {TABLE_VERSION}", word32(8)),
            ));
        }
        let level = trailer[12];
        let entry_count = word64(16);
        let block_count = word64(24);
        let expected_len = block_count
            .checked_mul((BLOCK_BYTES + FENCE_BYTES) as u64)
            .and_then(|n| n.checked_add(TRAILER_BYTES as u64));
        if expected_len != Some(len)
            || entry_count > block_count * ENTRIES_PER_BLOCK as u64
            || entry_count < block_count.saturating_sub(1) * ENTRIES_PER_BLOCK as u64
        {
            return Err(corrupt(
                trailer_at,
                "entry and block counts do not match the file length",
            ));
        }
        let fences_at = block_count * BLOCK_BYTES as u64;
        let mut fence_bytes = vec![0u8; block_count as usize * FENCE_BYTES];
        read_exact_at(&*file, &mut fence_bytes, fences_at).map_err(io("reading"))?;
        if crc32c::crc32c(&fence_bytes) != word32(32) {
            return Err(corrupt(fences_at, "fence checksum mismatch"));
        }
        let fences: Vec<(u64, u64)> = fence_bytes
            .chunks_exact(FENCE_BYTES)
            .map(|c| (le_u64(c, 0), le_u64(c, 8)))
            .collect();
        if fences.windows(2).any(|w| w[0] > w[1]) {
            return Err(corrupt(fences_at, "fences are not sorted"));
        }
        Ok(Self {
            id,
            level,
            entry_count,
            path,
            file,
            fences,
        })
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The number of blocks.
    pub(crate) fn block_count(&self) -> usize {
        self.fences.len()
    }

    /// Reads and checks block `i`.
    pub(crate) fn block(&self, i: usize) -> Result<Vec<Entry>, TableError> {
        let at = (i * BLOCK_BYTES) as u64;
        let mut bytes = [0u8; BLOCK_BYTES];
        read_exact_at(&*self.file, &mut bytes, at).map_err(|source| TableError::Io {
            action: "reading",
            path: self.path.clone(),
            source,
        })?;
        let corrupt = |reason: &str| TableError::Corrupt {
            path: self.path.clone(),
            offset: at,
            reason: reason.to_owned(),
        };
        let crc = le_u32(&bytes, 0);
        if crc != crc32c::crc32c(&bytes[4..]) {
            return Err(corrupt("block checksum mismatch"));
        }
        let count = u16::from_le_bytes([bytes[4], bytes[5]]) as usize;
        if count == 0 || count > ENTRIES_PER_BLOCK {
            return Err(corrupt("impossible entry count"));
        }
        let entries: Vec<Entry> = bytes
            [BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + count * ENTRY_BYTES]
            .chunks_exact(ENTRY_BYTES)
            .map(Entry::decode)
            .collect();
        if entries[0].key() != self.fences[i] || entries.windows(2).any(|w| w[0] >= w[1]) {
            return Err(corrupt(
                "entries are out of order or disagree with the fence",
            ));
        }
        Ok(entries)
    }

    /// The entries of `hash` with revisions in `low..=high`, ascending.
    pub(crate) fn range(&self, hash: u64, low: u64, high: u64) -> Result<Vec<Entry>, TableError> {
        let (from, to) = ((hash, low), (hash, high));
        let mut out = Vec::new();
        // The last block whose first key is below `from`: equal keys may end the block before.
        let mut i = self.fences.partition_point(|f| *f < from).saturating_sub(1);
        while i < self.fences.len() && self.fences[i] <= to {
            for entry in self.block(i)? {
                if entry.key() > to {
                    return Ok(out);
                }
                if entry.key() >= from {
                    out.push(entry);
                }
            }
            i += 1;
        }
        Ok(out)
    }

    /// Up to `count_max` entries of `hash` with revisions in `low..=high`, newest key first.
    pub(crate) fn range_rev(
        &self,
        hash: u64,
        low: u64,
        high: u64,
        count_max: usize,
    ) -> Result<Vec<Entry>, TableError> {
        let (from, to) = ((hash, low), (hash, high));
        let mut out = Vec::new();
        let mut i = self.fences.partition_point(|f| *f <= to);
        while i > 0 {
            i -= 1;
            for entry in self.block(i)?.into_iter().rev() {
                if entry.key() > to {
                    continue;
                }
                if entry.key() < from || out.len() == count_max {
                    return Ok(out);
                }
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// Every entry in order, a block at a time.
    pub(crate) fn iter(self: &Arc<Self>) -> TableIter {
        TableIter {
            table: Arc::clone(self),
            block: 0,
            entries: Vec::new().into_iter(),
        }
    }
}

/// An iterator over all entries of a table.
#[derive(Debug)]
pub(crate) struct TableIter {
    table: Arc<IndexTable>,
    block: usize,
    entries: std::vec::IntoIter<Entry>,
}

impl Iterator for TableIter {
    type Item = Result<Entry, TableError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(entry) = self.entries.next() {
                return Some(Ok(entry));
            }
            if self.block >= self.table.block_count() {
                return None;
            }
            match self.table.block(self.block) {
                Ok(entries) => {
                    self.block += 1;
                    self.entries = entries.into_iter();
                }
                Err(error) => {
                    self.block = self.table.block_count();
                    return Some(Err(error));
                }
            }
        }
    }
}

/// Merges sorted iterators into one sorted iterator (ties keep both entries).
pub(crate) fn merge(mut inputs: Vec<TableIter>) -> impl Iterator<Item = Result<Entry, TableError>> {
    let mut heads: Vec<Option<Entry>> = vec![None; inputs.len()];
    let mut failed = false;
    let mut primed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        if !primed {
            primed = true;
            for (i, input) in inputs.iter_mut().enumerate() {
                match input.next() {
                    Some(Ok(entry)) => heads[i] = Some(entry),
                    Some(Err(error)) => {
                        failed = true;
                        return Some(Err(error));
                    }
                    None => {}
                }
            }
        }
        // Few inputs (at most a handful): a linear minimum is cheaper than a heap.
        let (i, entry) = heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.map(|e| (i, e)))
            .min_by_key(|(_, e)| *e)?;
        match inputs[i].next() {
            Some(Ok(next)) => heads[i] = Some(next),
            Some(Err(error)) => {
                failed = true;
                return Some(Err(error));
            }
            None => heads[i] = None,
        }
        Some(Ok(entry))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::faulty::FaultyStorage;

    fn entries(n: u64) -> Vec<Entry> {
        let mut out: Vec<Entry> = (0..n)
            .map(|i| Entry {
                hash: i % 7,
                revision: i / 7,
                offset: LogOffset::new(0, 64 + i * 10),
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn written_tables_read_back_and_answer_ranges() {
        let storage = FaultyStorage::new();
        storage.create_dir_all(Path::new("/ix")).unwrap();
        let dir = Path::new("/ix");
        for n in [1u64, 169, 170, 171, 1000, 5000] {
            let all = entries(n);
            let table = Arc::new(
                IndexTable::write(&storage, dir, n, 0, all.iter().copied().map(Ok)).unwrap(),
            );
            let reopened = Arc::new(IndexTable::open(&storage, dir, n).unwrap());
            assert_eq!(reopened.entry_count, n);
            let read: Vec<Entry> = reopened.iter().map(Result::unwrap).collect();
            assert_eq!(read, all);
            for t in [&table, &reopened] {
                for hash in 0..8 {
                    let want: Vec<Entry> = all
                        .iter()
                        .filter(|e| e.hash == hash && (3..=90).contains(&e.revision))
                        .copied()
                        .collect();
                    assert_eq!(t.range(hash, 3, 90).unwrap(), want);
                    let mut rev = want.clone();
                    rev.reverse();
                    rev.truncate(5);
                    assert_eq!(t.range_rev(hash, 3, 90, 5).unwrap(), rev);
                }
            }
        }
    }

    #[test]
    fn duplicate_keys_across_a_block_boundary_are_all_found() {
        let storage = FaultyStorage::new();
        storage.create_dir_all(Path::new("/ix")).unwrap();
        let all: Vec<Entry> = (0..400u64)
            .map(|i| Entry {
                hash: 5,
                revision: 1,
                offset: LogOffset::new(0, i),
            })
            .collect();
        let table = IndexTable::write(
            &storage,
            Path::new("/ix"),
            1,
            0,
            all.iter().copied().map(Ok),
        )
        .unwrap();
        assert_eq!(table.range(5, 1, 1).unwrap().len(), 400);
        assert_eq!(table.range_rev(5, 1, 1, 1000).unwrap().len(), 400);
    }

    #[test]
    fn damage_is_reported_with_file_and_offset() {
        let storage = FaultyStorage::new();
        storage.create_dir_all(Path::new("/ix")).unwrap();
        let dir = Path::new("/ix");
        let all = entries(1000);
        IndexTable::write(&storage, dir, 1, 0, all.iter().copied().map(Ok)).unwrap();
        storage
            .corrupt(&dir.join(table_name(1)), 4096 + 100, &[0xff])
            .unwrap();
        let table = Arc::new(IndexTable::open(&storage, dir, 1).unwrap());
        let error = table.iter().find_map(Result::err).unwrap();
        assert!(error.to_string().contains("offset 4096"), "{error}");
        let len = storage.contents(&dir.join(table_name(1))).unwrap().len();
        storage
            .corrupt(&dir.join(table_name(1)), len - 10, &[0xff])
            .unwrap();
        assert!(IndexTable::open(&storage, dir, 1).is_err());
    }

    #[test]
    fn merging_keeps_every_entry_in_order() {
        let storage = FaultyStorage::new();
        storage.create_dir_all(Path::new("/ix")).unwrap();
        let dir = Path::new("/ix");
        let all = entries(3000);
        let mut tables = Vec::new();
        for part in 0..3u64 {
            let mine: Vec<Entry> = all.iter().skip(part as usize).step_by(3).copied().collect();
            tables.push(Arc::new(
                IndexTable::write(&storage, dir, part, 0, mine.into_iter().map(Ok)).unwrap(),
            ));
        }
        let merged: Vec<Entry> = merge(tables.iter().map(IndexTable::iter).collect())
            .map(Result::unwrap)
            .collect();
        assert_eq!(merged, all);
    }
}
