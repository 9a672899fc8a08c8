//! What the engine derives from the log: the readers' [`Index`] and the writer's [`Head`]s.
//!
//! The index maps `(stream, revision)` and positions to log offsets. The newest records are in
//! the memtable; older ones in immutable index tables on disk and the positions file, which a
//! checkpoint names together with the log offset they cover. Memory is bounded: the memtable by
//! `index_memtable_entries_max`, table fences at 16 bytes per 170 entries, and the caches of
//! stream facts by their entry limits. See `docs/design/log-format.md` ("Index").

mod memtable;
mod persist;
mod table;

use std::{
    collections::HashMap,
    collections::VecDeque,
    hash::Hash,
    sync::{Arc, Mutex, RwLock},
};

use factline_core::{
    Position, RecordedEvent, Revision, StorageError, StreamId, StreamMetadata, Timestamp, Uuid,
};

pub(crate) use memtable::MemTable;
pub(crate) use persist::{INDEX_DIR, IndexFiles, Loaded};
pub(crate) use table::{IndexTable, TableError};

use crate::{
    format::Record,
    reader::{Files, read_index},
    storage::{StorageFile, read_exact_at},
};

/// The revision slot of a stream's metadata records in index tables.
pub(crate) const METADATA_SLOT: u64 = u64::MAX - 1;
/// The revision slot of a stream's tombstone record in index tables.
pub(crate) const TOMBSTONE_SLOT: u64 = u64::MAX;
/// The highest revision an event may have.
pub(crate) const EVENT_REVISION_MAX: u64 = u64::MAX - 2;

/// The 64-bit hash index tables key streams by (XXH3, stable across versions and platforms).
pub(crate) fn stream_hash(stream: &StreamId) -> u64 {
    xxhash_rust::xxh3::xxh3_64(stream.as_str().as_bytes())
}

/// Where a record starts: segment number and byte offset, packed in one `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct LogOffset(u64);

const OFFSET_BITS: u32 = 40;

impl LogOffset {
    /// Packs a segment number (< 2^24) and an offset (< 1 TiB).
    pub(crate) fn new(segment: u64, offset: u64) -> Self {
        debug_assert!(segment < 1 << (64 - OFFSET_BITS) && offset < 1 << OFFSET_BITS);
        Self(segment << OFFSET_BITS | offset)
    }

    /// The segment number.
    pub(crate) fn segment(self) -> u64 {
        self.0 >> OFFSET_BITS
    }

    /// The byte offset within the segment.
    pub(crate) fn offset(self) -> u64 {
        self.0 & ((1 << OFFSET_BITS) - 1)
    }

    /// The packed form stored in index files.
    pub(crate) fn to_u64(self) -> u64 {
        self.0
    }

    /// From the packed form.
    pub(crate) fn from_u64(packed: u64) -> Self {
        Self(packed)
    }
}

/// One change to the index, applied after its transaction is durable.
#[derive(Debug, Clone)]
pub(crate) enum IndexUpdate {
    /// An event was committed.
    Event {
        /// Its stream.
        stream: StreamId,
        /// Its revision (must be the stream's next one).
        revision: Revision,
        /// Its position (must be the next one).
        position: Position,
        /// When it was recorded.
        recorded_at: Timestamp,
        /// Where its record starts.
        offset: LogOffset,
    },
    /// A stream's metadata changed.
    Metadata {
        /// The stream.
        stream: StreamId,
        /// The new metadata.
        metadata: StreamMetadata,
        /// Where its record starts.
        offset: LogOffset,
    },
    /// A stream was tombstoned.
    Tombstone {
        /// The stream.
        stream: StreamId,
        /// Where its record starts.
        offset: LogOffset,
    },
}

/// The positions file as of one flush: offsets of positions `0..count`.
#[derive(Debug, Clone, Default)]
pub(crate) struct PositionsFile {
    pub(crate) file: Option<Arc<dyn StorageFile>>,
    pub(crate) count: u64,
}

/// What one layer of the index knows of a stream.
#[derive(Debug, Clone, Default)]
pub(crate) struct Part {
    pub(crate) last: Option<Revision>,
    pub(crate) metadata: Option<StreamMetadata>,
    pub(crate) tombstoned: bool,
}

/// What the index knows of a stream.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamInfo {
    /// The last revision written.
    pub(crate) last: Option<Revision>,
    /// Current metadata.
    pub(crate) metadata: StreamMetadata,
    /// True once tombstoned.
    pub(crate) tombstoned: bool,
}

/// The readers' index of committed data.
#[derive(Debug)]
pub(crate) struct Index {
    /// The newest records.
    pub(crate) mem: MemTable,
    /// A memtable being written to a table by the indexer.
    pub(crate) frozen: Option<Arc<MemTable>>,
    /// Index tables, oldest records first.
    pub(crate) tables: Arc<[Arc<IndexTable>]>,
    /// The positions file.
    pub(crate) positions: PositionsFile,
    /// End of the committed data: segment number and the offset after the last committed byte.
    pub(crate) committed_end: Option<LogOffset>,
    /// Changes whenever `tables` does (keys the stream-facts cache).
    pub(crate) generation: u64,
}

/// The parts of the index a lookup needs after it lets go of the lock.
struct View {
    frozen: Option<Arc<MemTable>>,
    tables: Arc<[Arc<IndexTable>]>,
    positions: PositionsFile,
    generation: u64,
}

impl Index {
    /// An index of the tables in `files`, with an empty memtable after them.
    pub(crate) fn new(files: &IndexFiles) -> Self {
        Self {
            mem: MemTable::new(files.positions_count),
            frozen: None,
            tables: files.tables.clone().into(),
            positions: files.positions_snapshot(),
            committed_end: None,
            generation: 0,
        }
    }

    /// Applies one committed change.
    pub(crate) fn apply(&mut self, update: IndexUpdate) {
        self.mem.apply(update);
    }

    /// The position the next event gets (the number of events).
    pub(crate) fn next_position(&self) -> u64 {
        self.mem.next_position()
    }

    /// Moves the memtable aside for the indexer and starts an empty one.
    pub(crate) fn freeze(&mut self) -> Arc<MemTable> {
        debug_assert!(self.frozen.is_none());
        let base = self.next_position();
        let frozen = Arc::new(std::mem::replace(&mut self.mem, MemTable::new(base)));
        self.frozen = Some(Arc::clone(&frozen));
        frozen
    }

    /// Takes the tables and positions of `files` (after a flush or a merge).
    pub(crate) fn publish(&mut self, files: &IndexFiles, flushed: bool) {
        self.tables = files.tables.clone().into();
        self.positions = files.positions_snapshot();
        if flushed {
            self.frozen = None;
        }
        self.generation += 1;
    }

    fn view(&self) -> View {
        View {
            frozen: self.frozen.clone(),
            tables: Arc::clone(&self.tables),
            positions: self.positions.clone(),
            generation: self.generation,
        }
    }
}

/// A bounded cache of what the index tables say about streams, valid for one generation.
#[derive(Debug)]
pub(crate) struct InfoCache {
    entries: HashMap<StreamId, (u64, u64, Part)>,
    clock: u64,
    entries_max: usize,
}

impl InfoCache {
    /// An empty cache holding at most `entries_max` streams.
    pub(crate) fn new(entries_max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            clock: 0,
            entries_max: entries_max.max(1),
        }
    }

    fn get(&mut self, stream: &StreamId, generation: u64) -> Option<Part> {
        self.clock += 1;
        let clock = self.clock;
        let (g, used, part) = self.entries.get_mut(stream)?;
        if *g != generation {
            return None;
        }
        *used = clock;
        Some(part.clone())
    }

    fn put(&mut self, stream: StreamId, generation: u64, part: Part) {
        if self.entries.len() >= self.entries_max {
            evict_least_used(
                &mut self.entries,
                |(_, used, _)| *used,
                self.entries_max / 2,
            );
        }
        self.clock += 1;
        self.entries.insert(stream, (generation, self.clock, part));
    }
}

/// Keeps the `keep` most recently used entries of `map` (`used` says when an entry was).
pub(crate) fn evict_least_used<K: Eq + Hash, V>(
    map: &mut HashMap<K, V>,
    used: impl Fn(&V) -> u64,
    keep: usize,
) {
    if map.len() <= keep {
        return;
    }
    let mut stamps: Vec<u64> = map.values().map(&used).collect();
    let cut = stamps.len() - keep;
    let (_, threshold, _) = stamps.select_nth_unstable(cut);
    let threshold = *threshold;
    map.retain(|_, v| used(v) >= threshold);
}

/// Lookups over the index: memtable, frozen memtable, tables, positions file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IndexReader<'a> {
    pub(crate) index: &'a RwLock<Index>,
    pub(crate) files: &'a Files,
    pub(crate) cache: &'a Mutex<InfoCache>,
}

fn table_error(error: TableError) -> StorageError {
    StorageError::Backend(error.to_string().into())
}

impl IndexReader<'_> {
    /// What the index knows of `stream`.
    pub(crate) fn stream_info(&self, stream: &StreamId) -> Result<StreamInfo, StorageError> {
        let (mem, view) = {
            let index = read_index(self.index);
            (index.mem.part(stream), index.view())
        };
        let frozen = view.frozen.as_ref().and_then(|f| f.part(stream));
        let mut info = StreamInfo::default();
        let mut metadata = None;
        for part in [mem, frozen].into_iter().flatten() {
            info.last = info.last.or(part.last);
            info.tombstoned |= part.tombstoned;
            metadata = metadata.or(part.metadata);
        }
        // Nothing is written after a tombstone: a stream with newer records has none in tables.
        if info.last.is_none() || metadata.is_none() {
            let part = self.table_part(&view, stream)?;
            info.last = info.last.or(part.last);
            info.tombstoned |= part.tombstoned;
            metadata = metadata.or(part.metadata);
        }
        info.metadata = metadata.unwrap_or_default();
        Ok(info)
    }

    /// What the tables of `view` know of `stream` (cached per generation).
    fn table_part(&self, view: &View, stream: &StreamId) -> Result<Part, StorageError> {
        if view.tables.is_empty() {
            return Ok(Part::default());
        }
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(stream, view.generation);
        if let Some(part) = cached {
            return Ok(part);
        }
        let hash = stream_hash(stream);
        let mut part = Part::default();
        for table in view.tables.iter().rev() {
            if part.last.is_none() {
                part.last = self.newest_event_in(table, hash, stream)?;
            }
            if part.metadata.is_none() {
                for entry in table
                    .range_rev(hash, METADATA_SLOT, METADATA_SLOT, usize::MAX)
                    .map_err(table_error)?
                {
                    if let Record::Metadata {
                        stream: s,
                        metadata,
                    } = self.files.record_at(entry.offset)?
                        && s == *stream
                    {
                        part.metadata = Some(metadata);
                        break;
                    }
                }
            }
            if !part.tombstoned {
                for entry in table
                    .range(hash, TOMBSTONE_SLOT, TOMBSTONE_SLOT)
                    .map_err(table_error)?
                {
                    if matches!(self.files.record_at(entry.offset)?, Record::Tombstone { stream: s } if s == *stream)
                    {
                        part.tombstoned = true;
                    }
                }
            }
        }
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .put(stream.clone(), view.generation, part.clone());
        Ok(part)
    }

    /// The newest revision of `stream` in `table` (entries of other streams with the same
    /// hash are skipped by reading their records).
    fn newest_event_in(
        &self,
        table: &IndexTable,
        hash: u64,
        stream: &StreamId,
    ) -> Result<Option<Revision>, StorageError> {
        let mut count = 4;
        loop {
            let entries = table
                .range_rev(hash, 0, EVENT_REVISION_MAX, count)
                .map_err(table_error)?;
            for entry in &entries {
                if let Record::Event(event) = self.files.record_at(entry.offset)?
                    && event.stream == *stream
                {
                    return Ok(Some(event.revision));
                }
            }
            if entries.len() < count {
                return Ok(None);
            }
            count *= 4;
        }
    }

    /// The offsets of records that may be `stream`'s revisions in `range`, ascending. Entries
    /// from tables may belong to another stream with the same hash: callers check the stream.
    pub(crate) fn stream_offsets(
        &self,
        stream: &StreamId,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<LogOffset>, StorageError> {
        let mut out = Vec::new();
        if range.is_empty() {
            return Ok(out);
        }
        let (in_mem, view) = {
            let index = read_index(self.index);
            (
                index.mem.stream_offsets(stream, range.clone(), &mut out),
                index.view(),
            )
        };
        let in_frozen = view
            .frozen
            .as_ref()
            .and_then(|f| f.stream_offsets(stream, range.clone(), &mut out));
        let tables_end = [in_mem, in_frozen]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(range.end)
            .min(range.end);
        if range.start < tables_end {
            let hash = stream_hash(stream);
            for table in view.tables.iter() {
                for entry in table
                    .range(hash, range.start, tables_end - 1)
                    .map_err(table_error)?
                {
                    out.push(entry.offset);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// `stream`'s events with revisions in `range`, ascending.
    pub(crate) fn stream_events(
        &self,
        stream: &StreamId,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<RecordedEvent>, StorageError> {
        let offsets = self.stream_offsets(stream, range)?;
        let mut events = self.files.events_at(&offsets)?;
        events.retain(|event| event.stream == *stream);
        Ok(events)
    }

    /// The offsets of positions `range` (clipped to the committed ones), ascending.
    pub(crate) fn position_offsets(
        &self,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<LogOffset>, StorageError> {
        let mut out = Vec::new();
        let (mem_part, view) = {
            let index = read_index(self.index);
            let mut mem_part = Vec::new();
            index.mem.position_offsets(range.clone(), &mut mem_part);
            (mem_part, index.view())
        };
        let file_end = range.end.min(view.positions.count);
        if range.start < file_end
            && let Some(file) = &view.positions.file
        {
            let mut bytes = vec![0u8; ((file_end - range.start) * 8) as usize];
            read_exact_at(&**file, &mut bytes, range.start * 8).map_err(StorageError::backend)?;
            out.extend(
                bytes
                    .chunks_exact(8)
                    .map(|c| LogOffset::from_u64(table::le_u64(c, 0))),
            );
        }
        if let Some(frozen) = &view.frozen {
            frozen.position_offsets(range.start.max(file_end)..range.end, &mut out);
        }
        out.extend(mem_part);
        Ok(out)
    }
}

/// What the writer knows about one stream to check appends without I/O.
#[derive(Debug, Default, Clone)]
pub(crate) struct Head {
    /// The last revision written.
    pub(crate) last: Option<Revision>,
    /// Ids of the newest events, oldest first (at most the idempotency window).
    pub(crate) recent_ids: VecDeque<Uuid>,
    /// Current metadata.
    pub(crate) metadata: StreamMetadata,
    /// True once tombstoned.
    pub(crate) tombstoned: bool,
    /// When the last event was recorded.
    pub(crate) last_recorded_at: Option<Timestamp>,
    /// The writer's group count when the head was last used (for eviction).
    pub(crate) used: u64,
}

impl Head {
    /// Records a new event.
    pub(crate) fn push_event(
        &mut self,
        revision: Revision,
        id: Uuid,
        recorded_at: Timestamp,
        window: usize,
    ) {
        self.last = Some(revision);
        self.recent_ids.push_back(id);
        while self.recent_ids.len() > window {
            self.recent_ids.pop_front();
        }
        self.last_recorded_at = Some(recorded_at);
    }

    /// The revision of the oldest id in the window.
    pub(crate) fn window_start(&self) -> Option<Revision> {
        self.last
            .map(|last| Revision(last.0 + 1 - self.recent_ids.len() as u64))
    }

    /// True when the newest event is visible under the current metadata (then at least one
    /// event is: `max_count` is at least 1 and recorded times never decrease).
    pub(crate) fn has_visible_events(&self, now: Timestamp) -> bool {
        let Some(last) = self.last else {
            return false;
        };
        if self.metadata.truncate_before.is_some_and(|tb| last < tb) {
            return false;
        }
        match (self.metadata.max_age, self.last_recorded_at) {
            (Some(age), Some(at)) => at >= now.saturating_sub(age),
            _ => true,
        }
    }
}
