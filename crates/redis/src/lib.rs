//! factline's Redis Streams adapter: a [`Publisher`] and a [`Subscriber`] that keep the
//! pub/sub contract of `docs/specs/pubsub-adapter.md` on Redis (5.0 streams; 6.2 for
//! `XAUTOCLAIM`).
//!
//! - A topic is a stream key, `{key_prefix}{topic}` (keys are binary-safe: no escaping), capped
//!   at about [`RedisConfig::topic_messages_max`] entries (`XADD … MAXLEN ~`).
//! - A message is an entry with the fields `i` (its id), `p` (the payload) and, when it has
//!   metadata, `m` (a JSON object of strings). Entries other clients add have the id
//!   `redis-{key}-{entry id}`, their `p` field (or nothing) as the payload and their other
//!   UTF-8 fields as metadata.
//! - A consumer group is a Redis consumer group of the same name; every subscription is a
//!   consumer of its own in it. A subscription without a group makes a group of its own and
//!   destroys it when it ends.
//! - `XACK` is sent only after the application acked. A nack (or a dropped delivery) leaves the
//!   entry pending and claims it again (`XCLAIM`) for the same subscription once its delay has
//!   passed. Every subscription also claims entries that stayed pending with other consumers
//!   for [`RedisConfig::claim_idle`] (`XAUTOCLAIM`): a member that died without acking loses
//!   nothing. A subscription that ends marks what it held as idle for long, so that another
//!   member claims it at its next look (within [`RedisConfig::claim_interval`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use factline_messaging::{
    Acknowledger, BoxError, CloseError, Message, MessageId, MessageStream, Metadata, Outcome,
    PublishError, Publisher, ReceiveError, SubscribeError, Subscriber, check_topic,
};
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamClaimReply, StreamId, StreamReadReply};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

pub use factline_messaging::DeliverFrom;

/// Settings of a [`RedisPubSub`]; every value is checked by [`RedisPubSub::connect`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The server, e.g. `redis://127.0.0.1:6379` (`redis://:password@host`, `rediss://` for TLS).
    pub url: String,
    /// How long connecting (and the first `PING`) may take. Default 5 s.
    pub connect_timeout: Duration,
    /// Prefix of every stream key. Default `factline:`.
    pub key_prefix: String,
    /// Entries a stream keeps, about (`MAXLEN ~`): its retention window. Default 1,000,000.
    pub topic_messages_max: u64,
    /// Largest message accepted (payload, id and metadata). Default 1 MiB.
    pub message_size_bytes_max: usize,
    /// Unsettled deliveries per subscription. Default 1,024.
    pub in_flight_max: usize,
    /// Entries asked for per read. Default 128.
    pub fetch_batch: usize,
    /// How long one blocking read waits for new entries. Default 1 s.
    pub read_block: Duration,
    /// How long an entry stays pending with another consumer before a subscription claims
    /// it. Default 30 s.
    pub claim_idle: Duration,
    /// How often a subscription looks for such entries. Default 1 s.
    pub claim_interval: Duration,
    /// Where new groups start. Default [`DeliverFrom::Oldest`].
    pub deliver_from: DeliverFrom,
    /// How long a command may take before it fails. Default 10 s.
    pub command_timeout: Duration,
    /// How long [`Subscriber::close`] waits for acknowledgements and handovers. Default 5 s.
    pub close_timeout: Duration,
}

impl RedisConfig {
    /// The defaults, for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect_timeout: Duration::from_secs(5),
            key_prefix: "factline:".to_owned(),
            topic_messages_max: 1_000_000,
            message_size_bytes_max: 1 << 20,
            in_flight_max: 1_024,
            fetch_batch: 128,
            read_block: Duration::from_secs(1),
            claim_idle: Duration::from_secs(30),
            claim_interval: Duration::from_secs(1),
            deliver_from: DeliverFrom::Oldest,
            command_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
        }
    }

    /// Builder: see [`RedisConfig::key_prefix`].
    #[must_use]
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Builder: see [`RedisConfig::connect_timeout`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Builder: see [`RedisConfig::in_flight_max`].
    #[must_use]
    pub fn in_flight_max(mut self, deliveries: usize) -> Self {
        self.in_flight_max = deliveries;
        self
    }

    /// Builder: see [`RedisConfig::claim_idle`].
    #[must_use]
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Builder: see [`RedisConfig::deliver_from`].
    #[must_use]
    pub fn deliver_from(mut self, from: DeliverFrom) -> Self {
        self.deliver_from = from;
        self
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        for (field, value) in [
            ("connect_timeout", self.connect_timeout),
            ("read_block", self.read_block),
            ("claim_idle", self.claim_idle),
            ("claim_interval", self.claim_interval),
            ("command_timeout", self.command_timeout),
            ("close_timeout", self.close_timeout),
        ] {
            if value.is_zero() {
                return Err((field, "must be more than 0".into()));
            }
        }
        if self.read_block >= self.command_timeout {
            return Err((
                "read_block",
                "must be shorter than command_timeout (a blocking read would time out)".into(),
            ));
        }
        for (field, value) in [
            (
                "topic_messages_max",
                usize::try_from(self.topic_messages_max).unwrap_or(usize::MAX),
            ),
            ("message_size_bytes_max", self.message_size_bytes_max),
            ("in_flight_max", self.in_flight_max),
            ("fetch_batch", self.fetch_batch),
        ] {
            if value < 1 {
                return Err((field, "must be at least 1".into()));
            }
        }
        Ok(())
    }
}

/// Why [`RedisPubSub::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// A setting cannot work.
    #[error("invalid Redis setting {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL is not a Redis URL, or the server refused or could not be reached.
    #[error("cannot connect to Redis at {url}: {source}")]
    Connect {
        /// The server (password hidden).
        url: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// Connecting took longer than [`RedisConfig::connect_timeout`].
    #[error("connecting to Redis at {url} took over {timeout_ms} ms")]
    TimedOut {
        /// The server (password hidden).
        url: String,
        /// The limit.
        timeout_ms: u64,
    },
}

/// `url` with any password replaced by `***` (for errors and logs).
pub use factline_messaging::redact_url;

fn boxed(error: impl std::error::Error + Send + Sync + 'static) -> BoxError {
    Box::new(error)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

struct Shared {
    client: redis::Client,
    /// For publishes and acknowledgements (multiplexed; never blocked).
    commands: ConnectionManager,
    config: RedisConfig,
}

impl Shared {
    fn key(&self, topic: &str) -> Vec<u8> {
        let mut key = self.config.key_prefix.as_bytes().to_vec();
        key.extend_from_slice(topic.as_bytes());
        key
    }

    async fn manager(&self, response_timeout: Duration) -> Result<ConnectionManager, BoxError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout))
            .set_response_timeout(Some(response_timeout));
        self.client
            .get_connection_manager_with_config(config)
            .await
            .map_err(boxed)
    }
}

/// A connection to a Redis server, from which publishers and subscribers are made. Cheap to
/// clone.
#[derive(Clone)]
pub struct RedisPubSub {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisPubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPubSub")
            .field("url", &redact_url(&self.shared.config.url))
            .finish_non_exhaustive()
    }
}

impl RedisPubSub {
    /// Checks the settings and connects (a `PING` answered), within
    /// [`RedisConfig::connect_timeout`].
    pub async fn connect(config: RedisConfig) -> Result<Self, ConnectError> {
        config
            .check()
            .map_err(|(field, reason)| ConnectError::InvalidConfig { field, reason })?;
        let url = redact_url(&config.url);
        let client =
            redis::Client::open(config.url.as_str()).map_err(|source| ConnectError::Connect {
                url: url.clone(),
                source,
            })?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_number_of_retries(1);
        let connect = async {
            let mut commands = client
                .get_connection_manager_with_config(manager_config)
                .await?;
            redis::cmd("PING")
                .query_async::<String>(&mut commands)
                .await?;
            Ok::<_, redis::RedisError>(commands)
        };
        let commands = tokio::time::timeout(config.connect_timeout, connect)
            .await
            .map_err(|_| ConnectError::TimedOut {
                url: url.clone(),
                timeout_ms: millis(config.connect_timeout),
            })?
            .map_err(|source| ConnectError::Connect { url, source })?;
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                commands,
                config,
            }),
        })
    }

    /// A publisher on this connection.
    pub fn publisher(&self) -> RedisPublisher {
        RedisPublisher {
            shared: Arc::clone(&self.shared),
            closed: AtomicBool::new(false),
        }
    }

    /// A subscriber whose every subscription reads all of its topic (a group of its own).
    pub fn subscriber(&self) -> RedisSubscriber {
        RedisSubscriber::new(Arc::clone(&self.shared), None)
    }

    /// A subscriber in consumer group `group`: its subscriptions share the group's entries
    /// with every other member.
    pub fn subscriber_in_group(&self, group: &str) -> Result<RedisSubscriber, InvalidGroup> {
        if group.is_empty() || group.chars().any(char::is_control) || group.len() > 255 {
            return Err(InvalidGroup {
                group: group.chars().take(64).collect(),
                reason: "a group name must be 1..=255 bytes without control characters".into(),
            });
        }
        Ok(RedisSubscriber::new(
            Arc::clone(&self.shared),
            Some(group.to_owned()),
        ))
    }

    /// The largest message accepted ([`RedisConfig::message_size_bytes_max`]).
    pub fn message_size_bytes_max(&self) -> usize {
        self.shared.config.message_size_bytes_max
    }

    /// Deletes the streams of `topics` (their entries and groups).
    pub async fn delete_topics(&self, topics: &[&str]) -> Result<(), BoxError> {
        let mut commands = self.shared.commands.clone();
        for topic in topics {
            redis::cmd("DEL")
                .arg(self.shared.key(topic))
                .query_async::<i64>(&mut commands)
                .await
                .map_err(boxed)?;
        }
        Ok(())
    }
}

/// A group name Redis cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid consumer group {group:?}: {reason}")]
pub struct InvalidGroup {
    /// The group (shortened).
    pub group: String,
    /// What was wrong.
    pub reason: String,
}

const FIELD_ID: &str = "i";
const FIELD_PAYLOAD: &str = "p";
const FIELD_METADATA: &str = "m";

/// Publishes to Redis streams; see [`RedisPubSub::publisher`].
pub struct RedisPublisher {
    shared: Arc<Shared>,
    closed: AtomicBool,
}

impl std::fmt::Debug for RedisPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPublisher").finish_non_exhaustive()
    }
}

#[async_trait]
impl Publisher for RedisPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<(), PublishError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PublishError::Closed);
        }
        check_topic(topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        let key = self.shared.key(topic);
        let limit = self.shared.config.message_size_bytes_max;
        let mut pipe = redis::pipe();
        for message in &messages {
            let size_bytes = message.size_bytes();
            if size_bytes > limit {
                return Err(PublishError::MessageTooLarge {
                    message_id: message.id.to_text(),
                    size_bytes,
                    size_bytes_max: limit,
                });
            }
            let command = pipe
                .cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.shared.config.topic_messages_max)
                .arg("*")
                .arg(FIELD_ID)
                .arg(message.id.to_text())
                .arg(FIELD_PAYLOAD)
                .arg(message.payload.as_ref());
            if !message.metadata.is_empty() {
                // A map of strings always serializes.
                let metadata = serde_json::to_vec(&message.metadata).unwrap_or_default();
                command.arg(FIELD_METADATA).arg(metadata);
            }
        }
        let mut commands = self.shared.commands.clone();
        let timeout = self.shared.config.command_timeout;
        let send = async {
            match pipe.query_async::<Vec<String>>(&mut commands).await {
                // The connection went away under the pipeline (the server restarted): send it
                // once more on the new one. Entries that had been added come twice, with the
                // same message ids (consumers deduplicate by id).
                Err(error) if is_dropped(&error) => {
                    pipe.query_async::<Vec<String>>(&mut commands).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(timeout, send).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(PublishError::Transport(boxed(error))),
            Err(_) => Err(PublishError::TimedOut {
                timeout_ms: millis(timeout),
            }),
        }
    }

    async fn close(&self) -> Result<(), CloseError> {
        // Every publish that returned was answered by Redis: nothing is buffered.
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

/// The entry as the application sees it.
fn to_message(key: &[u8], entry: &StreamId) -> Result<Message, BoxError> {
    let bytes = |value: &redis::Value| -> Option<Vec<u8>> {
        match value {
            redis::Value::BulkString(bytes) => Some(bytes.clone()),
            redis::Value::SimpleString(text) => Some(text.clone().into_bytes()),
            _ => None,
        }
    };
    let id = entry
        .map
        .get(FIELD_ID)
        .and_then(bytes)
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|text| MessageId::parse(&text).ok());
    let id = match id {
        Some(id) => id,
        None => MessageId::parse(&format!(
            "redis-{}-{}",
            String::from_utf8_lossy(key),
            entry.id
        ))
        .map_err(boxed)?,
    };
    let payload = entry
        .map
        .get(FIELD_PAYLOAD)
        .and_then(bytes)
        .unwrap_or_default();
    let mut metadata = match entry.map.get(FIELD_METADATA).and_then(bytes) {
        Some(raw) => serde_json::from_slice::<Metadata>(&raw).map_err(boxed)?,
        None => Metadata::new(),
    };
    if !entry.map.contains_key(FIELD_ID) {
        // Another client's entry: its other text fields are its metadata.
        for (field, value) in &entry.map {
            if field != FIELD_PAYLOAD
                && let Some(text) = bytes(value).and_then(|raw| String::from_utf8(raw).ok())
            {
                metadata.insert(field.clone(), text);
            }
        }
    }
    let mut message = Message::with_id(id, payload);
    message.metadata = metadata;
    Ok(message)
}

enum AckJob {
    Ack {
        key: Vec<u8>,
        group: String,
        entry: String,
    },
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Sends `XACK`s, batching what is queued at once per stream and group.
async fn ack_loop(mut commands: ConnectionManager, mut jobs: mpsc::UnboundedReceiver<AckJob>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut acks: HashMap<(Vec<u8>, String), Vec<String>> = HashMap::new();
        let mut flushes = Vec::new();
        for job in batch {
            match job {
                AckJob::Ack { key, group, entry } => {
                    acks.entry((key, group)).or_default().push(entry);
                }
                AckJob::Flush(done) => flushes.push(done),
            }
        }
        if !acks.is_empty() {
            let mut pipe = redis::pipe();
            for ((key, group), entries) in &acks {
                pipe.cmd("XACK").arg(key).arg(group).arg(entries).ignore();
            }
            if let Err(error) = pipe.query_async::<()>(&mut commands).await {
                // The entries stay pending and are claimed again: at least once holds.
                tracing::warn!(%error, "sending XACK failed");
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

#[derive(Default)]
struct TrackerState {
    ended: bool,
    next_key: u64,
    /// Unsettled deliveries: their entry ids.
    pending: HashMap<u64, String>,
    /// Nacked entries and when they may come again.
    redeliver: Vec<(Instant, String)>,
}

/// One subscription's unsettled deliveries and nacked entries.
struct Tracker {
    state: Mutex<TrackerState>,
    key: Vec<u8>,
    group: String,
    /// The group is this subscription's own (destroyed when it ends: nothing to hand over).
    private: bool,
    acks: mpsc::UnboundedSender<AckJob>,
    /// Wakes the subscription when a delivery is settled (room in flight, or a redelivery).
    settled: Notify,
}

impl Tracker {
    fn register(&self, entry: String) -> Option<u64> {
        let mut state = self.state.lock().ok()?;
        if state.ended {
            return None;
        }
        let key = state.next_key;
        state.next_key += 1;
        state.pending.insert(key, entry);
        Some(key)
    }

    fn unsettled(&self) -> usize {
        self.state.lock().map_or(0, |state| state.pending.len())
    }

    fn settle(&self, key: u64, outcome: Outcome) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        // Settled after the subscription ended: handed over then; not ours to settle.
        let Some(entry) = state.pending.remove(&key) else {
            return;
        };
        match outcome {
            Outcome::Acked => {
                let _ = self.acks.send(AckJob::Ack {
                    key: self.key.clone(),
                    group: self.group.clone(),
                    entry,
                });
            }
            Outcome::Nacked { delay } => {
                state
                    .redeliver
                    .push((Instant::now() + delay.unwrap_or_default(), entry));
            }
            _ => state.redeliver.push((Instant::now(), entry)),
        }
        drop(state);
        self.settled.notify_one();
    }

    /// Entries whose redelivery is due, and when the next one is.
    fn due(&self) -> (Vec<String>, Option<Instant>) {
        let Ok(mut state) = self.state.lock() else {
            return (Vec::new(), None);
        };
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) =
            state.redeliver.drain(..).partition(|(at, _)| *at <= now);
        let next = later.iter().map(|(at, _)| *at).min();
        state.redeliver = later;
        (due.into_iter().map(|(_, entry)| entry).collect(), next)
    }

    /// Marks the end; returns what the subscription still held (unsettled or nacked).
    fn end(&self) -> Vec<String> {
        let Ok(mut state) = self.state.lock() else {
            return Vec::new();
        };
        if state.ended {
            return Vec::new();
        }
        state.ended = true;
        let mut held: Vec<(u64, String)> = state.pending.drain().collect();
        held.sort_by_key(|(key, _)| *key);
        let mut entries: Vec<String> = held.into_iter().map(|(_, entry)| entry).collect();
        entries.extend(state.redeliver.drain(..).map(|(_, entry)| entry));
        entries
    }
}

struct RedisAcker {
    tracker: Arc<Tracker>,
    key: u64,
}

impl Acknowledger for RedisAcker {
    fn settled(&self, outcome: Outcome) {
        self.tracker.settle(self.key, outcome);
    }
}

/// Subscribes to Redis streams; see [`RedisPubSub::subscriber`] and
/// [`RedisPubSub::subscriber_in_group`].
pub struct RedisSubscriber {
    shared: Arc<Shared>,
    group: Option<String>,
    closed: CancellationToken,
    acks: mpsc::UnboundedSender<AckJob>,
    ack_jobs: Mutex<Option<mpsc::UnboundedReceiver<AckJob>>>,
    /// Handovers of ended subscriptions still running.
    handovers: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    trackers: Mutex<Vec<Weak<Tracker>>>,
}

impl std::fmt::Debug for RedisSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSubscriber")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl RedisSubscriber {
    fn new(shared: Arc<Shared>, group: Option<String>) -> Self {
        let (acks, ack_jobs) = mpsc::unbounded_channel();
        Self {
            shared,
            group,
            closed: CancellationToken::new(),
            acks,
            ack_jobs: Mutex::new(Some(ack_jobs)),
            handovers: Arc::new(Mutex::new(Vec::new())),
            trackers: Mutex::new(Vec::new()),
        }
    }
}

/// Whether `error` is the connection going away under a command: the connection manager
/// reconnects, and the command may be sent once more.
fn is_dropped(error: &redis::RedisError) -> bool {
    error.is_connection_dropped() || error.is_io_error()
}

/// Makes `group` on the stream `key` (and the stream), unless it exists.
async fn create_group(
    connection: &mut ConnectionManager,
    key: &[u8],
    group: &str,
    from: DeliverFrom,
) -> Result<(), redis::RedisError> {
    let start = match from {
        DeliverFrom::Oldest => "0",
        DeliverFrom::New => "$",
    };
    let mut command = redis::cmd("XGROUP");
    command
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg(start)
        .arg("MKSTREAM");
    let mut result = command.query_async::<()>(connection).await;
    if let Err(error) = &result
        && is_dropped(error)
    {
        result = command.query_async::<()>(connection).await;
    }
    match result {
        Err(error) if error.code() != Some("BUSYGROUP") => Err(error),
        _ => Ok(()),
    }
}

#[async_trait]
impl Subscriber for RedisSubscriber {
    async fn subscribe(&self, topic: &str) -> Result<MessageStream, SubscribeError> {
        if self.closed.is_cancelled() {
            return Err(SubscribeError::Closed);
        }
        check_topic(topic)?;
        let key = self.shared.key(topic);
        let (group, private) = match &self.group {
            Some(group) => (group.clone(), false),
            None => (format!("s:{}", uuid::Uuid::now_v7().simple()), true),
        };
        let mut commands = self.shared.commands.clone();
        create_group(&mut commands, &key, &group, self.shared.config.deliver_from)
            .await
            .map_err(|error| SubscribeError::Transport(boxed(error)))?;
        // Blocking reads get a connection of their own (a multiplexed one would hold every
        // other command behind them).
        let reads = self
            .shared
            .manager(self.shared.config.command_timeout)
            .await
            .map_err(SubscribeError::Transport)?;
        let jobs = self.ack_jobs.lock().ok().and_then(|mut jobs| jobs.take());
        if let Some(jobs) = jobs {
            tokio::spawn(ack_loop(self.shared.commands.clone(), jobs));
        }
        let tracker = Arc::new(Tracker {
            state: Mutex::new(TrackerState::default()),
            key: key.clone(),
            group: group.clone(),
            private,
            acks: self.acks.clone(),
            settled: Notify::new(),
        });
        if let Ok(mut trackers) = self.trackers.lock() {
            trackers.retain(|tracker| tracker.strong_count() > 0);
            trackers.push(Arc::downgrade(&tracker));
        }
        let subscription = Subscription {
            shared: Arc::clone(&self.shared),
            key,
            group,
            consumer: uuid::Uuid::now_v7().simple().to_string(),
            private,
            reads,
            ready: VecDeque::new(),
            tracker,
            closed: self.closed.child_token(),
            last_claim: None,
            failed: false,
            finished: false,
            handovers: Arc::clone(&self.handovers),
        };
        Ok(MessageStream::new(futures::stream::unfold(
            subscription,
            |mut subscription| async move {
                let item = subscription.next_item().await?;
                Some((item, subscription))
            },
        )))
    }

    async fn close(&self) -> Result<(), CloseError> {
        self.closed.cancel();
        let timeout = self.shared.config.close_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscriptions nobody polls end here (those being polled end themselves, woken by
        // the cancellation, and register their handovers).
        let trackers: Vec<Arc<Tracker>> = self
            .trackers
            .lock()
            .map(|trackers| trackers.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default();
        for tracker in trackers {
            let held = tracker.end();
            queue_handover(&self.shared, &self.handovers, &tracker, held);
        }
        tokio::task::yield_now().await;
        let handovers: Vec<_> = self
            .handovers
            .lock()
            .map(|mut handovers| handovers.drain(..).collect())
            .unwrap_or_default();
        for handover in handovers {
            if tokio::time::timeout_at(deadline, handover).await.is_err() {
                return Err(CloseError::TimedOut {
                    timeout_ms: millis(timeout),
                    pending: 0,
                });
            }
        }
        let started = self
            .ack_jobs
            .lock()
            .map(|jobs| jobs.is_none())
            .unwrap_or(true);
        if started {
            let (done, flushed) = tokio::sync::oneshot::channel();
            if self.acks.send(AckJob::Flush(done)).is_ok()
                && tokio::time::timeout_at(deadline, flushed).await.is_err()
            {
                return Err(CloseError::TimedOut {
                    timeout_ms: millis(timeout),
                    pending: 0,
                });
            }
        }
        Ok(())
    }
}

/// Hands `held` over to the other members of `tracker`'s group, the task kept in
/// `handovers` for [`Subscriber::close`] to wait for. A private group has nobody to hand over
/// to: it is destroyed instead.
fn queue_handover(
    shared: &Arc<Shared>,
    handovers: &Mutex<Vec<tokio::task::JoinHandle<()>>>,
    tracker: &Tracker,
    held: Vec<String>,
) {
    if tracker.private || held.is_empty() {
        return;
    }
    let handover = spawn_handover(
        Arc::clone(shared),
        tracker.key.clone(),
        tracker.group.clone(),
        held,
    );
    if let Ok(mut handovers) = handovers.lock() {
        handovers.push(handover);
    }
}

/// Marks `entries` as idle for long, so that any member's next claim takes them.
fn spawn_handover(
    shared: Arc<Shared>,
    key: Vec<u8>,
    group: String,
    entries: Vec<String>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut commands = shared.commands.clone();
        let idle_ms = millis(shared.config.claim_idle)
            .saturating_mul(1_000)
            .max(3_600_000);
        let result = redis::cmd("XCLAIM")
            .arg(&key)
            .arg(&group)
            .arg("handover")
            .arg(0)
            .arg(&entries)
            .arg("IDLE")
            .arg(idle_ms)
            .arg("JUSTID")
            .query_async::<Vec<String>>(&mut commands)
            .await;
        if let Err(error) = result {
            // They stay pending with the ended consumer and are claimed after claim_idle.
            tracing::warn!(%error, "handing over pending entries failed");
        }
    })
}

struct Subscription {
    shared: Arc<Shared>,
    key: Vec<u8>,
    group: String,
    consumer: String,
    private: bool,
    reads: ConnectionManager,
    /// Entries read but not yet yielded.
    ready: VecDeque<StreamId>,
    tracker: Arc<Tracker>,
    closed: CancellationToken,
    last_claim: Option<Instant>,
    failed: bool,
    finished: bool,
    handovers: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

enum Step {
    Entries(Vec<StreamId>),
    Nothing,
}

impl Subscription {
    async fn next_item(&mut self) -> Option<Result<Message, ReceiveError>> {
        let closed = self.closed.clone();
        loop {
            if closed.is_cancelled() {
                self.finish();
                return None;
            }
            if let Some(entry) = self.ready.pop_front() {
                match to_message(&self.key, &entry) {
                    Ok(message) => match self.tracker.register(entry.id.clone()) {
                        Some(key) => {
                            return Some(Ok(message.delivered(RedisAcker {
                                tracker: Arc::clone(&self.tracker),
                                key,
                            })));
                        }
                        None => {
                            self.ready.push_front(entry);
                            self.finish();
                            return None;
                        }
                    },
                    Err(error) => {
                        // Not an entry we can read: ack it so that it does not come back
                        // forever, and say so.
                        tracing::warn!(entry = %entry.id, %error, "unreadable stream entry acknowledged and skipped");
                        let _ = self.tracker.acks.send(AckJob::Ack {
                            key: self.key.clone(),
                            group: self.group.clone(),
                            entry: entry.id.clone(),
                        });
                        return Some(Err(ReceiveError::Transport(error)));
                    }
                }
            }
            if self.failed {
                self.failed = false;
                tokio::select! {
                    biased;
                    () = closed.cancelled() => continue,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            let step = tokio::select! {
                biased;
                () = closed.cancelled() => continue,
                step = self.fetch() => step,
            };
            match step {
                Ok(Step::Entries(entries)) => self.ready.extend(entries),
                Ok(Step::Nothing) => {}
                Err(error) => {
                    if error.code() == Some("NOGROUP") {
                        // The stream or its group is gone (the key was deleted, or the server
                        // restarted without them): make the group again and go on; what the
                        // server did not keep is lost with it.
                        if let Err(error) = self.create_group().await {
                            tracing::warn!(%error, "making the consumer group again failed");
                        }
                    }
                    self.failed = true;
                    return Some(Err(ReceiveError::Transport(boxed(error))));
                }
            }
        }
    }

    /// The next entries: due redeliveries, entries claimed from others, or new ones; waits
    /// while the subscription has `in_flight_max` unsettled.
    async fn create_group(&mut self) -> Result<(), redis::RedisError> {
        create_group(
            &mut self.reads,
            &self.key,
            &self.group,
            self.shared.config.deliver_from,
        )
        .await
    }

    async fn fetch(&mut self) -> Result<Step, redis::RedisError> {
        let config = &self.shared.config;
        let (due, next_due) = self.tracker.due();
        if !due.is_empty() {
            let reply: StreamClaimReply = redis::cmd("XCLAIM")
                .arg(&self.key)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(0)
                .arg(&due)
                .query_async(&mut self.reads)
                .await?;
            return Ok(Step::Entries(reply.ids));
        }
        if self
            .last_claim
            .is_none_or(|at| at.elapsed() >= config.claim_interval)
        {
            self.last_claim = Some(Instant::now());
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&self.key)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(millis(config.claim_idle))
                .arg("0-0")
                .arg("COUNT")
                .arg(config.fetch_batch)
                .query_async(&mut self.reads)
                .await?;
            if !reply.claimed.is_empty() {
                return Ok(Step::Entries(reply.claimed));
            }
        }
        let unsettled = self.tracker.unsettled();
        if unsettled >= config.in_flight_max {
            let wait = next_due
                .map(|at| at.saturating_duration_since(Instant::now()))
                .unwrap_or(config.claim_interval)
                .min(config.claim_interval);
            let _ = tokio::time::timeout(wait, self.tracker.settled.notified()).await;
            return Ok(Step::Nothing);
        }
        let block = next_due
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or(config.read_block)
            .min(config.read_block)
            .max(Duration::from_millis(1));
        let count = config.fetch_batch.min(config.in_flight_max - unsettled);
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(millis(block))
            .arg("STREAMS")
            .arg(&self.key)
            .arg(">")
            .query_async(&mut self.reads)
            .await?;
        let entries: Vec<StreamId> = reply
            .map(|reply| reply.keys.into_iter().flat_map(|key| key.ids).collect())
            .unwrap_or_default();
        if entries.is_empty() {
            // A group that vanished (the server restarted empty, the key was deleted) is made
            // again: its old entries are gone with it.
            return Ok(Step::Nothing);
        }
        Ok(Step::Entries(entries))
    }

    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let mut held = self.tracker.end();
        held.extend(self.ready.drain(..).map(|entry| entry.id));
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if self.private {
            let shared = Arc::clone(&self.shared);
            let (key, group) = (self.key.clone(), self.group.clone());
            tokio::spawn(async move {
                let mut commands = shared.commands.clone();
                let _ = redis::cmd("XGROUP")
                    .arg("DESTROY")
                    .arg(&key)
                    .arg(&group)
                    .query_async::<i64>(&mut commands)
                    .await;
            });
        } else {
            queue_handover(&self.shared, &self.handovers, &self.tracker, held);
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.finish();
    }
}
