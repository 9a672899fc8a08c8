//! The publisher/subscriber contract every transport implements.
//!
//! The full contract, in MUST/SHOULD language, is `docs/specs/pubsub-adapter.md`; the shared
//! conformance suite (`testkit`, feature `testkit`) checks it.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures::Stream;

use crate::message::Message;

/// A boxed error from a transport's client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Longest topic name any backend must accept, in bytes.
pub const TOPIC_BYTES_MAX: usize = 255;

/// Checks the topic rules every backend shares: 1..=255 bytes, no control characters.
/// Backends may refuse more (a broker's own character set) with [`InvalidTopic`].
pub fn check_topic(topic: &str) -> Result<(), InvalidTopic> {
    if topic.is_empty() {
        return Err(InvalidTopic {
            topic: topic.to_owned(),
            reason: "a topic must not be empty".into(),
        });
    }
    if topic.len() > TOPIC_BYTES_MAX {
        return Err(InvalidTopic {
            topic: topic.chars().take(64).collect(),
            reason: format!(
                "a topic of {} bytes exceeds the limit of {TOPIC_BYTES_MAX} bytes",
                topic.len()
            ),
        });
    }
    if topic.chars().any(char::is_control) {
        return Err(InvalidTopic {
            topic: topic.escape_debug().to_string(),
            reason: "a topic must not contain control characters".into(),
        });
    }
    Ok(())
}

/// Where a broker adapter's new consumer — a new consumer group, or a subscription without a
/// group — starts reading its topic. Exhaustive on purpose: every adapter maps each variant to
/// its broker's own start position, and a new variant must make them say how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverFrom {
    /// The oldest message the topic still holds (late subscribers get what was retained).
    Oldest,
    /// Only messages published after the consumer was created.
    New,
}

/// A broker URL with any password replaced by `***`, for adapters' errors and logs:
/// `scheme://user:secret@host` becomes `scheme://user:***@host`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    }
}

/// A topic name a backend refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid topic {topic:?}: {reason}")]
pub struct InvalidTopic {
    /// The topic (shortened or escaped for display).
    pub topic: String,
    /// What was wrong.
    pub reason: String,
}

/// Why a publish failed. When a publish returns an error, any subset of its messages may have
/// been published (callers retry with the same message ids; consumers deduplicate).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The publisher was closed.
    #[error("the publisher is closed")]
    Closed,
    /// The topic is not acceptable to this backend.
    #[error(transparent)]
    InvalidTopic(#[from] InvalidTopic),
    /// A message exceeds the backend's size limit.
    #[error(
        "message {message_id} of {size_bytes} bytes exceeds the limit of {size_bytes_max} bytes"
    )]
    MessageTooLarge {
        /// The message's id.
        message_id: String,
        /// Its size.
        size_bytes: usize,
        /// The limit.
        size_bytes_max: usize,
    },
    /// The backend did not accept the messages in time (a full buffer, a slow broker).
    #[error("publishing timed out after {timeout_ms} ms")]
    TimedOut {
        /// How long it waited.
        timeout_ms: u64,
    },
    /// The transport failed.
    #[error("publishing failed: {0}")]
    Transport(#[source] BoxError),
}

/// Why a subscribe failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The subscriber was closed.
    #[error("the subscriber is closed")]
    Closed,
    /// The topic is not acceptable to this backend.
    #[error(transparent)]
    InvalidTopic(#[from] InvalidTopic),
    /// The transport failed.
    #[error("subscribing failed: {0}")]
    Transport(#[source] BoxError),
}

/// An error on an open subscription. After an error the stream may continue (the backend
/// reconnected) or end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// The transport failed.
    #[error("receiving failed: {0}")]
    Transport(#[source] BoxError),
}

/// Why a close failed (what could not be flushed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CloseError {
    /// Buffered messages could not be flushed in time.
    #[error("closing timed out after {timeout_ms} ms with {pending} messages unflushed")]
    TimedOut {
        /// How long it waited.
        timeout_ms: u64,
        /// Messages still unflushed.
        pending: usize,
    },
    /// The transport failed.
    #[error("closing failed: {0}")]
    Transport(#[source] BoxError),
}

/// Publishes messages to topics.
///
/// `publish` returns once the backend has accepted the messages (the broker confirmed them,
/// or for in-process backends, they are queued for every subscriber). Messages of one call
/// keep their order.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `messages` to `topic`, in order.
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<(), PublishError>;

    /// Flushes what is buffered and refuses further publishes. Idempotent.
    async fn close(&self) -> Result<(), CloseError>;
}

/// Subscribes to topics.
///
/// Whether subscriptions of one subscriber share a consumer group, and which group, is the
/// subscriber's configuration (see each backend). A message is delivered again when its
/// delivery is nacked or dropped; an acked message is not delivered again to the same group.
#[async_trait]
pub trait Subscriber: Send + Sync + 'static {
    /// Starts receiving `topic`. The stream ends when the subscriber is closed.
    async fn subscribe(&self, topic: &str) -> Result<MessageStream, SubscribeError>;

    /// Ends every open subscription (their unsettled messages are redelivered later) and
    /// refuses further subscribes. Idempotent.
    async fn close(&self) -> Result<(), CloseError>;
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for std::sync::Arc<P> {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<(), PublishError> {
        (**self).publish(topic, messages).await
    }
    async fn close(&self) -> Result<(), CloseError> {
        (**self).close().await
    }
}

#[async_trait]
impl<S: Subscriber + ?Sized> Subscriber for std::sync::Arc<S> {
    async fn subscribe(&self, topic: &str) -> Result<MessageStream, SubscribeError> {
        (**self).subscribe(topic).await
    }
    async fn close(&self) -> Result<(), CloseError> {
        (**self).close().await
    }
}

/// The messages of one subscription, in delivery order.
pub struct MessageStream {
    inner: Pin<Box<dyn Stream<Item = Result<Message, ReceiveError>> + Send>>,
}

impl MessageStream {
    /// Wraps a backend's stream. The result is fused: once it ended, it keeps answering `None`.
    pub fn new(stream: impl Stream<Item = Result<Message, ReceiveError>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(futures::StreamExt::fuse(stream)),
        }
    }
}

impl Stream for MessageStream {
    type Item = Result<Message, ReceiveError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl fmt::Debug for MessageStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageStream").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_rules() {
        assert!(check_topic("orders.placed").is_ok());
        assert!(check_topic(&"t".repeat(255)).is_ok());
        let long = check_topic(&"t".repeat(256)).err().map(|e| e.reason);
        assert_eq!(
            long.as_deref(),
            Some("a topic of 256 bytes exceeds the limit of 255 bytes")
        );
        assert!(check_topic("").is_err());
        assert_eq!(redact_url("nats://u:pw@h:1"), "nats://u:***@h:1");
        assert_eq!(redact_url("redis://:pw@h"), "redis://:***@h");
        assert_eq!(redact_url("amqp://tok@h"), "amqp://***@h");
        assert_eq!(redact_url("nats://h:1"), "nats://h:1");
        assert!(check_topic("a\nb").is_err());
    }
}
