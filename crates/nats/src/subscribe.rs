//! Subscriptions: a pull consumer per group (or per subscription without a group), deliveries
//! tracked until the application settles them, acks sent by one task per subscriber.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
};
use async_trait::async_trait;
use factline_messaging::{
    Acknowledger, BoxError, CloseError, Message, MessageId, MessageStream, NoopAcknowledger,
    Outcome, ReceiveError, SubscribeError, Subscriber,
};
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::DeliverFrom;
use crate::names::{decode_headers, stream_name};
use crate::{Shared, boxed};

/// Shortest and longest wait before a subscription opens its consumer again after an error.
const RETRY_DELAY_MIN: Duration = Duration::from_millis(100);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(2);
/// JetStream sends a heartbeat this often while a pull waits; two missed ones end the pull.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);
/// How long one pull request waits for messages before the next is sent. Short, because a
/// request outlives the subscription that sent it by up to this long (see
/// [`handover_delay`]).
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// How long the messages a subscription held when it ended wait before JetStream redelivers
/// them. Servers before 2.10.14 mishandle a redelivery aimed at a pull request whose
/// subscriber is gone (nats-server PR #5305: the message is not delivered and a later one is
/// delivered a second time, with a delivery count of 1), and the ended subscription's last pull
/// request stays on the server until it expires. So on those servers the NAKs wait out
/// [`PULL_EXPIRES`]; newer servers redeliver at once.
pub(crate) fn handover_delay(server_version: &str) -> Option<Duration> {
    let mut parts = server_version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|part| part.parse::<u64>().ok());
    let version = (
        parts.next().flatten(),
        parts.next().flatten(),
        parts.next().flatten(),
    );
    let fixed = match version {
        (Some(major), Some(minor), Some(patch)) => (major, minor, patch) >= (2, 10, 14),
        // Unknown: assume the worst.
        _ => false,
    };
    (!fixed).then_some(PULL_EXPIRES + Duration::from_millis(500))
}

/// How long an ended subscription's pull keeps receiving on servers that need a
/// [`handover_delay`] (see [`Tracker::end`]).
const HANDOVER_DRAIN: Duration = Duration::from_millis(250);

enum AckJob {
    Settle { reply: Subject, kind: AckKind },
    Flush(oneshot::Sender<()>),
}

/// Sends acks in the order they were made. Ends when every sender is gone.
async fn ack_loop(client: async_nats::Client, mut jobs: mpsc::UnboundedReceiver<AckJob>) {
    while let Some(job) = jobs.recv().await {
        match job {
            AckJob::Settle { reply, kind } => {
                if let Err(error) = client.publish(reply, kind.into()).await {
                    // JetStream delivers the message again after ack_wait: at least once holds.
                    tracing::warn!(%error, "sending a JetStream acknowledgement failed");
                }
            }
            AckJob::Flush(done) => {
                if let Err(error) = client.flush().await {
                    tracing::warn!(%error, "flushing JetStream acknowledgements failed");
                }
                let _ = done.send(());
            }
        }
    }
}

/// The state one subscription shares with its subscriber: its unsettled deliveries and its
/// pull. The channel to the ack task is unbounded in type but not in use: it holds at most one
/// job per delivery, and a consumer has at most [`crate::NatsConfig::in_flight_max`]
/// deliveries unsettled.
///
/// Ending a subscription first drops its pull (which unsubscribes its inbox, so that JetStream
/// stops handing it messages) and only then NAKs what it held: NAKed the other way round, a
/// message could be redelivered into the pull that is about to go away and sit there until
/// `ack_wait` runs out.
struct Tracker {
    state: Mutex<TrackerState>,
    acks: mpsc::UnboundedSender<AckJob>,
    /// The delay of the NAKs sent when the subscription ends ([`handover_delay`]).
    handover_delay: Option<Duration>,
}

#[derive(Default)]
struct TrackerState {
    ended: bool,
    next_key: u64,
    pending: HashMap<u64, Subject>,
    /// The pull while nobody polls it.
    pull: Option<pull::Stream>,
    /// The subscription's task has the pull (or is opening one): it ends the subscription
    /// itself when it sees the cancellation.
    polling: bool,
}

impl Tracker {
    fn send(&self, reply: Subject, kind: AckKind) {
        // The ack task ends only with the subscriber: then JetStream redelivers after ack_wait.
        let _ = self.acks.send(AckJob::Settle { reply, kind });
    }

    /// A key for a new delivery, `None` once the subscription ended.
    fn register(&self, reply: Subject) -> Option<u64> {
        let mut state = self.state.lock().ok()?;
        if state.ended {
            return None;
        }
        let key = state.next_key;
        state.next_key += 1;
        state.pending.insert(key, reply);
        Some(key)
    }

    fn settle(&self, key: u64, outcome: Outcome) {
        let reply = match self.state.lock() {
            Ok(mut state) => state.pending.remove(&key),
            Err(_) => None,
        };
        // Settled after the subscription ended: it was NAKed then, and may be with another
        // member by now; an ack from here must not count for that delivery.
        let Some(reply) = reply else {
            return;
        };
        let kind = match outcome {
            Outcome::Acked => AckKind::Ack,
            Outcome::Nacked { delay } => AckKind::Nak(delay),
            _ => AckKind::Nak(None),
        };
        self.send(reply, kind);
    }

    /// Takes the pull to poll it (`None`: there is none, open one).
    fn take_pull(&self) -> Option<pull::Stream> {
        let mut state = self.state.lock().ok()?;
        state.polling = true;
        state.pull.take()
    }

    /// Hands the pull back after a poll (`None`: it failed or ended).
    fn put_pull(&self, pull: Option<pull::Stream>) {
        if let Ok(mut state) = self.state.lock() {
            state.polling = false;
            // Once ended (only the polling task itself ends it while polling), nobody polls
            // this pull again: it is dropped.
            if !state.ended {
                state.pull = pull;
            }
        }
    }

    /// Ends the subscription's deliveries (once): what the subscription held and what it had
    /// pulled but not yet yielded go back to the group. On servers that need a
    /// [`handover_delay`], the pull is kept a little longer ([`HANDOVER_DRAIN`], in the
    /// returned task) to catch messages already on their way to it (redeliveries of NAKs sent
    /// just before the end), which go back too; elsewhere it is dropped at once.
    fn end(&self) -> Option<tokio::task::JoinHandle<()>> {
        let (pull, pending) = match self.state.lock() {
            Ok(mut state) if !state.ended => {
                state.ended = true;
                (state.pull.take(), std::mem::take(&mut state.pending))
            }
            _ => return None,
        };
        let delay = self.handover_delay;
        let mut pending: Vec<(u64, Subject)> = pending.into_iter().collect();
        pending.sort_by_key(|(key, _)| *key);
        for (_, reply) in pending {
            self.send(reply, AckKind::Nak(delay));
        }
        let mut pull = pull?;
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        if delay.is_none() {
            while let Some(Some(Ok(message))) = pull.next().now_or_never() {
                if let Some(reply) = message.reply.clone() {
                    self.send(reply, AckKind::Nak(None));
                }
            }
            return None;
        }
        let acks = self.acks.clone();
        Some(runtime.spawn(async move {
            let deadline = tokio::time::Instant::now() + HANDOVER_DRAIN;
            loop {
                let next = tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    next = pull.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        if let Some(reply) = message.reply.clone() {
                            let _ = acks.send(AckJob::Settle {
                                reply,
                                kind: AckKind::Nak(delay),
                            });
                        }
                    }
                    _ => break,
                }
            }
        }))
    }

    /// [`Tracker::end`], unless the subscription's task is polling: then it ends it itself,
    /// woken by the cancellation.
    fn end_unless_polling(&self) -> Option<tokio::task::JoinHandle<()>> {
        let polling = self
            .state
            .lock()
            .map(|state| state.polling)
            .unwrap_or(false);
        if polling { None } else { self.end() }
    }
}

struct NatsAcker {
    tracker: Arc<Tracker>,
    key: u64,
}

impl Acknowledger for NatsAcker {
    fn settled(&self, outcome: Outcome) {
        self.tracker.settle(self.key, outcome);
    }
}

/// Subscribes to JetStream; see [`crate::NatsPubSub::subscriber`] and
/// [`crate::NatsPubSub::subscriber_in_group`].
pub struct NatsSubscriber {
    pub(crate) shared: Arc<Shared>,
    /// The group's consumer name; `None`: a consumer per subscription.
    group_consumer: Option<String>,
    closed: CancellationToken,
    trackers: Mutex<Vec<Weak<Tracker>>>,
    acks: mpsc::UnboundedSender<AckJob>,
    /// Taken by the first subscribe, which starts the ack task.
    ack_jobs: Mutex<Option<mpsc::UnboundedReceiver<AckJob>>>,
}

impl std::fmt::Debug for NatsSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSubscriber")
            .field("group_consumer", &self.group_consumer)
            .finish_non_exhaustive()
    }
}

impl NatsSubscriber {
    pub(crate) fn new(shared: Arc<Shared>, group_consumer: Option<String>) -> Self {
        let (acks, ack_jobs) = mpsc::unbounded_channel();
        Self {
            shared,
            group_consumer,
            closed: CancellationToken::new(),
            trackers: Mutex::new(Vec::new()),
            acks,
            ack_jobs: Mutex::new(Some(ack_jobs)),
        }
    }

    fn start_ack_task(&self) {
        let jobs = self.ack_jobs.lock().ok().and_then(|mut jobs| jobs.take());
        if let Some(jobs) = jobs {
            tokio::spawn(ack_loop(self.shared.client.clone(), jobs));
        }
    }

    fn consumer_config(&self, name: &str, private: bool) -> pull::Config {
        let config = &self.shared.config;
        pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_ack_pending: i64::try_from(config.in_flight_max).unwrap_or(i64::MAX),
            deliver_policy: match config.deliver_from {
                DeliverFrom::Oldest => DeliverPolicy::All,
                DeliverFrom::New => DeliverPolicy::New,
            },
            inactive_threshold: if private {
                config.private_consumer_idle_max
            } else {
                Duration::ZERO
            },
            ..Default::default()
        }
    }
}

#[async_trait]
impl Subscriber for NatsSubscriber {
    async fn subscribe(&self, topic: &str) -> Result<MessageStream, SubscribeError> {
        if self.closed.is_cancelled() {
            return Err(SubscribeError::Closed);
        }
        let stream = stream_name(&self.shared.config.stream_prefix, topic)?;
        let (consumer_name, private) = match &self.group_consumer {
            Some(name) => (name.clone(), false),
            None => (format!("s_{}", uuid::Uuid::now_v7().simple()), true),
        };
        self.start_ack_task();
        let tracker = Arc::new(Tracker {
            state: Mutex::new(TrackerState::default()),
            acks: self.acks.clone(),
            handover_delay: handover_delay(&self.shared.client.server_info().version),
        });
        if let Ok(mut trackers) = self.trackers.lock() {
            trackers.retain(|tracker| tracker.strong_count() > 0);
            trackers.push(Arc::downgrade(&tracker));
        }
        let mut subscription = Subscription {
            shared: Arc::clone(&self.shared),
            topic: topic.to_owned(),
            stream,
            consumer_config: self.consumer_config(&consumer_name, private),
            consumer_name,
            private,
            consumer: None,
            tracker,
            closed: self.closed.child_token(),
            retry_delay: RETRY_DELAY_MIN,
            failed: false,
            finished: false,
        };
        // Established before returning: the consumer exists (so nothing published from now on
        // is missed) and the first pull is on its way.
        let messages = subscription.open().await.map_err(|error| match error {
            OpenError::Stream(error) => SubscribeError::from(error),
            OpenError::Transport(source) => SubscribeError::Transport(source),
        })?;
        subscription.tracker.put_pull(Some(messages));
        if self.closed.is_cancelled() {
            return Err(SubscribeError::Closed);
        }
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
        let trackers: Vec<Arc<Tracker>> = self
            .trackers
            .lock()
            .map(|trackers| trackers.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default();
        let drains: Vec<_> = trackers
            .iter()
            .filter_map(|tracker| tracker.end_unless_polling())
            .collect();
        let timeout = self.shared.config.close_timeout;
        for drain in drains {
            let _ = tokio::time::timeout(timeout, drain).await;
        }
        let started = self
            .ack_jobs
            .lock()
            .map(|jobs| jobs.is_none())
            .unwrap_or(true);
        if !started {
            return Ok(());
        }
        let (done, flushed) = oneshot::channel();
        if self.acks.send(AckJob::Flush(done)).is_err() {
            return Ok(());
        }
        match tokio::time::timeout(timeout, flushed).await {
            Ok(_) => Ok(()),
            Err(_) => Err(CloseError::TimedOut {
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                pending: 0,
            }),
        }
    }
}

enum OpenError {
    Stream(crate::StreamError),
    Transport(BoxError),
}

impl From<OpenError> for BoxError {
    fn from(error: OpenError) -> Self {
        match error {
            OpenError::Stream(crate::StreamError::InvalidTopic(invalid)) => boxed(invalid),
            OpenError::Stream(crate::StreamError::Transport(source))
            | OpenError::Transport(source) => source,
        }
    }
}

struct Subscription {
    shared: Arc<Shared>,
    topic: String,
    stream: String,
    consumer_name: String,
    consumer_config: pull::Config,
    /// The consumer is this subscription's own (deleted when it ends).
    private: bool,
    consumer: Option<PullConsumer>,
    tracker: Arc<Tracker>,
    closed: CancellationToken,
    retry_delay: Duration,
    /// The last open or pull failed: wait `retry_delay` before the next open.
    failed: bool,
    finished: bool,
}

impl Subscription {
    async fn open(&mut self) -> Result<pull::Stream, OpenError> {
        let consumer = match &self.consumer {
            Some(consumer) => consumer.clone(),
            None => {
                let stream = self
                    .shared
                    .stream(&self.topic)
                    .await
                    .map_err(OpenError::Stream)?;
                let consumer: PullConsumer = stream
                    .get_or_create_consumer(&self.consumer_name, self.consumer_config.clone())
                    .await
                    .map_err(|error| OpenError::Transport(boxed(error)))?;
                self.consumer = Some(consumer.clone());
                consumer
            }
        };
        consumer
            .stream()
            .max_messages_per_batch(self.shared.config.fetch_batch)
            .heartbeat(PULL_HEARTBEAT)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|error| OpenError::Transport(boxed(error)))
    }

    async fn next_item(&mut self) -> Option<Result<Message, ReceiveError>> {
        let closed = self.closed.clone();
        loop {
            if closed.is_cancelled() {
                self.finish();
                return None;
            }
            let Some(mut messages) = self.tracker.take_pull() else {
                if self.failed {
                    tokio::select! {
                        biased;
                        () = closed.cancelled() => {
                            self.tracker.put_pull(None);
                            continue;
                        }
                        () = tokio::time::sleep(self.retry_delay) => {}
                    }
                }
                let opened = tokio::select! {
                    biased;
                    () = closed.cancelled() => {
                        self.tracker.put_pull(None);
                        continue;
                    }
                    opened = self.open() => opened,
                };
                match opened {
                    Ok(messages) => {
                        self.tracker.put_pull(Some(messages));
                        self.failed = false;
                        self.retry_delay = RETRY_DELAY_MIN;
                    }
                    Err(error) => {
                        self.tracker.put_pull(None);
                        // Next time through the consumer is looked up (or made) again: after a
                        // restart of a server with memory storage it is gone.
                        self.consumer = None;
                        self.fail();
                        return Some(Err(ReceiveError::Transport(error.into())));
                    }
                }
                continue;
            };
            let next = tokio::select! {
                biased;
                () = closed.cancelled() => {
                    self.tracker.put_pull(Some(messages));
                    continue;
                }
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    self.tracker.put_pull(Some(messages));
                    if let Some(item) = self.deliver(message) {
                        return Some(item);
                    }
                }
                Some(Err(error)) => {
                    drop(messages);
                    self.tracker.put_pull(None);
                    if error.kind() == pull::MessagesErrorKind::ConsumerDeleted {
                        self.consumer = None;
                    }
                    self.fail();
                    return Some(Err(ReceiveError::Transport(boxed(error))));
                }
                None => {
                    drop(messages);
                    self.tracker.put_pull(None);
                }
            }
        }
    }

    fn fail(&mut self) {
        if self.failed {
            self.retry_delay = (self.retry_delay * 2).min(RETRY_DELAY_MAX);
        }
        self.failed = true;
    }

    /// The message as the application sees it; `None` when it is not to be delivered (the
    /// subscription ended meanwhile: it went back to the group).
    fn deliver(&self, message: jetstream::Message) -> Option<Result<Message, ReceiveError>> {
        let fallback_id = || {
            let sequence = message.info().map_or(0, |info| info.stream_sequence);
            MessageId::parse(&format!("nats-{}-{sequence}", self.stream))
                .unwrap_or_else(|_| MessageId::new_v7())
        };
        let (id, metadata) = match decode_headers(message.headers.as_ref(), fallback_id) {
            Ok(decoded) => decoded,
            Err(error) => {
                // Not ours to read (another client's headers): stop its redelivery rather than
                // loop on it, and say so.
                let sequence = message.info().map_or(0, |info| info.stream_sequence);
                tracing::warn!(stream = %self.stream, sequence, %error, "undecodable JetStream message terminated");
                if let Some(reply) = message.reply.clone() {
                    self.tracker.send(reply, AckKind::Term);
                }
                return Some(Err(ReceiveError::Transport(boxed(error))));
            }
        };
        let mut received = Message::with_id(id, message.payload.clone());
        received.metadata = metadata;
        let Some(reply) = message.reply.clone() else {
            return Some(Ok(received.delivered(NoopAcknowledger)));
        };
        match self.tracker.register(reply.clone()) {
            Some(key) => Some(Ok(received.delivered(NatsAcker {
                tracker: Arc::clone(&self.tracker),
                key,
            }))),
            None => {
                self.tracker
                    .send(reply, AckKind::Nak(self.tracker.handover_delay));
                None
            }
        }
    }

    /// Ends the subscription: unsettled deliveries and messages pulled but not yet yielded go
    /// back to the group at once; a private consumer is deleted.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        // A drain task, where there is one, finishes by itself.
        drop(self.tracker.end());
        if self.private && tokio::runtime::Handle::try_current().is_ok() {
            let jetstream = self.shared.jetstream.clone();
            let (consumer, stream) = (self.consumer_name.clone(), self.stream.clone());
            tokio::spawn(async move {
                if let Err(error) = jetstream
                    .delete_consumer_from_stream(&consumer, &stream)
                    .await
                {
                    tracing::debug!(%error, consumer, stream, "deleting a private consumer failed (JetStream removes it when idle)");
                }
            });
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handover_waits_only_on_servers_with_the_redelivery_bug() {
        assert!(handover_delay("2.9.10").is_some());
        assert!(handover_delay("v2.10.13").is_some());
        assert!(handover_delay("2.10.14").is_none());
        assert!(handover_delay("2.11.0-beta.1").is_none());
        assert!(handover_delay("garbage").is_some());
        assert!(handover_delay("2.9.10").unwrap() > PULL_EXPIRES);
    }
}
