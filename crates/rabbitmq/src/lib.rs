//! factline's RabbitMQ adapter: a [`Publisher`] and a
//! [`Subscriber`](factline_messaging::Subscriber) that keep the pub/sub contract of
//! `docs/specs/pubsub-adapter.md` on RabbitMQ (AMQP 0-9-1, through `lapin`).
//! `docs/design/rabbitmq.md` explains the design.
//!
//! - A topic is a durable **fanout exchange**, `{name_prefix}{topic}`, declared by whoever
//!   uses the topic first (publisher or subscriber).
//! - A consumer group is a durable **queue** `{name_prefix}{topic}.{group}` bound to it: the
//!   group's members consume from it competingly, each group gets every message, and the queue
//!   keeps the group's messages while no member is connected. A subscription without a group
//!   gets an exclusive, auto-deleted, server-named queue of its own.
//! - A message is published persistent (delivery mode 2) with its id as the `message-id`
//!   property, its metadata as headers (one per entry, values as long strings; keys that a
//!   header name cannot carry are escaped injectively) and its payload as the body. `publish`
//!   waits for the broker's **publisher confirm** of every message of the call. Messages other
//!   clients publish to a topic's exchange are received too: their headers and the
//!   `content-type`/`correlation-id`/`type` properties become metadata, and without a
//!   `message-id` their id is derived from their content (stable across redeliveries).
//! - Every subscription consumes on a channel of its own with manual acknowledgement and a
//!   prefetch of [`RabbitConfig::in_flight_max`]. `basic.ack` is sent only after the
//!   application acked; a nack (or a dropped delivery) is a `basic.nack` with requeue; a nack
//!   with a delay is held locally (the delivery stays unacknowledged, counting against the
//!   prefetch) and nacked with requeue when the delay has passed.
//! - The adapter reconnects by itself: a publish that meets a broken connection reconnects and
//!   sends the call again (within [`RabbitConfig::publish_timeout`]; messages may then come
//!   twice, with the same ids), and a subscription whose connection broke yields one
//!   [`ReceiveError::Transport`](factline_messaging::ReceiveError) and consumes again once the
//!   broker is back; the broker redelivers what was unacknowledged.
//! - Bad configuration is a typed [`ConnectError`] from [`RabbitPubSub::connect`], within
//!   [`RabbitConfig::connect_timeout`]: an invalid setting or URL, a refused login, an unknown
//!   virtual host, an unreachable broker.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use factline_messaging::{Message, Publisher as _, Subscriber as _};
//! use factline_rabbitmq::{RabbitConfig, RabbitPubSub};
//! use futures::StreamExt as _;
//!
//! let pubsub = RabbitPubSub::connect(RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")).await?;
//! let subscriber = pubsub.subscriber_in_group("billing")?;
//! let mut orders = subscriber.subscribe("orders").await?;
//! pubsub.publisher().publish("orders", vec![Message::new("order 42 placed")]).await?;
//! if let Some(Ok(message)) = orders.next().await {
//!     message.ack();
//! }
//! subscriber.close().await?;
//! # Ok(())
//! # }
//! ```

mod codec;
mod names;
mod subscribe;

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::{BoxError, CloseError, Message, PublishError, Publisher, check_topic};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

pub use factline_messaging::redact_url;
pub use names::{GROUP_BYTES_MAX, NAME_BYTES_MAX, exchange_name, group_queue_name};
pub use subscribe::RabbitSubscriber;

/// Settings of a [`RabbitPubSub`]; every value is checked by [`RabbitPubSub::connect`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RabbitConfig {
    /// The broker, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f` (the vhost `/` is `%2f`).
    pub url: String,
    /// How long opening a connection (TCP, AMQP handshake, login, vhost) may take, at connect
    /// and at every reconnect. Default 5 s.
    pub connect_timeout: Duration,
    /// The AMQP heartbeat asked for (whole seconds, 1..=65,535 s): a broker that stops answering
    /// is noticed within about twice this. Default 10 s.
    pub heartbeat_timeout: Duration,
    /// Prefix of every exchange and queue name. Default `factline.`.
    pub name_prefix: String,
    /// Declare topic exchanges auto-delete: RabbitMQ removes one once its last queue is unbound
    /// (publishers declare it again when needed). Default false (exchanges stay).
    pub auto_delete_exchanges: bool,
    /// When set, a group's queue is deleted by the broker after it was unused (no consumer)
    /// for this long (`x-expires`), its messages with it: the group's retention window.
    /// Default none (kept until deleted).
    pub group_queue_expires: Option<Duration>,
    /// Largest message accepted (payload, id and metadata; [`Message::size_bytes`]).
    /// Default 1 MiB; at most 128 MiB (RabbitMQ's own default limit).
    pub message_size_bytes_max: usize,
    /// Unsettled deliveries per subscription: the channel's prefetch (`basic.qos`), 1..=65,535.
    /// Default 1,024.
    pub in_flight_max: usize,
    /// Publish messages persistent (delivery mode 2), so that durable queues keep them across a
    /// broker restart. Default true.
    pub persistent_messages: bool,
    /// How long one `publish` may take in all, reconnects and confirms included, before it
    /// fails (`TimedOut`, or `Transport` with the last error). Default 30 s.
    pub publish_timeout: Duration,
    /// Longest pause between a subscription's attempts to consume again after its connection
    /// broke (the pauses grow from 100 ms to this). Default 2 s.
    pub reconnect_delay_max: Duration,
    /// How long [`Subscriber::close`](factline_messaging::Subscriber::close) and
    /// [`Publisher::close`] wait for acknowledgements and channel closes. Default 5 s.
    pub close_timeout: Duration,
}

impl RabbitConfig {
    /// The defaults, for the broker at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect_timeout: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(10),
            name_prefix: "factline.".to_owned(),
            auto_delete_exchanges: false,
            group_queue_expires: None,
            message_size_bytes_max: 1 << 20,
            in_flight_max: 1_024,
            persistent_messages: true,
            publish_timeout: Duration::from_secs(30),
            reconnect_delay_max: Duration::from_secs(2),
            close_timeout: Duration::from_secs(5),
        }
    }

    /// Builder: see [`RabbitConfig::name_prefix`].
    #[must_use]
    pub fn name_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.name_prefix = prefix.into();
        self
    }

    /// Builder: see [`RabbitConfig::connect_timeout`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Builder: see [`RabbitConfig::heartbeat_timeout`].
    #[must_use]
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = timeout;
        self
    }

    /// Builder: see [`RabbitConfig::auto_delete_exchanges`].
    #[must_use]
    pub fn auto_delete_exchanges(mut self, yes: bool) -> Self {
        self.auto_delete_exchanges = yes;
        self
    }

    /// Builder: see [`RabbitConfig::group_queue_expires`].
    #[must_use]
    pub fn group_queue_expires(mut self, expires: Option<Duration>) -> Self {
        self.group_queue_expires = expires;
        self
    }

    /// Builder: see [`RabbitConfig::message_size_bytes_max`].
    #[must_use]
    pub fn message_size_bytes_max(mut self, size_bytes: usize) -> Self {
        self.message_size_bytes_max = size_bytes;
        self
    }

    /// Builder: see [`RabbitConfig::in_flight_max`].
    #[must_use]
    pub fn in_flight_max(mut self, deliveries: usize) -> Self {
        self.in_flight_max = deliveries;
        self
    }

    /// Builder: see [`RabbitConfig::persistent_messages`].
    #[must_use]
    pub fn persistent_messages(mut self, yes: bool) -> Self {
        self.persistent_messages = yes;
        self
    }

    /// Builder: see [`RabbitConfig::publish_timeout`].
    #[must_use]
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Builder: see [`RabbitConfig::reconnect_delay_max`].
    #[must_use]
    pub fn reconnect_delay_max(mut self, delay: Duration) -> Self {
        self.reconnect_delay_max = delay;
        self
    }

    /// Builder: see [`RabbitConfig::close_timeout`].
    #[must_use]
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        for (field, value) in [
            ("connect_timeout", self.connect_timeout),
            ("publish_timeout", self.publish_timeout),
            ("reconnect_delay_max", self.reconnect_delay_max),
            ("close_timeout", self.close_timeout),
        ] {
            if value.is_zero() {
                return Err((field, "must be more than 0".into()));
            }
        }
        let heartbeat = self.heartbeat_timeout.as_secs();
        if !(1..=u64::from(u16::MAX)).contains(&heartbeat) {
            return Err((
                "heartbeat_timeout",
                "must be 1..=65,535 whole seconds".into(),
            ));
        }
        if let Some(expires) = self.group_queue_expires
            && !(1..=u128::from(u32::MAX)).contains(&expires.as_millis())
        {
            return Err((
                "group_queue_expires",
                "must be 1 ms..=4,294,967,295 ms".into(),
            ));
        }
        if !(1..=MESSAGE_SIZE_BYTES_LIMIT).contains(&self.message_size_bytes_max) {
            return Err((
                "message_size_bytes_max",
                format!("must be 1..={MESSAGE_SIZE_BYTES_LIMIT}"),
            ));
        }
        if !(1..=usize::from(u16::MAX)).contains(&self.in_flight_max) {
            return Err((
                "in_flight_max",
                "must be 1..=65,535 (an AMQP prefetch)".into(),
            ));
        }
        names::check_prefix(&self.name_prefix).map_err(|reason| ("name_prefix", reason))?;
        Ok(())
    }
}

/// The largest [`RabbitConfig::message_size_bytes_max`]: RabbitMQ's default `max_message_size`.
pub const MESSAGE_SIZE_BYTES_LIMIT: usize = 128 << 20;

/// Why [`RabbitPubSub::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// A setting cannot work.
    #[error("invalid RabbitMQ setting {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL is not an AMQP URL.
    #[error("invalid AMQP URL {url}: {reason}")]
    InvalidUrl {
        /// The URL (password hidden).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The broker refused the user name or password.
    #[error("RabbitMQ at {url} refused the login: {source}")]
    AccessRefused {
        /// The broker (password hidden).
        url: String,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// The virtual host does not exist, or the user may not use it.
    #[error("RabbitMQ at {url} refused the virtual host {vhost:?}: {source}")]
    VhostRefused {
        /// The broker (password hidden).
        url: String,
        /// The virtual host asked for.
        vhost: String,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker could not be reached, or the connection failed otherwise.
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect {
        /// The broker (password hidden).
        url: String,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// Connecting took longer than [`RabbitConfig::connect_timeout`].
    #[error("connecting to RabbitMQ at {url} took over {timeout_ms} ms")]
    TimedOut {
        /// The broker (password hidden).
        url: String,
        /// The limit.
        timeout_ms: u64,
    },
}

/// A group name the adapter cannot use (1..=120 bytes, no `.`, no control characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid consumer group {group:?}: {reason}")]
pub struct InvalidGroup {
    /// The group (shortened).
    pub group: String,
    /// What was wrong.
    pub reason: String,
}

pub(crate) fn boxed(error: impl std::error::Error + Send + Sync + 'static) -> BoxError {
    Box::new(error)
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn short(text: &str) -> Result<ShortString, BoxError> {
    ShortString::try_new(text).map_err(boxed)
}

/// Opens one connection, within the connect timeout, with a typed error.
async fn open(
    uri: &AMQPUri,
    config: &RabbitConfig,
    name: &str,
) -> Result<Connection, ConnectError> {
    let url = redact_url(&config.url);
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("factline-rabbitmq {name}").into());
    let connecting = Connection::connect_uri(uri.clone(), properties);
    let connection = tokio::time::timeout(config.connect_timeout, connecting)
        .await
        .map_err(|_| ConnectError::TimedOut {
            url: url.clone(),
            timeout_ms: millis(config.connect_timeout),
        })?;
    connection.map_err(|source| classify(url, &uri.vhost, source))
}

fn classify(url: String, vhost: &str, source: lapin::Error) -> ConnectError {
    if let lapin::ErrorKind::ProtocolError(error) = source.kind() {
        match error.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                return ConnectError::AccessRefused { url, source };
            }
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                return ConnectError::VhostRefused {
                    url,
                    vhost: vhost.to_owned(),
                    source,
                };
            }
            _ => {}
        }
    }
    ConnectError::Connect { url, source }
}

/// One connection to the broker, opened again when it broke.
pub(crate) struct Link {
    name: &'static str,
    uri: AMQPUri,
    config: Arc<RabbitConfig>,
    current: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl Link {
    /// The connection, opened again (once, for every caller waiting) when it is not connected.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>, BoxError> {
        let mut current = self.current.lock().await;
        if let Some(connection) = current.as_ref()
            && connection.status().connected()
        {
            return Ok(Arc::clone(connection));
        }
        let connection = Arc::new(
            open(&self.uri, &self.config, self.name)
                .await
                .map_err(boxed)?,
        );
        if current.is_some() {
            tracing::info!(connection = self.name, url = %redact_url(&self.config.url), "reconnected to RabbitMQ");
        }
        *current = Some(Arc::clone(&connection));
        Ok(connection)
    }

    /// A new channel on the connection.
    pub(crate) async fn channel(&self) -> Result<Channel, BoxError> {
        let connection = self.connection().await?;
        connection.create_channel().await.map_err(boxed)
    }
}

pub(crate) struct Shared {
    pub(crate) config: Arc<RabbitConfig>,
    /// For publishers.
    publishing: Link,
    /// For subscriptions (apart from publishing, so that a broker throttling publishers does not
    /// hold back consumers).
    pub(crate) consuming: Link,
}

impl Shared {
    /// Declares the topic's exchange on `channel`.
    pub(crate) async fn declare_exchange(
        &self,
        channel: &Channel,
        exchange: &str,
    ) -> Result<(), BoxError> {
        channel
            .exchange_declare(
                short(exchange)?,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    auto_delete: self.config.auto_delete_exchanges,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(boxed)
    }
}

/// Connections to a RabbitMQ broker, from which publishers and subscribers are made. Cheap to
/// clone.
#[derive(Clone)]
pub struct RabbitPubSub {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RabbitPubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitPubSub")
            .field("url", &redact_url(&self.shared.config.url))
            .finish_non_exhaustive()
    }
}

impl RabbitPubSub {
    /// Checks the settings and opens the two connections (publishing and consuming), each
    /// within [`RabbitConfig::connect_timeout`].
    pub async fn connect(config: RabbitConfig) -> Result<Self, ConnectError> {
        config
            .check()
            .map_err(|(field, reason)| ConnectError::InvalidConfig { field, reason })?;
        let mut uri =
            AMQPUri::from_str(&config.url).map_err(|reason| ConnectError::InvalidUrl {
                url: redact_url(&config.url),
                reason,
            })?;
        uri.query.heartbeat = u16::try_from(config.heartbeat_timeout.as_secs()).ok();
        uri.query.connection_timeout = Some(millis(config.connect_timeout));
        let config = Arc::new(config);
        let publishing = open(&uri, &config, "publishing").await?;
        let consuming = open(&uri, &config, "consuming").await?;
        let link = |name, connection| Link {
            name,
            uri: uri.clone(),
            config: Arc::clone(&config),
            current: tokio::sync::Mutex::new(Some(Arc::new(connection))),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                publishing: link("publishing", publishing),
                consuming: link("consuming", consuming),
                config: Arc::clone(&config),
            }),
        })
    }

    /// A publisher (a channel of its own in confirm mode, opened at its first publish).
    pub fn publisher(&self) -> RabbitPublisher {
        RabbitPublisher {
            shared: Arc::clone(&self.shared),
            state: tokio::sync::Mutex::new(PublishState::default()),
            closed: AtomicBool::new(false),
        }
    }

    /// A subscriber whose every subscription gets every message of its topic, on a queue of
    /// its own (exclusive, deleted when the subscription ends).
    pub fn subscriber(&self) -> RabbitSubscriber {
        RabbitSubscriber::new(Arc::clone(&self.shared), None)
    }

    /// A subscriber in consumer group `group`: its subscriptions consume the group's durable
    /// queue of the topic, competing with the group's other members.
    pub fn subscriber_in_group(&self, group: &str) -> Result<RabbitSubscriber, InvalidGroup> {
        names::check_group(group).map_err(|reason| InvalidGroup {
            group: group.chars().take(64).collect(),
            reason,
        })?;
        Ok(RabbitSubscriber::new(
            Arc::clone(&self.shared),
            Some(group.to_owned()),
        ))
    }

    /// The largest message accepted ([`RabbitConfig::message_size_bytes_max`]).
    pub fn message_size_bytes_max(&self) -> usize {
        self.shared.config.message_size_bytes_max
    }

    /// The settings.
    pub fn config(&self) -> &RabbitConfig {
        &self.shared.config
    }

    /// The connection subscriptions use (for tools and tests that speak AMQP themselves).
    pub async fn consuming_connection(&self) -> Result<Arc<Connection>, BoxError> {
        self.shared.consuming.connection().await
    }

    /// Deletes the exchanges of `topics` and the queues of `groups` on them (their messages
    /// with them). Queues and exchanges that do not exist are skipped.
    pub async fn delete_topics(&self, topics: &[&str], groups: &[&str]) -> Result<(), BoxError> {
        let prefix = &self.shared.config.name_prefix;
        for topic in topics {
            for group in groups {
                let channel = self.shared.publishing.channel().await?;
                let queue = group_queue_name(prefix, topic, group);
                channel
                    .queue_delete(
                        short(&queue)?,
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await
                    .map_err(boxed)?;
                let _ = channel.close(200, "done".into()).await;
            }
            let channel = self.shared.publishing.channel().await?;
            channel
                .exchange_delete(
                    short(&exchange_name(prefix, topic))?,
                    lapin::options::ExchangeDeleteOptions::default(),
                )
                .await
                .map_err(boxed)?;
            let _ = channel.close(200, "done".into()).await;
        }
        Ok(())
    }
}

#[derive(Default)]
struct PublishState {
    channel: Option<Channel>,
    /// Exchanges declared on `channel`.
    declared: HashSet<String>,
}

/// Publishes to topic exchanges with publisher confirms; see [`RabbitPubSub::publisher`].
pub struct RabbitPublisher {
    shared: Arc<Shared>,
    state: tokio::sync::Mutex<PublishState>,
    closed: AtomicBool,
}

impl std::fmt::Debug for RabbitPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitPublisher").finish_non_exhaustive()
    }
}

enum Attempt {
    Closed,
    Failed(BoxError),
}

#[derive(Debug, thiserror::Error)]
#[error("the broker refused (basic.nack) message {message_id}")]
struct Refused {
    message_id: String,
}

impl RabbitPublisher {
    /// Sends every message once on the publisher's channel (opened, put in confirm mode and the
    /// exchange declared when needed) and waits for the confirms.
    async fn attempt(
        &self,
        exchange: &str,
        messages: &[(String, lapin::BasicProperties, &[u8])],
    ) -> Result<(), Attempt> {
        let confirms = {
            let mut state = self.state.lock().await;
            if self.closed.load(Ordering::Acquire) {
                return Err(Attempt::Closed);
            }
            match self.send(&mut state, exchange, messages).await {
                Ok(confirms) => confirms,
                Err(error) => {
                    state.channel = None;
                    return Err(Attempt::Failed(error));
                }
            }
        };
        for (confirm, (message_id, ..)) in confirms.into_iter().zip(messages) {
            let confirmation = confirm
                .await
                .map_err(|error| Attempt::Failed(boxed(error)))?;
            if confirmation.is_nack() {
                return Err(Attempt::Failed(boxed(Refused {
                    message_id: message_id.clone(),
                })));
            }
        }
        Ok(())
    }

    async fn send(
        &self,
        state: &mut PublishState,
        exchange: &str,
        messages: &[(String, lapin::BasicProperties, &[u8])],
    ) -> Result<Vec<lapin::PublisherConfirm>, BoxError> {
        let channel = match &state.channel {
            Some(channel) if channel.status().connected() => channel.clone(),
            _ => {
                let channel = self.shared.publishing.channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(boxed)?;
                state.declared.clear();
                state.channel = Some(channel.clone());
                channel
            }
        };
        if !state.declared.contains(exchange) {
            self.shared.declare_exchange(&channel, exchange).await?;
            state.declared.insert(exchange.to_owned());
        }
        let exchange = short(exchange)?;
        let mut confirms = Vec::with_capacity(messages.len());
        for (_, properties, body) in messages {
            confirms.push(
                channel
                    .basic_publish(
                        exchange.clone(),
                        ShortString::default(),
                        BasicPublishOptions::default(),
                        body,
                        properties.clone(),
                    )
                    .await
                    .map_err(boxed)?,
            );
        }
        Ok(confirms)
    }
}

#[async_trait]
impl Publisher for RabbitPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<(), PublishError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PublishError::Closed);
        }
        check_topic(topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        let config = &self.shared.config;
        let limit = config.message_size_bytes_max;
        let mut encoded = Vec::with_capacity(messages.len());
        for message in &messages {
            let size_bytes = message.size_bytes();
            if size_bytes > limit {
                return Err(PublishError::MessageTooLarge {
                    message_id: message.id.to_text(),
                    size_bytes,
                    size_bytes_max: limit,
                });
            }
            let mut properties = codec::encode(message)?;
            if config.persistent_messages {
                properties = properties.with_delivery_mode(2);
            }
            encoded.push((message.id.to_text(), properties, message.payload.as_ref()));
        }
        let exchange = exchange_name(&config.name_prefix, topic);
        let deadline = tokio::time::Instant::now() + config.publish_timeout;
        let mut pause = Duration::from_millis(50);
        let mut last_error = None;
        loop {
            match tokio::time::timeout_at(deadline, self.attempt(&exchange, &encoded)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(Attempt::Closed)) => return Err(PublishError::Closed),
                Ok(Err(Attempt::Failed(error))) => {
                    tracing::warn!(topic, %error, "publishing failed; sending the batch again");
                    last_error = Some(error);
                }
                Err(_) => break,
            }
            if tokio::time::Instant::now() + pause >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        Err(match last_error {
            Some(error) => PublishError::Transport(error),
            None => PublishError::TimedOut {
                timeout_ms: millis(config.publish_timeout),
            },
        })
    }

    async fn close(&self) -> Result<(), CloseError> {
        self.closed.store(true, Ordering::Release);
        let timeout = self.shared.config.close_timeout;
        // Publishes under way hold the state while they send; their confirms are awaited by
        // their callers.
        let mut state = tokio::time::timeout(timeout, self.state.lock())
            .await
            .map_err(|_| CloseError::TimedOut {
                timeout_ms: millis(timeout),
                pending: 0,
            })?;
        if let Some(channel) = state.channel.take() {
            let wait = async {
                // Every confirm is in before the channel closes.
                let _ = channel.wait_for_confirms().await;
                channel.close(200, "closed".into()).await
            };
            match tokio::time::timeout(timeout, wait).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) if !channel.status().connected() => {
                    tracing::debug!(%error, "the publisher's channel was already closed");
                }
                Ok(Err(error)) => return Err(CloseError::Transport(boxed(error))),
                Err(_) => {
                    return Err(CloseError::TimedOut {
                        timeout_ms: millis(timeout),
                        pending: 0,
                    });
                }
            }
        }
        Ok(())
    }
}
