//! [`CorrelationId`]: ties every output message to the input that caused it.

use std::sync::Arc;

use async_trait::async_trait;
use tracing::Instrument;

use crate::handler::{BoxHandler, Handler, HandlerContext, HandlerResult, Middleware};
use crate::message::{Message, Metadata};

/// Sets correlation and causation ids on the messages a handler returns, and runs the handler
/// in a `tracing` span.
///
/// - [`Metadata::CORRELATION_ID`] of each output: the input's correlation id, or the input's id
///   when it has none (the input starts a new conversation). An output that already carries a
///   non-empty correlation id keeps it by default — a handler that deliberately starts a new
///   workflow can do so, and a handler that copies the input's metadata carries the same value
///   anyway. [`CorrelationId::overwrite`] makes every output take the input's (as Watermill
///   does).
/// - [`Metadata::CAUSATION_ID`] of each output: always the input's id, since the input is by
///   definition what caused the outputs.
/// - The span (`handle_message`, level info) records the handler name, message id and
///   correlation id, so every log line of the handler and of the middleware inside it carries
///   them. Outermost, it covers all retries.
///
/// The input message itself is not changed.
#[derive(Debug, Clone, Copy, Default)]
pub struct CorrelationId {
    overwrite: bool,
}

impl CorrelationId {
    /// Keeps correlation ids that outputs set themselves.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builder: whether the input's correlation id replaces one an output set itself.
    #[must_use]
    pub fn overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }
}

impl Middleware for CorrelationId {
    fn name(&self) -> &'static str {
        "correlation_id"
    }

    fn wrap(&self, next: BoxHandler, context: &HandlerContext) -> BoxHandler {
        Arc::new(CorrelationHandler {
            next,
            overwrite: self.overwrite,
            handler_name: Arc::clone(&context.handler_name),
        })
    }
}

struct CorrelationHandler {
    next: BoxHandler,
    overwrite: bool,
    handler_name: Arc<str>,
}

#[async_trait]
impl Handler for CorrelationHandler {
    async fn handle(&self, message: Message) -> HandlerResult {
        let causation_id = message.id.to_text();
        let correlation_id = match message.correlation_id() {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => causation_id.clone(),
        };
        let span = tracing::info_span!(
            "handle_message",
            handler = %self.handler_name,
            message_id = %causation_id,
            correlation_id = %correlation_id,
        );
        let mut output = self.next.handle(message).instrument(span).await?;
        for out in &mut output {
            let has_own = out.correlation_id().is_some_and(|id| !id.is_empty());
            if self.overwrite || !has_own {
                out.metadata
                    .insert(Metadata::CORRELATION_ID, correlation_id.as_str());
            }
            out.metadata
                .insert(Metadata::CAUSATION_ID, causation_id.as_str());
        }
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{HandlerError, handler_fn};
    use crate::middleware::test_support::wrap;

    fn outputs() -> impl Handler {
        handler_fn(|_message: Message| async move {
            Ok(vec![
                Message::new("plain"),
                Message::new("own").with_metadata(Metadata::CORRELATION_ID, "own-correlation"),
                Message::new("empty").with_metadata(Metadata::CORRELATION_ID, ""),
            ])
        })
    }

    #[tokio::test]
    async fn outputs_inherit_the_input_correlation_id_and_are_caused_by_it() {
        let handler = wrap(&CorrelationId::new(), outputs());
        let input = Message::new("in").with_metadata(Metadata::CORRELATION_ID, "c-1");
        let out = handler.handle(input.clone()).await.unwrap_or_default();
        assert_eq!(out.len(), 3);
        let input_id = input.id.to_text();
        assert!(
            out.iter()
                .all(|m| m.metadata.get(Metadata::CAUSATION_ID) == Some(input_id.as_str()))
        );
        assert_eq!(out[0].correlation_id(), Some("c-1"));
        assert_eq!(out[1].correlation_id(), Some("own-correlation"));
        assert_eq!(out[2].correlation_id(), Some("c-1"));
        assert_eq!(input.metadata.get(Metadata::CAUSATION_ID), None);
    }

    #[tokio::test]
    async fn an_input_without_correlation_id_starts_one_with_its_id() {
        let handler = wrap(&CorrelationId::new(), outputs());
        let input = Message::new("in");
        let out = handler.handle(input.clone()).await.unwrap_or_default();
        let input_id = input.id.to_text();
        assert_eq!(out[0].correlation_id(), Some(input_id.as_str()));
        assert_eq!(
            out[0].metadata.get(Metadata::CAUSATION_ID),
            Some(input_id.as_str())
        );
    }

    #[tokio::test]
    async fn overwrite_replaces_an_output_correlation_id() {
        let handler = wrap(&CorrelationId::new().overwrite(true), outputs());
        let input = Message::new("in").with_metadata(Metadata::CORRELATION_ID, "c-1");
        let out = handler.handle(input).await.unwrap_or_default();
        assert!(out.iter().all(|m| m.correlation_id() == Some("c-1")));
    }

    #[tokio::test]
    async fn errors_pass_through() {
        let handler = wrap(
            &CorrelationId::new(),
            handler_fn(|_message: Message| async move { Err(HandlerError::permanent("nope")) }),
        );
        let error = handler.handle(Message::new("in")).await.err();
        assert!(error.is_some_and(|e| e.is_permanent()));
    }

    #[tokio::test]
    async fn the_handler_runs_inside_a_span_with_the_ids() {
        use std::sync::Mutex;
        use tracing::field::{Field, Visit};
        use tracing::span::{Attributes, Id, Record};
        use tracing::{Event, Metadata as TracingMetadata, Subscriber};

        type FieldList = Vec<(String, String)>;
        #[derive(Default)]
        struct Fields(FieldList);
        impl Visit for Fields {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                self.0.push((field.name().to_owned(), format!("{value:?}")));
            }
        }
        /// Records the fields of new spans and which span is current.
        #[derive(Default)]
        struct RecorderState {
            spans: Mutex<Vec<(String, FieldList)>>,
            current: Mutex<Vec<u64>>,
        }
        #[derive(Clone, Default)]
        struct SpanRecorder(Arc<RecorderState>);
        impl Subscriber for SpanRecorder {
            fn enabled(&self, _metadata: &TracingMetadata<'_>) -> bool {
                true
            }
            fn new_span(&self, span: &Attributes<'_>) -> Id {
                let mut fields = Fields::default();
                span.record(&mut fields);
                let mut spans = self.0.spans.lock().unwrap_or_else(|e| e.into_inner());
                spans.push((span.metadata().name().to_owned(), fields.0));
                Id::from_u64(spans.len() as u64)
            }
            fn record(&self, _span: &Id, _values: &Record<'_>) {}
            fn record_follows_from(&self, _span: &Id, _follows: &Id) {}
            fn event(&self, _event: &Event<'_>) {}
            fn enter(&self, span: &Id) {
                let mut current = self.0.current.lock().unwrap_or_else(|e| e.into_inner());
                current.push(span.into_u64());
            }
            fn exit(&self, _span: &Id) {
                let mut current = self.0.current.lock().unwrap_or_else(|e| e.into_inner());
                current.pop();
            }
        }

        let recorder = SpanRecorder::default();
        let inside = Arc::new(Mutex::new(None));
        let handler = {
            let recorder = recorder.clone();
            let inside = Arc::clone(&inside);
            wrap(
                &CorrelationId::new(),
                handler_fn(move |_message: Message| {
                    let current = recorder
                        .0
                        .current
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .last()
                        .copied();
                    *inside.lock().unwrap_or_else(|e| e.into_inner()) = current;
                    async move { Ok(vec![]) }
                }),
            )
        };
        let input = Message::new("in").with_metadata(Metadata::CORRELATION_ID, "c-9");
        let id = input.id.to_text();
        let dispatch = tracing::Dispatch::new(recorder.clone());
        let result = {
            let _default = tracing::dispatcher::set_default(&dispatch);
            handler.handle(input).await
        };
        assert!(result.is_ok());
        assert_eq!(*inside.lock().unwrap_or_else(|e| e.into_inner()), Some(1));
        let spans = recorder.0.spans.lock().unwrap_or_else(|e| e.into_inner());
        let (name, fields) = &spans[0];
        assert_eq!(name, "handle_message");
        let field = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(field("handler").as_deref(), Some("test-handler"));
        assert_eq!(field("message_id"), Some(id));
        assert_eq!(field("correlation_id").as_deref(), Some("c-9"));
    }
}
