//! The messaging example of README.md, kept compiling and passing. Keep the two in sync.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use factline::messaging::middleware::{CorrelationId, Retry, RetryConfig};
use factline::messaging::{
    HandlerError, InMemoryPubSub, Message, PoisonQueue, Publisher, Router, Subscriber, handler_fn,
};
use futures::StreamExt;

#[tokio::test]
async fn readme_messaging_example() -> Result<(), Box<dyn std::error::Error>> {
    let pubsub = InMemoryPubSub::default();
    let publisher = Arc::new(pubsub.publisher());

    let mut router = Router::default();
    router
        .add_middleware(CorrelationId::new())
        .add_middleware(Retry::new(
            RetryConfig::default().initial_interval(Duration::from_millis(10)),
        ))
        // Not a middleware: always applied outside the chain, after the retries gave up.
        .poison_queue(PoisonQueue::new(publisher.clone(), "orders.poisoned")?);
    router.add_handler(
        "bill-orders",
        "orders.placed",
        Arc::new(pubsub.subscriber_in_group("billing")),
        "invoices.requested",
        publisher.clone(),
        handler_fn(|order: Message| async move {
            if order.payload.is_empty() {
                return Err(HandlerError::permanent("an order without a body"));
            }
            Ok(vec![Message::new(order.payload.clone())])
        }),
    )?;
    let running = router.start().await?;

    let mut invoices = pubsub.subscriber().subscribe("invoices.requested").await?;
    let order = Message::new("order 42").with_metadata("correlation_id", "req-1");
    publisher
        .publish("orders.placed", vec![order.clone()])
        .await?;

    let invoice = invoices.next().await.unwrap()?;
    assert_eq!(invoice.correlation_id(), Some("req-1"));
    assert_eq!(
        invoice.metadata.get("causation_id"),
        Some(order.id.to_string().as_str())
    );
    invoice.ack();

    running.shutdown().await;
    Ok(())
}
