//! Subscribing: a channel and a consumer per subscription, acknowledgements through one task
//! per subscriber, consuming again after the connection broke.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::{
    Acknowledger, BoxError, CloseError, Message, MessageStream, Outcome, ReceiveError,
    SubscribeError, Subscriber, check_topic,
};
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Acker, Channel, Consumer};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{Shared, boxed, codec, exchange_name, group_queue_name, millis, short};

/// Most jobs the acknowledgement task takes at once.
const ACK_BATCH_MAX: usize = 512;
/// First pause before consuming again after a failure.
const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(100);

enum AckJob {
    Settle {
        acker: Acker,
        outcome: Outcome,
    },
    /// Close a subscription's channel (its unacknowledged deliveries go back to the queue),
    /// after every settlement queued before.
    CloseChannel(Channel),
    /// Answer once every job queued before is done.
    Flush(oneshot::Sender<()>),
}

/// Sends the acknowledgements of one subscriber's deliveries, in batches, and closes channels
/// after the settlements queued before.
async fn ack_loop(mut jobs: mpsc::UnboundedReceiver<AckJob>) {
    let mut batch = Vec::with_capacity(ACK_BATCH_MAX);
    while jobs.recv_many(&mut batch, ACK_BATCH_MAX).await > 0 {
        let mut settles = Vec::new();
        for job in batch.drain(..) {
            match job {
                AckJob::Settle { acker, outcome } => settles.push(settle(acker, outcome)),
                AckJob::CloseChannel(channel) => {
                    futures::future::join_all(settles.drain(..)).await;
                    if let Err(error) = channel.close(200, "subscription ended".into()).await {
                        tracing::debug!(%error, "closing a subscription's channel failed");
                    }
                }
                AckJob::Flush(done) => {
                    futures::future::join_all(settles.drain(..)).await;
                    let _ = done.send(());
                }
            }
        }
        futures::future::join_all(settles).await;
    }
}

async fn settle(acker: Acker, outcome: Outcome) {
    let result = match outcome {
        Outcome::Acked => acker.ack(BasicAckOptions::default()).await,
        Outcome::Nacked { delay: Some(delay) } if !delay.is_zero() => {
            // RabbitMQ has no delayed requeue: the delivery stays unacknowledged here (it
            // counts against the prefetch) until the delay has passed.
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Err(error) = acker.nack(requeue()).await {
                    tracing::debug!(%error, "a delayed nack failed (its channel is gone; the broker requeued it)");
                }
            });
            return;
        }
        _ => acker.nack(requeue()).await,
    };
    if let Err(error) = result {
        // The channel is gone: the broker requeued the delivery itself.
        tracing::debug!(%error, "settling a delivery failed");
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        multiple: false,
        requeue: true,
    }
}

/// Reports a delivery's settlement to the subscriber's acknowledgement task.
struct RabbitAcker {
    acker: Acker,
    jobs: mpsc::UnboundedSender<AckJob>,
}

impl Acknowledger for RabbitAcker {
    fn settled(&self, outcome: Outcome) {
        let job = AckJob::Settle {
            acker: self.acker.clone(),
            outcome,
        };
        if self.jobs.send(job).is_err() {
            tracing::debug!(
                "a settlement came after its subscriber's end; the broker requeues the delivery"
            );
        }
    }
}

/// The channel of one subscription, shared with its subscriber so that `close` can close the
/// channels of subscriptions nobody polls.
type ChannelSlot = Arc<Mutex<Option<Channel>>>;

/// Subscribes to topics on RabbitMQ; see [`RabbitPubSub::subscriber`](crate::RabbitPubSub::subscriber)
/// and [`RabbitPubSub::subscriber_in_group`](crate::RabbitPubSub::subscriber_in_group).
pub struct RabbitSubscriber {
    shared: Arc<Shared>,
    group: Option<String>,
    closed: CancellationToken,
    jobs: mpsc::UnboundedSender<AckJob>,
    ack_task: Mutex<Option<mpsc::UnboundedReceiver<AckJob>>>,
    channels: Mutex<Vec<Weak<Mutex<Option<Channel>>>>>,
}

impl std::fmt::Debug for RabbitSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitSubscriber")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl RabbitSubscriber {
    pub(crate) fn new(shared: Arc<Shared>, group: Option<String>) -> Self {
        let (jobs, receiver) = mpsc::unbounded_channel();
        Self {
            shared,
            group,
            closed: CancellationToken::new(),
            jobs,
            ack_task: Mutex::new(Some(receiver)),
            channels: Mutex::new(Vec::new()),
        }
    }

    /// The consumer group, when the subscriber has one.
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }
}

#[async_trait]
impl Subscriber for RabbitSubscriber {
    async fn subscribe(&self, topic: &str) -> Result<MessageStream, SubscribeError> {
        if self.closed.is_cancelled() {
            return Err(SubscribeError::Closed);
        }
        check_topic(topic)?;
        let receiver = self.ack_task.lock().ok().and_then(|mut task| task.take());
        if let Some(receiver) = receiver {
            tokio::spawn(ack_loop(receiver));
        }
        let prefix = &self.shared.config.name_prefix;
        let slot: ChannelSlot = Arc::new(Mutex::new(None));
        let mut subscription = Subscription {
            shared: Arc::clone(&self.shared),
            topic: topic.to_owned(),
            exchange: exchange_name(prefix, topic),
            queue: self
                .group
                .as_ref()
                .map(|group| group_queue_name(prefix, topic, group)),
            consumer: None,
            slot: Arc::clone(&slot),
            jobs: self.jobs.clone(),
            closed: self.closed.child_token(),
            reported: false,
            pause: RECONNECT_DELAY_MIN,
            finished: false,
        };
        subscription
            .consume()
            .await
            .map_err(SubscribeError::Transport)?;
        if let Ok(mut channels) = self.channels.lock() {
            channels.retain(|slot| slot.strong_count() > 0);
            channels.push(Arc::downgrade(&slot));
        }
        tracing::debug!(topic, group = ?self.group, "subscribed");
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
        let started = self
            .ack_task
            .lock()
            .map(|task| task.is_none())
            .unwrap_or(true);
        if !started {
            return Ok(());
        }
        // Every subscription's channel closes after the settlements queued before (those of
        // subscriptions being polled are taken by them when they see the cancellation, or
        // here, whichever comes first).
        let slots: Vec<ChannelSlot> = self
            .channels
            .lock()
            .map(|channels| channels.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default();
        for slot in slots {
            close_slot(&slot, &self.jobs);
        }
        let (done, flushed) = oneshot::channel();
        let timeout = self.shared.config.close_timeout;
        if self.jobs.send(AckJob::Flush(done)).is_ok()
            && tokio::time::timeout(timeout, flushed).await.is_err()
        {
            return Err(CloseError::TimedOut {
                timeout_ms: millis(timeout),
                pending: 0,
            });
        }
        Ok(())
    }
}

/// Queues the close of the channel in `slot`, if it still holds one. The job is sent while the
/// slot is locked, so that whoever finds the slot empty knows the close is already queued.
fn close_slot(slot: &ChannelSlot, jobs: &mpsc::UnboundedSender<AckJob>) {
    if let Ok(mut slot) = slot.lock()
        && let Some(channel) = slot.take()
    {
        let _ = jobs.send(AckJob::CloseChannel(channel));
    }
}

struct Subscription {
    shared: Arc<Shared>,
    topic: String,
    exchange: String,
    /// The group's durable queue; `None`: an exclusive queue of its own.
    queue: Option<String>,
    consumer: Option<Consumer>,
    slot: ChannelSlot,
    jobs: mpsc::UnboundedSender<AckJob>,
    closed: CancellationToken,
    /// Whether the current outage was reported (one error per outage).
    reported: bool,
    pause: Duration,
    finished: bool,
}

impl Subscription {
    /// Declares the exchange and the queue, binds them, and starts consuming on a new channel.
    async fn consume(&mut self) -> Result<(), BoxError> {
        let channel = self.shared.consuming.channel().await?;
        let result = self.consume_on(&channel).await;
        match result {
            Ok(consumer) => {
                let old = self
                    .slot
                    .lock()
                    .ok()
                    .and_then(|mut slot| slot.replace(channel));
                if let Some(old) = old {
                    let _ = self.jobs.send(AckJob::CloseChannel(old));
                }
                self.consumer = Some(consumer);
                Ok(())
            }
            Err(error) => {
                let _ = channel.close(200, "subscribe failed".into()).await;
                Err(error)
            }
        }
    }

    async fn consume_on(&self, channel: &Channel) -> Result<Consumer, BoxError> {
        self.shared
            .declare_exchange(channel, &self.exchange)
            .await?;
        let queue = match &self.queue {
            Some(name) => {
                let mut arguments = FieldTable::default();
                if let Some(expires) = self.shared.config.group_queue_expires {
                    arguments.insert(
                        ShortString::from("x-expires"),
                        AMQPValue::LongLongInt(i64::try_from(millis(expires)).unwrap_or(i64::MAX)),
                    );
                }
                channel
                    .queue_declare(
                        short(name)?,
                        QueueDeclareOptions {
                            durable: true,
                            ..QueueDeclareOptions::default()
                        },
                        arguments,
                    )
                    .await
                    .map_err(boxed)?
            }
            None => channel
                .queue_declare(
                    ShortString::default(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(boxed)?,
        };
        let queue = queue.name().clone();
        channel
            .queue_bind(
                queue.clone(),
                short(&self.exchange)?,
                ShortString::default(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(boxed)?;
        let prefetch = u16::try_from(self.shared.config.in_flight_max).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(boxed)?;
        channel
            .basic_consume(
                queue,
                ShortString::default(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(boxed)
    }

    async fn next_item(&mut self) -> Option<Result<Message, ReceiveError>> {
        let closed = self.closed.clone();
        loop {
            if closed.is_cancelled() {
                self.finish();
                return None;
            }
            let Some(consumer) = self.consumer.as_mut() else {
                let attempt = tokio::select! {
                    biased;
                    () = closed.cancelled() => continue,
                    attempt = self.consume() => attempt,
                };
                match attempt {
                    Ok(()) => {
                        tracing::info!(topic = %self.topic, "consuming again");
                        self.pause = RECONNECT_DELAY_MIN;
                        continue;
                    }
                    Err(error) => {
                        let pause = self.pause;
                        self.pause = (self.pause * 2).min(self.shared.config.reconnect_delay_max);
                        tokio::select! {
                            biased;
                            () = closed.cancelled() => {}
                            () = tokio::time::sleep(pause) => {}
                        }
                        if !self.reported {
                            self.reported = true;
                            return Some(Err(ReceiveError::Transport(error)));
                        }
                        tracing::debug!(topic = %self.topic, %error, "consuming again failed");
                        continue;
                    }
                }
            };
            let next = tokio::select! {
                biased;
                () = closed.cancelled() => continue,
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    self.reported = false;
                    let message = codec::decode(
                        delivery.exchange.as_str(),
                        delivery.routing_key.as_str(),
                        &delivery.properties,
                        delivery.data,
                    );
                    return Some(Ok(message.delivered(RabbitAcker {
                        acker: delivery.acker,
                        jobs: self.jobs.clone(),
                    })));
                }
                Some(Err(error)) => {
                    tracing::warn!(topic = %self.topic, %error, "the subscription's consumer failed; consuming again");
                    self.consumer = None;
                    if !self.reported {
                        self.reported = true;
                        return Some(Err(ReceiveError::Transport(boxed(error))));
                    }
                }
                None => {
                    // Cancelled by the broker (the queue was deleted) or the channel closed.
                    tracing::warn!(topic = %self.topic, "the broker ended the subscription's consumer; consuming again");
                    self.consumer = None;
                }
            }
        }
    }

    /// Ends the subscription: its channel closes after the settlements queued before, and what
    /// it held unacknowledged goes back to the queue.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.consumer = None;
        close_slot(&self.slot, &self.jobs);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.finish();
    }
}
