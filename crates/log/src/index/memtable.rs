//! The memtable: the index of the newest committed records, in memory until it is flushed to an
//! index table. Its size is bounded by `LogOptions::index_memtable_entries_max`.

use std::collections::HashMap;

use factline_core::{StreamId, StreamMetadata};

use super::{
    IndexUpdate, LogOffset, METADATA_SLOT, Part, TOMBSTONE_SLOT, stream_hash, table::Entry,
};

/// One stream's records in a memtable.
#[derive(Debug, Default)]
struct MemStream {
    /// The revision of `offsets[0]`.
    first: u64,
    /// Offsets of consecutive revisions.
    offsets: Vec<LogOffset>,
    /// The newest metadata record.
    metadata: Option<(StreamMetadata, LogOffset)>,
    /// The tombstone record.
    tombstone: Option<LogOffset>,
}

/// The index of the records committed since the last flush.
#[derive(Debug)]
pub(crate) struct MemTable {
    /// The position of `positions[0]`.
    pub(crate) base_position: u64,
    /// The offset of each position from `base_position` on.
    pub(crate) positions: Vec<LogOffset>,
    streams: HashMap<StreamId, MemStream>,
    /// Entries a flush would write.
    pub(crate) entries: usize,
}

impl MemTable {
    /// An empty memtable whose first event will have `base_position`.
    pub(crate) fn new(base_position: u64) -> Self {
        Self {
            base_position,
            positions: Vec::new(),
            streams: HashMap::new(),
            entries: 0,
        }
    }

    /// The position after the newest event.
    pub(crate) fn next_position(&self) -> u64 {
        self.base_position + self.positions.len() as u64
    }

    /// Applies one committed change.
    pub(crate) fn apply(&mut self, update: IndexUpdate) {
        match update {
            IndexUpdate::Event {
                stream,
                revision,
                position,
                offset,
                ..
            } => {
                debug_assert_eq!(position.0, self.next_position());
                self.positions.push(offset);
                let entry = self.streams.entry(stream).or_default();
                if entry.offsets.is_empty() {
                    entry.first = revision.0;
                }
                debug_assert_eq!(revision.0, entry.first + entry.offsets.len() as u64);
                entry.offsets.push(offset);
                self.entries += 1;
            }
            IndexUpdate::Metadata {
                stream,
                metadata,
                offset,
            } => {
                let entry = self.streams.entry(stream).or_default();
                if entry.metadata.is_none() {
                    self.entries += 1;
                }
                entry.metadata = Some((metadata, offset));
            }
            IndexUpdate::Tombstone { stream, offset } => {
                let entry = self.streams.entry(stream).or_default();
                if entry.tombstone.is_none() {
                    self.entries += 1;
                }
                entry.tombstone = Some(offset);
            }
        }
    }

    /// What this memtable knows of `stream`.
    pub(crate) fn part(&self, stream: &StreamId) -> Option<Part> {
        let entry = self.streams.get(stream)?;
        Some(Part {
            last: entry
                .offsets
                .len()
                .checked_sub(1)
                .map(|i| factline_core::Revision(entry.first + i as u64)),
            metadata: entry.metadata.as_ref().map(|(m, _)| m.clone()),
            tombstoned: entry.tombstone.is_some(),
        })
    }

    /// Pushes the offsets of `stream`'s revisions in `range` held here; returns the lowest
    /// revision held here (`None` without events).
    pub(crate) fn stream_offsets(
        &self,
        stream: &StreamId,
        range: std::ops::Range<u64>,
        out: &mut Vec<LogOffset>,
    ) -> Option<u64> {
        let entry = self.streams.get(stream)?;
        if entry.offsets.is_empty() {
            return None;
        }
        let end = entry.first + entry.offsets.len() as u64;
        let (low, high) = (range.start.max(entry.first), range.end.min(end));
        if low < high {
            out.extend_from_slice(
                &entry.offsets[(low - entry.first) as usize..(high - entry.first) as usize],
            );
        }
        Some(entry.first)
    }

    /// Pushes the offsets of the positions in `range` held here.
    pub(crate) fn position_offsets(&self, range: std::ops::Range<u64>, out: &mut Vec<LogOffset>) {
        let (low, high) = (
            range.start.max(self.base_position),
            range.end.min(self.next_position()),
        );
        if low < high {
            out.extend_from_slice(
                &self.positions
                    [(low - self.base_position) as usize..(high - self.base_position) as usize],
            );
        }
    }

    /// Every entry, sorted, as a flush writes them.
    pub(crate) fn sorted_entries(&self) -> Vec<Entry> {
        let mut out = Vec::with_capacity(self.entries);
        for (stream, entry) in &self.streams {
            let hash = stream_hash(stream);
            out.extend(entry.offsets.iter().enumerate().map(|(i, offset)| Entry {
                hash,
                revision: entry.first + i as u64,
                offset: *offset,
            }));
            if let Some((_, offset)) = entry.metadata {
                out.push(Entry {
                    hash,
                    revision: METADATA_SLOT,
                    offset,
                });
            }
            if let Some(offset) = entry.tombstone {
                out.push(Entry {
                    hash,
                    revision: TOMBSTONE_SLOT,
                    offset,
                });
            }
        }
        out.sort_unstable();
        out
    }
}
