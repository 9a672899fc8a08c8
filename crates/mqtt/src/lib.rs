//! factline's MQTT adapter: a [`Publisher`](factline_messaging::Publisher) and a
//! [`Subscriber`](factline_messaging::Subscriber) that keep the pub/sub contract of
//! `docs/specs/pubsub-adapter.md` on an MQTT 5 broker (tested against Mosquitto 2.0), with
//! `rumqttc`'s v5 client. The design, with what it does not do and why, is `docs/design/mqtt.md`.
//!
//! - **Publishing** is QoS 1 on one connection per [`MqttPubSub`]: `publish` returns once the
//!   broker sent a PUBACK for every message of the call.
//! - **Messages** keep their payload as it is; the id and the metadata travel as MQTT 5 user
//!   properties (`fl-id`, and `fl-m:{key}` per entry, escaped so that the broker's UTF-8 rules
//!   never refuse them). A publish from another client (no `fl-id`) is received with a new id,
//!   its payload as it is, its user properties as metadata and its content type as
//!   `content_type`.
//! - **Topics** are MQTT topic names, `{topic_prefix}{topic}`, used as exact filters (never as
//!   wildcards); names with `+` or `#`, or starting with `$`, are refused with `InvalidTopic`.
//! - **Subscribing**: every subscription is an MQTT connection of its own (its own client id
//!   and session, QoS 1, receive maximum [`MqttConfig::in_flight_max`]), with manual acks: the
//!   PUBACK is sent only once the application acked. A nack (or a dropped delivery) keeps the
//!   message unacknowledged at the broker and delivers it again on the same subscription after
//!   the delay. A subscription made with [`MqttPubSub::subscriber_with_session`] has a stable
//!   client id: its session (subscription and queued messages) outlives it, and its next
//!   subscription gets what was published meanwhile (within the broker's queue limit).
//! - **Consumer groups** are not offered: Mosquitto's shared subscriptions hand messages
//!   round-robin to offline persistent members too, and keep a closed member's unacknowledged
//!   messages in that member's session (see the design document).
//! - **Reconnecting**: every connection reconnects by itself and resumes its session;
//!   publishes in flight are sent again, subscriptions go on.

mod codec;
mod connection;
mod subscribe;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::{CloseError, Message, PublishError, Publisher};

pub use factline_messaging::redact_url;
pub use subscribe::MqttSubscriber;

use connection::PublishConnection;

/// The largest MQTT packet the protocol allows (a 4-byte remaining length), in bytes; also
/// Mosquitto's default `message_size_limit`.
pub const MQTT_PACKET_BYTES_MAX: usize = 268_435_455;

/// Settings of an [`MqttPubSub`]; every value is checked by [`MqttPubSub::connect`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MqttConfig {
    /// The broker, `mqtt://[user[:password]@]host[:port]` (`tcp://` too; port 1883 by default).
    pub url: String,
    /// Prefix of every client id this adapter makes. Default `factline-`.
    pub client_id_prefix: String,
    /// Prefix of every topic name. Default empty.
    pub topic_prefix: String,
    /// How long connecting (up to the broker's CONNACK, or a subscription's SUBACK) may take.
    /// Default 5 s.
    pub connect_timeout: Duration,
    /// MQTT keep-alive of every connection. Default 30 s; 5..=65,535 s.
    pub keep_alive: Duration,
    /// How long the broker keeps a disconnected session (its subscription and the messages
    /// queued for it): the window in which a reconnect, or the next subscription of a named
    /// session, gets what was published meanwhile. Default 1 hour.
    pub session_expiry: Duration,
    /// Largest message accepted ([`Message::size_bytes`]). Default 1 MiB; at most
    /// [`MQTT_PACKET_BYTES_MAX`] less 64 KiB (Mosquitto's largest packet).
    pub message_size_bytes_max: usize,
    /// Unsettled deliveries per subscription: the receive maximum the subscription's
    /// connection announces, so the broker sends no more. Default 1,024; 1..=65,535.
    pub in_flight_max: usize,
    /// Publishes sent and not yet acknowledged by the broker, on the publishing connection
    /// (the broker's receive maximum lowers it: Mosquitto's `max_inflight_messages`, 20).
    /// Publishes beyond it wait. Default 1,024; 1..=65,535.
    pub publish_in_flight_max: usize,
    /// How long a publish waits for room and for the broker's PUBACKs. Default 30 s.
    pub publish_timeout: Duration,
    /// The pause between reconnect attempts. Default 500 ms.
    pub reconnect_delay: Duration,
    /// How long [`Subscriber::close`](factline_messaging::Subscriber::close) waits for the
    /// subscriptions' connections to send their acks and disconnect. Default 5 s.
    pub close_timeout: Duration,
}

impl MqttConfig {
    /// The defaults, for the broker at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            client_id_prefix: "factline-".to_owned(),
            topic_prefix: String::new(),
            connect_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(30),
            session_expiry: Duration::from_secs(3_600),
            message_size_bytes_max: 1 << 20,
            in_flight_max: 1_024,
            publish_in_flight_max: 1_024,
            publish_timeout: Duration::from_secs(30),
            reconnect_delay: Duration::from_millis(500),
            close_timeout: Duration::from_secs(5),
        }
    }

    /// Builder: see [`MqttConfig::client_id_prefix`].
    #[must_use]
    pub fn client_id_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.client_id_prefix = prefix.into();
        self
    }

    /// Builder: see [`MqttConfig::topic_prefix`].
    #[must_use]
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    /// Builder: see [`MqttConfig::connect_timeout`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Builder: see [`MqttConfig::keep_alive`].
    #[must_use]
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// Builder: see [`MqttConfig::session_expiry`].
    #[must_use]
    pub fn session_expiry(mut self, expiry: Duration) -> Self {
        self.session_expiry = expiry;
        self
    }

    /// Builder: see [`MqttConfig::message_size_bytes_max`].
    #[must_use]
    pub fn message_size_bytes_max(mut self, size_bytes: usize) -> Self {
        self.message_size_bytes_max = size_bytes;
        self
    }

    /// Builder: see [`MqttConfig::in_flight_max`].
    #[must_use]
    pub fn in_flight_max(mut self, deliveries: usize) -> Self {
        self.in_flight_max = deliveries;
        self
    }

    /// Builder: see [`MqttConfig::publish_in_flight_max`].
    #[must_use]
    pub fn publish_in_flight_max(mut self, publishes: usize) -> Self {
        self.publish_in_flight_max = publishes;
        self
    }

    /// Builder: see [`MqttConfig::publish_timeout`].
    #[must_use]
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Builder: see [`MqttConfig::reconnect_delay`].
    #[must_use]
    pub fn reconnect_delay(mut self, delay: Duration) -> Self {
        self.reconnect_delay = delay;
        self
    }

    /// Builder: see [`MqttConfig::close_timeout`].
    #[must_use]
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        for (field, value) in [
            ("connect_timeout", self.connect_timeout),
            ("keep_alive", self.keep_alive),
            ("session_expiry", self.session_expiry),
            ("publish_timeout", self.publish_timeout),
            ("reconnect_delay", self.reconnect_delay),
            ("close_timeout", self.close_timeout),
        ] {
            if value.is_zero() {
                return Err((field, "must be more than 0".into()));
            }
        }
        if self.keep_alive < Duration::from_secs(5) || self.keep_alive.as_secs() > 65_535 {
            return Err(("keep_alive", "must be 5..=65,535 s (whole seconds)".into()));
        }
        if self.session_expiry.as_secs() >= u64::from(u32::MAX) {
            return Err((
                "session_expiry",
                "must be below 4,294,967,295 s (which MQTT reads as never)".into(),
            ));
        }
        for (field, value) in [
            ("in_flight_max", self.in_flight_max),
            ("publish_in_flight_max", self.publish_in_flight_max),
        ] {
            if !(1..=65_535).contains(&value) {
                return Err((field, "must be 1..=65,535 (an MQTT receive maximum)".into()));
            }
        }
        if self.message_size_bytes_max < 1
            || self.message_size_bytes_max > MQTT_PACKET_BYTES_MAX - 65_536
        {
            return Err((
                "message_size_bytes_max",
                format!("must be 1..={} bytes", MQTT_PACKET_BYTES_MAX - 65_536),
            ));
        }
        if self.client_id_prefix.len() > 64
            || !self
                .client_id_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err((
                "client_id_prefix",
                "must be at most 64 bytes of [A-Za-z0-9._-]".into(),
            ));
        }
        if self.topic_prefix.len() > 1_024
            || self.topic_prefix.starts_with('$')
            || self
                .topic_prefix
                .chars()
                .any(|c| c == '+' || c == '#' || c.is_control())
        {
            return Err((
                "topic_prefix",
                "must be at most 1,024 bytes without `+`, `#`, control characters or a leading `$`"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The largest packet a connection accepts from the broker (and so asks it to send at
    /// most): room for the largest message with its escaped metadata.
    fn packet_bytes_max(&self) -> usize {
        self.message_size_bytes_max
            .saturating_mul(2)
            .saturating_add(65_536)
            .min(MQTT_PACKET_BYTES_MAX)
    }
}

/// Why [`MqttPubSub::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// A setting cannot work.
    #[error("invalid MQTT setting {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL is not one this adapter can use.
    #[error("invalid MQTT URL {url}: {reason}")]
    InvalidUrl {
        /// The URL (password hidden).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The broker answered the CONNECT with a refusal (bad credentials, not authorized, …).
    #[error("the MQTT broker at {url} refused the connection: {reason}")]
    Refused {
        /// The broker (password hidden).
        url: String,
        /// The broker's reason code.
        reason: String,
    },
    /// The broker could not be reached, or the connection failed before the CONNACK.
    #[error("cannot connect to the MQTT broker at {url}: {source}")]
    Connect {
        /// The broker (password hidden).
        url: String,
        /// The client's error.
        #[source]
        source: factline_messaging::BoxError,
    },
    /// No CONNACK within [`MqttConfig::connect_timeout`].
    #[error("connecting to the MQTT broker at {url} took over {timeout_ms} ms")]
    TimedOut {
        /// The broker (password hidden).
        url: String,
        /// The limit.
        timeout_ms: u64,
    },
}

/// A session name [`MqttPubSub::subscriber_with_session`] cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MQTT session name {name:?}: {reason}")]
pub struct InvalidSession {
    /// The name (shortened).
    pub name: String,
    /// What was wrong.
    pub reason: String,
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Where the broker is, parsed from [`MqttConfig::url`].
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) credentials: Option<(String, String)>,
    /// The URL with the password hidden.
    pub(crate) shown: String,
}

fn parse_url(url: &str) -> Result<Endpoint, ConnectError> {
    let shown = redact_url(url);
    let invalid = |reason: &str| ConnectError::InvalidUrl {
        url: shown.clone(),
        reason: reason.to_owned(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(invalid("expected mqtt://host[:port]"));
    };
    match scheme {
        "mqtt" | "tcp" => {}
        "mqtts" | "ssl" | "ws" | "wss" => {
            return Err(invalid(
                "TLS and WebSocket transports are not supported by this adapter (use mqtt://)",
            ));
        }
        _ => return Err(invalid("the scheme must be mqtt:// or tcp://")),
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return Err(invalid(
            "a path or query is not supported (the client id comes from the settings)",
        ));
    }
    let (credentials, address) = match rest.rsplit_once('@') {
        Some((userinfo, address)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (Some((user.to_owned(), password.to_owned())), address)
        }
        None => (None, rest),
    };
    let (host, port) = if let Some(bracketed) = address.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(invalid("an IPv6 host needs its closing `]`"));
        };
        (host, after.strip_prefix(':'))
    } else {
        match address.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (address, None),
        }
    };
    if host.is_empty() {
        return Err(invalid("the host is missing"));
    }
    let port = match port {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| invalid("the port must be 1..=65535"))?,
        None => 1883,
    };
    Ok(Endpoint {
        host: host.to_owned(),
        port,
        credentials,
        shown,
    })
}

pub(crate) struct Shared {
    pub(crate) config: MqttConfig,
    pub(crate) endpoint: Endpoint,
    pub(crate) publishing: PublishConnection,
}

/// A connection to an MQTT broker, from which publishers and subscribers are made. Cheap to
/// clone; its publishing connection closes when the last clone (and every publisher) is gone.
#[derive(Clone)]
pub struct MqttPubSub {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MqttPubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttPubSub")
            .field("url", &self.shared.endpoint.shown)
            .finish_non_exhaustive()
    }
}

impl MqttPubSub {
    /// Checks the settings and opens the publishing connection (the broker's CONNACK
    /// received), within [`MqttConfig::connect_timeout`].
    pub async fn connect(config: MqttConfig) -> Result<Self, ConnectError> {
        config
            .check()
            .map_err(|(field, reason)| ConnectError::InvalidConfig { field, reason })?;
        let endpoint = parse_url(&config.url)?;
        let publishing = PublishConnection::open(&config, &endpoint).await?;
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                endpoint,
                publishing,
            }),
        })
    }

    /// A publisher on the shared publishing connection.
    pub fn publisher(&self) -> MqttPublisher {
        MqttPublisher {
            shared: Arc::clone(&self.shared),
            closed: AtomicBool::new(false),
        }
    }

    /// A subscriber whose every subscription is a fresh session of its own: it receives every
    /// message published to its topic from when `subscribe` returned; its session ends with
    /// it.
    pub fn subscriber(&self) -> MqttSubscriber {
        MqttSubscriber::new(Arc::clone(&self.shared), None)
    }

    /// A subscriber with a named, lasting session: its subscription to a topic uses the client
    /// id `{client_id_prefix}{name}-{hash of the topic}`, keeps its session when it closes
    /// (for [`MqttConfig::session_expiry`]), and the next subscription of the same name to the
    /// same topic — in this process or another — receives what was published meanwhile and
    /// what was left unacknowledged. One subscription per name and topic at a time (a second
    /// one takes the session over from the first). `name`: 1..=64 bytes of `[A-Za-z0-9._-]`.
    pub fn subscriber_with_session(&self, name: &str) -> Result<MqttSubscriber, InvalidSession> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(InvalidSession {
                name: name.chars().take(64).collect(),
                reason: "a session name must be 1..=64 bytes of [A-Za-z0-9._-]".into(),
            });
        }
        Ok(MqttSubscriber::new(
            Arc::clone(&self.shared),
            Some(name.to_owned()),
        ))
    }

    /// The largest message accepted ([`MqttConfig::message_size_bytes_max`]).
    pub fn message_size_bytes_max(&self) -> usize {
        self.shared.config.message_size_bytes_max
    }

    /// The MQTT topic name a factline topic maps to, or why it cannot be one.
    pub fn topic_name(&self, topic: &str) -> Result<String, factline_messaging::InvalidTopic> {
        codec::topic_name(&self.shared.config.topic_prefix, topic)
    }
}

/// Publishes with QoS 1; see [`MqttPubSub::publisher`].
pub struct MqttPublisher {
    shared: Arc<Shared>,
    closed: AtomicBool,
}

impl std::fmt::Debug for MqttPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttPublisher").finish_non_exhaustive()
    }
}

#[async_trait]
impl Publisher for MqttPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<(), PublishError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PublishError::Closed);
        }
        let name = codec::topic_name(&self.shared.config.topic_prefix, topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        let limit = self.shared.config.message_size_bytes_max;
        let packet_limit = self.shared.publishing.packet_bytes_max();
        let mut packets = Vec::with_capacity(messages.len());
        for message in &messages {
            let size_bytes = message.size_bytes();
            let properties = codec::properties(message);
            let packet_bytes = codec::packet_size_bytes(&name, &message.payload, &properties);
            if size_bytes > limit || packet_bytes > packet_limit {
                return Err(PublishError::MessageTooLarge {
                    message_id: message.id.to_text(),
                    size_bytes: if size_bytes > limit {
                        size_bytes
                    } else {
                        packet_bytes
                    },
                    size_bytes_max: if size_bytes > limit {
                        limit
                    } else {
                        packet_limit
                    },
                });
            }
            packets.push((message.payload.clone(), properties));
        }
        self.shared.publishing.publish(&name, packets).await
    }

    async fn close(&self) -> Result<(), CloseError> {
        // Nothing is buffered: every publish returned after its PUBACKs.
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_or_refused() {
        let endpoint = parse_url("mqtt://u:secret@broker:1884").ok();
        let endpoint = endpoint.as_ref();
        assert_eq!(endpoint.map(|e| e.host.as_str()), Some("broker"));
        assert_eq!(endpoint.map(|e| e.port), Some(1884));
        assert_eq!(
            endpoint.and_then(|e| e.credentials.clone()),
            Some(("u".to_owned(), "secret".to_owned()))
        );
        assert_eq!(
            endpoint.map(|e| e.shown.as_str()),
            Some("mqtt://u:***@broker:1884")
        );
        assert_eq!(parse_url("tcp://[::1]").ok().map(|e| e.port), Some(1883));
        for bad in [
            "http://h",
            "mqtts://h",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "h:1883",
            "mqtt://h/t?x",
        ] {
            assert!(
                matches!(parse_url(bad), Err(ConnectError::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn settings_are_checked() {
        let ok = MqttConfig::new("mqtt://h");
        assert!(ok.check().is_ok());
        assert_eq!(
            ok.clone().in_flight_max(0).check().err().map(|e| e.0),
            Some("in_flight_max")
        );
        assert_eq!(
            ok.clone().in_flight_max(70_000).check().err().map(|e| e.0),
            Some("in_flight_max")
        );
        assert_eq!(
            ok.clone()
                .message_size_bytes_max(MQTT_PACKET_BYTES_MAX)
                .check()
                .err()
                .map(|e| e.0),
            Some("message_size_bytes_max")
        );
        assert_eq!(
            ok.clone().topic_prefix("a/#").check().err().map(|e| e.0),
            Some("topic_prefix")
        );
        assert_eq!(
            ok.clone()
                .connect_timeout(Duration::ZERO)
                .check()
                .err()
                .map(|e| e.0),
            Some("connect_timeout")
        );
        assert_eq!(
            ok.client_id_prefix("a b").check().err().map(|e| e.0),
            Some("client_id_prefix")
        );
    }
}
