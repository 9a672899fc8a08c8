//! One group's task: it owns every bit of the group's state, so each change is one step of
//! one task and no two outcomes of one delivery can race (the first settle wins; a late ack
//! for a delivery that timed out finds nothing).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    ops::Bound,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, oneshot},
    time::{Instant, MissedTickBehavior},
};
use uuid::Uuid;

use super::{
    CONSUMERS_PER_GROUP_MAX, ConsumerId, ConsumerInfo, ConsumerStrategy, Delivery, DeliveryId,
    EVENT_PARKED, GroupError, GroupHandle, GroupInfo, GroupSettings, GroupStart, NackAction,
    ParkedEvent, PersistentSource, Settled, is_internal_stream,
};
use crate::{
    DeleteError, DeleteMode, EventData, EventStore, ExpectedVersion, MetadataError, Position,
    ReadStreamError, ReadStreamOptions, RecordedEvent, Revision, StorageError, StreamId,
    StreamMetadata, SubscribeFrom, Subscription, SubscriptionError,
};

/// What the group's task is asked to do.
pub(super) enum Command {
    Connect {
        name: String,
        in_flight_max: Option<u32>,
        reply: oneshot::Sender<Result<(ConsumerId, mpsc::Receiver<Delivery>), GroupError>>,
    },
    Disconnect {
        consumer: ConsumerId,
    },
    Settle {
        consumer: ConsumerId,
        ids: Vec<DeliveryId>,
        nack: Option<(NackAction, String)>,
        reply: oneshot::Sender<Settled>,
    },
    ReplayParked {
        max_events: Option<u64>,
        reply: oneshot::Sender<u64>,
    },
    Info {
        reply: oneshot::Sender<GroupInfo>,
    },
    Stop {
        reply: oneshot::Sender<()>,
    },
}

/// Commands queued for one group at most (senders wait beyond it).
const COMMANDS_QUEUED_MAX: usize = 1_024;
/// How often the group sweeps: closed consumers, retries of failed writes, timed checkpoints.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Parked records read per replay page at most.
const REPLAY_PAGE_EVENTS_MAX: usize = 100;
/// Checkpoint records the checkpoint stream keeps visible.
const CHECKPOINTS_KEPT: u64 = 10;
const CHECKPOINTED: &str = "PersistentSubscriptionCheckpointed";
/// Namespace of the ids of parked records (so a retried write of one is idempotent).
const PARKED_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_0b9e_55aa_4d0e_9a51_7c1e_2d3f_4a5b);

/// A saved checkpoint.
#[derive(Debug, Serialize, Deserialize)]
struct Checkpointed {
    /// Every source event up to this sequence is settled.
    after: Option<u64>,
    /// Source events above `after` settled too.
    #[serde(default)]
    settled_above: Vec<u64>,
    /// The parked stream's next revision when saved: records from there on were written
    /// after this checkpoint.
    parked_next: u64,
}

pub(super) fn checkpoint_stream(group: &str) -> Result<StreamId, StorageError> {
    StreamId::new(format!("factline.checkpoint-{group}")).map_err(StorageError::backend)
}

pub(super) fn parked_stream(group: &str) -> Result<StreamId, StorageError> {
    StreamId::new(format!("factline.parked-{group}")).map_err(StorageError::backend)
}

/// Soft-deletes a group's checkpoint and parked streams (nothing to do when never written).
pub(super) async fn forget_state(store: &dyn EventStore, group: &str) -> Result<(), GroupError> {
    for stream in [checkpoint_stream(group)?, parked_stream(group)?] {
        match store
            .delete_stream(&stream, ExpectedVersion::Any, DeleteMode::Soft)
            .await
        {
            Ok(()) | Err(DeleteError::NotFound { .. }) => {}
            Err(DeleteError::Storage(error)) => return Err(error.into()),
            Err(other) => return Err(StorageError::backend(other).into()),
        }
    }
    Ok(())
}

/// Starts a group's task.
pub(super) fn start(
    store: Arc<dyn EventStore>,
    group: String,
    settings: GroupSettings,
) -> GroupHandle {
    let (commands, receiver) = mpsc::channel(COMMANDS_QUEUED_MAX);
    let actor = Group::new(store, group, settings.clone());
    let task = tokio::spawn(actor.run(receiver));
    GroupHandle {
        settings,
        commands,
        task,
    }
}

/// Where an event waiting in the group came from. Replays order first, so they go out before
/// new events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Key {
    /// A parked record being replayed, by its revision in the parked stream.
    Replay(u64),
    /// An event of the source, by its sequence (position or revision).
    Source(u64),
}

#[derive(Debug)]
enum State {
    Ready,
    InFlight,
    /// To be written to the parked stream (queued until the write succeeds).
    Parking {
        reason: String,
    },
    Settled,
}

#[derive(Debug)]
struct Entry {
    event: RecordedEvent,
    retries: u32,
    state: State,
}

#[derive(Debug)]
struct InFlight {
    key: Key,
    consumer: ConsumerId,
    deadline: Instant,
}

#[derive(Debug)]
struct Slot {
    name: String,
    sender: mpsc::Sender<Delivery>,
    in_flight: usize,
    in_flight_max: usize,
    delivered: u64,
}

impl Slot {
    fn has_room(&self) -> bool {
        self.in_flight < self.in_flight_max
    }
}

struct Meters {
    delivered: metrics::Counter,
    acked: metrics::Counter,
    retried: metrics::Counter,
    timed_out: metrics::Counter,
    parked: metrics::Counter,
    replayed: metrics::Counter,
    in_flight: metrics::Gauge,
    buffered: metrics::Gauge,
    consumers: metrics::Gauge,
}

impl Meters {
    fn new(group: &str) -> Self {
        let label = || [("group", group.to_owned())];
        Self {
            delivered: metrics::counter!("factline_persistent_delivered_total", &label()),
            acked: metrics::counter!("factline_persistent_acked_total", &label()),
            retried: metrics::counter!("factline_persistent_retried_total", &label()),
            timed_out: metrics::counter!("factline_persistent_timed_out_total", &label()),
            parked: metrics::counter!("factline_persistent_parked_total", &label()),
            replayed: metrics::counter!("factline_persistent_replayed_total", &label()),
            in_flight: metrics::gauge!("factline_persistent_in_flight", &label()),
            buffered: metrics::gauge!("factline_persistent_buffered_events", &label()),
            consumers: metrics::gauge!("factline_persistent_consumers", &label()),
        }
    }
}

#[derive(Debug, Default)]
struct Totals {
    delivered: u64,
    acked: u64,
    retried: u64,
    timed_out: u64,
    parked: u64,
    skipped: u64,
}

enum Wake {
    Command(Option<Command>),
    Source(Option<Result<RecordedEvent, SubscriptionError>>),
    Deadline,
    Sweep,
}

struct Group {
    store: Arc<dyn EventStore>,
    name: String,
    settings: GroupSettings,
    /// Both are valid stream ids for a checked group name; `None` reports a corrupt registry.
    streams: Result<(StreamId, StreamId), String>,

    loaded: bool,
    source: Option<Subscription>,
    /// Failed reads and writes are tried again from this instant.
    retry_at: Instant,
    last_error: Option<String>,

    /// Source events above the checkpoint: waiting, in flight, parking or settled.
    source_entries: BTreeMap<u64, Entry>,
    /// Parked records being replayed, by parked revision.
    replay_entries: BTreeMap<u64, Entry>,
    ready: BTreeSet<Key>,
    in_flight: HashMap<DeliveryId, InFlight>,
    deadlines: BTreeSet<(Instant, DeliveryId)>,
    consumers: BTreeMap<ConsumerId, Slot>,
    /// Streams with a delivery in flight, and how many (Pinned keeps it at one).
    busy_streams: HashMap<StreamId, usize>,
    parking: VecDeque<Key>,
    next_delivery: u64,
    next_consumer: u64,
    round_robin_after: Option<ConsumerId>,

    checkpoint: Option<u64>,
    saved: Option<u64>,
    last_read: Option<u64>,
    /// Source events above the loaded checkpoint known to be settled before the restart.
    settled_before_start: BTreeSet<u64>,
    settled_since_save: u64,
    dirty: bool,
    last_save: Instant,
    checkpoints_trimmed: bool,

    /// The revision the next parked record gets.
    parked_next: u64,
    /// The parked stream's `truncate_before` as set by this group.
    truncated_before: u64,
    /// Where the settled replays let the parked stream be truncated.
    truncate_wanted: u64,
    replay_next: u64,
    replay_end: u64,
    replay_budget: Option<u64>,

    meters: Meters,
    totals: Totals,
}

impl Group {
    fn new(store: Arc<dyn EventStore>, name: String, settings: GroupSettings) -> Self {
        let streams = checkpoint_stream(&name)
            .and_then(|checkpoints| Ok((checkpoints, parked_stream(&name)?)))
            .map_err(|error| error.to_string());
        let checkpoint = match settings.start {
            GroupStart::After(sequence) => Some(sequence),
            GroupStart::Start | GroupStart::End => None,
        };
        let now = Instant::now();
        Self {
            store,
            meters: Meters::new(&name),
            name,
            settings,
            streams,
            loaded: false,
            source: None,
            retry_at: now,
            last_error: None,
            source_entries: BTreeMap::new(),
            replay_entries: BTreeMap::new(),
            ready: BTreeSet::new(),
            in_flight: HashMap::new(),
            deadlines: BTreeSet::new(),
            consumers: BTreeMap::new(),
            busy_streams: HashMap::new(),
            parking: VecDeque::new(),
            next_delivery: 1,
            next_consumer: 1,
            round_robin_after: None,
            checkpoint,
            saved: checkpoint,
            last_read: checkpoint,
            settled_before_start: BTreeSet::new(),
            settled_since_save: 0,
            dirty: false,
            last_save: now,
            checkpoints_trimmed: false,
            parked_next: 0,
            truncated_before: 0,
            truncate_wanted: 0,
            replay_next: 0,
            replay_end: 0,
            replay_budget: None,
            totals: Totals::default(),
        }
    }

    fn buffer_max(&self) -> usize {
        self.settings.buffer_events_max as usize
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            self.prepare().await;
            self.dispatch();
            self.publish_gauges();
            let can_read = self.source.is_some() && self.source_entries.len() < self.buffer_max();
            let deadline = self.deadlines.first().map(|(at, _)| *at);
            let source = &mut self.source;
            let wake = tokio::select! {
                command = commands.recv() => Wake::Command(command),
                next = async {
                    match source.as_mut() {
                        Some(subscription) => subscription.next().await,
                        None => std::future::pending().await,
                    }
                }, if can_read => Wake::Source(next),
                () = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => Wake::Deadline,
                _ = sweep.tick() => Wake::Sweep,
            };
            match wake {
                Wake::Command(None) => {
                    self.finish().await;
                    return;
                }
                Wake::Command(Some(Command::Stop { reply })) => {
                    self.finish().await;
                    let _ = reply.send(());
                    return;
                }
                Wake::Command(Some(command)) => self.handle(command).await,
                Wake::Source(next) => self.on_source(next),
                Wake::Deadline => self.expire().await,
                Wake::Sweep => self.sweep().await,
            }
            if self.settled_since_save >= u64::from(self.settings.checkpoint_after_events) {
                self.save().await;
            }
        }
    }

    /// Loads the saved state, (re)subscribes, reads a replay page and writes queued parked
    /// records — each only when due.
    async fn prepare(&mut self) {
        if Instant::now() < self.retry_at {
            return;
        }
        if !self.loaded
            && let Err(error) = self.load().await
        {
            self.failed(format!("loading the group's state: {error}"));
            return;
        }
        if self.source.is_none()
            && let Err(error) = self.subscribe().await
        {
            self.failed(format!("subscribing to the source: {error}"));
            return;
        }
        if !self.parking.is_empty() {
            self.write_parked().await;
        }
        if self.replay_next < self.replay_end
            && self.replay_budget != Some(0)
            && self.replay_entries.len() < self.buffer_max()
            && let Err(error) = self.read_replay_page().await
        {
            self.failed(format!("reading parked events to replay: {error}"));
        }
    }

    fn failed(&mut self, message: String) {
        tracing::warn!(group = %self.name, error = %message, "persistent subscription: will retry in 1 s");
        self.last_error = Some(message);
        self.retry_at = Instant::now() + SWEEP_INTERVAL;
    }

    fn streams(&self) -> Result<(StreamId, StreamId), StorageError> {
        self.streams
            .clone()
            .map_err(|reason| StorageError::Backend(reason.into()))
    }

    async fn load(&mut self) -> Result<(), StorageError> {
        let (checkpoints, parked) = self.streams()?;
        let mut parked_from = 0;
        let newest = ReadStreamOptions::backwards().limit(1);
        match self.store.read_stream(&checkpoints, newest).await {
            Ok(slice) => {
                if let Some(event) = slice.events.first() {
                    let saved: Checkpointed = event.data_json().map_err(|error| {
                        StorageError::Backend(
                            format!("{checkpoints} revision {}: {error}", event.revision.0).into(),
                        )
                    })?;
                    self.checkpoint = saved.after;
                    self.settled_before_start = saved
                        .settled_above
                        .into_iter()
                        .filter(|sequence| Some(*sequence) > saved.after)
                        .collect();
                    parked_from = saved.parked_next;
                }
            }
            Err(ReadStreamError::NotFound { .. }) => {}
            Err(error) => return Err(read_failure(error)),
        }
        // The parked stream: its head, where replays left it, and the records written after
        // the checkpoint was saved (their events are settled, not to be parked again).
        match self.store.stream_metadata(&parked).await {
            Ok(metadata) => self.truncated_before = metadata.truncate_before.map_or(0, |r| r.0),
            Err(MetadataError::Storage(error)) => return Err(error),
            Err(other) => return Err(StorageError::backend(other)),
        }
        let mut from = parked_from;
        loop {
            let options = ReadStreamOptions::forwards()
                .from(Revision(from))
                .limit(REPLAY_PAGE_EVENTS_MAX);
            let slice = match self.store.read_stream(&parked, options).await {
                Ok(slice) => slice,
                Err(ReadStreamError::NotFound { .. }) => break,
                Err(error) => return Err(read_failure(error)),
            };
            self.parked_next = slice.last_revision.0 + 1;
            for event in &slice.events {
                if let Ok(record) = event.data_json::<ParkedEvent>()
                    && Some(record.sequence) > self.checkpoint
                {
                    self.settled_before_start.insert(record.sequence);
                }
            }
            if slice.is_end {
                break;
            }
            from = slice.next_revision.0;
        }
        self.truncate_wanted = self.truncated_before;
        self.replay_next = self.truncated_before;
        self.replay_end = self.truncated_before;
        self.saved = self.checkpoint;
        self.last_read = self.checkpoint;
        self.loaded = true;
        self.last_error = None;
        Ok(())
    }

    async fn subscribe(&mut self) -> Result<(), StorageError> {
        let subscription = match &self.settings.source {
            PersistentSource::All { filter } => {
                let from = self.last_read.map_or(SubscribeFrom::Start, |last| {
                    SubscribeFrom::After(Position(last))
                });
                self.store.subscribe_to_all(from, filter.clone()).await
            }
            PersistentSource::Stream { stream } => {
                let from = self.last_read.map_or(SubscribeFrom::Start, |last| {
                    SubscribeFrom::After(Revision(last))
                });
                self.store.subscribe_to_stream(stream, from).await
            }
        };
        self.source = Some(subscription.map_err(StorageError::backend)?);
        Ok(())
    }

    fn on_source(&mut self, next: Option<Result<RecordedEvent, SubscriptionError>>) {
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(error)) => {
                self.source = None;
                self.failed(format!("the source subscription failed: {error}"));
                return;
            }
            None => {
                self.source = None;
                self.failed("the source subscription ended".to_owned());
                return;
            }
        };
        let sequence = self.settings.source.sequence_of(&event);
        if Some(sequence) <= self.last_read {
            return;
        }
        self.last_read = Some(sequence);
        if is_internal_stream(event.stream.as_str()) {
            self.advance();
            return;
        }
        let state = if self.settled_before_start.remove(&sequence) {
            State::Settled
        } else {
            self.ready.insert(Key::Source(sequence));
            State::Ready
        };
        self.source_entries.insert(
            sequence,
            Entry {
                event,
                retries: 0,
                state,
            },
        );
        self.advance();
    }

    /// Moves the checkpoint over the settled prefix of the window.
    fn advance(&mut self) {
        while let Some(first) = self.source_entries.first_entry() {
            if !matches!(first.get().state, State::Settled) {
                break;
            }
            let (sequence, _) = first.remove_entry();
            self.checkpoint = Some(sequence);
        }
        if self.source_entries.is_empty() && self.last_read > self.checkpoint {
            self.checkpoint = self.last_read;
        }
        if let Some(checkpoint) = self.checkpoint
            && self
                .settled_before_start
                .first()
                .is_some_and(|first| *first <= checkpoint)
        {
            self.settled_before_start = self.settled_before_start.split_off(&(checkpoint + 1));
        }
    }

    fn advance_replay(&mut self) {
        while let Some(first) = self.replay_entries.first_entry() {
            if !matches!(first.get().state, State::Settled) {
                break;
            }
            first.remove_entry();
        }
        let wanted = self
            .replay_entries
            .first_key_value()
            .map_or(self.replay_next, |(revision, _)| *revision);
        if wanted > self.truncate_wanted {
            self.truncate_wanted = wanted;
            self.dirty = true;
        }
    }

    fn entry_mut(&mut self, key: Key) -> Option<&mut Entry> {
        match key {
            Key::Source(sequence) => self.source_entries.get_mut(&sequence),
            Key::Replay(revision) => self.replay_entries.get_mut(&revision),
        }
    }

    fn owner_of(&self, stream: &StreamId) -> Option<ConsumerId> {
        self.consumers
            .keys()
            .max_by_key(|id| {
                let mut hasher = DefaultHasher::new();
                stream.as_str().hash(&mut hasher);
                id.0.hash(&mut hasher);
                hasher.finish()
            })
            .copied()
    }

    fn next_round_robin(&mut self) -> Option<ConsumerId> {
        let after = self.round_robin_after;
        let later = match after {
            Some(after) => self
                .consumers
                .range((Bound::Excluded(after), Bound::Unbounded)),
            None => self.consumers.range(..),
        };
        let earlier = match after {
            Some(after) => self.consumers.range(..=after),
            None => self.consumers.range(..ConsumerId(0)),
        };
        let pick = later
            .chain(earlier)
            .find(|(_, slot)| slot.has_room())
            .map(|(id, _)| *id);
        if pick.is_some() {
            self.round_robin_after = pick;
        }
        pick
    }

    /// Hands waiting events to consumers with room, replays first, then in source order.
    fn dispatch(&mut self) {
        if self.ready.is_empty() || self.consumers.is_empty() {
            return;
        }
        let mut room: usize = self
            .consumers
            .values()
            .map(|slot| slot.in_flight_max - slot.in_flight)
            .sum();
        let pinned = self.settings.strategy == ConsumerStrategy::Pinned;
        let mut blocked: std::collections::HashSet<StreamId> = std::collections::HashSet::new();
        let mut closed = Vec::new();
        let mut cursor: Option<Key> = None;
        while room > 0 {
            let next = match cursor {
                Some(after) => self
                    .ready
                    .range((Bound::Excluded(after), Bound::Unbounded))
                    .next(),
                None => self.ready.first(),
            };
            let Some(key) = next.copied() else { break };
            cursor = Some(key);
            let Some(stream) = self.entry_mut(key).map(|entry| entry.event.stream.clone()) else {
                self.ready.remove(&key);
                continue;
            };
            let target = if pinned {
                if blocked.contains(&stream) || self.busy_streams.contains_key(&stream) {
                    blocked.insert(stream);
                    continue;
                }
                match self.owner_of(&stream) {
                    Some(owner) if self.consumers.get(&owner).is_some_and(Slot::has_room) => owner,
                    _ => {
                        blocked.insert(stream);
                        continue;
                    }
                }
            } else {
                match self.next_round_robin() {
                    Some(target) => target,
                    None => break,
                }
            };
            if self.deliver(key, target) {
                room -= 1;
            } else {
                closed.push(target);
                if pinned {
                    blocked.insert(stream);
                }
            }
        }
        for consumer in closed {
            self.disconnect(consumer, "consumer disconnected");
        }
    }

    /// Hands one waiting event to `consumer`; false when its channel is closed.
    fn deliver(&mut self, key: Key, consumer: ConsumerId) -> bool {
        let id = DeliveryId(self.next_delivery);
        let timeout = Duration::from_millis(self.settings.message_timeout_ms);
        let Some(entry) = (match key {
            Key::Source(sequence) => self.source_entries.get_mut(&sequence),
            Key::Replay(revision) => self.replay_entries.get_mut(&revision),
        }) else {
            return true;
        };
        let Some(slot) = self.consumers.get_mut(&consumer) else {
            return false;
        };
        let delivery = Delivery {
            id,
            event: entry.event.clone(),
            retry_count: entry.retries,
            replayed: matches!(key, Key::Replay(_)),
        };
        if slot.sender.try_send(delivery).is_err() {
            return false;
        }
        self.next_delivery += 1;
        entry.state = State::InFlight;
        slot.in_flight += 1;
        slot.delivered += 1;
        *self
            .busy_streams
            .entry(entry.event.stream.clone())
            .or_default() += 1;
        self.ready.remove(&key);
        let deadline = Instant::now() + timeout;
        self.in_flight.insert(
            id,
            InFlight {
                key,
                consumer,
                deadline,
            },
        );
        self.deadlines.insert((deadline, id));
        self.totals.delivered += 1;
        self.meters.delivered.increment(1);
        true
    }

    /// Removes an open delivery from the books.
    fn take_in_flight(&mut self, id: DeliveryId) -> Option<Key> {
        let flight = self.in_flight.remove(&id)?;
        self.deadlines.remove(&(flight.deadline, id));
        if let Some(slot) = self.consumers.get_mut(&flight.consumer) {
            slot.in_flight -= 1;
        }
        let stream = match flight.key {
            Key::Source(sequence) => self.source_entries.get(&sequence),
            Key::Replay(revision) => self.replay_entries.get(&revision),
        }
        .map(|entry| entry.event.stream.clone());
        if let Some(stream) = stream
            && let Some(count) = self.busy_streams.get_mut(&stream)
        {
            *count -= 1;
            if *count == 0 {
                self.busy_streams.remove(&stream);
            }
        }
        Some(flight.key)
    }

    fn settle(&mut self, key: Key) {
        let Some(entry) = self.entry_mut(key) else {
            return;
        };
        entry.state = State::Settled;
        match key {
            Key::Source(_) => {
                self.settled_since_save += 1;
                self.dirty = true;
                self.advance();
            }
            Key::Replay(_) => self.advance_replay(),
        }
    }

    fn retry(&mut self, key: Key, reason: &str) {
        let retries_max = self.settings.retries_max;
        let Some(entry) = self.entry_mut(key) else {
            return;
        };
        entry.retries += 1;
        let retries = entry.retries;
        self.totals.retried += 1;
        self.meters.retried.increment(1);
        if retries > retries_max {
            self.park(key, format!("retried {retries_max} times; last: {reason}"));
        } else {
            if let Some(entry) = self.entry_mut(key) {
                entry.state = State::Ready;
            }
            self.ready.insert(key);
        }
    }

    /// Queues the event for the parked stream (written by [`Group::write_parked`]).
    fn park(&mut self, key: Key, reason: String) {
        if let Some(entry) = self.entry_mut(key) {
            entry.state = State::Parking { reason };
            self.parking.push_back(key);
        }
    }

    /// Writes the queued parked records in one append; on failure they stay queued.
    async fn write_parked(&mut self) {
        let Ok((_, parked)) = self.streams() else {
            return;
        };
        let mut records = Vec::with_capacity(self.parking.len());
        for (offset, key) in self.parking.iter().enumerate() {
            let entry = match key {
                Key::Source(sequence) => self.source_entries.get(sequence),
                Key::Replay(revision) => self.replay_entries.get(revision),
            };
            let Some(entry) = entry else { continue };
            let State::Parking { reason } = &entry.state else {
                continue;
            };
            let event = &entry.event;
            let record = ParkedEvent {
                group: self.name.clone(),
                stream: event.stream.clone(),
                revision: event.revision,
                position: event.position,
                event_id: event.id,
                event_type: event.event_type.as_str().to_owned(),
                sequence: self.settings.source.sequence_of(event),
                retry_count: entry.retries,
                reason: reason.clone(),
            };
            let revision = self.parked_next + offset as u64;
            let id = Uuid::new_v5(
                &PARKED_ID_NAMESPACE,
                format!("{}\n{revision}\n{}", self.name, event.id).as_bytes(),
            );
            match EventData::json(EVENT_PARKED, &record) {
                Ok(data) => records.push(data.with_id(id)),
                Err(error) => {
                    self.failed(format!("encoding a parked record: {error}"));
                    return;
                }
            }
        }
        let count = records.len() as u64;
        let expected = match self.parked_next {
            0 => ExpectedVersion::NoStream,
            next => ExpectedVersion::Exact(Revision(next - 1)),
        };
        if !records.is_empty()
            && let Err(error) = self.store.append(&parked, expected, records).await
        {
            self.failed(format!("writing parked records: {error}"));
            return;
        }
        self.parked_next += count;
        let keys: Vec<Key> = self.parking.drain(..).collect();
        for key in keys {
            let entry = match key {
                Key::Source(sequence) => self.source_entries.get(&sequence),
                Key::Replay(revision) => self.replay_entries.get(&revision),
            };
            if let Some(entry) = entry
                && let State::Parking { reason } = &entry.state
            {
                tracing::warn!(
                    group = %self.name,
                    stream = %entry.event.stream,
                    revision = entry.event.revision.0,
                    event_id = %entry.event.id,
                    reason = %reason,
                    "persistent subscription: event parked"
                );
                self.totals.parked += 1;
                self.meters.parked.increment(1);
                self.settle(key);
            }
        }
    }

    async fn read_replay_page(&mut self) -> Result<(), StorageError> {
        let (_, parked) = self.streams()?;
        let room = self.buffer_max() - self.replay_entries.len();
        let budget = self.replay_budget.map_or(usize::MAX, |left| {
            usize::try_from(left).unwrap_or(usize::MAX)
        });
        let limit = room
            .min(budget)
            .min(REPLAY_PAGE_EVENTS_MAX)
            .min(usize::try_from(self.replay_end - self.replay_next).unwrap_or(usize::MAX));
        let options = ReadStreamOptions::forwards()
            .from(Revision(self.replay_next))
            .limit(limit);
        let slice = match self.store.read_stream(&parked, options).await {
            Ok(slice) => slice,
            Err(ReadStreamError::NotFound { .. }) => {
                self.replay_next = self.replay_end;
                return Ok(());
            }
            Err(error) => return Err(read_failure(error)),
        };
        if slice.events.is_empty() {
            self.replay_next = self.replay_end;
            self.advance_replay();
            return Ok(());
        }
        for record_event in slice.events {
            let revision = record_event.revision.0;
            if revision >= self.replay_end {
                self.replay_next = self.replay_end;
                break;
            }
            self.replay_next = revision + 1;
            if let Some(left) = self.replay_budget.as_mut() {
                *left = left.saturating_sub(1);
            }
            let original = match record_event.data_json::<ParkedEvent>() {
                Ok(record) => original_of(self.store.as_ref(), &record).await?,
                Err(_) => None,
            };
            let (event, state) = match original {
                Some(event) => {
                    self.ready.insert(Key::Replay(revision));
                    self.meters.replayed.increment(1);
                    (event, State::Ready)
                }
                None => {
                    tracing::warn!(
                        group = %self.name,
                        parked_revision = revision,
                        "persistent subscription: a parked event is gone (deleted or truncated) or its record unreadable; not replayed"
                    );
                    (record_event, State::Settled)
                }
            };
            self.replay_entries.insert(
                revision,
                Entry {
                    event,
                    retries: 0,
                    state,
                },
            );
        }
        if self.replay_budget == Some(0) {
            self.replay_end = self.replay_next;
        }
        self.advance_replay();
        Ok(())
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Connect {
                name,
                in_flight_max,
                reply,
            } => {
                let _ = reply.send(self.connect(name, in_flight_max));
            }
            Command::Disconnect { consumer } => self.disconnect(consumer, "consumer disconnected"),
            Command::Settle {
                consumer,
                ids,
                nack,
                reply,
            } => {
                let settled = self.settle_deliveries(consumer, ids, nack).await;
                let _ = reply.send(settled);
            }
            Command::ReplayParked { max_events, reply } => {
                let _ = reply.send(self.start_replay(max_events));
            }
            Command::Info { reply } => {
                let _ = reply.send(self.info());
            }
            Command::Stop { .. } => unreachable!("handled by run"),
        }
    }

    fn connect(
        &mut self,
        name: String,
        in_flight_max: Option<u32>,
    ) -> Result<(ConsumerId, mpsc::Receiver<Delivery>), GroupError> {
        if self.consumers.len() >= CONSUMERS_PER_GROUP_MAX {
            return Err(GroupError::TooManyConsumers {
                group: self.name.clone(),
                max: CONSUMERS_PER_GROUP_MAX,
            });
        }
        let group_max = self.settings.in_flight_per_consumer_max;
        let max = in_flight_max.map_or(group_max, |max| max.clamp(1, group_max)) as usize;
        let (sender, receiver) = mpsc::channel(max);
        let id = ConsumerId(self.next_consumer);
        self.next_consumer += 1;
        tracing::debug!(group = %self.name, consumer = id.0, name = %name, "persistent subscription: consumer connected");
        self.consumers.insert(
            id,
            Slot {
                name,
                sender,
                in_flight: 0,
                in_flight_max: max,
                delivered: 0,
            },
        );
        Ok((id, receiver))
    }

    fn disconnect(&mut self, consumer: ConsumerId, reason: &str) {
        if self.consumers.remove(&consumer).is_none() {
            return;
        }
        tracing::debug!(group = %self.name, consumer = consumer.0, "persistent subscription: consumer disconnected");
        let mut open: Vec<(DeliveryId, Key)> = self
            .in_flight
            .iter()
            .filter(|(_, flight)| flight.consumer == consumer)
            .map(|(id, flight)| (*id, flight.key))
            .collect();
        open.sort();
        for (id, key) in open {
            self.take_in_flight(id);
            self.retry(key, reason);
        }
    }

    async fn settle_deliveries(
        &mut self,
        consumer: ConsumerId,
        ids: Vec<DeliveryId>,
        nack: Option<(NackAction, String)>,
    ) -> Settled {
        let mut settled = Settled::default();
        for id in ids {
            if self
                .in_flight
                .get(&id)
                .is_none_or(|flight| flight.consumer != consumer)
            {
                settled.unknown.push(id);
                continue;
            }
            let Some(key) = self.take_in_flight(id) else {
                settled.unknown.push(id);
                continue;
            };
            settled.settled += 1;
            match &nack {
                None => {
                    self.totals.acked += 1;
                    self.meters.acked.increment(1);
                    self.settle(key);
                }
                Some((NackAction::Retry, reason)) => self.retry(key, reason),
                Some((NackAction::Park, reason)) => self.park(key, reason.clone()),
                Some((NackAction::Skip, _)) => {
                    self.totals.skipped += 1;
                    self.settle(key);
                }
            }
        }
        if !self.parking.is_empty() {
            self.write_parked().await;
        }
        settled
    }

    fn start_replay(&mut self, max_events: Option<u64>) -> u64 {
        if !self.loaded {
            return 0;
        }
        self.replay_next = self.replay_next.max(self.truncated_before);
        self.replay_end = self.parked_next;
        self.replay_budget = max_events;
        let waiting = self.replay_end.saturating_sub(self.replay_next);
        max_events.map_or(waiting, |max| max.min(waiting))
    }

    async fn expire(&mut self) {
        let now = Instant::now();
        let timeout_ms = self.settings.message_timeout_ms;
        while let Some((deadline, id)) = self.deadlines.first().copied() {
            if deadline > now {
                break;
            }
            if let Some(key) = self.take_in_flight(id) {
                self.totals.timed_out += 1;
                self.meters.timed_out.increment(1);
                self.retry(key, &format!("not settled within {timeout_ms} ms"));
            }
        }
        if !self.parking.is_empty() {
            self.write_parked().await;
        }
    }

    async fn sweep(&mut self) {
        let closed: Vec<ConsumerId> = self
            .consumers
            .iter()
            .filter(|(_, slot)| slot.sender.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for consumer in closed {
            self.disconnect(consumer, "consumer disconnected");
        }
        if self.dirty && self.last_save.elapsed() >= SWEEP_INTERVAL {
            self.save().await;
        }
    }

    /// Saves the checkpoint (and truncates the parked stream past settled replays).
    async fn save(&mut self) {
        if !self.loaded {
            return;
        }
        let Ok((checkpoints, parked)) = self.streams() else {
            return;
        };
        self.last_save = Instant::now();
        if self.truncate_wanted > self.truncated_before {
            let truncated = match self.store.stream_metadata(&parked).await {
                Ok(metadata) => {
                    let metadata = StreamMetadata {
                        truncate_before: Some(Revision(self.truncate_wanted)),
                        ..metadata
                    };
                    self.store
                        .set_stream_metadata(&parked, metadata)
                        .await
                        .map_err(|error| error.to_string())
                }
                Err(error) => Err(error.to_string()),
            };
            match truncated {
                Ok(()) => self.truncated_before = self.truncate_wanted,
                Err(error) => self.failed(format!("truncating replayed parked events: {error}")),
            }
        }
        let settled_above: Vec<u64> = self
            .source_entries
            .iter()
            .filter(|(_, entry)| matches!(entry.state, State::Settled))
            .map(|(sequence, _)| *sequence)
            .chain(self.settled_before_start.iter().copied())
            .collect();
        let record = Checkpointed {
            after: self.checkpoint,
            settled_above,
            parked_next: self.parked_next,
        };
        let event = match EventData::json(CHECKPOINTED, &record) {
            Ok(event) => event,
            Err(error) => {
                self.failed(format!("encoding the checkpoint: {error}"));
                return;
            }
        };
        match self
            .store
            .append(&checkpoints, ExpectedVersion::Any, vec![event])
            .await
        {
            Ok(_) => {
                self.saved = self.checkpoint;
                self.settled_since_save = 0;
                self.dirty = self.truncate_wanted > self.truncated_before;
                if !self.checkpoints_trimmed {
                    self.trim_checkpoints(&checkpoints).await;
                }
            }
            Err(error) => self.failed(format!("saving the checkpoint: {error}")),
        }
    }

    /// Keeps the checkpoint stream short (best effort: a failure only keeps more records).
    async fn trim_checkpoints(&mut self, checkpoints: &StreamId) {
        if let Ok(metadata) = self.store.stream_metadata(checkpoints).await {
            if metadata.max_count.is_some() {
                self.checkpoints_trimmed = true;
                return;
            }
            let metadata = StreamMetadata {
                max_count: Some(CHECKPOINTS_KEPT),
                ..metadata
            };
            self.checkpoints_trimmed = self
                .store
                .set_stream_metadata(checkpoints, metadata)
                .await
                .is_ok();
        }
    }

    async fn finish(&mut self) {
        if !self.parking.is_empty() {
            self.write_parked().await;
        }
        if self.dirty || self.saved != self.checkpoint {
            self.save().await;
        }
        // Dropping the slots closes every consumer's channel.
        self.consumers.clear();
        self.publish_gauges();
    }

    fn publish_gauges(&self) {
        self.meters.in_flight.set(self.in_flight.len() as f64);
        self.meters
            .buffered
            .set((self.source_entries.len() + self.replay_entries.len()) as f64);
        self.meters.consumers.set(self.consumers.len() as f64);
    }

    fn info(&self) -> GroupInfo {
        let replay_waiting = self.replay_end.saturating_sub(self.replay_next);
        let replay_waiting = self
            .replay_budget
            .map_or(replay_waiting, |left| left.min(replay_waiting));
        let replay_open = self
            .replay_entries
            .values()
            .filter(|entry| !matches!(entry.state, State::Settled))
            .count() as u64;
        GroupInfo {
            group: self.name.clone(),
            settings: self.settings.clone(),
            checkpoint: self.checkpoint,
            checkpoint_saved: self.saved,
            last_read: self.last_read,
            ready: self.ready.len(),
            in_flight: self.in_flight.len(),
            buffered: self.source_entries.len() + self.replay_entries.len(),
            consumers: self
                .consumers
                .iter()
                .map(|(id, slot)| ConsumerInfo {
                    id: *id,
                    name: slot.name.clone(),
                    in_flight: slot.in_flight,
                    delivered: slot.delivered,
                })
                .collect(),
            parked_waiting: self
                .parked_next
                .saturating_sub(self.replay_next.max(self.truncated_before)),
            replay_remaining: replay_waiting + replay_open,
            delivered_total: self.totals.delivered,
            acked_total: self.totals.acked,
            retried_total: self.totals.retried,
            timed_out_total: self.totals.timed_out,
            parked_total: self.totals.parked,
            skipped_total: self.totals.skipped,
            last_error: self.last_error.clone(),
        }
    }
}

fn read_failure(error: ReadStreamError) -> StorageError {
    match error {
        ReadStreamError::Storage(error) => error,
        other => StorageError::backend(other),
    }
}

/// The parked event itself, if its stream still shows it.
async fn original_of(
    store: &dyn EventStore,
    record: &ParkedEvent,
) -> Result<Option<RecordedEvent>, StorageError> {
    let options = ReadStreamOptions::forwards().from(record.revision).limit(1);
    match store.read_stream(&record.stream, options).await {
        Ok(slice) => Ok(slice
            .events
            .into_iter()
            .next()
            .filter(|event| event.id == record.event_id)),
        Err(ReadStreamError::NotFound { .. } | ReadStreamError::Deleted { .. }) => Ok(None),
        Err(error) => Err(read_failure(error)),
    }
}
