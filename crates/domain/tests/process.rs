//! Process managers over the in-memory store: reactions recorded with their commands, commands
//! sent again after a failure without reacting twice, timeouts that survive a restart,
//! cancellation, phantom timeouts, and the compaction of the timeout index.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use factline_core::{
    CheckpointStore, EventData, EventStore, ExpectedVersion, InMemoryCheckpointStore,
    InMemoryStore, ReadStreamOptions, RecordedEvent, StreamId, Timestamp, Uuid,
};
use factline_domain::{
    CommandSink, DomainEvent, IssuedCommand, ProcessError, ProcessManager, ProcessManagerRunner,
    ProcessOptions, ProcessStopped, REACTED_EVENT_TYPE, Reaction, SinkError, timeout_index_stream,
};
use factline_messaging::cqrs::Command;
use futures::{FutureExt as _, future::BoxFuture};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(10);

/// What the checkout reacts to (events of the `order` and `payment` streams).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
enum Input {
    OrderPlaced {
        amount: u64,
        payment_timeout_ms: u64,
    },
    PaymentCharged,
    PaymentDeclined {
        reason: String,
    },
}

/// The checkout's own events.
#[allow(clippy::enum_variant_names)] // past-tense names of one process
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
enum CheckoutEvent {
    CheckoutStarted { order: String, amount: u64 },
    CheckoutPaid,
    CheckoutFailed { reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PaymentDue {
    amount: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ChargePayment {
    order: String,
    amount: u64,
}
impl Command for ChargePayment {
    const NAME: &'static str = "ChargePayment";
    fn partition_key(&self) -> Option<String> {
        Some(self.order.clone())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ShipOrder {
    order: String,
}
impl Command for ShipOrder {
    const NAME: &'static str = "ShipOrder";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CancelOrder {
    order: String,
    reason: String,
}
impl Command for CancelOrder {
    const NAME: &'static str = "CancelOrder";
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Stage {
    #[default]
    New,
    AwaitingPayment,
    Paid,
    Failed,
}

#[derive(Debug, Default)]
struct Checkout {
    stage: Stage,
    order: String,
    events_applied: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

fn order_of(recorded: &RecordedEvent) -> String {
    recorded
        .stream
        .as_str()
        .split_once('-')
        .map(|(_, id)| id.to_owned())
        .unwrap_or_default()
}

impl ProcessManager for Checkout {
    type Input = Input;
    type Event = CheckoutEvent;
    type Timeout = PaymentDue;
    type Error = Never;
    const CATEGORY: &'static str = "checkout";

    fn correlate(_: &Input, recorded: &RecordedEvent) -> Option<String> {
        Some(order_of(recorded))
    }

    fn react(&self, input: &Input, recorded: &RecordedEvent) -> Result<Reaction<Self>, Never> {
        let order = order_of(recorded);
        Ok(match (self.stage, input) {
            (
                Stage::New,
                Input::OrderPlaced {
                    amount,
                    payment_timeout_ms,
                },
            ) => Reaction::new()
                .record(CheckoutEvent::CheckoutStarted {
                    order: order.clone(),
                    amount: *amount,
                })
                .send(&ChargePayment {
                    order,
                    amount: *amount,
                })
                .schedule(
                    "payment",
                    Duration::from_millis(*payment_timeout_ms),
                    &PaymentDue { amount: *amount },
                ),
            (Stage::AwaitingPayment, Input::PaymentCharged) => Reaction::new()
                .record(CheckoutEvent::CheckoutPaid)
                .cancel("payment")
                .send(&ShipOrder { order }),
            (Stage::AwaitingPayment, Input::PaymentDeclined { reason }) => Reaction::new()
                .record(CheckoutEvent::CheckoutFailed {
                    reason: reason.clone(),
                })
                .cancel("payment")
                .send(&CancelOrder {
                    order,
                    reason: format!("payment declined: {reason}"),
                }),
            _ => Reaction::new(),
        })
    }

    fn on_timeout(&self, key: &str, timeout: PaymentDue) -> Result<Reaction<Self>, Never> {
        assert_eq!(key, "payment");
        Ok(match self.stage {
            Stage::AwaitingPayment => Reaction::new()
                .record(CheckoutEvent::CheckoutFailed {
                    reason: format!("no payment of {} in time", timeout.amount),
                })
                .send(&CancelOrder {
                    order: self.order.clone(),
                    reason: "payment timed out".to_owned(),
                }),
            _ => Reaction::new(),
        })
    }

    fn evolve(&mut self, event: &CheckoutEvent) {
        self.events_applied += 1;
        self.stage = match event {
            CheckoutEvent::CheckoutStarted { order, .. } => {
                self.order = order.clone();
                Stage::AwaitingPayment
            }
            CheckoutEvent::CheckoutPaid => Stage::Paid,
            CheckoutEvent::CheckoutFailed { .. } => Stage::Failed,
        };
    }
}

/// Records what was sent; fails while `failures_left` is above zero.
#[derive(Debug, Default)]
struct RecordingSink {
    sent: Mutex<Vec<IssuedCommand>>,
    failures_left: AtomicU32,
}

impl RecordingSink {
    fn failing(times: u32) -> Self {
        Self {
            sent: Mutex::default(),
            failures_left: AtomicU32::new(times),
        }
    }

    fn sent(&self) -> Vec<IssuedCommand> {
        self.sent.lock().unwrap().clone()
    }

    fn sent_types(&self) -> Vec<String> {
        self.sent()
            .into_iter()
            .map(|c| {
                format!(
                    "{}:{}",
                    c.command_type,
                    c.payload["order"].as_str().unwrap()
                )
            })
            .collect()
    }
}

impl CommandSink for RecordingSink {
    fn send<'a>(&'a self, command: &'a IssuedCommand) -> BoxFuture<'a, Result<(), SinkError>> {
        async move {
            let failing = self
                .failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    left.checked_sub(1)
                })
                .is_ok();
            if failing {
                return Err("the broker is down".into());
            }
            self.sent.lock().unwrap().push(command.clone());
            Ok(())
        }
        .boxed()
    }
}

struct Setup {
    store: Arc<InMemoryStore>,
    checkpoints: Arc<InMemoryCheckpointStore>,
}

impl Setup {
    fn new() -> Self {
        Self {
            store: Arc::new(InMemoryStore::new()),
            checkpoints: Arc::new(InMemoryCheckpointStore::new()),
        }
    }

    fn runner(&self, sink: &Arc<RecordingSink>) -> ProcessManagerRunner<Checkout> {
        ProcessManagerRunner::new(
            self.store.clone(),
            self.checkpoints.clone() as Arc<dyn CheckpointStore>,
            sink.clone() as Arc<dyn CommandSink>,
        )
        .unwrap()
        .options(
            ProcessOptions::default()
                .send_backoff_ms(1)
                .checkpoint_every_events(1),
        )
    }

    async fn append(&self, stream: &str, input: Input, correlation_id: &str) -> RecordedEvent {
        let data = input
            .to_event_data(factline_core::Metadata::new().with("correlation_id", correlation_id))
            .unwrap();
        let stream = StreamId::new(stream).unwrap();
        let result = self
            .store
            .append(&stream, ExpectedVersion::Any, vec![data])
            .await
            .unwrap();
        let slice = self
            .store
            .read_stream(
                &stream,
                ReadStreamOptions::forwards().from(result.next_expected_version),
            )
            .await
            .unwrap();
        slice.events[0].clone()
    }

    async fn types_of(&self, stream: &str) -> Vec<String> {
        let stream = StreamId::new(stream).unwrap();
        match self
            .store
            .read_stream(&stream, ReadStreamOptions::forwards().limit(10_000))
            .await
        {
            Ok(slice) => slice
                .events
                .iter()
                .map(|e| e.event_type.to_string())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// A running runner and the way to stop it.
struct Running {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<ProcessStopped, ProcessError<Never>>>,
}

fn start(runner: ProcessManagerRunner<Checkout>) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(runner.run_until(stopped.map(drop)));
    Running { stop, handle }
}

impl Running {
    async fn stop(self) -> ProcessStopped {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("the runner stops")
            .unwrap()
            .unwrap()
    }
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_reaction_is_recorded_with_its_commands_which_carry_ids_and_causation() {
    let setup = Setup::new();
    let sink = Arc::new(RecordingSink::default());
    let placed = setup
        .append(
            "order-1",
            Input::OrderPlaced {
                amount: 500,
                payment_timeout_ms: 60_000,
            },
            "corr-1",
        )
        .await;
    let charged = setup
        .append("payment-1", Input::PaymentCharged, "corr-1")
        .await;
    let running = start(setup.runner(&sink));
    eventually("two commands", || sink.sent().len() == 2).await;
    let stopped = running.stop().await;
    // Its own records are in `$all` too, passed over after the inputs.
    assert!(stopped.position >= Some(charged.position));

    assert_eq!(sink.sent_types(), ["ChargePayment:1", "ShipOrder:1"]);
    let sent = sink.sent();
    assert_eq!(sent[0].payload["amount"], 500);
    assert_eq!(sent[0].partition_key.as_deref(), Some("1"));
    assert_eq!(sent[0].correlation_id, "corr-1");
    assert_eq!(sent[0].causation_id, placed.id.to_string());
    assert_eq!(sent[1].causation_id, charged.id.to_string());
    assert_ne!(sent[0].message_id, sent[1].message_id);

    assert_eq!(
        setup.types_of("checkout-1").await,
        [
            "CheckoutStarted",
            REACTED_EVENT_TYPE,
            "CheckoutPaid",
            REACTED_EVENT_TYPE
        ]
    );
    let instance = setup.runner(&sink).load("1").await.unwrap();
    assert_eq!(instance.state.stage, Stage::Paid);
    assert!(
        instance.pending_timeouts.is_empty(),
        "the payment timeout was canceled"
    );
    // The state's events carry the cause too.
    let stream = StreamId::new("checkout-1").unwrap();
    let recorded = setup
        .store
        .read_stream(&stream, ReadStreamOptions::forwards())
        .await
        .unwrap();
    assert_eq!(recorded.events[0].metadata.correlation_id(), Some("corr-1"));
    assert_eq!(
        recorded.events[0].metadata.causation_id(),
        Some(placed.id.to_string().as_str())
    );
}

#[tokio::test]
async fn commands_that_failed_to_send_go_out_after_a_restart_without_a_second_reaction() {
    let setup = Setup::new();
    let broken = Arc::new(RecordingSink::failing(u32::MAX));
    setup
        .append(
            "order-7",
            Input::OrderPlaced {
                amount: 70,
                payment_timeout_ms: 60_000,
            },
            "corr-7",
        )
        .await;
    let runner = setup.runner(&broken).options(
        ProcessOptions::default()
            .send_attempts_max(3)
            .send_backoff_ms(1),
    );
    let outcome = tokio::time::timeout(WAIT, runner.run_until(std::future::pending()))
        .await
        .expect("the runner gives up");
    match outcome {
        Err(ProcessError::Send {
            command_type,
            attempts,
            ..
        }) => {
            assert_eq!(command_type, "ChargePayment");
            assert_eq!(attempts, 3);
        }
        other => panic!("expected a send failure, got {other:?}"),
    }
    assert_eq!(
        setup.types_of("checkout-7").await,
        ["CheckoutStarted", REACTED_EVENT_TYPE],
        "the reaction is recorded before its commands are sent"
    );
    let recorded_id = {
        let stream = StreamId::new("checkout-7").unwrap();
        let slice = setup
            .store
            .read_stream(&stream, ReadStreamOptions::forwards())
            .await
            .unwrap();
        let reacted: serde_json::Value = slice.events[1].data_json().unwrap();
        reacted["commands"][0]["message_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    // The broker is back: the restart sends the recorded command with its recorded id.
    let sink = Arc::new(RecordingSink::default());
    let running = start(setup.runner(&sink));
    eventually("the command", || !sink.sent().is_empty()).await;
    running.stop().await;
    let sent = sink.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].command_type, "ChargePayment");
    assert_eq!(sent[0].message_id.to_string(), recorded_id);
    assert_eq!(
        setup.types_of("checkout-7").await,
        ["CheckoutStarted", REACTED_EVENT_TYPE],
        "no second reaction"
    );

    // And another restart sends nothing: the checkpoint has passed the input.
    let again = Arc::new(RecordingSink::default());
    let running = start(setup.runner(&again));
    tokio::time::sleep(Duration::from_millis(100)).await;
    running.stop().await;
    assert!(again.sent().is_empty(), "{:?}", again.sent());
}

#[tokio::test]
async fn timeouts_fire_after_a_restart_and_canceled_ones_never_do() {
    let setup = Setup::new();
    let sink = Arc::new(RecordingSink::default());
    for order in ["a", "b"] {
        setup
            .append(
                &format!("order-{order}"),
                Input::OrderPlaced {
                    amount: 10,
                    payment_timeout_ms: 400,
                },
                order,
            )
            .await;
    }
    setup.append("payment-b", Input::PaymentCharged, "b").await;
    let running = start(setup.runner(&sink));
    eventually("three commands", || sink.sent().len() == 3).await;
    let stopped = running.stop().await;
    assert_eq!(
        stopped.timeouts_pending, 2,
        "b's is canceled, not yet settled"
    );

    // Down while the timeouts come due; a new runner fires a's and drops b's.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_restart = Arc::new(RecordingSink::default());
    let running = start(setup.runner(&after_restart));
    eventually("a's cancellation", || !after_restart.sent().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = running.stop().await;
    assert_eq!(stopped.timeouts_pending, 0);
    assert_eq!(after_restart.sent_types(), ["CancelOrder:a"]);
    let sent = after_restart.sent();
    assert_eq!(sent[0].correlation_id, "a");

    let runner = setup.runner(&sink);
    let a = runner.load("a").await.unwrap();
    assert_eq!(a.state.stage, Stage::Failed);
    assert!(a.pending_timeouts.is_empty());
    let b = runner.load("b").await.unwrap();
    assert_eq!(b.state.stage, Stage::Paid);
    assert_eq!(
        setup.types_of("checkout-b").await,
        [
            "CheckoutStarted",
            REACTED_EVENT_TYPE,
            "CheckoutPaid",
            REACTED_EVENT_TYPE
        ]
    );

    // Nothing fires twice.
    let third = Arc::new(RecordingSink::default());
    let running = start(setup.runner(&third));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(running.stop().await.timeouts_pending, 0);
    assert!(third.sent().is_empty());
}

#[tokio::test]
async fn a_declined_payment_is_compensated_and_its_timeout_canceled() {
    let setup = Setup::new();
    let sink = Arc::new(RecordingSink::default());
    setup
        .append(
            "order-9",
            Input::OrderPlaced {
                amount: 999,
                payment_timeout_ms: 200,
            },
            "c9",
        )
        .await;
    setup
        .append(
            "payment-9",
            Input::PaymentDeclined {
                reason: "card expired".to_owned(),
            },
            "c9",
        )
        .await;
    let running = start(setup.runner(&sink));
    eventually("the compensation", || sink.sent().len() == 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = running.stop().await;
    assert_eq!(stopped.timeouts_pending, 0, "the canceled timeout settled");
    assert_eq!(sink.sent_types(), ["ChargePayment:9", "CancelOrder:9"]);
    assert_eq!(
        sink.sent()[1].payload["reason"],
        "payment declined: card expired"
    );
}

#[tokio::test]
async fn a_timeout_written_ahead_of_a_reaction_that_never_landed_is_dropped() {
    let setup = Setup::new();
    let sink = Arc::new(RecordingSink::default());
    let index = timeout_index_stream("checkout").unwrap();
    let phantom = serde_json::json!({
        "id": Uuid::now_v7(),
        "instance": "ghost",
        "key": "payment",
        "due_at_us": Timestamp::now().as_unix_micros(),
    });
    setup
        .store
        .append(
            &index,
            ExpectedVersion::Any,
            vec![EventData::json("TimeoutScheduled", &phantom).unwrap()],
        )
        .await
        .unwrap();
    let running = start(setup.runner(&sink));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = running.stop().await;
    assert_eq!(stopped.timeouts_pending, 0);
    assert!(sink.sent().is_empty());
    assert!(setup.types_of("checkout-ghost").await.is_empty());
    assert_eq!(
        setup.types_of(index.as_str()).await,
        ["TimeoutScheduled", "TimeoutSettled"]
    );
}

#[tokio::test]
async fn the_timeout_index_is_compacted_and_keeps_what_is_pending() {
    let setup = Setup::new();
    let sink = Arc::new(RecordingSink::default());
    let orders = 1_001;
    for n in 0..orders {
        setup
            .append(
                &format!("order-{n}"),
                Input::OrderPlaced {
                    amount: 1,
                    payment_timeout_ms: 0,
                },
                "bulk",
            )
            .await;
    }
    // More whose timeouts stay pending through the compaction: more than one compaction
    // record holds.
    let late = 1_500;
    for n in 0..late {
        setup
            .append(
                &format!("order-late{n}"),
                Input::OrderPlaced {
                    amount: 1,
                    payment_timeout_ms: 3_600_000,
                },
                "late",
            )
            .await;
    }
    let running = start(setup.runner(&sink));
    let expected = 2 * orders + late;
    eventually("every command", || sink.sent().len() == expected).await;
    let stopped = running.stop().await;
    assert_eq!(stopped.timeouts_pending, late);

    let index = timeout_index_stream("checkout").unwrap();
    let metadata = setup.store.stream_metadata(&index).await.unwrap();
    assert!(metadata.truncate_before.is_some(), "{metadata:?}");
    let visible = setup.types_of(index.as_str()).await;
    assert!(
        visible.len() < 20 && visible[..2] == ["TimeoutsCompacted", "TimeoutsCompacted"],
        "{visible:?}"
    );
    // A restart reads the compacted index: the late timeouts are still pending.
    let running = start(setup.runner(&sink));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(running.stop().await.timeouts_pending, late);
    let one = setup.runner(&sink).load("late7").await.unwrap();
    assert!(one.pending_timeouts.contains_key("payment"));
}

/// The in-memory store with subscriptions that take `delay` per event, like a store whose
/// reads wait on I/O: a due timer then competes with inputs the runner has not read yet.
struct SlowSubscriptions {
    inner: InMemoryStore,
    delay: Duration,
}

#[factline_core::async_trait]
impl EventStore for SlowSubscriptions {
    fn limits(&self) -> &factline_core::Limits {
        self.inner.limits()
    }
    async fn append_multi(
        &self,
        requests: Vec<factline_core::AppendRequest>,
    ) -> Result<Vec<factline_core::AppendResult>, factline_core::AppendError> {
        self.inner.append_multi(requests).await
    }
    async fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadStreamOptions,
    ) -> Result<factline_core::StreamSlice, factline_core::ReadStreamError> {
        self.inner.read_stream(stream, options).await
    }
    async fn read_all(
        &self,
        options: factline_core::ReadAllOptions,
    ) -> Result<factline_core::AllSlice, factline_core::ReadAllError> {
        self.inner.read_all(options).await
    }
    async fn head_position(
        &self,
    ) -> Result<Option<factline_core::Position>, factline_core::StorageError> {
        self.inner.head_position().await
    }
    async fn subscribe_to_stream(
        &self,
        stream: &StreamId,
        from: factline_core::SubscribeFrom<factline_core::Revision>,
    ) -> Result<factline_core::Subscription, factline_core::SubscribeError> {
        self.inner.subscribe_to_stream(stream, from).await
    }
    async fn subscribe_to_all(
        &self,
        from: factline_core::SubscribeFrom<factline_core::Position>,
        filter: factline_core::EventFilter,
    ) -> Result<factline_core::Subscription, factline_core::SubscribeError> {
        use futures::StreamExt as _;
        let delay = self.delay;
        let inner = self.inner.subscribe_to_all(from, filter).await?;
        Ok(factline_core::Subscription::new(inner.then(
            move |event| async move {
                tokio::time::sleep(delay).await;
                event
            },
        )))
    }
    async fn stream_metadata(
        &self,
        stream: &StreamId,
    ) -> Result<factline_core::StreamMetadata, factline_core::MetadataError> {
        self.inner.stream_metadata(stream).await
    }
    async fn set_stream_metadata(
        &self,
        stream: &StreamId,
        metadata: factline_core::StreamMetadata,
    ) -> Result<(), factline_core::MetadataError> {
        self.inner.set_stream_metadata(stream, metadata).await
    }
    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mode: factline_core::DeleteMode,
    ) -> Result<(), factline_core::DeleteError> {
        self.inner.delete_stream(stream, expected, mode).await
    }
}

#[tokio::test]
async fn an_input_recorded_before_the_due_time_wins_even_when_read_after_it() {
    let setup = Setup::new();
    let sink = Arc::new(RecordingSink::default());
    setup
        .append(
            "order-p",
            Input::OrderPlaced {
                amount: 5,
                payment_timeout_ms: 300,
            },
            "p",
        )
        .await;
    let running = start(setup.runner(&sink));
    eventually("the charge", || sink.sent().len() == 1).await;
    running.stop().await;
    // The payment comes in time, but no runner reads it before the timeout is due.
    setup.append("payment-p", Input::PaymentCharged, "p").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    // A runner whose store takes 20 ms per event read: the timer is due all that time.
    let after = Arc::new(RecordingSink::default());
    let slow = Arc::new(SlowSubscriptions {
        inner: (*setup.store).clone(),
        delay: Duration::from_millis(20),
    });
    let runner = ProcessManagerRunner::<Checkout>::new(
        slow,
        setup.checkpoints.clone() as Arc<dyn CheckpointStore>,
        after.clone() as Arc<dyn CommandSink>,
    )
    .unwrap();
    let running = start(runner);
    eventually("the shipment", || !after.sent().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = running.stop().await;
    assert_eq!(after.sent_types(), ["ShipOrder:p"], "no cancellation");
    assert_eq!(stopped.timeouts_pending, 0, "the canceled timeout settled");
    let checkout = setup.runner(&sink).load("p").await.unwrap();
    assert_eq!(checkout.state.stage, Stage::Paid);
}

#[tokio::test]
async fn a_tombstoned_instance_does_not_stop_the_runner() {
    let setup = Setup::new();
    let sink = Arc::new(RecordingSink::default());
    setup
        .append(
            "order-t",
            Input::OrderPlaced {
                amount: 5,
                payment_timeout_ms: 100,
            },
            "t",
        )
        .await;
    let running = start(setup.runner(&sink));
    eventually("the charge", || sink.sent().len() == 1).await;
    running.stop().await;
    setup
        .store
        .delete_stream(
            &StreamId::new("checkout-t").unwrap(),
            ExpectedVersion::Any,
            factline_core::DeleteMode::Tombstone,
        )
        .await
        .unwrap();
    // Its timeout comes due, and an input for it arrives: both are passed over.
    setup.append("payment-t", Input::PaymentCharged, "t").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let running = start(setup.runner(&sink));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!running.handle.is_finished(), "the runner keeps running");
    assert_eq!(running.stop().await.timeouts_pending, 0);
    assert_eq!(sink.sent().len(), 1);
}
