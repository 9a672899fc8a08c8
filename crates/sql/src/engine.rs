//! The subscriber every SQL backend shares: claims rows for a group in short transactions (the
//! backend's [`Store::claim`]), settles them through one job task per subscriber, renews its
//! claims while it lives and hands them over when it ends. What differs between databases is
//! behind [`Store`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use factline_messaging::{
    Acknowledger, BoxError, CloseError, DeliverFrom, Message, MessageId, MessageStream, Metadata,
    Outcome, PublishError, ReceiveError, SubscribeError, Subscriber, check_topic,
};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub(crate) fn boxed(error: impl std::error::Error + Send + Sync + 'static) -> BoxError {
    Box::new(error)
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The columns of the messages of one publish, checked against the limits.
pub(crate) struct Rows {
    pub(crate) ids: Vec<String>,
    pub(crate) payloads: Vec<Vec<u8>>,
    pub(crate) metadata: Vec<Option<String>>,
}

impl Rows {
    /// Checks a publish (closed publisher, topic, count and sizes) before anything is written.
    pub(crate) fn of(
        closed: bool,
        topic: &str,
        messages: &[Message],
        size_bytes_max: usize,
        messages_max: usize,
    ) -> Result<Self, PublishError> {
        if closed {
            return Err(PublishError::Closed);
        }
        check_topic(topic)?;
        if messages.len() > messages_max {
            return Err(PublishError::Transport(boxed(TooManyMessages {
                messages: messages.len(),
                messages_max,
            })));
        }
        let mut rows = Self {
            ids: Vec::with_capacity(messages.len()),
            payloads: Vec::with_capacity(messages.len()),
            metadata: Vec::with_capacity(messages.len()),
        };
        for message in messages {
            let size_bytes = message.size_bytes();
            if size_bytes > size_bytes_max {
                return Err(PublishError::MessageTooLarge {
                    message_id: message.id.to_text(),
                    size_bytes,
                    size_bytes_max,
                });
            }
            rows.ids.push(message.id.to_text());
            rows.payloads.push(message.payload.to_vec());
            rows.metadata.push(if message.metadata.is_empty() {
                None
            } else {
                // A map of strings always serializes.
                Some(serde_json::to_string(&message.metadata).unwrap_or_default())
            });
        }
        Ok(rows)
    }
}

/// More messages in one publish than the backend's `publish_messages_max`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("a publish of {messages} messages exceeds the limit of {messages_max}")]
pub struct TooManyMessages {
    /// Messages given.
    pub messages: usize,
    /// The limit.
    pub messages_max: usize,
}

/// A group name refused by the backends' `subscriber_in_group`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid consumer group {group:?}: {reason}")]
pub struct InvalidGroup {
    /// The group (shortened).
    pub group: String,
    /// What was wrong.
    pub reason: String,
}

/// Longest group name, in bytes.
pub const GROUP_BYTES_MAX: usize = 255;

/// Checks a group name: 1..=255 bytes, no control characters, not `s:…` (the prefix of the
/// groups of ungrouped subscriptions).
pub(crate) fn check_group(group: &str) -> Result<(), InvalidGroup> {
    if group.is_empty()
        || group.len() > GROUP_BYTES_MAX
        || group.chars().any(char::is_control)
        || group.starts_with("s:")
    {
        return Err(InvalidGroup {
            group: group.chars().take(64).collect(),
            reason: "a group name must be 1..=255 bytes without control characters, \
                     not starting with s: (reserved for ungrouped subscriptions)"
                .into(),
        });
    }
    Ok(())
}

/// One row handed to a subscription.
pub(crate) struct Row {
    pub(crate) offset: i64,
    pub(crate) id: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) metadata: Option<String>,
}

/// What one claim found.
pub(crate) struct Claimed {
    pub(crate) rows: Vec<Row>,
    /// Committed rows wait behind a running transaction (worth looking again soon).
    pub(crate) blocked: bool,
}

/// The subscriber's settings, the same for every backend.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) in_flight_max: usize,
    pub(crate) fetch_batch: usize,
    pub(crate) poll_interval: Duration,
    pub(crate) claim_lease: Duration,
    pub(crate) deliver_from: DeliverFrom,
    pub(crate) close_timeout: Duration,
}

/// Checks settings every backend has: `durations` must be more than 0, `counts` at least 1,
/// the claim lease at least 1 s and the message size at most 256 MiB. The error names the
/// setting and what is wrong.
pub(crate) fn check_settings(
    durations: &[(&'static str, Duration)],
    counts: &[(&'static str, usize)],
    claim_lease: Duration,
    message_size_bytes_max: usize,
) -> Result<(), (&'static str, String)> {
    if let Some((field, _)) = durations.iter().find(|(_, value)| value.is_zero()) {
        return Err((field, "must be more than 0".into()));
    }
    if claim_lease < Duration::from_secs(1) {
        return Err((
            "claim_lease",
            "must be at least 1 s (leases are renewed every third of it)".into(),
        ));
    }
    if let Some((field, _)) = counts.iter().find(|(_, value)| *value < 1) {
        return Err((field, "must be at least 1".into()));
    }
    if message_size_bytes_max > 256 << 20 {
        return Err((
            "message_size_bytes_max",
            "must be at most 256 MiB (a database keeps a value under 1 GiB)".into(),
        ));
    }
    Ok(())
}

/// `messages` with their destination in the metadata, for an outbox topic.
pub(crate) fn staged(
    destination: &str,
    messages: Vec<Message>,
) -> Result<Vec<Message>, PublishError> {
    check_topic(destination)?;
    Ok(messages
        .into_iter()
        .map(|message| message.with_metadata(factline_messaging::DESTINATION_KEY, destination))
        .collect())
}

/// What a database does for the subscriber. Every method is one short transaction (or one
/// statement); `claim` must never return a row a group could later find an earlier committed
/// row before (see `docs/design/sql-pubsub.md`).
#[async_trait]
pub(crate) trait Store: Send + Sync + 'static {
    fn settings(&self) -> &Settings;
    /// The table of `topic`, made when missing.
    async fn table(&self, topic: &str) -> Result<Arc<str>, BoxError>;
    /// Makes the group's frontier unless it exists.
    async fn create_group(&self, table: &str, group: &str) -> Result<(), BoxError>;
    /// Removes the groups of ungrouped subscriptions whose process died.
    async fn remove_abandoned_private_groups(&self) -> Result<(), BoxError>;
    /// Claims up to `limit` rows for `consumer`: due deliveries first, then rows past the
    /// frontier. `touch` marks the group alive even when nothing is claimed.
    async fn claim(
        &self,
        table: &str,
        group: &str,
        consumer: Uuid,
        limit: usize,
        touch: bool,
    ) -> Result<Claimed, BoxError>;
    async fn ack(&self, table: &str, group: &str, offsets: &[i64]) -> Result<(), BoxError>;
    /// Frees the delivery for any member from `delay` on, if `consumer` still holds it.
    async fn nack(
        &self,
        table: &str,
        group: &str,
        offset: i64,
        consumer: Uuid,
        delay: Duration,
    ) -> Result<(), BoxError>;
    /// Frees every delivery `consumer` holds, now.
    async fn handover(&self, consumer: Uuid) -> Result<(), BoxError>;
    /// Removes a group and its deliveries.
    async fn drop_group(&self, table: &str, group: &str) -> Result<(), BoxError>;
    /// Extends the leases of the deliveries `consumers` hold.
    async fn renew(&self, consumers: &[Uuid]) -> Result<(), BoxError>;
    /// Table names with new rows (`""`: anything may have changed); starts listening.
    fn wakeups(&self) -> broadcast::Receiver<Arc<str>>;
    /// Prefix of the ids given to rows without a readable id.
    fn id_prefix(&self) -> &'static str;
}

enum Job {
    Ack {
        table: Arc<str>,
        group: Arc<str>,
        offset: i64,
    },
    Nack {
        table: Arc<str>,
        group: Arc<str>,
        offset: i64,
        consumer: Uuid,
        delay: Duration,
    },
    /// Frees every delivery `consumer` still holds, for any member to take now.
    Handover {
        consumer: Uuid,
    },
    /// Removes an ungrouped subscription's group and its deliveries.
    DropGroup {
        table: Arc<str>,
        group: Arc<str>,
    },
    Flush(oneshot::Sender<()>),
}

/// Runs the settlements of one subscriber, batching the acks queued at once. A statement that
/// fails is tried again (every 500 ms): an ack the application gave is never dropped for a
/// passing outage.
async fn job_loop(store: Arc<dyn Store>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut retry: Vec<Job> = Vec::new();
    loop {
        let mut batch = std::mem::take(&mut retry);
        if batch.is_empty() {
            match jobs.recv().await {
                Some(job) => batch.push(job),
                None => return,
            }
        }
        while batch.len() < 4_096 {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut acks: HashMap<(Arc<str>, Arc<str>), Vec<i64>> = HashMap::new();
        let mut others = Vec::new();
        let mut flushes = Vec::new();
        for job in batch {
            match job {
                Job::Ack {
                    table,
                    group,
                    offset,
                } => acks.entry((table, group)).or_default().push(offset),
                Job::Flush(done) => flushes.push(done),
                other => others.push(other),
            }
        }
        // Acks first: a handover queued after an ack must not free the acked row.
        for ((table, group), offsets) in acks {
            if let Err(error) = store.ack(&table, &group, &offsets).await {
                tracing::warn!(%error, table = %table, group = %group, acks = offsets.len(), "acknowledging failed; trying again");
                retry.extend(offsets.into_iter().map(|offset| Job::Ack {
                    table: Arc::clone(&table),
                    group: Arc::clone(&group),
                    offset,
                }));
            }
        }
        for job in others {
            let result = match &job {
                Job::Nack {
                    table,
                    group,
                    offset,
                    consumer,
                    delay,
                } => store.nack(table, group, *offset, *consumer, *delay).await,
                Job::Handover { consumer } => store.handover(*consumer).await,
                Job::DropGroup { table, group } => store.drop_group(table, group).await,
                Job::Ack { .. } | Job::Flush(_) => Ok(()),
            };
            if let Err(error) = result {
                tracing::warn!(%error, "settling a delivery failed; trying again");
                retry.push(job);
            }
        }
        if retry.is_empty() {
            for done in flushes {
                let _ = done.send(());
            }
        } else {
            // Flushes wait for the retried statements.
            retry.extend(flushes.into_iter().map(Job::Flush));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[derive(Default)]
struct TrackerState {
    ended: bool,
    next_key: u64,
    /// Unsettled deliveries: their offsets.
    pending: HashMap<u64, i64>,
    /// When the earliest of this subscription's nacks comes due (a hint to look again).
    next_due: Option<Instant>,
}

/// One subscription's unsettled deliveries.
struct Tracker {
    state: Mutex<TrackerState>,
    table: Arc<str>,
    group: Arc<str>,
    consumer: Uuid,
    jobs: mpsc::UnboundedSender<Job>,
    /// Wakes the subscription when a delivery is settled.
    settled: Notify,
}

impl Tracker {
    fn register(&self, offset: i64) -> Option<u64> {
        let mut state = self.state.lock().ok()?;
        if state.ended {
            return None;
        }
        let key = state.next_key;
        state.next_key += 1;
        state.pending.insert(key, offset);
        Some(key)
    }

    fn unsettled(&self) -> usize {
        self.state.lock().map_or(0, |state| state.pending.len())
    }

    fn next_due(&self) -> Option<Instant> {
        self.state.lock().ok().and_then(|state| state.next_due)
    }

    fn clear_due_if_passed(&self) {
        if let Ok(mut state) = self.state.lock()
            && state.next_due.is_some_and(|at| at <= Instant::now())
        {
            state.next_due = None;
        }
    }

    fn settle(&self, key: u64, outcome: Outcome) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        // Settled after the subscription ended: handed over then; not ours to settle.
        let Some(offset) = state.pending.remove(&key) else {
            return;
        };
        let (table, group) = (Arc::clone(&self.table), Arc::clone(&self.group));
        let job = match outcome {
            Outcome::Acked => Job::Ack {
                table,
                group,
                offset,
            },
            Outcome::Nacked { delay } => {
                let delay = delay.unwrap_or_default();
                let at = Instant::now() + delay;
                state.next_due = Some(state.next_due.map_or(at, |due| due.min(at)));
                Job::Nack {
                    table,
                    group,
                    offset,
                    consumer: self.consumer,
                    delay,
                }
            }
            _ => {
                state.next_due = Some(Instant::now());
                Job::Nack {
                    table,
                    group,
                    offset,
                    consumer: self.consumer,
                    delay: Duration::ZERO,
                }
            }
        };
        drop(state);
        let _ = self.jobs.send(job);
        self.settled.notify_one();
    }

    /// Marks the end; true the first time.
    fn end(&self) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        if state.ended {
            return false;
        }
        state.ended = true;
        state.pending.clear();
        true
    }
}

struct SqlAcker {
    tracker: Arc<Tracker>,
    key: u64,
}

impl Acknowledger for SqlAcker {
    fn settled(&self, outcome: Outcome) {
        self.tracker.settle(self.key, outcome);
    }
}

/// Subscribes to topic tables; made by each backend (e.g.
/// [`crate::postgres::PgPubSub::subscriber`] and
/// [`crate::postgres::PgPubSub::subscriber_in_group`]).
pub struct SqlSubscriber {
    store: Arc<dyn Store>,
    group: Option<String>,
    closed: CancellationToken,
    jobs: mpsc::UnboundedSender<Job>,
    job_receiver: Mutex<Option<mpsc::UnboundedReceiver<Job>>>,
    trackers: Arc<Mutex<Vec<Weak<Tracker>>>>,
}

impl std::fmt::Debug for SqlSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlSubscriber")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl SqlSubscriber {
    pub(crate) fn new(store: Arc<dyn Store>, group: Option<String>) -> Self {
        let (jobs, job_receiver) = mpsc::unbounded_channel();
        Self {
            store,
            group,
            closed: CancellationToken::new(),
            jobs,
            job_receiver: Mutex::new(Some(job_receiver)),
            trackers: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Starts the job and renewal tasks on the first subscribe.
    fn start_tasks(&self) {
        let receiver = self.job_receiver.lock().ok().and_then(|mut r| r.take());
        let Some(receiver) = receiver else {
            return;
        };
        tokio::spawn(job_loop(Arc::clone(&self.store), receiver));
        tokio::spawn(renew_loop(
            Arc::clone(&self.store),
            Arc::clone(&self.trackers),
            self.closed.clone(),
        ));
    }
}

/// Extends the claims of the live subscriptions every third of the lease, so that only a
/// subscription whose process died loses its deliveries to other members.
async fn renew_loop(
    store: Arc<dyn Store>,
    trackers: Arc<Mutex<Vec<Weak<Tracker>>>>,
    closed: CancellationToken,
) {
    let lease = store.settings().claim_lease;
    loop {
        tokio::select! {
            () = closed.cancelled() => return,
            () = tokio::time::sleep(lease / 3) => {}
        }
        let consumers: Vec<Uuid> = trackers
            .lock()
            .map(|trackers| {
                trackers
                    .iter()
                    .filter_map(Weak::upgrade)
                    .filter(|tracker| tracker.state.lock().is_ok_and(|state| !state.ended))
                    .map(|tracker| tracker.consumer)
                    .collect()
            })
            .unwrap_or_default();
        if consumers.is_empty() {
            continue;
        }
        if let Err(error) = store.renew(&consumers).await {
            tracing::warn!(%error, "renewing claimed deliveries failed");
        }
    }
}

#[async_trait]
impl Subscriber for SqlSubscriber {
    async fn subscribe(&self, topic: &str) -> Result<MessageStream, SubscribeError> {
        if self.closed.is_cancelled() {
            return Err(SubscribeError::Closed);
        }
        check_topic(topic)?;
        let table = self
            .store
            .table(topic)
            .await
            .map_err(SubscribeError::Transport)?;
        let (group, private) = match &self.group {
            Some(group) => (group.clone(), false),
            None => (format!("s:{}", Uuid::now_v7().simple()), true),
        };
        if private {
            self.store
                .remove_abandoned_private_groups()
                .await
                .map_err(SubscribeError::Transport)?;
        }
        self.store
            .create_group(&table, &group)
            .await
            .map_err(SubscribeError::Transport)?;
        let wakeups = self.store.wakeups();
        self.start_tasks();
        let tracker = Arc::new(Tracker {
            state: Mutex::new(TrackerState::default()),
            table: Arc::clone(&table),
            group: Arc::from(group.as_str()),
            consumer: Uuid::now_v7(),
            jobs: self.jobs.clone(),
            settled: Notify::new(),
        });
        if let Ok(mut trackers) = self.trackers.lock() {
            trackers.retain(|tracker| tracker.strong_count() > 0);
            trackers.push(Arc::downgrade(&tracker));
        }
        let subscription = Subscription {
            notified: wakeups,
            store: Arc::clone(&self.store),
            table,
            private,
            ready: VecDeque::new(),
            tracker,
            closed: self.closed.child_token(),
            failed: false,
            finished: false,
            last_touch: Instant::now(),
            blocked_backoff: BLOCKED_BACKOFF_MIN,
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
        let timeout = self.store.settings().close_timeout;
        // Subscriptions nobody polls end here (those being polled end themselves, woken by
        // the cancellation).
        let trackers: Vec<Arc<Tracker>> = self
            .trackers
            .lock()
            .map(|trackers| trackers.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default();
        for tracker in trackers {
            if tracker.end() {
                let _ = self
                    .jobs
                    .send(end_job(&tracker, tracker.group.starts_with("s:")));
            }
        }
        tokio::task::yield_now().await;
        let started = self
            .job_receiver
            .lock()
            .map(|receiver| receiver.is_none())
            .unwrap_or(true);
        if started {
            let (done, flushed) = oneshot::channel();
            if self.jobs.send(Job::Flush(done)).is_ok()
                && tokio::time::timeout(timeout, flushed).await.is_err()
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

fn end_job(tracker: &Tracker, private: bool) -> Job {
    if private {
        Job::DropGroup {
            table: Arc::clone(&tracker.table),
            group: Arc::clone(&tracker.group),
        }
    } else {
        Job::Handover {
            consumer: tracker.consumer,
        }
    }
}

struct Subscription {
    store: Arc<dyn Store>,
    table: Arc<str>,
    private: bool,
    notified: broadcast::Receiver<Arc<str>>,
    /// Rows claimed but not yet yielded.
    ready: VecDeque<Row>,
    tracker: Arc<Tracker>,
    closed: CancellationToken,
    failed: bool,
    finished: bool,
    /// When this subscription last marked its (private) group as alive.
    last_touch: Instant,
    /// The next wait while rows are held back by a running transaction.
    blocked_backoff: Duration,
}

/// First wait before looking again at rows held back by a running transaction.
const BLOCKED_BACKOFF_MIN: Duration = Duration::from_millis(5);

/// How often an ungrouped subscription marks its group alive without claiming anything.
const PRIVATE_TOUCH_INTERVAL: Duration = Duration::from_secs(60);

impl Subscription {
    fn to_message(&self, row: &Row) -> Result<Message, BoxError> {
        let id = match MessageId::parse(&row.id) {
            Ok(id) => id,
            Err(_) => MessageId::parse(&format!(
                "{}-{}-{}",
                self.store.id_prefix(),
                self.table,
                row.offset
            ))
            .map_err(boxed)?,
        };
        let mut message = Message::with_id(id, row.payload.clone());
        if let Some(metadata) = &row.metadata {
            message.metadata = serde_json::from_str::<Metadata>(metadata).map_err(boxed)?;
        }
        Ok(message)
    }

    async fn next_item(&mut self) -> Option<Result<Message, ReceiveError>> {
        let closed = self.closed.clone();
        loop {
            if closed.is_cancelled() {
                self.finish();
                return None;
            }
            if let Some(row) = self.ready.pop_front() {
                match self.to_message(&row) {
                    Ok(message) => match self.tracker.register(row.offset) {
                        Some(key) => {
                            return Some(Ok(message.delivered(SqlAcker {
                                tracker: Arc::clone(&self.tracker),
                                key,
                            })));
                        }
                        None => {
                            self.finish();
                            return None;
                        }
                    },
                    Err(error) => {
                        // Not a row we can read: ack it so that it does not come back
                        // forever, and say so.
                        tracing::warn!(offset = row.offset, table = %self.table, %error, "unreadable message row acknowledged and skipped");
                        let _ = self.tracker.jobs.send(Job::Ack {
                            table: Arc::clone(&self.tracker.table),
                            group: Arc::clone(&self.tracker.group),
                            offset: row.offset,
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
            let store = Arc::clone(&self.store);
            let config = store.settings();
            let unsettled = self.tracker.unsettled();
            if unsettled >= config.in_flight_max {
                let wait = config.poll_interval;
                tokio::select! {
                    biased;
                    () = closed.cancelled() => {}
                    () = self.tracker.settled.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            let limit = config.fetch_batch.min(config.in_flight_max - unsettled);
            // Drain notifications that arrived before this claim: it sees their rows.
            while self.notified.try_recv().is_ok() {}
            self.tracker.clear_due_if_passed();
            let claimed = tokio::select! {
                biased;
                () = closed.cancelled() => continue,
                claimed = self.claim(limit) => claimed,
            };
            let blocked = match claimed {
                Ok(claimed) if !claimed.rows.is_empty() => {
                    self.blocked_backoff = BLOCKED_BACKOFF_MIN;
                    self.ready.extend(claimed.rows);
                    continue;
                }
                Ok(claimed) => claimed.blocked,
                Err(error) => {
                    self.failed = true;
                    return Some(Err(ReceiveError::Transport(error)));
                }
            };
            let mut wait = self
                .tracker
                .next_due()
                .map(|at| at.saturating_duration_since(Instant::now()))
                .unwrap_or(config.poll_interval)
                .min(config.poll_interval);
            if blocked {
                // Committed rows wait behind a running transaction: look again soon, less
                // often the longer it runs.
                wait = wait.min(self.blocked_backoff);
                self.blocked_backoff = (self.blocked_backoff * 2).min(config.poll_interval);
            } else {
                self.blocked_backoff = BLOCKED_BACKOFF_MIN;
            }
            let deadline = tokio::time::Instant::now() + wait;
            let table = Arc::clone(&self.table);
            loop {
                tokio::select! {
                    biased;
                    () = closed.cancelled() => break,
                    () = tokio::time::sleep_until(deadline) => break,
                    notified = self.notified.recv() => match notified {
                        Ok(name) if !name.is_empty() && *name != *table => continue,
                        _ => break,
                    },
                }
            }
        }
    }

    async fn claim(&mut self, limit: usize) -> Result<Claimed, BoxError> {
        let touch = self.private && self.last_touch.elapsed() >= PRIVATE_TOUCH_INTERVAL;
        let claimed = self
            .store
            .claim(
                &self.table,
                &self.tracker.group,
                self.tracker.consumer,
                limit,
                touch,
            )
            .await?;
        if touch || !claimed.rows.is_empty() {
            self.last_touch = Instant::now();
        }
        Ok(claimed)
    }

    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.ready.clear();
        if self.tracker.end() {
            let _ = self.tracker.jobs.send(end_job(&self.tracker, self.private));
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.finish();
    }
}
