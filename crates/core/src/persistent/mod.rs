//! Persistent subscriptions: competing consumers on the store, hosted by the store's process.
//!
//! A **group** reads one source (`$all` through a filter, or one stream) from its durable
//! checkpoint and hands each event to one of the consumers connected to it. A consumer
//! settles every delivery: **ack** (done), **nack** with [`NackAction::Retry`] (deliver again,
//! to any consumer), [`NackAction::Park`] (move it to the group's dead-letter stream now) or
//! [`NackAction::Skip`] (done without handling). A delivery not settled within
//! [`GroupSettings::message_timeout_ms`] is retried, and so are a disconnected consumer's
//! deliveries; after [`GroupSettings::retries_max`] retries an event is **parked**. Parked
//! events are replayed on request ([`PersistentSubscriptions::replay_parked`]), as new
//! deliveries, in pages that never hold more than the group's buffer.
//!
//! Two ways of sharing the work ([`ConsumerStrategy`]):
//! - `RoundRobin`: each event to the next consumer with room; streams interleave freely.
//! - `Pinned`: a consumer group partitioned by a hash of the stream id (rendezvous hashing
//!   over the connected consumers, so a join or leave moves only the streams it must). One
//!   stream's events go to one consumer, one at a time and in stream order, retries
//!   included; streams proceed in parallel. When the members change, a stream moves only
//!   after its in-flight event is settled or timed out, so no two members ever hold events
//!   of one stream at once, and a crashed member's streams pass to the others.
//!
//! State lives in the event store itself, so it is as durable as the backend and needs no
//! other storage: the registry of groups in the stream [`REGISTRY_STREAM`], each group's
//! checkpoints in `factline.checkpoint-{group}` and its parked events in
//! `factline.parked-{group}`. Streams of categories starting with `factline.` are the
//! store's own: groups never deliver them.
//!
//! Delivery is at least once. After a restart a group resumes from its last saved
//! checkpoint, which also lists the events above it already settled, so only events whose
//! outcome was not yet saved are delivered again; an event parked after the last save is
//! found in the parked stream and not parked twice. One process hosts a store's groups
//! (the `factline serve` of that store); two hosting the same group would both deliver.
//!
//! Metrics, labelled `group`: counters `factline_persistent_delivered_total`,
//! `factline_persistent_acked_total`, `factline_persistent_retried_total`,
//! `factline_persistent_timed_out_total`, `factline_persistent_parked_total`,
//! `factline_persistent_replayed_total`; gauges `factline_persistent_in_flight`,
//! `factline_persistent_buffered_events`, `factline_persistent_consumers`.

mod actor;

use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::{
    EventData, EventFilter, EventStore, ExpectedVersion, Position, ReadStreamError,
    ReadStreamOptions, RecordedEvent, Revision, StorageError, StreamId, category_of,
};

/// The stream that records which groups exist and their settings.
pub const REGISTRY_STREAM: &str = "factline.registry-persistent-subscriptions";
/// Longest group name, in bytes.
pub const GROUP_NAME_BYTES_MAX: usize = 100;
/// Most groups one store hosts.
pub const GROUPS_MAX: usize = 1_000;
/// Most consumers connected to one group at once.
pub const CONSUMERS_PER_GROUP_MAX: usize = 1_000;
/// Highest [`GroupSettings::buffer_events_max`].
pub const BUFFER_EVENTS_CEILING: u32 = 100_000;
/// Highest [`GroupSettings::in_flight_per_consumer_max`].
pub const IN_FLIGHT_PER_CONSUMER_CEILING: u32 = 10_000;
/// Highest [`GroupSettings::retries_max`].
pub const RETRIES_CEILING: u32 = 1_000;
/// Shortest and longest [`GroupSettings::message_timeout_ms`].
pub const MESSAGE_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u64> = 10..=86_400_000;
/// Most deliveries one ack or nack settles.
pub const SETTLE_IDS_MAX: usize = 10_000;

const INTERNAL_CATEGORY_PREFIX: &str = "factline.";

/// True for the streams the store keeps for itself (category `factline.…`); groups skip them.
pub fn is_internal_stream(stream: &str) -> bool {
    category_of(stream).starts_with(INTERNAL_CATEGORY_PREFIX)
}

/// What a group reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PersistentSource {
    /// `$all` through a filter; the group's checkpoint is a position.
    All {
        /// Which streams and types.
        #[serde(default)]
        filter: EventFilter,
    },
    /// One stream; the group's checkpoint is a revision.
    Stream {
        /// The stream.
        stream: StreamId,
    },
}

impl PersistentSource {
    /// The source's sequence number of `event`: its position in `$all`, or its revision.
    fn sequence_of(&self, event: &RecordedEvent) -> u64 {
        match self {
            Self::All { .. } => event.position.0,
            Self::Stream { .. } => event.revision.0,
        }
    }
}

/// Where a new group starts. `End` is resolved when the group is created (to the source's
/// last event then), so a restart never skips what was appended in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupStart {
    /// From the source's first event.
    Start,
    /// After the source's last event at creation.
    End,
    /// After this position (source `$all`) or revision (source stream).
    After(u64),
}

/// How a group shares events among its consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsumerStrategy {
    /// Each event to the next consumer with room.
    #[default]
    RoundRobin,
    /// Streams partitioned among consumers by a hash of the stream id; one stream's events in
    /// order, one at a time.
    Pinned,
}

/// A group's settings. Every number has a ceiling ([`GroupSettings::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GroupSettings {
    /// What it reads.
    pub source: PersistentSource,
    /// Where it starts.
    pub start: GroupStart,
    /// How consumers share the work.
    #[serde(default)]
    pub strategy: ConsumerStrategy,
    /// Retries before an event is parked (0: park on the first failure). Default 10.
    #[serde(default = "defaults::retries_max")]
    pub retries_max: u32,
    /// How long a consumer may hold a delivery before it is retried. Default 30 s.
    #[serde(default = "defaults::message_timeout_ms")]
    pub message_timeout_ms: u64,
    /// Deliveries one consumer holds unsettled at most. Default 10.
    #[serde(default = "defaults::in_flight_per_consumer_max")]
    pub in_flight_per_consumer_max: u32,
    /// Events the group holds in memory at most (read ahead, in flight, or settled above the
    /// checkpoint), and parked events one replay page holds. Default 500.
    #[serde(default = "defaults::buffer_events_max")]
    pub buffer_events_max: u32,
    /// Save the checkpoint after this many settled events (and at least every second while
    /// any settled). Default 100.
    #[serde(default = "defaults::checkpoint_after_events")]
    pub checkpoint_after_events: u32,
}

mod defaults {
    pub(super) fn retries_max() -> u32 {
        10
    }
    pub(super) fn message_timeout_ms() -> u64 {
        30_000
    }
    pub(super) fn in_flight_per_consumer_max() -> u32 {
        10
    }
    pub(super) fn buffer_events_max() -> u32 {
        500
    }
    pub(super) fn checkpoint_after_events() -> u32 {
        100
    }
}

impl GroupSettings {
    /// Defaults for a group reading `source` from `start`.
    pub fn new(source: PersistentSource, start: GroupStart) -> Self {
        Self {
            source,
            start,
            strategy: ConsumerStrategy::default(),
            retries_max: defaults::retries_max(),
            message_timeout_ms: defaults::message_timeout_ms(),
            in_flight_per_consumer_max: defaults::in_flight_per_consumer_max(),
            buffer_events_max: defaults::buffer_events_max(),
            checkpoint_after_events: defaults::checkpoint_after_events(),
        }
    }

    /// A group over `$all` through `filter`, from the first event.
    pub fn all(filter: EventFilter) -> Self {
        Self::new(PersistentSource::All { filter }, GroupStart::Start)
    }

    /// A group over one stream, from its first event.
    pub fn stream(stream: StreamId) -> Self {
        Self::new(PersistentSource::Stream { stream }, GroupStart::Start)
    }

    /// Sets [`GroupSettings::start`].
    #[must_use]
    pub fn start(mut self, start: GroupStart) -> Self {
        self.start = start;
        self
    }

    /// Sets [`GroupSettings::strategy`].
    #[must_use]
    pub fn strategy(mut self, strategy: ConsumerStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Sets [`GroupSettings::retries_max`].
    #[must_use]
    pub fn retries_max(mut self, retries: u32) -> Self {
        self.retries_max = retries;
        self
    }

    /// Sets [`GroupSettings::message_timeout_ms`].
    #[must_use]
    pub fn message_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.message_timeout_ms = timeout_ms;
        self
    }

    /// Sets [`GroupSettings::in_flight_per_consumer_max`].
    #[must_use]
    pub fn in_flight_per_consumer_max(mut self, deliveries: u32) -> Self {
        self.in_flight_per_consumer_max = deliveries;
        self
    }

    /// Sets [`GroupSettings::buffer_events_max`].
    #[must_use]
    pub fn buffer_events_max(mut self, events: u32) -> Self {
        self.buffer_events_max = events;
        self
    }

    /// Sets [`GroupSettings::checkpoint_after_events`].
    #[must_use]
    pub fn checkpoint_after_events(mut self, events: u32) -> Self {
        self.checkpoint_after_events = events;
        self
    }

    /// Checks every number against its range; the error names the field and the range.
    pub fn validate(&self) -> Result<(), GroupError> {
        let invalid = |field: &'static str, reason: String| {
            Err(GroupError::InvalidSettings { field, reason })
        };
        if self.retries_max > RETRIES_CEILING {
            return invalid("retries_max", format!("must be at most {RETRIES_CEILING}"));
        }
        if !MESSAGE_TIMEOUT_MS_RANGE.contains(&self.message_timeout_ms) {
            return invalid(
                "message_timeout_ms",
                format!(
                    "must be in {}..={}",
                    MESSAGE_TIMEOUT_MS_RANGE.start(),
                    MESSAGE_TIMEOUT_MS_RANGE.end()
                ),
            );
        }
        if !(1..=IN_FLIGHT_PER_CONSUMER_CEILING).contains(&self.in_flight_per_consumer_max) {
            return invalid(
                "in_flight_per_consumer_max",
                format!("must be in 1..={IN_FLIGHT_PER_CONSUMER_CEILING}"),
            );
        }
        if !(1..=BUFFER_EVENTS_CEILING).contains(&self.buffer_events_max) {
            return invalid(
                "buffer_events_max",
                format!("must be in 1..={BUFFER_EVENTS_CEILING}"),
            );
        }
        if !(1..=BUFFER_EVENTS_CEILING).contains(&self.checkpoint_after_events) {
            return invalid(
                "checkpoint_after_events",
                format!("must be in 1..={BUFFER_EVENTS_CEILING}"),
            );
        }
        if let PersistentSource::Stream { stream } = &self.source
            && is_internal_stream(stream.as_str())
        {
            return invalid(
                "source",
                format!("stream {stream} is one of the store's own (category factline.…)"),
            );
        }
        Ok(())
    }
}

/// Checks a group name: 1..=[`GROUP_NAME_BYTES_MAX`] bytes that make a valid stream id
/// suffix (no control characters, not starting with `$`).
pub fn check_group_name(group: &str) -> Result<(), GroupError> {
    let valid = !group.is_empty()
        && group.len() <= GROUP_NAME_BYTES_MAX
        && StreamId::new(format!("factline.parked-{group}")).is_ok();
    if valid {
        Ok(())
    } else {
        Err(GroupError::InvalidGroupName {
            group: group.to_owned(),
            max: GROUP_NAME_BYTES_MAX,
        })
    }
}

/// Why managing a group failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// The name is empty, too long or not usable in a stream id.
    #[error("group name {group:?} must have 1..={max} bytes, no control characters")]
    InvalidGroupName {
        /// The name given.
        group: String,
        /// The length limit in bytes.
        max: usize,
    },
    /// A setting is out of its range.
    #[error("group setting {field} {reason}")]
    InvalidSettings {
        /// The setting.
        field: &'static str,
        /// Its range.
        reason: String,
    },
    /// A group of that name exists already.
    #[error("persistent subscription group {group} exists already")]
    GroupExists {
        /// The name.
        group: String,
    },
    /// No group of that name.
    #[error("no persistent subscription group {group}")]
    GroupNotFound {
        /// The name.
        group: String,
    },
    /// The store hosts [`GROUPS_MAX`] groups already.
    #[error("the store hosts {max} persistent subscription groups already (the limit)")]
    TooManyGroups {
        /// The limit.
        max: usize,
    },
    /// The group has [`CONSUMERS_PER_GROUP_MAX`] consumers already.
    #[error("group {group} has {max} consumers already (the limit)")]
    TooManyConsumers {
        /// The group.
        group: String,
        /// The limit.
        max: usize,
    },
    /// The subscriptions were shut down, or the group stopped.
    #[error("persistent subscriptions are shut down")]
    ShutDown,
    /// A stored registry or checkpoint event does not decode.
    #[error("stream {stream} holds an event factline cannot read: {reason}")]
    Corrupt {
        /// The stream.
        stream: String,
        /// What is wrong.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why settling deliveries failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettleError {
    /// The group stopped (deleted, updated or shut down); its deliveries are retried.
    #[error("the group stopped; unsettled deliveries will be delivered again")]
    GroupStopped,
    /// No group of that name.
    #[error("no persistent subscription group {group}")]
    GroupNotFound {
        /// The name.
        group: String,
    },
    /// Too many ids in one call.
    #[error("{given} delivery ids in one call; at most {max}")]
    TooManyIds {
        /// Ids given.
        given: usize,
        /// The limit, [`SETTLE_IDS_MAX`].
        max: usize,
    },
}

/// Identifies one delivery of one event to one consumer (a retry is a new delivery).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeliveryId(pub u64);

impl std::fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Identifies a consumer within its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConsumerId(pub u64);

/// An event handed to a consumer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Delivery {
    /// Settle it with this.
    pub id: DeliveryId,
    /// The event.
    pub event: RecordedEvent,
    /// Earlier deliveries of this event that failed (nack, timeout, disconnect).
    pub retry_count: u32,
    /// True when it comes from a replay of the parked events.
    pub replayed: bool,
}

/// What a nack asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NackAction {
    /// Deliver it again (counts as a retry; past the limit it is parked).
    Retry,
    /// Park it in the dead-letter stream now.
    Park,
    /// Treat it as done without handling it.
    Skip,
}

/// What an ack or nack settled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Settled {
    /// Deliveries settled by this call.
    pub settled: usize,
    /// Ids that were not this consumer's open deliveries (already settled, timed out and
    /// handed on, or never issued); nothing happened to them.
    pub unknown: Vec<DeliveryId>,
}

/// The parked-event record written to a group's dead-letter stream (event type
/// [`EVENT_PARKED`]); the event itself stays where it is and a replay reads it from there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ParkedEvent {
    /// The group.
    pub group: String,
    /// The event's stream.
    pub stream: StreamId,
    /// Its revision.
    pub revision: Revision,
    /// Its position.
    pub position: Position,
    /// Its id.
    pub event_id: uuid::Uuid,
    /// Its type.
    pub event_type: String,
    /// Its sequence number in the group's source (position or revision).
    pub sequence: u64,
    /// Failed deliveries before it was parked.
    pub retry_count: u32,
    /// Why it was parked.
    pub reason: String,
}

/// The event type of the records in a dead-letter stream.
pub const EVENT_PARKED: &str = "EventParked";

/// One connected consumer, as [`GroupInfo`] shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ConsumerInfo {
    /// Its id.
    pub id: ConsumerId,
    /// The name it gave.
    pub name: String,
    /// Deliveries it holds unsettled.
    pub in_flight: usize,
    /// Deliveries handed to it since it connected.
    pub delivered: u64,
}

/// A group's state and counters (counters since the group was opened in this process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupInfo {
    /// The name.
    pub group: String,
    /// The settings.
    pub settings: GroupSettings,
    /// The last source sequence (position or revision) up to which every event is settled.
    pub checkpoint: Option<u64>,
    /// The same, as last saved.
    pub checkpoint_saved: Option<u64>,
    /// The last source sequence read.
    pub last_read: Option<u64>,
    /// Events read and waiting for a consumer.
    pub ready: usize,
    /// Deliveries unsettled.
    pub in_flight: usize,
    /// Events held in memory (the buffer's fill).
    pub buffered: usize,
    /// The connected consumers.
    pub consumers: Vec<ConsumerInfo>,
    /// Parked events not yet replayed (parked stream head minus its replayed part).
    pub parked_waiting: u64,
    /// Parked events a running replay has still to hand out.
    pub replay_remaining: u64,
    /// Deliveries made.
    pub delivered_total: u64,
    /// Acks.
    pub acked_total: u64,
    /// Retries (nack, timeout, disconnect).
    pub retried_total: u64,
    /// Timeouts.
    pub timed_out_total: u64,
    /// Events parked.
    pub parked_total: u64,
    /// Events skipped by a nack.
    pub skipped_total: u64,
    /// The last failure reading the source or writing the group's streams, if any.
    pub last_error: Option<String>,
}

/// How a consumer connects.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// A name shown in [`GroupInfo`] (e.g. host and process).
    pub name: String,
    /// Fewer in-flight deliveries than the group's [`GroupSettings::in_flight_per_consumer_max`].
    pub in_flight_max: Option<u32>,
}

impl ConnectOptions {
    /// Options naming the consumer.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            in_flight_max: None,
        }
    }

    /// Sets [`ConnectOptions::in_flight_max`].
    #[must_use]
    pub fn in_flight_max(mut self, deliveries: u32) -> Self {
        self.in_flight_max = Some(deliveries);
        self
    }
}

/// A consumer connected to a group. Dropping it disconnects: its unsettled deliveries are
/// retried.
#[derive(Debug)]
pub struct PersistentConsumer {
    group: String,
    id: ConsumerId,
    deliveries: mpsc::Receiver<Delivery>,
    commands: mpsc::Sender<actor::Command>,
}

impl PersistentConsumer {
    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// This consumer's id in the group.
    pub fn id(&self) -> ConsumerId {
        self.id
    }

    /// The next delivery; `None` once the group stopped (deleted, updated or shut down).
    pub async fn next(&mut self) -> Option<Delivery> {
        self.deliveries.recv().await
    }

    /// The next delivery if one is waiting, without waiting.
    pub fn try_next(&mut self) -> Option<Delivery> {
        self.deliveries.try_recv().ok()
    }

    /// Acknowledges deliveries: their events are done.
    pub async fn ack(&self, ids: &[DeliveryId]) -> Result<Settled, SettleError> {
        self.settle(ids, None).await
    }

    /// Refuses deliveries; `reason` goes to the log and, when parked, to the parked record.
    pub async fn nack(
        &self,
        ids: &[DeliveryId],
        action: NackAction,
        reason: &str,
    ) -> Result<Settled, SettleError> {
        self.settle(ids, Some((action, reason.to_owned()))).await
    }

    async fn settle(
        &self,
        ids: &[DeliveryId],
        nack: Option<(NackAction, String)>,
    ) -> Result<Settled, SettleError> {
        settle_through(&self.commands, self.id, ids, nack).await
    }
}

async fn settle_through(
    commands: &mpsc::Sender<actor::Command>,
    consumer: ConsumerId,
    ids: &[DeliveryId],
    nack: Option<(NackAction, String)>,
) -> Result<Settled, SettleError> {
    if ids.len() > SETTLE_IDS_MAX {
        return Err(SettleError::TooManyIds {
            given: ids.len(),
            max: SETTLE_IDS_MAX,
        });
    }
    let (reply, answer) = oneshot::channel();
    commands
        .send(actor::Command::Settle {
            consumer,
            ids: ids.to_vec(),
            nack,
            reply,
        })
        .await
        .map_err(|_| SettleError::GroupStopped)?;
    answer.await.map_err(|_| SettleError::GroupStopped)
}

impl Drop for PersistentConsumer {
    fn drop(&mut self) {
        // When the queue is full the group notices the closed channel on its next sweep.
        let _ = self
            .commands
            .try_send(actor::Command::Disconnect { consumer: self.id });
    }
}

/// The registry's event types.
const GROUP_CREATED: &str = "PersistentSubscriptionCreated";
const GROUP_UPDATED: &str = "PersistentSubscriptionUpdated";
const GROUP_DELETED: &str = "PersistentSubscriptionDeleted";

#[derive(Debug, Serialize, Deserialize)]
struct RegistryEntry {
    group: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    settings: Option<GroupSettings>,
}

struct GroupHandle {
    settings: GroupSettings,
    commands: mpsc::Sender<actor::Command>,
    task: tokio::task::JoinHandle<()>,
}

struct Registry {
    groups: BTreeMap<String, GroupHandle>,
    /// The registry stream's last revision.
    last_revision: Option<Revision>,
    shut_down: bool,
}

/// The persistent subscription groups of one store. Cheap to clone.
#[derive(Clone)]
pub struct PersistentSubscriptions {
    store: Arc<dyn EventStore>,
    registry: Arc<Mutex<Registry>>,
}

impl std::fmt::Debug for PersistentSubscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentSubscriptions")
            .finish_non_exhaustive()
    }
}

impl PersistentSubscriptions {
    /// Opens the groups recorded in `store` and starts each (they deliver once consumers
    /// connect). Needs a Tokio runtime.
    pub async fn open(store: Arc<dyn EventStore>) -> Result<Self, GroupError> {
        let registry_stream = registry_stream();
        let mut settings_by_group: BTreeMap<String, GroupSettings> = BTreeMap::new();
        let mut last_revision = None;
        let mut from = Revision::FIRST;
        loop {
            let options = ReadStreamOptions::forwards().from(from).limit(500);
            let slice = match store.read_stream(&registry_stream, options).await {
                Ok(slice) => slice,
                Err(ReadStreamError::NotFound { .. }) => break,
                Err(ReadStreamError::Storage(error)) => return Err(error.into()),
                Err(other) => return Err(StorageError::backend(other).into()),
            };
            last_revision = Some(slice.last_revision);
            for event in &slice.events {
                let entry: RegistryEntry =
                    event.data_json().map_err(|error| GroupError::Corrupt {
                        stream: REGISTRY_STREAM.to_owned(),
                        reason: format!("revision {}: {error}", event.revision.0),
                    })?;
                check_group_name(&entry.group).map_err(|error| GroupError::Corrupt {
                    stream: REGISTRY_STREAM.to_owned(),
                    reason: format!("revision {}: {error}", event.revision.0),
                })?;
                match (event.event_type.as_str(), entry.settings) {
                    (GROUP_CREATED | GROUP_UPDATED, Some(settings)) => {
                        settings_by_group.insert(entry.group, settings);
                    }
                    (GROUP_DELETED, _) => {
                        settings_by_group.remove(&entry.group);
                    }
                    (other, _) => {
                        return Err(GroupError::Corrupt {
                            stream: REGISTRY_STREAM.to_owned(),
                            reason: format!(
                                "revision {}: unexpected event {other}",
                                event.revision.0
                            ),
                        });
                    }
                }
            }
            if slice.is_end {
                break;
            }
            from = slice.next_revision;
        }
        let mut groups = BTreeMap::new();
        for (group, settings) in settings_by_group {
            let handle = actor::start(Arc::clone(&store), group.clone(), settings);
            groups.insert(group, handle);
        }
        Ok(Self {
            store,
            registry: Arc::new(Mutex::new(Registry {
                groups,
                last_revision,
                shut_down: false,
            })),
        })
    }

    /// Creates a group and starts it. `GroupStart::End` is resolved now.
    pub async fn create(&self, group: &str, mut settings: GroupSettings) -> Result<(), GroupError> {
        check_group_name(group)?;
        settings.validate()?;
        let mut registry = self.registry.lock().await;
        if registry.shut_down {
            return Err(GroupError::ShutDown);
        }
        if registry.groups.contains_key(group) {
            return Err(GroupError::GroupExists {
                group: group.to_owned(),
            });
        }
        if registry.groups.len() >= GROUPS_MAX {
            return Err(GroupError::TooManyGroups { max: GROUPS_MAX });
        }
        if settings.start == GroupStart::End {
            settings.start = self.resolve_end(&settings.source).await?;
        }
        // A group of this name deleted earlier leaves hidden streams: start from nothing.
        actor::forget_state(self.store.as_ref(), group).await?;
        self.record(&mut registry, GROUP_CREATED, group, Some(&settings))
            .await?;
        let handle = actor::start(Arc::clone(&self.store), group.to_owned(), settings);
        registry.groups.insert(group.to_owned(), handle);
        Ok(())
    }

    /// Changes a group's settings (the source cannot change: delete and create for that).
    /// The group stops, saving its checkpoint, and starts again with the new settings; its
    /// consumers are disconnected (their `next` returns `None`) and must connect again.
    pub async fn update(&self, group: &str, settings: GroupSettings) -> Result<(), GroupError> {
        settings.validate()?;
        let mut registry = self.registry.lock().await;
        if registry.shut_down {
            return Err(GroupError::ShutDown);
        }
        let Some(current) = registry.groups.get(group) else {
            return Err(GroupError::GroupNotFound {
                group: group.to_owned(),
            });
        };
        if current.settings.source != settings.source {
            return Err(GroupError::InvalidSettings {
                field: "source",
                reason: "cannot change; delete the group and create it again".to_owned(),
            });
        }
        let previous = current.settings.clone();
        let mut settings = settings;
        settings.start = previous.start;
        if let Some(handle) = registry.groups.remove(group) {
            stop(handle).await;
        }
        let recorded = self
            .record(&mut registry, GROUP_UPDATED, group, Some(&settings))
            .await;
        // Not recorded: run on as before.
        let started = if recorded.is_ok() { settings } else { previous };
        let handle = actor::start(Arc::clone(&self.store), group.to_owned(), started);
        registry.groups.insert(group.to_owned(), handle);
        recorded
    }

    /// Deletes a group: it stops, its consumers are disconnected, and its checkpoint and
    /// parked streams are soft-deleted (a group created later under the name starts afresh).
    pub async fn delete(&self, group: &str) -> Result<(), GroupError> {
        let mut registry = self.registry.lock().await;
        if registry.shut_down {
            return Err(GroupError::ShutDown);
        }
        let Some(handle) = registry.groups.remove(group) else {
            return Err(GroupError::GroupNotFound {
                group: group.to_owned(),
            });
        };
        let settings = handle.settings.clone();
        stop(handle).await;
        if let Err(error) = self.record(&mut registry, GROUP_DELETED, group, None).await {
            let handle = actor::start(Arc::clone(&self.store), group.to_owned(), settings);
            registry.groups.insert(group.to_owned(), handle);
            return Err(error);
        }
        actor::forget_state(self.store.as_ref(), group).await
    }

    /// The groups, with their state.
    pub async fn list(&self) -> Result<Vec<GroupInfo>, GroupError> {
        let senders: Vec<_> = {
            let registry = self.registry.lock().await;
            registry
                .groups
                .values()
                .map(|handle| handle.commands.clone())
                .collect()
        };
        let mut infos = Vec::with_capacity(senders.len());
        for sender in senders {
            // A group stopping meanwhile is left out.
            if let Ok(info) = info_from(&sender).await {
                infos.push(info);
            }
        }
        Ok(infos)
    }

    /// One group's state.
    pub async fn info(&self, group: &str) -> Result<GroupInfo, GroupError> {
        let sender = self.sender(group).await?;
        info_from(&sender).await
    }

    /// Connects a consumer to `group`.
    pub async fn connect(
        &self,
        group: &str,
        options: ConnectOptions,
    ) -> Result<PersistentConsumer, GroupError> {
        let sender = self.sender(group).await?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(actor::Command::Connect {
                name: options.name,
                in_flight_max: options.in_flight_max,
                reply,
            })
            .await
            .map_err(|_| GroupError::ShutDown)?;
        let (id, deliveries) = answer.await.map_err(|_| GroupError::ShutDown)??;
        Ok(PersistentConsumer {
            group: group.to_owned(),
            id,
            deliveries,
            commands: sender,
        })
    }

    /// Replays the group's parked events as new deliveries: those parked until now, or the
    /// first `max_events` of them. Returns how many are to be replayed. Replayed events leave
    /// the parked stream (it is truncated past them) once settled; one that fails again past
    /// the retry limit is parked again, as a new record.
    pub async fn replay_parked(
        &self,
        group: &str,
        max_events: Option<u64>,
    ) -> Result<u64, GroupError> {
        let sender = self.sender(group).await?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(actor::Command::ReplayParked { max_events, reply })
            .await
            .map_err(|_| GroupError::ShutDown)?;
        answer.await.map_err(|_| GroupError::ShutDown)
    }

    /// Stops every group, saving its checkpoint; later calls fail with
    /// [`GroupError::ShutDown`].
    pub async fn shutdown(&self) {
        let mut registry = self.registry.lock().await;
        registry.shut_down = true;
        let groups = std::mem::take(&mut registry.groups);
        for handle in groups.into_values() {
            stop(handle).await;
        }
    }

    /// Settles deliveries of consumer `consumer` of `group` on its behalf (for a consumer
    /// whose [`PersistentConsumer`] is held elsewhere, e.g. an HTTP stream): `nack` `None`
    /// acks. Ids that are not that consumer's open deliveries are reported, not settled.
    pub async fn settle(
        &self,
        group: &str,
        consumer: ConsumerId,
        ids: &[DeliveryId],
        nack: Option<(NackAction, &str)>,
    ) -> Result<Settled, SettleError> {
        let sender = self
            .sender(group)
            .await
            .map_err(|_| SettleError::GroupNotFound {
                group: group.to_owned(),
            })?;
        let nack = nack.map(|(action, reason)| (action, reason.to_owned()));
        settle_through(&sender, consumer, ids, nack).await
    }

    /// Stops every group at once, saving nothing: what a crash leaves (for crash tests).
    #[cfg(any(test, feature = "testkit"))]
    pub async fn crash(&self) {
        let mut registry = self.registry.lock().await;
        registry.shut_down = true;
        for handle in std::mem::take(&mut registry.groups).into_values() {
            handle.task.abort();
            let _ = handle.task.await;
        }
    }

    async fn sender(&self, group: &str) -> Result<mpsc::Sender<actor::Command>, GroupError> {
        let registry = self.registry.lock().await;
        if registry.shut_down {
            return Err(GroupError::ShutDown);
        }
        registry
            .groups
            .get(group)
            .map(|handle| handle.commands.clone())
            .ok_or_else(|| GroupError::GroupNotFound {
                group: group.to_owned(),
            })
    }

    async fn resolve_end(&self, source: &PersistentSource) -> Result<GroupStart, GroupError> {
        match source {
            PersistentSource::All { .. } => Ok(match self.store.head_position().await? {
                Some(head) => GroupStart::After(head.0),
                None => GroupStart::Start,
            }),
            PersistentSource::Stream { stream } => {
                let options = ReadStreamOptions::backwards().limit(1);
                match self.store.read_stream(stream, options).await {
                    Ok(slice) => Ok(GroupStart::After(slice.last_revision.0)),
                    Err(ReadStreamError::NotFound { .. }) => Ok(GroupStart::Start),
                    Err(ReadStreamError::Storage(error)) => Err(error.into()),
                    Err(other) => Err(StorageError::backend(other).into()),
                }
            }
        }
    }

    async fn record(
        &self,
        registry: &mut Registry,
        event_type: &str,
        group: &str,
        settings: Option<&GroupSettings>,
    ) -> Result<(), GroupError> {
        let entry = RegistryEntry {
            group: group.to_owned(),
            settings: settings.cloned(),
        };
        let event = EventData::json(event_type, &entry).map_err(StorageError::backend)?;
        let expected = registry
            .last_revision
            .map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
        let written = self
            .store
            .append(&registry_stream(), expected, vec![event])
            .await
            .map_err(StorageError::backend)?;
        registry.last_revision = Some(written.next_expected_version);
        Ok(())
    }
}

fn registry_stream() -> StreamId {
    // A constant that StreamId accepts (checked by a test).
    StreamId::new(REGISTRY_STREAM).unwrap_or_else(|_| unreachable!("valid stream id"))
}

async fn stop(handle: GroupHandle) {
    let (reply, answer) = oneshot::channel();
    if handle
        .commands
        .send(actor::Command::Stop { reply })
        .await
        .is_ok()
    {
        let _ = answer.await;
    }
    let _ = handle.task.await;
}

async fn info_from(sender: &mpsc::Sender<actor::Command>) -> Result<GroupInfo, GroupError> {
    let (reply, answer) = oneshot::channel();
    sender
        .send(actor::Command::Info { reply })
        .await
        .map_err(|_| GroupError::ShutDown)?;
    answer.await.map_err(|_| GroupError::ShutDown)
}
