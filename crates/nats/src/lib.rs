//! factline's NATS JetStream adapter: a [`Publisher`] and a [`Subscriber`] that keep the
//! pub/sub contract of `docs/specs/pubsub-adapter.md` on a JetStream server.
//!
//! - A topic is a JetStream stream of its own (`{stream_prefix}{escaped topic}`, which is also
//!   its only subject), created on first use with the retention limits of [`NatsConfig`]
//!   (file storage by default).
//! - A publish waits for JetStream's acknowledgement of every message; the message id travels
//!   as `Nats-Msg-Id`, so a retried publish inside [`NatsConfig::duplicate_window`] is dropped by
//!   the server. Metadata entries are headers (those that do not fit a header line go in one
//!   `Factline-Metadata` JSON header).
//! - A consumer group is a durable pull consumer on the topic's stream (`g_{escaped group}`):
//!   its members compete for its messages, it keeps its place while nobody is connected. A
//!   subscription without a group gets a consumer of its own, deleted when it ends.
//! - Acks are explicit and sent only after the application acked; a nack is a JetStream NAK
//!   (with its delay), a dropped delivery a NAK without delay. Closing a subscriber NAKs what
//!   its subscriptions still hold, so the group gets it again at once.
//! - The client reconnects by itself; an open subscription reports the outage as
//!   [`ReceiveError::Transport`] and resumes on the same consumer.

mod config;
mod names;
mod subscribe;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_trait::async_trait;
use factline_messaging::{
    BoxError, CloseError, InvalidTopic, Message, PublishError, Publisher, SubscribeError,
};

pub use config::{DeliverFrom, NatsConfig, Storage};
pub use names::{
    HeaderError, InvalidGroup, MESSAGE_ID_HEADER, METADATA_HEADER, NAME_BYTES_MAX, decode_headers,
    decode_message_id, encode_headers, encode_message_id, escape_name, group_consumer_name,
    stream_name,
};
pub use subscribe::NatsSubscriber;

/// Why [`NatsPubSub::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// A setting cannot work.
    #[error("invalid NATS setting {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The server refused the connection or could not be reached.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The server (credentials hidden).
        url: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// Connecting took longer than [`NatsConfig::connect_timeout`].
    #[error("connecting to NATS at {url} took over {timeout_ms} ms")]
    TimedOut {
        /// The server (credentials hidden).
        url: String,
        /// The limit.
        timeout_ms: u64,
    },
    /// The server answers, but JetStream is not enabled for this account.
    #[error(
        "NATS at {url} has no JetStream for this account (start the server with -js): {source}"
    )]
    NoJetStream {
        /// The server (credentials hidden).
        url: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
}

/// `url` with any password replaced by `***` (for errors and logs).
pub use factline_messaging::redact_url;

/// A connection to a JetStream server, from which publishers and subscribers are made. Cheap
/// to clone; every publisher and subscriber shares the one connection.
#[derive(Clone)]
pub struct NatsPubSub {
    inner: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) client: async_nats::Client,
    pub(crate) jetstream: jetstream::Context,
    pub(crate) config: NatsConfig,
    /// Streams known to exist (created or found by this connection).
    known_streams: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for NatsPubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPubSub")
            .field("url", &redact_url(&self.inner.config.url))
            .finish_non_exhaustive()
    }
}

fn boxed(error: impl std::error::Error + Send + Sync + 'static) -> BoxError {
    Box::new(error)
}

/// A topic's stream that does not exist, with [`NatsConfig::create_streams`] off.
#[derive(Debug, thiserror::Error)]
#[error(
    "the JetStream stream {stream:?} for topic {topic:?} does not exist (create it, or set \
     create_streams)"
)]
pub struct MissingStream {
    /// The topic.
    pub topic: String,
    /// Its stream.
    pub stream: String,
}

pub(crate) enum StreamError {
    InvalidTopic(InvalidTopic),
    Transport(BoxError),
}

impl From<StreamError> for PublishError {
    fn from(error: StreamError) -> Self {
        match error {
            StreamError::InvalidTopic(invalid) => Self::InvalidTopic(invalid),
            StreamError::Transport(source) => Self::Transport(source),
        }
    }
}

impl From<StreamError> for SubscribeError {
    fn from(error: StreamError) -> Self {
        match error {
            StreamError::InvalidTopic(invalid) => Self::InvalidTopic(invalid),
            StreamError::Transport(source) => Self::Transport(source),
        }
    }
}

impl NatsPubSub {
    /// Connects to `config.url` and checks that JetStream answers, within
    /// [`NatsConfig::connect_timeout`]. A bad setting, an unreachable server, refused
    /// credentials or a server without JetStream are errors here, not on first use.
    pub async fn connect(config: NatsConfig) -> Result<Self, ConnectError> {
        config
            .check()
            .map_err(|(field, reason)| ConnectError::InvalidConfig { field, reason })?;
        let url = redact_url(&config.url);
        let timeout_ms = u64::try_from(config.connect_timeout.as_millis()).unwrap_or(u64::MAX);
        let options = async_nats::ConnectOptions::new()
            .connection_timeout(config.connect_timeout)
            .request_timeout(Some(config.publish_timeout));
        let client = tokio::time::timeout(
            config.connect_timeout,
            async_nats::connect_with_options(config.url.as_str(), options),
        )
        .await
        .map_err(|_| ConnectError::TimedOut {
            url: url.clone(),
            timeout_ms,
        })?
        .map_err(|source| ConnectError::Connect {
            url: url.clone(),
            source,
        })?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.publish_timeout)
            .build(client.clone());
        // The account info request answers only where JetStream runs (read as plain JSON:
        // the client's typed reply is newer than some servers').
        let answer = tokio::time::timeout(
            config.connect_timeout,
            client.request("$JS.API.INFO", bytes::Bytes::new()),
        )
        .await
        .map_err(|_| ConnectError::TimedOut {
            url: url.clone(),
            timeout_ms,
        })?
        .map_err(|source| ConnectError::NoJetStream {
            url: url.clone(),
            source: boxed(source),
        })?;
        let info: serde_json::Value =
            serde_json::from_slice(&answer.payload).map_err(|source| {
                ConnectError::NoJetStream {
                    url: url.clone(),
                    source: boxed(source),
                }
            })?;
        if let Some(error) = info.get("error") {
            return Err(ConnectError::NoJetStream {
                url,
                source: error.to_string().into(),
            });
        }
        Ok(Self {
            inner: Arc::new(Shared {
                client,
                jetstream,
                config,
                known_streams: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// A publisher on this connection.
    pub fn publisher(&self) -> NatsPublisher {
        NatsPublisher {
            shared: Arc::clone(&self.inner),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A subscriber whose every subscription has a consumer of its own: it receives every
    /// message of its topic (from the oldest retained, per [`NatsConfig::deliver_from`]).
    pub fn subscriber(&self) -> NatsSubscriber {
        NatsSubscriber::new(Arc::clone(&self.inner), None)
    }

    /// A subscriber in consumer group `group`: its subscriptions to a topic share the group's
    /// durable consumer with every other member, in this process or any other.
    pub fn subscriber_in_group(&self, group: &str) -> Result<NatsSubscriber, InvalidGroup> {
        let consumer = group_consumer_name(group)?;
        Ok(NatsSubscriber::new(Arc::clone(&self.inner), Some(consumer)))
    }

    /// The largest payload a message with little metadata can carry: the server's
    /// `max_payload` less 8 KiB kept for headers. Larger publishes are refused with
    /// [`PublishError::MessageTooLarge`].
    pub fn payload_size_bytes_max(&self) -> usize {
        max_payload(&self.inner.client).saturating_sub(8 * 1024)
    }

    /// The underlying client, for what this adapter does not cover.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Deletes the streams of `topics` (their messages and groups), e.g. after a test run.
    pub async fn delete_topics(&self, topics: &[&str]) -> Result<(), BoxError> {
        for topic in topics {
            let name = stream_name(&self.inner.config.stream_prefix, topic)?;
            if let Ok(mut known) = self.inner.known_streams.lock() {
                known.remove(&name);
            }
            match self.inner.jetstream.delete_stream(&name).await {
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.kind(),
                        jetstream::context::DeleteStreamErrorKind::JetStream(ref e)
                            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                    ) => {}
                Err(error) => return Err(boxed(error)),
            }
        }
        Ok(())
    }
}

fn max_payload(client: &async_nats::Client) -> usize {
    client.server_info().max_payload
}

impl Shared {
    fn stream_config(&self, name: &str) -> stream::Config {
        let config = &self.config;
        stream::Config {
            name: name.to_owned(),
            subjects: vec![name.to_owned()],
            storage: match config.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            max_messages: config.topic_messages_max,
            max_bytes: config.topic_bytes_max.unwrap_or(-1),
            max_age: config.topic_age_max.unwrap_or_default(),
            discard: if config.refuse_publish_when_full {
                stream::DiscardPolicy::New
            } else {
                stream::DiscardPolicy::Old
            },
            duplicate_window: config.duplicate_window,
            ..Default::default()
        }
    }

    /// The stream that holds `topic`, created if needed and allowed.
    pub(crate) async fn stream(&self, topic: &str) -> Result<stream::Stream, StreamError> {
        let name =
            stream_name(&self.config.stream_prefix, topic).map_err(StreamError::InvalidTopic)?;
        let found = if self.config.create_streams {
            self.jetstream
                .get_or_create_stream(self.stream_config(&name))
                .await
                .map_err(|error| StreamError::Transport(boxed(error)))?
        } else {
            match self.jetstream.get_stream(&name).await {
                Ok(found) => found,
                Err(error)
                    if matches!(
                        error.kind(),
                        jetstream::context::GetStreamErrorKind::JetStream(ref e)
                            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                    ) =>
                {
                    return Err(StreamError::Transport(boxed(MissingStream {
                        topic: topic.to_owned(),
                        stream: name,
                    })));
                }
                Err(error) => return Err(StreamError::Transport(boxed(error))),
            }
        };
        if let Ok(mut known) = self.known_streams.lock() {
            known.insert(name);
        }
        Ok(found)
    }

    /// Makes sure, once per connection, that the stream `name` of `topic` exists.
    async fn ensure_stream_known(&self, topic: &str, name: &str) -> Result<(), StreamError> {
        let known = self
            .known_streams
            .lock()
            .map(|known| known.contains(name))
            .unwrap_or(false);
        if !known {
            self.stream(topic).await?;
        }
        Ok(())
    }

    fn forget_stream(&self, name: &str) {
        if let Ok(mut known) = self.known_streams.lock() {
            known.remove(name);
        }
    }
}

/// Publishes to JetStream; see [`NatsPubSub::publisher`].
pub struct NatsPublisher {
    shared: Arc<Shared>,
    closed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPublisher").finish_non_exhaustive()
    }
}

/// Bytes the header block adds to a message on the wire: `NATS/1.0\r\n`, each
/// `name: value\r\n`, the closing `\r\n`.
fn headers_size_bytes(headers: &async_nats::HeaderMap) -> usize {
    12 + headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|value| name.len() + value.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum::<usize>()
}

impl NatsPublisher {
    fn map_publish_error(&self, error: jetstream::context::PublishError) -> PublishError {
        match error.kind() {
            PublishErrorKind::TimedOut => PublishError::TimedOut {
                timeout_ms: u64::try_from(self.shared.config.publish_timeout.as_millis())
                    .unwrap_or(u64::MAX),
            },
            _ => PublishError::Transport(boxed(error)),
        }
    }

    /// Sends `messages` in windows of [`NatsConfig::publish_window`], each window's
    /// acknowledgements awaited before the next is sent. `Err(true)` when the stream was not
    /// there (the caller may make sure of it and retry).
    async fn send(
        &self,
        subject: &str,
        encoded: &[(async_nats::HeaderMap, bytes::Bytes)],
    ) -> Result<(), (bool, PublishError)> {
        let timeout = self.shared.config.publish_timeout;
        for window in encoded.chunks(self.shared.config.publish_window) {
            let mut acks = Vec::with_capacity(window.len());
            for (headers, payload) in window {
                let publish = jetstream::message::PublishMessage::build()
                    .payload(payload.clone())
                    .headers(headers.clone());
                let ack = self
                    .shared
                    .jetstream
                    .send_publish(subject.to_owned(), publish)
                    .await
                    .map_err(|error| (false, self.map_publish_error(error)))?;
                acks.push(ack);
            }
            for ack in acks {
                match tokio::time::timeout(timeout, ack.into_future()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        let missing = error.kind() == PublishErrorKind::StreamNotFound;
                        return Err((missing, self.map_publish_error(error)));
                    }
                    Err(_) => {
                        return Err((
                            false,
                            PublishError::TimedOut {
                                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                            },
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Publisher for NatsPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<(), PublishError> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(PublishError::Closed);
        }
        let subject = stream_name(&self.shared.config.stream_prefix, topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        let size_bytes_max = max_payload(&self.shared.client);
        let mut encoded = Vec::with_capacity(messages.len());
        for message in &messages {
            let headers = names::encode_headers(&message.id, &message.metadata);
            let size_bytes = message.payload.len() + headers_size_bytes(&headers);
            if size_bytes > size_bytes_max {
                return Err(PublishError::MessageTooLarge {
                    message_id: message.id.to_text(),
                    size_bytes,
                    size_bytes_max,
                });
            }
            encoded.push((headers, message.payload.clone()));
        }
        self.shared.ensure_stream_known(topic, &subject).await?;
        match self.send(&subject, &encoded).await {
            Ok(()) => Ok(()),
            Err((true, _)) if self.shared.config.create_streams => {
                // The stream was deleted behind our back: make it again and send it all again
                // (JetStream drops what had arrived, by message id).
                self.shared.forget_stream(&subject);
                self.shared.stream(topic).await?;
                self.send(&subject, &encoded)
                    .await
                    .map_err(|(_, error)| error)
            }
            Err((_, error)) => Err(error),
        }
    }

    async fn close(&self) -> Result<(), CloseError> {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        // Every publish that returned was acknowledged by JetStream: nothing is buffered.
        Ok(())
    }
}
