//! [`Recoverer`]: turns a panic in the handler into an error.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;

use crate::handler::{
    BoxHandler, Handler, HandlerContext, HandlerError, HandlerErrorKind, HandlerResult, Middleware,
};
use crate::message::Message;

/// Catches a panic of the next handler (while it is called or polled) and returns it as an
/// error of kind [`HandlerErrorKind::Panicked`] whose source is a [`PanicError`] with the panic
/// message. Middleware outside it then sees an ordinary failure: [`Retry`](super::Retry)
/// retries it, a [`CircuitBreaker`](super::CircuitBreaker) counts it, a
/// [`Deduplicator`](super::Deduplicator) releases its claim at once.
///
/// The panic hook still runs (the default one prints the panic), and nothing is caught in a
/// build with `panic = "abort"`. The router recovers panics that escape the whole chain too;
/// this middleware is for placing recovery *inside* other middleware.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recoverer;

impl Recoverer {
    /// The recoverer.
    pub fn new() -> Self {
        Self
    }
}

impl Middleware for Recoverer {
    fn name(&self) -> &'static str {
        "recoverer"
    }

    fn wrap(&self, next: BoxHandler, context: &HandlerContext) -> BoxHandler {
        Arc::new(RecovererHandler {
            next,
            handler_name: Arc::clone(&context.handler_name),
        })
    }
}

/// The source of the error a [`Recoverer`] returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PanicError {
    message: String,
}

impl PanicError {
    /// The panic message (a placeholder when the payload was neither `&str` nor `String`).
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The error a caught panic becomes: kind `Panicked`, source a [`PanicError`] with its message.
/// The router's own last-resort catch uses it too.
pub(crate) fn panic_error(message: String) -> HandlerError {
    HandlerError::with_kind(HandlerErrorKind::Panicked, PanicError { message })
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&'static str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

struct RecovererHandler {
    next: BoxHandler,
    handler_name: Arc<str>,
}

#[async_trait]
impl Handler for RecovererHandler {
    async fn handle(&self, message: Message) -> HandlerResult {
        let id = message.id.clone();
        // A handler may panic before returning its future, or while it is polled.
        let result = match std::panic::catch_unwind(AssertUnwindSafe(|| self.next.handle(message)))
        {
            Ok(future) => AssertUnwindSafe(future).catch_unwind().await,
            Err(payload) => Err(payload),
        };
        result.unwrap_or_else(|payload| {
            let message = panic_message(&*payload);
            tracing::error!(
                handler = %self.handler_name,
                message_id = %id,
                panic = %message,
                "handler panicked"
            );
            Err(panic_error(message))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use super::*;
    use crate::handler::handler_fn;
    use crate::middleware::test_support::wrap;

    fn source_message(error: &HandlerError) -> Option<String> {
        error
            .source_error()
            .downcast_ref::<PanicError>()
            .map(|p| p.message().to_owned())
    }

    #[tokio::test]
    async fn converts_a_str_panic_into_a_panicked_error() {
        let handler = wrap(
            &Recoverer::new(),
            handler_fn(|_message: Message| async move {
                if true {
                    panic!("boom");
                }
                Ok(vec![])
            }),
        );
        let error = handler.handle(Message::new("x")).await.err();
        let Some(error) = error else {
            panic!("expected an error");
        };
        assert_eq!(error.kind(), HandlerErrorKind::Panicked);
        assert_eq!(source_message(&error).as_deref(), Some("boom"));
        assert_eq!(error.to_string(), "handler panicked: boom");
    }

    #[tokio::test]
    async fn converts_a_formatted_string_panic() {
        let handler = wrap(
            &Recoverer::new(),
            handler_fn(|message: Message| async move {
                if !message.payload.is_empty() {
                    panic!("bad payload of {} bytes", message.payload.len());
                }
                Ok(vec![])
            }),
        );
        let error = handler.handle(Message::new("abc")).await.err();
        assert_eq!(
            error.as_ref().and_then(source_message).as_deref(),
            Some("bad payload of 3 bytes")
        );
        // Without a panic the result passes through.
        assert!(handler.handle(Message::new("")).await.is_ok());
    }

    #[tokio::test]
    async fn converts_other_payloads_and_panics_before_the_future() {
        struct EagerPanic;
        impl Handler for EagerPanic {
            fn handle<'a, 'b>(
                &'a self,
                _message: Message,
            ) -> Pin<Box<dyn Future<Output = HandlerResult> + Send + 'b>>
            where
                'a: 'b,
            {
                std::panic::panic_any(42_u32)
            }
        }
        let handler = wrap(&Recoverer::new(), EagerPanic);
        let error = handler.handle(Message::new("x")).await.err();
        assert_eq!(
            error.as_ref().map(HandlerError::kind),
            Some(HandlerErrorKind::Panicked)
        );
        assert_eq!(
            error.as_ref().and_then(source_message).as_deref(),
            Some("panic with a non-string payload")
        );
    }
}
