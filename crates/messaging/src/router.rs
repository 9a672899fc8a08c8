//! The router: wires handlers from subscribed topics to published topics.
//!
//! For every message a handler receives, the router runs the handler inside its middleware
//! (router-level middleware outermost, then the handler's own, each list in the order added:
//! first added is outermost), inside panic recovery, inside the poison queue:
//!
//! ```text
//! poison queue ( panic recovery ( router middleware ( handler middleware ( handler ))))
//! ```
//!
//! On success it publishes the handler's output messages to the handler's publish topic and
//! then acks the input; when publishing fails, or the handler fails and there is no poison
//! queue (or the poison queue cannot take the message), it nacks the input so it is delivered
//! again. The poison queue is not a middleware: the router always applies it outside the
//! whole chain, so a retry inside the chain always runs to the end before a message is
//! poisoned — it cannot be placed where it would swallow a retry.
//!
//! Shutdown ([`RouterHandle::shutdown`], a [`Plugin`], or every subscription ending) stops
//! intake first, lets the handlers finish the messages they started, nacks the messages
//! taken but not started, then closes the publishers and subscribers. A handler still running
//! after [`RouterConfig::close_timeout`] is aborted: its message is dropped unsettled, which
//! every backend redelivers. So no message is acked unhandled, and no acked message is lost.

use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::handler::{
    BatchHandler, BoxHandler, Handler, HandlerContext, HandlerError, HandlerErrorKind,
    HandlerResult, Middleware,
};
use crate::message::Message;
use crate::middleware::recoverer;
use crate::pubsub::{
    InvalidTopic, MessageStream, PublishError, Publisher, SubscribeError, Subscriber, check_topic,
};

/// Router settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RouterConfig {
    /// How long shutdown waits for running handlers before aborting them.
    pub close_timeout: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            close_timeout: Duration::from_secs(30),
        }
    }
}

impl RouterConfig {
    /// Builder: see [`RouterConfig::close_timeout`].
    #[must_use]
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }
}

/// Extracts the ordering key of a message.
pub type KeyFn = Arc<dyn for<'m> Fn(&'m Message) -> Option<&'m str> + Send + Sync>;

/// How many messages of one handler run at once.
#[derive(Clone)]
#[non_exhaustive]
pub enum Concurrency {
    /// One at a time, in delivery order (the default).
    Sequential,
    /// Messages with the same key one at a time and in order; different keys in parallel on
    /// up to `lanes` lanes (a key always maps to the same lane). Messages without a key are
    /// spread by id. Each lane queues at most `lane_capacity` messages.
    PerKey {
        /// Parallel lanes (at least 1).
        lanes: usize,
        /// Messages queued per lane (at least 1).
        lane_capacity: usize,
        /// The key; [`Concurrency::per_key`] reads [`Metadata::PARTITION_KEY`].
        key: KeyFn,
    },
}

impl Concurrency {
    /// Per-key ordering on `lanes` lanes, keyed by [`Metadata::PARTITION_KEY`].
    pub fn per_key(lanes: usize) -> Self {
        Self::PerKey {
            lanes: lanes.max(1),
            lane_capacity: 64,
            key: Arc::new(|message: &Message| message.partition_key()),
        }
    }

    /// Per-key ordering with a key of your choosing.
    pub fn per_key_with(
        lanes: usize,
        key: impl for<'m> Fn(&'m Message) -> Option<&'m str> + Send + Sync + 'static,
    ) -> Self {
        Self::PerKey {
            lanes: lanes.max(1),
            lane_capacity: 64,
            key: Arc::new(key),
        }
    }

    /// Up to `max_in_flight` messages at once, with no ordering.
    pub fn unordered(max_in_flight: usize) -> Self {
        Self::per_key_with(max_in_flight, |_| None)
    }
}

impl fmt::Debug for Concurrency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sequential => f.write_str("Sequential"),
            Self::PerKey {
                lanes,
                lane_capacity,
                ..
            } => f
                .debug_struct("PerKey")
                .field("lanes", lanes)
                .field("lane_capacity", lane_capacity)
                .finish_non_exhaustive(),
        }
    }
}

/// Batch handler settings.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct BatchConfig {
    /// Messages per batch at most (at least 1).
    pub size_max: usize,
    /// How long to wait for a batch to fill after its first message.
    pub linger: Duration,
}

impl BatchConfig {
    /// Batches of up to `size_max`, waiting at most `linger` for one to fill.
    pub fn new(size_max: usize, linger: Duration) -> Self {
        Self {
            size_max: size_max.max(1),
            linger,
        }
    }
}

/// Decides which errors the poison queue takes.
type PoisonFilter = Arc<dyn Fn(&HandlerError) -> bool + Send + Sync>;

/// Where failed messages go instead of being redelivered forever.
///
/// A poisoned message is published with its id, payload and metadata, plus
/// [`PoisonQueue::REASON`], [`PoisonQueue::TOPIC`], [`PoisonQueue::HANDLER`] and
/// [`PoisonQueue::ERROR_KIND`]; once the poison topic has it, the original is acked.
#[derive(Clone)]
pub struct PoisonQueue {
    publisher: Arc<dyn Publisher>,
    topic: Arc<str>,
    filter: Option<PoisonFilter>,
}

impl PoisonQueue {
    /// Metadata key: the error's text.
    pub const REASON: &'static str = "poison_reason";
    /// Metadata key: the topic the message was consumed from.
    pub const TOPIC: &'static str = "poison_topic";
    /// Metadata key: the handler that failed.
    pub const HANDLER: &'static str = "poison_handler";
    /// Metadata key: the error kind (`transient`, `permanent`, `timed_out`, `panicked`, …).
    pub const ERROR_KIND: &'static str = "poison_error_kind";

    /// Failed messages go to `topic` through `publisher`.
    pub fn new(publisher: Arc<dyn Publisher>, topic: &str) -> Result<Self, InvalidTopic> {
        check_topic(topic)?;
        Ok(Self {
            publisher,
            topic: Arc::from(topic),
            filter: None,
        })
    }

    /// Builder: poison only errors for which `filter` is true; the others are nacked. (Open
    /// circuits and duplicates in progress elsewhere are never poisoned.)
    #[must_use]
    pub fn only_when(
        mut self,
        filter: impl Fn(&HandlerError) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.filter = Some(Arc::new(filter));
        self
    }

    /// The poison topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Never the refusals that are not the message's fault — a circuit breaker that is open,
    /// a duplicate being handled elsewhere right now: those are nacked (with their delay) and
    /// come back. Otherwise what the filter allows (everything without one).
    fn takes(&self, error: &HandlerError) -> bool {
        if matches!(
            error.kind(),
            HandlerErrorKind::CircuitOpen | HandlerErrorKind::InProgressElsewhere
        ) {
            return false;
        }
        self.filter.as_ref().is_none_or(|filter| filter(error))
    }

    async fn poison(
        &self,
        message: &Message,
        error: &HandlerError,
        context: &HandlerContext,
    ) -> Result<(), PublishError> {
        let mut poisoned = message.detached();
        poisoned.metadata.insert(Self::REASON, error.to_string());
        poisoned
            .metadata
            .insert(Self::TOPIC, context.subscribe_topic.to_string());
        poisoned
            .metadata
            .insert(Self::HANDLER, context.handler_name.to_string());
        poisoned
            .metadata
            .insert(Self::ERROR_KIND, error_kind_name(error.kind()));
        self.publisher.publish(&self.topic, vec![poisoned]).await
    }
}

impl fmt::Debug for PoisonQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoisonQueue")
            .field("topic", &self.topic)
            .field("filtered", &self.filter.is_some())
            .finish_non_exhaustive()
    }
}

fn error_kind_name(kind: HandlerErrorKind) -> &'static str {
    match kind {
        HandlerErrorKind::Transient => "transient",
        HandlerErrorKind::Permanent => "permanent",
        HandlerErrorKind::TimedOut => "timed_out",
        HandlerErrorKind::Panicked => "panicked",
        HandlerErrorKind::CircuitOpen => "circuit_open",
        HandlerErrorKind::InProgressElsewhere => "in_progress_elsewhere",
    }
}

/// Runs when the router starts, e.g. to stop it on a signal.
pub trait Plugin: Send + Sync + 'static {
    /// A short name for logs.
    fn name(&self) -> &'static str;
    /// Called once all handlers are subscribed, before the first message is handled.
    fn on_start(&self, router: &RouterHandle);
}

/// Shuts the router down on Ctrl-C (SIGINT) or, on Unix, SIGTERM.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShutdownOnSignal;

impl Plugin for ShutdownOnSignal {
    fn name(&self) -> &'static str {
        "shutdown_on_signal"
    }

    fn on_start(&self, router: &RouterHandle) {
        let router = router.clone();
        tokio::spawn(async move {
            let terminate = async {
                #[cfg(unix)]
                {
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(mut signal) => {
                            signal.recv().await;
                        }
                        Err(_) => std::future::pending::<()>().await,
                    }
                }
                #[cfg(not(unix))]
                std::future::pending::<()>().await
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received, shutting the router down"),
                () = terminate => tracing::info!("SIGTERM received, shutting the router down"),
                () = router.stopped() => return,
            }
            router.shutdown();
        });
    }
}

/// Why the router could not be built or started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    /// Two handlers share a name.
    #[error("a handler named {name:?} is already registered")]
    DuplicateHandler {
        /// The name.
        name: String,
    },
    /// A topic is not valid.
    #[error("handler {handler:?}: {source}")]
    InvalidTopic {
        /// The handler.
        handler: String,
        /// What was wrong.
        source: InvalidTopic,
    },
    /// A handler could not subscribe; nothing was started.
    #[error("handler {handler:?} could not subscribe to {topic:?}: {source}")]
    Subscribe {
        /// The handler.
        handler: String,
        /// Its topic.
        topic: String,
        /// The subscriber's error.
        source: SubscribeError,
    },
    /// The router has no handlers.
    #[error("the router has no handlers")]
    NoHandlers,
}

/// What a router run ended with.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RunReport {
    /// Handlers that ran.
    pub handlers: usize,
    /// Handler tasks aborted at the close timeout (their messages go back to the broker).
    pub aborted_tasks: usize,
    /// Errors from closing publishers and subscribers.
    pub close_errors: Vec<String>,
}

enum HandlerBody {
    Single(BoxHandler),
    Batch(Arc<dyn BatchHandler>, BatchConfig),
}

struct HandlerSpec {
    context: HandlerContext,
    subscriber: Arc<dyn Subscriber>,
    publisher: Option<Arc<dyn Publisher>>,
    body: HandlerBody,
    middleware: Vec<Arc<dyn Middleware>>,
    concurrency: Concurrency,
    poison: Option<PoisonQueue>,
    skip_router_middleware: bool,
}

/// Configures a handler just added to a [`Router`].
pub struct HandlerBuilder<'r> {
    spec: &'r mut HandlerSpec,
}

impl HandlerBuilder<'_> {
    /// Adds middleware for this handler only (inside the router's middleware; first added is
    /// outermost).
    pub fn middleware(&mut self, middleware: impl Middleware) -> &mut Self {
        self.spec.middleware.push(Arc::new(middleware));
        self
    }

    /// Sets how many messages run at once.
    pub fn concurrency(&mut self, concurrency: Concurrency) -> &mut Self {
        self.spec.concurrency = concurrency;
        self
    }

    /// A poison queue for this handler, replacing the router's.
    pub fn poison_queue(&mut self, poison: PoisonQueue) -> &mut Self {
        self.spec.poison = Some(poison);
        self
    }

    /// Runs this handler without the router-level middleware.
    pub fn without_router_middleware(&mut self) -> &mut Self {
        self.spec.skip_router_middleware = true;
        self
    }
}

impl fmt::Debug for HandlerBuilder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerBuilder")
            .field("handler", &self.spec.context.handler_name)
            .finish_non_exhaustive()
    }
}

/// Wires handlers between topics. Build it, then [`Router::start`] or [`Router::run`].
pub struct Router {
    config: RouterConfig,
    handlers: Vec<HandlerSpec>,
    middleware: Vec<Arc<dyn Middleware>>,
    plugins: Vec<Arc<dyn Plugin>>,
    poison: Option<PoisonQueue>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("config", &self.config)
            .field(
                "handlers",
                &self
                    .handlers
                    .iter()
                    .map(|h| &*h.context.handler_name)
                    .collect::<Vec<_>>(),
            )
            .field("middleware", &self.middleware)
            .finish_non_exhaustive()
    }
}

impl Default for Router {
    fn default() -> Self {
        Self::new(RouterConfig::default())
    }
}

impl Router {
    /// An empty router.
    pub fn new(config: RouterConfig) -> Self {
        Self {
            config,
            handlers: Vec::new(),
            middleware: Vec::new(),
            plugins: Vec::new(),
            poison: None,
        }
    }

    /// Adds middleware for every handler (outside each handler's own; first added is
    /// outermost). Applies to handlers added before and after.
    pub fn add_middleware(&mut self, middleware: impl Middleware) -> &mut Self {
        self.middleware.push(Arc::new(middleware));
        self
    }

    /// Adds a plugin.
    pub fn add_plugin(&mut self, plugin: impl Plugin) -> &mut Self {
        self.plugins.push(Arc::new(plugin));
        self
    }

    /// The poison queue for every handler without its own.
    pub fn poison_queue(&mut self, poison: PoisonQueue) -> &mut Self {
        self.poison = Some(poison);
        self
    }

    /// Adds a handler that consumes `subscribe_topic` and publishes its output to
    /// `publish_topic`.
    pub fn add_handler(
        &mut self,
        name: &str,
        subscribe_topic: &str,
        subscriber: Arc<dyn Subscriber>,
        publish_topic: &str,
        publisher: Arc<dyn Publisher>,
        handler: impl Handler,
    ) -> Result<HandlerBuilder<'_>, RouterError> {
        self.add(
            name,
            subscribe_topic,
            subscriber,
            Some((publish_topic, publisher)),
            HandlerBody::Single(Arc::new(handler)),
        )
    }

    /// Adds a handler that only consumes (output it returns anyway is dropped with a warning).
    pub fn add_consumer_handler(
        &mut self,
        name: &str,
        subscribe_topic: &str,
        subscriber: Arc<dyn Subscriber>,
        handler: impl Handler,
    ) -> Result<HandlerBuilder<'_>, RouterError> {
        self.add(
            name,
            subscribe_topic,
            subscriber,
            None,
            HandlerBody::Single(Arc::new(handler)),
        )
    }

    /// Adds a handler of batches. Middleware wraps single-message handlers and does not apply
    /// to batch handlers; the poison queue does (each message of a failed batch is poisoned).
    pub fn add_batch_handler(
        &mut self,
        name: &str,
        subscribe_topic: &str,
        subscriber: Arc<dyn Subscriber>,
        publish: Option<(&str, Arc<dyn Publisher>)>,
        batch: BatchConfig,
        handler: impl BatchHandler,
    ) -> Result<HandlerBuilder<'_>, RouterError> {
        self.add(
            name,
            subscribe_topic,
            subscriber,
            publish,
            HandlerBody::Batch(Arc::new(handler), batch),
        )
    }

    fn add(
        &mut self,
        name: &str,
        subscribe_topic: &str,
        subscriber: Arc<dyn Subscriber>,
        publish: Option<(&str, Arc<dyn Publisher>)>,
        body: HandlerBody,
    ) -> Result<HandlerBuilder<'_>, RouterError> {
        if self
            .handlers
            .iter()
            .any(|h| &*h.context.handler_name == name)
        {
            return Err(RouterError::DuplicateHandler {
                name: name.to_owned(),
            });
        }
        let invalid = |source| RouterError::InvalidTopic {
            handler: name.to_owned(),
            source,
        };
        check_topic(subscribe_topic).map_err(invalid)?;
        if let Some((topic, _)) = &publish {
            check_topic(topic).map_err(invalid)?;
        }
        let (publish_topic, publisher) = match publish {
            Some((topic, publisher)) => (Some(Arc::from(topic)), Some(publisher)),
            None => (None, None),
        };
        self.handlers.push(HandlerSpec {
            context: HandlerContext {
                handler_name: Arc::from(name),
                subscribe_topic: Arc::from(subscribe_topic),
                publish_topic,
            },
            subscriber,
            publisher,
            body,
            middleware: Vec::new(),
            concurrency: Concurrency::Sequential,
            poison: None,
            skip_router_middleware: false,
        });
        let spec = self.handlers.last_mut().ok_or(RouterError::NoHandlers)?;
        Ok(HandlerBuilder { spec })
    }

    /// Subscribes every handler and starts them. When a subscribe fails nothing runs and the
    /// subscriptions made so far are dropped.
    pub async fn start(self) -> Result<RunningRouter, RouterError> {
        if self.handlers.is_empty() {
            return Err(RouterError::NoHandlers);
        }
        let mut prepared = Vec::with_capacity(self.handlers.len());
        for spec in self.handlers {
            let stream = spec
                .subscriber
                .subscribe(&spec.context.subscribe_topic)
                .await
                .map_err(|source| RouterError::Subscribe {
                    handler: spec.context.handler_name.to_string(),
                    topic: spec.context.subscribe_topic.to_string(),
                    source,
                })?;
            prepared.push((spec, stream));
        }

        let handle = RouterHandle {
            shutdown: CancellationToken::new(),
            stopped: CancellationToken::new(),
        };
        let mut closables = Closables::default();
        if let Some(poison) = &self.poison {
            closables.publisher(&poison.publisher);
        }
        let mut tasks = JoinSet::new();
        let handler_count = prepared.len();
        for (spec, stream) in prepared {
            closables.subscriber(&spec.subscriber);
            if let Some(publisher) = &spec.publisher {
                closables.publisher(publisher);
            }
            if let Some(poison) = &spec.poison {
                closables.publisher(&poison.publisher);
            }
            let runtime = Arc::new(HandlerRuntime::new(
                &spec,
                if spec.skip_router_middleware {
                    &[]
                } else {
                    &self.middleware
                },
                spec.poison.clone().or_else(|| self.poison.clone()),
            ));
            let shutdown = handle.shutdown.clone();
            match spec.body {
                HandlerBody::Single(_) => match spec.concurrency {
                    Concurrency::Sequential => {
                        tasks.spawn(run_sequential(runtime, stream, shutdown));
                    }
                    Concurrency::PerKey {
                        lanes,
                        lane_capacity,
                        key,
                    } => {
                        run_per_key(
                            &mut tasks,
                            runtime,
                            stream,
                            shutdown,
                            lanes.max(1),
                            lane_capacity.max(1),
                            key,
                        );
                    }
                },
                HandlerBody::Batch(handler, config) => {
                    tasks.spawn(run_batches(runtime, handler, config, stream, shutdown));
                }
            }
        }
        for plugin in &self.plugins {
            tracing::debug!(plugin = plugin.name(), "starting router plugin");
            plugin.on_start(&handle);
        }
        tracing::info!(handlers = handler_count, "router started");
        let supervisor = tokio::spawn(supervise(
            tasks,
            closables,
            handle.clone(),
            self.config.close_timeout,
            handler_count,
        ));
        Ok(RunningRouter { handle, supervisor })
    }

    /// Starts the router and runs it until `shutdown` completes (or every subscription ends),
    /// then shuts down gracefully.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<RunReport, RouterError> {
        let running = self.start().await?;
        let handle = running.handle();
        tokio::select! {
            () = shutdown => handle.shutdown(),
            () = handle.shutting_down() => {}
        }
        Ok(running.wait().await)
    }
}

/// Controls a running router. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RouterHandle {
    shutdown: CancellationToken,
    stopped: CancellationToken,
}

impl RouterHandle {
    /// Starts a graceful shutdown (returns at once; see [`RouterHandle::stopped`]).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Completes when shutdown begins.
    pub async fn shutting_down(&self) {
        self.shutdown.cancelled().await;
    }

    /// Completes when the router has fully stopped (handlers drained, everything closed).
    pub async fn stopped(&self) {
        self.stopped.cancelled().await;
    }
}

/// A started router.
#[derive(Debug)]
pub struct RunningRouter {
    handle: RouterHandle,
    supervisor: tokio::task::JoinHandle<RunReport>,
}

impl RunningRouter {
    /// A handle to shut it down from elsewhere.
    pub fn handle(&self) -> RouterHandle {
        self.handle.clone()
    }

    /// Shuts down gracefully and waits until it stopped.
    pub async fn shutdown(self) -> RunReport {
        self.handle.shutdown();
        self.wait().await
    }

    /// Waits until the router stopped (after a shutdown, or when every subscription ended).
    pub async fn wait(self) -> RunReport {
        match self.supervisor.await {
            Ok(report) => report,
            Err(error) => RunReport {
                close_errors: vec![format!("router supervisor failed: {error}")],
                ..RunReport::default()
            },
        }
    }
}

/// Publishers and subscribers to close at the end, each once.
#[derive(Default)]
struct Closables {
    seen: HashSet<usize>,
    publishers: Vec<Arc<dyn Publisher>>,
    subscribers: Vec<Arc<dyn Subscriber>>,
}

impl Closables {
    fn publisher(&mut self, publisher: &Arc<dyn Publisher>) {
        if self
            .seen
            .insert(Arc::as_ptr(publisher).cast::<()>() as usize)
        {
            self.publishers.push(publisher.clone());
        }
    }
    fn subscriber(&mut self, subscriber: &Arc<dyn Subscriber>) {
        if self
            .seen
            .insert(Arc::as_ptr(subscriber).cast::<()>() as usize)
        {
            self.subscribers.push(subscriber.clone());
        }
    }
}

async fn supervise(
    mut tasks: JoinSet<()>,
    closables: Closables,
    handle: RouterHandle,
    close_timeout: Duration,
    handlers: usize,
) -> RunReport {
    let mut report = RunReport {
        handlers,
        ..RunReport::default()
    };
    // Run until shutdown, or until every handler ended by itself (its subscription closed).
    loop {
        tokio::select! {
            () = handle.shutdown.cancelled() => break,
            joined = tasks.join_next() => match joined {
                Some(result) => log_task_end(result),
                None => break,
            },
        }
    }
    handle.shutdown.cancel();
    tracing::info!("router shutting down: intake stopped, draining handlers");
    let drained = tokio::time::timeout(close_timeout, async {
        while let Some(result) = tasks.join_next().await {
            log_task_end(result);
        }
    })
    .await;
    if drained.is_err() {
        report.aborted_tasks = tasks.len();
        tracing::warn!(
            tasks = tasks.len(),
            close_timeout_ms = u64::try_from(close_timeout.as_millis()).unwrap_or(u64::MAX),
            "handlers still running at the close timeout: aborting them, their messages will be redelivered"
        );
        tasks.shutdown().await;
    }
    for subscriber in &closables.subscribers {
        if let Err(error) = subscriber.close().await {
            report.close_errors.push(error.to_string());
        }
    }
    for publisher in &closables.publishers {
        if let Err(error) = publisher.close().await {
            report.close_errors.push(error.to_string());
        }
    }
    tracing::info!("router stopped");
    handle.stopped.cancel();
    report
}

fn log_task_end(result: Result<(), tokio::task::JoinError>) {
    if let Err(error) = result
        && error.is_panic()
    {
        tracing::error!("a router task panicked outside a handler: {error}");
    }
}

/// One handler, ready to run messages.
struct HandlerRuntime {
    context: HandlerContext,
    chain: Option<BoxHandler>,
    publisher: Option<Arc<dyn Publisher>>,
    poison: Option<PoisonQueue>,
    acked: metrics::Counter,
    nacked: metrics::Counter,
    poisoned: metrics::Counter,
}

impl HandlerRuntime {
    fn new(
        spec: &HandlerSpec,
        router_middleware: &[Arc<dyn Middleware>],
        poison: Option<PoisonQueue>,
    ) -> Self {
        let chain = match &spec.body {
            HandlerBody::Single(handler) => {
                let mut chain = handler.clone();
                // First added is outermost: wrap from the innermost (last handler-level) out.
                for middleware in spec.middleware.iter().rev() {
                    chain = middleware.wrap(chain, &spec.context);
                }
                for middleware in router_middleware.iter().rev() {
                    chain = middleware.wrap(chain, &spec.context);
                }
                Some(chain)
            }
            HandlerBody::Batch(..) => None,
        };
        let name = spec.context.handler_name.to_string();
        let counter = |outcome: &'static str| metrics::counter!("factline_messages_handled_total", "handler" => name.clone(), "outcome" => outcome);
        Self {
            context: spec.context.clone(),
            chain,
            publisher: spec.publisher.clone(),
            poison,
            acked: counter("acked"),
            nacked: counter("nacked"),
            poisoned: counter("poisoned"),
        }
    }

    /// Runs one message through the chain and settles it.
    async fn process(&self, message: Message) {
        let Some(chain) = &self.chain else { return };
        // The call is inside the async block so that a handler panicking before it returns its
        // future (hand-written, not `async fn`) is caught too, not only one panicking in it.
        let result = AssertUnwindSafe(async { chain.handle(message.clone()).await })
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(panicked(panic)));
        self.settle(std::slice::from_ref(&message), result).await;
    }

    /// Publishes the outputs and acks, or poisons or nacks.
    async fn settle(&self, inputs: &[Message], result: HandlerResult) {
        match result {
            Ok(outputs) => {
                if !outputs.is_empty() {
                    match (&self.publisher, &self.context.publish_topic) {
                        (Some(publisher), Some(topic)) => {
                            if let Err(error) = publisher.publish(topic, outputs).await {
                                tracing::warn!(
                                    handler = %self.context.handler_name,
                                    topic = %topic,
                                    %error,
                                    "publishing the handler's output failed: the input will be redelivered"
                                );
                                for input in inputs {
                                    input.nack();
                                }
                                self.nacked.increment(inputs.len() as u64);
                                return;
                            }
                        }
                        _ => tracing::warn!(
                            handler = %self.context.handler_name,
                            messages = outputs.len(),
                            "a consumer handler returned messages; they are dropped (use add_handler to publish them)"
                        ),
                    }
                }
                for input in inputs {
                    input.ack();
                }
                self.acked.increment(inputs.len() as u64);
            }
            Err(error) => self.failed(inputs, error).await,
        }
    }

    async fn failed(&self, inputs: &[Message], error: HandlerError) {
        if let Some(poison) = self.poison.as_ref().filter(|poison| poison.takes(&error)) {
            for input in inputs {
                match poison.poison(input, &error, &self.context).await {
                    Ok(()) => {
                        tracing::warn!(
                            handler = %self.context.handler_name,
                            message_id = %input.id,
                            correlation_id = input.correlation_id().unwrap_or(""),
                            poison_topic = poison.topic(),
                            %error,
                            "message poisoned"
                        );
                        input.ack();
                        self.poisoned.increment(1);
                    }
                    Err(publish_error) => {
                        tracing::error!(
                            handler = %self.context.handler_name,
                            message_id = %input.id,
                            %publish_error,
                            %error,
                            "the poison queue refused the message: it will be redelivered"
                        );
                        nack(input, &error);
                        self.nacked.increment(1);
                    }
                }
            }
            return;
        }
        for input in inputs {
            tracing::warn!(
                handler = %self.context.handler_name,
                message_id = %input.id,
                correlation_id = input.correlation_id().unwrap_or(""),
                %error,
                "handler failed: the message will be redelivered"
            );
            nack(input, &error);
        }
        self.nacked.increment(inputs.len() as u64);
    }
}

fn nack(message: &Message, error: &HandlerError) {
    match error.redelivery_delay() {
        Some(delay) => message.nack_with_delay(delay),
        None => message.nack(),
    };
}

fn panicked(panic: Box<dyn std::any::Any + Send>) -> HandlerError {
    recoverer::panic_error(recoverer::panic_message(&*panic))
}

/// Waits for the next message unless shutdown begins first.
async fn next_message(
    stream: &mut MessageStream,
    shutdown: &CancellationToken,
    handler: &str,
) -> Option<Message> {
    loop {
        // The flag first, then the stream: while messages are ready the shutdown future is
        // never polled (polling it registers a waiter, a lock per message); a shutdown is seen
        // at the next message at the latest.
        if shutdown.is_cancelled() {
            return None;
        }
        let next = tokio::select! {
            biased;
            next = stream.next() => next,
            () = shutdown.cancelled() => return None,
        };
        match next {
            Some(Ok(message)) => return Some(message),
            Some(Err(error)) => {
                tracing::warn!(handler, %error, "subscription error");
            }
            None => {
                tracing::info!(handler, "subscription ended");
                return None;
            }
        }
    }
}

async fn run_sequential(
    runtime: Arc<HandlerRuntime>,
    mut stream: MessageStream,
    shutdown: CancellationToken,
) {
    while let Some(message) =
        next_message(&mut stream, &shutdown, &runtime.context.handler_name).await
    {
        runtime.process(message).await;
    }
}

fn run_per_key(
    tasks: &mut JoinSet<()>,
    runtime: Arc<HandlerRuntime>,
    mut stream: MessageStream,
    shutdown: CancellationToken,
    lanes: usize,
    lane_capacity: usize,
    key: KeyFn,
) {
    let mut senders = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let (sender, mut receiver) = mpsc::channel::<Message>(lane_capacity);
        senders.push(sender);
        let runtime = runtime.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            while let Some(message) = receiver.recv().await {
                if shutdown.is_cancelled() {
                    // Taken but not started: give it back.
                    message.nack();
                    continue;
                }
                runtime.process(message).await;
            }
        });
    }
    let hasher = RandomState::new();
    tasks.spawn(async move {
        let handler = runtime.context.handler_name.clone();
        while let Some(message) = next_message(&mut stream, &shutdown, &handler).await {
            let lane = {
                let hash = match key(&message) {
                    Some(key) => hasher.hash_one(key),
                    None => hasher.hash_one(&message.id),
                };
                (hash % senders.len() as u64) as usize
            };
            let Some(sender) = senders.get(lane) else {
                break;
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    message.nack();
                    break;
                }
                permit = sender.reserve() => match permit {
                    Ok(permit) => permit.send(message),
                    Err(_) => {
                        message.nack();
                        break;
                    }
                },
            }
        }
        // Dropping the senders ends the lanes once they have emptied their queues.
    });
}

async fn run_batches(
    runtime: Arc<HandlerRuntime>,
    handler: Arc<dyn BatchHandler>,
    config: BatchConfig,
    mut stream: MessageStream,
    shutdown: CancellationToken,
) {
    let handler_name = runtime.context.handler_name.clone();
    // Set when the stream ends while a batch fills: it must not be polled again (a stream that
    // returned `None` may panic when polled once more).
    let mut ended = false;
    while !ended && let Some(first) = next_message(&mut stream, &shutdown, &handler_name).await {
        let mut batch = Vec::with_capacity(config.size_max.min(1024));
        batch.push(first);
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(config.linger)
            .unwrap_or(now + Duration::from_secs(3600));
        while batch.len() < config.size_max {
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                // Messages already waiting join the batch before the linger is looked at.
                next = stream.next() => next,
                () = tokio::time::sleep_until(deadline) => break,
            };
            match next {
                Some(Ok(message)) => batch.push(message),
                Some(Err(error)) => {
                    tracing::warn!(handler = %handler_name, %error, "subscription error")
                }
                None => {
                    ended = true;
                    break;
                }
            }
        }
        let result = AssertUnwindSafe(async { handler.handle_batch(batch.clone()).await })
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(panicked(panic)));
        runtime.settle(&batch, result).await;
    }
}
