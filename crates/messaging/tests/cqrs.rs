//! CQRS over the in-memory pub/sub and the router: buses, processors, topic layouts and the
//! defined behaviour for unknown types and malformed messages.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use factline_messaging::cqrs::{
    Command, CommandBus, CommandConfig, CommandProcessor, DispatchError, Event, EventBus,
    EventConfig, EventProcessor, MessageContext, RegisterError, SendError,
};
use factline_messaging::{
    BoxHandler, Handler, HandlerContext, HandlerError, HandlerResult, InMemoryPubSub, Message,
    MessageId, MessageStream, Metadata, Middleware, PoisonQueue, Publisher, Router, RunningRouter,
    Subscriber,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PlaceOrder {
    order_id: u64,
}
impl Command for PlaceOrder {
    const NAME: &'static str = "PlaceOrder";
    fn partition_key(&self) -> Option<String> {
        Some(format!("order-{}", self.order_id))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CancelOrder {
    order_id: u64,
}
impl Command for CancelOrder {
    const NAME: &'static str = "CancelOrder";
}

/// Another Rust type with the name of `PlaceOrder`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PlaceOrderV2 {
    order_id: u64,
}
impl Command for PlaceOrderV2 {
    const NAME: &'static str = "PlaceOrder";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: u64,
}
impl Event for OrderPlaced {
    const NAME: &'static str = "OrderPlaced";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderShipped {
    order_id: u64,
}
impl Event for OrderShipped {
    const NAME: &'static str = "OrderShipped";
}

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn within<T>(future: impl Future<Output = T>) -> Result<T, Box<dyn std::error::Error>> {
    Ok(tokio::time::timeout(WAIT, future).await?)
}

/// The next message of `stream`, within [`WAIT`].
async fn next(stream: &mut MessageStream) -> Result<Message, Box<dyn std::error::Error>> {
    match within(stream.next()).await? {
        Some(Ok(message)) => Ok(message),
        Some(Err(error)) => Err(error.into()),
        None => Err("the stream ended".into()),
    }
}

/// Fails when the poison topic has (or gets within a moment) a message. Our own subscription
/// to it outlives the router, so its stream does not end.
async fn assert_nothing_poisoned(poison: &mut MessageStream) {
    let poisoned = tokio::time::timeout(Duration::from_millis(100), poison.next()).await;
    assert!(poisoned.is_err(), "poisoned: {poisoned:?}");
}

/// One consumer group per router handler name.
fn groups(pubsub: &InMemoryPubSub) -> impl FnMut(&str) -> Arc<dyn Subscriber> + '_ {
    |name| Arc::new(pubsub.subscriber_in_group(name))
}

/// Records what each handler chain returned, per message id.
#[derive(Clone, Default)]
struct Outcomes(Arc<Mutex<Vec<Seen>>>);

/// The handler, the message, and what the chain returned.
type Seen = (String, MessageId, Result<(), String>);

impl Outcomes {
    fn of(&self, id: &MessageId) -> Vec<(String, Result<(), String>)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, seen, _)| seen == id)
            .map(|(handler, _, result)| (handler.clone(), result.clone()))
            .collect()
    }
}

impl Middleware for Outcomes {
    fn name(&self) -> &'static str {
        "outcomes"
    }
    fn wrap(&self, next: BoxHandler, context: &HandlerContext) -> BoxHandler {
        Arc::new(Recording {
            next,
            handler: context.handler_name.to_string(),
            outcomes: self.clone(),
        })
    }
}

struct Recording {
    next: BoxHandler,
    handler: String,
    outcomes: Outcomes,
}

#[async_trait::async_trait]
impl Handler for Recording {
    async fn handle(&self, message: Message) -> HandlerResult {
        let id = message.id.clone();
        let result = self.next.handle(message).await;
        let seen = match &result {
            Ok(_) => Ok(()),
            Err(error) => Err(error.to_string()),
        };
        self.outcomes
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((self.handler.clone(), id, seen));
        result
    }
}

/// What the order flow's handlers saw.
struct Flow {
    commands: CommandBus,
    handled_commands: Arc<AtomicUsize>,
    command_contexts: mpsc::UnboundedReceiver<MessageContext>,
    billing: mpsc::UnboundedReceiver<(OrderPlaced, MessageContext)>,
    shipping: mpsc::UnboundedReceiver<(OrderPlaced, MessageContext)>,
    poison: MessageStream,
    running: RunningRouter,
}

/// PlaceOrder → handler publishes OrderPlaced caused by it → two event handlers.
async fn order_flow(
    pubsub: &InMemoryPubSub,
    command_config: CommandConfig,
    event_config: EventConfig,
) -> Result<Flow, Box<dyn std::error::Error>> {
    let publisher: Arc<dyn Publisher> = Arc::new(pubsub.publisher());
    let commands = CommandBus::new(publisher.clone(), command_config.clone());
    let events = EventBus::new(publisher.clone(), event_config.clone());

    let handled_commands = Arc::new(AtomicUsize::new(0));
    let (context_tx, command_contexts) = mpsc::unbounded_channel();
    let mut command_processor = CommandProcessor::new(command_config);
    {
        let events = events.clone();
        let handled = handled_commands.clone();
        command_processor.add_handler(move |command: PlaceOrder, context: MessageContext| {
            let events = events.clone();
            let handled = handled.clone();
            let context_tx = context_tx.clone();
            async move {
                handled.fetch_add(1, Ordering::SeqCst);
                let placed = OrderPlaced {
                    order_id: command.order_id,
                };
                events.publish_caused_by(&placed, &context).await?;
                let _ = context_tx.send(context);
                Ok(())
            }
        })?;
    }
    command_processor.add_handler(|_: CancelOrder, _| async { Ok(()) })?;

    let mut event_processor = EventProcessor::new(event_config);
    let (billing_tx, billing) = mpsc::unbounded_channel();
    let (shipping_tx, shipping) = mpsc::unbounded_channel();
    for (name, tx) in [("billing", billing_tx), ("shipping", shipping_tx)] {
        event_processor.add_handler(name, move |event: OrderPlaced, context| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((event, context));
                Ok(())
            }
        })?;
    }

    let mut router = Router::default();
    router.poison_queue(PoisonQueue::new(publisher, "poison")?);
    command_processor.register_into(&mut router, groups(pubsub))?;
    event_processor.register_into(&mut router, groups(pubsub))?;
    let poison = pubsub.subscriber().subscribe("poison").await?;
    let running = router.start().await?;
    Ok(Flow {
        commands,
        handled_commands,
        command_contexts,
        billing,
        shipping,
        poison,
        running,
    })
}

async fn command_is_handled_once_and_every_event_handler_sees_its_event(
    command_config: CommandConfig,
    event_config: EventConfig,
) -> TestResult {
    let pubsub = InMemoryPubSub::default();
    let mut flow = order_flow(&pubsub, command_config, event_config).await?;

    let metadata = Metadata::new().with(Metadata::CORRELATION_ID, "flow-1");
    let command_id = flow
        .commands
        .send_with(&PlaceOrder { order_id: 42 }, metadata)
        .await?;

    let context = within(flow.command_contexts.recv())
        .await?
        .ok_or("no command")?;
    assert_eq!(context.message_id, command_id);
    assert_eq!(context.correlation_id(), Some("flow-1"));
    assert_eq!(context.message_type(), Some("PlaceOrder"));
    assert_eq!(
        context.metadata.get(Metadata::PARTITION_KEY),
        Some("order-42")
    );

    let mut event_ids = Vec::new();
    for receiver in [&mut flow.billing, &mut flow.shipping] {
        let (event, context) = within(receiver.recv()).await?.ok_or("no event")?;
        assert_eq!(event, OrderPlaced { order_id: 42 });
        assert_eq!(context.correlation_id(), Some("flow-1"));
        assert_eq!(
            context.metadata.get(Metadata::CAUSATION_ID),
            Some(&*command_id.to_string())
        );
        assert_eq!(context.message_type(), Some("OrderPlaced"));
        event_ids.push(context.message_id);
    }
    assert_eq!(
        event_ids[0], event_ids[1],
        "both handlers saw the same event"
    );

    // A second command, to show the first is not redelivered and events keep flowing.
    let second = flow.commands.send(&PlaceOrder { order_id: 43 }).await?;
    let context = within(flow.command_contexts.recv())
        .await?
        .ok_or("no command")?;
    assert_eq!(context.message_id, second);
    assert_eq!(
        context.correlation_id(),
        Some(&*second.to_string()),
        "a command sent without a correlation id starts its own flow"
    );
    for receiver in [&mut flow.billing, &mut flow.shipping] {
        let (event, context) = within(receiver.recv()).await?.ok_or("no event")?;
        assert_eq!(event.order_id, 43);
        assert_eq!(context.correlation_id(), Some(&*second.to_string()));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(flow.handled_commands.load(Ordering::SeqCst), 2);
    assert!(flow.command_contexts.try_recv().is_err());
    assert!(flow.billing.try_recv().is_err());
    assert!(flow.shipping.try_recv().is_err());

    let report = within(flow.running.shutdown()).await?;
    assert!(report.close_errors.is_empty(), "{:?}", report.close_errors);
    assert_nothing_poisoned(&mut flow.poison).await;
    Ok(())
}

#[tokio::test]
async fn per_type_layout_command_then_events_with_correlation() -> TestResult {
    command_is_handled_once_and_every_event_handler_sees_its_event(
        CommandConfig::default(),
        EventConfig::default(),
    )
    .await
}

#[tokio::test]
async fn shared_layout_command_then_events_with_correlation() -> TestResult {
    command_is_handled_once_and_every_event_handler_sees_its_event(
        CommandConfig::new().shared("shop.commands"),
        EventConfig::new().shared("shop.events"),
    )
    .await
}

#[tokio::test]
async fn per_type_layout_uses_one_topic_per_type() -> TestResult {
    let pubsub = InMemoryPubSub::default();
    let mut place = pubsub.subscriber().subscribe("commands.PlaceOrder").await?;
    let mut placed = pubsub.subscriber().subscribe("app.OrderPlaced").await?;
    let publisher: Arc<dyn Publisher> = Arc::new(pubsub.publisher());
    let commands = CommandBus::new(publisher.clone(), CommandConfig::default());
    let events = EventBus::new(publisher, EventConfig::new().per_type("app"));

    let id = commands.send(&PlaceOrder { order_id: 1 }).await?;
    let message = next(&mut place).await?;
    assert_eq!(message.id, id);
    assert_eq!(
        message.metadata.get(Metadata::MESSAGE_TYPE),
        Some("PlaceOrder")
    );
    assert_eq!(
        message.metadata.get(Metadata::CONTENT_TYPE),
        Some("application/json")
    );
    assert_eq!(&message.payload[..], br#"{"order_id":1}"#);

    let id = events.publish(&OrderPlaced { order_id: 1 }).await?;
    let message = next(&mut placed).await?;
    assert_eq!(message.id, id);
    assert_eq!(message.correlation_id(), Some(&*id.to_string()));
    Ok(())
}

#[tokio::test]
async fn a_command_type_has_exactly_one_handler() -> TestResult {
    let mut processor = CommandProcessor::new(CommandConfig::default());
    processor.add_handler(|_: PlaceOrder, _| async { Ok(()) })?;
    let again = processor.add_handler(|_: PlaceOrder, _| async { Ok(()) });
    assert!(matches!(
        again,
        Err(RegisterError::DuplicateCommandHandler {
            command: "PlaceOrder"
        })
    ));
    let same_name = processor.add_handler(|_: PlaceOrderV2, _| async { Ok(()) });
    assert!(matches!(
        same_name,
        Err(RegisterError::DuplicateCommandHandler {
            command: "PlaceOrder"
        })
    ));
    processor.add_handler(|_: CancelOrder, _| async { Ok(()) })?;
    assert_eq!(
        processor.command_names().collect::<Vec<_>>(),
        ["CancelOrder", "PlaceOrder"]
    );

    let mut events = EventProcessor::new(EventConfig::default());
    events.add_handler("audit", |_: OrderPlaced, _| async { Ok(()) })?;
    events.add_handler("mail", |_: OrderPlaced, _| async { Ok(()) })?;
    let again = events.add_handler("audit", |_: OrderShipped, _| async { Ok(()) });
    assert!(
        matches!(again, Err(RegisterError::DuplicateEventHandler { ref name }) if name == "audit")
    );

    // A router handler name taken by something else is the router's error.
    let pubsub = InMemoryPubSub::default();
    let mut router = Router::default();
    router.add_consumer_handler(
        "audit",
        "elsewhere",
        Arc::new(pubsub.subscriber()),
        factline_messaging::consumer_fn(|_| async { Ok(()) }),
    )?;
    let clash = events.register_into(&mut router, groups(&pubsub));
    assert!(matches!(clash, Err(RegisterError::Router(_))), "{clash:?}");
    Ok(())
}

/// A router with `processor`-style handlers, the recording middleware and a poison queue.
struct Harness {
    pubsub: InMemoryPubSub,
    publisher: Arc<dyn Publisher>,
    poison: MessageStream,
    outcomes: Outcomes,
}

impl Harness {
    async fn new() -> Result<(Self, Router), Box<dyn std::error::Error>> {
        let pubsub = InMemoryPubSub::default();
        let publisher: Arc<dyn Publisher> = Arc::new(pubsub.publisher());
        let poison = pubsub.subscriber().subscribe("poison").await?;
        let outcomes = Outcomes::default();
        let mut router = Router::default();
        router.add_middleware(outcomes.clone());
        router.poison_queue(PoisonQueue::new(publisher.clone(), "poison")?);
        Ok((
            Self {
                pubsub,
                publisher,
                poison,
                outcomes,
            },
            router,
        ))
    }

    async fn publish(
        &self,
        topic: &str,
        message: Message,
    ) -> Result<MessageId, Box<dyn std::error::Error>> {
        let id = message.id.clone();
        self.publisher.publish(topic, vec![message]).await?;
        Ok(id)
    }

    /// The next poisoned message, checked to be permanent.
    async fn poisoned(&mut self) -> Result<Message, Box<dyn std::error::Error>> {
        let message = next(&mut self.poison).await?;
        assert_eq!(
            message.metadata.get(PoisonQueue::ERROR_KIND),
            Some("permanent"),
            "{message:?}"
        );
        Ok(message)
    }
}

fn raw(type_name: Option<&str>, payload: &'static str) -> Message {
    let message = Message::new(payload).with_metadata(Metadata::CONTENT_TYPE, "application/json");
    match type_name {
        Some(type_name) => message.with_metadata(Metadata::MESSAGE_TYPE, type_name),
        None => message,
    }
}

#[tokio::test]
async fn unknown_command_on_a_shared_topic_is_poisoned_as_permanent() -> TestResult {
    let (mut harness, mut router) = Harness::new().await?;
    let config = CommandConfig::new().shared("commands");
    let (tx, mut handled) = mpsc::unbounded_channel();
    let mut processor = CommandProcessor::new(config.clone());
    processor.add_handler(move |command: PlaceOrder, _| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(command.order_id);
            Ok(())
        }
    })?;
    processor.register_into(&mut router, groups(&harness.pubsub))?;
    let running = router.start().await?;

    let unknown = harness
        .publish("commands", raw(Some("RefundOrder"), r#"{"order_id":1}"#))
        .await?;
    let bus = CommandBus::new(harness.publisher.clone(), config);
    bus.send(&PlaceOrder { order_id: 2 }).await?;

    let poisoned = harness.poisoned().await?;
    assert_eq!(poisoned.id, unknown);
    assert_eq!(
        poisoned.metadata.get(PoisonQueue::HANDLER),
        Some("commands")
    );
    assert_eq!(poisoned.metadata.get(PoisonQueue::TOPIC), Some("commands"));
    let reason = poisoned
        .metadata
        .get(PoisonQueue::REASON)
        .unwrap_or_default();
    assert!(
        reason.contains("no handler for command type \"RefundOrder\""),
        "{reason}"
    );
    // The known command after it is handled: the unknown one did not block the topic.
    assert_eq!(within(handled.recv()).await?, Some(2));
    within(running.shutdown()).await?;
    Ok(())
}

#[tokio::test]
async fn unknown_event_on_a_shared_topic_is_acked_and_skipped() -> TestResult {
    let (mut harness, mut router) = Harness::new().await?;
    let config = EventConfig::new().shared("events");
    let (tx, mut placed) = mpsc::unbounded_channel();
    let mut processor = EventProcessor::new(config.clone());
    processor.add_handler("projector", move |event: OrderPlaced, _| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(event.order_id);
            Ok(())
        }
    })?;
    processor.register_into(&mut router, groups(&harness.pubsub))?;
    let running = router.start().await?;

    let bus = EventBus::new(harness.publisher.clone(), config);
    // Nobody here handles OrderShipped, and nobody at all handles OrderLost.
    let shipped = bus.publish(&OrderShipped { order_id: 1 }).await?;
    let lost = harness
        .publish("events", raw(Some("OrderLost"), "not even json"))
        .await?;
    bus.publish(&OrderPlaced { order_id: 2 }).await?;

    // Sequential handler: the placed event is handled after the two others were settled.
    assert_eq!(within(placed.recv()).await?, Some(2));
    assert_eq!(
        harness.outcomes.of(&shipped),
        [("projector".into(), Ok(()))]
    );
    assert_eq!(harness.outcomes.of(&lost), [("projector".into(), Ok(()))]);
    // Acked, not nacked: the group has nothing left to take and nothing to redeliver.
    let stats = harness.pubsub.topic_stats("events").ok_or("no topic")?;
    let group = stats
        .groups
        .iter()
        .find(|group| group.name.as_deref() == Some("projector"))
        .ok_or("no group")?;
    assert_eq!((group.lag_messages, group.redeliveries_waiting), (0, 0));
    within(running.shutdown()).await?;
    assert_nothing_poisoned(&mut harness.poison).await;
    assert!(placed.try_recv().is_err());
    Ok(())
}

#[tokio::test]
async fn undecodable_payloads_are_permanent_and_name_the_type() -> TestResult {
    let (mut harness, mut router) = Harness::new().await?;
    let mut commands = CommandProcessor::new(CommandConfig::default());
    commands.add_handler(|_: PlaceOrder, _| async { Ok(()) })?;
    commands.register_into(&mut router, groups(&harness.pubsub))?;
    let mut events = EventProcessor::new(EventConfig::new().shared("events"));
    events.add_handler("projector", |_: OrderPlaced, _| async { Ok(()) })?;
    events.register_into(&mut router, groups(&harness.pubsub))?;
    let running = router.start().await?;

    let bad_command = harness
        .publish(
            "commands.PlaceOrder",
            raw(Some("PlaceOrder"), r#"{"order_id":"x"}"#),
        )
        .await?;
    let poisoned = harness.poisoned().await?;
    assert_eq!(poisoned.id, bad_command);
    let reason = poisoned
        .metadata
        .get(PoisonQueue::REASON)
        .unwrap_or_default();
    assert!(reason.contains("not a valid PlaceOrder"), "{reason}");
    assert!(reason.contains("invalid type"), "serde's error: {reason}");

    let bad_event = harness
        .publish("events", raw(Some("OrderPlaced"), "{"))
        .await?;
    let poisoned = harness.poisoned().await?;
    assert_eq!(poisoned.id, bad_event);
    assert_eq!(
        poisoned.metadata.get(PoisonQueue::HANDLER),
        Some("projector")
    );
    let reason = poisoned
        .metadata
        .get(PoisonQueue::REASON)
        .unwrap_or_default();
    assert!(reason.contains("not a valid OrderPlaced"), "{reason}");
    within(running.shutdown()).await?;
    Ok(())
}

#[tokio::test]
async fn per_type_topics_refuse_missing_or_foreign_types_permanently() -> TestResult {
    let (mut harness, mut router) = Harness::new().await?;
    let mut events = EventProcessor::new(EventConfig::default());
    events.add_handler("projector", |_: OrderPlaced, _| async { Ok(()) })?;
    events.register_into(&mut router, groups(&harness.pubsub))?;
    let running = router.start().await?;

    let foreign = harness
        .publish(
            "events.OrderPlaced",
            raw(Some("OrderShipped"), r#"{"order_id":1}"#),
        )
        .await?;
    let poisoned = harness.poisoned().await?;
    assert_eq!(poisoned.id, foreign);
    let reason = poisoned
        .metadata
        .get(PoisonQueue::REASON)
        .unwrap_or_default();
    assert!(reason.contains("\"OrderShipped\""), "{reason}");
    assert!(reason.contains("carries only \"OrderPlaced\""), "{reason}");

    let untyped = harness
        .publish("events.OrderPlaced", raw(None, r#"{"order_id":1}"#))
        .await?;
    let poisoned = harness.poisoned().await?;
    assert_eq!(poisoned.id, untyped);
    let reason = poisoned
        .metadata
        .get(PoisonQueue::REASON)
        .unwrap_or_default();
    assert!(reason.contains("no message_type metadata"), "{reason}");
    within(running.shutdown()).await?;
    Ok(())
}

#[tokio::test]
async fn dispatch_errors_can_be_read_from_the_handler_error() -> TestResult {
    // Handlers' own errors pass through; the processor's are DispatchErrors.
    let (mut harness, mut router) = Harness::new().await?;
    let mut commands = CommandProcessor::new(CommandConfig::default());
    commands.add_handler(|_: PlaceOrder, _| async {
        Err(HandlerError::permanent("order 7 does not exist"))
    })?;
    let kinds = Arc::new(Mutex::new(Vec::new()));
    let seen = kinds.clone();
    router.poison_queue(
        PoisonQueue::new(harness.publisher.clone(), "poison")?.only_when(move |error| {
            let dispatch = error
                .source_error()
                .downcast_ref::<DispatchError>()
                .map(|e| matches!(e, DispatchError::Undecodable(_)));
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(dispatch);
            true
        }),
    );
    commands.register_into(&mut router, groups(&harness.pubsub))?;
    let running = router.start().await?;

    let bus = CommandBus::new(harness.publisher.clone(), CommandConfig::default());
    bus.send(&PlaceOrder { order_id: 7 }).await?;
    let poisoned = harness.poisoned().await?;
    assert!(
        poisoned
            .metadata
            .get(PoisonQueue::REASON)
            .is_some_and(|reason| reason.contains("order 7 does not exist"))
    );
    harness
        .publish("commands.PlaceOrder", raw(Some("PlaceOrder"), "[]"))
        .await?;
    harness.poisoned().await?;
    within(running.shutdown()).await?;
    assert_eq!(
        *kinds.lock().unwrap_or_else(|e| e.into_inner()),
        [None, Some(true)]
    );
    Ok(())
}

#[tokio::test]
async fn a_closed_publisher_is_a_publish_error() -> TestResult {
    let pubsub = InMemoryPubSub::default();
    let publisher = Arc::new(pubsub.publisher());
    publisher.close().await?;
    let bus = EventBus::new(publisher, EventConfig::default());
    let error = bus.publish(&OrderPlaced { order_id: 1 }).await.err();
    assert!(
        matches!(
            error,
            Some(SendError::Publish {
                ref type_name,
                ref topic,
                ..
            }) if type_name == "OrderPlaced" && topic == "events.OrderPlaced"
        ),
        "{error:?}"
    );
    // In a handler, `?` makes it a transient error (the input is redelivered).
    let handler_error = error.map(HandlerError::from);
    assert!(handler_error.is_some_and(|e| !e.is_permanent()));
    Ok(())
}

#[tokio::test]
async fn send_with_id_keeps_the_id_and_given_metadata_wins() -> TestResult {
    let pubsub = InMemoryPubSub::default();
    let mut place = pubsub.subscriber().subscribe("commands.PlaceOrder").await?;
    let bus = CommandBus::new(Arc::new(pubsub.publisher()), CommandConfig::default());
    let id = MessageId::parse("retry-me-1")?;
    let metadata = Metadata::new()
        .with(Metadata::PARTITION_KEY, "customer-9")
        .with("tenant", "acme");
    let sent = bus
        .send_with_id(&PlaceOrder { order_id: 5 }, id.clone(), metadata)
        .await?;
    assert_eq!(sent, id);
    let message = next(&mut place).await?;
    assert_eq!(message.id, id);
    assert_eq!(message.partition_key(), Some("customer-9"));
    assert_eq!(message.metadata.get("tenant"), Some("acme"));
    assert_eq!(message.correlation_id(), Some("retry-me-1"));

    // A saga: an event handler's context causes a command.
    let cause = MessageContext::for_message(&message, "commands.PlaceOrder", "h");
    bus.send_caused_by(&PlaceOrder { order_id: 6 }, &cause)
        .await?;
    let caused = next(&mut place).await?;
    assert_eq!(caused.correlation_id(), Some("retry-me-1"));
    assert_eq!(
        caused.metadata.get(Metadata::CAUSATION_ID),
        Some("retry-me-1")
    );
    assert_eq!(caused.partition_key(), Some("order-6"));
    Ok(())
}
