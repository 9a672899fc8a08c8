//! Process managers (sagas): long-running business processes that react to events, issue
//! commands, keep their own state as an event stream, compensate when a step fails, and
//! schedule timeouts that survive restarts. Design note: docs/design/process-managers.md.
//!
//! A [`ProcessManager`] is a decider over *events*: each input event (read from `$all`) is
//! routed to one instance ([`ProcessManager::correlate`]), whose state is folded from its own
//! stream `{CATEGORY}-{id}`; [`ProcessManager::react`] answers with a [`Reaction`] — events
//! to record in that stream (its new state), commands to send, timeouts to schedule or
//! cancel. Compensation is an ordinary reaction: a failure event (`PaymentDeclined`) or a
//! timeout leads to the commands that undo the steps already taken.
//!
//! [`ProcessManagerRunner`] runs one process manager:
//! - It appends a reaction's events together with one record of its own
//!   ([`REACTED_EVENT_TYPE`]: the input it answers, the commands with their message ids, the
//!   timeouts) in one append with the instance's expected revision, and only then sends the
//!   commands. After a crash it reads again from its checkpoint; an input the instance has
//!   already answered (every input up to the instance's last answered position) is not
//!   answered twice, but its recorded commands are sent again with the same message ids, so
//!   delivery is at least once and consumers deduplicate by id.
//! - Timeouts are written ahead to the stream `factline.timeouts-{CATEGORY}` before the
//!   reaction that schedules them, and fire only if the instance still has them pending: one
//!   written ahead by a reaction that then failed is a phantom the instance does not know and
//!   is dropped. A due timeout fires after a restart too (late, never lost); a fired or
//!   dropped one is settled in the index, which is compacted now and then.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    future::Future,
    marker::PhantomData,
    sync::Arc,
    time::Duration,
};

use factline_core::{
    AppendError, CheckpointError, CheckpointStore, EventData, EventFilter, EventStore,
    ExpectedVersion, Metadata, MetadataError, Position, ReadAllError, ReadAllOptions,
    ReadStreamError, ReadStreamOptions, RecordedEvent, Revision, StorageError, StreamId,
    SubscribeError, SubscribeFrom, SubscriptionError, Timestamp, Uuid,
};
use factline_messaging::{
    MessageId, Metadata as MessageMetadata,
    cqrs::{Command, CommandBus, Marshaler},
};
use futures::{FutureExt as _, future::BoxFuture};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{DecodeError, DomainEvent, EncodeError, Upcasters};

/// The event type of the record a runner appends with every reaction.
pub const REACTED_EVENT_TYPE: &str = "factline.ProcessReacted";
/// Reactions per instance whose commands a runner can send again after a restart; also the
/// most [`ProcessOptions::checkpoint_every_events`] can be.
pub const RECENT_REACTIONS_MAX: usize = 1_000;
/// Settled timeouts in the index between two compactions.
const SETTLED_BETWEEN_COMPACTIONS: u64 = 1_000;
/// Most events read in one page while loading an instance or the timeout index.
const READ_PAGE_EVENTS_MAX: usize = 1_000;
/// Attempts at an instance append that keeps meeting a concurrent writer.
const APPEND_ATTEMPTS_MAX: u32 = 5;

const TIMEOUT_SCHEDULED: &str = "TimeoutScheduled";
const TIMEOUT_SETTLED: &str = "TimeoutSettled";
const TIMEOUTS_COMPACTED: &str = "TimeoutsCompacted";

/// Boxed error of a [`CommandSink`].
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// A long-running process: reacts to events, records its state as events, issues commands
/// and schedules timeouts. One instance per correlated id; its state is `Self`, folded from
/// its own events by [`ProcessManager::evolve`], starting from the runner's fresh value
/// (`Default`, or the factory given to [`ProcessManagerRunner::with_factory`], which is where
/// configuration such as timeout lengths goes).
pub trait ProcessManager: Sized + Send + Sync + 'static {
    /// The events it reacts to (from other streams; other stored types are passed over).
    type Input: DomainEvent;
    /// Its own events, recorded in its stream: its state.
    type Event: DomainEvent;
    /// What a timeout carries back when it fires.
    type Timeout: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Why a reaction failed (a bug or an impossible input: the runner stops with it).
    type Error: std::error::Error + Send + Sync + 'static;

    /// The category of its streams (`{CATEGORY}-{id}`) and its name (checkpoint, metrics).
    const CATEGORY: &'static str;

    /// The part of `$all` it reads (default: all of it).
    fn filter() -> EventFilter {
        EventFilter::all()
    }

    /// The instance `input` belongs to, e.g. the order id; `None` passes it over.
    fn correlate(input: &Self::Input, recorded: &RecordedEvent) -> Option<String>;

    /// The reaction of this instance to `input`.
    fn react(
        &self,
        input: &Self::Input,
        recorded: &RecordedEvent,
    ) -> Result<Reaction<Self>, Self::Error>;

    /// The reaction of this instance to its timeout `key` (scheduled with `timeout`) coming due.
    fn on_timeout(&self, key: &str, timeout: Self::Timeout) -> Result<Reaction<Self>, Self::Error>;

    /// Applies one of its own recorded events to its state.
    fn evolve(&mut self, event: &Self::Event);
}

/// What an instance does in answer to an input: events to record, commands to send, timeouts
/// to schedule and cancel. Built with chained calls: `Reaction::new().record(e).send(&c)`.
pub struct Reaction<P: ProcessManager> {
    events: Vec<P::Event>,
    commands: Vec<EncodedCommand>,
    scheduled: Vec<(String, Duration, Result<Value, String>)>,
    canceled: Vec<String>,
    problem: Option<String>,
}

struct EncodedCommand {
    command_type: &'static str,
    payload: Value,
    partition_key: Option<String>,
}

impl<P: ProcessManager> Default for Reaction<P> {
    fn default() -> Self {
        Self {
            events: Vec::new(),
            commands: Vec::new(),
            scheduled: Vec::new(),
            canceled: Vec::new(),
            problem: None,
        }
    }
}

impl<P: ProcessManager> std::fmt::Debug for Reaction<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaction")
            .field("events", &self.events.len())
            .field(
                "commands",
                &self
                    .commands
                    .iter()
                    .map(|c| c.command_type)
                    .collect::<Vec<_>>(),
            )
            .field(
                "scheduled",
                &self.scheduled.iter().map(|s| &s.0).collect::<Vec<_>>(),
            )
            .field("canceled", &self.canceled)
            .finish()
    }
}

impl<P: ProcessManager> Reaction<P> {
    /// Nothing (yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `event` in the instance's stream.
    #[must_use]
    pub fn record(mut self, event: P::Event) -> Self {
        self.events.push(event);
        self
    }

    /// Sends `command` through the command bus once the reaction is recorded.
    #[must_use]
    pub fn send<C: Command>(mut self, command: &C) -> Self {
        match serde_json::to_value(command) {
            Ok(payload) => self.commands.push(EncodedCommand {
                command_type: C::NAME,
                payload,
                partition_key: command.partition_key(),
            }),
            Err(error) => {
                self.problem
                    .get_or_insert_with(|| format!("command {} does not encode: {error}", C::NAME));
            }
        }
        self
    }

    /// Schedules the timeout `key` to come due `after` from now, carrying `timeout`. A
    /// pending timeout of the same key is replaced.
    #[must_use]
    pub fn schedule(
        mut self,
        key: impl Into<String>,
        after: Duration,
        timeout: &P::Timeout,
    ) -> Self {
        let payload = serde_json::to_value(timeout).map_err(|error| error.to_string());
        self.scheduled.push((key.into(), after, payload));
        self
    }

    /// Cancels the pending timeout `key` (nothing happens if there is none).
    #[must_use]
    pub fn cancel(mut self, key: impl Into<String>) -> Self {
        self.canceled.push(key.into());
        self
    }

    /// True when it records, sends, schedules and cancels nothing.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.commands.is_empty()
            && self.scheduled.is_empty()
            && self.canceled.is_empty()
    }
}

/// A command as a process manager recorded it, and as a [`CommandSink`] sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct IssuedCommand {
    /// The command's name ([`Command::NAME`]).
    pub command_type: String,
    /// The message id, the same every time this command is sent again.
    pub message_id: Uuid,
    /// The command as JSON.
    pub payload: Value,
    /// The ordering key, if the command has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
    /// The correlation id of the process (the input's, or its id).
    pub correlation_id: String,
    /// The id of the input event or timeout that caused it.
    pub causation_id: String,
}

/// Where a process manager's commands go: usually a [`CommandBus`].
pub trait CommandSink: Send + Sync + 'static {
    /// Sends `command` once (the runner retries a failure with the same message id).
    fn send<'a>(&'a self, command: &'a IssuedCommand) -> BoxFuture<'a, Result<(), SinkError>>;
}

impl<M: Marshaler> CommandSink for CommandBus<M> {
    fn send<'a>(&'a self, command: &'a IssuedCommand) -> BoxFuture<'a, Result<(), SinkError>> {
        async move {
            let mut metadata = MessageMetadata::new()
                .with(
                    MessageMetadata::CORRELATION_ID,
                    command.correlation_id.clone(),
                )
                .with(MessageMetadata::CAUSATION_ID, command.causation_id.clone());
            if let Some(key) = &command.partition_key {
                metadata.insert(MessageMetadata::PARTITION_KEY, key.clone());
            }
            self.send_named(
                &command.command_type,
                &command.payload,
                MessageId::from_uuid(command.message_id),
                metadata,
            )
            .await
            .map(drop)
            .map_err(SinkError::from)
        }
        .boxed()
    }
}

/// How a [`ProcessManagerRunner`] checkpoints and sends.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProcessOptions {
    /// Save the checkpoint after this many input events (1..=[`RECENT_REACTIONS_MAX`]).
    /// Default 100.
    pub checkpoint_every_events: u64,
    /// Attempts at sending one command before the runner stops (at least 1). Default 5.
    pub send_attempts_max: u32,
    /// Wait before the first resend; doubled after each failure. Default 100 ms.
    pub send_backoff_ms: u64,
    /// Most timeouts pending at once; a reaction that would schedule more fails. Default
    /// 100,000.
    pub timeouts_pending_max: usize,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        Self {
            checkpoint_every_events: 100,
            send_attempts_max: 5,
            send_backoff_ms: 100,
            timeouts_pending_max: 100_000,
        }
    }
}

impl ProcessOptions {
    /// Sets [`ProcessOptions::checkpoint_every_events`] (kept within its range).
    #[must_use]
    pub fn checkpoint_every_events(mut self, events: u64) -> Self {
        self.checkpoint_every_events = events.clamp(1, RECENT_REACTIONS_MAX as u64);
        self
    }

    /// Sets [`ProcessOptions::send_attempts_max`] (0 counts as 1).
    #[must_use]
    pub fn send_attempts_max(mut self, attempts: u32) -> Self {
        self.send_attempts_max = attempts.max(1);
        self
    }

    /// Sets [`ProcessOptions::send_backoff_ms`].
    #[must_use]
    pub fn send_backoff_ms(mut self, backoff_ms: u64) -> Self {
        self.send_backoff_ms = backoff_ms;
        self
    }

    /// Sets [`ProcessOptions::timeouts_pending_max`].
    #[must_use]
    pub fn timeouts_pending_max(mut self, timeouts: usize) -> Self {
        self.timeouts_pending_max = timeouts;
        self
    }
}

/// Why a process manager stopped before it was asked to. The checkpoint is the last input
/// fully handled (recorded and its commands sent), so a restart goes on from there.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError<E: std::error::Error + Send + Sync + 'static> {
    /// The process manager refused an input or a timeout.
    #[error("process {process} instance {instance:?} failed to react: {source}")]
    React {
        /// The process manager's category.
        process: &'static str,
        /// The instance id.
        instance: String,
        /// Its error.
        source: E,
    },
    /// A reaction held a value that does not encode.
    #[error("process {process} instance {instance:?}: {reason}")]
    Encode {
        /// The process manager's category.
        process: &'static str,
        /// The instance id.
        instance: String,
        /// What did not encode.
        reason: String,
    },
    /// An input event, an instance's event or its own record does not decode.
    #[error(
        "process {process}: the event at {stream} revision {revision} does not decode: {reason}"
    )]
    Decode {
        /// The process manager's category.
        process: &'static str,
        /// The stream of the event.
        stream: StreamId,
        /// Its revision.
        revision: Revision,
        /// What is wrong.
        reason: String,
    },
    /// `correlate` gave an id that makes no valid stream id.
    #[error("process {process}: instance id {instance:?} makes no valid stream id: {reason}")]
    InvalidInstanceId {
        /// The process manager's category.
        process: &'static str,
        /// The id given.
        instance: String,
        /// Why the stream id is refused.
        reason: String,
    },
    /// A reaction would have more timeouts pending than allowed.
    #[error("process {process}: more than {max} timeouts would be pending (timeouts_pending_max)")]
    TooManyTimeouts {
        /// The process manager's category.
        process: &'static str,
        /// [`ProcessOptions::timeouts_pending_max`].
        max: usize,
    },
    /// A command could not be sent within [`ProcessOptions::send_attempts_max`] attempts. It
    /// is recorded: a restart sends it again with the same message id.
    #[error(
        "process {process}: sending command {command_type} ({message_id}) failed {attempts} times: {source}"
    )]
    Send {
        /// The process manager's category.
        process: &'static str,
        /// The command's name.
        command_type: String,
        /// Its message id.
        message_id: Uuid,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        source: SinkError,
    },
    /// The instance's stream kept changing under the runner (another runner of the same
    /// process manager?), or an append failed.
    #[error("process {process}: appending to {stream} failed: {source}")]
    Append {
        /// The process manager's category.
        process: &'static str,
        /// The stream.
        stream: StreamId,
        /// The store's error.
        source: AppendError,
    },
    /// Reading a stream failed.
    #[error("process {process}: reading {stream} failed: {source}")]
    Read {
        /// The process manager's category.
        process: &'static str,
        /// The stream.
        stream: StreamId,
        /// The store's error.
        source: ReadStreamError,
    },
    /// The store failed (subscription, metadata).
    #[error("process {process}: the store failed: {source}")]
    Store {
        /// The process manager's category.
        process: &'static str,
        /// The store's error.
        source: StorageError,
    },
    /// The checkpoint store failed.
    #[error("process {process}: the checkpoint store failed: {source}")]
    Checkpoint {
        /// The process manager's category.
        process: &'static str,
        /// Its error.
        source: CheckpointError,
    },
}

/// What an input to an instance was: an event of `$all` or one of its timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum InputRef {
    Event { id: Uuid, position: u64 },
    Timeout { id: Uuid, key: String },
}

/// A scheduled timeout as the instance records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ScheduledTimeout {
    id: Uuid,
    key: String,
    due_at_us: i64,
    payload: Value,
    correlation_id: String,
}

/// The record a runner appends with every reaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reacted {
    input: InputRef,
    #[serde(default)]
    commands: Vec<IssuedCommand>,
    #[serde(default)]
    scheduled: Vec<ScheduledTimeout>,
    #[serde(default)]
    canceled: Vec<String>,
}

/// One entry of the timeout index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TimerEntry {
    id: Uuid,
    instance: String,
    key: String,
    due_at_us: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct TimeoutSettled {
    id: Uuid,
}

/// One part of a compaction: the first part replaces every earlier entry, the rest add to it.
#[derive(Debug, Serialize, Deserialize)]
struct TimeoutsCompacted {
    pending: Vec<TimerEntry>,
    #[serde(default)]
    continued: bool,
}

/// Pending timeouts per compaction record (about 140 bytes each, far below the default event
/// size limit of 1 MiB).
const COMPACTED_ENTRIES_PER_RECORD: usize = 1_000;

/// An instance as loaded from its stream.
#[derive(Debug)]
#[non_exhaustive]
pub struct ProcessInstance<P> {
    /// Its state, folded from its events.
    pub state: P,
    /// The revision of its stream's last event (`None`: nothing recorded yet).
    pub version: Option<Revision>,
    /// The keys of its pending timeouts and when each comes due.
    pub pending_timeouts: BTreeMap<String, Timestamp>,
    last_input_position: Option<u64>,
    pending: HashMap<String, ScheduledTimeout>,
    recent: VecDeque<(InputRef, Vec<IssuedCommand>)>,
}

impl<P: ProcessManager> ProcessInstance<P> {
    fn fresh(state: P) -> Self {
        Self {
            state,
            version: None,
            pending_timeouts: BTreeMap::new(),
            last_input_position: None,
            pending: HashMap::new(),
            recent: VecDeque::new(),
        }
    }

    fn apply_reacted(&mut self, reacted: Reacted) {
        match &reacted.input {
            InputRef::Event { position, .. } => {
                self.last_input_position = Some(
                    self.last_input_position
                        .map_or(*position, |last| last.max(*position)),
                );
            }
            InputRef::Timeout { id, key } => {
                if self
                    .pending
                    .get(key)
                    .is_some_and(|pending| pending.id == *id)
                {
                    self.pending.remove(key);
                }
            }
        }
        for key in &reacted.canceled {
            self.pending.remove(key);
        }
        for scheduled in reacted.scheduled {
            self.pending.insert(scheduled.key.clone(), scheduled);
        }
        self.pending_timeouts = self
            .pending
            .iter()
            .map(|(key, s)| (key.clone(), Timestamp::from_unix_micros(s.due_at_us)))
            .collect();
        if self.recent.len() == RECENT_REACTIONS_MAX {
            self.recent.pop_front();
        }
        self.recent.push_back((reacted.input, reacted.commands));
    }

    fn recorded_commands(&self, input: &InputRef) -> Option<&[IssuedCommand]> {
        self.recent
            .iter()
            .rev()
            .find(|(recorded, _)| recorded == input)
            .map(|(_, commands)| commands.as_slice())
    }
}

/// How one run ended.
#[derive(Debug)]
#[non_exhaustive]
pub struct ProcessStopped {
    /// The position of the last input handled (`None`: none yet, ever).
    pub position: Option<Position>,
    /// Timeouts pending in the index.
    pub timeouts_pending: usize,
}

/// Runs a [`ProcessManager`] over an [`EventStore`]: inputs from `$all` after its
/// checkpoint, its timeouts, its commands into a [`CommandSink`]. Run one runner per process
/// manager at a time (a second one never makes an instance react twice — appends are guarded
/// by expected revisions — but it sends commands twice and its compactions race the other's
/// timeouts).
pub struct ProcessManagerRunner<P: ProcessManager> {
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    commands: Arc<dyn CommandSink>,
    fresh: Arc<dyn Fn() -> P + Send + Sync>,
    options: ProcessOptions,
    upcasters: Upcasters,
    index_stream: StreamId,
    timers: BTreeMap<(i64, Uuid), TimerEntry>,
    settled_since_compaction: u64,
    _process: PhantomData<fn() -> P>,
}

impl<P: ProcessManager> std::fmt::Debug for ProcessManagerRunner<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessManagerRunner")
            .field("process", &P::CATEGORY)
            .field("options", &self.options)
            .field("timeouts_pending", &self.timers.len())
            .finish_non_exhaustive()
    }
}

/// The checkpoint name of process manager `category`.
pub fn process_checkpoint_name(category: &str) -> String {
    format!("process:{category}")
}

/// The timeout index stream of process manager `category`.
pub fn timeout_index_stream(category: &str) -> Result<StreamId, factline_core::StreamIdError> {
    StreamId::new(format!("factline.timeouts-{category}"))
}

impl<P: ProcessManager + Default> ProcessManagerRunner<P> {
    /// A runner over `store`, checkpointing in `checkpoints`, sending into `commands`; each
    /// instance starts from `P::default()`.
    ///
    /// # Errors
    /// [`ProcessError::InvalidInstanceId`] when `P::CATEGORY` makes no valid stream id.
    pub fn new(
        store: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
        commands: Arc<dyn CommandSink>,
    ) -> Result<Self, ProcessError<P::Error>> {
        Self::with_factory(store, checkpoints, commands, P::default)
    }
}

impl<P: ProcessManager> ProcessManagerRunner<P> {
    /// [`ProcessManagerRunner::new`] with each instance starting from `fresh()`.
    ///
    /// # Errors
    /// [`ProcessError::InvalidInstanceId`] when `P::CATEGORY` makes no valid stream id.
    pub fn with_factory(
        store: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
        commands: Arc<dyn CommandSink>,
        fresh: impl Fn() -> P + Send + Sync + 'static,
    ) -> Result<Self, ProcessError<P::Error>> {
        let index_stream =
            timeout_index_stream(P::CATEGORY).map_err(|error| ProcessError::InvalidInstanceId {
                process: P::CATEGORY,
                instance: String::new(),
                reason: error.to_string(),
            })?;
        Ok(Self {
            store,
            checkpoints,
            commands,
            fresh: Arc::new(fresh),
            options: ProcessOptions::default(),
            upcasters: Upcasters::new(),
            index_stream,
            timers: BTreeMap::new(),
            settled_since_compaction: 0,
            _process: PhantomData,
        })
    }

    /// Sets how it checkpoints and sends (out-of-range values are brought into range).
    #[must_use]
    pub fn options(mut self, options: ProcessOptions) -> Self {
        let checkpoint_every_events = options.checkpoint_every_events;
        let send_attempts_max = options.send_attempts_max;
        self.options = options
            .checkpoint_every_events(checkpoint_every_events)
            .send_attempts_max(send_attempts_max);
        self
    }

    /// Reads input events through `upcasters`.
    #[must_use]
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// The instance `id` as its stream has it now.
    pub async fn load(&self, id: &str) -> Result<ProcessInstance<P>, ProcessError<P::Error>> {
        let stream = self.instance_stream(id)?;
        self.load_stream(&stream).await
    }

    /// Runs until `stop` completes (then saves the checkpoint and returns) or something fails.
    pub async fn run_until(
        mut self,
        stop: impl Future<Output = ()> + Send,
    ) -> Result<ProcessStopped, ProcessError<P::Error>> {
        let process = P::CATEGORY;
        let checkpoint_name = process_checkpoint_name(process);
        let start = self
            .checkpoints
            .load_checkpoint(&checkpoint_name)
            .await
            .map_err(|source| ProcessError::Checkpoint { process, source })?;
        self.load_index().await?;
        let from = start.map_or(SubscribeFrom::Start, SubscribeFrom::After);
        let mut subscription = self
            .store
            .subscribe_to_all(from, P::filter())
            .await
            .map_err(|error| self.subscribe_error(error))?;
        tracing::info!(process, from = ?start, timeouts_pending = self.timers.len(), "process manager started");
        let mut position = start;
        let mut saved = start;
        let mut since_saved = 0u64;
        let mut stop = std::pin::pin!(stop);
        // Set when a due timeout waits for inputs recorded before its due time.
        let mut inputs_first = false;
        let outcome = loop {
            let due_in = self.next_due_in().filter(|_| !inputs_first);
            let next = tokio::select! {
                biased;
                () = &mut stop => break Ok(()),
                () = tokio::time::sleep(due_in.unwrap_or_default()), if due_in.is_some() => {
                    match self.fire_due(position).await {
                        Ok(fired_all) => inputs_first = !fired_all,
                        Err(error) => break Err(error),
                    }
                    continue;
                }
                next = subscription.next() => next,
            };
            inputs_first = false;
            let event = match next {
                Some(Ok(event)) => event,
                Some(Err(SubscriptionError::Storage(source))) => {
                    break Err(ProcessError::Store { process, source });
                }
                Some(Err(other)) => {
                    break Err(ProcessError::Store {
                        process,
                        source: StorageError::backend(other),
                    });
                }
                None => {
                    break Err(ProcessError::Store {
                        process,
                        source: StorageError::Closed,
                    });
                }
            };
            if let Err(error) = self.handle_input(&event).await {
                break Err(error);
            }
            position = Some(event.position);
            since_saved += 1;
            if since_saved >= self.options.checkpoint_every_events {
                if let Err(error) = self.save(&checkpoint_name, position, &mut saved).await {
                    break Err(error);
                }
                since_saved = 0;
            }
        };
        self.save(&checkpoint_name, position, &mut saved).await?;
        outcome?;
        tracing::info!(process, position = ?position, "process manager stopped");
        Ok(ProcessStopped {
            position,
            timeouts_pending: self.timers.len(),
        })
    }

    async fn save(
        &self,
        name: &str,
        position: Option<Position>,
        saved: &mut Option<Position>,
    ) -> Result<(), ProcessError<P::Error>> {
        let Some(position) = position else {
            return Ok(());
        };
        if *saved != Some(position) {
            self.checkpoints
                .save_checkpoint(name, position)
                .await
                .map_err(|source| ProcessError::Checkpoint {
                    process: P::CATEGORY,
                    source,
                })?;
            *saved = Some(position);
        }
        if let Ok(Some(head)) = self.store.head_position().await {
            metrics::gauge!("factline_process_lag_positions", "process" => P::CATEGORY)
                .set(head.value().saturating_sub(position.value()) as f64);
        }
        Ok(())
    }

    fn subscribe_error(&self, error: SubscribeError) -> ProcessError<P::Error> {
        let source = match error {
            SubscribeError::Storage(source) => source,
            other => StorageError::backend(other),
        };
        ProcessError::Store {
            process: P::CATEGORY,
            source,
        }
    }

    /// The event at `recorded`'s place does not decode, for `reason`.
    fn decode_error(
        recorded: &RecordedEvent,
        reason: impl std::fmt::Display,
    ) -> ProcessError<P::Error> {
        ProcessError::Decode {
            process: P::CATEGORY,
            stream: recorded.stream.clone(),
            revision: recorded.revision,
            reason: reason.to_string(),
        }
    }

    fn instance_stream(&self, id: &str) -> Result<StreamId, ProcessError<P::Error>> {
        StreamId::new(format!("{}-{id}", P::CATEGORY)).map_err(|error| {
            ProcessError::InvalidInstanceId {
                process: P::CATEGORY,
                instance: id.to_owned(),
                reason: error.to_string(),
            }
        })
    }

    /// Every event of `stream` from the first, page by page, into `apply`.
    async fn read_whole(
        &self,
        stream: &StreamId,
        mut apply: impl FnMut(&RecordedEvent) -> Result<(), ProcessError<P::Error>>,
    ) -> Result<Option<Revision>, ProcessError<P::Error>> {
        let page_events = self
            .store
            .limits()
            .read_count_max
            .clamp(1, READ_PAGE_EVENTS_MAX);
        let mut from = Revision::FIRST;
        let mut last = None;
        loop {
            let options = ReadStreamOptions::forwards().from(from).limit(page_events);
            let slice = match self.store.read_stream(stream, options).await {
                Ok(slice) => slice,
                Err(ReadStreamError::NotFound { .. }) => return Ok(last),
                Err(source) => {
                    return Err(ProcessError::Read {
                        process: P::CATEGORY,
                        stream: stream.clone(),
                        source,
                    });
                }
            };
            for recorded in &slice.events {
                apply(recorded)?;
                last = Some(recorded.revision);
            }
            if slice.is_end || slice.events.is_empty() {
                return Ok(last);
            }
            from = slice.next_revision;
        }
    }

    async fn load_stream(
        &self,
        stream: &StreamId,
    ) -> Result<ProcessInstance<P>, ProcessError<P::Error>> {
        let mut instance = ProcessInstance::fresh((self.fresh)());
        let version = self
            .read_whole(stream, |recorded| {
                if recorded.event_type.as_str() == REACTED_EVENT_TYPE {
                    let reacted: Reacted = recorded
                        .data_json()
                        .map_err(|error| Self::decode_error(recorded, error))?;
                    instance.apply_reacted(reacted);
                } else {
                    let event = self
                        .upcasters
                        .decode::<P::Event>(recorded)
                        .map_err(|error| Self::decode_error(recorded, error))?;
                    instance.state.evolve(&event);
                }
                Ok(())
            })
            .await?;
        instance.version = version;
        // A stream whose visible events start after revision 0 (truncated) still has a
        // version: the store's answer names the last revision.
        Ok(instance)
    }

    /// Folds the timeout index into the timers.
    async fn load_index(&mut self) -> Result<(), ProcessError<P::Error>> {
        let (timers, settled) = self.fold_index().await?;
        self.timers = timers;
        self.settled_since_compaction = settled;
        self.pending_gauge();
        Ok(())
    }

    /// The pending entries of the timeout index as stored, and the settled entries since its
    /// last compaction.
    async fn fold_index(
        &self,
    ) -> Result<(BTreeMap<(i64, Uuid), TimerEntry>, u64), ProcessError<P::Error>> {
        let mut timers = BTreeMap::new();
        let mut settled = 0u64;
        let index_stream = self.index_stream.clone();
        let mut by_id: HashMap<Uuid, (i64, Uuid)> = HashMap::new();
        self.read_whole(&index_stream, |recorded| {
            match recorded.event_type.as_str() {
                TIMEOUT_SCHEDULED => {
                    let entry: TimerEntry = recorded
                        .data_json()
                        .map_err(|error| Self::decode_error(recorded, error))?;
                    by_id.insert(entry.id, (entry.due_at_us, entry.id));
                    timers.insert((entry.due_at_us, entry.id), entry);
                }
                TIMEOUT_SETTLED => {
                    let entry: TimeoutSettled = recorded
                        .data_json()
                        .map_err(|error| Self::decode_error(recorded, error))?;
                    if let Some(key) = by_id.remove(&entry.id) {
                        timers.remove(&key);
                    }
                    settled += 1;
                }
                TIMEOUTS_COMPACTED => {
                    let compacted: TimeoutsCompacted = recorded
                        .data_json()
                        .map_err(|error| Self::decode_error(recorded, error))?;
                    if !compacted.continued {
                        timers.clear();
                        by_id.clear();
                        settled = 0;
                    }
                    for entry in compacted.pending {
                        by_id.insert(entry.id, (entry.due_at_us, entry.id));
                        timers.insert((entry.due_at_us, entry.id), entry);
                    }
                }
                other => {
                    return Err(Self::decode_error(
                        recorded,
                        format_args!("unknown timeout index record {other:?}"),
                    ));
                }
            }
            Ok(())
        })
        .await?;
        Ok((timers, settled))
    }

    fn pending_gauge(&self) {
        metrics::gauge!("factline_process_timeouts_pending", "process" => P::CATEGORY)
            .set(self.timers.len() as f64);
    }

    /// How long until the first timer is due (zero when overdue), if there is one.
    fn next_due_in(&self) -> Option<Duration> {
        let ((due_at_us, _), _) = self.timers.first_key_value()?;
        let now = Timestamp::now().as_unix_micros();
        let micros = u64::try_from(due_at_us.saturating_sub(now)).unwrap_or(0);
        Some(Duration::from_micros(micros))
    }

    async fn append_index(&self, events: Vec<EventData>) -> Result<(), ProcessError<P::Error>> {
        self.store
            .append(&self.index_stream, ExpectedVersion::Any, events)
            .await
            .map(drop)
            .map_err(|source| ProcessError::Append {
                process: P::CATEGORY,
                stream: self.index_stream.clone(),
                source,
            })
    }

    fn index_record<T: Serialize>(
        &self,
        event_type: &str,
        value: &T,
    ) -> Result<EventData, ProcessError<P::Error>> {
        EventData::json(event_type, value).map_err(|error| ProcessError::Encode {
            process: P::CATEGORY,
            instance: String::new(),
            reason: format!("a {event_type} record does not encode: {error}"),
        })
    }

    /// When the first input after `handled` (the last input handled) was recorded, if there is
    /// one yet: a timeout due at or after then must wait until the runner has handled it (a
    /// payment recorded in time beats its timeout, however late the runner reads it).
    async fn first_unread_input_at(
        &self,
        handled: Option<Position>,
    ) -> Result<Option<i64>, ProcessError<P::Error>> {
        let mut options = ReadAllOptions::forwards().limit(1).filter(P::filter());
        if let Some(handled) = handled {
            options = options.from(handled.next());
        }
        loop {
            let page = self
                .store
                .read_all(options.clone())
                .await
                .map_err(|error| ProcessError::Store {
                    process: P::CATEGORY,
                    source: match error {
                        ReadAllError::Storage(source) => source,
                        other => StorageError::backend(other),
                    },
                })?;
            if let Some(event) = page.events.first() {
                return Ok(Some(event.recorded_at.as_unix_micros()));
            }
            if page.is_end {
                return Ok(None);
            }
            // A filtered page may come back empty before the end (bounded work per read).
            options = options.from(page.next_position);
        }
    }

    /// Fires the timers that are due, in due order, each only once every input recorded by
    /// its due time is handled (`handled`: the last input handled). False when one waits for
    /// inputs.
    async fn fire_due(
        &mut self,
        handled: Option<Position>,
    ) -> Result<bool, ProcessError<P::Error>> {
        let now = Timestamp::now().as_unix_micros();
        // Read once: what this loop appends is recorded now, after every due time it fires.
        let first_unread = self.first_unread_input_at(handled).await?;
        while let Some(entry) = self
            .timers
            .first_key_value()
            .map(|(_, entry)| entry.clone())
        {
            if entry.due_at_us > now {
                break;
            }
            if first_unread.is_some_and(|recorded_at| recorded_at <= entry.due_at_us) {
                return Ok(false);
            }
            self.fire(&entry).await?;
            self.timers.remove(&(entry.due_at_us, entry.id));
            let settled = self.index_record(TIMEOUT_SETTLED, &TimeoutSettled { id: entry.id })?;
            self.append_index(vec![settled]).await?;
            self.settled_since_compaction += 1;
            if self.settled_since_compaction >= SETTLED_BETWEEN_COMPACTIONS {
                self.compact_index().await?;
            }
            self.pending_gauge();
        }
        Ok(true)
    }

    /// Writes the pending entries of the index (as stored, so that entries another runner
    /// wrote are kept) as compaction records in one append, and hides the older records.
    async fn compact_index(&mut self) -> Result<(), ProcessError<P::Error>> {
        let (timers, _) = self.fold_index().await?;
        let pending: Vec<TimerEntry> = timers.values().cloned().collect();
        let mut records = Vec::new();
        for (part, chunk) in pending.chunks(COMPACTED_ENTRIES_PER_RECORD).enumerate() {
            let compacted = TimeoutsCompacted {
                pending: chunk.to_vec(),
                continued: part > 0,
            };
            records.push(self.index_record(TIMEOUTS_COMPACTED, &compacted)?);
        }
        if records.is_empty() {
            let empty = TimeoutsCompacted {
                pending: Vec::new(),
                continued: false,
            };
            records.push(self.index_record(TIMEOUTS_COMPACTED, &empty)?);
        }
        let parts = records.len() as u64;
        let appended = self
            .store
            .append(&self.index_stream, ExpectedVersion::Any, records)
            .await
            .map_err(|source| ProcessError::Append {
                process: P::CATEGORY,
                stream: self.index_stream.clone(),
                source,
            })?;
        let metadata_error = |error: MetadataError| ProcessError::Store {
            process: P::CATEGORY,
            source: match error {
                MetadataError::Storage(source) => source,
                other => StorageError::backend(other),
            },
        };
        let mut metadata = self
            .store
            .stream_metadata(&self.index_stream)
            .await
            .map_err(metadata_error)?;
        // The first compaction record: every part of it stays visible.
        metadata.truncate_before =
            Some(Revision(appended.next_expected_version.value() + 1 - parts));
        self.store
            .set_stream_metadata(&self.index_stream, metadata)
            .await
            .map_err(metadata_error)?;
        self.timers = timers;
        self.settled_since_compaction = 0;
        Ok(())
    }

    /// Fires one timer: the instance reacts if the timeout is still pending there.
    async fn fire(&mut self, entry: &TimerEntry) -> Result<(), ProcessError<P::Error>> {
        let stream = self.instance_stream(&entry.instance)?;
        let input = InputRef::Timeout {
            id: entry.id,
            key: entry.key.clone(),
        };
        for _ in 0..APPEND_ATTEMPTS_MAX {
            let instance = match self.load_stream(&stream).await {
                Err(error) if is_tombstoned(&error) => {
                    tracing::warn!(process = P::CATEGORY, stream = %stream, "a timeout of a tombstoned instance is dropped");
                    return Ok(());
                }
                loaded => loaded?,
            };
            let pending = instance
                .pending
                .get(&entry.key)
                .filter(|pending| pending.id == entry.id)
                .cloned();
            let Some(pending) = pending else {
                // Fired before a crash (send its commands again), canceled, replaced, or a
                // phantom written ahead by a reaction that failed.
                if let Some(commands) = instance.recorded_commands(&input) {
                    let commands = commands.to_vec();
                    self.send_all(&commands).await?;
                }
                return Ok(());
            };
            let timeout: P::Timeout =
                serde_json::from_value(pending.payload).map_err(|error| ProcessError::Decode {
                    process: P::CATEGORY,
                    stream: stream.clone(),
                    revision: instance.version.unwrap_or(Revision::FIRST),
                    reason: format!("timeout {:?} payload: {error}", entry.key),
                })?;
            let reaction = instance
                .state
                .on_timeout(&entry.key, timeout)
                .map_err(|source| ProcessError::React {
                    process: P::CATEGORY,
                    instance: entry.instance.clone(),
                    source,
                })?;
            metrics::counter!("factline_process_timeouts_fired_total", "process" => P::CATEGORY)
                .increment(1);
            let cause = Cause {
                correlation_id: pending.correlation_id.clone(),
                causation_id: entry.id.to_string(),
            };
            if self
                .commit(
                    &stream,
                    &entry.instance,
                    &instance,
                    input.clone(),
                    reaction,
                    &cause,
                )
                .await?
            {
                return Ok(());
            }
        }
        Err(self.contended(&stream))
    }

    fn contended(&self, stream: &StreamId) -> ProcessError<P::Error> {
        ProcessError::Append {
            process: P::CATEGORY,
            stream: stream.clone(),
            source: AppendError::Storage(StorageError::backend(std::io::Error::other(format!(
                "the stream changed under {APPEND_ATTEMPTS_MAX} attempts in a row; is another \
                 runner of this process manager running?"
            )))),
        }
    }

    /// Handles one event of `$all`.
    async fn handle_input(&mut self, event: &RecordedEvent) -> Result<(), ProcessError<P::Error>> {
        if !self.upcasters.is_for::<P::Input>(event) {
            return Ok(());
        }
        let input = match self.upcasters.decode::<P::Input>(event) {
            Ok(input) => input,
            Err(DecodeError::UnknownEventType { .. })
                if !P::Input::event_types().contains(&event.event_type.as_str()) =>
            {
                return Ok(());
            }
            Err(error) => return Err(Self::decode_error(event, error)),
        };
        let Some(id) = P::correlate(&input, event) else {
            return Ok(());
        };
        let stream = self.instance_stream(&id)?;
        let input_ref = InputRef::Event {
            id: event.id,
            position: event.position.value(),
        };
        let cause = Cause {
            correlation_id: event
                .metadata
                .correlation_id()
                .map_or_else(|| event.id.to_string(), str::to_owned),
            causation_id: event.id.to_string(),
        };
        for _ in 0..APPEND_ATTEMPTS_MAX {
            let instance = match self.load_stream(&stream).await {
                Err(error) if is_tombstoned(&error) => {
                    tracing::warn!(process = P::CATEGORY, stream = %stream, position = event.position.value(), "an input for a tombstoned instance is passed over");
                    return Ok(());
                }
                loaded => loaded?,
            };
            if instance
                .last_input_position
                .is_some_and(|last| last >= event.position.value())
            {
                // Answered before a restart: only its commands may not have gone out.
                if let Some(commands) = instance.recorded_commands(&input_ref) {
                    let commands = commands.to_vec();
                    self.send_all(&commands).await?;
                }
                return Ok(());
            }
            let reaction =
                instance
                    .state
                    .react(&input, event)
                    .map_err(|source| ProcessError::React {
                        process: P::CATEGORY,
                        instance: id.clone(),
                        source,
                    })?;
            if reaction.is_empty() {
                return Ok(());
            }
            if self
                .commit(&stream, &id, &instance, input_ref.clone(), reaction, &cause)
                .await?
            {
                return Ok(());
            }
        }
        Err(self.contended(&stream))
    }

    /// Records `reaction` (timeouts written ahead to the index), then sends its commands.
    /// False when the instance's stream moved since it was loaded (load again and retry).
    async fn commit(
        &mut self,
        stream: &StreamId,
        instance_id: &str,
        instance: &ProcessInstance<P>,
        input: InputRef,
        reaction: Reaction<P>,
        cause: &Cause,
    ) -> Result<bool, ProcessError<P::Error>> {
        let encode_error = |reason: String| ProcessError::Encode {
            process: P::CATEGORY,
            instance: instance_id.to_owned(),
            reason,
        };
        if let Some(problem) = reaction.problem {
            return Err(encode_error(problem));
        }
        let now = Timestamp::now().as_unix_micros();
        let mut scheduled = Vec::with_capacity(reaction.scheduled.len());
        for (key, after, payload) in reaction.scheduled {
            let payload = payload.map_err(|error| {
                encode_error(format!("timeout {key:?} does not encode: {error}"))
            })?;
            let after_us = i64::try_from(after.as_micros()).unwrap_or(i64::MAX);
            scheduled.push(ScheduledTimeout {
                id: Uuid::now_v7(),
                key,
                due_at_us: now.saturating_add(after_us),
                payload,
                correlation_id: cause.correlation_id.clone(),
            });
        }
        if self.timers.len() + scheduled.len() > self.options.timeouts_pending_max {
            return Err(ProcessError::TooManyTimeouts {
                process: P::CATEGORY,
                max: self.options.timeouts_pending_max,
            });
        }
        let entries: Vec<TimerEntry> = scheduled
            .iter()
            .map(|s| TimerEntry {
                id: s.id,
                instance: instance_id.to_owned(),
                key: s.key.clone(),
                due_at_us: s.due_at_us,
            })
            .collect();
        if !entries.is_empty() {
            // Written ahead: an entry whose reaction then fails is a phantom the instance does
            // not know, dropped when it comes due.
            let records = entries
                .iter()
                .map(|entry| self.index_record(TIMEOUT_SCHEDULED, entry))
                .collect::<Result<Vec<_>, _>>()?;
            self.append_index(records).await?;
        }
        let commands: Vec<IssuedCommand> = reaction
            .commands
            .into_iter()
            .map(|command| IssuedCommand {
                command_type: command.command_type.to_owned(),
                message_id: Uuid::now_v7(),
                payload: command.payload,
                partition_key: command.partition_key,
                correlation_id: cause.correlation_id.clone(),
                causation_id: cause.causation_id.clone(),
            })
            .collect();
        let metadata = Metadata::new()
            .with(Metadata::CORRELATION_ID, cause.correlation_id.clone())
            .with(Metadata::CAUSATION_ID, cause.causation_id.clone());
        let mut events = reaction
            .events
            .iter()
            .map(|event| event.to_event_data(metadata.clone()))
            .collect::<Result<Vec<_>, EncodeError>>()
            .map_err(|error| encode_error(error.to_string()))?;
        let reacted = Reacted {
            input,
            commands: commands.clone(),
            scheduled,
            canceled: reaction.canceled,
        };
        let record = EventData::json(REACTED_EVENT_TYPE, &reacted)
            .map_err(|error| encode_error(format!("the reaction record does not encode: {error}")))?
            .with_all_metadata(metadata);
        events.push(record);
        let expected = instance
            .version
            .map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
        match self.store.append(stream, expected, events).await {
            Ok(_) => {}
            Err(AppendError::WrongExpectedVersion { .. }) => return Ok(false),
            Err(source) => {
                return Err(ProcessError::Append {
                    process: P::CATEGORY,
                    stream: stream.clone(),
                    source,
                });
            }
        }
        metrics::counter!("factline_process_reactions_total", "process" => P::CATEGORY)
            .increment(1);
        for entry in entries {
            self.timers.insert((entry.due_at_us, entry.id), entry);
        }
        self.pending_gauge();
        self.send_all(&commands).await?;
        Ok(true)
    }

    /// Sends `commands` in order, each retried with backoff.
    async fn send_all(&self, commands: &[IssuedCommand]) -> Result<(), ProcessError<P::Error>> {
        for command in commands {
            let mut backoff_ms = self.options.send_backoff_ms;
            let mut attempt = 1;
            loop {
                match self.commands.send(command).await {
                    Ok(()) => break,
                    Err(source) if attempt >= self.options.send_attempts_max => {
                        return Err(ProcessError::Send {
                            process: P::CATEGORY,
                            command_type: command.command_type.clone(),
                            message_id: command.message_id,
                            attempts: attempt,
                            source,
                        });
                    }
                    Err(error) => {
                        tracing::warn!(
                            process = P::CATEGORY,
                            command = %command.command_type,
                            message_id = %command.message_id,
                            attempt,
                            %error,
                            "sending a command failed; retrying"
                        );
                        tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                        backoff_ms = backoff_ms.saturating_mul(2);
                        attempt += 1;
                    }
                }
            }
            metrics::counter!("factline_process_commands_sent_total", "process" => P::CATEGORY)
                .increment(1);
        }
        Ok(())
    }
}

/// True for the error of reading a tombstoned instance stream.
fn is_tombstoned<E: std::error::Error + Send + Sync + 'static>(error: &ProcessError<E>) -> bool {
    matches!(
        error,
        ProcessError::Read {
            source: ReadStreamError::Deleted { .. },
            ..
        }
    )
}

/// The correlation and causation ids a reaction's events and commands carry.
struct Cause {
    correlation_id: String,
    causation_id: String,
}
