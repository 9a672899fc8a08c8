//! Explicit limits. Exceeding one is an error that names it; nothing is ever truncated.

use std::fmt;

use crate::{EventData, ids};

/// The limits a store enforces. Every backend exposes its own through
/// [`EventStore::limits`](crate::EventStore::limits); the conformance suite reads them from there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Limits {
    /// Largest event: type + data + metadata keys and values, in bytes. Default 1 MiB.
    pub event_size_bytes_max: usize,
    /// Most events in one append (all streams of an `append_multi` together). Default 10,000.
    pub events_per_append_max: usize,
    /// Largest append, all events together, in bytes. Default 64 MiB.
    pub append_size_bytes_max: usize,
    /// Most streams in one `append_multi`. Default 100.
    pub streams_per_append_max: usize,
    /// Most metadata entries on one event. Default 64.
    pub metadata_entries_max: usize,
    /// Most events one read may ask for. Default 10,000.
    pub read_count_max: usize,
    /// Longest stream id in bytes (fixed by the event model).
    pub stream_id_bytes_max: usize,
    /// Longest event type in bytes (fixed by the event model).
    pub event_type_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            event_size_bytes_max: 1024 * 1024,
            events_per_append_max: 10_000,
            append_size_bytes_max: 64 * 1024 * 1024,
            streams_per_append_max: 100,
            metadata_entries_max: 64,
            read_count_max: 10_000,
            stream_id_bytes_max: ids::STREAM_ID_BYTES_MAX,
            event_type_bytes_max: ids::EVENT_TYPE_BYTES_MAX,
        }
    }
}

/// Which limit was exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// [`Limits::event_size_bytes_max`].
    EventSizeBytes,
    /// [`Limits::events_per_append_max`].
    EventsPerAppend,
    /// [`Limits::append_size_bytes_max`].
    AppendSizeBytes,
    /// [`Limits::streams_per_append_max`].
    StreamsPerAppend,
    /// [`Limits::metadata_entries_max`].
    MetadataEntries,
    /// [`Limits::read_count_max`].
    ReadCount,
    /// [`Limits::event_type_bytes_max`].
    EventTypeBytes,
}

impl Limit {
    /// The limit's name as it appears in [`Limits`] and in error messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::EventSizeBytes => "event_size_bytes_max",
            Self::EventsPerAppend => "events_per_append_max",
            Self::AppendSizeBytes => "append_size_bytes_max",
            Self::StreamsPerAppend => "streams_per_append_max",
            Self::MetadataEntries => "metadata_entries_max",
            Self::ReadCount => "read_count_max",
            Self::EventTypeBytes => "event_type_bytes_max",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A request went over a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{limit} exceeded: {actual} > {max}")]
pub struct LimitExceeded {
    /// Which limit.
    pub limit: Limit,
    /// The limit's value.
    pub max: u64,
    /// What the request had.
    pub actual: u64,
}

impl LimitExceeded {
    /// Returns an error when `actual > max`.
    pub fn check(limit: Limit, max: usize, actual: usize) -> Result<(), Self> {
        if actual > max {
            Err(Self {
                limit,
                max: max as u64,
                actual: actual as u64,
            })
        } else {
            Ok(())
        }
    }
}

/// Why an event in an append was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidEvent {
    /// The event type was empty.
    #[error("event {index}: event type is empty")]
    EmptyType {
        /// Index of the event in the request.
        index: usize,
    },
    /// The event type contained a control character.
    #[error("event {index}: event type contains a control character at byte {byte_offset}")]
    ControlCharacterInType {
        /// Index of the event in the request.
        index: usize,
        /// Byte offset in the type.
        byte_offset: usize,
    },
    /// Two events of one request share an id.
    #[error("event {index}: id {id} appears twice in one request")]
    DuplicateId {
        /// Index of the second occurrence.
        index: usize,
        /// The repeated id.
        id: uuid::Uuid,
    },
    /// The nil UUID is not a valid event id.
    #[error("event {index}: the nil UUID is not a valid event id")]
    NilId {
        /// Index of the event in the request.
        index: usize,
    },
}

/// What [`Limits::check_events`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventsRejected {
    /// A limit was exceeded.
    #[error(transparent)]
    LimitExceeded(#[from] LimitExceeded),
    /// An event is malformed.
    #[error(transparent)]
    Invalid(#[from] InvalidEvent),
    /// The request holds no events.
    #[error("an append must hold at least one event")]
    Empty,
}

impl Limits {
    /// Checks a whole request (the events of every stream it writes to, in order) against these
    /// limits and the event model's rules. Backends call this before touching storage.
    ///
    /// The content type is a label: JSON data is not parsed here (that stays off the append hot
    /// path); the HTTP API only ever accepts JSON values, and [`EventData::json`] serializes them.
    pub fn check_events<'a>(
        &self,
        events: impl IntoIterator<Item = &'a EventData>,
    ) -> Result<(), EventsRejected> {
        let mut count = 0usize;
        let mut total_bytes = 0usize;
        let mut seen = std::collections::HashSet::new();
        for (index, event) in events.into_iter().enumerate() {
            count += 1;
            LimitExceeded::check(Limit::EventsPerAppend, self.events_per_append_max, count)?;
            match ids::validate_name(&event.event_type, self.event_type_bytes_max) {
                Ok(()) => {}
                Err(ids::NameProblem::Empty) => {
                    return Err(InvalidEvent::EmptyType { index }.into());
                }
                Err(ids::NameProblem::TooLong { len_bytes }) => {
                    return Err(LimitExceeded {
                        limit: Limit::EventTypeBytes,
                        max: self.event_type_bytes_max as u64,
                        actual: len_bytes as u64,
                    }
                    .into());
                }
                Err(ids::NameProblem::ControlCharacter { byte_offset, .. }) => {
                    return Err(InvalidEvent::ControlCharacterInType { index, byte_offset }.into());
                }
            }
            LimitExceeded::check(
                Limit::MetadataEntries,
                self.metadata_entries_max,
                event.metadata.len(),
            )?;
            let size = event.size_bytes();
            LimitExceeded::check(Limit::EventSizeBytes, self.event_size_bytes_max, size)?;
            total_bytes += size;
            LimitExceeded::check(
                Limit::AppendSizeBytes,
                self.append_size_bytes_max,
                total_bytes,
            )?;
            if event.id.is_nil() {
                return Err(InvalidEvent::NilId { index }.into());
            }
            if !seen.insert(event.id) {
                return Err(InvalidEvent::DuplicateId {
                    index,
                    id: event.id,
                }
                .into());
            }
        }
        if count == 0 {
            return Err(EventsRejected::Empty);
        }
        Ok(())
    }

    /// Checks the count a read asks for.
    pub fn check_read_count(&self, limit: usize) -> Result<(), LimitExceeded> {
        LimitExceeded::check(Limit::ReadCount, self.read_count_max, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_errors_name_the_limit() {
        let limits = Limits {
            event_size_bytes_max: 10,
            ..Limits::default()
        };
        let big = EventData::binary("E", vec![0u8; 20]);
        let error = limits.check_events([&big]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "event_size_bytes_max exceeded: 21 > 10",
            "{error}"
        );
    }

    #[test]
    fn rejects_malformed_events() {
        let limits = Limits::default();
        assert_eq!(
            limits.check_events(std::iter::empty()),
            Err(EventsRejected::Empty)
        );
        let e = EventData::binary("", vec![]);
        assert!(matches!(
            limits.check_events([&e]),
            Err(EventsRejected::Invalid(InvalidEvent::EmptyType {
                index: 0
            }))
        ));
        let a = EventData::binary("A", vec![]);
        let twin = a.clone();
        assert!(matches!(
            limits.check_events([&a, &twin]),
            Err(EventsRejected::Invalid(InvalidEvent::DuplicateId {
                index: 1,
                ..
            }))
        ));
        let nil = EventData::binary("A", vec![]).with_id(uuid::Uuid::nil());
        assert!(matches!(
            limits.check_events([&nil]),
            Err(EventsRejected::Invalid(InvalidEvent::NilId { index: 0 }))
        ));
    }
}
