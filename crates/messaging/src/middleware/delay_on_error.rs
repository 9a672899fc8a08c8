//! [`DelayOnError`]: asks for delayed redelivery of messages whose handling failed.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::handler::{
    BoxHandler, Handler, HandlerContext, HandlerError, HandlerResult, Middleware,
};
use crate::message::Message;

type DelayFn = Arc<dyn Fn(&HandlerError) -> Option<Duration> + Send + Sync>;

/// Sets a redelivery delay ([`HandlerError::redeliver_after`]) on every error of the next
/// handler that has none yet, so the router's nack asks the broker to wait before redelivering
/// instead of handing the message straight back. Delays set further in (a circuit breaker's
/// open time, a deduplicator's in-progress delay) are kept.
///
/// Put it outside [`Retry`](super::Retry): the delay is for the nack after the last attempt.
#[derive(Clone)]
pub struct DelayOnError {
    delay: DelayFn,
}

impl fmt::Debug for DelayOnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DelayOnError").finish_non_exhaustive()
    }
}

impl DelayOnError {
    /// The same delay for every error.
    pub fn fixed(delay: Duration) -> Self {
        Self::from_fn(move |_error| Some(delay))
    }

    /// The delay `delay` computes from the error; `None` leaves the error without one.
    pub fn from_fn(
        delay: impl Fn(&HandlerError) -> Option<Duration> + Send + Sync + 'static,
    ) -> Self {
        Self {
            delay: Arc::new(delay),
        }
    }
}

impl Middleware for DelayOnError {
    fn name(&self) -> &'static str {
        "delay_on_error"
    }

    fn wrap(&self, next: BoxHandler, _context: &HandlerContext) -> BoxHandler {
        Arc::new(DelayHandler {
            next,
            delay: Arc::clone(&self.delay),
        })
    }
}

struct DelayHandler {
    next: BoxHandler,
    delay: DelayFn,
}

#[async_trait]
impl Handler for DelayHandler {
    async fn handle(&self, message: Message) -> HandlerResult {
        self.next.handle(message).await.map_err(|error| {
            if error.redelivery_delay().is_some() {
                return error;
            }
            match (self.delay)(&error) {
                Some(delay) => error.redeliver_after(delay),
                None => error,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::HandlerErrorKind;
    use crate::middleware::test_support::{Calls, wrap};

    #[tokio::test]
    async fn sets_the_delay_on_errors_without_one() {
        let calls = Calls::failing_first(1, HandlerErrorKind::Transient);
        let handler = wrap(
            &DelayOnError::fixed(Duration::from_secs(5)),
            calls.handler(),
        );
        let error = handler.handle(Message::new("x")).await.err();
        assert_eq!(
            error.as_ref().and_then(HandlerError::redelivery_delay),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            error.map(|e| e.kind()),
            Some(HandlerErrorKind::Transient),
            "the kind is kept"
        );
        assert!(handler.handle(Message::new("x")).await.is_ok());
    }

    #[tokio::test]
    async fn keeps_a_delay_set_further_in() {
        let calls = Calls::failing_always(HandlerErrorKind::CircuitOpen)
            .with_delay(Duration::from_millis(300));
        let handler = wrap(
            &DelayOnError::fixed(Duration::from_secs(5)),
            calls.handler(),
        );
        let delay = handler
            .handle(Message::new("x"))
            .await
            .err()
            .and_then(|e| e.redelivery_delay());
        assert_eq!(delay, Some(Duration::from_millis(300)));
    }

    #[tokio::test]
    async fn the_delay_can_depend_on_the_error() {
        let by_kind = DelayOnError::from_fn(|error| match error.kind() {
            HandlerErrorKind::TimedOut => Some(Duration::from_secs(30)),
            HandlerErrorKind::Permanent => None,
            _ => Some(Duration::from_secs(1)),
        });
        for (kind, expected) in [
            (HandlerErrorKind::TimedOut, Some(Duration::from_secs(30))),
            (HandlerErrorKind::Permanent, None),
            (HandlerErrorKind::Panicked, Some(Duration::from_secs(1))),
        ] {
            let handler = wrap(&by_kind, Calls::failing_always(kind).handler());
            let delay = handler
                .handle(Message::new("x"))
                .await
                .err()
                .and_then(|e| e.redelivery_delay());
            assert_eq!(delay, expected, "{kind:?}");
        }
    }
}
