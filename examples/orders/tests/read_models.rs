//! The read models over orders placed, paid, shipped and canceled through the repository:
//! caught up from the start, then fed live, and a rebuild into a fresh instance beside them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{sync::Arc, time::Duration};

use factline::domain::{ExecuteOptions, ProjectionRunner, Repository};
use factline::{CheckpointStore, EventStore, InMemoryCheckpointStore, InMemoryStore};
use factline_example_orders::{
    Order, OrderCommand, OrderStatus,
    read_models::{CustomerHistory, DailyRevenue, OrderSummaries},
};

async fn run(orders: &Repository<Order>, id: &str, command: OrderCommand) {
    orders
        .execute(id, command, ExecuteOptions::new())
        .await
        .unwrap();
}

fn place(customer: &str, total_cents: u64) -> OrderCommand {
    OrderCommand::PlaceOrder {
        customer_id: customer.into(),
        total_cents,
    }
}

fn pay(amount_cents: u64) -> OrderCommand {
    OrderCommand::ReceivePayment { amount_cents }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_histories_and_revenue_follow_the_orders() {
    let store = Arc::new(InMemoryStore::new());
    let events: Arc<dyn EventStore> = store.clone();
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
    let orders = Repository::<Order>::new(Arc::clone(&events));
    run(&orders, "1", place("ada", 2_500)).await;
    run(&orders, "1", pay(1_000)).await;
    run(&orders, "1", pay(1_500)).await;
    run(&orders, "1", OrderCommand::ShipOrder).await;
    run(&orders, "2", place("bob", 900)).await;

    // Caught up from the start.
    let summaries = OrderSummaries::new("order-summaries");
    let history = CustomerHistory::new("customer-history");
    let revenue = DailyRevenue::new("daily-revenue");
    let (summary_view, history_view, revenue_view) =
        (summaries.view(), history.view(), revenue.view());
    let summaries = ProjectionRunner::new(summaries, Arc::clone(&events), Arc::clone(&checkpoints))
        .catch_up()
        .await
        .unwrap()
        .projection;
    ProjectionRunner::new(history, Arc::clone(&events), Arc::clone(&checkpoints))
        .catch_up()
        .await
        .unwrap();
    ProjectionRunner::new(revenue, Arc::clone(&events), Arc::clone(&checkpoints))
        .catch_up()
        .await
        .unwrap();
    let first = summary_view.order("1").unwrap();
    assert_eq!(first.status, OrderStatus::Shipped);
    assert_eq!((first.total_cents, first.paid_cents), (2_500, 2_500));
    assert_eq!(first.customer_id, "ada");
    assert_eq!(summary_view.order("2").unwrap().status, OrderStatus::Placed);
    let whats: Vec<&str> = history_view.of("ada").iter().map(|e| e.what).collect();
    assert_eq!(
        whats,
        [
            "OrderPlaced",
            "PaymentReceived",
            "PaymentReceived",
            "OrderShipped"
        ]
    );
    assert_eq!(history_view.of("bob").len(), 1);
    let days = revenue_view.by_day();
    assert_eq!(days.values().sum::<u64>(), 2_500);
    assert!(
        days.keys().all(|day| day.len() == 10 && &day[4..5] == "-"),
        "{days:?}"
    );

    // Live: the summary follows new events while readers query it.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = tokio::spawn(
        ProjectionRunner::new(summaries, Arc::clone(&events), Arc::clone(&checkpoints)).run_until(
            async {
                let _ = stopped.await;
            },
        ),
    );
    run(
        &orders,
        "2",
        OrderCommand::CancelOrder {
            reason: "changed my mind".into(),
        },
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while summary_view.order("2").unwrap().status != OrderStatus::Canceled {
        assert!(tokio::time::Instant::now() < deadline, "the cancel arrives");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.send(()).unwrap();
    live.await.unwrap().unwrap();

    // A rebuild under a new name builds a second model from position 0; the first one kept
    // answering meanwhile.
    let rebuilt = OrderSummaries::new("order-summaries-v2");
    let rebuilt_view = rebuilt.view();
    ProjectionRunner::new(rebuilt, Arc::clone(&events), Arc::clone(&checkpoints))
        .catch_up()
        .await
        .unwrap();
    assert_eq!(rebuilt_view.all(), summary_view.all());
}

#[tokio::test]
async fn an_event_delivered_twice_is_applied_once() {
    use factline::ReadAllOptions;
    use factline::domain::{DomainEvent as _, Projection as _};
    use factline_example_orders::OrderEvent;

    let store = Arc::new(InMemoryStore::new());
    let orders = Repository::<Order>::new(store.clone());
    run(&orders, "1", place("ada", 2_500)).await;
    run(&orders, "1", pay(1_000)).await;
    let log = store.read_all(ReadAllOptions::forwards()).await.unwrap();
    let mut summaries = OrderSummaries::new("twice");
    let view = summaries.view();
    for recorded in log.events.iter().chain(log.events.iter()) {
        let event = OrderEvent::from_recorded(recorded).unwrap();
        summaries.apply(event, recorded).await.unwrap();
    }
    assert_eq!(view.order("1").unwrap().paid_cents, 1_000);
}
