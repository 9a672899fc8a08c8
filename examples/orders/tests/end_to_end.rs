//! Place, pay and ship an order through a `Repository` over the in-memory store, then read what
//! was stored.

use std::sync::Arc;

use factline::domain::{DomainEvent, ExecuteError, ExecuteOptions, Repository};
use factline::{
    EventStore, InMemoryStore, Metadata, Position, ReadAllOptions, ReadStreamOptions, Revision,
    StreamId,
};
use factline_example_orders::{Order, OrderCommand, OrderError, OrderEvent, OrderStatus};

fn options(step: &str) -> ExecuteOptions {
    ExecuteOptions::new()
        .with_correlation_id("checkout-1")
        .with_causation_id(step)
}

#[tokio::test]
async fn place_pay_and_ship() {
    let store = InMemoryStore::new();
    let orders = Repository::<Order>::new(Arc::new(store.clone()));

    let placed = orders
        .execute(
            "42",
            OrderCommand::PlaceOrder {
                customer_id: "c-7".into(),
                total_cents: 2_500,
            },
            options("place"),
        )
        .await
        .unwrap();
    assert_eq!(placed.version, Some(Revision(0)));

    let too_early = orders
        .execute("42", OrderCommand::ShipOrder, options("ship-early"))
        .await
        .unwrap_err();
    assert!(matches!(
        too_early,
        ExecuteError::Rejected(OrderError::NotFullyPaid {
            outstanding_cents: 2_500
        })
    ));

    let paid = orders
        .execute(
            "42",
            OrderCommand::ReceivePayment {
                amount_cents: 2_500,
            },
            options("pay"),
        )
        .await
        .unwrap();
    assert_eq!(paid.version, Some(Revision(1)));
    let shipped = orders
        .execute("42", OrderCommand::ShipOrder, options("ship"))
        .await
        .unwrap();
    assert_eq!(shipped.version, Some(Revision(2)));
    assert_eq!(shipped.events, [OrderEvent::OrderShipped]);
    assert_eq!(shipped.state.status, OrderStatus::Shipped);

    // The stream holds the three events, as the repository reported them.
    let stream = StreamId::new("order-42").unwrap();
    let slice = store
        .read_stream(&stream, ReadStreamOptions::forwards())
        .await
        .unwrap();
    let types: Vec<&str> = slice.events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["OrderPlaced", "PaymentReceived", "OrderShipped"]);
    let revisions: Vec<u64> = slice.events.iter().map(|e| e.revision.value()).collect();
    assert_eq!(revisions, [0, 1, 2]);
    let reported: Vec<_> = [&placed.recorded, &paid.recorded, &shipped.recorded]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    assert_eq!(slice.events, reported);

    for (event, causation) in slice.events.iter().zip(["place", "pay", "ship"]) {
        assert_eq!(event.metadata.correlation_id(), Some("checkout-1"));
        assert_eq!(event.metadata.causation_id(), Some(causation));
        assert_eq!(event.metadata.get(Metadata::SCHEMA_VERSION), Some("1"));
        assert_eq!(event.id.get_version_num(), 7);
    }
    assert_eq!(
        slice.events[0].data_json::<serde_json::Value>().unwrap(),
        serde_json::json!({"customer_id": "c-7", "total_cents": 2500})
    );
    assert_eq!(&slice.events[2].data[..], b"null");
    let decoded: Vec<OrderEvent> = slice
        .events
        .iter()
        .map(|event| OrderEvent::from_recorded(event).unwrap())
        .collect();
    assert_eq!(
        decoded,
        [
            OrderEvent::OrderPlaced {
                customer_id: "c-7".into(),
                total_cents: 2_500
            },
            OrderEvent::PaymentReceived {
                amount_cents: 2_500
            },
            OrderEvent::OrderShipped
        ]
    );

    // $all holds the same events at positions 0..=2: the rejected command wrote nothing.
    let all = store.read_all(ReadAllOptions::forwards()).await.unwrap();
    assert!(all.is_end);
    assert_eq!(all.events, slice.events);
    let positions: Vec<Position> = all.events.iter().map(|e| e.position).collect();
    assert_eq!(positions, [Position(0), Position(1), Position(2)]);

    let loaded = orders.load("42").await.unwrap();
    assert_eq!(loaded.state, shipped.state);
    assert_eq!(loaded.version, Some(Revision(2)));
}
