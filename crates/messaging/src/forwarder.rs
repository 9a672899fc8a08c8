//! [`Forwarder`]: moves the messages of an outbox topic to the topics they name, at least once
//! and in order.
//!
//! The outbox pattern in two halves: the application *stages* messages in its own database
//! transaction (with the adapter's outbox API, e.g. `factline_sql::postgres::PgOutbox`), which
//! writes them to an outbox topic with their destination in the metadata key
//! [`DESTINATION_KEY`]; the forwarder subscribes to that topic (a durable consumer group, so
//! that a restart resumes where it stopped) and publishes each message to its destination
//! with the message's own id, metadata (the destination key removed) and payload.
//!
//! Guarantees:
//! - **At least once**: a message is acked on the outbox only after its destination's
//!   publisher returned success; a crash between the two publishes it again, with the same id,
//!   so consumers deduplicate (e.g. with the dedup middleware).
//! - **In order**: messages are published in the order the outbox subscription delivers them,
//!   one batch after the other; a failed publish is retried (with backoff) before anything
//!   after it is published, never skipped. So messages of one key, and in fact all messages,
//!   keep their staging order — as long as **one forwarder** consumes the outbox group at a
//!   time (two would share the messages between them; run one, or guard it with a lock such
//!   as the SQL adapter's `PgOutbox::run_forwarder`).
//! - A message without a destination (or with one the publisher refuses as a topic) cannot
//!   be forwarded: it goes to [`ForwarderConfig::invalid_topic`] when one is set, else it is
//!   acked and logged as an error, counted in [`ForwarderStats::invalid`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use tokio_util::sync::CancellationToken;

use crate::message::Message;
use crate::pubsub::{PublishError, Publisher, SubscribeError, Subscriber, check_topic};

/// The metadata key naming a staged message's destination topic.
pub const DESTINATION_KEY: &str = "factline_outbox_destination";

/// Settings of a [`Forwarder`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ForwarderConfig {
    /// The outbox topic to read.
    pub outbox_topic: String,
    /// Messages taken from the outbox before publishing (those already delivered; the
    /// forwarder never waits to fill a batch). Default 256.
    pub batch_messages_max: usize,
    /// First wait after a failed publish; it doubles up to
    /// [`ForwarderConfig::retry_backoff_max`]. Default 100 ms.
    pub retry_backoff_min: Duration,
    /// Longest wait between tries of a failed publish. Default 10 s.
    pub retry_backoff_max: Duration,
    /// Where messages that cannot be forwarded go (with the reason in the metadata key
    /// `factline_outbox_invalid`). Default none: they are acked and logged.
    pub invalid_topic: Option<String>,
}

impl ForwarderConfig {
    /// The defaults, for the outbox topic `outbox_topic`.
    pub fn new(outbox_topic: impl Into<String>) -> Self {
        Self {
            outbox_topic: outbox_topic.into(),
            batch_messages_max: 256,
            retry_backoff_min: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(10),
            invalid_topic: None,
        }
    }

    /// Builder: see [`ForwarderConfig::batch_messages_max`] (at least 1).
    #[must_use]
    pub fn batch_messages_max(mut self, messages: usize) -> Self {
        self.batch_messages_max = messages.max(1);
        self
    }

    /// Builder: see [`ForwarderConfig::retry_backoff_min`] and `retry_backoff_max`.
    #[must_use]
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_backoff_min = min;
        self.retry_backoff_max = max.max(min);
        self
    }

    /// Builder: see [`ForwarderConfig::invalid_topic`].
    #[must_use]
    pub fn invalid_topic(mut self, topic: impl Into<String>) -> Self {
        self.invalid_topic = Some(topic.into());
        self
    }
}

/// Counters of a [`Forwarder`].
#[derive(Debug, Default)]
pub struct ForwarderStats {
    forwarded: AtomicU64,
    invalid: AtomicU64,
    publish_failures: AtomicU64,
}

impl ForwarderStats {
    /// Messages published to their destination (and acked on the outbox).
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Messages that could not be forwarded (no or a bad destination).
    pub fn invalid(&self) -> u64 {
        self.invalid.load(Ordering::Relaxed)
    }

    /// Publishes that failed and were tried again.
    pub fn publish_failures(&self) -> u64 {
        self.publish_failures.load(Ordering::Relaxed)
    }
}

/// Why [`Forwarder::run`] stopped other than by its shutdown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// Subscribing to the outbox topic failed.
    #[error("subscribing to the outbox topic {topic:?} failed: {source}")]
    Subscribe {
        /// The outbox topic.
        topic: String,
        /// The subscriber's error.
        #[source]
        source: SubscribeError,
    },
    /// The outbox subscription ended (its subscriber was closed).
    #[error("the subscription to the outbox topic {topic:?} ended")]
    SubscriptionEnded {
        /// The outbox topic.
        topic: String,
    },
}

/// Forwards an outbox topic's messages to their destinations; see the module documentation.
pub struct Forwarder {
    config: ForwarderConfig,
    subscriber: Arc<dyn Subscriber>,
    publisher: Arc<dyn Publisher>,
    stats: Arc<ForwarderStats>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One run of messages for one destination, in outbox order.
struct Run {
    destination: Result<String, String>,
    messages: Vec<Message>,
    originals: Vec<Message>,
}

impl Forwarder {
    /// A forwarder reading `config.outbox_topic` from `subscriber` (give it a durable group)
    /// and publishing with `publisher`.
    pub fn new(
        config: ForwarderConfig,
        subscriber: Arc<dyn Subscriber>,
        publisher: Arc<dyn Publisher>,
    ) -> Self {
        Self {
            config,
            subscriber,
            publisher,
            stats: Arc::new(ForwarderStats::default()),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<ForwarderStats> {
        Arc::clone(&self.stats)
    }

    /// Forwards until `shutdown` is cancelled (then returns `Ok`, leaving the messages it had
    /// not published unsettled, for the next run) or the outbox subscription fails for good.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ForwardError> {
        let topic = self.config.outbox_topic.clone();
        let mut stream = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            subscribed = self.subscriber.subscribe(&topic) => subscribed
                .map_err(|source| ForwardError::Subscribe { topic: topic.clone(), source })?,
        };
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                item = stream.next() => item,
            };
            let mut batch = match first {
                None => return Err(ForwardError::SubscriptionEnded { topic }),
                Some(Err(error)) => {
                    tracing::warn!(%error, topic = %topic, "reading the outbox failed");
                    continue;
                }
                Some(Ok(message)) => vec![message],
            };
            while batch.len() < self.config.batch_messages_max {
                match stream.next().now_or_never() {
                    Some(Some(Ok(message))) => batch.push(message),
                    Some(Some(Err(error))) => {
                        tracing::warn!(%error, topic = %topic, "reading the outbox failed");
                        break;
                    }
                    Some(None) | None => break,
                }
            }
            for run in runs(batch) {
                if !self.forward(run, &shutdown).await {
                    return Ok(());
                }
            }
        }
    }

    /// Publishes one run, trying again until it succeeds; acks its originals. False when
    /// `shutdown` came first.
    async fn forward(&self, run: Run, shutdown: &CancellationToken) -> bool {
        let (topic, messages) = match run.destination {
            Ok(topic) => (topic, run.messages),
            Err(reason) => match &self.config.invalid_topic {
                Some(invalid) => {
                    let messages = run
                        .messages
                        .into_iter()
                        .map(|message| message.with_metadata("factline_outbox_invalid", &reason))
                        .collect();
                    (invalid.clone(), messages)
                }
                None => {
                    for original in &run.originals {
                        tracing::error!(message_id = %original.id, %reason, "outbox message cannot be forwarded; dropped");
                        original.ack();
                    }
                    self.stats
                        .invalid
                        .fetch_add(run.originals.len() as u64, Ordering::Relaxed);
                    return true;
                }
            },
        };
        let mut backoff = self.config.retry_backoff_min;
        loop {
            let published = tokio::select! {
                () = shutdown.cancelled() => return false,
                published = self.publisher.publish(&topic, messages.clone()) => published,
            };
            match published {
                Ok(()) => break,
                Err(PublishError::InvalidTopic(error)) => {
                    // Never publishable: treat like a message without a destination.
                    let reason = error.to_string();
                    return Box::pin(self.forward(
                        Run {
                            destination: Err(reason),
                            messages,
                            originals: run.originals,
                        },
                        shutdown,
                    ))
                    .await;
                }
                Err(error) => {
                    self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, topic = %topic, messages = messages.len(), backoff_ms = backoff.as_millis() as u64, "forwarding failed; trying again");
                    tokio::select! {
                        () = shutdown.cancelled() => return false,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.config.retry_backoff_max);
                }
            }
        }
        if self.config.invalid_topic.as_deref() == Some(topic.as_str()) {
            self.stats
                .invalid
                .fetch_add(run.originals.len() as u64, Ordering::Relaxed);
        } else {
            self.stats
                .forwarded
                .fetch_add(run.originals.len() as u64, Ordering::Relaxed);
        }
        for original in &run.originals {
            original.ack();
        }
        true
    }
}

/// Splits a batch into consecutive runs of one destination each (order kept).
fn runs(batch: Vec<Message>) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for original in batch {
        let destination = match original.metadata.get(DESTINATION_KEY) {
            None => Err(format!("no {DESTINATION_KEY} metadata")),
            Some(topic) => check_topic(topic)
                .map(|()| topic.to_owned())
                .map_err(|error| error.to_string()),
        };
        let mut forwarded = original.detached();
        forwarded.metadata.remove(DESTINATION_KEY);
        match runs.last_mut() {
            Some(last) if last.destination == destination => {
                last.messages.push(forwarded);
                last.originals.push(original);
            }
            _ => runs.push(Run {
                destination,
                messages: vec![forwarded],
                originals: vec![original],
            }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{InMemoryConfig, InMemoryPubSub};
    use crate::pubsub::CloseError;
    use std::sync::Mutex;

    fn staged(destination: Option<&str>, n: usize) -> Message {
        let message = Message::new(format!("m{n}"));
        match destination {
            Some(topic) => message.with_metadata(DESTINATION_KEY, topic),
            None => message,
        }
    }

    /// Fails the first `failures` publishes, records the rest.
    struct Flaky {
        failures: Mutex<usize>,
        published: Mutex<Vec<(String, Message)>>,
    }

    #[async_trait::async_trait]
    impl Publisher for Flaky {
        async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<(), PublishError> {
            check_topic(topic)?;
            {
                let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
                if *failures > 0 {
                    *failures -= 1;
                    return Err(PublishError::TimedOut { timeout_ms: 1 });
                }
            }
            let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
            published.extend(messages.into_iter().map(|m| (topic.to_owned(), m)));
            Ok(())
        }
        async fn close(&self) -> Result<(), CloseError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn forwards_in_order_through_failures_and_keeps_ids() {
        let outbox = InMemoryPubSub::new(InMemoryConfig::default().persistent(true));
        let publisher = outbox.publisher();
        let staged: Vec<Message> = (0..20)
            .map(|n| staged(Some(if n % 3 == 0 { "a" } else { "b" }), n))
            .collect();
        publisher
            .publish("outbox", staged.clone())
            .await
            .expect("stage");
        let flaky = Arc::new(Flaky {
            failures: Mutex::new(3),
            published: Mutex::new(Vec::new()),
        });
        let forwarder = Forwarder::new(
            ForwarderConfig::new("outbox")
                .batch_messages_max(4)
                .retry_backoff(Duration::from_millis(1), Duration::from_millis(5)),
            Arc::new(outbox.subscriber_in_group("forwarder")),
            flaky.clone(),
        );
        let shutdown = CancellationToken::new();
        let stats = forwarder.stats();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { forwarder.run(shutdown).await }
        });
        for _ in 0..500 {
            if stats.forwarded() == 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shutdown.cancel();
        task.await.expect("join").expect("run");
        let published = flaky
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let ids: Vec<_> = published.iter().map(|(_, m)| m.id.clone()).collect();
        let wanted: Vec<_> = staged.iter().map(|m| m.id.clone()).collect();
        assert_eq!(ids, wanted, "every message once, in staging order");
        for ((topic, message), original) in published.iter().zip(&staged) {
            assert_eq!(Some(topic.as_str()), original.metadata.get(DESTINATION_KEY));
            assert!(!message.metadata.contains_key(DESTINATION_KEY));
            assert_eq!(message.payload, original.payload);
        }
        assert_eq!(stats.publish_failures(), 3);
        // Everything was acked on the outbox: a new member of the group gets nothing.
        let mut again = outbox
            .subscriber_in_group("forwarder")
            .subscribe("outbox")
            .await
            .expect("subscribe");
        let next = tokio::time::timeout(Duration::from_millis(100), again.next()).await;
        assert!(next.is_err(), "nothing is left in the outbox group");
    }

    #[tokio::test]
    async fn messages_without_destination_go_to_the_invalid_topic() {
        let outbox = InMemoryPubSub::new(InMemoryConfig::default().persistent(true));
        outbox
            .publisher()
            .publish(
                "outbox",
                vec![
                    staged(None, 0),
                    staged(Some("bad\ntopic"), 1),
                    staged(Some("ok"), 2),
                ],
            )
            .await
            .expect("stage");
        let sink = Arc::new(Flaky {
            failures: Mutex::new(0),
            published: Mutex::new(Vec::new()),
        });
        let forwarder = Forwarder::new(
            ForwarderConfig::new("outbox").invalid_topic("outbox.invalid"),
            Arc::new(outbox.subscriber_in_group("forwarder")),
            sink.clone(),
        );
        let stats = forwarder.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { forwarder.run(shutdown).await }
        });
        for _ in 0..500 {
            if stats.forwarded() + stats.invalid() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shutdown.cancel();
        task.await.expect("join").expect("run");
        let published = sink
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let topics: Vec<&str> = published.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(topics, ["outbox.invalid", "outbox.invalid", "ok"]);
        assert!(
            published[0]
                .1
                .metadata
                .contains_key("factline_outbox_invalid")
        );
        assert_eq!((stats.forwarded(), stats.invalid()), (1, 2));
    }
}
