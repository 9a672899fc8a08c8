//! [`Repository`]: loads aggregates from an event store, runs commands and appends the events.

use std::{fmt, sync::Arc};

use factline_core::{
    AppendError, AppendRequest, AppendResult, EventData, EventStore, ExpectedVersion, Metadata,
    Position, ReadStreamError, ReadStreamOptions, RecordedEvent, Revision, Snapshot, SnapshotStore,
    StorageError, StreamId, StreamState, Timestamp,
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    Aggregate, AggregateIdError, DecodeError, DomainEvent, EncodeError, SnapshotState, Upcasters,
    stream_id_for,
};

/// Most events read in one page while loading, even when the store allows more.
const READ_PAGE_EVENTS_MAX: usize = 1_000;

/// Loads aggregates of type `A` from an [`EventStore`] and runs commands against them.
///
/// Loading reads the aggregate's stream in pages and folds every event into a default state,
/// starting from a snapshot when [snapshots are enabled](Repository::with_snapshots).
/// [`execute`](Repository::execute) loads, decides, and appends with the loaded version as the
/// expected version, so a concurrent writer is detected instead of overwritten.
pub struct Repository<A: Aggregate> {
    events: Arc<dyn EventStore>,
    snapshots: Option<Snapshots<A>>,
    upcasters: Upcasters,
}

/// Snapshot support, with the serde bound of `A` erased into function pointers.
struct Snapshots<A> {
    store: Arc<dyn SnapshotStore>,
    policy: SnapshotPolicy,
    state_version: u32,
    encode: fn(&A) -> Result<Vec<u8>, serde_json::Error>,
    decode: fn(&[u8]) -> Result<A, serde_json::Error>,
}

impl<A> Clone for Snapshots<A> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            policy: self.policy,
            state_version: self.state_version,
            encode: self.encode,
            decode: self.decode,
        }
    }
}

fn encode_state<A: Serialize>(state: &A) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(state)
}

fn decode_state<A: DeserializeOwned>(bytes: &[u8]) -> Result<A, serde_json::Error> {
    serde_json::from_slice(bytes)
}

impl<A: Aggregate> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Self {
            events: Arc::clone(&self.events),
            snapshots: self.snapshots.clone(),
            upcasters: self.upcasters.clone(),
        }
    }
}

impl<A: Aggregate> fmt::Debug for Repository<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("category", &A::CATEGORY)
            .field(
                "snapshot_policy",
                &self.snapshots.as_ref().map(|snapshots| snapshots.policy),
            )
            .finish_non_exhaustive()
    }
}

/// When [`Repository::execute`] saves a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// Save a snapshot once at least this many events were appended since the snapshot the
    /// aggregate was loaded from (or since the start of the stream). 0 never saves one.
    pub every_events: u64,
}

impl SnapshotPolicy {
    /// A snapshot every `events` events.
    pub const fn every(events: u64) -> Self {
        Self {
            every_events: events,
        }
    }

    /// True when a snapshot is due after `events_since_snapshot` events.
    pub const fn is_due(&self, events_since_snapshot: u64) -> bool {
        self.every_events > 0 && events_since_snapshot >= self.every_events
    }
}

/// Options of [`Repository::execute`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExecuteOptions {
    /// How many times to reload and decide again after a concurrent write (default 0: report
    /// [`ExecuteError::Conflict`] on the first one).
    pub conflict_retries_max: u32,
    /// Set as the `correlation_id` metadata of every event.
    pub correlation_id: Option<String>,
    /// Set as the `causation_id` metadata of every event.
    pub causation_id: Option<String>,
    /// Extra metadata for every event. `correlation_id` and `causation_id` above take
    /// precedence over the same keys here; `schema_version` is always set by the event.
    pub metadata: Metadata,
    /// Handle the command at most once for this key (see
    /// [`ExecuteOptions::with_idempotency_key`]).
    pub idempotency_key: Option<String>,
}

impl ExecuteOptions {
    /// No retries and no metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// Retries up to `retries_max` times after a concurrent write.
    #[must_use]
    pub fn with_conflict_retries(mut self, retries_max: u32) -> Self {
        self.conflict_retries_max = retries_max;
        self
    }

    /// Sets the correlation id of every event.
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Sets the causation id of every event.
    #[must_use]
    pub fn with_causation_id(mut self, causation_id: impl Into<String>) -> Self {
        self.causation_id = Some(causation_id.into());
        self
    }

    /// Executes the command at most once for `key` — e.g. the id of the event or message
    /// that caused it, with the handler's name: `"{handler}/{event_id}"`. The first execution
    /// that appends records the key in its own stream (`factline.handled-…`, see
    /// [`handled_stream_for`]) in the same atomic append as the events; a later execution with
    /// the key, or a concurrent one that loses the race, appends nothing and returns
    /// [`Executed::already_handled`]. So a redelivered event is not applied twice, on every
    /// backend, however long after — as long as the key's stream keeps its event: never set
    /// retention on, or delete, the `factline.handled` streams (a hidden record is no record,
    /// and the key would be applied again). A command that decides no events records no key.
    #[must_use]
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Adds one metadata entry to every event.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// The metadata every event starts from.
    fn event_metadata(&self) -> Metadata {
        let mut metadata = self.metadata.clone();
        if let Some(correlation_id) = &self.correlation_id {
            metadata.insert(Metadata::CORRELATION_ID, correlation_id.clone());
        }
        if let Some(causation_id) = &self.causation_id {
            metadata.insert(Metadata::CAUSATION_ID, causation_id.clone());
        }
        metadata
    }
}

/// An aggregate as loaded by [`Repository::load`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Loaded<A> {
    /// The state after every event of the stream.
    pub state: A,
    /// The revision of the last event folded in; `None` for a stream without events.
    pub version: Option<Revision>,
    /// The revision of the snapshot the load started from, if one was used.
    pub snapshot_revision: Option<Revision>,
    /// How many events were read from the store and folded in (after the snapshot, if any).
    pub events_replayed: u64,
}

impl<A: Default> Loaded<A> {
    fn fresh() -> Self {
        Self {
            state: A::default(),
            version: None,
            snapshot_revision: None,
            events_replayed: 0,
        }
    }
}

/// A point in an aggregate's history, for [`Repository::load_as_of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AsOf {
    /// Up to and including the event at this revision.
    Revision(Revision),
    /// Every event recorded at or before this time.
    Time(Timestamp),
}

/// What [`Repository::execute`] did.
#[non_exhaustive]
pub struct Executed<A: Aggregate> {
    /// The state after the new events.
    pub state: A,
    /// The revision of the stream's last event; `None` if the stream has no events (the
    /// command decided nothing on a new stream).
    pub version: Option<Revision>,
    /// The events decided and appended, in order (empty when there was nothing to do).
    pub events: Vec<A::Event>,
    /// The same events as stored.
    pub recorded: Vec<RecordedEvent>,
    /// How many times a concurrent write made the command run again.
    pub conflict_retries: u32,
    /// True when the [idempotency key](ExecuteOptions::with_idempotency_key) was handled
    /// before: nothing was decided or appended (`events` and `recorded` are empty).
    pub already_handled: bool,
}

impl<A: Aggregate> Executed<A> {
    /// Nothing done: the idempotency key was handled before (`loaded` is the state as loaded).
    fn already_handled(loaded: Loaded<A>, conflict_retries: u32) -> Self {
        Self {
            state: loaded.state,
            version: loaded.version,
            events: Vec::new(),
            recorded: Vec::new(),
            conflict_retries,
            already_handled: true,
        }
    }
}

/// Namespace of the UUIDv5 that names an idempotency key's stream.
const HANDLED_NAMESPACE: factline_core::Uuid =
    factline_core::Uuid::from_u128(0x6f1c_2d0a_9b47_4e85_a3d2_5c8e_17f0_b964);

/// The event type of the record of a handled idempotency key.
pub const COMMAND_HANDLED_EVENT_TYPE: &str = "CommandHandled";

/// The stream that records that idempotency key `key` was handled:
/// `factline.handled-{UUIDv5 of the key}` (category `factline.handled`, which persistent
/// subscriptions skip).
pub fn handled_stream_for(key: &str) -> StreamId {
    let id = factline_core::Uuid::new_v5(&HANDLED_NAMESPACE, key.as_bytes()).simple();
    // 16 + 32 ASCII characters: always a valid stream id.
    StreamId::new(format!("factline.handled-{id}"))
        .unwrap_or_else(|_| unreachable!("a short ASCII stream id is valid"))
}

impl<A> fmt::Debug for Executed<A>
where
    A: Aggregate + fmt::Debug,
    A::Event: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executed")
            .field("state", &self.state)
            .field("version", &self.version)
            .field("events", &self.events)
            .field("recorded", &self.recorded)
            .field("conflict_retries", &self.conflict_retries)
            .finish()
    }
}

/// Why [`Repository::load`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The aggregate id does not make a valid stream id.
    #[error("invalid aggregate id: {0}")]
    InvalidId(#[from] AggregateIdError),
    /// The store could not read the stream.
    #[error("reading stream {stream} failed: {source}")]
    Read {
        /// The stream.
        stream: StreamId,
        /// The store's error.
        #[source]
        source: ReadStreamError,
    },
    /// A stored event could not be decoded.
    #[error("event at revision {revision} of stream {stream} could not be decoded: {source}")]
    Decode {
        /// The stream.
        stream: StreamId,
        /// The event's revision.
        revision: Revision,
        /// Why it could not be decoded.
        #[source]
        source: DecodeError,
    },
}

/// Why [`Repository::execute`] appended nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecuteError<E> {
    /// The aggregate refused the command.
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    /// Another writer appended to the stream between load and append, on every attempt.
    #[error(
        "concurrency conflict on stream {stream} after {attempts} attempt(s): expected \
         {expected}, actual {actual}"
    )]
    Conflict {
        /// The stream.
        stream: StreamId,
        /// The expected version of the last attempt.
        expected: ExpectedVersion,
        /// What the stream was at.
        actual: StreamState,
        /// How many appends were tried.
        attempts: u32,
    },
    /// The append failed for another reason than a concurrent write.
    #[error("append failed: {0}")]
    Append(#[source] AppendError),
    /// Loading the aggregate failed.
    #[error("loading the aggregate failed: {0}")]
    Load(#[from] LoadError),
    /// An event could not be encoded.
    #[error("encoding an event failed: {0}")]
    Encode(#[from] EncodeError),
}

impl<E> ExecuteError<E> {
    /// The aggregate's error, if the command was rejected.
    pub fn rejection(&self) -> Option<&E> {
        match self {
            Self::Rejected(error) => Some(error),
            _ => None,
        }
    }
}

impl<A: Aggregate> Repository<A> {
    /// A repository over `store`, without snapshots.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            events: store,
            snapshots: None,
            upcasters: Upcasters::new(),
        }
    }

    /// Reads stored events through `upcasters` (older schema versions into the current one).
    #[must_use]
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.events
    }

    /// Loads aggregate `id`. A stream without visible events is a fresh default state with
    /// version `None`.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, LoadError> {
        let stream = stream_id_for::<A>(id)?;
        self.load_stream(&stream).await
    }

    /// Time travel: aggregate `id` as it was at `as_of` — its events up to a revision, or up to
    /// a recorded time — folded from the first event (snapshots are not used: they hold the
    /// newest state). A point before the first event gives the default state, version `None`.
    pub async fn load_as_of(&self, id: &str, as_of: AsOf) -> Result<Loaded<A>, LoadError> {
        let stream = stream_id_for::<A>(id)?;
        let mut loaded = Loaded::fresh();
        self.catch_up_until(&stream, &mut loaded, Some(as_of))
            .await?;
        Ok(loaded)
    }

    /// Runs `command` against aggregate `id`: loads it, decides, and appends the events with the
    /// loaded version as the expected version. When the decision has no events, nothing is
    /// appended. After a concurrent write the aggregate is brought up to date and the command
    /// decided again, up to [`ExecuteOptions::conflict_retries_max`] times.
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
        options: ExecuteOptions,
    ) -> Result<Executed<A>, ExecuteError<A::Error>> {
        let stream = stream_id_for::<A>(id).map_err(LoadError::from)?;
        let mut loaded = self.load_stream(&stream).await?;
        let metadata = options.event_metadata();
        let handled = options
            .idempotency_key
            .as_deref()
            .map(|key| (key, handled_stream_for(key)));
        let mut conflict_retries = 0;
        loop {
            if let Some((_, handled_stream)) = &handled
                && self.was_handled(handled_stream).await?
            {
                return Ok(Executed::already_handled(loaded, conflict_retries));
            }
            let events = loaded
                .state
                .decide(&command)
                .map_err(ExecuteError::Rejected)?;
            if events.is_empty() {
                return Ok(Executed {
                    state: loaded.state,
                    version: loaded.version,
                    events,
                    recorded: Vec::new(),
                    conflict_retries,
                    already_handled: false,
                });
            }
            let appended = events
                .iter()
                .map(|event| event.to_event_data(metadata.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            let expected = loaded
                .version
                .map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
            let outcome = match &handled {
                None => {
                    self.events
                        .append(&stream, expected, appended.clone())
                        .await
                }
                Some((key, handled_stream)) => {
                    let record = EventData::json(
                        COMMAND_HANDLED_EVENT_TYPE,
                        &serde_json::json!({ "key": key, "stream": stream.as_str() }),
                    )
                    .map_err(|source| {
                        ExecuteError::Encode(EncodeError::Serialize {
                            event_type: COMMAND_HANDLED_EVENT_TYPE,
                            source,
                        })
                    })?
                    .with_all_metadata(metadata.clone());
                    // The key's part first: the store reports the first failing part, so a
                    // concurrent execution that got there first shows as the key's conflict
                    // (already handled), not as the aggregate's.
                    self.events
                        .append_multi(vec![
                            AppendRequest::new(
                                handled_stream.clone(),
                                ExpectedVersion::NoStream,
                                vec![record],
                            ),
                            AppendRequest::new(stream.clone(), expected, appended.clone()),
                        ])
                        .await
                        .and_then(|results| {
                            results.into_iter().nth(1).ok_or_else(|| {
                                AppendError::Storage(StorageError::backend(std::io::Error::other(
                                    "append_multi answered fewer results than parts",
                                )))
                            })
                        })
                }
            };
            match outcome {
                Err(AppendError::WrongExpectedVersion { stream: failed, .. })
                    if handled
                        .as_ref()
                        .is_some_and(|(_, handled_stream)| *handled_stream == failed) =>
                {
                    // Another execution with the key got there first.
                    return Ok(Executed::already_handled(loaded, conflict_retries));
                }
                Ok(result) => {
                    let recorded = recorded_events(&stream, &result, appended)?;
                    let mut state = loaded.state;
                    for event in &events {
                        state.evolve(event);
                    }
                    let version = result.next_expected_version;
                    self.save_snapshot_if_due(&stream, &state, version, loaded.snapshot_revision)
                        .await;
                    return Ok(Executed {
                        state,
                        version: Some(version),
                        events,
                        recorded,
                        conflict_retries,
                        already_handled: false,
                    });
                }
                Err(AppendError::WrongExpectedVersion {
                    expected, actual, ..
                }) => {
                    if conflict_retries >= options.conflict_retries_max {
                        return Err(ExecuteError::Conflict {
                            stream,
                            expected,
                            actual,
                            attempts: conflict_retries + 1,
                        });
                    }
                    conflict_retries += 1;
                    tracing::debug!(
                        stream = %stream,
                        %expected,
                        %actual,
                        retry = conflict_retries,
                        "concurrent write; reloading and deciding again"
                    );
                    self.catch_up(&stream, &mut loaded).await?;
                }
                Err(error) => return Err(ExecuteError::Append(error)),
            }
        }
    }

    /// True when the idempotency key whose stream is `handled_stream` was handled.
    async fn was_handled(&self, handled_stream: &StreamId) -> Result<bool, LoadError> {
        match self
            .events
            .read_stream(handled_stream, ReadStreamOptions::forwards().limit(1))
            .await
        {
            Ok(_) => Ok(true),
            Err(ReadStreamError::NotFound { .. }) => Ok(false),
            Err(source) => Err(LoadError::Read {
                stream: handled_stream.clone(),
                source,
            }),
        }
    }

    async fn load_stream(&self, stream: &StreamId) -> Result<Loaded<A>, LoadError> {
        let mut loaded = match self.load_snapshot(stream).await {
            Some((state, revision)) => Loaded {
                state,
                version: Some(revision),
                snapshot_revision: Some(revision),
                events_replayed: 0,
            },
            None => Loaded::fresh(),
        };
        self.catch_up(stream, &mut loaded).await?;
        Ok(loaded)
    }

    /// Folds the events after `loaded.version` into `loaded`, page by page.
    async fn catch_up(&self, stream: &StreamId, loaded: &mut Loaded<A>) -> Result<(), LoadError> {
        self.catch_up_until(stream, loaded, None).await
    }

    /// [`Repository::catch_up`], stopping before the first event past `until`.
    async fn catch_up_until(
        &self,
        stream: &StreamId,
        loaded: &mut Loaded<A>,
        until: Option<AsOf>,
    ) -> Result<(), LoadError> {
        let page_events = self
            .events
            .limits()
            .read_count_max
            .clamp(1, READ_PAGE_EVENTS_MAX);
        let mut from = loaded.version.map_or(Revision::FIRST, Revision::next);
        loop {
            let options = ReadStreamOptions::forwards().from(from).limit(page_events);
            let slice = match self.events.read_stream(stream, options).await {
                Ok(slice) => slice,
                Err(ReadStreamError::NotFound { .. }) => {
                    // No visible events (never written or soft-deleted): a fresh aggregate.
                    *loaded = Loaded::fresh();
                    return Ok(());
                }
                Err(source) => {
                    return Err(LoadError::Read {
                        stream: stream.clone(),
                        source,
                    });
                }
            };
            for recorded in &slice.events {
                let past = match until {
                    None => false,
                    Some(AsOf::Revision(last)) => recorded.revision > last,
                    Some(AsOf::Time(last)) => recorded.recorded_at > last,
                };
                if past {
                    return Ok(());
                }
                let event = self
                    .upcasters
                    .decode::<A::Event>(recorded)
                    .map_err(|source| LoadError::Decode {
                        stream: stream.clone(),
                        revision: recorded.revision,
                        source,
                    })?;
                loaded.state.evolve(&event);
                loaded.version = Some(recorded.revision);
                loaded.events_replayed += 1;
            }
            if slice.is_end || slice.events.is_empty() {
                return Ok(());
            }
            from = slice.next_revision;
        }
    }

    /// The usable snapshot of `stream`, if any. Every problem is logged and means "no snapshot".
    async fn load_snapshot(&self, stream: &StreamId) -> Option<(A, Revision)> {
        let snapshots = self.snapshots.as_ref()?;
        let snapshot = match snapshots.store.load_snapshot(stream).await {
            Ok(snapshot) => snapshot?,
            Err(error) => {
                tracing::warn!(
                    stream = %stream,
                    %error,
                    "loading the snapshot failed; replaying all events"
                );
                return None;
            }
        };
        if snapshot.state_version != snapshots.state_version {
            tracing::warn!(
                stream = %stream,
                stored_version = snapshot.state_version,
                current_version = snapshots.state_version,
                "ignoring a snapshot of another state version; replaying all events"
            );
            return None;
        }
        match (snapshots.decode)(&snapshot.state) {
            Ok(state) => Some((state, snapshot.revision)),
            Err(error) => {
                tracing::warn!(
                    stream = %stream,
                    revision = %snapshot.revision,
                    %error,
                    "ignoring a snapshot that does not decode; replaying all events"
                );
                None
            }
        }
    }

    /// Saves a snapshot of `state` at `version` when the policy says so. Failures are logged.
    async fn save_snapshot_if_due(
        &self,
        stream: &StreamId,
        state: &A,
        version: Revision,
        snapshot_revision: Option<Revision>,
    ) {
        let Some(snapshots) = &self.snapshots else {
            return;
        };
        let events_before_version = snapshot_revision.map_or(0, |revision| revision.value() + 1);
        let events_since_snapshot = (version.value() + 1).saturating_sub(events_before_version);
        if !snapshots.policy.is_due(events_since_snapshot) {
            return;
        }
        let encoded = match (snapshots.encode)(state) {
            Ok(encoded) => encoded,
            Err(error) => {
                tracing::warn!(stream = %stream, %error, "encoding a snapshot failed; not saved");
                return;
            }
        };
        let snapshot = Snapshot {
            revision: version,
            state_version: snapshots.state_version,
            state: encoded.into(),
            taken_at: Timestamp::now(),
        };
        if let Err(error) = snapshots.store.save_snapshot(stream, snapshot).await {
            tracing::warn!(stream = %stream, %error, "saving a snapshot failed");
        }
    }
}

impl<A: SnapshotState> Repository<A> {
    /// Enables snapshots: loads start from the stored snapshot (when its state version is
    /// [`A::SNAPSHOT_VERSION`](SnapshotState::SNAPSHOT_VERSION) and it decodes) and
    /// [`execute`](Repository::execute) saves one as `policy` says. A snapshot that cannot be
    /// loaded or saved is logged and never fails an operation.
    #[must_use]
    pub fn with_snapshots(mut self, store: Arc<dyn SnapshotStore>, policy: SnapshotPolicy) -> Self {
        self.snapshots = Some(Snapshots {
            store,
            policy,
            state_version: A::SNAPSHOT_VERSION,
            encode: encode_state::<A>,
            decode: decode_state::<A>,
        });
        self
    }
}

/// The recorded form of the events of one append: contiguous revisions and positions ending at
/// the result's.
fn recorded_events<E>(
    stream: &StreamId,
    result: &AppendResult,
    appended: Vec<EventData>,
) -> Result<Vec<RecordedEvent>, ExecuteError<E>> {
    let count = appended.len() as u64;
    let first_of = |last: u64| last.checked_add(1).and_then(|end| end.checked_sub(count));
    let first_revision = first_of(result.next_expected_version.value());
    let first_position = first_of(result.position.value());
    let (Some(first_revision), Some(first_position)) = (first_revision, first_position) else {
        let inconsistency = format!(
            "the store reported revision {} and position {} as the last of an append of {count} \
             events to {stream}",
            result.next_expected_version, result.position
        );
        return Err(ExecuteError::Append(AppendError::Storage(
            StorageError::Backend(inconsistency.into()),
        )));
    };
    Ok(appended
        .into_iter()
        .zip(0u64..)
        .map(|(event, offset)| {
            RecordedEvent::new(
                stream.clone(),
                Revision(first_revision + offset),
                Position(first_position + offset),
                result.recorded_at,
                event,
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_policy_counts_events_since_the_last_snapshot() {
        let policy = SnapshotPolicy::every(3);
        assert!(!policy.is_due(2));
        assert!(policy.is_due(3));
        assert!(policy.is_due(7));
        assert!(!SnapshotPolicy::every(0).is_due(u64::MAX));
    }

    #[test]
    fn execute_options_build_the_event_metadata() {
        let options = ExecuteOptions::new()
            .with_metadata(Metadata::CORRELATION_ID, "overridden")
            .with_metadata("tenant", "acme")
            .with_correlation_id("c-1")
            .with_causation_id("m-7");
        let metadata = options.event_metadata();
        assert_eq!(metadata.correlation_id(), Some("c-1"));
        assert_eq!(metadata.causation_id(), Some("m-7"));
        assert_eq!(metadata.get("tenant"), Some("acme"));
        assert_eq!(metadata.len(), 3);
    }

    #[test]
    fn recorded_events_end_at_the_append_result() {
        let stream = StreamId::new("order-1").unwrap();
        let result = AppendResult {
            next_expected_version: Revision(6),
            position: Position(41),
            recorded_at: Timestamp::from_unix_micros(5),
        };
        let appended = vec![
            EventData::binary("A", vec![]),
            EventData::binary("B", vec![]),
        ];
        let recorded = recorded_events::<()>(&stream, &result, appended).unwrap();
        assert_eq!(recorded[0].revision, Revision(5));
        assert_eq!(recorded[0].position, Position(40));
        assert_eq!(recorded[1].revision, Revision(6));
        assert_eq!(recorded[1].position, Position(41));
        assert_eq!(recorded[1].event_type, "B");
        assert!(recorded.iter().all(|e| e.recorded_at == result.recorded_at));

        let impossible = AppendResult {
            next_expected_version: Revision(0),
            ..result
        };
        let appended = vec![
            EventData::binary("A", vec![]),
            EventData::binary("B", vec![]),
        ];
        assert!(matches!(
            recorded_events::<()>(&stream, &impossible, appended),
            Err(ExecuteError::Append(AppendError::Storage(_)))
        ));
    }
}
