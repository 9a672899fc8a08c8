//! What the engine derives from the log: the readers' [`Index`] and the writer's [`Head`]s.
//!
//! Version 1 keeps both in memory and rebuilds them from the whole log on open; see
//! `docs/design/log-format.md` ("Index") for the bounded, checkpointed version that follows.

use std::collections::{HashMap, VecDeque};

use factline_core::{Position, Revision, StreamId, StreamMetadata, Timestamp, Uuid};

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
}

/// What readers know about one stream.
#[derive(Debug, Default, Clone)]
pub(crate) struct StreamIndex {
    /// The log offset of each revision.
    pub(crate) offsets: Vec<LogOffset>,
    /// Current metadata.
    pub(crate) metadata: StreamMetadata,
    /// True once tombstoned.
    pub(crate) tombstoned: bool,
}

impl StreamIndex {
    /// The last revision written.
    pub(crate) fn last_revision(&self) -> Option<Revision> {
        (self.offsets.len() as u64).checked_sub(1).map(Revision)
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
    },
    /// A stream was tombstoned.
    Tombstone {
        /// The stream.
        stream: StreamId,
    },
}

/// The readers' index of committed data.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// Per stream.
    pub(crate) streams: HashMap<StreamId, StreamIndex>,
    /// The log offset of each position.
    pub(crate) positions: Vec<LogOffset>,
    /// End of the committed data: segment number and the offset after the last committed byte.
    pub(crate) committed_end: Option<LogOffset>,
}

impl Index {
    /// Applies one committed change.
    pub(crate) fn apply(&mut self, update: IndexUpdate) {
        match update {
            IndexUpdate::Event {
                stream,
                position,
                offset,
                ..
            } => {
                debug_assert_eq!(position.0, self.positions.len() as u64);
                self.positions.push(offset);
                self.streams.entry(stream).or_default().offsets.push(offset);
            }
            IndexUpdate::Metadata { stream, metadata } => {
                self.streams.entry(stream).or_default().metadata = metadata;
            }
            IndexUpdate::Tombstone { stream } => {
                self.streams.entry(stream).or_default().tombstoned = true;
            }
        }
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
