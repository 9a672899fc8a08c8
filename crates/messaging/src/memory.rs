//! The in-memory pub/sub: fan-out per subscriber, consumer groups, optional retention for late
//! subscribers, redelivery on nack (with delay), bounded everywhere.
//!
//! Each topic is a bounded log of messages. Every subscription without a group is its own
//! group; subscriptions of one named group share the group's cursor (competing consumers).
//! A group reads the log at its own pace, so one slow subscriber never delays another:
//! subscribers only meet when the log is full — then publishers wait for the slowest active
//! group to make room (backpressure, up to [`InMemoryConfig::publish_timeout`]) instead of
//! memory growing. Unsettled messages are held by their deliveries (at most
//! [`InMemoryConfig::in_flight_max`] per subscription), not by the log.
//!
//! Without [`InMemoryConfig::persistent`], a message is kept only until every group present
//! when it was published has taken it, a group disappears with its last subscription, and a
//! topic with no group left is forgotten (memory does not grow with every topic name used). With
//! it, the newest [`InMemoryConfig::topic_messages_max`] messages stay for late subscribers and
//! named groups keep their cursor while no member is connected (a group offline longer than the
//! retention window misses what fell out of it, like a broker's retention).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::message::{Acknowledger, Message, Outcome};
use crate::pubsub::{
    CloseError, MessageStream, PublishError, Publisher, SubscribeError, Subscriber, check_topic,
};

/// Settings of an [`InMemoryPubSub`]. Every field has a limit; none is unbounded.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InMemoryConfig {
    /// Keep the newest messages for late subscribers and offline named groups.
    pub persistent: bool,
    /// Messages a topic holds at most (retained, or not yet taken by every group).
    pub topic_messages_max: usize,
    /// Unsettled deliveries per subscription; at 1, delivery order holds across redeliveries.
    pub in_flight_max: usize,
    /// How long a publish waits for room in a full topic; `None` waits as long as it takes.
    pub publish_timeout: Option<Duration>,
}

impl Default for InMemoryConfig {
    fn default() -> Self {
        Self {
            persistent: false,
            topic_messages_max: 65_536,
            in_flight_max: 1_024,
            publish_timeout: None,
        }
    }
}

impl InMemoryConfig {
    /// Builder: keep messages for late subscribers.
    #[must_use]
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    /// Builder: see [`InMemoryConfig::topic_messages_max`] (at least 1).
    #[must_use]
    pub fn topic_messages_max(mut self, messages: usize) -> Self {
        self.topic_messages_max = messages.max(1);
        self
    }

    /// Builder: see [`InMemoryConfig::in_flight_max`] (at least 1).
    #[must_use]
    pub fn in_flight_max(mut self, messages: usize) -> Self {
        self.in_flight_max = messages.max(1);
        self
    }

    /// Builder: see [`InMemoryConfig::publish_timeout`].
    #[must_use]
    pub fn publish_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.publish_timeout = timeout;
        self
    }
}

/// Messages a subscription takes from its topic under one lock.
const TAKE_BATCH_MAX: usize = 256;

/// The in-memory pub/sub. Cheap to clone; clones share the topics.
#[derive(Clone)]
pub struct InMemoryPubSub {
    shared: Arc<Shared>,
}

struct Shared {
    config: InMemoryConfig,
    topics: Mutex<HashMap<Arc<str>, Arc<Topic>>>,
    anonymous_groups: AtomicU64,
}

impl fmt::Debug for InMemoryPubSub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryPubSub")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Default for InMemoryPubSub {
    fn default() -> Self {
        Self::new(InMemoryConfig::default())
    }
}

impl InMemoryPubSub {
    /// A pub/sub with `config`.
    pub fn new(config: InMemoryConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                topics: Mutex::new(HashMap::new()),
                anonymous_groups: AtomicU64::new(0),
            }),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &InMemoryConfig {
        &self.shared.config
    }

    /// A publisher.
    pub fn publisher(&self) -> InMemoryPublisher {
        InMemoryPublisher {
            pubsub: self.clone(),
            closed: CancellationToken::new(),
        }
    }

    /// A subscriber whose every subscription gets every message (fan-out).
    pub fn subscriber(&self) -> InMemorySubscriber {
        self.subscriber_with_group(None)
    }

    /// A subscriber in consumer group `group`: all subscriptions to a topic in the same group,
    /// from any subscriber, share its messages (each delivered to one of them).
    pub fn subscriber_in_group(&self, group: &str) -> InMemorySubscriber {
        self.subscriber_with_group(Some(Arc::from(group)))
    }

    fn subscriber_with_group(&self, group: Option<Arc<str>>) -> InMemorySubscriber {
        InMemorySubscriber {
            pubsub: self.clone(),
            group,
            closed: CancellationToken::new(),
        }
    }

    /// What a topic holds now, for tests and diagnostics.
    pub fn topic_stats(&self, topic: &str) -> Option<TopicStats> {
        let topic = lock(&self.shared.topics).get(topic).cloned()?;
        let state = topic.lock();
        let head = state.next_seq();
        let mut groups: Vec<GroupStats> = state
            .groups
            .iter()
            .map(|(name, group)| GroupStats {
                name: group.named.then(|| name.to_string()),
                members: group.members,
                lag_messages: head.saturating_sub(group.cursor.max(state.base_seq)),
                redeliveries_waiting: group.redeliver.len() + group.delayed.len(),
            })
            .collect();
        groups.sort_by(|a, b| (a.name.is_none(), &a.name).cmp(&(b.name.is_none(), &b.name)));
        Some(TopicStats {
            held_messages: state.log.len(),
            groups,
        })
    }

    /// The topic to publish to; `None` when it does not exist and would not keep messages.
    fn topic_for_publish(&self, name: &str) -> Option<Arc<Topic>> {
        if !self.shared.config.persistent {
            return lock(&self.shared.topics).get(name).cloned();
        }
        Some(self.topic(&mut lock(&self.shared.topics), name))
    }

    /// The topic `name`, created when missing. Called with the topic map locked, so that a
    /// topic is never removed between being looked up and gaining a group.
    fn topic(&self, topics: &mut HashMap<Arc<str>, Arc<Topic>>, name: &str) -> Arc<Topic> {
        if let Some(topic) = topics.get(name) {
            return topic.clone();
        }
        let topic = Arc::new(Topic {
            state: Mutex::new(TopicState {
                log: VecDeque::new(),
                base_seq: 0,
                groups: HashMap::new(),
            }),
            data_ready: Notify::new(),
            space_ready: Notify::new(),
            persistent: self.shared.config.persistent,
            capacity: self.shared.config.topic_messages_max.max(1),
        });
        topics.insert(Arc::from(name), topic.clone());
        topic
    }
}

/// A snapshot of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicStats {
    /// Messages the topic's log holds.
    pub held_messages: usize,
    /// Its groups, named ones by name, then anonymous ones.
    pub groups: Vec<GroupStats>,
}

/// A snapshot of one group of a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupStats {
    /// The group's name; `None` for a subscription without a group.
    pub name: Option<String>,
    /// Subscriptions connected.
    pub members: usize,
    /// Messages published but not yet taken by the group.
    pub lag_messages: u64,
    /// Nacked messages waiting to be delivered again.
    pub redeliveries_waiting: usize,
}

/// `now + delay`, or a point a century away when that does not fit in an `Instant`.
fn deadline_after(delay: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(delay)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (no multi-step updates
    // across an await or a callback), so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Topic {
    state: Mutex<TopicState>,
    /// Signalled after messages are published or redeliveries are queued.
    data_ready: Notify,
    /// Signalled when a group advanced and room may have appeared.
    space_ready: Notify,
    persistent: bool,
    capacity: usize,
}

impl Topic {
    fn lock(&self) -> MutexGuard<'_, TopicState> {
        lock(&self.state)
    }
}

struct TopicState {
    /// Messages from `base_seq` on, without deliveries.
    log: VecDeque<Message>,
    base_seq: u64,
    groups: HashMap<Arc<str>, GroupState>,
}

impl TopicState {
    fn next_seq(&self) -> u64 {
        self.base_seq + self.log.len() as u64
    }

    /// Drops what no group can still need: taken by every active group, and (persistent
    /// topics) beyond the retention window.
    fn trim(&mut self, persistent: bool, capacity: usize) {
        self.trim_for(persistent, capacity, 0);
    }

    /// [`TopicState::trim`], making room for `incoming` more messages when the retention
    /// window allows it (persistent topics drop their oldest retained messages).
    fn trim_for(&mut self, persistent: bool, capacity: usize, incoming: usize) {
        let head = self.next_seq();
        let needed_from = self
            .groups
            .values()
            .filter(|group| group.members > 0 || !persistent)
            .map(|group| group.cursor)
            .min()
            .unwrap_or(head);
        let keep_from = if persistent {
            // Keep the newest `capacity`, but never drop what an active group still needs.
            needed_from.min((head + incoming as u64).saturating_sub(capacity as u64))
        } else {
            needed_from
        };
        while self.base_seq < keep_from && !self.log.is_empty() {
            self.log.pop_front();
            self.base_seq += 1;
        }
    }
}

struct GroupState {
    named: bool,
    members: usize,
    /// Next sequence number to deliver.
    cursor: u64,
    /// Nacked or dropped messages, ready now; delivered before the log.
    redeliver: VecDeque<Message>,
    /// Nacked with a delay.
    delayed: BinaryHeap<Reverse<Delayed>>,
    delayed_counter: u64,
}

struct Delayed {
    due: Instant,
    order: u64,
    message: Message,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.order) == (other.due, other.order)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.order).cmp(&(other.due, other.order))
    }
}

/// Publishes to an [`InMemoryPubSub`].
#[derive(Clone)]
pub struct InMemoryPublisher {
    pubsub: InMemoryPubSub,
    closed: CancellationToken,
}

impl fmt::Debug for InMemoryPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryPublisher")
            .field("closed", &self.closed.is_cancelled())
            .finish()
    }
}

#[async_trait]
impl Publisher for InMemoryPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<(), PublishError> {
        if self.closed.is_cancelled() {
            return Err(PublishError::Closed);
        }
        check_topic(topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        let Some(topic) = self.pubsub.topic_for_publish(topic) else {
            // Not persistent and nobody subscribed: the messages go nowhere.
            return Ok(());
        };
        let deadline = self
            .pubsub
            .shared
            .config
            .publish_timeout
            .map(|timeout| (deadline_after(timeout), timeout));
        // Copies without deliveries, made before any lock is taken: dropping a received
        // message's last clone settles it, and settling locks its topic.
        let detached: Vec<Message> = messages.iter().map(Message::detached).collect();
        drop(messages);
        let mut pending = detached.into_iter().peekable();
        while pending.peek().is_some() {
            let space = topic.space_ready.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            let published_some = {
                let mut state = topic.lock();
                if state.groups.is_empty() && !topic.persistent {
                    // Nobody listens and nothing is retained: the messages go nowhere.
                    return Ok(());
                }
                let mut room = topic.capacity.saturating_sub(state.log.len());
                if room < pending.len() {
                    state.trim_for(topic.persistent, topic.capacity, pending.len());
                    room = topic.capacity.saturating_sub(state.log.len());
                }
                let mut published = 0;
                while room > 0 {
                    let Some(message) = pending.next() else { break };
                    state.log.push_back(message);
                    room -= 1;
                    published += 1;
                }
                published > 0
            };
            if published_some {
                topic.data_ready.notify_waiters();
            }
            if pending.peek().is_none() {
                break;
            }
            if self.closed.is_cancelled() {
                return Err(PublishError::Closed);
            }
            let far = deadline_after(Duration::MAX);
            let (wait_until, timeout) = deadline.unwrap_or((far, Duration::MAX));
            tokio::select! {
                () = space => {}
                () = self.closed.cancelled() => return Err(PublishError::Closed),
                () = tokio::time::sleep_until(wait_until) => {
                    return Err(PublishError::TimedOut {
                        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    });
                }
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<(), CloseError> {
        // Publishes are synchronous into the topic: nothing to flush. A publish waiting for
        // room gives up with `Closed`.
        self.closed.cancel();
        Ok(())
    }
}

/// Subscribes to an [`InMemoryPubSub`], alone (fan-out) or in a consumer group.
#[derive(Clone)]
pub struct InMemorySubscriber {
    pubsub: InMemoryPubSub,
    group: Option<Arc<str>>,
    closed: CancellationToken,
}

impl fmt::Debug for InMemorySubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemorySubscriber")
            .field("group", &self.group)
            .field("closed", &self.closed.is_cancelled())
            .finish()
    }
}

#[async_trait]
impl Subscriber for InMemorySubscriber {
    async fn subscribe(&self, topic_name: &str) -> Result<MessageStream, SubscribeError> {
        if self.closed.is_cancelled() {
            return Err(SubscribeError::Closed);
        }
        check_topic(topic_name)?;
        let (key, named) = match &self.group {
            Some(name) => (name.clone(), true),
            None => {
                let n = self
                    .pubsub
                    .shared
                    .anonymous_groups
                    .fetch_add(1, Ordering::Relaxed);
                (Arc::from(format!("\u{0}anonymous-{n}")), false)
            }
        };
        let topic = {
            let mut topics = lock(&self.pubsub.shared.topics);
            let topic = self.pubsub.topic(&mut topics, topic_name);
            let mut state = topic.lock();
            // A new group starts at the oldest retained message (persistent) or at the end.
            let start = if topic.persistent {
                state.base_seq
            } else {
                state.next_seq()
            };
            let group = state
                .groups
                .entry(key.clone())
                .or_insert_with(|| GroupState {
                    named,
                    members: 0,
                    cursor: start,
                    redeliver: VecDeque::new(),
                    delayed: BinaryHeap::new(),
                    delayed_counter: 0,
                });
            group.members += 1;
            drop(state);
            topic
        };
        let member = Arc::new(Member {
            pubsub: Arc::downgrade(&self.pubsub.shared),
            name: Arc::from(topic_name),
            topic,
            group: key,
            in_flight: AtomicUsize::new(0),
            in_flight_max: self.pubsub.shared.config.in_flight_max.max(1),
            slot_freed: Notify::new(),
        });
        let state = MemberStream {
            member: member.clone(),
            buffer: VecDeque::new(),
            closed: self.closed.child_token(),
            _guard: MemberGuard(member),
        };
        Ok(MessageStream::new(futures::stream::unfold(
            state,
            |mut state| async move {
                let message = state.next().await?;
                Some((Ok(message), state))
            },
        )))
    }

    async fn close(&self) -> Result<(), CloseError> {
        self.closed.cancel();
        Ok(())
    }
}

/// One subscription's link to its group.
struct Member {
    /// To remove the topic when its last group leaves (non-persistent topics).
    pubsub: std::sync::Weak<Shared>,
    name: Arc<str>,
    topic: Arc<Topic>,
    group: Arc<str>,
    in_flight: AtomicUsize,
    in_flight_max: usize,
    slot_freed: Notify,
}

impl Member {
    /// Puts a refused message back for its group (dropped when the group is gone).
    fn redeliver(&self, message: Message, delay: Option<Duration>) {
        {
            let mut state = self.topic.lock();
            let Some(group) = state.groups.get_mut(&self.group) else {
                return;
            };
            match delay {
                Some(delay) if !delay.is_zero() => {
                    group.delayed_counter += 1;
                    let order = group.delayed_counter;
                    group.delayed.push(Reverse(Delayed {
                        due: deadline_after(delay),
                        order,
                        message,
                    }));
                }
                _ => group.redeliver.push_back(message),
            }
        }
        self.topic.data_ready.notify_waiters();
    }
}

/// Leaves the group when the subscription's stream is dropped.
struct MemberGuard(Arc<Member>);

impl Drop for MemberGuard {
    fn drop(&mut self) {
        let topic = &self.0.topic;
        // Lock order: the topic map, then the topic (as in subscribe).
        let shared = self.0.pubsub.upgrade();
        let mut topics = shared.as_ref().map(|shared| lock(&shared.topics));
        {
            let mut state = topic.lock();
            let remove = match state.groups.get_mut(&self.0.group) {
                Some(group) => {
                    group.members = group.members.saturating_sub(1);
                    group.members == 0 && (!group.named || !topic.persistent)
                }
                None => false,
            };
            if remove {
                state.groups.remove(&self.0.group);
            }
            state.trim(topic.persistent, topic.capacity);
            if !topic.persistent && state.groups.is_empty() {
                // Nobody listens and nothing is kept: forget the topic, so that the map does
                // not grow with every name ever used.
                if let Some(topics) = topics.as_mut()
                    && topics
                        .get(&self.0.name)
                        .is_some_and(|current| Arc::ptr_eq(current, topic))
                {
                    topics.remove(&self.0.name);
                }
            }
        }
        drop(topics);
        topic.space_ready.notify_waiters();
    }
}

/// The delivery of one message to one subscription.
struct MemoryDelivery {
    member: Arc<Member>,
    /// Kept to deliver again after a nack.
    message: Message,
}

impl Acknowledger for MemoryDelivery {
    fn settled(&self, outcome: Outcome) {
        // Queue the redelivery before freeing the slot, so that a subscription waiting for
        // the slot finds the refused message first (order at in_flight_max = 1).
        match outcome {
            Outcome::Acked => {}
            Outcome::Nacked { delay } => self.member.redeliver(self.message.clone(), delay),
            Outcome::Dropped => self.member.redeliver(self.message.clone(), None),
        }
        let previous = self.member.in_flight.fetch_sub(1, Ordering::AcqRel);
        if previous >= self.member.in_flight_max {
            self.member.slot_freed.notify_waiters();
        }
    }
}

struct MemberStream {
    member: Arc<Member>,
    buffer: VecDeque<Message>,
    closed: CancellationToken,
    _guard: MemberGuard,
}

impl MemberStream {
    async fn next(&mut self) -> Option<Message> {
        loop {
            if self.closed.is_cancelled() {
                // Buffered deliveries are dropped with the stream: their messages go back to
                // the group.
                self.buffer.clear();
                return None;
            }
            if let Some(message) = self.buffer.pop_front() {
                return Some(message);
            }
            self.fill().await?;
        }
    }

    /// Takes the next messages for this subscription into the buffer; `None` once closed.
    async fn fill(&mut self) -> Option<()> {
        let member = self.member.clone();
        loop {
            let in_flight = member.in_flight.load(Ordering::Acquire);
            if in_flight >= member.in_flight_max {
                let freed = member.slot_freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if member.in_flight.load(Ordering::Acquire) >= member.in_flight_max {
                    tokio::select! {
                        () = freed => {}
                        () = self.closed.cancelled() => return None,
                    }
                }
                continue;
            }
            let free = (member.in_flight_max - in_flight).min(TAKE_BATCH_MAX);
            let ready = member.topic.data_ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            let (taken, next_due, advanced) = {
                let mut state = member.topic.lock();
                let base_seq = state.base_seq;
                let next_seq = state.next_seq();
                let TopicState { log, groups, .. } = &mut *state;
                let group = groups.get_mut(&member.group)?;
                let now = Instant::now();
                while group
                    .delayed
                    .peek()
                    .is_some_and(|Reverse(delayed)| delayed.due <= now)
                {
                    if let Some(Reverse(delayed)) = group.delayed.pop() {
                        group.redeliver.push_back(delayed.message);
                    }
                }
                let mut taken = Vec::with_capacity(free.min(64));
                while taken.len() < free {
                    let Some(message) = group.redeliver.pop_front() else {
                        break;
                    };
                    taken.push(message);
                }
                // A group that fell behind the retention window skips what it lost.
                group.cursor = group.cursor.max(base_seq);
                let mut advanced = false;
                // At in_flight_max = 1 order holds across redeliveries: while a refused message
                // waits out its delay, nothing after it is delivered.
                let hold_for_delayed = member.in_flight_max == 1 && !group.delayed.is_empty();
                while !hold_for_delayed && taken.len() < free && group.cursor < next_seq {
                    let index = usize::try_from(group.cursor - base_seq).unwrap_or(usize::MAX);
                    let Some(message) = log.get(index) else { break };
                    taken.push(message.clone());
                    group.cursor += 1;
                    advanced = true;
                }
                let next_due = group.delayed.peek().map(|Reverse(delayed)| delayed.due);
                if advanced && state.log.len() >= member.topic.capacity {
                    state.trim(member.topic.persistent, member.topic.capacity);
                } else if advanced && !member.topic.persistent {
                    state.trim(false, member.topic.capacity);
                }
                (taken, next_due, advanced)
            };
            if advanced {
                member.topic.space_ready.notify_waiters();
            }
            if !taken.is_empty() {
                member.in_flight.fetch_add(taken.len(), Ordering::AcqRel);
                self.buffer.extend(taken.into_iter().map(|message| {
                    let kept = message.clone();
                    message.delivered(MemoryDelivery {
                        member: member.clone(),
                        message: kept,
                    })
                }));
                return Some(());
            }
            match next_due {
                Some(due) => tokio::select! {
                    () = ready => {}
                    () = tokio::time::sleep_until(due) => {}
                    () = self.closed.cancelled() => return None,
                },
                None => tokio::select! {
                    () = ready => {}
                    () = self.closed.cancelled() => return None,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn payloads(messages: &[Message]) -> Vec<String> {
        messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }

    async fn take(stream: &mut MessageStream, n: usize) -> Vec<Message> {
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
                Ok(Some(Ok(message))) => out.push(message),
                other => panic!("expected a message, got {other:?}"),
            }
        }
        out
    }

    #[tokio::test]
    async fn fan_out_and_groups() {
        let pubsub = InMemoryPubSub::default();
        let mut alone_a = pubsub.subscriber().subscribe("t").await.unwrap();
        let mut alone_b = pubsub.subscriber().subscribe("t").await.unwrap();
        let mut group_1 = pubsub
            .subscriber_in_group("g")
            .subscribe("t")
            .await
            .unwrap();
        let mut group_2 = pubsub
            .subscriber_in_group("g")
            .subscribe("t")
            .await
            .unwrap();
        let messages: Vec<Message> = (0..4).map(|i| Message::new(format!("{i}"))).collect();
        pubsub.publisher().publish("t", messages).await.unwrap();
        for stream in [&mut alone_a, &mut alone_b] {
            let got = take(stream, 4).await;
            assert_eq!(payloads(&got), ["0", "1", "2", "3"]);
            got.iter().for_each(|m| assert!(m.ack()));
        }
        // Each group member takes a share; together they see each message once.
        let first = take(&mut group_1, 1).await;
        let stats = pubsub.topic_stats("t").unwrap();
        assert_eq!(stats.groups[0].name.as_deref(), Some("g"));
        assert_eq!(stats.groups[0].members, 2);
        drop(first);
        let _ = &mut group_2;
    }

    #[tokio::test]
    async fn nack_redelivers_and_ack_does_not() {
        let pubsub = InMemoryPubSub::new(InMemoryConfig::default().in_flight_max(1));
        let mut stream = pubsub.subscriber().subscribe("t").await.unwrap();
        pubsub
            .publisher()
            .publish("t", vec![Message::new("a"), Message::new("b")])
            .await
            .unwrap();
        let first = take(&mut stream, 1).await.remove(0);
        assert!(first.nack());
        let again = take(&mut stream, 1).await.remove(0);
        assert!(again.same_content(&first));
        assert!(again.ack());
        let second = take(&mut stream, 1).await.remove(0);
        assert_eq!(&second.payload[..], b"b");
    }

    #[tokio::test]
    async fn a_full_topic_makes_publishers_wait_not_grow() {
        let pubsub = InMemoryPubSub::new(
            InMemoryConfig::default()
                .topic_messages_max(8)
                .publish_timeout(Some(Duration::from_millis(50))),
        );
        let _stream = pubsub.subscriber().subscribe("t").await.unwrap();
        let publisher = pubsub.publisher();
        let batch: Vec<Message> = (0..8).map(|i| Message::new(format!("{i}"))).collect();
        publisher.publish("t", batch).await.unwrap();
        let refused = publisher.publish("t", vec![Message::new("x")]).await;
        assert!(matches!(
            refused,
            Err(PublishError::TimedOut { timeout_ms: 50 })
        ));
        assert_eq!(pubsub.topic_stats("t").unwrap().held_messages, 8);
    }

    #[tokio::test]
    async fn a_persistent_topic_keeps_the_newest_messages_and_never_wedges() {
        let pubsub = InMemoryPubSub::new(
            InMemoryConfig::default()
                .persistent(true)
                .topic_messages_max(8)
                .publish_timeout(Some(Duration::from_secs(5))),
        );
        let publisher = pubsub.publisher();
        for i in 0..20 {
            publisher
                .publish("t", vec![Message::new(format!("{i}"))])
                .await
                .unwrap();
        }
        publisher
            .publish(
                "t",
                (20..25).map(|i| Message::new(format!("{i}"))).collect(),
            )
            .await
            .unwrap();
        assert_eq!(pubsub.topic_stats("t").unwrap().held_messages, 8);
        let mut late = pubsub.subscriber().subscribe("t").await.unwrap();
        let got = take(&mut late, 8).await;
        assert_eq!(
            payloads(&got),
            ["17", "18", "19", "20", "21", "22", "23", "24"]
        );
    }

    #[tokio::test]
    async fn closing_the_publisher_ends_a_publish_waiting_for_room() {
        let pubsub = InMemoryPubSub::new(InMemoryConfig::default().topic_messages_max(2));
        let _stream = pubsub.subscriber().subscribe("t").await.unwrap();
        let publisher = pubsub.publisher();
        let waiting = {
            let publisher = publisher.clone();
            tokio::spawn(async move {
                publisher
                    .publish("t", (0..3).map(|i| Message::new(format!("{i}"))).collect())
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        publisher.close().await.unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(
            matches!(result, Ok(Ok(Err(PublishError::Closed)))),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_delayed_nack_holds_later_messages_at_in_flight_one() {
        let pubsub = InMemoryPubSub::new(InMemoryConfig::default().in_flight_max(1));
        let mut stream = pubsub.subscriber().subscribe("t").await.unwrap();
        pubsub
            .publisher()
            .publish("t", vec![Message::new("a"), Message::new("b")])
            .await
            .unwrap();
        let first = take(&mut stream, 1).await.remove(0);
        assert!(first.nack_with_delay(Duration::from_millis(150)));
        let again = take(&mut stream, 1).await.remove(0);
        assert_eq!(&again.payload[..], b"a", "b overtook the delayed a");
        again.ack();
        assert_eq!(&take(&mut stream, 1).await[0].payload[..], b"b");
    }

    #[tokio::test]
    async fn republishing_a_received_message_does_not_deadlock() {
        let pubsub = InMemoryPubSub::default();
        let mut stream = pubsub.subscriber().subscribe("t").await.unwrap();
        let mut copies = pubsub.subscriber().subscribe("copies").await.unwrap();
        let publisher = pubsub.publisher();
        publisher
            .publish("t", vec![Message::new("a")])
            .await
            .unwrap();
        let received = take(&mut stream, 1).await.remove(0);
        // The last clone of a delivery is dropped inside publish: it settles (Dropped) and
        // goes back to "t" — without the publish holding a topic lock at that moment.
        tokio::time::timeout(
            Duration::from_secs(5),
            publisher.publish("copies", vec![received]),
        )
        .await
        .expect("publish finished")
        .unwrap();
        assert_eq!(&take(&mut copies, 1).await[0].payload[..], b"a");
        assert_eq!(
            &take(&mut stream, 1).await[0].payload[..],
            b"a",
            "redelivered after the drop"
        );
    }

    #[tokio::test]
    async fn topics_nobody_listens_to_are_forgotten() {
        let pubsub = InMemoryPubSub::default();
        pubsub
            .publisher()
            .publish("nobody", vec![Message::new("x")])
            .await
            .unwrap();
        assert!(pubsub.topic_stats("nobody").is_none());
        let stream = pubsub.subscriber().subscribe("t").await.unwrap();
        assert!(pubsub.topic_stats("t").is_some());
        drop(stream);
        assert!(pubsub.topic_stats("t").is_none());
        // A new subscription gets a working topic again.
        let mut stream = pubsub.subscriber().subscribe("t").await.unwrap();
        pubsub
            .publisher()
            .publish("t", vec![Message::new("y")])
            .await
            .unwrap();
        assert_eq!(&take(&mut stream, 1).await[0].payload[..], b"y");
    }

    #[tokio::test]
    async fn a_huge_nack_delay_does_not_panic_or_lose_the_message() {
        let pubsub = InMemoryPubSub::default();
        let mut stream = pubsub.subscriber().subscribe("t").await.unwrap();
        pubsub
            .publisher()
            .publish("t", vec![Message::new("a")])
            .await
            .unwrap();
        let first = take(&mut stream, 1).await.remove(0);
        assert!(first.nack_with_delay(Duration::MAX));
        let stats = pubsub.topic_stats("t").unwrap();
        assert_eq!(stats.groups[0].redeliveries_waiting, 1);
    }
}
