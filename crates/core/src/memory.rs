//! [`InMemoryStore`]: the whole contract, in memory. For tests, examples and prototypes; it keeps
//! nothing across restarts and grows with the data (no retention is applied physically).

use std::{
    collections::HashMap,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use async_trait::async_trait;
use uuid::Uuid;

use crate::{
    AllSlice, AppendError, AppendRequest, AppendResult, ChangeNotifier, DeleteError, DeleteMode,
    Direction, EventFilter, EventStore, ExpectedVersion, Limit, LimitExceeded, Limits,
    MetadataError, MultiDecision, Position, ReadAllError, ReadAllOptions, ReadStreamError,
    ReadStreamOptions, RecordedEvent, Revision, Snapshot, SnapshotError, SnapshotStore,
    StorageError, StreamId, StreamMetadata, StreamSlice, StreamView, SubscribeError, SubscribeFrom,
    Subscription, Timestamp, check_append_requests, decide_append_multi, decide_delete, follow_all,
    follow_stream,
};

/// An event store held in memory. Cheap to clone; clones share the data.
#[derive(Clone, Debug)]
pub struct InMemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: RwLock<State>,
    changes: ChangeNotifier,
    limits: Limits,
}

#[derive(Debug, Default)]
struct State {
    log: Vec<RecordedEvent>,
    streams: HashMap<StreamId, StreamEntry>,
    snapshots: HashMap<StreamId, Snapshot>,
}

#[derive(Debug, Default)]
struct StreamEntry {
    /// Position of each revision.
    positions: Vec<Position>,
    ids: HashMap<Uuid, Revision>,
    metadata: StreamMetadata,
    tombstoned: bool,
}

impl StreamEntry {
    fn last_revision(&self) -> Option<Revision> {
        (self.positions.len() as u64).checked_sub(1).map(Revision)
    }
}

/// A stream as [`StreamView`] sees it: the entry (if any) plus the log for lookups.
struct View<'a> {
    entry: Option<&'a StreamEntry>,
    log: &'a [RecordedEvent],
    now: Timestamp,
}

impl View<'_> {
    fn event(&self, revision: Revision) -> Option<&RecordedEvent> {
        let position = self
            .entry?
            .positions
            .get(usize::try_from(revision.0).ok()?)?;
        self.log.get(usize::try_from(position.0).ok()?)
    }

    /// First visible revision and last revision, or `None` when nothing is visible.
    fn visible_range(&self) -> Option<(Revision, Revision)> {
        let entry = self.entry?;
        let last = entry.last_revision()?;
        let first = entry
            .metadata
            .first_visible_revision(last, self.now, |revision| {
                self.event(revision)
                    .map_or(Timestamp::from_unix_micros(i64::MIN), |e| e.recorded_at)
            });
        (first <= last).then_some((first, last))
    }
}

impl StreamView for View<'_> {
    fn is_tombstoned(&self) -> bool {
        self.entry.is_some_and(|entry| entry.tombstoned)
    }
    fn last_revision(&self) -> Option<Revision> {
        self.entry.and_then(StreamEntry::last_revision)
    }
    fn has_visible_events(&self) -> bool {
        self.visible_range().is_some()
    }
    fn revision_of(&self, event_id: &Uuid) -> Option<Revision> {
        self.entry?.ids.get(event_id).copied()
    }
    fn id_at(&self, revision: Revision) -> Option<Uuid> {
        self.event(revision).map(|event| event.id)
    }
}

impl State {
    fn view(&self, stream: &StreamId, now: Timestamp) -> View<'_> {
        View {
            entry: self.streams.get(stream),
            log: &self.log,
            now,
        }
    }
}

impl Default for InMemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryStore {
    /// An empty store with default limits.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// An empty store with the given limits.
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: RwLock::new(State::default()),
                changes: ChangeNotifier::new(),
                limits,
            }),
        }
    }

    // A panic while the lock is held can only come from a bug in this module; the state is
    // still consistent at every await-free step, so a poisoned lock is used as is.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.inner
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.inner
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl EventStore for InMemoryStore {
    fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    async fn append_multi(
        &self,
        requests: Vec<AppendRequest>,
    ) -> Result<Vec<AppendResult>, AppendError> {
        check_append_requests(&self.inner.limits, &requests)?;
        let mut state = self.write();
        let now = Timestamp::now();
        let first_revisions = match decide_append_multi(&requests, |r| state.view(&r.stream, now))?
        {
            MultiDecision::Write(first_revisions) => first_revisions,
            MultiDecision::Replay(last_revisions) => {
                return Ok(requests
                    .iter()
                    .zip(last_revisions)
                    .map(|(request, last_revision)| {
                        let view = state.view(&request.stream, now);
                        let event = view
                            .event(last_revision)
                            .unwrap_or_else(|| unreachable!("a replayed revision is stored"));
                        AppendResult {
                            next_expected_version: last_revision,
                            position: event.position,
                            recorded_at: event.recorded_at,
                        }
                    })
                    .collect());
            }
        };
        let recorded_at = state.log.last().map_or(now, |e| e.recorded_at.max(now));
        let mut results = Vec::with_capacity(requests.len());
        for (request, first_revision) in requests.into_iter().zip(first_revisions) {
            let State { log, streams, .. } = &mut *state;
            let entry = streams.entry(request.stream.clone()).or_default();
            let mut revision = first_revision;
            for event in request.events {
                let position = Position(log.len() as u64);
                entry.positions.push(position);
                entry.ids.insert(event.id, revision);
                log.push(RecordedEvent::new(
                    request.stream.clone(),
                    revision,
                    position,
                    recorded_at,
                    event,
                ));
                revision = revision.next();
            }
            results.push(AppendResult {
                next_expected_version: Revision(revision.0 - 1),
                position: Position(log.len() as u64 - 1),
                recorded_at,
            });
        }
        drop(state);
        self.inner.changes.notify();
        Ok(results)
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadStreamOptions,
    ) -> Result<StreamSlice, ReadStreamError> {
        self.inner.limits.check_read_count(options.limit)?;
        let state = self.read();
        let view = state.view(stream, Timestamp::now());
        if view.is_tombstoned() {
            return Err(ReadStreamError::Deleted {
                stream: stream.clone(),
            });
        }
        let Some((first, last)) = view.visible_range() else {
            return Err(ReadStreamError::NotFound {
                stream: stream.clone(),
            });
        };
        let page = options.page(first, last);
        let events = page
            .revisions
            .clone()
            .filter_map(|r| view.event(Revision(r)).cloned())
            .collect();
        Ok(page.slice(events, last))
    }

    async fn read_all(&self, options: ReadAllOptions) -> Result<AllSlice, ReadAllError> {
        self.inner.limits.check_read_count(options.limit)?;
        let state = self.read();
        let log = &state.log;
        let len = log.len() as u64;
        let mut events = Vec::new();
        let slice = match options.direction {
            Direction::Forwards => {
                let mut cursor = options.from.map_or(0, |p| p.0);
                while cursor < len && events.len() < options.limit {
                    let event = &log[cursor as usize];
                    if options.filter.matches_event(event) {
                        events.push(event.clone());
                    }
                    cursor += 1;
                }
                AllSlice {
                    events,
                    next_position: Position(cursor.max(options.from.map_or(0, |p| p.0))),
                    is_end: cursor >= len,
                }
            }
            Direction::Backwards => {
                // `cursor` is one past the next candidate, so 0 means the start was reached.
                let mut cursor = options.from.map_or(len, |p| p.0.saturating_add(1).min(len));
                while cursor > 0 && events.len() < options.limit {
                    let event = &log[(cursor - 1) as usize];
                    if options.filter.matches_event(event) {
                        events.push(event.clone());
                    }
                    cursor -= 1;
                }
                AllSlice {
                    events,
                    next_position: Position(cursor.saturating_sub(1)),
                    is_end: cursor == 0,
                }
            }
        };
        Ok(slice)
    }

    async fn head_position(&self) -> Result<Option<Position>, StorageError> {
        Ok(self.read().log.last().map(|event| event.position))
    }

    async fn subscribe_to_stream(
        &self,
        stream: &StreamId,
        from: SubscribeFrom<Revision>,
    ) -> Result<Subscription, SubscribeError> {
        let mut changes = self.inner.changes.listen();
        changes.mark_seen();
        let next = {
            let state = self.read();
            let view = state.view(stream, Timestamp::now());
            if view.is_tombstoned() {
                return Err(SubscribeError::Deleted {
                    stream: stream.clone(),
                });
            }
            from.first_revision(view.last_revision())
        };
        Ok(follow_stream(self.clone(), changes, stream.clone(), next))
    }

    async fn subscribe_to_all(
        &self,
        from: SubscribeFrom<Position>,
        filter: EventFilter,
    ) -> Result<Subscription, SubscribeError> {
        let mut changes = self.inner.changes.listen();
        changes.mark_seen();
        let next = from.first_position(Position(self.read().log.len() as u64));
        Ok(follow_all(self.clone(), changes, next, filter))
    }

    async fn stream_metadata(&self, stream: &StreamId) -> Result<StreamMetadata, MetadataError> {
        let state = self.read();
        match state.streams.get(stream) {
            Some(entry) if entry.tombstoned => Err(MetadataError::Deleted {
                stream: stream.clone(),
            }),
            Some(entry) => Ok(entry.metadata.clone()),
            None => Ok(StreamMetadata::default()),
        }
    }

    async fn set_stream_metadata(
        &self,
        stream: &StreamId,
        metadata: StreamMetadata,
    ) -> Result<(), MetadataError> {
        metadata.validate()?;
        {
            let mut state = self.write();
            let entry = state.streams.entry(stream.clone()).or_default();
            if entry.tombstoned {
                return Err(MetadataError::Deleted {
                    stream: stream.clone(),
                });
            }
            entry.metadata = metadata;
        }
        self.inner.changes.notify();
        Ok(())
    }

    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<(), DeleteError> {
        {
            let mut state = self.write();
            let last = decide_delete(
                stream,
                expected,
                mode,
                &state.view(stream, Timestamp::now()),
            )?;
            let entry = state.streams.entry(stream.clone()).or_default();
            match mode {
                DeleteMode::Soft => {
                    entry.metadata.truncate_before = last.map(Revision::next);
                }
                DeleteMode::Tombstone => entry.tombstoned = true,
            }
            state.snapshots.remove(stream);
        }
        self.inner.changes.notify();
        Ok(())
    }
}

#[async_trait]
impl SnapshotStore for InMemoryStore {
    async fn save_snapshot(
        &self,
        stream: &StreamId,
        snapshot: Snapshot,
    ) -> Result<bool, SnapshotError> {
        LimitExceeded::check(
            Limit::EventSizeBytes,
            self.inner.limits.event_size_bytes_max,
            snapshot.state.len(),
        )?;
        let mut state = self.write();
        if state.streams.get(stream).is_some_and(|e| e.tombstoned) {
            return Err(SnapshotError::Deleted {
                stream: stream.clone(),
            });
        }
        match state.snapshots.get(stream) {
            Some(stored) if stored.revision > snapshot.revision => Ok(false),
            _ => {
                state.snapshots.insert(stream.clone(), snapshot);
                Ok(true)
            }
        }
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        Ok(self.read().snapshots.get(stream).cloned())
    }

    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), SnapshotError> {
        self.write().snapshots.remove(stream);
        Ok(())
    }
}
