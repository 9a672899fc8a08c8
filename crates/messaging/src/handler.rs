//! Handlers, their errors, and the middleware that wraps them.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::message::Message;
use crate::pubsub::BoxError;

/// What a handler returns: the messages to publish (to the handler's publish topic), or why it
/// failed. On success the router publishes the messages, then acks the input; on failure it
/// nacks the input (after [`HandlerError::redelivery_delay`] when set).
pub type HandlerResult = Result<Vec<Message>, HandlerError>;

/// Handles one message.
///
/// The message is passed by value; clones are cheap (shared payload and metadata) and share the
/// delivery, so middleware that calls the next handler again (retry) passes a clone. Handlers
/// must not ack or nack themselves when run by a router: the router settles after the whole
/// chain returned.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles `message`.
    async fn handle(&self, message: Message) -> HandlerResult;
}

/// A shared, type-erased handler: what middleware wraps and returns.
pub type BoxHandler = Arc<dyn Handler>;

/// A handler from an async closure returning the messages to publish.
pub fn handler_fn<F, Fut>(function: F) -> FnHandler<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    FnHandler(function)
}

/// A handler that publishes nothing, from an async closure.
pub fn consumer_fn<F, Fut>(function: F) -> ConsumerFn<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    ConsumerFn(function)
}

/// See [`handler_fn`].
pub struct FnHandler<F>(F);

#[async_trait]
impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    async fn handle(&self, message: Message) -> HandlerResult {
        (self.0)(message).await
    }
}

impl<F> fmt::Debug for FnHandler<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnHandler")
    }
}

/// See [`consumer_fn`].
pub struct ConsumerFn<F>(F);

#[async_trait]
impl<F, Fut> Handler for ConsumerFn<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, message: Message) -> HandlerResult {
        (self.0)(message).await.map(|()| Vec::new())
    }
}

impl<F> fmt::Debug for ConsumerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConsumerFn")
    }
}

/// Handles a batch of messages at once (bulk inserts, batched API calls).
///
/// On success the router publishes the returned messages and acks every input; on failure it
/// nacks every input.
#[async_trait]
pub trait BatchHandler: Send + Sync + 'static {
    /// Handles `messages` (never empty; at most the configured batch size).
    async fn handle_batch(&self, messages: Vec<Message>) -> HandlerResult;
}

/// A batch handler from an async closure.
pub fn batch_handler_fn<F, Fut>(function: F) -> FnBatchHandler<F>
where
    F: Fn(Vec<Message>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    FnBatchHandler(function)
}

/// See [`batch_handler_fn`].
pub struct FnBatchHandler<F>(F);

#[async_trait]
impl<F, Fut> BatchHandler for FnBatchHandler<F>
where
    F: Fn(Vec<Message>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    async fn handle_batch(&self, messages: Vec<Message>) -> HandlerResult {
        (self.0)(messages).await
    }
}

impl<F> fmt::Debug for FnBatchHandler<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnBatchHandler")
    }
}

/// How a handler failed; decides what retry and the poison queue do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandlerErrorKind {
    /// Might succeed on another attempt (the default).
    Transient,
    /// Will never succeed (a payload that does not decode, an unknown message type): retry
    /// skips it and the poison queue takes it at once.
    Permanent,
    /// The handler ran longer than its timeout.
    TimedOut,
    /// The handler panicked.
    Panicked,
    /// A circuit breaker refused to call the handler.
    CircuitOpen,
    /// The same message id is being handled right now elsewhere (deduplication).
    InProgressElsewhere,
}

/// A handler's failure.
pub struct HandlerError {
    kind: HandlerErrorKind,
    source: BoxError,
    redelivery_delay: Option<Duration>,
}

impl HandlerError {
    /// A transient failure caused by `source`.
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self::with_kind(HandlerErrorKind::Transient, source)
    }

    /// A failure that no retry can mend.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self::with_kind(HandlerErrorKind::Permanent, source)
    }

    /// A failure of the given kind.
    pub fn with_kind(kind: HandlerErrorKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: source.into(),
            redelivery_delay: None,
        }
    }

    /// Builder: ask for redelivery no sooner than `delay` after the nack.
    #[must_use]
    pub fn redeliver_after(mut self, delay: Duration) -> Self {
        self.redelivery_delay = Some(delay);
        self
    }

    /// The kind.
    pub fn kind(&self) -> HandlerErrorKind {
        self.kind
    }

    /// Whether retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        self.kind == HandlerErrorKind::Permanent
    }

    /// The delay asked for before redelivery.
    pub fn redelivery_delay(&self) -> Option<Duration> {
        self.redelivery_delay
    }

    /// The underlying error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("source", &format_args!("{}", self.source))
            .field("redelivery_delay", &self.redelivery_delay)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            HandlerErrorKind::Transient => "handler failed",
            HandlerErrorKind::Permanent => "handler failed permanently",
            HandlerErrorKind::TimedOut => "handler timed out",
            HandlerErrorKind::Panicked => "handler panicked",
            HandlerErrorKind::CircuitOpen => "circuit open",
            HandlerErrorKind::InProgressElsewhere => "message in progress elsewhere",
        };
        write!(f, "{kind}: {}", self.source)
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Where a handler sits in the router: given to middleware when it wraps one.
#[derive(Debug, Clone)]
pub struct HandlerContext {
    /// The handler's name (unique in its router).
    pub handler_name: Arc<str>,
    /// The topic it consumes.
    pub subscribe_topic: Arc<str>,
    /// The topic its output goes to (`None` for consumer-only handlers).
    pub publish_topic: Option<Arc<str>>,
}

/// Wraps a handler in behaviour (retry, timeout, …).
///
/// Middleware runs in onion order: the first added is outermost, so it sees the message first
/// and the result last. Router-level middleware wraps handler-level middleware.
pub trait Middleware: Send + Sync + 'static {
    /// A short name for logs and diagnostics.
    fn name(&self) -> &'static str;

    /// Returns `next` wrapped.
    fn wrap(&self, next: BoxHandler, context: &HandlerContext) -> BoxHandler;
}

impl fmt::Debug for dyn Middleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Middleware({})", self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closures_are_handlers() {
        let echo = handler_fn(|message: Message| async move { Ok(vec![message.detached()]) });
        let out = echo.handle(Message::new("a")).await.unwrap_or_default();
        assert_eq!(out.len(), 1);
        let consume =
            consumer_fn(
                |_message: Message| async move { Err(HandlerError::permanent("bad payload")) },
            );
        let error = consume.handle(Message::new("a")).await.err();
        assert!(error.as_ref().is_some_and(HandlerError::is_permanent));
        assert_eq!(
            error.map(|e| e.to_string()).as_deref(),
            Some("handler failed permanently: bad payload")
        );
    }
}
