//! The router's behaviour, end to end over the in-memory pub/sub.
//!
//! Every wait has a timeout (a broken router fails a test, it never hangs one), and timing
//! assertions are lower bounds or generous upper bounds: the machine may be busy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use factline_messaging::{
    Acknowledger, BatchConfig, BoxHandler, CloseError, Concurrency, Handler, HandlerContext,
    HandlerError, HandlerResult, InMemoryConfig, InMemoryPubSub, InMemorySubscriber, Message,
    MessageId, MessageStream, Metadata, Middleware, Outcome, Plugin, PoisonQueue, PublishError,
    Publisher, ReceiveError, Router, RouterConfig, RouterError, RouterHandle, RunningRouter,
    SubscribeError, Subscriber, batch_handler_fn, consumer_fn, handler_fn,
};
use futures::StreamExt;
use tokio::sync::Notify;

/// Longest any single wait may take before the test fails (never reached when things work).
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Test support
// ---------------------------------------------------------------------------------------------

/// Every settlement of every delivery a [`Recording`] subscriber handed out, in order; and how
/// its streams were used.
#[derive(Clone, Default)]
struct Outcomes {
    settled: Arc<Mutex<Vec<(MessageId, Outcome)>>>,
    delivered: Arc<AtomicUsize>,
    /// Polls of a stream after it had ended: a breach of the `Stream` contract (the in-memory
    /// stream panics on it).
    polled_after_end: Arc<AtomicUsize>,
}

impl Outcomes {
    fn push(&self, id: MessageId, outcome: Outcome) {
        self.settled.lock().unwrap().push((id, outcome));
    }

    fn all(&self) -> Vec<(MessageId, Outcome)> {
        self.settled.lock().unwrap().clone()
    }

    fn delivered(&self) -> usize {
        self.delivered.load(Ordering::SeqCst)
    }

    fn polled_after_end(&self) -> usize {
        self.polled_after_end.load(Ordering::SeqCst)
    }

    /// The outcomes of the deliveries of `id`, in order.
    fn of(&self, id: &MessageId) -> Vec<Outcome> {
        self.all()
            .into_iter()
            .filter(|(seen, _)| seen == id)
            .map(|(_, outcome)| outcome)
            .collect()
    }

    fn acked(&self) -> HashSet<MessageId> {
        self.all()
            .into_iter()
            .filter(|(_, outcome)| *outcome == Outcome::Acked)
            .map(|(id, _)| id)
            .collect()
    }

    fn count(&self, predicate: impl Fn(&Outcome) -> bool) -> usize {
        self.all().iter().filter(|(_, o)| predicate(o)).count()
    }
}

/// Forwards the settlement of the delivery it is attached to onto the original delivery,
/// recording it first. Holds only the original message: when the router drops the delivery
/// unsettled, the original is dropped unsettled too (and redelivered by the broker).
struct Forward {
    id: MessageId,
    original: Mutex<Option<Message>>,
    outcomes: Outcomes,
}

impl Acknowledger for Forward {
    fn settled(&self, outcome: Outcome) {
        self.outcomes.push(self.id.clone(), outcome);
        let Some(original) = self.original.lock().unwrap().take() else {
            return;
        };
        match outcome {
            Outcome::Acked => {
                original.ack();
            }
            Outcome::Nacked { delay: Some(delay) } => {
                original.nack_with_delay(delay);
            }
            Outcome::Nacked { delay: None } => {
                original.nack();
            }
            _ => drop(original),
        }
    }
}

/// A subscriber that records the outcome of every message it delivers.
struct Recording {
    inner: Arc<dyn Subscriber>,
    outcomes: Outcomes,
}

#[async_trait]
impl Subscriber for Recording {
    async fn subscribe(&self, topic: &str) -> Result<MessageStream, SubscribeError> {
        let outcomes = self.outcomes.clone();
        let stream = Strict {
            inner: self.inner.subscribe(topic).await?,
            ended: false,
            polled_after_end: outcomes.polled_after_end.clone(),
        };
        Ok(MessageStream::new(stream.map(move |item| {
            item.map(|message| {
                outcomes.delivered.fetch_add(1, Ordering::SeqCst);
                let id = message.id.clone();
                message.detached().delivered(Forward {
                    id,
                    original: Mutex::new(Some(message)),
                    outcomes: outcomes.clone(),
                })
            })
        })))
    }

    async fn close(&self) -> Result<(), CloseError> {
        self.inner.close().await
    }
}

/// A stream that counts polls after its end instead of passing them on.
struct Strict {
    inner: MessageStream,
    ended: bool,
    polled_after_end: Arc<AtomicUsize>,
}

impl futures::Stream for Strict {
    type Item = Result<Message, ReceiveError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            self.polled_after_end.fetch_add(1, Ordering::SeqCst);
            return Poll::Ready(None);
        }
        let next = self.inner.poll_next_unpin(cx);
        if matches!(next, Poll::Ready(None)) {
            self.ended = true;
        }
        next
    }
}

fn recording(subscriber: InMemorySubscriber) -> (Arc<dyn Subscriber>, Outcomes) {
    let outcomes = Outcomes::default();
    let subscriber = Arc::new(Recording {
        inner: Arc::new(subscriber),
        outcomes: outcomes.clone(),
    });
    (subscriber, outcomes)
}

/// A publisher that fails its first `failures` publishes, then publishes through `inner`
/// (or fails forever without one).
struct FlakyPublisher {
    inner: Option<Arc<dyn Publisher>>,
    failures_left: AtomicUsize,
    calls: AtomicUsize,
}

impl FlakyPublisher {
    fn failing_first(failures: usize, inner: impl Publisher) -> Arc<Self> {
        Arc::new(Self {
            inner: Some(Arc::new(inner)),
            failures_left: AtomicUsize::new(failures),
            calls: AtomicUsize::new(0),
        })
    }

    fn always_failing() -> Arc<Self> {
        Arc::new(Self {
            inner: None,
            failures_left: AtomicUsize::new(usize::MAX),
            calls: AtomicUsize::new(0),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Publisher for FlakyPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<(), PublishError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let failed = self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        match &self.inner {
            Some(inner) if !failed => inner.publish(topic, messages).await,
            _ => Err(PublishError::Transport("the broker is down".into())),
        }
    }

    async fn close(&self) -> Result<(), CloseError> {
        Ok(())
    }
}

/// A subscriber whose subscribe always fails.
struct RefusingSubscriber;

#[async_trait]
impl Subscriber for RefusingSubscriber {
    async fn subscribe(&self, _topic: &str) -> Result<MessageStream, SubscribeError> {
        Err(SubscribeError::Transport("connection refused".into()))
    }

    async fn close(&self) -> Result<(), CloseError> {
        Ok(())
    }
}

/// Middleware that records entering and leaving, as `>name` and `<name`.
struct Trace {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
}

struct TraceHandler {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
    next: BoxHandler,
}

impl Middleware for Trace {
    fn name(&self) -> &'static str {
        "trace"
    }

    fn wrap(&self, next: BoxHandler, _context: &HandlerContext) -> BoxHandler {
        Arc::new(TraceHandler {
            name: self.name,
            log: self.log.clone(),
            next,
        })
    }
}

#[async_trait]
impl Handler for TraceHandler {
    async fn handle(&self, message: Message) -> HandlerResult {
        self.log.lock().unwrap().push(format!(">{}", self.name));
        let result = self.next.handle(message).await;
        self.log.lock().unwrap().push(format!("<{}", self.name));
        result
    }
}

/// A minimal retry: calls the next handler up to `attempts` times while it fails.
struct Retry {
    attempts: usize,
}

struct RetryHandler {
    attempts: usize,
    next: BoxHandler,
}

impl Middleware for Retry {
    fn name(&self) -> &'static str {
        "retry"
    }

    fn wrap(&self, next: BoxHandler, _context: &HandlerContext) -> BoxHandler {
        Arc::new(RetryHandler {
            attempts: self.attempts,
            next,
        })
    }
}

#[async_trait]
impl Handler for RetryHandler {
    async fn handle(&self, message: Message) -> HandlerResult {
        let mut attempt = 1;
        loop {
            match self.next.handle(message.clone()).await {
                Ok(outputs) => return Ok(outputs),
                Err(error) if attempt >= self.attempts => return Err(error),
                Err(_) => attempt += 1,
            }
        }
    }
}

/// Polls `condition` until it holds; fails the test after [`WAIT`].
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Awaits `future`, failing the test after [`WAIT`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The next message of `stream`, acked (so that it is not delivered again); fails the test
/// after [`WAIT`].
async fn next(stream: &mut MessageStream) -> Message {
    let message = within("a message", stream.next())
        .await
        .expect("the stream ended")
        .expect("the stream failed");
    message.ack();
    message
}

/// Asserts that `stream` yields nothing for a short while.
async fn assert_quiet(stream: &mut MessageStream) {
    let more = tokio::time::timeout(Duration::from_millis(100), stream.next()).await;
    assert!(more.is_err(), "unexpected message: {more:?}");
}

fn text(message: &Message) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

fn messages(prefix: &str, count: usize) -> Vec<Message> {
    (0..count)
        .map(|i| Message::new(format!("{prefix}{i}")))
        .collect()
}

async fn publish(pubsub: &InMemoryPubSub, topic: &str, messages: Vec<Message>) {
    within("a publish", pubsub.publisher().publish(topic, messages))
        .await
        .unwrap();
}

async fn stop(running: RunningRouter) {
    let report = within("the router to shut down", running.shutdown()).await;
    assert_eq!(report.aborted_tasks, 0, "{report:?}");
    assert!(report.close_errors.is_empty(), "{report:?}");
}

/// Calls of a handler, by message payload.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<String>>>);

impl Calls {
    fn record(&self, message: &Message) {
        self.0.lock().unwrap().push(text(message));
    }
    fn of(&self, payload: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == payload)
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Handlers publish their outputs and ack their inputs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_publishes_its_outputs_and_acks_its_input() {
    let pubsub = InMemoryPubSub::default();
    let mut outputs = pubsub.subscriber().subscribe("b").await.unwrap();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let mut router = Router::default();
    router
        .add_handler(
            "double",
            "a",
            subscriber,
            "b",
            Arc::new(pubsub.publisher()),
            handler_fn(|message: Message| async move {
                let text = text(&message);
                Ok(vec![
                    Message::new(format!("{text}-1")).with_metadata("source", message.id.to_text()),
                    Message::new(format!("{text}-2")),
                ])
            }),
        )
        .unwrap();
    let running = router.start().await.unwrap();
    let inputs = messages("m", 3);
    let ids: Vec<MessageId> = inputs.iter().map(|m| m.id.clone()).collect();
    publish(&pubsub, "a", inputs).await;

    let mut got = Vec::new();
    for _ in 0..6 {
        let message = next(&mut outputs).await;
        got.push((
            text(&message),
            message.metadata.get("source").map(str::to_owned),
        ));
    }
    assert_eq!(
        got,
        [
            ("m0-1".to_owned(), Some(ids[0].to_text())),
            ("m0-2".to_owned(), None),
            ("m1-1".to_owned(), Some(ids[1].to_text())),
            ("m1-2".to_owned(), None),
            ("m2-1".to_owned(), Some(ids[2].to_text())),
            ("m2-2".to_owned(), None),
        ]
    );
    eventually("every input acked", || outcomes.acked().len() == 3).await;
    for id in &ids {
        assert_eq!(outcomes.of(id), [Outcome::Acked]);
    }
    let stats = pubsub.topic_stats("a").unwrap();
    assert_eq!(stats.groups.len(), 1);
    assert_eq!(stats.groups[0].lag_messages, 0);
    assert_eq!(stats.groups[0].redeliveries_waiting, 0);
    assert_quiet(&mut outputs).await;
    stop(running).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Failures are nacked and redelivered
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_message_is_nacked_redelivered_and_succeeds_later() {
    let pubsub = InMemoryPubSub::default();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let calls = Calls::default();
    let mut router = Router::default();
    {
        let calls = calls.clone();
        router
            .add_consumer_handler(
                "flaky",
                "in",
                subscriber,
                consumer_fn(move |message: Message| {
                    calls.record(&message);
                    let attempt = calls.of(&text(&message));
                    async move {
                        if text(&message) == "fails-twice" && attempt <= 2 {
                            Err(HandlerError::new(format!("attempt {attempt}")))
                        } else {
                            Ok(())
                        }
                    }
                }),
            )
            .unwrap();
    }
    let running = router.start().await.unwrap();
    let flaky = Message::new("fails-twice");
    let fine = Message::new("fine");
    let (flaky_id, fine_id) = (flaky.id.clone(), fine.id.clone());
    publish(&pubsub, "in", vec![flaky, fine]).await;

    eventually("the flaky message acked", || {
        outcomes.of(&flaky_id).contains(&Outcome::Acked)
    })
    .await;
    assert_eq!(
        outcomes.of(&flaky_id),
        [
            Outcome::Nacked { delay: None },
            Outcome::Nacked { delay: None },
            Outcome::Acked
        ]
    );
    assert_eq!(calls.of("fails-twice"), 3);
    eventually("the other message acked", || {
        outcomes.of(&fine_id) == [Outcome::Acked]
    })
    .await;
    assert_eq!(calls.of("fine"), 1);
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliver_after_delays_the_redelivery() {
    const DELAY: Duration = Duration::from_millis(200);
    let pubsub = InMemoryPubSub::default();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let attempts: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut router = Router::default();
    {
        let attempts = attempts.clone();
        router
            .add_consumer_handler(
                "later",
                "in",
                subscriber,
                consumer_fn(move |_message: Message| {
                    let attempt = {
                        let mut attempts = attempts.lock().unwrap();
                        attempts.push(Instant::now());
                        attempts.len()
                    };
                    async move {
                        if attempt == 1 {
                            Err(HandlerError::new("not yet").redeliver_after(DELAY))
                        } else {
                            Ok(())
                        }
                    }
                }),
            )
            .unwrap();
    }
    let running = router.start().await.unwrap();
    let message = Message::new("x");
    let id = message.id.clone();
    publish(&pubsub, "in", vec![message]).await;

    eventually("the redelivery acked", || {
        outcomes.of(&id).contains(&Outcome::Acked)
    })
    .await;
    assert_eq!(
        outcomes.of(&id),
        [Outcome::Nacked { delay: Some(DELAY) }, Outcome::Acked]
    );
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 2);
    let waited = attempts[1] - attempts[0];
    // The nack comes after the first attempt started, so this is a strict lower bound (less a
    // millisecond of timer rounding).
    assert!(
        waited >= DELAY - Duration::from_millis(1),
        "redelivered after {waited:?}"
    );
    stop(running).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Poison queue
// ---------------------------------------------------------------------------------------------

fn always_failing(calls: Calls) -> impl Handler {
    consumer_fn(move |message: Message| {
        calls.record(&message);
        let attempt = calls.of(&text(&message));
        async move { Err(HandlerError::new(format!("attempt {attempt} failed"))) }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanently_failing_message_is_poisoned_with_its_content_and_acked() {
    let pubsub = InMemoryPubSub::default();
    let mut poisoned = pubsub.subscriber().subscribe("poison").await.unwrap();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let mut router = Router::default();
    router.poison_queue(PoisonQueue::new(Arc::new(pubsub.publisher()), "poison").unwrap());
    router
        .add_consumer_handler(
            "decoder",
            "orders",
            subscriber,
            consumer_fn(
                |_message: Message| async move { Err(HandlerError::permanent("not json")) },
            ),
        )
        .unwrap();
    let running = router.start().await.unwrap();
    let message = Message::new("{{{").with_metadata(Metadata::CORRELATION_ID, "c-1");
    let id = message.id.clone();
    publish(&pubsub, "orders", vec![message]).await;

    let got = next(&mut poisoned).await;
    assert_eq!(got.id, id);
    assert_eq!(&got.payload[..], b"{{{");
    assert_eq!(got.correlation_id(), Some("c-1"));
    assert_eq!(
        got.metadata.get(PoisonQueue::REASON),
        Some("handler failed permanently: not json")
    );
    assert_eq!(got.metadata.get(PoisonQueue::TOPIC), Some("orders"));
    assert_eq!(got.metadata.get(PoisonQueue::HANDLER), Some("decoder"));
    assert_eq!(got.metadata.get(PoisonQueue::ERROR_KIND), Some("permanent"));
    eventually("the input acked", || !outcomes.of(&id).is_empty()).await;
    assert_eq!(outcomes.of(&id), [Outcome::Acked]);
    assert_quiet(&mut poisoned).await;
    stop(running).await;
}

/// Where the retry middleware sits relative to the poison queue, and in which order they were
/// configured.
#[derive(Debug, Clone, Copy)]
enum RetryPlacement {
    PoisonQueueThenRouterRetry,
    RouterRetryThenPoisonQueue,
    BothOnTheHandler,
}

async fn retry_runs_to_the_end_before_poisoning(placement: RetryPlacement) {
    const ATTEMPTS: usize = 3;
    let pubsub = InMemoryPubSub::default();
    let mut poisoned = pubsub.subscriber().subscribe("poison").await.unwrap();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let poison = PoisonQueue::new(Arc::new(pubsub.publisher()), "poison").unwrap();
    let calls = Calls::default();
    let mut router = Router::default();
    match placement {
        RetryPlacement::PoisonQueueThenRouterRetry => {
            router.poison_queue(poison);
            router.add_middleware(Retry { attempts: ATTEMPTS });
            router
                .add_consumer_handler("h", "in", subscriber, always_failing(calls.clone()))
                .unwrap();
        }
        RetryPlacement::RouterRetryThenPoisonQueue => {
            router
                .add_consumer_handler("h", "in", subscriber, always_failing(calls.clone()))
                .unwrap();
            router.add_middleware(Retry { attempts: ATTEMPTS });
            router.poison_queue(poison);
        }
        RetryPlacement::BothOnTheHandler => {
            router
                .add_consumer_handler("h", "in", subscriber, always_failing(calls.clone()))
                .unwrap()
                .poison_queue(poison)
                .middleware(Retry { attempts: ATTEMPTS });
        }
    }
    let running = router.start().await.unwrap();
    let message = Message::new("doomed");
    let id = message.id.clone();
    publish(&pubsub, "in", vec![message]).await;

    let got = next(&mut poisoned).await;
    assert_eq!(got.id, id, "{placement:?}");
    // The error poisoned is the last attempt's: the retry ran to its end first.
    assert_eq!(
        got.metadata.get(PoisonQueue::REASON),
        Some("handler failed: attempt 3 failed"),
        "{placement:?}"
    );
    assert_eq!(got.metadata.get(PoisonQueue::ERROR_KIND), Some("transient"));
    eventually("the input settled", || !outcomes.of(&id).is_empty()).await;
    assert_eq!(outcomes.of(&id), [Outcome::Acked], "{placement:?}");
    assert_eq!(calls.of("doomed"), ATTEMPTS, "{placement:?}");
    assert_quiet(&mut poisoned).await;
    assert_eq!(calls.of("doomed"), ATTEMPTS, "{placement:?}");
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poison_queue_never_swallows_a_retry_whatever_the_order_of_configuration() {
    for placement in [
        RetryPlacement::PoisonQueueThenRouterRetry,
        RetryPlacement::RouterRetryThenPoisonQueue,
        RetryPlacement::BothOnTheHandler,
    ] {
        retry_runs_to_the_end_before_poisoning(placement).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_poison_queue_takes_precedence_over_the_routers() {
    let pubsub = InMemoryPubSub::default();
    let mut router_poison = pubsub
        .subscriber()
        .subscribe("poison.router")
        .await
        .unwrap();
    let mut handler_poison = pubsub.subscriber().subscribe("poison.own").await.unwrap();
    let mut router = Router::default();
    router.poison_queue(PoisonQueue::new(Arc::new(pubsub.publisher()), "poison.router").unwrap());
    router
        .add_consumer_handler(
            "own",
            "a",
            Arc::new(pubsub.subscriber()),
            always_failing(Calls::default()),
        )
        .unwrap()
        .poison_queue(PoisonQueue::new(Arc::new(pubsub.publisher()), "poison.own").unwrap());
    router
        .add_consumer_handler(
            "shared",
            "b",
            Arc::new(pubsub.subscriber()),
            always_failing(Calls::default()),
        )
        .unwrap();
    let running = router.start().await.unwrap();
    publish(&pubsub, "a", vec![Message::new("from a")]).await;
    publish(&pubsub, "b", vec![Message::new("from b")]).await;

    let own = next(&mut handler_poison).await;
    assert_eq!(text(&own), "from a");
    assert_eq!(own.metadata.get(PoisonQueue::HANDLER), Some("own"));
    let shared = next(&mut router_poison).await;
    assert_eq!(text(&shared), "from b");
    assert_eq!(shared.metadata.get(PoisonQueue::HANDLER), Some("shared"));
    assert_eq!(shared.metadata.get(PoisonQueue::TOPIC), Some("b"));
    assert_quiet(&mut handler_poison).await;
    assert_quiet(&mut router_poison).await;
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_the_poison_filter_refuses_are_nacked_not_poisoned() {
    let pubsub = InMemoryPubSub::default();
    let mut poisoned = pubsub.subscriber().subscribe("poison").await.unwrap();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let calls = Calls::default();
    let mut router = Router::default();
    router.poison_queue(
        PoisonQueue::new(Arc::new(pubsub.publisher()), "poison")
            .unwrap()
            .only_when(HandlerError::is_permanent),
    );
    {
        let calls = calls.clone();
        router
            .add_consumer_handler(
                "h",
                "in",
                subscriber,
                consumer_fn(move |message: Message| {
                    calls.record(&message);
                    let attempt = calls.of(&text(&message));
                    async move {
                        match (text(&message).as_str(), attempt) {
                            ("bad", _) => Err(HandlerError::permanent("bad")),
                            ("blip", 1) => Err(HandlerError::new("blip")),
                            _ => Ok(()),
                        }
                    }
                }),
            )
            .unwrap();
    }
    let running = router.start().await.unwrap();
    let blip = Message::new("blip");
    let bad = Message::new("bad");
    let (blip_id, bad_id) = (blip.id.clone(), bad.id.clone());
    publish(&pubsub, "in", vec![blip, bad]).await;

    let got = next(&mut poisoned).await;
    assert_eq!(got.id, bad_id);
    eventually("both settled", || {
        outcomes.of(&blip_id).contains(&Outcome::Acked) && !outcomes.of(&bad_id).is_empty()
    })
    .await;
    assert_eq!(
        outcomes.of(&blip_id),
        [Outcome::Nacked { delay: None }, Outcome::Acked]
    );
    assert_eq!(outcomes.of(&bad_id), [Outcome::Acked]);
    assert_eq!(calls.of("blip"), 2);
    assert_eq!(calls.of("bad"), 1);
    assert_quiet(&mut poisoned).await;
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_poison_queue_cannot_take_a_message_it_is_nacked() {
    let pubsub = InMemoryPubSub::default();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let broken = FlakyPublisher::always_failing();
    let calls = Calls::default();
    let mut router = Router::default();
    router.poison_queue(PoisonQueue::new(broken.clone(), "poison").unwrap());
    {
        let calls = calls.clone();
        router
            .add_consumer_handler(
                "h",
                "in",
                subscriber,
                consumer_fn(move |message: Message| {
                    calls.record(&message);
                    let attempt = calls.of(&text(&message));
                    async move {
                        if attempt == 1 {
                            Err(HandlerError::permanent("nope"))
                        } else {
                            Ok(())
                        }
                    }
                }),
            )
            .unwrap();
    }
    let running = router.start().await.unwrap();
    let message = Message::new("m");
    let id = message.id.clone();
    publish(&pubsub, "in", vec![message]).await;

    eventually("the redelivery acked", || {
        outcomes.of(&id).contains(&Outcome::Acked)
    })
    .await;
    assert_eq!(
        outcomes.of(&id),
        [Outcome::Nacked { delay: None }, Outcome::Acked]
    );
    assert_eq!(broken.calls(), 1);
    assert_eq!(calls.of("m"), 2);
    stop(running).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Middleware order
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middleware_runs_in_onion_order_router_level_outside() {
    let pubsub = InMemoryPubSub::default();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let trace = |name| Trace {
        name,
        log: log.clone(),
    };
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = |tag: &'static str| {
        let log = log.clone();
        let handled = handled.clone();
        consumer_fn(move |_message: Message| {
            log.lock().unwrap().push(tag.to_owned());
            handled.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
    };
    let mut router = Router::default();
    router.add_middleware(trace("r1"));
    router
        .add_consumer_handler("with", "a", Arc::new(pubsub.subscriber()), handler("with"))
        .unwrap()
        .middleware(trace("h1"))
        .middleware(trace("h2"));
    router
        .add_consumer_handler(
            "without",
            "b",
            Arc::new(pubsub.subscriber()),
            handler("without"),
        )
        .unwrap()
        .without_router_middleware()
        .middleware(trace("own"));
    // Router middleware added after the handlers applies to them too, inside the earlier one.
    router.add_middleware(trace("r2"));
    let running = router.start().await.unwrap();

    publish(&pubsub, "a", vec![Message::new("x")]).await;
    eventually("the first handler", || handled.load(Ordering::SeqCst) == 1).await;
    assert_eq!(
        *log.lock().unwrap(),
        [
            ">r1", ">r2", ">h1", ">h2", "with", "<h2", "<h1", "<r2", "<r1"
        ]
    );
    log.lock().unwrap().clear();

    publish(&pubsub, "b", vec![Message::new("y")]).await;
    eventually("the second handler", || handled.load(Ordering::SeqCst) == 2).await;
    assert_eq!(*log.lock().unwrap(), [">own", "without", "<own"]);
    stop(running).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Panic recovery
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_recovered_and_its_message_nacked() {
    let pubsub = InMemoryPubSub::default();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let calls = Calls::default();
    let mut router = Router::default();
    {
        let calls = calls.clone();
        router
            .add_consumer_handler(
                "fragile",
                "in",
                subscriber,
                consumer_fn(move |message: Message| {
                    calls.record(&message);
                    let attempt = calls.of(&text(&message));
                    async move {
                        assert!(
                            !(text(&message) == "boom" && attempt == 1),
                            "boom (a deliberate panic)"
                        );
                        Ok(())
                    }
                }),
            )
            .unwrap();
    }
    let running = router.start().await.unwrap();
    let inputs = vec![Message::new("a"), Message::new("boom"), Message::new("b")];
    let ids: Vec<MessageId> = inputs.iter().map(|m| m.id.clone()).collect();
    publish(&pubsub, "in", inputs).await;

    eventually("every message acked", || outcomes.acked().len() == 3).await;
    assert_eq!(outcomes.of(&ids[0]), [Outcome::Acked]);
    assert_eq!(
        outcomes.of(&ids[1]),
        [Outcome::Nacked { delay: None }, Outcome::Acked]
    );
    assert_eq!(outcomes.of(&ids[2]), [Outcome::Acked]);
    assert_eq!(calls.of("boom"), 2);

    // The handler still runs after the panic.
    let later = Message::new("later");
    let later_id = later.id.clone();
    publish(&pubsub, "in", vec![later]).await;
    eventually("a later message acked", || {
        outcomes.of(&later_id) == [Outcome::Acked]
    })
    .await;
    assert!(!running.handle().is_shutting_down());
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_poisoned_with_kind_panicked_when_there_is_a_poison_queue() {
    let pubsub = InMemoryPubSub::default();
    let mut poisoned = pubsub.subscriber().subscribe("poison").await.unwrap();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let mut router = Router::default();
    router.poison_queue(PoisonQueue::new(Arc::new(pubsub.publisher()), "poison").unwrap());
    router
        .add_consumer_handler(
            "fragile",
            "in",
            subscriber,
            consumer_fn(|message: Message| async move {
                assert_ne!(text(&message), "boom", "a deliberate panic");
                Ok(())
            }),
        )
        .unwrap();
    let running = router.start().await.unwrap();
    let boom = Message::new("boom");
    let after = Message::new("after");
    let (boom_id, after_id) = (boom.id.clone(), after.id.clone());
    publish(&pubsub, "in", vec![boom, after]).await;

    let got = next(&mut poisoned).await;
    assert_eq!(got.id, boom_id);
    assert_eq!(got.metadata.get(PoisonQueue::ERROR_KIND), Some("panicked"));
    let reason = got.metadata.get(PoisonQueue::REASON).unwrap_or_default();
    assert!(
        reason.starts_with("handler panicked:") && reason.contains("a deliberate panic"),
        "{reason}"
    );
    eventually("both acked", || outcomes.acked().len() == 2).await;
    assert_eq!(outcomes.of(&boom_id), [Outcome::Acked]);
    assert_eq!(outcomes.of(&after_id), [Outcome::Acked]);
    stop(running).await;
}

/// A handler written without `async_trait` that panics when called, before it returns its
/// future (as hand-written middleware may).
struct PanicsWhenCalled {
    calls: Calls,
}

impl Handler for PanicsWhenCalled {
    fn handle<'life0, 'async_trait>(
        &'life0 self,
        message: Message,
    ) -> Pin<Box<dyn Future<Output = HandlerResult> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        self.calls.record(&message);
        assert_ne!(
            text(&message),
            "boom",
            "a deliberate panic before the future"
        );
        Box::pin(async { Ok(Vec::new()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_calling_the_handler_is_recovered_too() {
    let pubsub = InMemoryPubSub::default();
    let mut poisoned = pubsub.subscriber().subscribe("poison").await.unwrap();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let calls = Calls::default();
    let mut router = Router::default();
    router.poison_queue(PoisonQueue::new(Arc::new(pubsub.publisher()), "poison").unwrap());
    router
        .add_consumer_handler(
            "eager",
            "in",
            subscriber,
            PanicsWhenCalled {
                calls: calls.clone(),
            },
        )
        .unwrap();
    let running = router.start().await.unwrap();
    let boom = Message::new("boom");
    let after = Message::new("after");
    let (boom_id, after_id) = (boom.id.clone(), after.id.clone());
    publish(&pubsub, "in", vec![boom, after]).await;

    let got = next(&mut poisoned).await;
    assert_eq!(got.id, boom_id);
    assert_eq!(got.metadata.get(PoisonQueue::ERROR_KIND), Some("panicked"));
    eventually("both acked", || outcomes.acked().len() == 2).await;
    assert_eq!(outcomes.of(&boom_id), [Outcome::Acked]);
    assert_eq!(outcomes.of(&after_id), [Outcome::Acked]);
    assert_eq!(calls.of("after"), 1);
    stop(running).await;
}

// ---------------------------------------------------------------------------------------------
// 6. Concurrency
// ---------------------------------------------------------------------------------------------

/// Tracks how many handler calls run at once, overall and per key.
#[derive(Default)]
struct Parallelism {
    running: AtomicUsize,
    max: AtomicUsize,
    keys_running: Mutex<HashSet<String>>,
    same_key_overlaps: AtomicUsize,
    /// Handled payloads per key, in handling order.
    order: Mutex<HashMap<String, Vec<String>>>,
    handled: AtomicUsize,
}

impl Parallelism {
    async fn around(&self, message: &Message, work: impl Future<Output = ()>) {
        let key = message.partition_key().unwrap_or("").to_owned();
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        if !key.is_empty() && !self.keys_running.lock().unwrap().insert(key.clone()) {
            self.same_key_overlaps.fetch_add(1, Ordering::SeqCst);
        }
        work.await;
        if !key.is_empty() {
            self.keys_running.lock().unwrap().remove(&key);
        }
        self.order
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .push(text(message));
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.handled.fetch_add(1, Ordering::SeqCst);
    }
}

fn tracked_handler(parallelism: Arc<Parallelism>, sleep_ms_max: u64) -> impl Handler {
    consumer_fn(move |message: Message| {
        let parallelism = parallelism.clone();
        async move {
            let sleep = Duration::from_millis(rand::random_range(0..=sleep_ms_max));
            parallelism
                .around(&message, tokio::time::sleep(sleep))
                .await;
            Ok(())
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_lanes_keep_per_key_order_and_run_keys_in_parallel() {
    const KEYS: usize = 16;
    const PER_KEY: usize = 8;
    const LANES: usize = 4;
    let pubsub = InMemoryPubSub::default();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let parallelism = Arc::new(Parallelism::default());
    let mut router = Router::default();
    router
        .add_consumer_handler(
            "lanes",
            "in",
            subscriber,
            tracked_handler(parallelism.clone(), 3),
        )
        .unwrap()
        .concurrency(Concurrency::per_key(LANES));
    let running = router.start().await.unwrap();

    // Interleave the keys: round-robin with a random rotation each round.
    let mut inputs = Vec::new();
    for seq in 0..PER_KEY {
        let offset = rand::random_range(0..KEYS);
        for k in 0..KEYS {
            let key = (k + offset) % KEYS;
            inputs.push(
                Message::new(format!("k{key}:{seq}"))
                    .with_metadata(Metadata::PARTITION_KEY, format!("k{key}")),
            );
        }
    }
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for message in &inputs {
        expected
            .entry(message.partition_key().unwrap().to_owned())
            .or_default()
            .push(text(message));
    }
    publish(&pubsub, "in", inputs).await;

    eventually("every message acked", || {
        outcomes.acked().len() == KEYS * PER_KEY
    })
    .await;
    assert_eq!(outcomes.all().len(), KEYS * PER_KEY, "only acks, once each");
    assert_eq!(parallelism.handled.load(Ordering::SeqCst), KEYS * PER_KEY);
    assert_eq!(*parallelism.order.lock().unwrap(), expected);
    assert_eq!(parallelism.same_key_overlaps.load(Ordering::SeqCst), 0);
    let max = parallelism.max.load(Ordering::SeqCst);
    assert!(max > 1, "no parallelism observed");
    assert!(max <= LANES, "{max} calls at once on {LANES} lanes");
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_concurrency_is_bounded() {
    const BOUND: usize = 3;
    const COUNT: usize = 40;
    let pubsub = InMemoryPubSub::default();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let parallelism = Arc::new(Parallelism::default());
    let mut router = Router::default();
    router
        .add_consumer_handler(
            "any",
            "in",
            subscriber,
            tracked_handler(parallelism.clone(), 5),
        )
        .unwrap()
        .concurrency(Concurrency::unordered(BOUND));
    let running = router.start().await.unwrap();
    publish(&pubsub, "in", messages("m", COUNT)).await;

    eventually("every message acked", || outcomes.acked().len() == COUNT).await;
    assert_eq!(parallelism.handled.load(Ordering::SeqCst), COUNT);
    let max = parallelism.max.load(Ordering::SeqCst);
    assert!(max > 1, "no parallelism observed");
    assert!(max <= BOUND, "{max} calls at once, bound {BOUND}");
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_handles_one_at_a_time_in_order() {
    const COUNT: usize = 20;
    let pubsub = InMemoryPubSub::default();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let parallelism = Arc::new(Parallelism::default());
    let mut router = Router::default();
    router
        .add_consumer_handler(
            "one",
            "in",
            subscriber,
            tracked_handler(parallelism.clone(), 2),
        )
        .unwrap();
    let running = router.start().await.unwrap();
    let inputs = messages("m", COUNT);
    let expected: Vec<String> = inputs.iter().map(text).collect();
    publish(&pubsub, "in", inputs).await;

    eventually("every message acked", || outcomes.acked().len() == COUNT).await;
    assert_eq!(parallelism.max.load(Ordering::SeqCst), 1);
    assert_eq!(parallelism.order.lock().unwrap()[""], expected);
    stop(running).await;
}

// ---------------------------------------------------------------------------------------------
// 7. Graceful shutdown
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Progress {
    started: Vec<MessageId>,
    completed: Vec<MessageId>,
}

fn slow_handler(progress: Arc<Mutex<Progress>>, work: Duration) -> impl Handler {
    consumer_fn(move |message: Message| {
        let progress = progress.clone();
        async move {
            progress.lock().unwrap().started.push(message.id.clone());
            tokio::time::sleep(work).await;
            progress.lock().unwrap().completed.push(message.id.clone());
            Ok(())
        }
    })
}

async fn graceful_shutdown_hands_back_what_it_did_not_handle(concurrency: Concurrency) {
    const COUNT: usize = 16;
    const WORK: Duration = Duration::from_millis(50);
    let pubsub = InMemoryPubSub::new(InMemoryConfig::default().persistent(true));
    let inputs: Vec<Message> = (0..COUNT)
        .map(|i| {
            Message::new(format!("job {i}"))
                .with_metadata(Metadata::PARTITION_KEY, format!("k{}", i % 8))
        })
        .collect();
    let all: HashSet<MessageId> = inputs.iter().map(|m| m.id.clone()).collect();
    publish(&pubsub, "jobs", inputs).await;

    // The first worker: shut down while it is in the middle of a message.
    let (subscriber, outcomes_1) = recording(pubsub.subscriber_in_group("workers"));
    let progress_1 = Arc::new(Mutex::new(Progress::default()));
    let mut router = Router::default();
    router
        .add_consumer_handler(
            "work",
            "jobs",
            subscriber,
            slow_handler(progress_1.clone(), WORK),
        )
        .unwrap()
        .concurrency(concurrency.clone());
    let running = router.start().await.unwrap();
    let deadline = Instant::now() + WAIT;
    let in_progress: HashSet<MessageId> = loop {
        {
            let progress = progress_1.lock().unwrap();
            if progress.completed.len() >= 2 && progress.started.len() > progress.completed.len() {
                let completed: HashSet<_> = progress.completed.iter().collect();
                break progress
                    .started
                    .iter()
                    .filter(|id| !completed.contains(id))
                    .cloned()
                    .collect();
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let report = within("the first router to stop", running.shutdown()).await;
    assert_eq!(report.aborted_tasks, 0);

    let (started_1, completed_1) = {
        let progress = progress_1.lock().unwrap();
        (
            progress.started.iter().cloned().collect::<HashSet<_>>(),
            progress.completed.iter().cloned().collect::<HashSet<_>>(),
        )
    };
    assert!(completed_1.len() < COUNT, "shutdown did not stop intake");
    assert_eq!(started_1, completed_1, "every started message completed");
    let acked_1 = outcomes_1.acked();
    for id in &in_progress {
        assert_eq!(
            outcomes_1.of(id),
            [Outcome::Acked],
            "the message in progress at shutdown completed and was acked"
        );
    }
    assert_eq!(acked_1, completed_1, "acked exactly what was handled");
    if matches!(concurrency, Concurrency::PerKey { .. }) {
        assert!(
            outcomes_1.count(|o| *o == Outcome::Nacked { delay: None }) >= 1,
            "queued-but-unstarted messages are nacked back: {:?}",
            outcomes_1.all()
        );
    }

    // A second worker in the same group takes over the rest.
    let (subscriber, outcomes_2) = recording(pubsub.subscriber_in_group("workers"));
    let progress_2 = Arc::new(Mutex::new(Progress::default()));
    let mut router = Router::default();
    router
        .add_consumer_handler(
            "work",
            "jobs",
            subscriber,
            slow_handler(progress_2.clone(), WORK),
        )
        .unwrap()
        .concurrency(concurrency);
    let running = router.start().await.unwrap();
    eventually("every message acked by one of the workers", || {
        acked_1.union(&outcomes_2.acked()).count() == COUNT
    })
    .await;
    stop(running).await;

    let completed_2: HashSet<MessageId> = progress_2
        .lock()
        .unwrap()
        .completed
        .iter()
        .cloned()
        .collect();
    let acked_2 = outcomes_2.acked();
    assert!(
        acked_2.is_subset(&completed_2),
        "acked without being handled"
    );
    assert_eq!(
        completed_1
            .union(&completed_2)
            .cloned()
            .collect::<HashSet<_>>(),
        all
    );
    assert_eq!(
        acked_1.union(&acked_2).cloned().collect::<HashSet<_>>(),
        all
    );
    // Nothing the first worker acked came back.
    assert!(acked_1.is_disjoint(&completed_2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_of_a_sequential_handler() {
    graceful_shutdown_hands_back_what_it_did_not_handle(Concurrency::Sequential).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_of_per_key_lanes() {
    graceful_shutdown_hands_back_what_it_did_not_handle(Concurrency::per_key(4)).await;
}

// ---------------------------------------------------------------------------------------------
// 8. Close timeout
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_running_past_the_close_timeout_is_aborted_and_its_message_redelivered() {
    const CLOSE_TIMEOUT: Duration = Duration::from_millis(100);
    let pubsub = InMemoryPubSub::new(InMemoryConfig::default().persistent(true));
    let (subscriber, outcomes) = recording(pubsub.subscriber_in_group("stuck"));
    let entered = Arc::new(Notify::new());
    let mut router = Router::new(RouterConfig::default().close_timeout(CLOSE_TIMEOUT));
    {
        let entered = entered.clone();
        router
            .add_consumer_handler(
                "forever",
                "t",
                subscriber,
                consumer_fn(move |_message: Message| {
                    entered.notify_one();
                    std::future::pending()
                }),
            )
            .unwrap();
    }
    let running = router.start().await.unwrap();
    let message = Message::new("stuck");
    let id = message.id.clone();
    publish(&pubsub, "t", vec![message]).await;
    within("the handler to start", entered.notified()).await;

    let began = Instant::now();
    let report = within("the shutdown", running.shutdown()).await;
    assert!(began.elapsed() >= CLOSE_TIMEOUT, "{:?}", began.elapsed());
    assert!(report.aborted_tasks >= 1, "{report:?}");
    assert_eq!(report.handlers, 1);
    eventually("the delivery dropped", || !outcomes.of(&id).is_empty()).await;
    assert_eq!(outcomes.of(&id), [Outcome::Dropped]);

    let mut stream = pubsub
        .subscriber_in_group("stuck")
        .subscribe("t")
        .await
        .unwrap();
    let again = within("the redelivery", stream.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.id, id);
    assert!(again.ack());
}

// ---------------------------------------------------------------------------------------------
// 9. Batch handlers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_bounded_and_partial_batches_flush_after_the_linger() {
    let pubsub = InMemoryPubSub::default();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let mut router = Router::default();
    {
        let sizes = sizes.clone();
        router
            .add_batch_handler(
                "bulk",
                "in",
                subscriber,
                None,
                BatchConfig::new(4, Duration::from_millis(50)),
                batch_handler_fn(move |batch: Vec<Message>| {
                    sizes.lock().unwrap().push(batch.len());
                    async { Ok(Vec::new()) }
                }),
            )
            .unwrap();
    }
    let running = router.start().await.unwrap();
    publish(&pubsub, "in", messages("m", 10)).await;

    eventually("all ten acked", || outcomes.acked().len() == 10).await;
    let sizes = sizes.lock().unwrap().clone();
    assert_eq!(sizes.iter().sum::<usize>(), 10, "{sizes:?}");
    assert!(
        sizes.iter().all(|&size| (1..=4).contains(&size)),
        "{sizes:?}"
    );
    assert!(sizes.len() >= 3, "{sizes:?}");
    assert_eq!(outcomes.all().len(), 10, "only acks");
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_linger_flushes_a_partial_batch() {
    const LINGER: Duration = Duration::from_millis(100);
    let pubsub = InMemoryPubSub::default();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let batches: Arc<Mutex<Vec<(Instant, usize)>>> = Arc::default();
    let mut router = Router::default();
    {
        let batches = batches.clone();
        router
            .add_batch_handler(
                "bulk",
                "in",
                subscriber,
                None,
                BatchConfig::new(100, LINGER),
                batch_handler_fn(move |batch: Vec<Message>| {
                    batches.lock().unwrap().push((Instant::now(), batch.len()));
                    async { Ok(Vec::new()) }
                }),
            )
            .unwrap();
    }
    let running = router.start().await.unwrap();
    let published = Instant::now();
    publish(&pubsub, "in", messages("m", 3)).await;

    eventually("the partial batch acked", || outcomes.acked().len() == 3).await;
    let batches = batches.lock().unwrap().clone();
    assert_eq!(batches.len(), 1, "{batches:?}");
    let (at, size) = batches[0];
    assert_eq!(size, 3);
    assert!(at - published >= LINGER - Duration::from_millis(1));
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_is_nacked_whole_and_successful_batches_publish_their_outputs() {
    let pubsub = InMemoryPubSub::default();
    let mut outputs = pubsub.subscriber().subscribe("out").await.unwrap();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let first_batch: Arc<Mutex<Option<Vec<MessageId>>>> = Arc::default();
    let mut router = Router::default();
    {
        let first_batch = first_batch.clone();
        router
            .add_batch_handler(
                "bulk",
                "in",
                subscriber,
                Some(("out", Arc::new(pubsub.publisher()))),
                BatchConfig::new(4, Duration::from_millis(20)),
                batch_handler_fn(move |batch: Vec<Message>| {
                    let first = {
                        let mut first_batch = first_batch.lock().unwrap();
                        let first = first_batch.is_none();
                        if first {
                            *first_batch = Some(batch.iter().map(|m| m.id.clone()).collect());
                        }
                        first
                    };
                    async move {
                        if first {
                            return Err(HandlerError::new("bulk insert failed"));
                        }
                        Ok(batch
                            .iter()
                            .map(|m| Message::new(format!("out:{}", text(m))))
                            .collect())
                    }
                }),
            )
            .unwrap();
    }
    let running = router.start().await.unwrap();
    publish(&pubsub, "in", messages("m", 10)).await;

    let mut got = HashSet::new();
    for _ in 0..10 {
        got.insert(text(&next(&mut outputs).await));
    }
    let expected: HashSet<String> = (0..10).map(|i| format!("out:m{i}")).collect();
    assert_eq!(got, expected);
    eventually("all ten acked", || outcomes.acked().len() == 10).await;
    let failed = first_batch.lock().unwrap().clone().unwrap();
    assert!(!failed.is_empty() && failed.len() <= 4);
    for id in &failed {
        assert_eq!(
            outcomes.of(id),
            [Outcome::Nacked { delay: None }, Outcome::Acked]
        );
    }
    assert_eq!(
        outcomes.count(|o| *o == Outcome::Nacked { delay: None }),
        failed.len()
    );
    assert_quiet(&mut outputs).await;
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cut_short_by_the_end_of_its_subscription_is_handled_and_the_router_stops() {
    let pubsub = InMemoryPubSub::default();
    let closing = pubsub.subscriber();
    let (subscriber, outcomes) = recording(closing.clone());
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let mut router = Router::default();
    {
        let sizes = sizes.clone();
        router
            .add_batch_handler(
                "bulk",
                "in",
                subscriber,
                None,
                // A linger far longer than the test: only the end of the stream cuts it.
                BatchConfig::new(10, WAIT * 2),
                batch_handler_fn(move |batch: Vec<Message>| {
                    sizes.lock().unwrap().push(batch.len());
                    async { Ok(Vec::new()) }
                }),
            )
            .unwrap();
    }
    let running = router.start().await.unwrap();
    publish(&pubsub, "in", messages("m", 2)).await;
    eventually("both taken into the batch", || outcomes.delivered() == 2).await;
    closing.close().await.unwrap();

    let report = within("the router to stop by itself", running.wait()).await;
    assert_eq!(report.aborted_tasks, 0);
    assert_eq!(*sizes.lock().unwrap(), [2]);
    assert_eq!(outcomes.acked().len(), 2);
    assert_eq!(
        outcomes.polled_after_end(),
        0,
        "the stream was polled after it ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_of_a_failed_batch_is_poisoned() {
    let pubsub = InMemoryPubSub::default();
    let mut poisoned = pubsub.subscriber().subscribe("poison").await.unwrap();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let mut router = Router::default();
    router.poison_queue(PoisonQueue::new(Arc::new(pubsub.publisher()), "poison").unwrap());
    router
        .add_batch_handler(
            "bulk",
            "in",
            subscriber,
            None,
            BatchConfig::new(4, Duration::from_millis(20)),
            batch_handler_fn(|_batch: Vec<Message>| async {
                Err(HandlerError::permanent("schema mismatch"))
            }),
        )
        .unwrap();
    let running = router.start().await.unwrap();
    let inputs = messages("m", 6);
    let ids: HashSet<MessageId> = inputs.iter().map(|m| m.id.clone()).collect();
    publish(&pubsub, "in", inputs).await;

    let mut got = HashSet::new();
    for _ in 0..6 {
        let message = next(&mut poisoned).await;
        assert_eq!(message.metadata.get(PoisonQueue::HANDLER), Some("bulk"));
        assert_eq!(
            message.metadata.get(PoisonQueue::ERROR_KIND),
            Some("permanent")
        );
        got.insert(message.id.clone());
    }
    assert_eq!(got, ids);
    eventually("all acked", || outcomes.acked().len() == 6).await;
    assert_eq!(outcomes.all().len(), 6, "only acks");
    stop(running).await;
}

// ---------------------------------------------------------------------------------------------
// 10. Output publish failure
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_publishing_the_output_fails_the_input_is_nacked_and_redelivered() {
    let pubsub = InMemoryPubSub::default();
    let mut outputs = pubsub.subscriber().subscribe("out").await.unwrap();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let publisher = FlakyPublisher::failing_first(1, pubsub.publisher());
    let calls = Calls::default();
    let mut router = Router::default();
    {
        let calls = calls.clone();
        router
            .add_handler(
                "forward",
                "in",
                subscriber,
                "out",
                publisher.clone(),
                handler_fn(move |message: Message| {
                    calls.record(&message);
                    async move { Ok(vec![Message::new(format!("fwd:{}", text(&message)))]) }
                }),
            )
            .unwrap();
    }
    let running = router.start().await.unwrap();
    let message = Message::new("m");
    let id = message.id.clone();
    publish(&pubsub, "in", vec![message]).await;

    assert_eq!(text(&next(&mut outputs).await), "fwd:m");
    eventually("the redelivery acked", || {
        outcomes.of(&id).contains(&Outcome::Acked)
    })
    .await;
    assert_eq!(
        outcomes.of(&id),
        [Outcome::Nacked { delay: None }, Outcome::Acked]
    );
    assert_eq!(calls.of("m"), 2);
    assert_eq!(publisher.calls(), 2);
    assert_quiet(&mut outputs).await;
    stop(running).await;
}

// ---------------------------------------------------------------------------------------------
// 11. Configuration and start errors
// ---------------------------------------------------------------------------------------------

fn noop() -> impl Handler {
    consumer_fn(|_message: Message| async { Ok(()) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_are_reported() {
    let pubsub = InMemoryPubSub::default();
    let subscriber: Arc<dyn Subscriber> = Arc::new(pubsub.subscriber());
    let mut router = Router::default();
    router
        .add_consumer_handler("h", "t", subscriber.clone(), noop())
        .unwrap();
    let duplicate = router
        .add_consumer_handler("h", "other", subscriber.clone(), noop())
        .unwrap_err();
    assert!(
        matches!(&duplicate, RouterError::DuplicateHandler { name } if name == "h"),
        "{duplicate:?}"
    );
    let empty = router
        .add_consumer_handler("empty", "", subscriber.clone(), noop())
        .unwrap_err();
    assert!(
        matches!(&empty, RouterError::InvalidTopic { handler, .. } if handler == "empty"),
        "{empty:?}"
    );
    let control = router
        .add_handler(
            "control",
            "t",
            subscriber.clone(),
            "bad\ntopic",
            Arc::new(pubsub.publisher()),
            noop(),
        )
        .unwrap_err();
    assert!(
        matches!(&control, RouterError::InvalidTopic { handler, .. } if handler == "control"),
        "{control:?}"
    );
    let batch = router
        .add_batch_handler(
            "h",
            "t",
            subscriber,
            None,
            BatchConfig::new(1, Duration::ZERO),
            batch_handler_fn(|_batch: Vec<Message>| async { Ok(Vec::new()) }),
        )
        .unwrap_err();
    assert!(matches!(batch, RouterError::DuplicateHandler { .. }));
    assert!(PoisonQueue::new(Arc::new(pubsub.publisher()), "").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_subscribe_fails_start_and_starts_nothing() {
    let pubsub = InMemoryPubSub::default();
    let mut router = Router::default();
    router
        .add_consumer_handler("fine", "a", Arc::new(pubsub.subscriber()), noop())
        .unwrap();
    router
        .add_consumer_handler("refused", "b", Arc::new(RefusingSubscriber), noop())
        .unwrap();
    let error = router.start().await.unwrap_err();
    assert!(
        matches!(
            &error,
            RouterError::Subscribe { handler, topic, source: SubscribeError::Transport(_) }
                if handler == "refused" && topic == "b"
        ),
        "{error:?}"
    );
    // The subscription made before the failure was dropped.
    // (A topic nobody listens to is forgotten altogether.)
    let stats = pubsub.topic_stats("a");
    assert!(
        stats
            .as_ref()
            .is_none_or(|stats| stats.groups.iter().all(|g| g.members == 0)),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_router_does_not_start() {
    let error = Router::default().start().await.unwrap_err();
    assert!(matches!(error, RouterError::NoHandlers), "{error:?}");
    let error = Router::default()
        .run(std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(error, RouterError::NoHandlers), "{error:?}");
}

// ---------------------------------------------------------------------------------------------
// 12. Stopping
// ---------------------------------------------------------------------------------------------

async fn stops_when_its_subscriptions_end(concurrency: Concurrency) {
    let pubsub = InMemoryPubSub::default();
    let subscriber = pubsub.subscriber();
    let (recorded, outcomes) = recording(subscriber.clone());
    let handled = Arc::new(AtomicUsize::new(0));
    let mut router = Router::default();
    {
        let handled = handled.clone();
        router
            .add_consumer_handler(
                "h",
                "t",
                recorded,
                consumer_fn(move |_message: Message| {
                    handled.fetch_add(1, Ordering::SeqCst);
                    async { Ok(()) }
                }),
            )
            .unwrap()
            .concurrency(concurrency);
    }
    let running = router.start().await.unwrap();
    let handle = running.handle();
    publish(&pubsub, "t", messages("m", 3)).await;
    eventually("three handled", || handled.load(Ordering::SeqCst) == 3).await;
    assert!(!handle.is_shutting_down());

    subscriber.close().await.unwrap();
    let report = within("the router to stop by itself", running.wait()).await;
    assert_eq!(report.handlers, 1);
    assert_eq!(report.aborted_tasks, 0);
    assert!(handle.is_shutting_down());
    within("stopped", handle.stopped()).await;
    assert_eq!(outcomes.acked().len(), 3);
    assert_eq!(outcomes.polled_after_end(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_stops_by_itself_when_every_subscription_ends() {
    stops_when_its_subscriptions_end(Concurrency::Sequential).await;
    stops_when_its_subscriptions_end(Concurrency::per_key(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_keeps_running_while_one_subscription_remains() {
    let pubsub = InMemoryPubSub::default();
    let closing = pubsub.subscriber();
    let (staying, outcomes) = recording(pubsub.subscriber());
    let mut router = Router::default();
    router
        .add_consumer_handler("closing", "a", Arc::new(closing.clone()), noop())
        .unwrap();
    router
        .add_consumer_handler("staying", "b", staying, noop())
        .unwrap();
    let running = router.start().await.unwrap();
    closing.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!running.handle().is_shutting_down());
    publish(&pubsub, "b", vec![Message::new("still here")]).await;
    eventually("handled by the remaining handler", || {
        outcomes.acked().len() == 1
    })
    .await;
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_returns_after_its_shutdown_future_completes() {
    let pubsub = InMemoryPubSub::default();
    let (subscriber, outcomes) = recording(pubsub.subscriber());
    let mut router = Router::default();
    router
        .add_consumer_handler("h", "t", subscriber, noop())
        .unwrap();
    let (trigger, triggered) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(router.run(async {
        triggered.await.ok();
    }));
    eventually("the router subscribed", || {
        pubsub
            .topic_stats("t")
            .is_some_and(|stats| stats.groups.iter().any(|g| g.members == 1))
    })
    .await;
    publish(&pubsub, "t", vec![Message::new("m")]).await;
    eventually("the message acked", || outcomes.acked().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !run.is_finished(),
        "run returned before its shutdown future"
    );

    trigger.send(()).unwrap();
    let report = within("run to return", run).await.unwrap().unwrap();
    assert_eq!(report.handlers, 1);
    assert_eq!(report.aborted_tasks, 0);
}

/// Records its start, and shuts the router down once told to.
struct StopOnSignal {
    started: Arc<AtomicBool>,
    signal: Arc<Notify>,
}

impl Plugin for StopOnSignal {
    fn name(&self) -> &'static str {
        "stop_on_signal"
    }

    fn on_start(&self, router: &RouterHandle) {
        self.started.store(true, Ordering::SeqCst);
        let router = router.clone();
        let signal = self.signal.clone();
        tokio::spawn(async move {
            signal.notified().await;
            router.shutdown();
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_starts_with_the_router_and_can_shut_it_down() {
    let pubsub = InMemoryPubSub::default();
    let started = Arc::new(AtomicBool::new(false));
    let signal = Arc::new(Notify::new());
    let handled = Arc::new(AtomicUsize::new(0));
    let mut router = Router::default();
    router.add_plugin(StopOnSignal {
        started: started.clone(),
        signal: signal.clone(),
    });
    {
        let handled = handled.clone();
        let signal = signal.clone();
        router
            .add_consumer_handler(
                "h",
                "t",
                Arc::new(pubsub.subscriber()),
                consumer_fn(move |_message: Message| {
                    handled.fetch_add(1, Ordering::SeqCst);
                    // The handler asks the plugin to stop the router.
                    signal.notify_one();
                    async { Ok(()) }
                }),
            )
            .unwrap();
    }
    let running = router.start().await.unwrap();
    assert!(started.load(Ordering::SeqCst), "on_start ran during start");
    let handle = running.handle();
    assert!(!handle.is_shutting_down());
    publish(&pubsub, "t", vec![Message::new("m")]).await;
    let report = within("the plugin to stop the router", running.wait()).await;
    assert_eq!(report.handlers, 1);
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    assert!(handle.is_shutting_down());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_completes_only_after_shutdown() {
    let pubsub = InMemoryPubSub::default();
    let mut router = Router::default();
    router
        .add_consumer_handler("h", "t", Arc::new(pubsub.subscriber()), noop())
        .unwrap();
    let running = router.start().await.unwrap();
    let handle = running.handle();
    let stopped = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.stopped().await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!stopped.is_finished(), "stopped before shutdown");
    assert!(!handle.is_shutting_down());

    handle.shutdown();
    within("shutting_down", handle.shutting_down()).await;
    within("stopped", stopped).await.unwrap();
    let report = within("wait", running.wait()).await;
    assert_eq!(report.aborted_tasks, 0);
    assert!(report.close_errors.is_empty());
    // Closing the router closed its subscriber: the router is really gone from the topic.
    // (A topic nobody listens to is forgotten altogether.)
    let stats = pubsub.topic_stats("t");
    assert!(
        stats
            .as_ref()
            .is_none_or(|stats| stats.groups.iter().all(|g| g.members == 0)),
        "{stats:?}"
    );
}
