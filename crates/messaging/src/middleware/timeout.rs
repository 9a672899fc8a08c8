//! [`Timeout`]: fails a handler that runs too long.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::handler::{
    BoxHandler, Handler, HandlerContext, HandlerError, HandlerErrorKind, HandlerResult, Middleware,
};
use crate::message::Message;

/// Fails with [`HandlerErrorKind::TimedOut`] when the next handler has not returned within the
/// duration. The unfinished call is dropped (cancelled at its current `.await`), so a handler
/// must be cancel-safe where that matters; work it spawned elsewhere keeps running.
///
/// Inside [`Retry`](super::Retry) the duration bounds each call; outside, all calls together.
#[derive(Debug, Clone, Copy)]
pub struct Timeout {
    duration: Duration,
}

impl Timeout {
    /// A timeout of `duration`.
    pub fn new(duration: Duration) -> Self {
        Self { duration }
    }

    /// The duration.
    pub fn duration(&self) -> Duration {
        self.duration
    }
}

impl Middleware for Timeout {
    fn name(&self) -> &'static str {
        "timeout"
    }

    fn wrap(&self, next: BoxHandler, context: &HandlerContext) -> BoxHandler {
        Arc::new(TimeoutHandler {
            next,
            duration: self.duration,
            handler_name: Arc::clone(&context.handler_name),
        })
    }
}

/// The source of the error a [`Timeout`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no result within {duration:?}")]
pub struct TimeoutElapsed {
    duration: Duration,
}

impl TimeoutElapsed {
    /// The timeout that elapsed.
    pub fn duration(&self) -> Duration {
        self.duration
    }
}

struct TimeoutHandler {
    next: BoxHandler,
    duration: Duration,
    handler_name: Arc<str>,
}

#[async_trait]
impl Handler for TimeoutHandler {
    async fn handle(&self, message: Message) -> HandlerResult {
        let id = message.id.clone();
        match tokio::time::timeout(self.duration, self.next.handle(message)).await {
            Ok(result) => result,
            Err(_elapsed) => {
                tracing::warn!(
                    handler = %self.handler_name,
                    message_id = %id,
                    timeout_ms = u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
                    "handler timed out"
                );
                Err(HandlerError::with_kind(
                    HandlerErrorKind::TimedOut,
                    TimeoutElapsed {
                        duration: self.duration,
                    },
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::time::Instant;

    use super::*;
    use crate::handler::handler_fn;
    use crate::middleware::test_support::{Calls, wrap};

    #[tokio::test(start_paused = true)]
    async fn fires_when_the_handler_runs_too_long_and_drops_it() {
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicBool::new(false));
        let slow = {
            let dropped = Arc::clone(&dropped);
            let finished = Arc::clone(&finished);
            handler_fn(move |_message: Message| {
                let guard = SetOnDrop(Arc::clone(&dropped));
                let finished = Arc::clone(&finished);
                async move {
                    let _guard = guard;
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    finished.store(true, Ordering::SeqCst);
                    Ok(vec![])
                }
            })
        };
        let handler = wrap(&Timeout::new(Duration::from_secs(2)), slow);
        let started = Instant::now();
        let error = handler.handle(Message::new("x")).await.err();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(
            error.as_ref().map(HandlerError::kind),
            Some(HandlerErrorKind::TimedOut)
        );
        assert_eq!(
            error.map(|e| e.to_string()).as_deref(),
            Some("handler timed out: no result within 2s")
        );
        assert!(
            dropped.load(Ordering::SeqCst),
            "the inner future is dropped"
        );
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!finished.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn passes_through_a_result_in_time() {
        let calls = Calls::failing_first(1, HandlerErrorKind::Permanent);
        let handler = wrap(&Timeout::new(Duration::from_secs(1)), calls.handler());
        let first = handler.handle(Message::new("x")).await;
        assert!(first.err().is_some_and(|e| e.is_permanent()));
        let second = handler.handle(Message::new("x")).await;
        assert_eq!(second.map(|out| out.len()).ok(), Some(1));
    }
}
