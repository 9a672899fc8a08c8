//! Subscriptions: one librdkafka consumer each, and one task that hands out its records, keeps
//! what is unsettled, redelivers nacks and stores the offsets librdkafka commits.
//!
//! Per assigned partition the task keeps the unsettled records by offset. The offset it stores
//! for commit is the lowest unsettled one (or the one after the last received, when nothing is
//! unsettled): a committed offset never passes a message the application has not acked. Every
//! assignment of a partition starts an *epoch*; a settlement carries the epoch of its delivery,
//! and one from an earlier epoch (the partition was revoked meanwhile, and the new owner
//! redelivers from the committed offset) is ignored.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::{
    Acknowledger, CloseError, DeliverFrom, Message, MessageStream, Outcome, ReceiveError,
    SubscribeError, Subscriber,
};
use futures::FutureExt as _;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, Place};
use crate::{Shared, kafka_topic_name, millis, millis_u64};

/// Subscribes to Kafka topics; see [`KafkaPubSub::subscriber`](crate::KafkaPubSub::subscriber)
/// and [`KafkaPubSub::subscriber_in_group`](crate::KafkaPubSub::subscriber_in_group).
pub struct KafkaSubscriber {
    shared: Arc<Shared>,
    /// The Kafka consumer group (prefix included), when the subscriber has one.
    group: Option<String>,
    closed: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for KafkaSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSubscriber")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl KafkaSubscriber {
    pub(crate) fn new(shared: Arc<Shared>, group: Option<String>) -> Self {
        Self {
            shared,
            group,
            closed: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// The Kafka consumer group (prefix included), when the subscriber has one.
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    fn consumer(
        &self,
        events: mpsc::UnboundedSender<Rebalanced>,
    ) -> Result<StreamConsumer<SubscriptionContext>, rdkafka::error::KafkaError> {
        let config = &self.shared.config;
        let mut client = config.client_config(&self.shared.bootstrap);
        client
            .set("enable.partition.eof", "false")
            // librdkafka stops fetching a partition whose prefetched records exceed its queue
            // limits and looks again only after this (1 s by default): an application a little
            // slower than the fetcher then sees 1 s gaps.
            .set("fetch.queue.backoff.ms", "100")
            .set("allow.auto.create.topics", "false")
            .set(
                "auto.offset.reset",
                match config.deliver_from {
                    DeliverFrom::Oldest => "earliest",
                    DeliverFrom::New => "latest",
                },
            );
        match &self.group {
            Some(group) => {
                let heartbeat = (config.session_timeout / 4).max(Duration::from_millis(100));
                client
                    .set("group.id", group)
                    .set("enable.auto.commit", "true")
                    .set("enable.auto.offset.store", "false")
                    .set("auto.commit.interval.ms", millis(config.commit_interval))
                    .set("session.timeout.ms", millis(config.session_timeout))
                    .set("heartbeat.interval.ms", millis(heartbeat))
                    .set("partition.assignment.strategy", "cooperative-sticky");
            }
            None => {
                // librdkafka wants a group id for a consumer; a private one that never joins
                // (partitions are assigned, not subscribed) and never commits.
                client
                    .set(
                        "group.id",
                        format!("{}private-{}", config.group_prefix, uuid::Uuid::new_v4()),
                    )
                    .set("enable.auto.commit", "false");
            }
        }
        for (key, value) in &config.client_options {
            client.set(key, value);
        }
        client.create_with_context(SubscriptionContext { events })
    }

    /// For a subscription without a group: every partition, from where
    /// [`KafkaConfig::deliver_from`](crate::KafkaConfig::deliver_from) says.
    async fn assign_all(
        &self,
        consumer: &Arc<StreamConsumer<SubscriptionContext>>,
        topic: &str,
    ) -> Result<Vec<i32>, SubscribeError> {
        let count = self
            .shared
            .partition_count(topic)
            .await
            .map_err(SubscribeError::Transport)?;
        let partitions: Vec<i32> = (0..i32::try_from(count).unwrap_or(i32::MAX)).collect();
        let from = self.shared.config.deliver_from;
        let timeout = self.shared.config.connect_timeout;
        let consumer = Arc::clone(consumer);
        let topic = topic.to_owned();
        let chosen = partitions.clone();
        let assigned = tokio::task::spawn_blocking(move || {
            let mut list = TopicPartitionList::with_capacity(chosen.len());
            for partition in chosen {
                let offset = match from {
                    DeliverFrom::Oldest => Offset::Beginning,
                    // The end as of now, fixed: whatever is published once subscribe returned
                    // lies at or after it.
                    DeliverFrom::New => {
                        let (_low, high) = consumer.fetch_watermarks(&topic, partition, timeout)?;
                        Offset::Offset(high)
                    }
                };
                list.add_partition_offset(&topic, partition, offset)?;
            }
            consumer.assign(&list)
        })
        .await;
        match assigned {
            Ok(Ok(())) => Ok(partitions),
            Ok(Err(error)) => Err(SubscribeError::Transport(Box::new(error))),
            Err(join) => Err(SubscribeError::Transport(Box::new(join))),
        }
    }
}

#[async_trait]
impl Subscriber for KafkaSubscriber {
    async fn subscribe(&self, topic: &str) -> Result<MessageStream, SubscribeError> {
        if self.closed.is_cancelled() {
            return Err(SubscribeError::Closed);
        }
        let name = kafka_topic_name(&self.shared.config.topic_prefix, topic)?;
        self.shared
            .ensure_topic(&name)
            .await
            .map_err(SubscribeError::Transport)?;
        let (events, rebalances) = mpsc::unbounded_channel();
        let consumer = Arc::new(
            self.consumer(events)
                .map_err(|error| SubscribeError::Transport(Box::new(error)))?,
        );
        let initial = match &self.group {
            Some(_) => {
                consumer
                    .subscribe(&[&name])
                    .map_err(|error| SubscribeError::Transport(Box::new(error)))?;
                Vec::new()
            }
            None => self.assign_all(&consumer, &name).await?,
        };
        let (out, stream) = mpsc::unbounded_channel();
        let (settlements, settled) = mpsc::unbounded_channel();
        let mut subscription = Subscription {
            consumer,
            topic: name,
            grouped: self.group.is_some(),
            partitions: HashMap::new(),
            epoch_last: 0,
            unsettled: 0,
            full_since: None,
            paused: false,
            timers: BinaryHeap::new(),
            out,
            settlements,
            in_flight_max: self.shared.config.in_flight_max,
            close_timeout: self.shared.config.close_timeout,
        };
        for partition in initial {
            subscription.assigned(partition);
        }
        let closed = self.closed.child_token();
        let task = tokio::spawn(subscription.run(rebalances, settled, closed));
        {
            let mut tasks = self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            tasks.retain(|task| !task.is_finished());
            tasks.push(task);
        }
        if self.closed.is_cancelled() {
            // Closed while subscribing: close saw the task or not; either way the stream ends.
            return Err(SubscribeError::Closed);
        }
        let mut stream = stream;
        Ok(MessageStream::new(futures::stream::poll_fn(move |cx| {
            stream.poll_recv(cx)
        })))
    }

    async fn close(&self) -> Result<(), CloseError> {
        self.closed.cancel();
        let tasks = std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let timeout = self.shared.config.close_timeout;
        let pending = tasks.len();
        let all = futures_join_all(tasks);
        match tokio::time::timeout(timeout + Duration::from_secs(1), all).await {
            Ok(()) => Ok(()),
            Err(_) => Err(CloseError::TimedOut {
                timeout_ms: millis_u64(timeout),
                pending,
            }),
        }
    }
}

async fn futures_join_all(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

/// How long a subscription may sit at `in_flight_max` without taking records before it pauses
/// its assignment.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Records a subscription takes from librdkafka in one turn before it looks at settlements,
/// rebalances and timers again.
const RECORDS_PER_TURN_MAX: usize = 256;

/// A partition assignment change, told by the consumer's rebalance callbacks.
#[derive(Debug)]
enum Rebalanced {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// The consumer's context: forwards rebalances to the subscription's task.
struct SubscriptionContext {
    events: mpsc::UnboundedSender<Rebalanced>,
}

fn partitions_of(list: &TopicPartitionList) -> Vec<i32> {
    list.elements()
        .iter()
        .map(rdkafka::topic_partition_list::TopicPartitionListElem::partition)
        .collect()
}

impl ClientContext for SubscriptionContext {}

impl ConsumerContext for SubscriptionContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let _ = self.events.send(Rebalanced::Revoked(partitions_of(list)));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let _ = self.events.send(Rebalanced::Assigned(partitions_of(list)));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => {
                tracing::warn!(%error, "kafka: rebalance failed");
            }
        }
    }
}

/// A delivery's settlement, sent back to the subscription's task.
struct Settled {
    partition: i32,
    offset: i64,
    epoch: u64,
    outcome: Outcome,
}

struct Ack {
    partition: i32,
    offset: i64,
    epoch: u64,
    settlements: mpsc::UnboundedSender<Settled>,
}

impl Acknowledger for Ack {
    fn settled(&self, outcome: Outcome) {
        // The task may be gone (closed): the record then comes again from the committed
        // offset, to whoever owns the partition next.
        let _ = self.settlements.send(Settled {
            partition: self.partition,
            offset: self.offset,
            epoch: self.epoch,
            outcome,
        });
    }
}

struct PartitionState {
    epoch: u64,
    /// Unsettled records by offset (detached copies, for redelivery).
    unsettled: BTreeMap<i64, Message>,
    /// The offset after the last record received.
    next: Option<i64>,
    /// The offset last stored for commit.
    stored: Option<i64>,
}

struct Subscription {
    consumer: Arc<StreamConsumer<SubscriptionContext>>,
    topic: String,
    grouped: bool,
    partitions: HashMap<i32, PartitionState>,
    epoch_last: u64,
    /// Unsettled deliveries over all partitions.
    unsettled: usize,
    /// Since when `unsettled` is at `in_flight_max` (the task stopped taking records).
    full_since: Option<Instant>,
    /// The assignment is paused (the limit held for [`PAUSE_AFTER`]).
    paused: bool,
    /// Delayed redeliveries: (due, partition, offset, epoch).
    timers: BinaryHeap<Reverse<(Instant, i32, i64, u64)>>,
    out: mpsc::UnboundedSender<Result<Message, ReceiveError>>,
    settlements: mpsc::UnboundedSender<Settled>,
    in_flight_max: usize,
    close_timeout: Duration,
}

impl Subscription {
    fn assigned(&mut self, partition: i32) {
        self.epoch_last += 1;
        let state = PartitionState {
            epoch: self.epoch_last,
            unsettled: BTreeMap::new(),
            next: None,
            stored: None,
        };
        if let Some(old) = self.partitions.insert(partition, state) {
            self.unsettled -= old.unsettled.len();
        }
    }

    fn revoked(&mut self, partition: i32) {
        if let Some(old) = self.partitions.remove(&partition) {
            self.unsettled -= old.unsettled.len();
        }
    }

    fn rebalanced(&mut self, event: Rebalanced) {
        tracing::debug!(topic = %self.topic, ?event, "kafka: partitions rebalanced");
        match event {
            Rebalanced::Assigned(partitions) => {
                for partition in partitions {
                    self.assigned(partition);
                }
            }
            Rebalanced::Revoked(partitions) => {
                for partition in partitions {
                    self.revoked(partition);
                }
            }
        }
    }

    /// Hands a delivery of `message` (record `offset` of `partition`) to the stream; false
    /// once the stream is gone.
    fn hand_out(&self, partition: i32, offset: i64, epoch: u64, message: Message) -> bool {
        let delivery = message.delivered(Ack {
            partition,
            offset,
            epoch,
            settlements: self.settlements.clone(),
        });
        self.out.send(Ok(delivery)).is_ok()
    }

    /// A record arrived; false once the stream is gone.
    fn received(&mut self, record: &rdkafka::message::BorrowedMessage<'_>) -> bool {
        let partition = record.partition();
        let offset = record.offset();
        let needs_epoch = match self.partitions.get(&partition) {
            None => true,
            // The log went back (a reset after the broker lost the offsets, a seek): start
            // over, so that settlements of the old records cannot touch the new ones.
            Some(state) => state.next.is_some_and(|next| offset < next),
        };
        if needs_epoch {
            self.assigned(partition);
        }
        let Some(state) = self.partitions.get_mut(&partition) else {
            return true;
        };
        let message = codec::decode(
            Place {
                topic: &self.topic,
                partition,
                offset,
            },
            record.key(),
            record.headers(),
            record.payload(),
        );
        state.next = Some(offset + 1);
        state.unsettled.insert(offset, message.detached());
        self.unsettled += 1;
        let epoch = state.epoch;
        let alive = self.hand_out(partition, offset, epoch, message);
        self.limit_in_flight();
        alive
    }

    /// Whether the task takes records from the consumer: until `in_flight_max` unsettled
    /// deliveries, then again once acks brought them down to half of it (taking records one
    /// ack at a time would wake this task and the consumer for every single record); and
    /// while the assignment is paused (then none come, but polling serves the consumer's
    /// rebalances and keeps it in the group).
    fn takes_records(&self) -> bool {
        self.full_since.is_none() || self.paused
    }

    /// When a stall at the limit has lasted long enough to pause the assignment.
    fn pause_due(&self) -> Option<Instant> {
        match (self.full_since, self.paused) {
            (Some(since), false) => Some(since + PAUSE_AFTER),
            _ => None,
        }
    }

    /// Tracks the limit: at `in_flight_max` unsettled deliveries the task stops taking
    /// records, which then wait in librdkafka's fetch queue (bounded by librdkafka), and goes
    /// on at half of it, resuming the assignment if it was paused.
    fn limit_in_flight(&mut self) {
        if self.unsettled >= self.in_flight_max {
            self.full_since.get_or_insert_with(Instant::now);
        } else if self.unsettled <= self.in_flight_max / 2 {
            self.full_since = None;
            if self.paused {
                self.pause_or_resume(false);
            }
        }
    }

    /// The limit held for [`PAUSE_AFTER`]: pause the assignment, so that the task can poll the
    /// consumer again (a consumer not polled for `max.poll.interval.ms` leaves its group)
    /// without taking records. Pausing is not the first resort because librdkafka drops the
    /// records it fetched for a paused partition and fetches them again on resume.
    fn pause_long_stall(&mut self) {
        self.pause_or_resume(true);
    }

    fn pause_or_resume(&mut self, pause: bool) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        match result {
            Ok(()) => self.paused = pause,
            Err(error) => {
                tracing::warn!(%error, topic = %self.topic, "kafka: pause/resume failed")
            }
        }
    }

    /// Applies a settlement; false once the stream is gone.
    fn settle(&mut self, settled: Settled, closing: bool) -> bool {
        let Some(state) = self.partitions.get_mut(&settled.partition) else {
            return true;
        };
        if state.epoch != settled.epoch {
            return true;
        }
        match settled.outcome {
            Outcome::Acked => {
                if state.unsettled.remove(&settled.offset).is_some() {
                    self.unsettled -= 1;
                }
                self.limit_in_flight();
                true
            }
            Outcome::Nacked { delay }
                if !closing && state.unsettled.contains_key(&settled.offset) =>
            {
                match delay {
                    Some(delay) if !delay.is_zero() => {
                        self.timers.push(Reverse((
                            Instant::now() + delay,
                            settled.partition,
                            settled.offset,
                            settled.epoch,
                        )));
                        true
                    }
                    _ => self.redeliver(settled.partition, settled.offset, settled.epoch),
                }
            }
            _ if !closing && state.unsettled.contains_key(&settled.offset) => {
                self.redeliver(settled.partition, settled.offset, settled.epoch)
            }
            _ => true,
        }
    }

    fn redeliver(&self, partition: i32, offset: i64, epoch: u64) -> bool {
        let Some(state) = self.partitions.get(&partition) else {
            return true;
        };
        if state.epoch != epoch {
            return true;
        }
        match state.unsettled.get(&offset) {
            Some(message) => self.hand_out(partition, offset, epoch, message.clone()),
            None => true,
        }
    }

    /// Stores, for every partition whose low mark moved, the offset librdkafka commits next.
    fn store_offsets(&mut self) {
        if !self.grouped {
            return;
        }
        for (partition, state) in &mut self.partitions {
            let low = match state.unsettled.keys().next() {
                Some(offset) => Some(*offset),
                None => state.next,
            };
            if let Some(low) = low
                && state.stored != Some(low)
            {
                // rd_kafka_offsets_store stores the offset as given (the next to read);
                // rd_kafka_offset_store, behind `store_offset`, would store one more.
                let mut list = TopicPartitionList::with_capacity(1);
                let stored = list
                    .add_partition_offset(&self.topic, *partition, Offset::Offset(low))
                    .and_then(|()| self.consumer.store_offsets(&list));
                match stored {
                    Ok(()) => state.stored = Some(low),
                    Err(error) => tracing::debug!(
                        %error,
                        topic = %self.topic,
                        partition,
                        "kafka: storing an offset failed (the partition moved?)"
                    ),
                }
            }
        }
    }

    async fn run(
        mut self,
        mut rebalances: mpsc::UnboundedReceiver<Rebalanced>,
        mut settled: mpsc::UnboundedReceiver<Settled>,
        closed: CancellationToken,
    ) {
        let consumer = Arc::clone(&self.consumer);
        let mut errors_logged_at: Option<Instant> = None;
        loop {
            let due = self.timers.peek().map(|Reverse((at, ..))| *at);
            let pause_due = self.pause_due();
            let takes_records = self.takes_records();
            tokio::select! {
                biased;
                () = closed.cancelled() => break,
                () = self.out.closed() => break,
                Some(event) = rebalances.recv() => self.rebalanced(event),
                Some(first) = settled.recv() => {
                    let mut alive = self.settle(first, false);
                    while alive && let Ok(next) = settled.try_recv() {
                        alive = self.settle(next, false);
                    }
                    self.store_offsets();
                    if !alive {
                        break;
                    }
                }
                () = sleep_until(due) => {
                    let now = Instant::now();
                    let mut alive = true;
                    while alive && let Some(Reverse((at, partition, offset, epoch))) = self.timers.peek().copied() {
                        if at > now {
                            break;
                        }
                        self.timers.pop();
                        alive = self.redeliver(partition, offset, epoch);
                    }
                    if !alive {
                        break;
                    }
                }
                () = sleep_until(pause_due) => self.pause_long_stall(),
                record = consumer.recv(), if takes_records => {
                    // Take what librdkafka has ready in one go (up to a bound, and while the
                    // limit allows): going back through the select for every record would
                    // hand the task back and forth with the application's acks per record.
                    let mut next = Some(record);
                    let mut taken = 0;
                    let mut alive = true;
                    while let Some(record) = next.take() {
                        match record {
                            Ok(record) => {
                                // Rebalances told during this poll come before its records.
                                while let Ok(event) = rebalances.try_recv() {
                                    self.rebalanced(event);
                                }
                                alive = self.received(&record);
                                taken += 1;
                            }
                            Err(error) => {
                                self.consumer_failed(&error, &mut errors_logged_at);
                                break;
                            }
                        }
                        if alive && taken < RECORDS_PER_TURN_MAX && self.takes_records() {
                            next = consumer.recv().now_or_never();
                        }
                    }
                    if !alive {
                        break;
                    }
                }
            }
        }

        // Closing: what was acked so far is stored and committed; the rest comes again to the
        // partitions' next owners.
        let (out, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.out, out));
        while let Ok(next) = settled.try_recv() {
            let (partition, offset, epoch) = (next.partition, next.offset, next.epoch);
            if let Some(state) = self.partitions.get_mut(&partition)
                && state.epoch == epoch
                && matches!(next.outcome, Outcome::Acked)
                && state.unsettled.remove(&offset).is_some()
            {
                self.unsettled -= 1;
            }
        }
        self.store_offsets();
        let grouped = self.grouped;
        let consumer = self.consumer;
        let topic = self.topic;
        let finish = tokio::task::spawn_blocking(move || {
            if grouped
                && let Err(error) = consumer.commit_consumer_state(CommitMode::Sync)
                && !matches!(
                    error.rdkafka_error_code(),
                    Some(rdkafka::types::RDKafkaErrorCode::NoOffset)
                )
            {
                tracing::warn!(%error, %topic, "kafka: committing at close failed");
            }
            // Dropping the last handle closes the consumer: it leaves the group, and the
            // partitions move to the other members at once.
            drop(consumer);
        });
        if tokio::time::timeout(self.close_timeout, finish)
            .await
            .is_err()
        {
            tracing::warn!("kafka: closing a consumer took longer than close_timeout");
        }
    }
}

impl Subscription {
    /// librdkafka reconnects and retries by itself; its errors on the consumer are reports (a
    /// broker went away, a rebalance was interrupted): logged, at most every 10 s.
    fn consumer_failed(&self, error: &KafkaError, logged_at: &mut Option<Instant>) {
        let quiet = logged_at.is_some_and(|at| at.elapsed() < Duration::from_secs(10));
        if !quiet {
            tracing::warn!(%error, topic = %self.topic, "kafka: consumer error (retrying)");
            *logged_at = Some(Instant::now());
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
