//! The checkout saga end to end: commands over the in-memory bus and router, handlers on the
//! Order and Payment aggregates, the saga run by a ProcessManagerRunner. A paid order ships;
//! a declined payment cancels the order; a payment that never comes is compensated by the
//! timeout (after a crash of the runner, and after a restart of the embedded store), and a
//! charge that comes late is refunded.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{sync::Arc, time::Duration};

use factline::domain::{
    CommandSink, ExecuteOptions, ProcessError, ProcessManagerRunner, ProcessStopped, Repository,
};
use factline::log::LogStore;
use factline::messaging::cqrs::{CommandBus, CommandConfig, CommandProcessor};
use factline::messaging::{InMemoryPubSub, PoisonQueue, Publisher, Router, RunningRouter};
use factline::{
    CheckpointStore, EventStore, InMemoryCheckpointStore, InMemoryStore, ReadStreamOptions,
    StreamId,
};
use factline_example_orders::checkout::{
    Checkout, CheckoutError, CheckoutStage, PaymentGateway, register_handlers,
};
use factline_example_orders::payment::{Payment, PaymentStatus};
use factline_example_orders::{Order, OrderCommand, OrderStatus};
use futures::{FutureExt as _, future::BoxFuture};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(10);

/// A gateway that answers once opened, with the funds it was opened with.
struct Gate(watch::Receiver<Option<u64>>);

impl PaymentGateway for Gate {
    fn available_cents<'a>(&'a self, _order_id: &'a str) -> BoxFuture<'a, u64> {
        async move {
            let mut open = self.0.clone();
            let funds = open.wait_for(Option::is_some).await.map(|funds| *funds);
            funds.ok().flatten().unwrap_or(0)
        }
        .boxed()
    }
}

fn gateway(funds: Option<u64>) -> (Arc<Gate>, watch::Sender<Option<u64>>) {
    let (open, opened) = watch::channel(funds);
    (Arc::new(Gate(opened)), open)
}

/// The command side: a bus and a router running the checkout's command handlers.
struct Shop {
    bus: CommandBus,
    router: RunningRouter,
}

async fn shop(store: Arc<dyn EventStore>, gateway: Arc<dyn PaymentGateway>) -> Shop {
    let pubsub = InMemoryPubSub::default();
    let publisher: Arc<dyn Publisher> = Arc::new(pubsub.publisher());
    let config = CommandConfig::new();
    let bus = CommandBus::new(publisher.clone(), config.clone());
    let mut processor = CommandProcessor::new(config);
    register_handlers(&mut processor, store, gateway).unwrap();
    let mut router = Router::default();
    router.poison_queue(PoisonQueue::new(publisher, "poison").unwrap());
    processor
        .register_into(&mut router, |name| {
            Arc::new(pubsub.subscriber_in_group(name))
        })
        .unwrap();
    Shop {
        bus,
        router: router.start().await.unwrap(),
    }
}

fn saga(
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    bus: &CommandBus,
    payment_timeout: Duration,
) -> ProcessManagerRunner<Checkout> {
    ProcessManagerRunner::with_factory(
        store,
        checkpoints,
        Arc::new(bus.clone()) as Arc<dyn CommandSink>,
        move || Checkout::new(payment_timeout),
    )
    .unwrap()
}

type Run = tokio::task::JoinHandle<Result<ProcessStopped, ProcessError<CheckoutError>>>;

fn start(runner: ProcessManagerRunner<Checkout>) -> (tokio::sync::oneshot::Sender<()>, Run) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    (stop, tokio::spawn(runner.run_until(stopped.map(drop))))
}

async fn place(store: &Arc<dyn EventStore>, order_id: &str, total_cents: u64) {
    Repository::<Order>::new(store.clone())
        .execute(
            order_id,
            OrderCommand::PlaceOrder {
                customer_id: "c-7".into(),
                total_cents,
            },
            ExecuteOptions::new().with_correlation_id(format!("web-{order_id}")),
        )
        .await
        .unwrap();
}

async fn order(store: &Arc<dyn EventStore>, id: &str) -> Order {
    Repository::<Order>::new(store.clone())
        .load(id)
        .await
        .unwrap()
        .state
}

async fn payment(store: &Arc<dyn EventStore>, id: &str) -> Payment {
    Repository::<Payment>::new(store.clone())
        .load(id)
        .await
        .unwrap()
        .state
}

async fn checkout(runner: &ProcessManagerRunner<Checkout>, id: &str) -> Checkout {
    runner.load(id).await.unwrap().state
}

/// Waits until `probe` gives `want`.
async fn until<T: PartialEq + std::fmt::Debug, F: Future<Output = T>>(
    want: T,
    mut probe: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = probe().await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited for {want:?}, still {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_paid_order_ships_and_the_checkout_completes() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
    let (funds, _open) = gateway(Some(10_000));
    let shop = shop(store.clone(), funds).await;
    let probe = saga(store.clone(), checkpoints.clone(), &shop.bus, WAIT);
    let (stop, run) = start(saga(store.clone(), checkpoints, &shop.bus, WAIT));

    place(&store, "42", 2_500).await;
    until(CheckoutStage::Completed, || async {
        checkout(&probe, "42").await.stage
    })
    .await;
    let shipped = order(&store, "42").await;
    assert_eq!(shipped.status, OrderStatus::Shipped);
    assert_eq!(shipped.paid_cents, 2_500);
    assert_eq!(
        payment(&store, "42").await.status,
        PaymentStatus::Charged(2_500)
    );
    let saga_state = probe.load("42").await.unwrap();
    assert!(
        saga_state.pending_timeouts.is_empty(),
        "the payment timeout was canceled"
    );

    // The web request's correlation id went through the saga, its commands and the handlers.
    let charged = store
        .read_stream(
            &StreamId::new("payment-42").unwrap(),
            ReadStreamOptions::forwards(),
        )
        .await
        .unwrap();
    assert_eq!(charged.events[0].metadata.correlation_id(), Some("web-42"));

    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
    shop.router.shutdown().await;
}

#[tokio::test]
async fn a_declined_payment_cancels_the_order() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
    let (funds, _open) = gateway(Some(1_000));
    let shop = shop(store.clone(), funds).await;
    let probe = saga(store.clone(), checkpoints.clone(), &shop.bus, WAIT);
    let (stop, run) = start(saga(store.clone(), checkpoints, &shop.bus, WAIT));

    place(&store, "7", 2_500).await;
    until(OrderStatus::Canceled, || async {
        order(&store, "7").await.status
    })
    .await;
    let state = checkout(&probe, "7").await;
    assert_eq!(state.stage, CheckoutStage::Compensated);
    assert_eq!(
        state.compensation_reason.as_deref(),
        Some("payment declined: insufficient funds: 1000 of 2500 cents available")
    );
    assert!(!state.refund_requested, "nothing was charged");
    assert_eq!(payment(&store, "7").await.status, PaymentStatus::Declined);
    assert_eq!(order(&store, "7").await.paid_cents, 0);

    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
    shop.router.shutdown().await;
}

#[tokio::test]
async fn a_payment_that_never_comes_is_compensated_after_a_crash_and_a_late_charge_refunded() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
    let (gate, open) = gateway(None);
    let shop = shop(store.clone(), gate).await;
    let timeout = Duration::from_millis(300);
    let probe = saga(store.clone(), checkpoints.clone(), &shop.bus, timeout);
    let (_stop, run) = start(saga(store.clone(), checkpoints.clone(), &shop.bus, timeout));

    place(&store, "9", 2_500).await;
    until(CheckoutStage::AwaitingPayment, || async {
        checkout(&probe, "9").await.stage
    })
    .await;
    // The runner crashes before the timeout is due (no checkpoint saved on the way out).
    run.abort();
    tokio::time::sleep(timeout + Duration::from_millis(100)).await;
    assert_eq!(order(&store, "9").await.status, OrderStatus::Placed);

    // A new runner finds the due timeout and compensates.
    let (stop, run) = start(saga(store.clone(), checkpoints, &shop.bus, timeout));
    until(OrderStatus::Canceled, || async {
        order(&store, "9").await.status
    })
    .await;
    let state = checkout(&probe, "9").await;
    assert_eq!(state.stage, CheckoutStage::Compensated);
    assert_eq!(
        state.compensation_reason.as_deref(),
        Some("payment not received within 300 ms")
    );

    // The gateway answers at last: the late charge is given back.
    open.send(Some(10_000)).unwrap();
    until(PaymentStatus::Refunded(2_500), || async {
        payment(&store, "9").await.status
    })
    .await;
    assert!(checkout(&probe, "9").await.refund_requested);
    assert_eq!(order(&store, "9").await.status, OrderStatus::Canceled);

    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
    shop.router.shutdown().await;
}

#[tokio::test]
async fn a_timeout_survives_a_restart_of_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(300);
    {
        let log = Arc::new(LogStore::open(dir.path()).await.unwrap());
        let store: Arc<dyn EventStore> = log.clone();
        let checkpoints: Arc<dyn CheckpointStore> = Arc::new(log.checkpoints());
        // A gateway that never answers.
        let (gate, _open) = gateway(None);
        let shop = shop(store.clone(), gate).await;
        let probe = saga(store.clone(), checkpoints.clone(), &shop.bus, timeout);
        let (stop, run) = start(saga(store.clone(), checkpoints, &shop.bus, timeout));
        place(&store, "5", 900).await;
        until(CheckoutStage::AwaitingPayment, || async {
            checkout(&probe, "5").await.stage
        })
        .await;
        stop.send(()).unwrap();
        let stopped = run.await.unwrap().unwrap();
        assert_eq!(stopped.timeouts_pending, 1);
        drop(shop);
        log.close().await;
    }
    tokio::time::sleep(timeout).await;

    // Everything restarts on the same directory: the timeout fires and the order is canceled.
    let log = Arc::new(LogStore::open(dir.path()).await.unwrap());
    let store: Arc<dyn EventStore> = log.clone();
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(log.checkpoints());
    let (funds, _open) = gateway(Some(10_000));
    let shop = shop(store.clone(), funds).await;
    let probe = saga(store.clone(), checkpoints.clone(), &shop.bus, timeout);
    let (stop, run) = start(saga(store.clone(), checkpoints, &shop.bus, timeout));
    until(OrderStatus::Canceled, || async {
        order(&store, "5").await.status
    })
    .await;
    assert_eq!(
        checkout(&probe, "5").await.stage,
        CheckoutStage::Compensated
    );
    stop.send(()).unwrap();
    assert_eq!(run.await.unwrap().unwrap().timeouts_pending, 0);
    shop.router.shutdown().await;
    log.close().await;
}

#[tokio::test]
async fn a_command_sent_twice_with_one_message_id_is_applied_once() {
    use factline::messaging::{MessageId, Metadata};
    use factline_example_orders::checkout::RecordPayment;

    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let (funds, _open) = gateway(Some(10_000));
    let shop = shop(store.clone(), funds).await;
    place(&store, "3", 2_500).await;
    let payment = RecordPayment {
        order_id: "3".into(),
        amount_cents: 1_000,
    };
    // As the saga does after a restart: the same command again, with the id it recorded.
    let id = MessageId::new_v7();
    for _ in 0..2 {
        shop.bus
            .send_with_id(&payment, id.clone(), Metadata::new())
            .await
            .unwrap();
    }
    let later = RecordPayment {
        order_id: "3".into(),
        amount_cents: 500,
    };
    shop.bus.send(&later).await.unwrap();
    until(1_500, || async { order(&store, "3").await.paid_cents }).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(order(&store, "3").await.paid_cents, 1_500, "not 2,500");
    shop.router.shutdown().await;
}
