//! Helpers the cases share, public so that adapters can write extra cases in the same style.
//!
//! Every wait here is bounded: by the fixture's [`PubSubFixture::delivery_timeout`] for
//! something that must happen, by [`Env::quiet`] for something that must not.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use futures::{FutureExt, StreamExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use super::{Features, PubSubFixture};
use crate::message::{Message, MessageId, Metadata};
use crate::pubsub::{MessageStream, Publisher, Subscriber};

/// Metadata key of the run (one case's batch) a numbered message belongs to.
pub const RUN_KEY: &str = "fl_conformance_run";
/// Metadata key of a numbered message's position in its run.
pub const SEQ_KEY: &str = "fl_conformance_seq";

/// The base of every quiet period, before [`PubSubFixture::time_scale`].
pub const QUIET_BASE: Duration = Duration::from_millis(200);

/// A name no other case or test run uses: `fl_<label>_<32 hex digits>` (letters, digits and
/// `_` only, so that every broker's topic and group rules accept it).
pub fn unique_name(label: &str) -> String {
    format!("fl_{label}_{}", Uuid::new_v4().simple())
}

/// `count` messages numbered from `from`: a new id each, metadata [`RUN_KEY`] = `run`,
/// [`SEQ_KEY`] = the number and [`Metadata::PARTITION_KEY`] = `run` (one key, so that
/// partitioned brokers keep them in order), payload `<run>/<number>`.
pub fn numbered(run: &str, from: usize, count: usize) -> Vec<Message> {
    (from..from + count)
        .map(|seq| {
            Message::new(format!("{run}/{seq}"))
                .with_metadata(RUN_KEY, run)
                .with_metadata(SEQ_KEY, seq.to_string())
                .with_metadata(Metadata::PARTITION_KEY, run)
        })
        .collect()
}

/// The number of a message made by [`numbered`]; panics when its metadata lost it.
pub fn seq_of(message: &Message) -> usize {
    message
        .metadata
        .get(SEQ_KEY)
        .and_then(|seq| seq.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "message {} arrived without its {SEQ_KEY} metadata (metadata: {:?})",
                message.id, message.metadata
            )
        })
}

/// The numbers of messages made by [`numbered`].
pub fn seqs(messages: &[Message]) -> Vec<usize> {
    messages.iter().map(seq_of).collect()
}

/// The ids of `messages`.
pub fn ids(messages: &[Message]) -> Vec<MessageId> {
    messages.iter().map(|m| m.id.clone()).collect()
}

fn short_list<T: std::fmt::Debug>(items: &[T]) -> String {
    const SHOWN: usize = 8;
    let mut text = format!("{:?}", &items[..items.len().min(SHOWN)]);
    if items.len() > SHOWN {
        let _ = write!(text, " and {} more", items.len() - SHOWN);
    }
    text
}

/// Asserts that `received` holds every message of `expected` exactly once, with the same id,
/// metadata and payload, and nothing else.
pub fn assert_exactly(received: &[Message], expected: &[Message], what: &str) {
    let sent: HashMap<&MessageId, &Message> = expected.iter().map(|m| (&m.id, m)).collect();
    let mut seen: HashMap<&MessageId, usize> = HashMap::new();
    let mut unexpected = Vec::new();
    for message in received {
        match sent.get(&message.id) {
            Some(original) => {
                assert!(
                    message.same_content(original),
                    "{what}: message {} arrived changed:\n  sent     {:?} metadata {:?} payload {:?}\n  received {:?} metadata {:?} payload {:?}",
                    message.id,
                    original.payload.len(),
                    original.metadata,
                    preview(&original.payload),
                    message.payload.len(),
                    message.metadata,
                    preview(&message.payload),
                );
                *seen.entry(&message.id).or_default() += 1;
            }
            None => unexpected.push(message.id.clone()),
        }
    }
    let missing: Vec<&MessageId> = expected
        .iter()
        .map(|m| &m.id)
        .filter(|id| !seen.contains_key(id))
        .collect();
    let duplicated: Vec<(&MessageId, usize)> = seen
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|(id, count)| (*id, *count))
        .collect();
    assert!(
        missing.is_empty() && duplicated.is_empty() && unexpected.is_empty(),
        "{what}: expected {} messages exactly once, received {}: {} missing {}, {} duplicated \
         (id, times) {}, {} unexpected {}",
        expected.len(),
        received.len(),
        missing.len(),
        short_list(&missing),
        duplicated.len(),
        short_list(&duplicated),
        unexpected.len(),
        short_list(&unexpected),
    );
}

/// Asserts that `received` holds the messages of `expected` in the same order (ids compared).
pub fn assert_in_order(received: &[Message], expected: &[Message], what: &str) {
    let got = ids(received);
    let want = ids(expected);
    if got != want {
        let first = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: messages arrived out of publish order; first difference at index {first}: \
             expected {:?}, received {:?} (received {} of {})",
            want.get(first),
            got.get(first),
            got.len(),
            want.len()
        );
    }
}

fn preview(payload: &[u8]) -> String {
    let shown = &payload[..payload.len().min(32)];
    format!("{:?}", String::from_utf8_lossy(shown))
}

/// One case's view of the fixture: its features and its waits.
pub struct Env {
    fixture: Arc<dyn PubSubFixture>,
    features: Features,
    timeout: Duration,
    scale: f64,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("features", &self.features)
            .field("timeout", &self.timeout)
            .field("scale", &self.scale)
            .finish_non_exhaustive()
    }
}

impl Env {
    /// The view of `fixture`.
    pub fn new(fixture: Arc<dyn PubSubFixture>) -> Self {
        let features = fixture.features();
        let timeout = fixture.delivery_timeout();
        let scale = fixture.time_scale();
        let scale = if scale.is_finite() && scale > 0.0 {
            scale
        } else {
            1.0
        };
        Self {
            fixture,
            features,
            timeout,
            scale,
        }
    }

    /// The fixture.
    pub fn fixture(&self) -> &Arc<dyn PubSubFixture> {
        &self.fixture
    }

    /// The declared features.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The longest wait for one expected thing.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `base` times the fixture's time scale.
    pub fn scaled(&self, base: Duration) -> Duration {
        base.mul_f64(self.scale)
    }

    /// How long "nothing more arrives" is watched.
    pub fn quiet(&self) -> Duration {
        self.scaled(QUIET_BASE)
    }

    async fn bounded<T>(&self, what: &str, future: impl Future<Output = T>) -> T {
        match tokio::time::timeout(self.timeout, future).await {
            Ok(value) => value,
            Err(_) => panic!("{what} did not return within {:?}", self.timeout),
        }
    }

    /// A new publisher.
    pub async fn publisher(&self) -> Arc<dyn Publisher> {
        self.bounded("the fixture's publisher()", self.fixture.publisher())
            .await
    }

    /// A new subscriber, in `group` when given.
    pub async fn subscriber(&self, group: Option<&str>) -> Arc<dyn Subscriber> {
        self.bounded("the fixture's subscriber()", self.fixture.subscriber(group))
            .await
    }

    /// Subscribes; panics on an error.
    pub async fn subscribe(&self, subscriber: &dyn Subscriber, topic: &str) -> MessageStream {
        match self
            .bounded(&format!("subscribe({topic})"), subscriber.subscribe(topic))
            .await
        {
            Ok(stream) => stream,
            Err(error) => panic!("subscribe({topic}) failed: {error}"),
        }
    }

    /// A new subscriber in `group` (when given) and its subscription to `topic`.
    pub async fn subscription(
        &self,
        group: Option<&str>,
        topic: &str,
    ) -> (Arc<dyn Subscriber>, MessageStream) {
        let subscriber = self.subscriber(group).await;
        let stream = self.subscribe(&*subscriber, topic).await;
        (subscriber, stream)
    }

    /// Publishes; panics on an error.
    pub async fn publish(&self, publisher: &dyn Publisher, topic: &str, messages: Vec<Message>) {
        let count = messages.len();
        if let Err(error) = self
            .bounded(
                &format!("publishing {count} messages to {topic}"),
                publisher.publish(topic, messages),
            )
            .await
        {
            panic!("publishing {count} messages to {topic} failed: {error}");
        }
    }

    /// Closes a subscriber; panics on an error.
    pub async fn close_subscriber(&self, subscriber: &dyn Subscriber) {
        if let Err(error) = self
            .bounded("closing a subscriber", subscriber.close())
            .await
        {
            panic!("closing a subscriber failed: {error}");
        }
    }

    /// Closes a publisher; panics on an error.
    pub async fn close_publisher(&self, publisher: &dyn Publisher) {
        if let Err(error) = self.bounded("closing a publisher", publisher.close()).await {
            panic!("closing a publisher failed: {error}");
        }
    }

    /// The next message; panics on an error, the end of the stream, or a timeout.
    pub async fn next(&self, stream: &mut MessageStream, what: &str) -> Message {
        match tokio::time::timeout(self.timeout, stream.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(error))) => panic!("{what}: the subscription failed: {error}"),
            Ok(None) => panic!("{what}: the subscription ended unexpectedly"),
            Err(_) => panic!("{what}: no message within {:?}", self.timeout),
        }
    }

    /// The next `count` messages (each within the timeout), unsettled.
    pub async fn receive(
        &self,
        stream: &mut MessageStream,
        count: usize,
        what: &str,
    ) -> Vec<Message> {
        let mut received = Vec::with_capacity(count);
        while received.len() < count {
            let message = self
                .next(
                    stream,
                    &format!("{what} (received {} of {count})", received.len()),
                )
                .await;
            received.push(message);
        }
        received
    }

    /// The next `count` messages, each acked as it arrives.
    pub async fn receive_acking(
        &self,
        stream: &mut MessageStream,
        count: usize,
        what: &str,
    ) -> Vec<Message> {
        let mut received = Vec::with_capacity(count);
        while received.len() < count {
            let message = self
                .next(
                    stream,
                    &format!("{what} (received {} of {count})", received.len()),
                )
                .await;
            ack(&message, what);
            received.push(message);
        }
        received
    }

    /// Asserts that nothing arrives for [`Env::quiet`] (and that the stream does not end).
    pub async fn assert_quiet(&self, stream: &mut MessageStream, what: &str) {
        self.assert_quiet_for(stream, self.quiet(), what).await;
    }

    /// Asserts that nothing arrives for `period` (and that the stream does not end).
    pub async fn assert_quiet_for(&self, stream: &mut MessageStream, period: Duration, what: &str) {
        match tokio::time::timeout(period, stream.next()).await {
            Err(_) => {}
            Ok(Some(Ok(message))) => panic!(
                "{what}: expected nothing more, but message {} arrived (metadata {:?}, delivered \
                 again or never published)",
                message.id, message.metadata
            ),
            Ok(Some(Err(error))) => panic!("{what}: the subscription failed: {error}"),
            Ok(None) => panic!("{what}: the subscription ended unexpectedly"),
        }
    }

    /// Reads until the stream ends (which must happen within the timeout); returns what it
    /// yielded on the way, unsettled.
    pub async fn until_end(&self, stream: &mut MessageStream, what: &str) -> Vec<Message> {
        let deadline = Instant::now() + self.timeout;
        let mut yielded = Vec::new();
        loop {
            // Checked here too: a stream that is always ready never lets the timeout fire.
            if Instant::now() >= deadline || yielded.len() >= RECORDED_MAX {
                panic!(
                    "{what}: the subscription did not end within {:?} ({} messages yielded)",
                    self.timeout,
                    yielded.len()
                );
            }
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(None) => {
                    self.assert_stays_ended(stream, what).await;
                    return yielded;
                }
                Ok(Some(Ok(message))) => yielded.push(message),
                Ok(Some(Err(_))) => {}
                Err(_) => panic!(
                    "{what}: the subscription did not end within {:?}",
                    self.timeout
                ),
            }
        }
    }
}

impl Env {
    /// Polls a stream that returned `None` once more: it must return `None` again (streams are
    /// fused), not panic, yield or hang (as a `select!` loop would find out).
    pub async fn assert_stays_ended(&self, stream: &mut MessageStream, what: &str) {
        let polled = AssertUnwindSafe(tokio::time::timeout(self.quiet(), stream.next()))
            .catch_unwind()
            .await;
        match polled {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(item))) => {
                panic!("{what}: polled again after it ended, the stream yielded {item:?}")
            }
            Ok(Err(_)) => panic!(
                "{what}: polled again after it ended, the stream did not return None within {:?}",
                self.quiet()
            ),
            Err(_) => panic!(
                "{what}: polled again after it ended, the stream panicked; a MessageStream must \
                 be fused (keep returning None)"
            ),
        }
    }
}

/// Acks `message`, panicking when it has no pending delivery.
pub fn ack(message: &Message, what: &str) {
    assert!(
        message.ack(),
        "{what}: message {} could not be acked (no delivery, or already settled: {:?})",
        message.id,
        message.outcome()
    );
}

/// Most messages an [`AckingConsumer`] records; beyond, it stops with an error (no case
/// expects as many, so the adapter is redelivering in a loop).
pub const RECORDED_MAX: usize = 100_000;

/// A task that reads a subscription, acks every message as it arrives and keeps a copy
/// (without delivery). Dropping it (or [`AckingConsumer::stop`]) aborts the task, which drops the
/// stream: the subscription ends.
pub struct AckingConsumer {
    shared: Arc<ConsumerShared>,
    task: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct ConsumerShared {
    received: Mutex<Vec<Message>>,
    errors: Mutex<Vec<String>>,
    ended: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl std::fmt::Debug for AckingConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckingConsumer")
            .field("received", &self.count())
            .field("ended", &self.ended())
            .finish()
    }
}

impl AckingConsumer {
    /// Starts consuming `stream`.
    pub fn spawn(mut stream: MessageStream) -> Self {
        let shared = Arc::new(ConsumerShared::default());
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Some(item) = stream.next().await {
                    // A stream that is always ready (a runaway redelivery loop) would never
                    // yield to the scheduler, and an abort would never land.
                    tokio::task::coop::consume_budget().await;
                    match item {
                        Ok(message) => {
                            // Acked and recorded with no await between: aborting the task never
                            // leaves a received message unrecorded.
                            let acked = message.ack();
                            let mut received = lock(&shared.received);
                            if received.len() >= RECORDED_MAX {
                                lock(&shared.errors).push(format!(
                                    "more than {RECORDED_MAX} messages received: a redelivery \
                                     loop? (stopped consuming)"
                                ));
                                break;
                            }
                            if !acked {
                                lock(&shared.errors).push(format!(
                                    "message {} could not be acked ({:?})",
                                    message.id,
                                    message.outcome()
                                ));
                            }
                            received.push(message.detached());
                        }
                        Err(error) => lock(&shared.errors).push(error.to_string()),
                    }
                }
                shared.ended.store(true, Ordering::Release);
            }
        });
        Self {
            shared,
            task: Some(task),
        }
    }

    /// What it received so far, in arrival order.
    pub fn received(&self) -> Vec<Message> {
        lock(&self.shared.received).clone()
    }

    /// How many messages it received so far.
    pub fn count(&self) -> usize {
        lock(&self.shared.received).len()
    }

    /// Receive errors and failed acks seen so far.
    pub fn errors(&self) -> Vec<String> {
        lock(&self.shared.errors).clone()
    }

    /// Whether the stream ended.
    pub fn ended(&self) -> bool {
        self.shared.ended.load(Ordering::Acquire)
    }

    /// Stops consuming (the subscription ends) and returns what it received.
    pub async fn stop(mut self) -> Vec<Message> {
        if let Some(task) = self.task.take() {
            task.abort();
            // Wait for the abort, so that the stream is dropped before the caller goes on.
            let _ = task.await;
        }
        self.received()
    }
}

impl Drop for AckingConsumer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Waits until `consumers` together received at least `count` messages. Gives up when no new
/// message arrived for `stall` (or every consumer's stream ended); returns whether the count was
/// reached.
pub async fn wait_for_total(consumers: &[&AckingConsumer], count: usize, stall: Duration) -> bool {
    let mut last_total = 0;
    let mut last_progress = Instant::now();
    loop {
        let total: usize = consumers.iter().map(|c| c.count()).sum();
        if total >= count {
            return true;
        }
        if total != last_total {
            last_total = total;
            last_progress = Instant::now();
        } else if last_progress.elapsed() >= stall || consumers.iter().all(|c| c.ended()) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Panics with the consumers' errors, if any.
pub fn assert_no_errors(consumers: &[&AckingConsumer], what: &str) {
    let errors: Vec<String> = consumers.iter().flat_map(|c| c.errors()).collect();
    assert!(errors.is_empty(), "{what}: {}", short_list(&errors));
}

/// The ids that occur in more than one of `sets` (or more than once in one).
pub fn duplicate_ids(sets: &[&[Message]]) -> Vec<MessageId> {
    let mut seen = HashSet::new();
    let mut duplicates = Vec::new();
    for message in sets.iter().flat_map(|set| set.iter()) {
        if !seen.insert(message.id.clone()) {
            duplicates.push(message.id.clone());
        }
    }
    duplicates
}
