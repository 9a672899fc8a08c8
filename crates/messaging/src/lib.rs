//! factline messaging: the event-driven half of factline, in the role Watermill plays for Go.
//!
//! - [`Message`]: id, metadata, payload, and the delivery it arrived with — ack and nack are
//!   idempotent, the first one wins, and the subscriber observes the outcome.
//! - [`Publisher`] and [`Subscriber`]: the contract every transport implements
//!   (`docs/specs/pubsub-adapter.md`), checked by the shared conformance suite in [`testkit`].
//! - [`InMemoryPubSub`]: fan-out, consumer groups, optional retention, redelivery, bounded.
//! - [`Forwarder`]: the outbox's second half — moves staged messages to their topics, at
//!   least once and in order.
//! - [`Router`]: handlers from topics to topics, middleware in onion order, a poison queue
//!   that cannot be misplaced, per-key ordered concurrency, batch handlers, panic recovery and
//!   graceful shutdown.
//!
//! ```
//! use factline_messaging::{InMemoryPubSub, Message, Publisher, Subscriber};
//! use futures::StreamExt;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let pubsub = InMemoryPubSub::default();
//! let mut orders = pubsub.subscriber().subscribe("orders").await?;
//! pubsub.publisher().publish("orders", vec![Message::new("order 42 placed")]).await?;
//! let message = orders.next().await.transpose()?.expect("one message");
//! assert_eq!(&message.payload[..], b"order 42 placed");
//! assert!(message.ack());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

pub mod cqrs;
mod forwarder;
mod handler;
mod memory;
mod message;
pub mod middleware;
mod pubsub;
mod router;
pub mod source;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use forwarder::{DESTINATION_KEY, ForwardError, Forwarder, ForwarderConfig, ForwarderStats};
pub use handler::{
    BatchHandler, BoxHandler, ConsumerFn, FnBatchHandler, FnHandler, Handler, HandlerContext,
    HandlerError, HandlerErrorKind, HandlerResult, Middleware, batch_handler_fn, consumer_fn,
    handler_fn,
};
pub use memory::{
    GroupStats, InMemoryConfig, InMemoryPubSub, InMemoryPublisher, InMemorySubscriber, TopicStats,
};
pub use message::{
    Acknowledger, InvalidMessageId, MESSAGE_ID_BYTES_MAX, Message, MessageId, Metadata,
    NoopAcknowledger, Outcome,
};
pub use pubsub::{
    BoxError, CloseError, DeliverFrom, InvalidTopic, MessageStream, PublishError, Publisher,
    ReceiveError, SubscribeError, Subscriber, TOPIC_BYTES_MAX, check_topic, redact_url,
};

pub use router::{
    BatchConfig, Concurrency, HandlerBuilder, KeyFn, Plugin, PoisonQueue, Router, RouterConfig,
    RouterError, RouterHandle, RunReport, RunningRouter, ShutdownOnSignal,
};

pub use bytes::Bytes;
