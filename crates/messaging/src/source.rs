//! The event store as a message source: [`EventStoreSubscriber`] is a [`Subscriber`] whose
//! subscriptions are store subscriptions, delivered as [`Message`]s.
//!
//! # Topics
//!
//! | topic            | delivers                                  | reads                                         |
//! |------------------|-------------------------------------------|-----------------------------------------------|
//! | `$all`           | every event of the global log             | `subscribe_to_all`, no filter                 |
//! | `$ce-{category}` | the streams `{category}-…` and `{category}` | `subscribe_to_all`, [`EventFilter::category`] |
//! | `$et-{prefix}`   | the event types starting with `{prefix}`  | `subscribe_to_all`, [`EventFilter::event_type_prefix`] |
//! | anything else    | the one stream of that id                 | `subscribe_to_stream`                         |
//!
//! factline stream ids are `{category}-{id}`: the category is the part before the first `-`, so
//! a `$ce-` topic whose category contains `-` can match nothing and is refused, as are an empty
//! category or prefix, any other name starting with `$` (reserved by [`StreamId::new`]) and
//! whatever [`check_topic`] refuses: all as [`SubscribeError::InvalidTopic`]. [`SourceTopic`]
//! parses topics without subscribing.
//!
//! # Messages
//!
//! [`message_from_event`] maps a [`RecordedEvent`]: the message id is the event id, the payload
//! the event's data (byte for byte), the metadata the event's metadata (so `correlation_id` and
//! `causation_id` pass through unchanged) plus these keys, which replace same-named entries of
//! the event's metadata because the store's values are authoritative:
//!
//! | key                         | value                                             |
//! |-----------------------------|---------------------------------------------------|
//! | [`Metadata::MESSAGE_TYPE`]  | the event type                                    |
//! | [`Metadata::CONTENT_TYPE`]  | the MIME type (`application/json`, …)            |
//! | [`Metadata::PARTITION_KEY`] | the stream id (handlers keyed by it stay ordered per stream) |
//! | [`STREAM_KEY`]              | the stream id                                     |
//! | [`REVISION_KEY`]            | the revision in its stream, in decimal            |
//! | [`POSITION_KEY`]            | the position in `$all`, in decimal                |
//! | [`RECORDED_AT_KEY`]         | when it was recorded, RFC 3339 with microseconds  |
//!
//! # Acknowledgement and checkpoints
//!
//! A store has no broker-side acknowledgement; the subscriber keeps it. Each subscription
//! delivers events in store order (positions for `$all` topics, revisions for a stream) with at
//! most [`SourceOptions::in_flight_max`] deliveries unsettled: at the limit the stream yields
//! nothing more until one is settled.
//!
//! - **Ack** records progress. The *checkpoint* is the last event such that it and every event
//!   delivered before it are acked: acks out of order do not move it past an unsettled event.
//!   [`EventStoreSubscriber::subscribe_tracked`] returns it through a [`CheckpointHandle`]
//!   (a [`Checkpoint::Position`] for `$all`, `$ce-` and `$et-` topics, a
//!   [`Checkpoint::Revision`] for a stream topic). Persist it and pass
//!   [`CheckpointHandle::resume_from`] to [`EventStoreSubscriber::subscribe_tracked_from`]
//!   to resume: nothing is skipped, and what is redelivered is at most what was delivered
//!   after the checkpoint.
//! - **Nack and drop** (a message dropped unsettled) redeliver. The subscription resubscribes
//!   from the earliest refused event, so that event **and every event delivered after it** are
//!   delivered again, in order, even those already acked or still being handled (their late
//!   settlements are ignored: the redelivery is the one that counts). A nack delay pauses the
//!   whole subscription until it has passed (order is kept, so nothing later can overtake the
//!   refused event); when several refusals are pending the longest remaining delay applies.
//!   [`NackPolicy`] sets the delay of nacks without one and of drops, and caps requested delays.
//!   A superseded delivery still counts against `in_flight_max` until it is settled or dropped.
//!
//! So delivery is at least once and ordered: never a gap, duplicates only after a nack or a
//! drop (and after resuming from a checkpoint, for what was delivered after it).
//!
//! # Store errors
//!
//! An error of a store subscription is yielded as a [`ReceiveError::Transport`] item holding
//! the store's error (a [`factline_core::SubscriptionError`] or [`factline_core::SubscribeError`],
//! or [`SubscriptionEnded`]: downcast it to tell). Then:
//!
//! - a permanent error ends the message stream: the subscribed store stream was tombstoned
//!   (`SubscriptionError::Deleted`) or the store was closed (`StorageError::Closed`);
//! - any other error is retried: after a backoff ([`RetryPolicy`]: doubling from
//!   `backoff_initial` up to `backoff_max`) the subscription reopens right after the last event
//!   it delivered, so a retry neither skips nor repeats anything. With
//!   [`RetryPolicy::retries_max`], the stream ends after that many consecutive failures (none
//!   delivered an event in between).
//!
//! # Closing
//!
//! [`Subscriber::close`] ends every open stream of the subscriber (and its clones), even one
//! waiting for an event, and makes later subscribes fail with [`SubscribeError::Closed`].
//! Unsettled messages stay settleable; they are redelivered by whoever resumes from the
//! checkpoint.
//!
//! ```
//! use factline_core::{EventData, EventStore, ExpectedVersion, InMemoryStore, StreamId};
//! use factline_messaging::source::{Checkpoint, EventStoreSubscriber, POSITION_KEY};
//! use futures::StreamExt;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let store = InMemoryStore::new();
//! let subscriber = EventStoreSubscriber::new(store.clone());
//! let (mut orders, checkpoint) = subscriber.subscribe_tracked("$ce-order").await?;
//!
//! let placed = EventData::json("OrderPlaced", &serde_json::json!({"total_cents": 1250}))?;
//! store.append(&StreamId::new("order-42")?, ExpectedVersion::NoStream, vec![placed]).await?;
//!
//! let message = orders.next().await.transpose()?.expect("one message");
//! assert_eq!(message.partition_key(), Some("order-42"));
//! assert_eq!(message.metadata.get(POSITION_KEY), Some("0"));
//! message.ack();
//! assert_eq!(checkpoint.checkpoint(), Some(Checkpoint::Position(factline_core::Position(0))));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use factline_core::{
    EventFilter, EventStore, Position, ReadStreamError, ReadStreamOptions, RecordedEvent, Revision,
    StorageError, StreamId, SubscribeFrom, Subscription, SubscriptionError,
};
use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::message::{Acknowledger, Message, MessageId, Metadata, Outcome};
use crate::pubsub::{
    BoxError, CloseError, InvalidTopic, MessageStream, ReceiveError, SubscribeError, Subscriber,
    check_topic,
};

/// Metadata key of the id of the event's stream.
pub const STREAM_KEY: &str = "stream";
/// Metadata key of the event's revision in its stream (decimal).
pub const REVISION_KEY: &str = "revision";
/// Metadata key of the event's position in `$all` (decimal).
pub const POSITION_KEY: &str = "position";
/// Metadata key of when the event was recorded (RFC 3339, UTC, microseconds).
pub const RECORDED_AT_KEY: &str = "recorded_at";

/// The topic of the whole global log.
pub const ALL_TOPIC: &str = "$all";
/// The prefix of category topics: `$ce-order` delivers the streams `order-…`.
pub const CATEGORY_TOPIC_PREFIX: &str = "$ce-";
/// The prefix of event type topics: `$et-Order` delivers the event types `Order…`.
pub const EVENT_TYPE_TOPIC_PREFIX: &str = "$et-";

/// Longest nack delay ever waited, whatever [`NackPolicy::delay_max`] says (keeps deadlines
/// representable).
const NACK_DELAY_LIMIT: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The message of an event, without a delivery (see the module docs for the mapping).
pub fn message_from_event(event: &RecordedEvent) -> Message {
    let mut metadata: Metadata = event.metadata.iter().collect();
    metadata.insert(Metadata::MESSAGE_TYPE, event.event_type.as_str());
    metadata.insert(Metadata::CONTENT_TYPE, event.content_type.as_mime());
    metadata.insert(Metadata::PARTITION_KEY, event.stream.as_str());
    metadata.insert(STREAM_KEY, event.stream.as_str());
    metadata.insert(REVISION_KEY, event.revision.value().to_string());
    metadata.insert(POSITION_KEY, event.position.value().to_string());
    metadata.insert(RECORDED_AT_KEY, event.recorded_at.to_rfc3339());
    let mut message = Message::with_id(MessageId::from_uuid(event.id), event.data.clone());
    message.metadata = metadata;
    message
}

/// What a topic of an [`EventStoreSubscriber`] reads (see the module docs for the syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceTopic {
    /// `$all`: the whole global log.
    All,
    /// `$ce-{category}`: the streams of one category.
    Category(String),
    /// `$et-{prefix}`: the event types starting with a prefix.
    EventTypePrefix(String),
    /// Any other topic: one stream.
    Stream(StreamId),
}

impl SourceTopic {
    /// Parses `topic`.
    pub fn parse(topic: &str) -> Result<Self, InvalidTopic> {
        check_topic(topic)?;
        let invalid = |reason: String| InvalidTopic {
            topic: topic.to_owned(),
            reason,
        };
        if topic == ALL_TOPIC {
            return Ok(Self::All);
        }
        if let Some(category) = topic.strip_prefix(CATEGORY_TOPIC_PREFIX) {
            if category.is_empty() {
                return Err(invalid(format!(
                    "a category topic names its category: {CATEGORY_TOPIC_PREFIX}{{category}}"
                )));
            }
            if category.contains('-') {
                return Err(invalid(
                    "a category is the part of a stream id before its first '-', so it cannot \
                     contain '-'"
                        .into(),
                ));
            }
            return Ok(Self::Category(category.to_owned()));
        }
        if let Some(prefix) = topic.strip_prefix(EVENT_TYPE_TOPIC_PREFIX) {
            if prefix.is_empty() {
                return Err(invalid(format!(
                    "an event type topic names a prefix: {EVENT_TYPE_TOPIC_PREFIX}{{prefix}} \
                     ({ALL_TOPIC} delivers every event)"
                )));
            }
            return Ok(Self::EventTypePrefix(prefix.to_owned()));
        }
        StreamId::new(topic)
            .map(Self::Stream)
            .map_err(|error| invalid(error.to_string()))
    }

    /// The `$all` filter of the topic; `None` for a stream topic.
    pub fn filter(&self) -> Option<EventFilter> {
        match self {
            Self::All => Some(EventFilter::all()),
            Self::Category(category) => Some(EventFilter::all().category(category.as_str())),
            Self::EventTypePrefix(prefix) => {
                Some(EventFilter::all().event_type_prefix(prefix.as_str()))
            }
            Self::Stream(_) => None,
        }
    }
}

impl fmt::Display for SourceTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str(ALL_TOPIC),
            Self::Category(category) => write!(f, "{CATEGORY_TOPIC_PREFIX}{category}"),
            Self::EventTypePrefix(prefix) => write!(f, "{EVENT_TYPE_TOPIC_PREFIX}{prefix}"),
            Self::Stream(stream) => f.write_str(stream.as_str()),
        }
    }
}

/// How far a subscription got: the last event acked with every event delivered before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Checkpoint {
    /// A position in `$all`: the checkpoint of `$all`, `$ce-` and `$et-` topics. A stream topic
    /// accepts it as a start too (it skips the stream's events up to that position).
    Position(Position),
    /// A revision of the stream: the checkpoint of a stream topic.
    Revision(Revision),
}

impl Checkpoint {
    /// The position, when this is one.
    pub fn position(self) -> Option<Position> {
        match self {
            Self::Position(position) => Some(position),
            Self::Revision(_) => None,
        }
    }

    /// The revision, when this is one.
    pub fn revision(self) -> Option<Revision> {
        match self {
            Self::Revision(revision) => Some(revision),
            Self::Position(_) => None,
        }
    }
}

impl From<Position> for Checkpoint {
    fn from(position: Position) -> Self {
        Self::Position(position)
    }
}

impl From<Revision> for Checkpoint {
    fn from(revision: Revision) -> Self {
        Self::Revision(revision)
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Position(position) => write!(f, "position {position}"),
            Self::Revision(revision) => write!(f, "revision {revision}"),
        }
    }
}

/// Where a subscription of an [`EventStoreSubscriber`] starts: [`SubscribeFrom::Start`],
/// [`SubscribeFrom::End`] (fixed when the subscribe returns) or [`SubscribeFrom::After`] a
/// checkpoint. `$all`, `$ce-` and `$et-` topics take a [`Checkpoint::Position`] (a revision is
/// refused as [`SubscribeError::InvalidTopic`]); a stream topic takes either.
pub type StartFrom = SubscribeFrom<Checkpoint>;

/// What happens to refused deliveries (nacked or dropped): they are always redelivered, from
/// the earliest refused event on; this sets when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct NackPolicy {
    /// Delay before redelivering after a nack without a delay, or a dropped delivery.
    pub default_delay: Duration,
    /// Longest delay waited; longer requested delays are shortened to it.
    pub delay_max: Duration,
}

impl Default for NackPolicy {
    fn default() -> Self {
        Self {
            default_delay: Duration::ZERO,
            delay_max: Duration::from_secs(15 * 60),
        }
    }
}

impl NackPolicy {
    /// Builder: see [`NackPolicy::default_delay`].
    #[must_use]
    pub fn default_delay(mut self, delay: Duration) -> Self {
        self.default_delay = delay;
        self
    }

    /// Builder: see [`NackPolicy::delay_max`].
    #[must_use]
    pub fn delay_max(mut self, delay: Duration) -> Self {
        self.delay_max = delay;
        self
    }

    /// The delay to wait for a delivery settled with `outcome` (zero for an ack).
    pub fn delay_for(&self, outcome: Outcome) -> Duration {
        let requested = match outcome {
            Outcome::Acked => return Duration::ZERO,
            Outcome::Nacked { delay } => delay.unwrap_or(self.default_delay),
            Outcome::Dropped => self.default_delay,
        };
        requested.min(self.delay_max).min(NACK_DELAY_LIMIT)
    }
}

/// How a subscription retries after a store error that is not permanent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Wait after the first failure; doubled after each further consecutive one.
    pub backoff_initial: Duration,
    /// Longest wait between retries.
    pub backoff_max: Duration,
    /// End the stream after this many consecutive failures; `None` retries as long as it takes.
    pub retries_max: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            retries_max: None,
        }
    }
}

impl RetryPolicy {
    /// Builder: see [`RetryPolicy::backoff_initial`].
    #[must_use]
    pub fn backoff_initial(mut self, backoff: Duration) -> Self {
        self.backoff_initial = backoff;
        self
    }

    /// Builder: see [`RetryPolicy::backoff_max`].
    #[must_use]
    pub fn backoff_max(mut self, backoff: Duration) -> Self {
        self.backoff_max = backoff;
        self
    }

    /// Builder: see [`RetryPolicy::retries_max`].
    #[must_use]
    pub fn retries_max(mut self, retries: Option<u32>) -> Self {
        self.retries_max = retries;
        self
    }

    /// The wait after the `failures`-th consecutive failure (1-based).
    pub fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.backoff_initial
            .saturating_mul(1_u32 << doublings)
            .min(self.backoff_max)
            .min(NACK_DELAY_LIMIT)
    }
}

/// Settings of an [`EventStoreSubscriber`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SourceOptions {
    /// Where [`Subscriber::subscribe`] and [`EventStoreSubscriber::subscribe_tracked`] start.
    /// Default: the start, so that nothing is missed.
    pub start: StartFrom,
    /// Unsettled deliveries per subscription, at least 1. Default 1,024.
    pub in_flight_max: usize,
    /// When refused deliveries are redelivered.
    pub nack: NackPolicy,
    /// How store errors are retried.
    pub retry: RetryPolicy,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            start: SubscribeFrom::Start,
            in_flight_max: 1_024,
            nack: NackPolicy::default(),
            retry: RetryPolicy::default(),
        }
    }
}

impl SourceOptions {
    /// Builder: see [`SourceOptions::start`].
    #[must_use]
    pub fn start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Builder: see [`SourceOptions::in_flight_max`] (at least 1).
    #[must_use]
    pub fn in_flight_max(mut self, deliveries: usize) -> Self {
        self.in_flight_max = deliveries.max(1);
        self
    }

    /// Builder: see [`SourceOptions::nack`].
    #[must_use]
    pub fn nack(mut self, policy: NackPolicy) -> Self {
        self.nack = policy;
        self
    }

    /// Builder: see [`SourceOptions::retry`].
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }
}

/// The store ended a subscription without an error (stores should not; it is retried).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the store ended the subscription without an error")]
#[non_exhaustive]
pub struct SubscriptionEnded;

/// A [`Subscriber`] over an [`EventStore`]; see the module docs. Cheap to clone; clones share
/// the store and the closed state.
pub struct EventStoreSubscriber<S: ?Sized> {
    store: Arc<S>,
    options: SourceOptions,
    closed: CancellationToken,
}

impl<S: ?Sized> Clone for EventStoreSubscriber<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            options: self.options.clone(),
            closed: self.closed.clone(),
        }
    }
}

impl<S: ?Sized> fmt::Debug for EventStoreSubscriber<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStoreSubscriber")
            .field("options", &self.options)
            .field("closed", &self.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl<S: EventStore + 'static> EventStoreSubscriber<S> {
    /// A subscriber over `store` with default options.
    pub fn new(store: S) -> Self {
        Self::with_options(store, SourceOptions::default())
    }

    /// A subscriber over `store` with `options`.
    pub fn with_options(store: S, options: SourceOptions) -> Self {
        Self::from_arc(Arc::new(store), options)
    }
}

impl<S: EventStore + ?Sized + 'static> EventStoreSubscriber<S> {
    /// A subscriber over a shared store (e.g. an `Arc<dyn EventStore>`).
    pub fn from_arc(store: Arc<S>, mut options: SourceOptions) -> Self {
        options.in_flight_max = options.in_flight_max.max(1);
        Self {
            store,
            options,
            closed: CancellationToken::new(),
        }
    }

    /// Its settings.
    pub fn options(&self) -> &SourceOptions {
        &self.options
    }

    /// The store it reads.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Whether [`Subscriber::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Subscribes to `topic` from [`SourceOptions::start`], returning the messages and the
    /// subscription's checkpoint.
    pub async fn subscribe_tracked(
        &self,
        topic: &str,
    ) -> Result<(MessageStream, CheckpointHandle), SubscribeError> {
        self.subscribe_tracked_from(topic, self.options.start).await
    }

    /// Subscribes to `topic` from `start` (e.g. a persisted checkpoint), returning the messages
    /// and the subscription's checkpoint.
    pub async fn subscribe_tracked_from(
        &self,
        topic: &str,
        start: StartFrom,
    ) -> Result<(MessageStream, CheckpointHandle), SubscribeError> {
        if self.closed.is_cancelled() {
            return Err(SubscribeError::Closed);
        }
        let parsed = SourceTopic::parse(topic)?;
        let resolved = self.resolve(topic, parsed, start).await?;
        let (checkpoint_sender, checkpoint_receiver) = watch::channel(resolved.checkpoint);
        let tracker = Arc::new(Tracker {
            kind: resolved.source.kind(),
            in_flight_max: self.options.in_flight_max,
            nack: self.options.nack,
            state: Mutex::new(TrackerState {
                pending: VecDeque::new(),
                in_flight: 0,
                next_seq: 0,
                refusal: None,
                acked_position: resolved.position,
            }),
            wake: Notify::new(),
            checkpoint: checkpoint_sender,
        });
        let mut driver = Driver {
            store: self.store.clone(),
            source: resolved.source,
            subscription: None,
            tracker: tracker.clone(),
            closed: self.closed.clone(),
            retry: self.options.retry,
            failures: 0,
            retry_at: None,
            finished: false,
        };
        // Open now: a refused subscription (a tombstoned stream, a closed store) fails the
        // subscribe rather than the first receive.
        let subscription = Driver::open(&*driver.store, &driver.source)
            .await
            .map_err(|failure| SubscribeError::Transport(failure.error))?;
        driver.subscription = Some(subscription);
        tracing::debug!(topic, start = ?start, "subscribed to the event store");
        let handle = CheckpointHandle {
            tracker,
            receiver: checkpoint_receiver,
            start: resolved.start,
        };
        let stream = futures::stream::unfold(driver, |mut driver| async move {
            let item = driver.next().await?;
            Some((item, driver))
        });
        Ok((MessageStream::new(stream.fuse()), handle))
    }

    /// Turns a requested start into a concrete one (`End` becomes the current end), so that a
    /// retry or a resume never depends on when it happens.
    async fn resolve(
        &self,
        topic: &str,
        parsed: SourceTopic,
        start: StartFrom,
    ) -> Result<Resolved, SubscribeError> {
        match parsed {
            SourceTopic::Stream(stream) => self.resolve_stream(stream, start).await,
            other => {
                let filter = other.filter().unwrap_or_default();
                self.resolve_all(topic, filter, start).await
            }
        }
    }

    async fn resolve_all(
        &self,
        topic: &str,
        filter: EventFilter,
        start: StartFrom,
    ) -> Result<Resolved, SubscribeError> {
        let after = match start {
            SubscribeFrom::Start => None,
            SubscribeFrom::After(Checkpoint::Position(position)) => Some(position),
            SubscribeFrom::After(Checkpoint::Revision(_)) => {
                return Err(SubscribeError::InvalidTopic(InvalidTopic {
                    topic: topic.to_owned(),
                    reason: "this topic reads $all: start it after a position, not a revision"
                        .into(),
                }));
            }
            SubscribeFrom::End => self
                .store
                .head_position()
                .await
                .map_err(|error| SubscribeError::Transport(Box::new(error)))?,
        };
        Ok(Resolved {
            source: Source::All {
                filter,
                cursor: after.map_or(SubscribeFrom::Start, SubscribeFrom::After),
            },
            checkpoint: after.map(Checkpoint::Position),
            position: after,
            start: after.map_or(SubscribeFrom::Start, |position| {
                SubscribeFrom::After(Checkpoint::Position(position))
            }),
        })
    }

    async fn resolve_stream(
        &self,
        stream: StreamId,
        start: StartFrom,
    ) -> Result<Resolved, SubscribeError> {
        let (cursor, skip_through, position) = match start {
            SubscribeFrom::Start => (None, None, None),
            SubscribeFrom::After(Checkpoint::Revision(revision)) => (Some(revision), None, None),
            SubscribeFrom::After(Checkpoint::Position(position)) => {
                (None, Some(position), Some(position))
            }
            SubscribeFrom::End => {
                let options = ReadStreamOptions::backwards().limit(1);
                match self.store.read_stream(&stream, options).await {
                    Ok(slice) => (
                        Some(slice.last_revision),
                        None,
                        slice.events.first().map(|event| event.position),
                    ),
                    Err(ReadStreamError::NotFound { .. }) => (None, None, None),
                    Err(ReadStreamError::Deleted { stream }) => {
                        let error = factline_core::SubscribeError::Deleted { stream };
                        return Err(SubscribeError::Transport(Box::new(error)));
                    }
                    Err(error) => return Err(SubscribeError::Transport(Box::new(error))),
                }
            }
        };
        let start = match (skip_through, cursor) {
            (Some(position), _) => SubscribeFrom::After(Checkpoint::Position(position)),
            (None, Some(revision)) => SubscribeFrom::After(Checkpoint::Revision(revision)),
            (None, None) => SubscribeFrom::Start,
        };
        Ok(Resolved {
            source: Source::Stream {
                stream,
                cursor: cursor.map_or(SubscribeFrom::Start, SubscribeFrom::After),
                skip_through,
            },
            checkpoint: cursor.map(Checkpoint::Revision),
            position,
            start,
        })
    }
}

#[async_trait]
impl<S: EventStore + ?Sized + 'static> Subscriber for EventStoreSubscriber<S> {
    async fn subscribe(&self, topic: &str) -> Result<MessageStream, SubscribeError> {
        let (stream, _checkpoint) = self.subscribe_tracked(topic).await?;
        Ok(stream)
    }

    async fn close(&self) -> Result<(), CloseError> {
        self.closed.cancel();
        Ok(())
    }
}

/// The progress of one subscription of an [`EventStoreSubscriber`]. Cheap to clone; it stays
/// readable after the stream has ended.
#[derive(Clone)]
pub struct CheckpointHandle {
    tracker: Arc<Tracker>,
    receiver: watch::Receiver<Option<Checkpoint>>,
    start: StartFrom,
}

impl fmt::Debug for CheckpointHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointHandle")
            .field("checkpoint", &self.checkpoint())
            .field("start", &self.start)
            .field("unsettled", &self.unsettled())
            .finish()
    }
}

impl CheckpointHandle {
    /// The checkpoint: the last event acked with every event delivered before it, or the
    /// checkpoint the subscription started after; `None` when it started at the start and
    /// nothing is acked yet. A [`Checkpoint::Position`] for `$all`, `$ce-` and `$et-` topics, a
    /// [`Checkpoint::Revision`] for a stream topic.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        *self.receiver.borrow()
    }

    /// The `$all` position of the checkpoint. For a stream topic, the position of its event
    /// (`None` until one is acked, unless the subscription started after a position or at
    /// the end of a stream with events).
    pub fn position(&self) -> Option<Position> {
        self.tracker.lock().acked_position
    }

    /// Where to resume a new subscription of the same topic: after the checkpoint, or where
    /// this one started (with `End` fixed to the position it stood for).
    pub fn resume_from(&self) -> StartFrom {
        self.checkpoint().map_or(self.start, SubscribeFrom::After)
    }

    /// A receiver that sees every advance of the checkpoint (e.g. to persist it).
    pub fn watch(&self) -> watch::Receiver<Option<Checkpoint>> {
        self.receiver.clone()
    }

    /// Deliveries not settled yet (including superseded ones a redelivery made stale).
    pub fn unsettled(&self) -> usize {
        self.tracker.lock().in_flight
    }
}

/// A start made concrete.
struct Resolved {
    source: Source,
    checkpoint: Option<Checkpoint>,
    position: Option<Position>,
    start: StartFrom,
}

/// What a subscription reads, and where it reopens.
enum Source {
    All {
        filter: EventFilter,
        cursor: SubscribeFrom<Position>,
    },
    Stream {
        stream: StreamId,
        cursor: SubscribeFrom<Revision>,
        /// Events at or before this position are skipped (a start after a position).
        skip_through: Option<Position>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    All,
    Stream,
}

impl Source {
    fn kind(&self) -> Kind {
        match self {
            Self::All { .. } => Kind::All,
            Self::Stream { .. } => Kind::Stream,
        }
    }

    /// Whether `event` falls before the requested start.
    fn skips(&self, event: &RecordedEvent) -> bool {
        match self {
            Self::All { .. } => false,
            Self::Stream { skip_through, .. } => {
                skip_through.is_some_and(|position| event.position <= position)
            }
        }
    }

    /// Moves the reopen point past a delivered event.
    fn delivered(&mut self, event: &RecordedEvent) {
        match self {
            Self::All { cursor, .. } => *cursor = SubscribeFrom::After(event.position),
            Self::Stream { cursor, .. } => *cursor = SubscribeFrom::After(event.revision),
        }
    }

    /// Moves the reopen point back to just before a refused event.
    fn rewind(&mut self, refusal: &Refusal) {
        match self {
            Self::All { cursor, .. } => {
                *cursor = match refusal.position.value().checked_sub(1) {
                    Some(before) => SubscribeFrom::After(Position(before)),
                    None => SubscribeFrom::Start,
                }
            }
            Self::Stream { cursor, .. } => {
                *cursor = match refusal.revision.value().checked_sub(1) {
                    Some(before) => SubscribeFrom::After(Revision(before)),
                    None => SubscribeFrom::Start,
                }
            }
        }
    }
}

/// A store error, and whether retrying is pointless.
struct Failure {
    error: BoxError,
    permanent: bool,
}

impl Failure {
    fn of_subscription(error: SubscriptionError) -> Self {
        let permanent = matches!(
            error,
            SubscriptionError::Deleted { .. } | SubscriptionError::Storage(StorageError::Closed)
        );
        Self {
            error: Box::new(error),
            permanent,
        }
    }

    fn of_subscribe(error: factline_core::SubscribeError) -> Self {
        let permanent = matches!(
            error,
            factline_core::SubscribeError::Deleted { .. }
                | factline_core::SubscribeError::Storage(StorageError::Closed)
        );
        Self {
            error: Box::new(error),
            permanent,
        }
    }
}

/// The state one subscription's deliveries share with its stream.
struct Tracker {
    kind: Kind,
    in_flight_max: usize,
    nack: NackPolicy,
    state: Mutex<TrackerState>,
    /// Wakes the stream: a refusal to handle, or a slot freed at the limit.
    wake: Notify,
    checkpoint: watch::Sender<Option<Checkpoint>>,
}

struct TrackerState {
    /// Deliveries not yet covered by the checkpoint, in delivery (= position) order. Acked
    /// entries never sit next to each other (a run of acks keeps only its last), so the queue
    /// holds at most about twice the unsettled deliveries.
    pending: VecDeque<Entry>,
    /// Unsettled deliveries, superseded ones included.
    in_flight: usize,
    next_seq: u64,
    /// The earliest refused delivery not yet redelivered.
    refusal: Option<Refusal>,
    acked_position: Option<Position>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Tells a delivery from an earlier one of the same event.
    seq: u64,
    position: Position,
    revision: Revision,
    acked: bool,
}

#[derive(Debug, Clone, Copy)]
struct Refusal {
    position: Position,
    revision: Revision,
    /// Redeliver no sooner than this.
    due: Instant,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under this lock is completed before anything can panic, so a poisoned lock
    // still guards consistent data.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, TrackerState> {
        lock(&self.state)
    }

    fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Records the delivery of `event`; `None` (nothing recorded) while a refusal waits, since
    /// the stream is about to rewind to before `event`.
    fn deliver(&self, event: &RecordedEvent) -> Option<u64> {
        let mut state = self.lock();
        if state.refusal.is_some() {
            return None;
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.in_flight += 1;
        state.pending.push_back(Entry {
            seq,
            position: event.position,
            revision: event.revision,
            acked: false,
        });
        Some(seq)
    }

    /// Takes the pending refusal and forgets the deliveries it supersedes (the refused one and
    /// everything after it): their settlements no longer count.
    fn take_refusal(&self) -> Option<Refusal> {
        let mut state = self.lock();
        let refusal = state.refusal.take()?;
        let keep = state
            .pending
            .partition_point(|entry| entry.position < refusal.position);
        state.pending.truncate(keep);
        Some(refusal)
    }

    fn settle(&self, seq: u64, position: Position, outcome: Outcome) {
        let wake = {
            let mut state = self.lock();
            let was_full = state.in_flight >= self.in_flight_max;
            state.in_flight = state.in_flight.saturating_sub(1);
            let index = state
                .pending
                .binary_search_by_key(&position, |entry| entry.position)
                .ok()
                .filter(|&index| state.pending[index].seq == seq);
            match (index, outcome) {
                // Superseded by a redelivery: only the slot counts.
                (None, _) => was_full,
                (Some(index), Outcome::Acked) => {
                    self.ack(&mut state, index);
                    was_full
                }
                (Some(index), Outcome::Nacked { .. } | Outcome::Dropped) => {
                    let entry = state.pending[index];
                    let due = deadline(self.nack.delay_for(outcome));
                    state.refusal = Some(match state.refusal {
                        Some(earlier) => Refusal {
                            position: earlier.position.min(entry.position),
                            revision: if earlier.position <= entry.position {
                                earlier.revision
                            } else {
                                entry.revision
                            },
                            due: earlier.due.max(due),
                        },
                        None => Refusal {
                            position: entry.position,
                            revision: entry.revision,
                            due,
                        },
                    });
                    tracing::debug!(
                        position = entry.position.value(),
                        ?outcome,
                        "event refused: redelivering from it"
                    );
                    true
                }
            }
        };
        if wake {
            self.wake.notify_one();
        }
    }

    /// Marks `pending[index]` acked, keeps acked entries apart, and advances the checkpoint
    /// over the acked front.
    fn ack(&self, state: &mut TrackerState, mut index: usize) {
        state.pending[index].acked = true;
        if index > 0 && state.pending[index - 1].acked {
            state.pending.remove(index - 1);
            index -= 1;
        }
        if state
            .pending
            .get(index + 1)
            .is_some_and(|entry| entry.acked)
        {
            state.pending.remove(index);
        }
        let mut advanced = None;
        while let Some(front) = state.pending.front().copied() {
            if !front.acked {
                break;
            }
            state.pending.pop_front();
            advanced = Some(front);
        }
        if let Some(entry) = advanced {
            state.acked_position = Some(entry.position);
            let checkpoint = match self.kind {
                Kind::All => Checkpoint::Position(entry.position),
                Kind::Stream => Checkpoint::Revision(entry.revision),
            };
            // Sent under the lock, so concurrent acks publish checkpoints in order.
            self.checkpoint.send_replace(Some(checkpoint));
        }
    }
}

/// Waits until `due`; false when `closed` was cancelled first.
async fn sleep_until(closed: &CancellationToken, due: Instant) -> bool {
    if due <= Instant::now() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep_until(due) => true,
        () = closed.cancelled() => false,
    }
}

fn deadline(delay: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(delay).unwrap_or(now)
}

/// The delivery of one event.
struct SourceDelivery {
    tracker: Arc<Tracker>,
    seq: u64,
    position: Position,
}

impl Acknowledger for SourceDelivery {
    fn settled(&self, outcome: Outcome) {
        self.tracker.settle(self.seq, self.position, outcome);
    }
}

/// One subscription's stream: reads the store subscription, reopening it to redeliver and to
/// recover from errors.
struct Driver<S: ?Sized> {
    store: Arc<S>,
    source: Source,
    subscription: Option<Subscription>,
    tracker: Arc<Tracker>,
    closed: CancellationToken,
    retry: RetryPolicy,
    /// Consecutive failures since the last delivered event.
    failures: u32,
    /// Reopen no sooner than this (backoff after an error).
    retry_at: Option<Instant>,
    finished: bool,
}

impl<S: EventStore + ?Sized + 'static> Driver<S> {
    async fn next(&mut self) -> Option<Result<Message, ReceiveError>> {
        loop {
            if self.finished || self.closed.is_cancelled() {
                self.subscription = None;
                return None;
            }
            if let Some(refusal) = self.tracker.take_refusal() {
                self.subscription = None;
                self.source.rewind(&refusal);
                if !sleep_until(&self.closed, refusal.due).await {
                    return None;
                }
                continue;
            }
            if let Some(retry_at) = self.retry_at.take()
                && !sleep_until(&self.closed, retry_at).await
            {
                return None;
            }
            // Registered before the checks below, so a settlement racing them still wakes us.
            let tracker = self.tracker.clone();
            let wake = tracker.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if tracker.in_flight() >= tracker.in_flight_max {
                tokio::select! {
                    () = wake => {}
                    () = self.closed.cancelled() => {}
                }
                continue;
            }
            let subscription = match self.subscription.as_mut() {
                Some(subscription) => subscription,
                None => {
                    let opened = tokio::select! {
                        opened = Self::open(&self.store, &self.source) => opened,
                        () = self.closed.cancelled() => continue,
                    };
                    match opened {
                        Ok(subscription) => self.subscription.insert(subscription),
                        Err(failure) => return Some(Err(self.fail(failure))),
                    }
                }
            };
            let item = tokio::select! {
                biased;
                () = self.closed.cancelled() => continue,
                () = wake => continue,
                item = subscription.next() => item,
            };
            match item {
                Some(Ok(event)) => {
                    if self.source.skips(&event) {
                        continue;
                    }
                    let Some(seq) = self.tracker.deliver(&event) else {
                        continue;
                    };
                    self.source.delivered(&event);
                    self.failures = 0;
                    let message = message_from_event(&event).delivered(SourceDelivery {
                        tracker: self.tracker.clone(),
                        seq,
                        position: event.position,
                    });
                    return Some(Ok(message));
                }
                Some(Err(error)) => return Some(Err(self.fail(Failure::of_subscription(error)))),
                None => {
                    let failure = Failure {
                        error: Box::new(SubscriptionEnded),
                        permanent: false,
                    };
                    return Some(Err(self.fail(failure)));
                }
            }
        }
    }

    /// Opens the store subscription at the source's cursor. (Takes the parts it needs, not
    /// `&self`: the driver holds a `Subscription`, which is not `Sync`.)
    async fn open(store: &S, source: &Source) -> Result<Subscription, Failure> {
        match source {
            Source::All { filter, cursor } => store
                .subscribe_to_all(*cursor, filter.clone())
                .await
                .map_err(Failure::of_subscribe),
            Source::Stream { stream, cursor, .. } => store
                .subscribe_to_stream(stream, *cursor)
                .await
                .map_err(Failure::of_subscribe),
        }
    }

    /// Drops the store subscription after `failure` and decides between a retry and the end.
    fn fail(&mut self, failure: Failure) -> ReceiveError {
        self.subscription = None;
        self.failures = self.failures.saturating_add(1);
        let exhausted = self
            .retry
            .retries_max
            .is_some_and(|retries| self.failures > retries);
        if failure.permanent || exhausted {
            tracing::warn!(error = %failure.error, "event store subscription failed; ending");
            self.finished = true;
        } else {
            let backoff = self.retry.backoff(self.failures);
            tracing::warn!(
                error = %failure.error,
                backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                "event store subscription failed; retrying"
            );
            self.retry_at = Some(deadline(backoff));
        }
        ReceiveError::Transport(failure.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(in_flight_max: usize) -> Tracker {
        let (checkpoint, _) = watch::channel(None);
        Tracker {
            kind: Kind::All,
            in_flight_max,
            nack: NackPolicy::default(),
            state: Mutex::new(TrackerState {
                pending: VecDeque::new(),
                in_flight: 0,
                next_seq: 0,
                refusal: None,
                acked_position: None,
            }),
            wake: Notify::new(),
            checkpoint,
        }
    }

    fn event(position: u64) -> RecordedEvent {
        RecordedEvent::new(
            StreamId::new("order-1").unwrap(),
            Revision(position),
            Position(position),
            factline_core::Timestamp::from_unix_micros(0),
            factline_core::EventData::binary("OrderPlaced", "x"),
        )
    }

    #[test]
    fn topics_parse() {
        assert_eq!(SourceTopic::parse("$all"), Ok(SourceTopic::All));
        assert_eq!(
            SourceTopic::parse("$ce-order"),
            Ok(SourceTopic::Category("order".into()))
        );
        assert_eq!(
            SourceTopic::parse("$et-Order"),
            Ok(SourceTopic::EventTypePrefix("Order".into()))
        );
        assert_eq!(
            SourceTopic::parse("order-42"),
            Ok(SourceTopic::Stream(StreamId::new("order-42").unwrap()))
        );
        for bad in ["", "$ce-", "$ce-a-b", "$et-", "$alll", "$other", "a\nb"] {
            assert!(SourceTopic::parse(bad).is_err(), "{bad:?}");
        }
        for topic in ["$all", "$ce-order", "$et-Order", "order-42"] {
            assert_eq!(SourceTopic::parse(topic).unwrap().to_string(), topic);
        }
    }

    #[test]
    fn acked_runs_stay_compact_and_the_checkpoint_waits_for_the_front() {
        let tracker = tracker(1_000);
        let seqs: Vec<u64> = (0..100)
            .map(|i| tracker.deliver(&event(i)).unwrap())
            .collect();
        // Everything but the first acked, in a scrambled order.
        for i in (1..100).rev().step_by(2).chain((2..100).step_by(2)) {
            tracker.settle(seqs[i], Position(i as u64), Outcome::Acked);
        }
        {
            let state = tracker.lock();
            assert_eq!(state.in_flight, 1);
            assert_eq!(state.pending.len(), 2, "{:?}", state.pending);
        }
        assert_eq!(*tracker.checkpoint.borrow(), None);
        tracker.settle(seqs[0], Position(0), Outcome::Acked);
        assert_eq!(
            *tracker.checkpoint.borrow(),
            Some(Checkpoint::Position(Position(99)))
        );
        assert!(tracker.lock().pending.is_empty());
    }

    #[test]
    fn refusals_merge_to_the_earliest_and_supersede_later_deliveries() {
        let tracker = tracker(1_000);
        let seqs: Vec<u64> = (0..5)
            .map(|i| tracker.deliver(&event(i)).unwrap())
            .collect();
        tracker.settle(seqs[3], Position(3), Outcome::Nacked { delay: None });
        assert!(tracker.deliver(&event(5)).is_none(), "a refusal waits");
        tracker.settle(seqs[1], Position(1), Outcome::Dropped);
        let refusal = tracker.take_refusal().unwrap();
        assert_eq!(refusal.position, Position(1));
        assert_eq!(refusal.revision, Revision(1));
        // Late settlements of superseded deliveries only free their slot.
        tracker.settle(seqs[2], Position(2), Outcome::Acked);
        tracker.settle(seqs[4], Position(4), Outcome::Nacked { delay: None });
        assert!(tracker.take_refusal().is_none());
        tracker.settle(seqs[0], Position(0), Outcome::Acked);
        assert_eq!(
            *tracker.checkpoint.borrow(),
            Some(Checkpoint::Position(Position(0)))
        );
        assert_eq!(tracker.in_flight(), 0);
    }

    #[test]
    fn policies_bound_their_waits() {
        let nack = NackPolicy::default()
            .default_delay(Duration::from_secs(1))
            .delay_max(Duration::from_secs(60));
        assert_eq!(nack.delay_for(Outcome::Dropped), Duration::from_secs(1));
        assert_eq!(
            nack.delay_for(Outcome::Nacked {
                delay: Some(Duration::from_secs(3_600))
            }),
            Duration::from_secs(60)
        );
        let retry = RetryPolicy::default();
        assert_eq!(retry.backoff(1), Duration::from_millis(100));
        assert_eq!(retry.backoff(2), Duration::from_millis(200));
        assert_eq!(retry.backoff(1_000), Duration::from_secs(10));
    }
}
