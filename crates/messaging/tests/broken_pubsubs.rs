//! The pub/sub conformance suite must catch a pub/sub that breaks a contract rule.
//!
//! `Broken` wraps the in-memory pub/sub and breaks exactly one rule, chosen by `Fault`. For each
//! fault the whole suite runs (`testkit::run_suite`) and the test asserts that it reports a
//! failure, and that the cases guarding the broken rule are among the failures. `Fault::None`
//! declares every feature (its "broker restart" keeps everything) and must pass every case, so
//! the failures come from the faults alone.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::testkit::{self, Features, PubSubFixture, SuiteReport};
use factline_messaging::{
    Acknowledger, CloseError, InMemoryConfig, InMemoryPubSub, InMemorySubscriber, Message,
    MessageStream, Metadata, Outcome, PublishError, Publisher, SubscribeError, Subscriber,
};
use futures::StreamExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Keeps every rule.
    None,
    /// Loses every 50th message published.
    DropsEvery50th,
    /// Publishes the second message of every batch of three or more twice.
    DuplicatesOne,
    /// Swaps the first two messages of every batch.
    ReordersTwo,
    /// Acks when the consumer nacks.
    IgnoresNack,
    /// Redelivers a nacked message at once, whatever the delay.
    IgnoresNackDelay,
    /// Nacks when the consumer acks: acked messages come again.
    RedeliversAcked,
    /// Treats a delivery dropped unsettled as handled.
    DropCountsAsAck,
    /// Treats deliveries still unsettled when the subscriber closes as handled.
    LosesInFlightOnClose,
    /// Declares retention but keeps nothing for late subscribers or offline groups.
    LosesRetained,
    /// Gives every member of a group its own copy of every message.
    GroupsActLikeFanOut,
    /// Loses the metadata.
    StripsMetadata,
    /// Cuts payloads above 64 KiB.
    TruncatesLargePayloads,
    /// Keeps publishing after `close`.
    PublishesAfterClose,
    /// `close` refuses new subscribes but leaves open streams running.
    CloseKeepsStreamsOpen,
    /// Accepts the empty topic (and sends its messages nowhere).
    AcceptsEmptyTopic,
    /// A subscription to `t` also receives the messages of every topic starting with `t`.
    PrefixRouting,
    /// `subscribe` returns before the subscription exists (it starts when first polled).
    SubscribesLazily,
    /// A broker restart loses the broker's state; publishers reconnect, open subscriptions
    /// silently stay with the dead broker.
    ForgetsOnRestart,
}

/// What the in-memory pub/sub behind a fault is, and what the fixture declares.
fn setup(fault: Fault) -> (bool, Features) {
    match fault {
        // Declares retention the non-persistent pub/sub does not have.
        Fault::LosesRetained => (false, Features::all()),
        // Losing what is published right after subscribe only shows without retention.
        Fault::SubscribesLazily => (
            false,
            Features::all().persistent(false).durable_groups(false),
        ),
        _ => (true, Features::all()),
    }
}

struct BrokerState {
    /// The broker; replaced by a restart under `Fault::ForgetsOnRestart`.
    pubsub: Mutex<InMemoryPubSub>,
    persistent: bool,
    /// Messages published so far (for `DropsEvery50th`).
    published: AtomicU64,
    /// Topics subscribed to so far (for `PrefixRouting`).
    subscribed: Mutex<HashSet<String>>,
}

impl BrokerState {
    fn pubsub(&self) -> InMemoryPubSub {
        self.pubsub.lock().unwrap().clone()
    }
}

fn new_pubsub(persistent: bool) -> InMemoryPubSub {
    InMemoryPubSub::new(InMemoryConfig::default().persistent(persistent))
}

struct Broken {
    fault: Fault,
    features: Features,
    state: Arc<BrokerState>,
}

impl Broken {
    fn new(fault: Fault) -> Self {
        let (persistent, features) = setup(fault);
        Self {
            fault,
            features,
            state: Arc::new(BrokerState {
                pubsub: Mutex::new(new_pubsub(persistent)),
                persistent,
                published: AtomicU64::new(0),
                subscribed: Mutex::new(HashSet::new()),
            }),
        }
    }
}

#[async_trait]
impl PubSubFixture for Broken {
    fn features(&self) -> Features {
        self.features
    }

    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(BrokenPublisher {
            fault: self.fault,
            state: self.state.clone(),
            closed: AtomicBool::new(false),
        })
    }

    async fn subscriber(&self, group: Option<&str>) -> Arc<dyn Subscriber> {
        let pubsub = self.state.pubsub();
        let inner = match (group, self.fault) {
            (Some(group), Fault::GroupsActLikeFanOut) => {
                pubsub.subscriber_in_group(&format!("{group}-{}", uuid::Uuid::new_v4()))
            }
            (Some(group), _) => pubsub.subscriber_in_group(group),
            (None, _) => pubsub.subscriber(),
        };
        Arc::new(BrokenSubscriber {
            fault: self.fault,
            state: self.state.clone(),
            inner,
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn restart_broker(&self) -> Result<(), String> {
        if self.fault == Fault::ForgetsOnRestart {
            *self.state.pubsub.lock().unwrap() = new_pubsub(self.state.persistent);
        }
        Ok(())
    }

    // In-process deliveries take microseconds: short waits keep the 19 suite runs quick.
    fn delivery_timeout(&self) -> Duration {
        Duration::from_millis(500)
    }

    fn time_scale(&self) -> f64 {
        0.15
    }
}

struct BrokenPublisher {
    fault: Fault,
    state: Arc<BrokerState>,
    closed: AtomicBool,
}

#[async_trait]
impl Publisher for BrokenPublisher {
    async fn publish(&self, topic: &str, mut messages: Vec<Message>) -> Result<(), PublishError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PublishError::Closed);
        }
        let inner = self.state.pubsub().publisher();
        match self.fault {
            Fault::AcceptsEmptyTopic if topic.is_empty() => return Ok(()),
            Fault::DropsEvery50th => messages.retain(|_| {
                let n = self.state.published.fetch_add(1, Ordering::Relaxed);
                n % 50 != 49
            }),
            Fault::DuplicatesOne if messages.len() >= 3 => {
                let copy = messages[1].clone();
                messages.insert(2, copy);
            }
            Fault::ReordersTwo if messages.len() >= 2 => messages.swap(0, 1),
            Fault::StripsMetadata => {
                for message in &mut messages {
                    message.metadata = Metadata::new();
                }
            }
            Fault::TruncatesLargePayloads => {
                for message in &mut messages {
                    if message.payload.len() > 64 * 1024 {
                        message.payload = message.payload.slice(..64 * 1024);
                    }
                }
            }
            Fault::PrefixRouting => {
                let prefixes: Vec<String> = self
                    .state
                    .subscribed
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|s| s.as_str() != topic && topic.starts_with(s.as_str()))
                    .cloned()
                    .collect();
                for prefix in prefixes {
                    let copies = messages.iter().map(Message::detached).collect();
                    inner.publish(&prefix, copies).await?;
                }
            }
            _ => {}
        }
        inner.publish(topic, messages).await
    }

    async fn close(&self) -> Result<(), CloseError> {
        if self.fault != Fault::PublishesAfterClose {
            self.closed.store(true, Ordering::Release);
        }
        Ok(())
    }
}

struct BrokenSubscriber {
    fault: Fault,
    state: Arc<BrokerState>,
    inner: InMemorySubscriber,
    closed: Arc<AtomicBool>,
}

#[async_trait]
impl Subscriber for BrokenSubscriber {
    async fn subscribe(&self, topic: &str) -> Result<MessageStream, SubscribeError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(SubscribeError::Closed);
        }
        if self.fault == Fault::AcceptsEmptyTopic && topic.is_empty() {
            return Ok(MessageStream::new(futures::stream::pending()));
        }
        self.state
            .subscribed
            .lock()
            .unwrap()
            .insert(topic.to_owned());
        let inner = if self.fault == Fault::SubscribesLazily {
            // Checks like the real thing, then subscribes only when first polled.
            factline_messaging::check_topic(topic).map_err(SubscribeError::from)?;
            let subscriber = self.inner.clone();
            let topic = topic.to_owned();
            MessageStream::new(
                futures::stream::once(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    subscriber.subscribe(&topic).await
                })
                .flat_map(|result| match result {
                    Ok(stream) => stream.boxed(),
                    Err(_) => futures::stream::empty().boxed(),
                }),
            )
        } else {
            self.inner.subscribe(topic).await?
        };
        let fault = self.fault;
        let closed = self.closed.clone();
        Ok(MessageStream::new(inner.map(move |item| {
            item.map(|message| {
                message.detached().delivered(Forward {
                    inner: message,
                    fault,
                    closed: closed.clone(),
                })
            })
        })))
    }

    async fn close(&self) -> Result<(), CloseError> {
        self.closed.store(true, Ordering::Release);
        if self.fault == Fault::CloseKeepsStreamsOpen {
            return Ok(());
        }
        self.inner.close().await
    }
}

/// Settles the in-memory delivery behind a wrapped one, faithfully or per the fault.
struct Forward {
    inner: Message,
    fault: Fault,
    closed: Arc<AtomicBool>,
}

impl Acknowledger for Forward {
    fn settled(&self, outcome: Outcome) {
        match (self.fault, outcome) {
            (Fault::IgnoresNack, Outcome::Nacked { .. }) => {
                self.inner.ack();
            }
            (Fault::IgnoresNackDelay, Outcome::Nacked { .. }) => {
                self.inner.nack();
            }
            (_, Outcome::Nacked { delay: Some(delay) }) => {
                self.inner.nack_with_delay(delay);
            }
            (_, Outcome::Nacked { delay: None }) => {
                self.inner.nack();
            }
            (Fault::RedeliversAcked, Outcome::Acked) => {
                self.inner.nack();
            }
            (_, Outcome::Acked) => {
                self.inner.ack();
            }
            (Fault::DropCountsAsAck, Outcome::Dropped) => {
                self.inner.ack();
            }
            (Fault::LosesInFlightOnClose, Outcome::Dropped)
                if self.closed.load(Ordering::Acquire) =>
            {
                self.inner.ack();
            }
            // Otherwise the inner delivery is dropped with this one: dropped too.
            _ => {}
        }
    }
}

async fn run(fault: Fault) -> SuiteReport {
    testkit::run_suite(Broken::new(fault)).await
}

async fn assert_caught(fault: Fault, guarding_cases: &[&str]) {
    let report = run(fault).await;
    assert!(
        !report.all_passed(),
        "{fault:?} went unnoticed by the whole suite:\n{report}"
    );
    for case in guarding_cases {
        assert!(
            report.failed(case),
            "{fault:?} should fail {case}; failed: {:?}",
            report.failed_names()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrapper_without_a_fault_passes_everything() {
    let report = run(Fault::None).await;
    assert!(report.all_passed(), "{report}");
    assert!(report.skipped.is_empty(), "{report}");
    assert_eq!(report.passed.len(), testkit::all_cases().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_every_50th_message_is_caught() {
    assert_caught(
        Fault::DropsEvery50th,
        &["many_messages_arrive_without_loss"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicating_a_message_is_caught() {
    assert_caught(
        Fault::DuplicatesOne,
        &[
            "round_trip_keeps_id_metadata_and_payload",
            "acked_message_is_not_redelivered",
            "many_messages_arrive_without_loss",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordering_two_messages_is_caught() {
    assert_caught(
        Fault::ReordersTwo,
        // Not the round trip: its messages have different partition keys, and order is
        // promised only within one key (spec §7).
        &["ordering_follows_publish_order"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acking_instead_of_nacking_is_caught() {
    assert_caught(
        Fault::IgnoresNack,
        &["nack_redelivers_the_same_message", "first_settlement_wins"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignoring_the_nack_delay_is_caught() {
    assert_caught(
        Fault::IgnoresNackDelay,
        &["nack_with_delay_redelivers_no_sooner"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivering_acked_messages_is_caught() {
    assert_caught(
        Fault::RedeliversAcked,
        &["acked_message_is_not_redelivered", "first_settlement_wins"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn treating_a_dropped_delivery_as_acked_is_caught() {
    assert_caught(
        Fault::DropCountsAsAck,
        &[
            "dropped_delivery_is_redelivered",
            "close_with_messages_in_flight_loses_nothing",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_messages_in_flight_at_close_is_caught() {
    assert_caught(
        Fault::LosesInFlightOnClose,
        &["close_with_messages_in_flight_loses_nothing"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_messages_published_before_subscribe_is_caught() {
    assert_caught(
        Fault::LosesRetained,
        &[
            "late_subscriber_receives_retained_messages",
            "group_resumes_where_it_left_off",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivering_to_two_group_members_is_caught() {
    assert_caught(
        Fault::GroupsActLikeFanOut,
        &["group_members_share_messages_without_duplicates"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_metadata_is_caught() {
    assert_caught(
        Fault::StripsMetadata,
        &["round_trip_keeps_id_metadata_and_payload"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncating_large_payloads_is_caught() {
    assert_caught(
        Fault::TruncatesLargePayloads,
        &["round_trip_keeps_id_metadata_and_payload"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_after_close_is_caught() {
    assert_caught(
        Fault::PublishesAfterClose,
        &["publisher_close_flushes_and_refuses_publish"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_outliving_their_closed_subscriber_are_caught() {
    assert_caught(
        Fault::CloseKeepsStreamsOpen,
        &["subscriber_close_ends_streams_and_refuses_subscribe"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_the_empty_topic_is_caught() {
    assert_caught(Fault::AcceptsEmptyTopic, &["invalid_topics_are_refused"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_routing_is_caught() {
    assert_caught(Fault::PrefixRouting, &["topics_are_isolated"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_lazily_is_caught() {
    assert_caught(
        Fault::SubscribesLazily,
        &["round_trip_keeps_id_metadata_and_payload"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_silently_lost_in_a_restart_is_caught() {
    assert_caught(
        Fault::ForgetsOnRestart,
        &["reconnect_after_broker_restart_loses_nothing"],
    )
    .await;
}
