//! Middleware for the router: retry, timeout, correlation ids, deduplication, throttle, circuit
//! breaker, delayed redelivery, panic recovery.
//!
//! Each one is a [`Middleware`](crate::Middleware): it wraps the next handler and returns a
//! handler, so it can be tested by calling the wrapped handler directly.
//!
//! | Middleware | What it does |
//! |---|---|
//! | [`CorrelationId`] | Outputs get the input's correlation id (or its id) and the input's id as causation id; the call runs in a span with the handler name, message id and correlation id. |
//! | [`DelayOnError`] | Errors without a redelivery delay get one, so the nack asks the broker to wait. |
//! | [`Deduplicator`] | Claims the message's key in a [`DedupStore`] (claim, then complete or release): duplicates are acked and skipped, a concurrent duplicate is redelivered later, a failure releases the key so its redelivery is handled. [`InMemoryDedupStore`] is bounded in time and size. |
//! | [`Retry`] | Calls again after failures with exponential backoff and jitter; never retries permanent errors. |
//! | [`CircuitBreaker`] | After consecutive failures refuses calls (kind `CircuitOpen`, redelivery after the open time left), then lets one trial through. |
//! | [`Throttle`] | At most N calls per period, evenly spaced; callers over the rate wait. |
//! | [`Timeout`] | Fails with kind `TimedOut` and drops the call when it takes too long. |
//! | [`Recoverer`] | Turns a panic into an error of kind `Panicked` with the panic message. |
//!
//! # Order
//!
//! Middleware runs in onion order: **the first added is the outermost** — it sees the message
//! first and the result last, and whatever it does covers everything inside it. The order
//! changes the meaning, so this is the recommended one, outermost first:
//!
//! 1. **[`CorrelationId`]**: its span then covers everything below (every retry's logs carry
//!    the ids), and it stamps the outputs whatever produced them.
//! 2. **[`DelayOnError`]**: outside retry, so the delay is set once on the error that is
//!    finally nacked — and on errors of the deduplicator's store too. Delays set further in
//!    (circuit breaker, deduplicator) are kept.
//! 3. **[`Deduplicator`]**: outside retry, so one claim covers all attempts of a delivery (the
//!    store's claim lease must outlast them); outside the breaker, so duplicates are skipped
//!    without touching the dependency even while it is open.
//! 4. **[`Retry`]**.
//! 5. **[`CircuitBreaker`]**: inside retry, so each attempt counts and, once the breaker opens,
//!    the retry loop stops at once (circuit-open errors are not retried by default) and the
//!    message is nacked with the breaker's delay. Outside retry it would count one failure per
//!    message, only after all its retries hammered the dead dependency.
//! 6. **[`Throttle`]**: inside retry, so retries are rate-limited too (what protects a
//!    rate-limited dependency); inside the breaker, so refused calls do not wait for a slot;
//!    outside the timeout, so waiting for a slot does not use up the call's time.
//! 7. **[`Timeout`]**: inside retry, so it bounds each attempt (outside it would bound all
//!    attempts together, backoff included); inside the breaker, so timeouts count as failures.
//! 8. **[`Recoverer`]**: innermost, so a panic becomes an ordinary error for everything above —
//!    retried, counted by the breaker, releasing the deduplication claim. Outside [`Retry`] a
//!    panic unwinds straight through the retry loop and is never retried.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use factline_messaging::middleware::{
//!     CircuitBreaker, CorrelationId, DelayOnError, Deduplicator, InMemoryDedupStore, Recoverer,
//!     Retry, RetryConfig, Throttle, Timeout,
//! };
//! use factline_messaging::Middleware;
//!
//! let chain: Vec<Box<dyn Middleware>> = vec![
//!     Box::new(CorrelationId::new()),
//!     Box::new(DelayOnError::fixed(Duration::from_secs(1))),
//!     Box::new(Deduplicator::new(Arc::new(InMemoryDedupStore::default()))),
//!     Box::new(Retry::new(RetryConfig::default().retries_max(5))),
//!     Box::new(CircuitBreaker::default()),
//!     Box::new(Throttle::new(100, Duration::from_secs(1))),
//!     Box::new(Timeout::new(Duration::from_secs(10))),
//!     Box::new(Recoverer::new()),
//! ];
//! # assert_eq!(chain.len(), 8);
//! ```
//!
//! # No poison-queue middleware
//!
//! The poison queue is not a middleware here: the router applies it outside the whole chain,
//! after the last retry, when the error is permanent or the message has failed too often. As a
//! middleware it could be placed inside [`Retry`] and take messages that a retry would have
//! handled; applied by the router it can never swallow a retry.
//!
//! # Shared state
//!
//! [`CircuitBreaker`] and [`Throttle`] keep their state in the instance: every handler one
//! instance wraps shares one breaker or one rate. [`Deduplicator`] shares its store but scopes
//! keys by handler name. The others have no state.

mod circuit_breaker;
mod correlation;
mod dedup;
mod delay_on_error;
pub(crate) mod recoverer;
mod retry;
mod throttle;
mod timeout;

pub use circuit_breaker::{CircuitBreaker, CircuitBreakerConfig, CircuitOpenError, CircuitState};
pub use correlation::CorrelationId;
pub use dedup::{
    Claim, DedupInProgress, DedupStore, DedupStoreError, DedupStoreFull, Deduplicator,
    InMemoryDedupConfig, InMemoryDedupStore,
};
pub use delay_on_error::DelayOnError;
pub use recoverer::{PanicError, Recoverer};
pub use retry::{Retry, RetryConfig, RetryGaveUp};
pub use throttle::Throttle;
pub use timeout::{Timeout, TimeoutElapsed};

#[cfg(test)]
mod order_tests;

#[cfg(test)]
pub(crate) mod test_support {
    //! A recording handler and a context for the middleware tests.

    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::Duration;

    use async_trait::async_trait;
    use tokio::time::Instant;

    use crate::handler::{
        BoxHandler, Handler, HandlerContext, HandlerError, HandlerErrorKind, HandlerResult,
        Middleware,
    };
    use crate::message::Message;

    /// The context tests wrap handlers in.
    pub(crate) fn context() -> HandlerContext {
        HandlerContext {
            handler_name: Arc::from("test-handler"),
            subscribe_topic: Arc::from("in"),
            publish_topic: Some(Arc::from("out")),
        }
    }

    /// `handler` wrapped by `middleware` in [`context`].
    pub(crate) fn wrap(middleware: &dyn Middleware, handler: impl Handler) -> BoxHandler {
        middleware.wrap(Arc::new(handler), &context())
    }

    /// `handler` wrapped by `middleware`, the first outermost.
    pub(crate) fn chain(middleware: &[&dyn Middleware], handler: impl Handler) -> BoxHandler {
        let mut handler: BoxHandler = Arc::new(handler);
        for layer in middleware.iter().rev() {
            handler = layer.wrap(handler, &context());
        }
        handler
    }

    #[derive(Default)]
    struct Record {
        times: Vec<Instant>,
        messages: Vec<Message>,
    }

    /// A handler that records its calls and fails the first `failures` of them.
    #[derive(Clone)]
    pub(crate) struct Calls {
        record: Arc<Mutex<Record>>,
        failures: usize,
        kind: HandlerErrorKind,
        delay: Option<Duration>,
    }

    impl Calls {
        pub(crate) fn succeeding() -> Self {
            Self::failing_first(0, HandlerErrorKind::Transient)
        }

        pub(crate) fn failing_always(kind: HandlerErrorKind) -> Self {
            Self::failing_first(usize::MAX, kind)
        }

        pub(crate) fn failing_first(failures: usize, kind: HandlerErrorKind) -> Self {
            Self {
                record: Arc::default(),
                failures,
                kind,
                delay: None,
            }
        }

        /// Errors ask for this redelivery delay.
        pub(crate) fn with_delay(mut self, delay: Duration) -> Self {
            self.delay = Some(delay);
            self
        }

        pub(crate) fn handler(&self) -> Self {
            self.clone()
        }

        fn record(&self) -> MutexGuard<'_, Record> {
            self.record.lock().unwrap_or_else(|e| e.into_inner())
        }

        pub(crate) fn count(&self) -> usize {
            self.record().times.len()
        }

        /// The time between consecutive calls.
        pub(crate) fn gaps(&self) -> Vec<Duration> {
            let record = self.record();
            record.times.windows(2).map(|w| w[1] - w[0]).collect()
        }

        pub(crate) fn messages(&self) -> Vec<Message> {
            self.record().messages.clone()
        }
    }

    #[async_trait]
    impl Handler for Calls {
        async fn handle(&self, message: Message) -> HandlerResult {
            let call = {
                let mut record = self.record();
                record.times.push(Instant::now());
                record.messages.push(message.clone());
                record.times.len()
            };
            if call <= self.failures {
                let error = HandlerError::with_kind(self.kind, format!("call {call} failed"));
                return Err(match self.delay {
                    Some(delay) => error.redeliver_after(delay),
                    None => error,
                });
            }
            Ok(vec![Message::new(format!("output of call {call}"))])
        }
    }
}
