//! A short demo of the orders example on the in-memory store. `rebuild [ORDERS]` instead
//! rebuilds the order summaries over that many orders (default 20,000) with a progress bar.
#![allow(clippy::print_stdout)]

use std::{error::Error, sync::Arc};

use factline::domain::{
    DomainEvent, ExecuteError, ExecuteOptions, ProjectionRunner, Repository, stream_id_for,
};
use factline::{
    CheckpointStore, EventStore, ExpectedVersion, InMemoryCheckpointStore, InMemoryStore,
    ReadStreamOptions,
};
use factline_example_orders::{
    Order, OrderCommand, OrderEvent, format_cents, read_models::OrderSummaries,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some("rebuild") {
        let orders = match args.next() {
            Some(n) => n
                .parse()
                .map_err(|_| format!("rebuild takes a number of orders, not {n:?}"))?,
            None => 20_000,
        };
        return rebuild(orders).await;
    }
    let store = InMemoryStore::new();
    let orders = Repository::<Order>::new(Arc::new(store.clone()));
    let order_id = "42";

    println!("order {order_id}, on an in-memory event store:");
    let steps = [
        (
            "place for 25.00",
            OrderCommand::PlaceOrder {
                customer_id: "c-7".into(),
                total_cents: 2_500,
            },
        ),
        ("ship", OrderCommand::ShipOrder),
        (
            "pay 10.00",
            OrderCommand::ReceivePayment {
                amount_cents: 1_000,
            },
        ),
        (
            "pay 20.00",
            OrderCommand::ReceivePayment {
                amount_cents: 2_000,
            },
        ),
        (
            "pay 15.00",
            OrderCommand::ReceivePayment {
                amount_cents: 1_500,
            },
        ),
        ("ship", OrderCommand::ShipOrder),
        (
            "cancel",
            OrderCommand::CancelOrder {
                reason: "changed my mind".into(),
            },
        ),
    ];
    for (label, command) in steps {
        let options = ExecuteOptions::new().with_correlation_id("demo-checkout");
        match orders.execute(order_id, command, options).await {
            Ok(executed) => {
                for recorded in &executed.recorded {
                    println!(
                        "  {label:<16} -> {} (revision {})",
                        recorded.event_type, recorded.revision
                    );
                }
            }
            Err(ExecuteError::Rejected(reason)) => {
                println!("  {label:<16} -> rejected: {reason}");
            }
            Err(other) => return Err(other.into()),
        }
    }

    let stream = stream_id_for::<Order>(order_id)?;
    println!("stream {stream}:");
    let slice = store
        .read_stream(&stream, ReadStreamOptions::forwards())
        .await?;
    for event in &slice.events {
        println!(
            "  {} {:<15} {}",
            event.revision,
            event.event_type,
            String::from_utf8_lossy(&event.data)
        );
    }

    let order = orders.load(order_id).await?.state;
    println!(
        "final state: {:?}, paid {} of {}",
        order.status,
        format_cents(order.paid_cents),
        format_cents(order.total_cents)
    );
    Ok(())
}

/// Stores `orders` placed-and-paid orders, then rebuilds the order summaries into a fresh
/// instance from position 0, with a progress bar fed by the runner.
async fn rebuild(orders: u64) -> Result<(), Box<dyn Error>> {
    let store = Arc::new(InMemoryStore::new());
    for n in 0..orders {
        let events = [
            OrderEvent::OrderPlaced {
                customer_id: format!("c-{}", n % 100),
                total_cents: 1_000 + n % 9_000,
            },
            OrderEvent::PaymentReceived {
                amount_cents: 1_000 + n % 9_000,
            },
        ]
        .iter()
        .map(|event| event.to_event_data(Default::default()))
        .collect::<Result<Vec<_>, _>>()?;
        let stream = stream_id_for::<Order>(&n.to_string())?;
        store
            .append(&stream, ExpectedVersion::NoStream, events)
            .await?;
    }
    let head = store.head_position().await?.map_or(0, |p| p.value() + 1);
    println!("rebuilding the order summaries over {orders} orders ({head} events):");
    let bar = indicatif::ProgressBar::new(head);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    let projection = OrderSummaries::new("order-summaries-rebuild");
    let view = projection.view();
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
    let shown = bar.clone();
    let stopped = ProjectionRunner::new(projection, store, checkpoints)
        .on_progress(move |progress| shown.set_position(progress.position.value() + 1))
        .catch_up()
        .await?;
    bar.finish();
    println!(
        "done at position {}: {} orders summarized",
        stopped.position.map_or(0, |p| p.value()),
        view.all().len()
    );
    Ok(())
}
