//! The [`EventStore`] and [`SnapshotStore`] traits and their request and response types.
//!
//! The contract every backend keeps is written out in `docs/design/event-store-contract.md`
//! and enforced by the conformance suite in [`crate::testkit`].

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{
    AppendError, DeleteError, EventData, ExpectedVersion, Limits, MetadataError, Position,
    ReadAllError, ReadStreamError, RecordedEvent, Revision, SnapshotError, StorageError, StreamId,
    SubscribeError, Subscription, Timestamp,
};

/// What a successful append returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendResult {
    /// Revision of the last event written: pass it as `ExpectedVersion::Exact` next time.
    pub next_expected_version: Revision,
    /// Position of the last event written. The events of one stream in one append occupy
    /// contiguous positions ending here.
    pub position: Position,
    /// When the events were recorded.
    pub recorded_at: Timestamp,
}

/// One stream's part of an [`EventStore::append_multi`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRequest {
    /// The stream to write.
    pub stream: StreamId,
    /// Its concurrency condition.
    pub expected: ExpectedVersion,
    /// The events, in order.
    pub events: Vec<EventData>,
}

impl AppendRequest {
    /// Bundles a stream, a condition and events.
    pub fn new(stream: StreamId, expected: ExpectedVersion, events: Vec<EventData>) -> Self {
        Self {
            stream,
            expected,
            events,
        }
    }
}

/// Read direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Oldest first.
    #[default]
    Forwards,
    /// Newest first.
    Backwards,
}

/// Options of [`EventStore::read_stream`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadStreamOptions {
    /// Read direction.
    pub direction: Direction,
    /// First revision to return (inclusive). `None`: the start (forwards) or the end (backwards).
    pub from: Option<Revision>,
    /// Most events to return; at most `read_count_max`.
    pub limit: usize,
}

impl ReadStreamOptions {
    /// Forwards from the start, 1,000 events.
    pub fn forwards() -> Self {
        Self {
            direction: Direction::Forwards,
            from: None,
            limit: 1_000,
        }
    }

    /// Backwards from the end, 1,000 events.
    pub fn backwards() -> Self {
        Self {
            direction: Direction::Backwards,
            ..Self::forwards()
        }
    }

    /// Starts at `revision` (inclusive).
    #[must_use]
    pub fn from(mut self, revision: Revision) -> Self {
        self.from = Some(revision);
        self
    }

    /// Returns at most `limit` events.
    #[must_use]
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

impl Default for ReadStreamOptions {
    fn default() -> Self {
        Self::forwards()
    }
}

/// Which revisions a stream read returns and how its page ends, from the read's options and the
/// stream's visible revisions `first..=last`: the paging rules every backend shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPage {
    /// The revisions to return, ascending (a backwards read returns them in reverse).
    pub revisions: std::ops::Range<u64>,
    /// [`StreamSlice::next_revision`].
    pub next_revision: Revision,
    /// [`StreamSlice::is_end`].
    pub is_end: bool,
    /// True for a backwards read.
    pub backwards: bool,
}

impl StreamPage {
    /// The slice of this page: `ascending` holds its events in revision order (they are
    /// reversed for a backwards read); `last_revision` is the stream's last revision.
    pub fn slice(&self, mut ascending: Vec<RecordedEvent>, last_revision: Revision) -> StreamSlice {
        if self.backwards {
            ascending.reverse();
        }
        StreamSlice {
            events: ascending,
            last_revision,
            next_revision: self.next_revision,
            is_end: self.is_end,
        }
    }
}

impl ReadStreamOptions {
    /// The page this read covers of a stream whose visible revisions are `first..=last`.
    pub fn page(&self, first: Revision, last: Revision) -> StreamPage {
        let limit = self.limit as u64;
        match self.direction {
            Direction::Forwards => {
                let start = self.from.unwrap_or(first).max(first).0;
                let end = start.saturating_add(limit).min(last.0 + 1);
                StreamPage {
                    revisions: start..end.max(start),
                    next_revision: Revision(end.max(start)),
                    is_end: end > last.0,
                    backwards: false,
                }
            }
            Direction::Backwards => {
                let start = self.from.unwrap_or(last).min(last);
                if start < first || limit == 0 {
                    StreamPage {
                        revisions: 0..0,
                        next_revision: start,
                        is_end: start < first,
                        backwards: true,
                    }
                } else {
                    let lowest = start.0.saturating_sub(limit - 1).max(first.0);
                    StreamPage {
                        revisions: lowest..start.0 + 1,
                        next_revision: Revision(lowest.saturating_sub(1)),
                        is_end: lowest == first.0,
                        backwards: true,
                    }
                }
            }
        }
    }
}

/// A page of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSlice {
    /// The events, in the requested direction.
    pub events: Vec<RecordedEvent>,
    /// The last revision written to the stream when it was read.
    pub last_revision: Revision,
    /// Where the next page starts (pass as `from`); meaningful when `!is_end`, and forwards
    /// also at the end (the revision the next appended event will get).
    pub next_revision: Revision,
    /// True when the page reached the end of the stream in its direction.
    pub is_end: bool,
}

/// Which streams and event types a `$all` read or subscription returns.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EventFilter {
    /// Keep only streams whose id starts with this.
    pub stream_prefix: Option<String>,
    /// Keep only streams of this category (the part of the id before the first `-`).
    pub category: Option<String>,
    /// Keep only event types that start with this.
    pub event_type_prefix: Option<String>,
}

impl EventFilter {
    /// Everything.
    pub fn all() -> Self {
        Self::default()
    }

    /// Streams whose id starts with `prefix`.
    #[must_use]
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = Some(prefix.into());
        self
    }

    /// Streams of category `category`.
    #[must_use]
    pub fn category(mut self, category: impl Into<String>) -> Self {
        self.category = Some(category.into());
        self
    }

    /// Event types that start with `prefix`.
    #[must_use]
    pub fn event_type_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.event_type_prefix = Some(prefix.into());
        self
    }

    /// True when the filter keeps everything.
    pub fn is_all(&self) -> bool {
        self.stream_prefix.is_none() && self.category.is_none() && self.event_type_prefix.is_none()
    }

    /// True when an event of `stream` with `event_type` passes.
    pub fn matches(&self, stream: &str, event_type: &str) -> bool {
        self.stream_prefix
            .as_deref()
            .is_none_or(|prefix| stream.starts_with(prefix))
            && self
                .category
                .as_deref()
                .is_none_or(|category| crate::category_of(stream) == category)
            && self
                .event_type_prefix
                .as_deref()
                .is_none_or(|prefix| event_type.starts_with(prefix))
    }

    /// True when `event` passes.
    pub fn matches_event(&self, event: &RecordedEvent) -> bool {
        self.matches(event.stream.as_str(), &event.event_type)
    }
}

/// Options of [`EventStore::read_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadAllOptions {
    /// Read direction.
    pub direction: Direction,
    /// First position to consider (inclusive). `None`: the start (forwards) or the end (backwards).
    pub from: Option<Position>,
    /// Most events to return; at most `read_count_max`.
    pub limit: usize,
    /// Which events to return.
    pub filter: EventFilter,
}

impl ReadAllOptions {
    /// Forwards from the start, 1,000 events, no filter.
    pub fn forwards() -> Self {
        Self {
            direction: Direction::Forwards,
            from: None,
            limit: 1_000,
            filter: EventFilter::all(),
        }
    }

    /// Backwards from the end, 1,000 events, no filter.
    pub fn backwards() -> Self {
        Self {
            direction: Direction::Backwards,
            ..Self::forwards()
        }
    }

    /// Starts at `position` (inclusive).
    #[must_use]
    pub fn from(mut self, position: Position) -> Self {
        self.from = Some(position);
        self
    }

    /// Returns at most `limit` events.
    #[must_use]
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Keeps only events that pass `filter`.
    #[must_use]
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }
}

impl Default for ReadAllOptions {
    fn default() -> Self {
        Self::forwards()
    }
}

/// A page of `$all`.
///
/// A filtered page may hold fewer than `limit` events although more match further on: a backend
/// may bound the work of one read. Keep reading from `next_position` until `is_end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllSlice {
    /// The matching events, in the requested direction.
    pub events: Vec<RecordedEvent>,
    /// Where the next page starts (pass as `from`). Forwards at the end, this is the position
    /// the next committed event will get.
    pub next_position: Position,
    /// True when the page reached the end of the log in its direction.
    pub is_end: bool,
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubscribeFrom<T> {
    /// From the first event.
    Start,
    /// From the event after this revision or position (a checkpoint: the last one processed).
    After(T),
    /// Only events committed after the subscription was created.
    End,
}

impl<T> SubscribeFrom<T> {
    /// The same start with its checkpoint converted (e.g. between `Position` and its number).
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> SubscribeFrom<U> {
        match self {
            Self::Start => SubscribeFrom::Start,
            Self::After(last) => SubscribeFrom::After(f(last)),
            Self::End => SubscribeFrom::End,
        }
    }
}

impl SubscribeFrom<u64> {
    /// Parses the text form of a start, as the HTTP API and the CLI take it: `start`, `end`, or
    /// the number of the first revision or position to deliver (`0` is the start).
    pub fn parse_first(text: &str) -> Result<Self, ParseSubscribeFromError> {
        match text {
            "start" => Ok(Self::Start),
            "end" => Ok(Self::End),
            number => match number.parse::<u64>() {
                Ok(0) => Ok(Self::Start),
                Ok(first) => Ok(Self::After(first - 1)),
                Err(_) => Err(ParseSubscribeFromError {
                    input: text.to_owned(),
                }),
            },
        }
    }
}

/// Why [`SubscribeFrom::parse_first`] refused its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a subscription start: give start, end or the first number to deliver")]
pub struct ParseSubscribeFromError {
    /// The text given.
    pub input: String,
}

impl SubscribeFrom<Position> {
    /// The first position to deliver, given the position the next commit will get.
    pub fn first_position(self, next_commit: Position) -> Position {
        match self {
            Self::Start => Position::FIRST,
            Self::After(position) => position.next(),
            Self::End => next_commit,
        }
    }
}

impl SubscribeFrom<Revision> {
    /// The first revision to deliver, given the stream's last revision.
    pub fn first_revision(self, last: Option<Revision>) -> Revision {
        match self {
            Self::Start => Revision::FIRST,
            Self::After(revision) => revision.next(),
            Self::End => last.map_or(Revision::FIRST, Revision::next),
        }
    }
}

/// Retention and other settings of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StreamMetadata {
    /// Keep only the newest `max_count` events visible (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_count: Option<u64>,
    /// Hide events older than this (in seconds when serialized).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration_seconds"
    )]
    pub max_age: Option<Duration>,
    /// Hide events with a lower revision. A soft delete sets it to the last revision + 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate_before: Option<Revision>,
}

impl StreamMetadata {
    /// Checks the values; backends call this before storing metadata.
    pub fn validate(&self) -> Result<(), MetadataError> {
        if self.max_count == Some(0) {
            return Err(MetadataError::Invalid {
                field: "max_count",
                reason: "must be at least 1",
            });
        }
        if self.max_age.is_some_and(|age| age.is_zero()) {
            return Err(MetadataError::Invalid {
                field: "max_age",
                reason: "must be longer than zero",
            });
        }
        Ok(())
    }

    /// The first revision that these settings leave visible, given the stream's last revision,
    /// the current time and a lookup of an event's recorded time by revision.
    ///
    /// Returns `last + 1` when nothing is visible.
    pub fn first_visible_revision(
        &self,
        last: Revision,
        now: Timestamp,
        recorded_at: impl Fn(Revision) -> Timestamp,
    ) -> Revision {
        let mut first = self.truncate_before.unwrap_or(Revision::FIRST);
        if let Some(max_count) = self.max_count {
            let keep_from = (last.0 + 1).saturating_sub(max_count);
            first = first.max(Revision(keep_from));
        }
        if let Some(max_age) = self.max_age {
            let oldest_kept = now.saturating_sub(max_age);
            // Recorded times are non-decreasing along a stream: binary search the first kept one.
            let (mut low, mut high) = (first.0, last.0 + 1);
            while low < high {
                let mid = low + (high - low) / 2;
                if recorded_at(Revision(mid)) < oldest_kept {
                    low = mid + 1;
                } else {
                    high = mid;
                }
            }
            first = Revision(low);
        }
        first.min(Revision(last.0 + 1))
    }
}

mod duration_seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => serializer.serialize_u64(duration.as_secs()),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(deserializer)?.map(Duration::from_secs))
    }
}

/// How to delete a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeleteMode {
    /// Hide the current events (sets `truncate_before`); the stream can be written again and its
    /// revisions continue.
    Soft,
    /// Tombstone: the stream can never be read or written again.
    Tombstone,
}

/// The event store contract. See the module docs and `docs/design/event-store-contract.md`.
///
/// All methods take `&self`; implementations are cheap to share (`Arc` inside or around).
#[async_trait]
pub trait EventStore: Send + Sync {
    /// The limits this store enforces.
    fn limits(&self) -> &Limits;

    /// Appends `events` to `stream` atomically if `expected` holds.
    ///
    /// Re-appending the same event ids at the same place returns the original result without
    /// writing; a partial overlap is [`AppendError::IdempotencyConflict`].
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, AppendError> {
        let mut results = self
            .append_multi(vec![AppendRequest::new(stream.clone(), expected, events)])
            .await?;
        results
            .pop()
            .ok_or_else(|| StorageError::Backend("append_multi returned no result".into()).into())
    }

    /// Appends to several streams atomically: every check passes and everything is written, or
    /// nothing is. Results come back in request order.
    async fn append_multi(
        &self,
        requests: Vec<AppendRequest>,
    ) -> Result<Vec<AppendResult>, AppendError>;

    /// Reads one stream.
    async fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadStreamOptions,
    ) -> Result<StreamSlice, ReadStreamError>;

    /// Reads `$all`, the global log, including the events of deleted and truncated streams
    /// (retention and deletion apply to stream reads).
    async fn read_all(&self, options: ReadAllOptions) -> Result<AllSlice, ReadAllError>;

    /// The position of the last committed event, `None` while the log is empty.
    async fn head_position(&self) -> Result<Option<Position>, StorageError>;

    /// Subscribes to one stream: catch-up from `from`, then live.
    async fn subscribe_to_stream(
        &self,
        stream: &StreamId,
        from: SubscribeFrom<Revision>,
    ) -> Result<Subscription, SubscribeError>;

    /// Subscribes to `$all` (or a category or prefix, through `filter`): catch-up, then live.
    async fn subscribe_to_all(
        &self,
        from: SubscribeFrom<Position>,
        filter: EventFilter,
    ) -> Result<Subscription, SubscribeError>;

    /// The stream's metadata (defaults when never set).
    async fn stream_metadata(&self, stream: &StreamId) -> Result<StreamMetadata, MetadataError>;

    /// Replaces the stream's metadata. Allowed before the stream's first event.
    async fn set_stream_metadata(
        &self,
        stream: &StreamId,
        metadata: StreamMetadata,
    ) -> Result<(), MetadataError>;

    /// Soft-deletes or tombstones the stream if `expected` holds. Both drop its snapshot.
    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<(), DeleteError>;
}

/// A snapshot of a stream's derived state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The revision of the last event folded into `state`.
    pub revision: Revision,
    /// Version of the state's encoding; a reader drops snapshots of another version.
    pub state_version: u32,
    /// The encoded state.
    pub state: Bytes,
    /// When it was taken.
    pub taken_at: Timestamp,
}

/// Stores one snapshot per stream, kept apart from the events.
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// Stores `snapshot` unless one with a higher revision is already stored (returns whether
    /// it was stored). Bounded by `event_size_bytes_max`.
    async fn save_snapshot(
        &self,
        stream: &StreamId,
        snapshot: Snapshot,
    ) -> Result<bool, SnapshotError>;

    /// The stored snapshot, if any.
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError>;

    /// Removes the stored snapshot, if any.
    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), SnapshotError>;
}

#[async_trait]
impl<T: EventStore + ?Sized> EventStore for Arc<T> {
    fn limits(&self) -> &Limits {
        (**self).limits()
    }
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, AppendError> {
        (**self).append(stream, expected, events).await
    }
    async fn append_multi(
        &self,
        requests: Vec<AppendRequest>,
    ) -> Result<Vec<AppendResult>, AppendError> {
        (**self).append_multi(requests).await
    }
    async fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadStreamOptions,
    ) -> Result<StreamSlice, ReadStreamError> {
        (**self).read_stream(stream, options).await
    }
    async fn read_all(&self, options: ReadAllOptions) -> Result<AllSlice, ReadAllError> {
        (**self).read_all(options).await
    }
    async fn head_position(&self) -> Result<Option<Position>, StorageError> {
        (**self).head_position().await
    }
    async fn subscribe_to_stream(
        &self,
        stream: &StreamId,
        from: SubscribeFrom<Revision>,
    ) -> Result<Subscription, SubscribeError> {
        (**self).subscribe_to_stream(stream, from).await
    }
    async fn subscribe_to_all(
        &self,
        from: SubscribeFrom<Position>,
        filter: EventFilter,
    ) -> Result<Subscription, SubscribeError> {
        (**self).subscribe_to_all(from, filter).await
    }
    async fn stream_metadata(&self, stream: &StreamId) -> Result<StreamMetadata, MetadataError> {
        (**self).stream_metadata(stream).await
    }
    async fn set_stream_metadata(
        &self,
        stream: &StreamId,
        metadata: StreamMetadata,
    ) -> Result<(), MetadataError> {
        (**self).set_stream_metadata(stream, metadata).await
    }
    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<(), DeleteError> {
        (**self).delete_stream(stream, expected, mode).await
    }
}

#[async_trait]
impl<T: SnapshotStore + ?Sized> SnapshotStore for Arc<T> {
    async fn save_snapshot(
        &self,
        stream: &StreamId,
        snapshot: Snapshot,
    ) -> Result<bool, SnapshotError> {
        (**self).save_snapshot(stream, snapshot).await
    }
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        (**self).load_snapshot(stream).await
    }
    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), SnapshotError> {
        (**self).delete_snapshot(stream).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_starts_parse_from_text() {
        assert_eq!(
            SubscribeFrom::parse_first("start"),
            Ok(SubscribeFrom::Start)
        );
        assert_eq!(SubscribeFrom::parse_first("end"), Ok(SubscribeFrom::End));
        assert_eq!(SubscribeFrom::parse_first("0"), Ok(SubscribeFrom::Start));
        assert_eq!(SubscribeFrom::parse_first("00"), Ok(SubscribeFrom::Start));
        assert_eq!(SubscribeFrom::parse_first("5"), Ok(SubscribeFrom::After(4)));
        for bad in ["", "-1", "five", "Start"] {
            assert!(SubscribeFrom::parse_first(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            SubscribeFrom::After(Position(3)).map(Position::value),
            SubscribeFrom::After(3)
        );
    }
}
