//! CQRS on top of the [`Router`]: typed commands and events, a command bus and an event bus,
//! and processors that turn typed handlers into router handlers (Watermill's CQRS component).
//!
//! # Types and names
//!
//! A command implements [`Command`], an event [`Event`]; both are serde types with a stable
//! `NAME`. The name is what goes on the wire (metadata [`Metadata::MESSAGE_TYPE`]) and into topic
//! names, so it must not change when the Rust type is renamed or moved — it is never derived
//! from `std::any::type_name`.
//!
//! A [`Marshaler`] turns a value into a [`Message`] and back. [`JsonMarshaler`] (the default)
//! writes JSON with serde_json and sets [`Metadata::MESSAGE_TYPE`] to the type's name and
//! [`Metadata::CONTENT_TYPE`] to `application/json`; it keeps the message id and metadata it is
//! given.
//!
//! # Topic layouts
//!
//! [`TopicLayout`] decides where messages go; the bus and the processor must use the same one
//! (share one [`CommandConfig`] / [`EventConfig`] between them):
//!
//! - **Per type** (the default): one topic per type, `{prefix}.{NAME}` — `commands.PlaceOrder`,
//!   `events.OrderPlaced` with the default prefixes `commands` and `events` (an empty prefix
//!   makes the topic the bare name). A message on a per-type topic whose
//!   [`Metadata::MESSAGE_TYPE`] is missing or names another type fails with a *permanent*
//!   [`HandlerError`] ([`DispatchError::MissingType`], [`DispatchError::UnexpectedType`]).
//! - **Shared**: every command (or every event) on one topic, dispatched by
//!   [`Metadata::MESSAGE_TYPE`]. Fewer topics, and one ordering across types; every handler
//!   reads (and skips) the types it does not handle.
//!
//! # Router handlers and subscribers
//!
//! [`CommandProcessor::register_into`] adds one consumer handler per command type (per-type
//! layout), or one for the shared topic (shared layout). Each router handler is *named after
//! its topic*, and `subscriber_for` is called with that name: give command handlers a
//! consumer group shared by all instances of the service, so each command is handled once.
//!
//! [`EventProcessor::register_into`] adds one consumer handler per registered event handler,
//! named with the name it was registered under, and asks `subscriber_for` for a subscriber for
//! that name. Every event handler must see every event, so map each handler name to its own
//! consumer group (with [`InMemoryPubSub`](crate::InMemoryPubSub):
//! `pubsub.subscriber_in_group(name)`; with Kafka: `group.id = name`): instances of one
//! handler then compete, different handlers each get every event.
//!
//! # Unknown types, malformed messages — the defined behaviour
//!
//! | Where | Message | Outcome |
//! |---|---|---|
//! | shared event topic | [`Metadata::MESSAGE_TYPE`] with no handler in this router handler | **acked and skipped**, logged at debug: events nobody here cares about are normal |
//! | shared command topic | [`Metadata::MESSAGE_TYPE`] with no handler | **permanent** error ([`DispatchError::UnknownCommand`]): a command must be handled by someone |
//! | per-type topic | [`Metadata::MESSAGE_TYPE`] missing or another type | **permanent** error |
//! | any topic | [`Metadata::MESSAGE_TYPE`] missing | **permanent** error ([`DispatchError::MissingType`]) |
//! | any topic | payload that does not decode as the type | **permanent** error naming the type ([`DispatchError::Undecodable`]) |
//!
//! A permanent error is not retried by the retry middleware; with a [`PoisonQueue`](crate::PoisonQueue) on the
//! router (or the handler) the message goes to the poison topic at once, with
//! [`PoisonQueue::ERROR_KIND`](crate::PoisonQueue::ERROR_KIND) `permanent`, and the original is acked. **Configure a poison
//! queue**: without one the router nacks the message, and it is redelivered forever.
//!
//! Errors returned by your handlers are passed through unchanged (transient unless you make
//! them permanent).
//!
//! # Correlation
//!
//! [`CommandBus::send`] and [`EventBus::publish`] set [`Metadata::CORRELATION_ID`] to the new
//! message's id when the metadata has none (a message sent from outside starts a new flow).
//! [`EventBus::publish_caused_by`] and [`CommandBus::send_caused_by`] copy the cause's
//! correlation id (its id when it has none) and set [`Metadata::CAUSATION_ID`] to the cause's
//! id; the cause is the [`MessageContext`] a handler is given, or any [`Message`].
//! [`Command::partition_key`] / [`Event::partition_key`] fill [`Metadata::PARTITION_KEY`] unless
//! the metadata already has one.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use factline_messaging::cqrs::{
//!     Command, CommandBus, CommandConfig, CommandProcessor, Event, EventBus, EventConfig,
//!     EventProcessor, MessageContext,
//! };
//! use factline_messaging::{InMemoryPubSub, Router, Subscriber};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct PlaceOrder {
//!     order_id: u64,
//! }
//! impl Command for PlaceOrder {
//!     const NAME: &'static str = "PlaceOrder";
//! }
//!
//! #[derive(Serialize, Deserialize)]
//! struct OrderPlaced {
//!     order_id: u64,
//! }
//! impl Event for OrderPlaced {
//!     const NAME: &'static str = "OrderPlaced";
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let pubsub = InMemoryPubSub::default();
//! let publisher = Arc::new(pubsub.publisher());
//! let commands = CommandBus::new(publisher.clone(), CommandConfig::default());
//! let events = EventBus::new(publisher, EventConfig::default());
//!
//! let mut command_processor = CommandProcessor::new(CommandConfig::default());
//! command_processor.add_handler(move |command: PlaceOrder, context: MessageContext| {
//!     let events = events.clone();
//!     async move {
//!         // ... decide, store ...
//!         let placed = OrderPlaced { order_id: command.order_id };
//!         events.publish_caused_by(&placed, &context).await?;
//!         Ok(())
//!     }
//! })?;
//!
//! let (seen, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
//! let mut event_processor = EventProcessor::new(EventConfig::default());
//! event_processor.add_handler("send-confirmation", move |event: OrderPlaced, _context| {
//!     let seen = seen.clone();
//!     async move {
//!         let _ = seen.send(event.order_id);
//!         Ok(())
//!     }
//! })?;
//!
//! let mut router = Router::default();
//! let group = |name: &str| -> Arc<dyn Subscriber> { Arc::new(pubsub.subscriber_in_group(name)) };
//! command_processor.register_into(&mut router, group)?;
//! event_processor.register_into(&mut router, group)?;
//! let running = router.start().await?;
//!
//! commands.send(&PlaceOrder { order_id: 42 }).await?;
//! let order_id = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await?;
//! assert_eq!(order_id, Some(42));
//! running.shutdown().await;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::handler::{Handler, HandlerError, HandlerResult};
use crate::message::{Message, MessageId, Metadata};
use crate::pubsub::{BoxError, PublishError, Publisher, Subscriber};
use crate::router::{HandlerBuilder, Router, RouterError};

/// A command: a request to do something, handled by exactly one handler.
pub trait Command: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable name on the wire and in topic names (never `std::any::type_name`).
    const NAME: &'static str;

    /// The ordering key ([`Metadata::PARTITION_KEY`]), e.g. the target aggregate's id. Used
    /// when the metadata given to the bus has none.
    fn partition_key(&self) -> Option<String> {
        None
    }
}

/// An event: something that happened, seen by every interested handler.
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable name on the wire and in topic names (never `std::any::type_name`).
    const NAME: &'static str;

    /// The ordering key ([`Metadata::PARTITION_KEY`]), e.g. the aggregate's id. Used when the
    /// metadata given to the bus has none.
    fn partition_key(&self) -> Option<String> {
        None
    }
}

/// The `application/json` content type.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Turns typed values into messages and back.
///
/// An implementation must set [`Metadata::MESSAGE_TYPE`] to `type_name` (the processors
/// dispatch on it) and should set [`Metadata::CONTENT_TYPE`]; it must keep the id and the other
/// metadata it is given.
pub trait Marshaler: Send + Sync + 'static {
    /// A message with id `id`, the metadata `metadata` (plus type and content type) and
    /// `value` encoded as the payload.
    fn marshal<T: Serialize + ?Sized>(
        &self,
        type_name: &str,
        value: &T,
        id: MessageId,
        metadata: Metadata,
    ) -> Result<Message, MarshalError>;

    /// Decodes the payload of `message` as a `type_name`.
    fn unmarshal<T: DeserializeOwned>(
        &self,
        type_name: &str,
        message: &Message,
    ) -> Result<T, UnmarshalError>;
}

/// JSON with serde_json.
///
/// Unmarshalling refuses a message whose [`Metadata::CONTENT_TYPE`] is present and is not
/// `application/json` (parameters such as `; charset=utf-8` are ignored); a message without a
/// content type is decoded as JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonMarshaler;

impl Marshaler for JsonMarshaler {
    fn marshal<T: Serialize + ?Sized>(
        &self,
        type_name: &str,
        value: &T,
        id: MessageId,
        mut metadata: Metadata,
    ) -> Result<Message, MarshalError> {
        let payload = serde_json::to_vec(value).map_err(|source| MarshalError::Json {
            type_name: type_name.to_owned(),
            source,
        })?;
        metadata.insert(Metadata::MESSAGE_TYPE, type_name);
        metadata.insert(Metadata::CONTENT_TYPE, CONTENT_TYPE_JSON);
        let mut message = Message::with_id(id, payload);
        message.metadata = metadata;
        Ok(message)
    }

    fn unmarshal<T: DeserializeOwned>(
        &self,
        type_name: &str,
        message: &Message,
    ) -> Result<T, UnmarshalError> {
        if let Some(content_type) = message.metadata.get(Metadata::CONTENT_TYPE) {
            let media_type = content_type.split(';').next().unwrap_or_default().trim();
            if !media_type.eq_ignore_ascii_case(CONTENT_TYPE_JSON) {
                return Err(UnmarshalError::ContentType {
                    type_name: type_name.to_owned(),
                    message_id: message.id.clone(),
                    content_type: content_type.to_owned(),
                    expected: CONTENT_TYPE_JSON,
                });
            }
        }
        serde_json::from_slice(&message.payload).map_err(|source| UnmarshalError::Json {
            type_name: type_name.to_owned(),
            message_id: message.id.clone(),
            source,
        })
    }
}

/// Why a value could not be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MarshalError {
    /// serde_json refused the value.
    #[error("cannot encode a {type_name} as JSON: {source}")]
    Json {
        /// The type's name.
        type_name: String,
        /// serde_json's error.
        source: serde_json::Error,
    },
    /// Another marshaler's encoder failed.
    #[error("cannot encode a {type_name}: {source}")]
    Encode {
        /// The type's name.
        type_name: String,
        /// The encoder's error.
        source: BoxError,
    },
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnmarshalError {
    /// The payload is not JSON of the type.
    #[error("message {message_id}: the payload is not a valid {type_name}: {source}")]
    Json {
        /// The type's name.
        type_name: String,
        /// The message.
        message_id: MessageId,
        /// serde_json's error.
        source: serde_json::Error,
    },
    /// The message has a content type this marshaler does not read.
    #[error(
        "message {message_id}: cannot decode a {type_name} from content type {content_type:?} \
         (expected {expected:?})"
    )]
    ContentType {
        /// The type's name.
        type_name: String,
        /// The message.
        message_id: MessageId,
        /// Its content type.
        content_type: String,
        /// The content type the marshaler reads.
        expected: &'static str,
    },
    /// Another marshaler's decoder failed.
    #[error("message {message_id}: the payload is not a valid {type_name}: {source}")]
    Decode {
        /// The type's name.
        type_name: String,
        /// The message.
        message_id: MessageId,
        /// The decoder's error.
        source: BoxError,
    },
}

/// Why a processor refused a message; always wrapped in a *permanent* [`HandlerError`]
/// (downcast [`HandlerError::source_error`] to read it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// The message has no [`Metadata::MESSAGE_TYPE`].
    #[error("message {message_id} on {topic:?} has no message_type metadata")]
    MissingType {
        /// The topic it was consumed from.
        topic: String,
        /// The message.
        message_id: MessageId,
    },
    /// A per-type topic carried a message of another type.
    #[error(
        "message {message_id} on {topic:?} is a {found:?}, but the topic carries only {expected:?}"
    )]
    UnexpectedType {
        /// The topic it was consumed from.
        topic: String,
        /// The message.
        message_id: MessageId,
        /// The topic's type.
        expected: &'static str,
        /// The message's type.
        found: String,
    },
    /// A shared command topic carried a command nobody handles.
    #[error("message {message_id} on {topic:?}: no handler for command type {message_type:?}")]
    UnknownCommand {
        /// The topic it was consumed from.
        topic: String,
        /// The message.
        message_id: MessageId,
        /// The command's type.
        message_type: String,
    },
    /// The payload does not decode as its type.
    #[error(transparent)]
    Undecodable(#[from] UnmarshalError),
}

/// Why a command or event could not be sent or published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// It could not be encoded.
    #[error(transparent)]
    Marshal(#[from] MarshalError),
    /// The publisher failed (the message may have been published anyway: retry with the same
    /// id, see [`CommandBus::send_with_id`]).
    #[error("publishing a {type_name} to {topic:?} failed: {source}")]
    Publish {
        /// The type's name.
        type_name: String,
        /// The topic.
        topic: String,
        /// The publisher's error.
        source: PublishError,
    },
}

/// Lets a handler use `?` on the buses: an encoding failure is permanent, a publish failure
/// transient.
impl From<SendError> for HandlerError {
    fn from(error: SendError) -> Self {
        match error {
            SendError::Marshal(_) => HandlerError::permanent(error),
            SendError::Publish { .. } => HandlerError::new(error),
        }
    }
}

/// Why a handler could not be registered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// A command type already has its one handler.
    #[error("a handler for command type {command:?} is already registered")]
    DuplicateCommandHandler {
        /// The command's name.
        command: &'static str,
    },
    /// An event handler of that name is already registered.
    #[error("an event handler named {name:?} is already registered")]
    DuplicateEventHandler {
        /// The handler's name.
        name: String,
    },
    /// The router refused a handler (a name it already has, an invalid topic). Handlers added
    /// before the failing one stay in the router.
    #[error(transparent)]
    Router(#[from] RouterError),
}

/// Where the messages of each type go.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopicLayout {
    /// One topic per type: `{prefix}.{NAME}`, or `NAME` when the prefix is empty.
    PerType {
        /// The prefix.
        prefix: String,
    },
    /// All types on one topic, dispatched by [`Metadata::MESSAGE_TYPE`].
    Shared {
        /// The topic.
        topic: String,
    },
}

impl TopicLayout {
    /// One topic per type under `prefix`.
    pub fn per_type(prefix: impl Into<String>) -> Self {
        Self::PerType {
            prefix: prefix.into(),
        }
    }

    /// Everything on `topic`.
    pub fn shared(topic: impl Into<String>) -> Self {
        Self::Shared {
            topic: topic.into(),
        }
    }

    /// The topic for the type named `type_name`.
    pub fn topic_for(&self, type_name: &str) -> String {
        match self {
            Self::PerType { prefix } if prefix.is_empty() => type_name.to_owned(),
            Self::PerType { prefix } => format!("{prefix}.{type_name}"),
            Self::Shared { topic } => topic.clone(),
        }
    }

    /// Whether all types share one topic.
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Shared { .. })
    }
}

macro_rules! bus_config {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[non_exhaustive]
        pub struct $name<M = JsonMarshaler> {
            /// Where the messages go.
            pub layout: TopicLayout,
            /// How they are encoded.
            pub marshaler: Arc<M>,
        }

        impl $name {
            #[doc = concat!("Per-type topics under `", $prefix, "`, JSON.")]
            pub fn new() -> Self {
                Self {
                    layout: TopicLayout::per_type($prefix),
                    marshaler: Arc::new(JsonMarshaler),
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl<M: Marshaler> $name<M> {
            #[doc = concat!("Builder: one topic per ", $kind, " type, `{prefix}.{NAME}`.")]
            #[must_use]
            pub fn per_type(mut self, prefix: impl Into<String>) -> Self {
                self.layout = TopicLayout::per_type(prefix);
                self
            }

            #[doc = concat!("Builder: every ", $kind, " on `topic`.")]
            #[must_use]
            pub fn shared(mut self, topic: impl Into<String>) -> Self {
                self.layout = TopicLayout::shared(topic);
                self
            }

            /// Builder: the layout.
            #[must_use]
            pub fn layout(mut self, layout: TopicLayout) -> Self {
                self.layout = layout;
                self
            }

            /// Builder: another marshaler.
            pub fn marshaler<N: Marshaler>(self, marshaler: N) -> $name<N> {
                $name {
                    layout: self.layout,
                    marshaler: Arc::new(marshaler),
                }
            }

            #[doc = concat!("The topic of the ", $kind, " type named `type_name`.")]
            pub fn topic_for(&self, type_name: &str) -> String {
                self.layout.topic_for(type_name)
            }
        }

        impl<M> Clone for $name<M> {
            fn clone(&self) -> Self {
                Self {
                    layout: self.layout.clone(),
                    marshaler: self.marshaler.clone(),
                }
            }
        }

        impl<M> fmt::Debug for $name<M> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("layout", &self.layout)
                    .field("marshaler", &std::any::type_name::<M>())
                    .finish()
            }
        }
    };
}

bus_config!(
    /// Topics and encoding of commands; share one between the [`CommandBus`] and the
    /// [`CommandProcessor`].
    CommandConfig,
    "commands",
    "command"
);

bus_config!(
    /// Topics and encoding of events; share one between the [`EventBus`] and the
    /// [`EventProcessor`].
    EventConfig,
    "events",
    "event"
);

/// What a handler knows about the message it handles.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MessageContext {
    /// The incoming message's id.
    pub message_id: MessageId,
    /// Its metadata.
    pub metadata: Metadata,
    /// The topic it was consumed from.
    pub topic: Arc<str>,
    /// The router handler that consumed it.
    pub handler_name: Arc<str>,
}

impl MessageContext {
    /// The context of `message` consumed from `topic` by `handler_name` (for calling handlers
    /// directly, e.g. in tests).
    pub fn for_message(message: &Message, topic: &str, handler_name: &str) -> Self {
        Self {
            message_id: message.id.clone(),
            metadata: message.metadata.clone(),
            topic: Arc::from(topic),
            handler_name: Arc::from(handler_name),
        }
    }

    /// The correlation id, when set.
    pub fn correlation_id(&self) -> Option<&str> {
        self.metadata.get(Metadata::CORRELATION_ID)
    }

    /// The message type, when set.
    pub fn message_type(&self) -> Option<&str> {
        self.metadata.get(Metadata::MESSAGE_TYPE)
    }
}

/// A message that causes others: its id becomes their causation id, its correlation id theirs.
pub trait Cause {
    /// The causing message's id.
    fn cause_id(&self) -> &MessageId;
    /// The causing message's metadata.
    fn cause_metadata(&self) -> &Metadata;

    /// Metadata for a message caused by this one: [`Metadata::CORRELATION_ID`] copied (this
    /// message's id when it has none), [`Metadata::CAUSATION_ID`] this message's id.
    fn caused_metadata(&self) -> Metadata {
        let id = self.cause_id().to_string();
        let correlation = self
            .cause_metadata()
            .get(Metadata::CORRELATION_ID)
            .map_or_else(|| id.clone(), str::to_owned);
        Metadata::new()
            .with(Metadata::CORRELATION_ID, correlation)
            .with(Metadata::CAUSATION_ID, id)
    }
}

impl Cause for MessageContext {
    fn cause_id(&self) -> &MessageId {
        &self.message_id
    }
    fn cause_metadata(&self) -> &Metadata {
        &self.metadata
    }
}

impl Cause for Message {
    fn cause_id(&self) -> &MessageId {
        &self.id
    }
    fn cause_metadata(&self) -> &Metadata {
        &self.metadata
    }
}

/// `metadata` with [`Metadata::PARTITION_KEY`] from `key` unless it has one.
fn with_partition_key(mut metadata: Metadata, key: impl FnOnce() -> Option<String>) -> Metadata {
    if !metadata.contains_key(Metadata::PARTITION_KEY)
        && let Some(key) = key()
    {
        metadata.insert(Metadata::PARTITION_KEY, key);
    }
    metadata
}

/// Encodes and publishes one message; shared by both buses.
async fn publish_one<M: Marshaler, T: Serialize>(
    publisher: &dyn Publisher,
    marshaler: &M,
    layout: &TopicLayout,
    type_name: &str,
    value: &T,
    id: MessageId,
    mut metadata: Metadata,
) -> Result<MessageId, SendError> {
    if !metadata.contains_key(Metadata::CORRELATION_ID) {
        metadata.insert(Metadata::CORRELATION_ID, id.to_string());
    }
    let message = marshaler.marshal(type_name, value, id.clone(), metadata)?;
    let topic = layout.topic_for(type_name);
    publisher
        .publish(&topic, vec![message])
        .await
        .map_err(|source| SendError::Publish {
            type_name: type_name.to_owned(),
            topic,
            source,
        })?;
    Ok(id)
}

/// Sends commands. Cheap to clone.
pub struct CommandBus<M = JsonMarshaler> {
    publisher: Arc<dyn Publisher>,
    config: CommandConfig<M>,
}

impl<M: Marshaler> CommandBus<M> {
    /// Sends through `publisher` to the topics of `config`.
    pub fn new(publisher: Arc<dyn Publisher>, config: CommandConfig<M>) -> Self {
        Self { publisher, config }
    }

    /// Its configuration.
    pub fn config(&self) -> &CommandConfig<M> {
        &self.config
    }

    /// Sends `command` as one message with a new id, which it returns.
    pub async fn send<C: Command>(&self, command: &C) -> Result<MessageId, SendError> {
        self.send_with_id(command, MessageId::new_v7(), Metadata::new())
            .await
    }

    /// Sends `command` with `metadata` (type and content type are set by the marshaler).
    pub async fn send_with<C: Command>(
        &self,
        command: &C,
        metadata: Metadata,
    ) -> Result<MessageId, SendError> {
        self.send_with_id(command, MessageId::new_v7(), metadata)
            .await
    }

    /// Sends `command` with the id `id` — to retry a send that failed without duplicating it
    /// (consumers deduplicate by id).
    pub async fn send_with_id<C: Command>(
        &self,
        command: &C,
        id: MessageId,
        metadata: Metadata,
    ) -> Result<MessageId, SendError> {
        let metadata = with_partition_key(metadata, || command.partition_key());
        self.send_named(C::NAME, command, id, metadata).await
    }

    /// Sends `payload` as a command named `type_name`, with the id `id` — for a command kept
    /// in encoded form and sent (again) later, e.g. one a process manager recorded before a
    /// restart. `metadata` should carry the partition key the typed command would have.
    pub async fn send_named<T: Serialize>(
        &self,
        type_name: &str,
        payload: &T,
        id: MessageId,
        metadata: Metadata,
    ) -> Result<MessageId, SendError> {
        publish_one(
            &*self.publisher,
            &*self.config.marshaler,
            &self.config.layout,
            type_name,
            payload,
            id,
            metadata,
        )
        .await
    }

    /// Sends `command` caused by `cause` (e.g. from an event handler: a saga or process
    /// manager), see [`Cause::caused_metadata`].
    pub async fn send_caused_by<C: Command>(
        &self,
        command: &C,
        cause: &impl Cause,
    ) -> Result<MessageId, SendError> {
        self.send_with(command, cause.caused_metadata()).await
    }
}

impl<M> Clone for CommandBus<M> {
    fn clone(&self) -> Self {
        Self {
            publisher: self.publisher.clone(),
            config: self.config.clone(),
        }
    }
}

impl<M> fmt::Debug for CommandBus<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandBus")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Publishes events. Cheap to clone.
pub struct EventBus<M = JsonMarshaler> {
    publisher: Arc<dyn Publisher>,
    config: EventConfig<M>,
}

impl<M: Marshaler> EventBus<M> {
    /// Publishes through `publisher` to the topics of `config`.
    pub fn new(publisher: Arc<dyn Publisher>, config: EventConfig<M>) -> Self {
        Self { publisher, config }
    }

    /// Its configuration.
    pub fn config(&self) -> &EventConfig<M> {
        &self.config
    }

    /// Publishes `event` as one message with a new id, which it returns.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<MessageId, SendError> {
        self.publish_with_id(event, MessageId::new_v7(), Metadata::new())
            .await
    }

    /// Publishes `event` with `metadata` (type and content type are set by the marshaler).
    pub async fn publish_with<E: Event>(
        &self,
        event: &E,
        metadata: Metadata,
    ) -> Result<MessageId, SendError> {
        self.publish_with_id(event, MessageId::new_v7(), metadata)
            .await
    }

    /// Publishes `event` with the id `id` — to retry a publish that failed without
    /// duplicating it (consumers deduplicate by id).
    pub async fn publish_with_id<E: Event>(
        &self,
        event: &E,
        id: MessageId,
        metadata: Metadata,
    ) -> Result<MessageId, SendError> {
        publish_one(
            &*self.publisher,
            &*self.config.marshaler,
            &self.config.layout,
            E::NAME,
            event,
            id,
            with_partition_key(metadata, || event.partition_key()),
        )
        .await
    }

    /// Publishes `event` caused by `cause` — typically the [`MessageContext`] of the command
    /// being handled: the correlation id is copied and the causation id is the cause's id
    /// (see [`Cause::caused_metadata`]).
    pub async fn publish_caused_by<E: Event>(
        &self,
        event: &E,
        cause: &impl Cause,
    ) -> Result<MessageId, SendError> {
        self.publish_with(event, cause.caused_metadata()).await
    }
}

impl<M> Clone for EventBus<M> {
    fn clone(&self) -> Self {
        Self {
            publisher: self.publisher.clone(),
            config: self.config.clone(),
        }
    }
}

impl<M> fmt::Debug for EventBus<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBus")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A typed handler behind a type-erased front: decodes, then calls the handler.
type ErasedHandler = Arc<
    dyn Fn(&Message, MessageContext) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync,
>;

fn erase<T, M, F, Fut>(type_name: &'static str, marshaler: Arc<M>, handler: F) -> ErasedHandler
where
    T: DeserializeOwned + Send + 'static,
    M: Marshaler,
    F: Fn(T, MessageContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    Arc::new(move |message: &Message, context: MessageContext| {
        match marshaler.unmarshal::<T>(type_name, message) {
            Ok(value) => Box::pin(handler(value, context)),
            Err(error) => {
                let error = HandlerError::permanent(DispatchError::Undecodable(error));
                Box::pin(std::future::ready(Err(error)))
            }
        }
    })
}

/// How a router handler picks the typed handler for a message.
enum Routes {
    /// A per-type topic: only `type_name`; any other type (or none) is permanent.
    Single {
        type_name: &'static str,
        handler: ErasedHandler,
    },
    /// A shared command topic: by type; an unknown type is permanent.
    Commands(BTreeMap<&'static str, ErasedHandler>),
    /// One event handler on a shared event topic: other types are skipped.
    SharedEvent {
        type_name: &'static str,
        handler: ErasedHandler,
    },
}

/// The router handler the processors add.
struct Dispatcher {
    topic: Arc<str>,
    handler_name: Arc<str>,
    routes: Routes,
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let types: Vec<&str> = match &self.routes {
            Routes::Single { type_name, .. } | Routes::SharedEvent { type_name, .. } => {
                vec![type_name]
            }
            Routes::Commands(handlers) => handlers.keys().copied().collect(),
        };
        f.debug_struct("Dispatcher")
            .field("topic", &self.topic)
            .field("handler_name", &self.handler_name)
            .field("types", &types)
            .finish()
    }
}

impl Dispatcher {
    /// The typed handler for `message`: `Ok(None)` to skip it, `Err` to refuse it.
    fn route(&self, message: &Message) -> Result<Option<&ErasedHandler>, HandlerError> {
        let Some(found) = message.metadata.get(Metadata::MESSAGE_TYPE) else {
            return Err(HandlerError::permanent(DispatchError::MissingType {
                topic: self.topic.to_string(),
                message_id: message.id.clone(),
            }));
        };
        match &self.routes {
            Routes::Single { type_name, handler } => {
                if found == *type_name {
                    Ok(Some(handler))
                } else {
                    Err(HandlerError::permanent(DispatchError::UnexpectedType {
                        topic: self.topic.to_string(),
                        message_id: message.id.clone(),
                        expected: type_name,
                        found: found.to_owned(),
                    }))
                }
            }
            Routes::Commands(handlers) => match handlers.get(found) {
                Some(handler) => Ok(Some(handler)),
                None => Err(HandlerError::permanent(DispatchError::UnknownCommand {
                    topic: self.topic.to_string(),
                    message_id: message.id.clone(),
                    message_type: found.to_owned(),
                })),
            },
            Routes::SharedEvent { type_name, handler } => {
                if found == *type_name {
                    Ok(Some(handler))
                } else {
                    tracing::debug!(
                        handler = %self.handler_name,
                        topic = %self.topic,
                        message_id = %message.id,
                        message_type = found,
                        "no handler for this event type here: acked and skipped"
                    );
                    Ok(None)
                }
            }
        }
    }
}

#[async_trait]
impl Handler for Dispatcher {
    async fn handle(&self, message: Message) -> HandlerResult {
        let Some(handler) = self.route(&message)? else {
            return Ok(Vec::new());
        };
        let context = MessageContext {
            message_id: message.id.clone(),
            metadata: message.metadata.clone(),
            topic: self.topic.clone(),
            handler_name: self.handler_name.clone(),
        };
        handler(&message, context).await.map(|()| Vec::new())
    }
}

/// Adds `dispatcher` as a consumer handler and lets `configure` adjust it.
fn add_dispatcher(
    router: &mut Router,
    dispatcher: Dispatcher,
    subscriber_for: &mut impl FnMut(&str) -> Arc<dyn Subscriber>,
    configure: &mut impl FnMut(&str, &mut HandlerBuilder<'_>),
) -> Result<(), RegisterError> {
    let name = dispatcher.handler_name.clone();
    let topic = dispatcher.topic.clone();
    let subscriber = subscriber_for(&name);
    let mut builder = router.add_consumer_handler(&name, &topic, subscriber, dispatcher)?;
    configure(&name, &mut builder);
    Ok(())
}

/// Handles commands: exactly one handler per command type.
pub struct CommandProcessor<M = JsonMarshaler> {
    config: CommandConfig<M>,
    handlers: BTreeMap<&'static str, ErasedHandler>,
}

impl<M: Marshaler> CommandProcessor<M> {
    /// A processor reading the topics of `config` (share it with the [`CommandBus`]).
    pub fn new(config: CommandConfig<M>) -> Self {
        Self {
            config,
            handlers: BTreeMap::new(),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &CommandConfig<M> {
        &self.config
    }

    /// Registers the handler of commands of type `C`; a second handler for the same type (or
    /// for another type of the same name) is refused with
    /// [`RegisterError::DuplicateCommandHandler`].
    ///
    /// The handler gets the decoded command and the incoming message's context (its id and
    /// metadata, to publish events caused by it). Its errors go to the router unchanged.
    pub fn add_handler<C, F, Fut>(&mut self, handler: F) -> Result<&mut Self, RegisterError>
    where
        C: Command,
        F: Fn(C, MessageContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        if self.handlers.contains_key(C::NAME) {
            return Err(RegisterError::DuplicateCommandHandler { command: C::NAME });
        }
        let erased = erase::<C, M, F, Fut>(C::NAME, self.config.marshaler.clone(), handler);
        self.handlers.insert(C::NAME, erased);
        Ok(self)
    }

    /// The names of the command types with a handler, in order.
    pub fn command_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.handlers.keys().copied()
    }

    /// Adds the router handlers: one per command type (per-type layout) or one for the shared
    /// topic, each named after its topic. `subscriber_for` gets that name; give all instances
    /// of the service the same consumer group for it.
    pub fn register_into(
        &self,
        router: &mut Router,
        subscriber_for: impl FnMut(&str) -> Arc<dyn Subscriber>,
    ) -> Result<(), RegisterError> {
        self.register_into_with(router, subscriber_for, |_, _| {})
    }

    /// [`CommandProcessor::register_into`], then `configure` for each router handler added
    /// (by name): middleware, concurrency, a poison queue of its own.
    pub fn register_into_with(
        &self,
        router: &mut Router,
        mut subscriber_for: impl FnMut(&str) -> Arc<dyn Subscriber>,
        mut configure: impl FnMut(&str, &mut HandlerBuilder<'_>),
    ) -> Result<(), RegisterError> {
        if self.handlers.is_empty() {
            return Ok(());
        }
        match &self.config.layout {
            TopicLayout::Shared { topic } => {
                let topic: Arc<str> = Arc::from(topic.as_str());
                let dispatcher = Dispatcher {
                    handler_name: topic.clone(),
                    topic,
                    routes: Routes::Commands(self.handlers.clone()),
                };
                add_dispatcher(router, dispatcher, &mut subscriber_for, &mut configure)
            }
            layout @ TopicLayout::PerType { .. } => {
                for (type_name, handler) in &self.handlers {
                    let topic: Arc<str> = Arc::from(layout.topic_for(type_name));
                    let dispatcher = Dispatcher {
                        handler_name: topic.clone(),
                        topic,
                        routes: Routes::Single {
                            type_name,
                            handler: handler.clone(),
                        },
                    };
                    add_dispatcher(router, dispatcher, &mut subscriber_for, &mut configure)?;
                }
                Ok(())
            }
        }
    }
}

impl<M> fmt::Debug for CommandProcessor<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandProcessor")
            .field("config", &self.config)
            .field("commands", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

struct NamedEventHandler {
    type_name: &'static str,
    handler: ErasedHandler,
}

/// Handles events: any number of named handlers per event type, each seeing every event.
pub struct EventProcessor<M = JsonMarshaler> {
    config: EventConfig<M>,
    handlers: BTreeMap<String, NamedEventHandler>,
}

impl<M: Marshaler> EventProcessor<M> {
    /// A processor reading the topics of `config` (share it with the [`EventBus`]).
    pub fn new(config: EventConfig<M>) -> Self {
        Self {
            config,
            handlers: BTreeMap::new(),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &EventConfig<M> {
        &self.config
    }

    /// Registers a handler of events of type `E` under `name`, which must be unique in this
    /// processor ([`RegisterError::DuplicateEventHandler`]) and in the router: it becomes the
    /// router handler's name and the key `subscriber_for` maps to a consumer group.
    pub fn add_handler<E, F, Fut>(
        &mut self,
        name: &str,
        handler: F,
    ) -> Result<&mut Self, RegisterError>
    where
        E: Event,
        F: Fn(E, MessageContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        if self.handlers.contains_key(name) {
            return Err(RegisterError::DuplicateEventHandler {
                name: name.to_owned(),
            });
        }
        let erased = erase::<E, M, F, Fut>(E::NAME, self.config.marshaler.clone(), handler);
        self.handlers.insert(
            name.to_owned(),
            NamedEventHandler {
                type_name: E::NAME,
                handler: erased,
            },
        );
        Ok(self)
    }

    /// The registered handlers' names with their event type, by name.
    pub fn handler_names(&self) -> impl Iterator<Item = (&str, &'static str)> + '_ {
        self.handlers
            .iter()
            .map(|(name, handler)| (name.as_str(), handler.type_name))
    }

    /// Adds one router handler per event handler, under the handler's name, subscribed
    /// through `subscriber_for(name)` to its event type's topic. Give each name its own
    /// consumer group, so every handler sees every event.
    pub fn register_into(
        &self,
        router: &mut Router,
        subscriber_for: impl FnMut(&str) -> Arc<dyn Subscriber>,
    ) -> Result<(), RegisterError> {
        self.register_into_with(router, subscriber_for, |_, _| {})
    }

    /// [`EventProcessor::register_into`], then `configure` for each router handler added (by
    /// name): middleware, concurrency, a poison queue of its own.
    pub fn register_into_with(
        &self,
        router: &mut Router,
        mut subscriber_for: impl FnMut(&str) -> Arc<dyn Subscriber>,
        mut configure: impl FnMut(&str, &mut HandlerBuilder<'_>),
    ) -> Result<(), RegisterError> {
        let shared = self.config.layout.is_shared();
        for (name, named) in &self.handlers {
            let type_name = named.type_name;
            let handler = named.handler.clone();
            let dispatcher = Dispatcher {
                topic: Arc::from(self.config.layout.topic_for(type_name)),
                handler_name: Arc::from(name.as_str()),
                routes: if shared {
                    Routes::SharedEvent { type_name, handler }
                } else {
                    Routes::Single { type_name, handler }
                },
            };
            add_dispatcher(router, dispatcher, &mut subscriber_for, &mut configure)?;
        }
        Ok(())
    }
}

impl<M> fmt::Debug for EventProcessor<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventProcessor")
            .field("config", &self.config)
            .field(
                "handlers",
                &self
                    .handlers
                    .iter()
                    .map(|(name, handler)| (name, handler.type_name))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::HandlerErrorKind;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ping {
        n: u32,
    }
    impl Command for Ping {
        const NAME: &'static str = "Ping";
    }

    fn dispatcher(routes: Routes) -> Dispatcher {
        Dispatcher {
            topic: Arc::from("t"),
            handler_name: Arc::from("h"),
            routes,
        }
    }

    fn ping_handler() -> ErasedHandler {
        erase::<Ping, _, _, _>("Ping", Arc::new(JsonMarshaler), |_: Ping, _| async {
            Ok(())
        })
    }

    fn ping(n: u32) -> Message {
        JsonMarshaler
            .marshal("Ping", &Ping { n }, MessageId::new_v7(), Metadata::new())
            .unwrap_or_else(|_| Message::new(""))
    }

    fn dispatch_error(error: &HandlerError) -> Option<&DispatchError> {
        error.source_error().downcast_ref::<DispatchError>()
    }

    #[tokio::test]
    async fn without_a_poison_queue_an_unknown_command_is_a_permanent_failure_the_router_nacks() {
        let shared = dispatcher(Routes::Commands(BTreeMap::from([("Ping", ping_handler())])));
        assert!(shared.handle(ping(1)).await.is_ok());
        let unknown = ping(1).with_metadata(Metadata::MESSAGE_TYPE, "Pong");
        let error = shared.handle(unknown).await.err();
        assert_eq!(
            error.as_ref().map(HandlerError::kind),
            Some(HandlerErrorKind::Permanent)
        );
        assert!(matches!(
            error.as_ref().and_then(dispatch_error),
            Some(DispatchError::UnknownCommand { message_type, .. }) if message_type == "Pong"
        ));
    }

    #[tokio::test]
    async fn missing_type_is_permanent_everywhere_and_other_types_are_skipped_only_for_shared_events()
     {
        let mut untyped = ping(1);
        untyped.metadata.remove(Metadata::MESSAGE_TYPE);
        for routes in [
            Routes::Single {
                type_name: "Ping",
                handler: ping_handler(),
            },
            Routes::SharedEvent {
                type_name: "Ping",
                handler: ping_handler(),
            },
            Routes::Commands(BTreeMap::from([("Ping", ping_handler())])),
        ] {
            let d = dispatcher(routes);
            let error = d.handle(untyped.clone()).await.err();
            assert!(error.as_ref().is_some_and(HandlerError::is_permanent));
            assert!(matches!(
                error.as_ref().and_then(dispatch_error),
                Some(DispatchError::MissingType { .. })
            ));
        }
        let other = ping(1).with_metadata(Metadata::MESSAGE_TYPE, "Pong");
        let per_type = dispatcher(Routes::Single {
            type_name: "Ping",
            handler: ping_handler(),
        });
        let error = per_type.handle(other.clone()).await.err();
        assert!(matches!(
            error.as_ref().and_then(dispatch_error),
            Some(DispatchError::UnexpectedType { expected: "Ping", found, .. }) if found == "Pong"
        ));
        let shared_event = dispatcher(Routes::SharedEvent {
            type_name: "Ping",
            handler: ping_handler(),
        });
        assert!(matches!(shared_event.handle(other).await, Ok(out) if out.is_empty()));
    }

    #[test]
    fn json_round_trip_keeps_id_and_metadata_and_errors_name_the_type() {
        let id = MessageId::parse("command-7").unwrap_or_else(|_| MessageId::new_v7());
        let metadata = Metadata::new()
            .with(Metadata::CORRELATION_ID, "c-1")
            .with("tenant", "acme");
        let message = JsonMarshaler.marshal("Ping", &Ping { n: 7 }, id.clone(), metadata);
        let Ok(message) = message else {
            panic!("marshal failed: {message:?}");
        };
        assert_eq!(message.id, id);
        assert_eq!(message.metadata.get(Metadata::MESSAGE_TYPE), Some("Ping"));
        assert_eq!(
            message.metadata.get(Metadata::CONTENT_TYPE),
            Some(CONTENT_TYPE_JSON)
        );
        assert_eq!(message.metadata.get(Metadata::CORRELATION_ID), Some("c-1"));
        assert_eq!(message.metadata.get("tenant"), Some("acme"));
        assert_eq!(&message.payload[..], br#"{"n":7}"#);
        let back: Result<Ping, _> = JsonMarshaler.unmarshal("Ping", &message);
        assert_eq!(back.ok(), Some(Ping { n: 7 }));

        let bad = Message::with_id(id.clone(), "{\"n\":\"seven\"}");
        let error = JsonMarshaler.unmarshal::<Ping>("Ping", &bad).err();
        assert!(
            matches!(error, Some(UnmarshalError::Json { ref type_name, .. }) if type_name == "Ping")
        );
        let text = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("not a valid Ping"), "{text}");
        assert!(text.contains("invalid type"), "{text}");

        let protobuf = Message::with_id(id, "{\"n\":7}")
            .with_metadata(Metadata::CONTENT_TYPE, "application/protobuf");
        assert!(matches!(
            JsonMarshaler.unmarshal::<Ping>("Ping", &protobuf),
            Err(UnmarshalError::ContentType { .. })
        ));
        let charset = Message::new("{\"n\":1}")
            .with_metadata(Metadata::CONTENT_TYPE, "Application/JSON; charset=utf-8");
        assert!(JsonMarshaler.unmarshal::<Ping>("Ping", &charset).is_ok());
    }

    #[test]
    fn encoding_failures_are_typed() {
        // JSON object keys must be strings.
        let map = BTreeMap::from([((1, 2), 3)]);
        let error = JsonMarshaler
            .marshal("Map", &map, MessageId::new_v7(), Metadata::new())
            .err();
        assert!(
            matches!(error, Some(MarshalError::Json { ref type_name, .. }) if type_name == "Map")
        );
        let handler_error =
            HandlerError::from(SendError::from(error.unwrap_or(MarshalError::Encode {
                type_name: String::new(),
                source: "x".into(),
            })));
        assert!(handler_error.is_permanent());
    }

    #[test]
    fn topic_layouts() {
        assert_eq!(
            CommandConfig::new().topic_for("PlaceOrder"),
            "commands.PlaceOrder"
        );
        assert_eq!(
            EventConfig::new().topic_for("OrderPlaced"),
            "events.OrderPlaced"
        );
        assert_eq!(
            EventConfig::new()
                .per_type("shop.events")
                .topic_for("OrderPlaced"),
            "shop.events.OrderPlaced"
        );
        assert_eq!(
            EventConfig::new().per_type("").topic_for("OrderPlaced"),
            "OrderPlaced"
        );
        let shared = CommandConfig::new().shared("shop.commands");
        assert!(shared.layout.is_shared());
        assert_eq!(shared.topic_for("PlaceOrder"), "shop.commands");
        assert_eq!(shared.topic_for("CancelOrder"), "shop.commands");
    }

    #[test]
    fn caused_metadata_copies_correlation_and_sets_causation() {
        let root = Message::new("x");
        let first = root.caused_metadata();
        assert_eq!(
            first.get(Metadata::CORRELATION_ID),
            Some(&*root.id.to_string())
        );
        assert_eq!(
            first.get(Metadata::CAUSATION_ID),
            Some(&*root.id.to_string())
        );
        let child = Message::new("y").with_metadata(Metadata::CORRELATION_ID, "flow-1");
        let context = MessageContext::for_message(&child, "t", "h");
        let second = context.caused_metadata();
        assert_eq!(second.get(Metadata::CORRELATION_ID), Some("flow-1"));
        assert_eq!(
            second.get(Metadata::CAUSATION_ID),
            Some(&*child.id.to_string())
        );
    }
}
