//! A short demo of the orders example on the in-memory store.
#![allow(clippy::print_stdout)]

use std::{error::Error, sync::Arc};

use factline::domain::{ExecuteError, ExecuteOptions, Repository, stream_id_for};
use factline::{EventStore, InMemoryStore, ReadStreamOptions};
use factline_example_orders::{Order, OrderCommand, format_cents};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
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
