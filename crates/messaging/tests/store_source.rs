//! The event store as a message source: `EventStoreSubscriber` over the in-memory store.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use factline_core::{
    AllSlice, AppendError, AppendRequest, AppendResult, DeleteError, DeleteMode, EventData,
    EventFilter, EventStore, ExpectedVersion, InMemoryStore, Limits, MetadataError, Position,
    ReadAllError, ReadAllOptions, ReadStreamError, ReadStreamOptions, Revision, StorageError,
    StreamId, StreamMetadata, StreamSlice, SubscribeFrom, Subscription, SubscriptionError,
    Timestamp,
};
use factline_messaging::source::{
    Checkpoint, EventStoreSubscriber, NackPolicy, POSITION_KEY, RECORDED_AT_KEY, REVISION_KEY,
    RetryPolicy, STREAM_KEY, SourceOptions, SubscriptionEnded,
};
use factline_messaging::{
    Message, MessageId, MessageStream, Metadata, ReceiveError, SubscribeError, Subscriber,
};
use futures::StreamExt;

/// Long enough for anything that should happen (paused-time tests wait up to 10 s).
const WAIT: Duration = Duration::from_secs(30);

fn event(event_type: &str, body: &str) -> EventData {
    EventData::binary(event_type, body.to_owned())
}

async fn append(store: &impl EventStore, stream: &str, events: Vec<EventData>) -> AppendResult {
    store
        .append(
            &StreamId::new(stream).unwrap(),
            ExpectedVersion::Any,
            events,
        )
        .await
        .unwrap()
}

async fn next(stream: &mut MessageStream) -> Message {
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Ok(message))) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

async fn take(stream: &mut MessageStream, n: usize) -> Vec<Message> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next(stream).await);
    }
    out
}

/// True when the stream yields nothing for `wait`.
async fn quiet_for(stream: &mut MessageStream, wait: Duration) -> bool {
    tokio::time::timeout(wait, stream.next()).await.is_err()
}

/// The bodies of the next `n` messages, acked.
async fn take_acked(stream: &mut MessageStream, n: usize) -> Vec<String> {
    let messages = take(stream, n).await;
    messages.iter().for_each(|m| assert!(m.ack()));
    bodies(&messages)
}

fn body(message: &Message) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

fn bodies(messages: &[Message]) -> Vec<String> {
    messages.iter().map(body).collect()
}

fn position(message: &Message) -> u64 {
    message.metadata.get(POSITION_KEY).unwrap().parse().unwrap()
}

fn source(store: &InMemoryStore, options: SourceOptions) -> EventStoreSubscriber<InMemoryStore> {
    EventStoreSubscriber::with_options(store.clone(), options)
}

#[tokio::test]
async fn delivers_catch_up_then_live_in_order_with_the_mapped_metadata() {
    let store = InMemoryStore::new();
    let placed = event("OrderPlaced", "placed")
        .with_metadata(Metadata::CORRELATION_ID, "c-1")
        .with_metadata(Metadata::CAUSATION_ID, "m-0")
        // The store's own values win over same-named entries of the event's metadata.
        .with_metadata(STREAM_KEY, "forged");
    let placed_id = placed.id;
    append(&store, "order-1", vec![placed]).await;
    append(&store, "invoice-1", vec![event("InvoiceSent", "sent")]).await;
    let json = EventData::json("OrderShipped", &serde_json::json!({"n": 1})).unwrap();
    append(&store, "order-1", vec![json]).await;

    let subscriber = EventStoreSubscriber::new(store.clone());
    let (mut stream, checkpoint) = subscriber.subscribe_tracked("$all").await.unwrap();
    let caught_up = take(&mut stream, 3).await;
    assert_eq!(
        bodies(&caught_up),
        ["placed", "sent", r#"{"n":1}"#],
        "catch-up in position order"
    );

    let first = &caught_up[0];
    let recorded = store
        .read_stream(
            &StreamId::new("order-1").unwrap(),
            ReadStreamOptions::forwards(),
        )
        .await
        .unwrap()
        .events
        .remove(0);
    assert_eq!(first.id, MessageId::from_uuid(placed_id));
    assert_eq!(first.correlation_id(), Some("c-1"));
    assert_eq!(first.metadata.get(Metadata::CAUSATION_ID), Some("m-0"));
    assert_eq!(
        first.metadata.get(Metadata::MESSAGE_TYPE),
        Some("OrderPlaced")
    );
    assert_eq!(
        first.metadata.get(Metadata::CONTENT_TYPE),
        Some("application/octet-stream")
    );
    assert_eq!(first.partition_key(), Some("order-1"));
    assert_eq!(first.metadata.get(STREAM_KEY), Some("order-1"));
    assert_eq!(first.metadata.get(REVISION_KEY), Some("0"));
    assert_eq!(first.metadata.get(POSITION_KEY), Some("0"));
    let recorded_at = first.metadata.get(RECORDED_AT_KEY).unwrap();
    assert_eq!(
        Timestamp::parse_rfc3339(recorded_at).unwrap(),
        recorded.recorded_at
    );
    assert_eq!(first.metadata.len(), 9, "{:?}", first.metadata);
    assert_eq!(
        caught_up[2].metadata.get(Metadata::CONTENT_TYPE),
        Some("application/json")
    );
    assert_eq!(caught_up[2].metadata.get(REVISION_KEY), Some("1"));
    assert!(caught_up.iter().all(Message::has_delivery));
    caught_up.iter().for_each(|m| assert!(m.ack()));
    assert_eq!(
        checkpoint.checkpoint(),
        Some(Checkpoint::Position(Position(2)))
    );

    // Live: appended after the subscription caught up.
    append(&store, "order-2", vec![event("OrderPlaced", "live-1")]).await;
    append(&store, "order-2", vec![event("OrderPaid", "live-2")]).await;
    let live = take(&mut stream, 2).await;
    assert_eq!(bodies(&live), ["live-1", "live-2"]);
    assert_eq!(position(&live[1]), 4);
    live.iter().for_each(|m| assert!(m.ack()));
    assert_eq!(checkpoint.position(), Some(Position(4)));
    assert_eq!(checkpoint.unsettled(), 0);
}

#[tokio::test]
async fn category_and_event_type_topics_filter() {
    let store = InMemoryStore::new();
    append(&store, "order-1", vec![event("OrderPlaced", "o1")]).await;
    append(&store, "invoice-1", vec![event("InvoiceSent", "i1")]).await;
    append(&store, "ordering-1", vec![event("OrderingStarted", "x1")]).await;
    append(&store, "order", vec![event("OrderCounted", "o")]).await;
    append(&store, "order-2", vec![event("Shipped", "o2")]).await;

    let subscriber = EventStoreSubscriber::new(store.clone());
    let mut category = subscriber.subscribe("$ce-order").await.unwrap();
    let mut types = subscriber.subscribe("$et-Order").await.unwrap();
    assert_eq!(take_acked(&mut category, 3).await, ["o1", "o", "o2"]);
    assert_eq!(take_acked(&mut types, 3).await, ["o1", "x1", "o"]);

    append(&store, "invoice-2", vec![event("OrderMentioned", "i2")]).await;
    append(&store, "order-3", vec![event("OrderPlaced", "o3")]).await;
    assert_eq!(take_acked(&mut category, 1).await, ["o3"]);
    assert_eq!(take_acked(&mut types, 2).await, ["i2", "o3"]);
}

#[tokio::test]
async fn a_stream_topic_delivers_one_stream_with_revision_checkpoints() {
    let store = InMemoryStore::new();
    append(&store, "order-1", vec![event("A", "a0")]).await;
    append(&store, "order-2", vec![event("A", "other")]).await;
    append(&store, "order-1", vec![event("B", "a1")]).await;

    let subscriber = EventStoreSubscriber::new(store.clone());
    let (mut stream, checkpoint) = subscriber.subscribe_tracked("order-1").await.unwrap();
    let got = take(&mut stream, 2).await;
    assert_eq!(bodies(&got), ["a0", "a1"]);
    assert_eq!(got[1].metadata.get(REVISION_KEY), Some("1"));
    assert_eq!(got[1].metadata.get(POSITION_KEY), Some("2"));
    got.iter().for_each(|m| assert!(m.ack()));
    assert_eq!(
        checkpoint.checkpoint(),
        Some(Checkpoint::Revision(Revision(1)))
    );
    assert_eq!(checkpoint.position(), Some(Position(2)));

    // A stream that does not exist yet is waited for.
    let mut later = subscriber.subscribe("order-9").await.unwrap();
    append(&store, "order-9", vec![event("A", "nine")]).await;
    assert_eq!(body(&next(&mut later).await), "nine");
    append(&store, "order-1", vec![event("C", "a2")]).await;
    assert_eq!(body(&next(&mut stream).await), "a2");
}

#[tokio::test]
async fn starts_at_the_end_or_after_a_checkpoint() {
    let store = InMemoryStore::new();
    for i in 0..3 {
        append(&store, "order-1", vec![event("A", &format!("e{i}"))]).await;
    }
    append(&store, "order-2", vec![event("A", "e3")]).await;

    let end = source(&store, SourceOptions::default().start(SubscribeFrom::End));
    let (mut all, all_checkpoint) = end.subscribe_tracked("$all").await.unwrap();
    let (mut one, one_checkpoint) = end.subscribe_tracked("order-1").await.unwrap();
    assert_eq!(
        all_checkpoint.checkpoint(),
        Some(Checkpoint::Position(Position(3))),
        "End is fixed to the head at subscribe time"
    );
    assert_eq!(
        one_checkpoint.checkpoint(),
        Some(Checkpoint::Revision(Revision(2)))
    );
    assert_eq!(
        one_checkpoint.resume_from(),
        SubscribeFrom::After(Checkpoint::Revision(Revision(2)))
    );
    append(&store, "order-1", vec![event("A", "e4")]).await;
    assert_eq!(body(&next(&mut all).await), "e4");
    assert_eq!(body(&next(&mut one).await), "e4");

    let subscriber = EventStoreSubscriber::new(store.clone());
    let after_position = SubscribeFrom::After(Checkpoint::Position(Position(1)));
    let (mut all, _) = subscriber
        .subscribe_tracked_from("$all", after_position)
        .await
        .unwrap();
    assert_eq!(bodies(&take(&mut all, 3).await), ["e2", "e3", "e4"]);
    // A stream topic takes a position too: its events up to it are skipped.
    let (mut one, handle) = subscriber
        .subscribe_tracked_from("order-1", after_position)
        .await
        .unwrap();
    assert_eq!(handle.checkpoint(), None);
    assert_eq!(handle.resume_from(), after_position);
    assert_eq!(bodies(&take(&mut one, 2).await), ["e2", "e4"]);
    let after_revision = SubscribeFrom::After(Checkpoint::Revision(Revision(0)));
    let (mut one, _) = subscriber
        .subscribe_tracked_from("order-1", after_revision)
        .await
        .unwrap();
    assert_eq!(bodies(&take(&mut one, 3).await), ["e1", "e2", "e4"]);
    // A revision means nothing to $all.
    assert!(matches!(
        subscriber
            .subscribe_tracked_from("$ce-order", after_revision)
            .await,
        Err(SubscribeError::InvalidTopic(_))
    ));
}

#[tokio::test]
async fn a_nack_redelivers_from_the_refused_event_in_order() {
    let store = InMemoryStore::new();
    for i in 0..5 {
        append(&store, "order-1", vec![event("A", &format!("e{i}"))]).await;
    }
    let subscriber = EventStoreSubscriber::new(store.clone());
    let (mut stream, checkpoint) = subscriber.subscribe_tracked("$ce-order").await.unwrap();
    let first = take(&mut stream, 3).await;
    assert!(first[0].ack());
    assert!(first[1].nack());
    // e1 and everything after it come again, in order: e2 although it is still unsettled.
    let again = take(&mut stream, 4).await;
    assert_eq!(bodies(&again), ["e1", "e2", "e3", "e4"]);
    assert!(again[0].same_content(&first[1]));
    // The superseded delivery of e2 only frees its slot; it does not move the checkpoint.
    assert!(first[2].ack());
    assert_eq!(
        checkpoint.checkpoint(),
        Some(Checkpoint::Position(Position(0)))
    );
    again.iter().for_each(|m| assert!(m.ack()));
    assert_eq!(
        checkpoint.checkpoint(),
        Some(Checkpoint::Position(Position(4)))
    );
    assert_eq!(checkpoint.unsettled(), 0);
    // Nothing is delivered a third time.
    assert!(quiet_for(&mut stream, Duration::from_millis(50)).await);

    // Also on a stream topic, where the rewind goes by revision.
    let (mut one, _) = subscriber.subscribe_tracked("order-1").await.unwrap();
    let got = take(&mut one, 5).await;
    assert!(got[3].nack());
    got[..3].iter().for_each(|m| assert!(m.ack()));
    assert_eq!(bodies(&take(&mut one, 2).await), ["e3", "e4"]);
}

#[tokio::test(start_paused = true)]
async fn a_nack_delay_is_waited_before_redelivering() {
    let store = InMemoryStore::new();
    append(&store, "order-1", vec![event("A", "e0"), event("A", "e1")]).await;
    let subscriber = EventStoreSubscriber::new(store.clone());
    let mut stream = subscriber.subscribe("$all").await.unwrap();
    let first = next(&mut stream).await;
    let nacked_at = tokio::time::Instant::now();
    assert!(first.nack_with_delay(Duration::from_secs(3)));
    let again = next(&mut stream).await;
    assert!(again.same_content(&first));
    assert!(nacked_at.elapsed() >= Duration::from_secs(3));
    assert!(again.ack());
    assert_eq!(body(&next(&mut stream).await), "e1");

    // The policy's default delay applies to drops and delay-less nacks; the cap to long ones.
    let policy = NackPolicy::default()
        .default_delay(Duration::from_secs(2))
        .delay_max(Duration::from_secs(10));
    let subscriber = source(&store, SourceOptions::default().nack(policy));
    let mut stream = subscriber.subscribe("$all").await.unwrap();
    let dropped_at = tokio::time::Instant::now();
    drop(next(&mut stream).await);
    let again = next(&mut stream).await;
    assert_eq!(body(&again), "e0");
    assert!(dropped_at.elapsed() >= Duration::from_secs(2));
    let nacked_at = tokio::time::Instant::now();
    assert!(again.nack_with_delay(Duration::from_secs(3_600)));
    let capped = next(&mut stream).await;
    assert_eq!(body(&capped), "e0");
    let waited = nacked_at.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "{waited:?}"
    );
}

#[tokio::test]
async fn dropping_an_unsettled_message_redelivers_it() {
    let store = InMemoryStore::new();
    append(&store, "order-1", vec![event("A", "e0"), event("A", "e1")]).await;
    let subscriber = EventStoreSubscriber::new(store.clone());
    let (mut stream, checkpoint) = subscriber.subscribe_tracked("$all").await.unwrap();
    let first = next(&mut stream).await;
    let id = first.id.clone();
    drop(first);
    let again = next(&mut stream).await;
    assert_eq!(again.id, id);
    assert!(again.ack());
    assert_eq!(body(&next(&mut stream).await), "e1");
    assert_eq!(
        checkpoint.checkpoint(),
        Some(Checkpoint::Position(Position(0)))
    );
}

#[tokio::test(start_paused = true)]
async fn in_flight_max_bounds_unsettled_deliveries() {
    let store = InMemoryStore::new();
    for i in 0..4 {
        append(&store, "order-1", vec![event("A", &format!("e{i}"))]).await;
    }
    let subscriber = source(&store, SourceOptions::default().in_flight_max(2));
    let (mut stream, checkpoint) = subscriber.subscribe_tracked("$all").await.unwrap();
    let got = take(&mut stream, 2).await;
    assert_eq!(checkpoint.unsettled(), 2);
    assert!(quiet_for(&mut stream, Duration::from_secs(60)).await);
    // Any settlement frees a slot, an out-of-order ack too.
    assert!(got[1].ack());
    let third = next(&mut stream).await;
    assert_eq!(body(&third), "e2");
    assert!(quiet_for(&mut stream, Duration::from_secs(60)).await);
    assert_eq!(checkpoint.checkpoint(), None);

    // A slot freed while the stream waits wakes it.
    let waiter = tokio::spawn(async move {
        let message = next(&mut stream).await;
        (body(&message), stream)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(got[0].ack());
    let (fourth, _stream) = waiter.await.unwrap();
    assert_eq!(fourth, "e3");
    assert_eq!(
        checkpoint.checkpoint(),
        Some(Checkpoint::Position(Position(1)))
    );
}

#[tokio::test]
async fn the_checkpoint_advances_only_over_contiguous_acks() {
    let store = InMemoryStore::new();
    for i in 0..5 {
        append(&store, "order-1", vec![event("A", &format!("e{i}"))]).await;
    }
    let subscriber = EventStoreSubscriber::new(store.clone());
    let (mut stream, checkpoint) = subscriber.subscribe_tracked("$all").await.unwrap();
    let mut watch = checkpoint.watch();
    let got = take(&mut stream, 4).await;
    assert!(got[2].ack());
    assert!(got[1].ack());
    assert_eq!(checkpoint.checkpoint(), None);
    assert_eq!(checkpoint.resume_from(), SubscribeFrom::Start);
    assert!(got[0].ack());
    watch.changed().await.unwrap();
    assert_eq!(
        *watch.borrow_and_update(),
        Some(Checkpoint::Position(Position(2)))
    );
    assert_eq!(
        checkpoint.resume_from(),
        SubscribeFrom::After(Checkpoint::Position(Position(2)))
    );

    // Resuming from the checkpoint redelivers exactly what was not acked contiguously.
    drop(stream);
    drop(got);
    let (mut resumed, _) = subscriber
        .subscribe_tracked_from("$all", checkpoint.resume_from())
        .await
        .unwrap();
    assert_eq!(bodies(&take(&mut resumed, 2).await), ["e3", "e4"]);
}

#[tokio::test]
async fn close_ends_every_stream_and_refuses_subscribes() {
    let store = InMemoryStore::new();
    append(&store, "order-1", vec![event("A", "e0")]).await;
    let subscriber = EventStoreSubscriber::new(store.clone());
    let mut idle = subscriber.subscribe("$all").await.unwrap();
    let clone = subscriber.clone();
    let mut other = subscriber.clone().subscribe("order-1").await.unwrap();
    let held = next(&mut idle).await;
    let waiting = tokio::spawn(async move { idle.next().await.is_none() });
    tokio::task::yield_now().await;

    Subscriber::close(&subscriber).await.unwrap();
    assert!(tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap());
    assert!(other.next().await.is_none());
    assert!(subscriber.is_closed());
    assert!(matches!(
        subscriber.subscribe("$all").await,
        Err(SubscribeError::Closed)
    ));
    assert!(matches!(
        clone.subscribe_tracked("$all").await,
        Err(SubscribeError::Closed)
    ));
    // Messages held past the close can still be settled.
    assert!(held.ack());
    Subscriber::close(&subscriber).await.unwrap();
}

#[tokio::test]
async fn invalid_topics_are_refused() {
    let subscriber = EventStoreSubscriber::new(InMemoryStore::new());
    for topic in ["", "$ce-", "$ce-order-1", "$et-", "$stats", "order\n1"] {
        let refused = subscriber.subscribe(topic).await;
        assert!(
            matches!(refused, Err(SubscribeError::InvalidTopic(_))),
            "{topic:?}: {refused:?}"
        );
    }
    let long = "x".repeat(256);
    assert!(matches!(
        subscriber.subscribe(&long).await,
        Err(SubscribeError::InvalidTopic(_))
    ));
}

#[tokio::test]
async fn a_tombstoned_stream_ends_its_subscription_with_the_error() {
    let store = InMemoryStore::new();
    append(&store, "order-1", vec![event("A", "e0")]).await;
    let subscriber = EventStoreSubscriber::new(store.clone());
    let mut stream = subscriber.subscribe("order-1").await.unwrap();
    assert!(next(&mut stream).await.ack());
    store
        .delete_stream(
            &StreamId::new("order-1").unwrap(),
            ExpectedVersion::Any,
            DeleteMode::Tombstone,
        )
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
        Some(Err(ReceiveError::Transport(error))) => assert!(matches!(
            error.downcast_ref::<SubscriptionError>(),
            Some(SubscriptionError::Deleted { .. })
        )),
        other => panic!("expected the deletion, got {other:?}"),
    }
    assert!(stream.next().await.is_none());
    // Subscribing to it now fails at once, from the start or from the end.
    for start in [SubscribeFrom::Start, SubscribeFrom::End] {
        let refused = source(&store, SourceOptions::default().start(start))
            .subscribe("order-1")
            .await;
        assert!(
            matches!(refused, Err(SubscribeError::Transport(_))),
            "{refused:?}"
        );
    }
}

/// What the next `subscribe_to_all` of a [`Flaky`] store does.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Refuse the subscribe with a backend error.
    Refuse,
    /// Deliver this many events, then fail with a backend error.
    FailAfter(usize),
    /// Deliver this many events, then end without an error.
    EndAfter(usize),
}

/// The in-memory store, with `$all` subscriptions that fail as planned.
#[derive(Debug, Default)]
struct Flaky {
    inner: InMemoryStore,
    plans: Mutex<VecDeque<Plan>>,
    opened: Mutex<Vec<SubscribeFrom<Position>>>,
}

fn injected() -> StorageError {
    StorageError::backend(std::io::Error::other("injected"))
}

#[async_trait]
impl EventStore for Flaky {
    fn limits(&self) -> &Limits {
        self.inner.limits()
    }
    async fn append_multi(
        &self,
        requests: Vec<AppendRequest>,
    ) -> Result<Vec<AppendResult>, AppendError> {
        self.inner.append_multi(requests).await
    }
    async fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadStreamOptions,
    ) -> Result<StreamSlice, ReadStreamError> {
        self.inner.read_stream(stream, options).await
    }
    async fn read_all(&self, options: ReadAllOptions) -> Result<AllSlice, ReadAllError> {
        self.inner.read_all(options).await
    }
    async fn head_position(&self) -> Result<Option<Position>, StorageError> {
        self.inner.head_position().await
    }
    async fn subscribe_to_stream(
        &self,
        stream: &StreamId,
        from: SubscribeFrom<Revision>,
    ) -> Result<Subscription, factline_core::SubscribeError> {
        self.inner.subscribe_to_stream(stream, from).await
    }
    async fn subscribe_to_all(
        &self,
        from: SubscribeFrom<Position>,
        filter: EventFilter,
    ) -> Result<Subscription, factline_core::SubscribeError> {
        self.opened.lock().unwrap().push(from);
        let plan = self.plans.lock().unwrap().pop_front();
        let inner = self.inner.subscribe_to_all(from, filter).await?;
        Ok(match plan {
            None => inner,
            Some(Plan::Refuse) => return Err(injected().into()),
            Some(Plan::FailAfter(n)) => {
                Subscription::new(inner.take(n).chain(futures::stream::once(async {
                    Err(SubscriptionError::Storage(injected()))
                })))
            }
            Some(Plan::EndAfter(n)) => Subscription::new(inner.take(n)),
        })
    }
    async fn stream_metadata(&self, stream: &StreamId) -> Result<StreamMetadata, MetadataError> {
        self.inner.stream_metadata(stream).await
    }
    async fn set_stream_metadata(
        &self,
        stream: &StreamId,
        metadata: StreamMetadata,
    ) -> Result<(), MetadataError> {
        self.inner.set_stream_metadata(stream, metadata).await
    }
    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<(), DeleteError> {
        self.inner.delete_stream(stream, expected, mode).await
    }
}

async fn transport_error(stream: &mut MessageStream) -> Box<dyn std::error::Error + Send + Sync> {
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Err(ReceiveError::Transport(error)))) => error,
        other => panic!("expected a transport error, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn store_errors_surface_and_retries_resume_without_gap_or_duplicate() {
    let store = Arc::new(Flaky::default());
    for i in 0..6 {
        append(&*store, "order-1", vec![event("A", &format!("e{i}"))]).await;
    }
    store.plans.lock().unwrap().extend([
        Plan::FailAfter(2),
        Plan::Refuse,
        Plan::EndAfter(1),
        Plan::FailAfter(0),
    ]);
    let shared: Arc<dyn EventStore> = store.clone();
    let subscriber = EventStoreSubscriber::from_arc(shared, SourceOptions::default());
    let mut stream = subscriber.subscribe("$all").await.unwrap();
    let mut seen = Vec::new();
    for m in take(&mut stream, 2).await {
        seen.push(body(&m));
        m.ack();
    }
    let started = tokio::time::Instant::now();
    let error = transport_error(&mut stream).await;
    assert!(
        error.downcast_ref::<SubscriptionError>().is_some(),
        "{error}"
    );
    let error = transport_error(&mut stream).await;
    assert!(
        error
            .downcast_ref::<factline_core::SubscribeError>()
            .is_some(),
        "{error}"
    );
    let m = next(&mut stream).await;
    seen.push(body(&m));
    m.ack();
    let error = transport_error(&mut stream).await;
    assert!(
        error.downcast_ref::<SubscriptionEnded>().is_some(),
        "{error}"
    );
    let error = transport_error(&mut stream).await;
    assert!(
        error.downcast_ref::<SubscriptionError>().is_some(),
        "{error}"
    );
    for m in take(&mut stream, 3).await {
        seen.push(body(&m));
        m.ack();
    }
    assert_eq!(seen, ["e0", "e1", "e2", "e3", "e4", "e5"]);
    // Backoff: 100 ms, 200 ms (consecutive), then 100 ms and 200 ms again after an event.
    assert!(started.elapsed() >= Duration::from_millis(600));
    let opened = store.opened.lock().unwrap().clone();
    assert_eq!(
        opened,
        [
            SubscribeFrom::Start,
            SubscribeFrom::After(Position(1)),
            SubscribeFrom::After(Position(1)),
            SubscribeFrom::After(Position(2)),
            SubscribeFrom::After(Position(2)),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn retries_max_ends_the_stream() {
    let store = Arc::new(Flaky::default());
    append(&*store, "order-1", vec![event("A", "e0")]).await;
    store
        .plans
        .lock()
        .unwrap()
        .extend([Plan::FailAfter(0), Plan::Refuse, Plan::Refuse]);
    let options = SourceOptions::default().retry(RetryPolicy::default().retries_max(Some(1)));
    let subscriber = EventStoreSubscriber::from_arc(store.clone(), options);
    let mut stream = subscriber.subscribe("$all").await.unwrap();
    transport_error(&mut stream).await;
    transport_error(&mut stream).await;
    assert!(stream.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_while_subscribed_arrive_live_with_out_of_order_acks() {
    let store = InMemoryStore::new();
    let subscriber = source(&store, SourceOptions::default().in_flight_max(8));
    let (mut stream, checkpoint) = subscriber.subscribe_tracked("$ce-order").await.unwrap();
    const EVENTS: usize = 300;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut last = None;
            for i in 0..EVENTS {
                // Interleave another category the topic must not see.
                append(&store, "invoice-1", vec![event("InvoiceSent", "noise")]).await;
                let stream = format!("order-{}", i % 7);
                let written = append(&store, &stream, vec![event("A", &format!("{i}"))]).await;
                last = Some(written.position);
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            last.unwrap()
        })
    };
    let mut received = Vec::new();
    let mut redelivered = 0;
    let mut handlers = Vec::new();
    while received.len() < EVENTS {
        let message = next(&mut stream).await;
        assert!(checkpoint.unsettled() <= 8, "in_flight_max holds");
        let n: usize = body(&message).parse().unwrap();
        if n < received.len() {
            // A redelivery after the refusal below: the same events again, in order.
            redelivered += 1;
        } else {
            assert_eq!(n, received.len(), "in order, without gaps");
            received.push(n);
        }
        if n == 100 && redelivered == 0 {
            assert!(message.nack());
            continue;
        }
        // Handlers finish out of order.
        let delay = Duration::from_micros((n as u64 * 7_919) % 2_000);
        handlers.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            assert!(message.ack());
        }));
    }
    let last = writer.await.unwrap();
    for handler in handlers {
        handler.await.unwrap();
    }
    assert!(redelivered >= 1);
    assert_eq!(checkpoint.checkpoint(), Some(Checkpoint::Position(last)));
    assert_eq!(checkpoint.unsettled(), 0);
}
