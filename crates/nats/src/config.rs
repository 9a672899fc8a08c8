//! Settings of a [`crate::NatsPubSub`]: every buffer and wait has a limit, named here with its
//! default.

use std::time::Duration;

/// Where JetStream keeps a topic's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Storage {
    /// On disk: messages and durable groups survive a server restart (the default).
    File,
    /// In the server's memory: faster, lost when the server stops.
    Memory,
}

pub use factline_messaging::DeliverFrom;

/// Settings of a [`crate::NatsPubSub`]. Build with [`NatsConfig::new`] and the builders; every
/// value is checked by [`crate::NatsPubSub::connect`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The server, e.g. `nats://127.0.0.1:4222` (credentials as `nats://user:pass@host`).
    pub url: String,
    /// How long connecting (and the JetStream check after it) may take. Default 5 s.
    pub connect_timeout: Duration,
    /// Prefix of the JetStream stream that holds a topic (`{prefix}{escaped topic}`; the same
    /// name is the stream's only subject). Default `factline_`.
    pub stream_prefix: String,
    /// Create a topic's stream on first use (default). When false, a topic whose stream does
    /// not exist is an error naming the stream.
    pub create_streams: bool,
    /// Where streams created by this adapter keep their messages. Default [`Storage::File`].
    pub storage: Storage,
    /// Messages a topic keeps at most (its retention window, with the two limits below).
    /// Default 1,000,000.
    pub topic_messages_max: i64,
    /// Bytes a topic keeps at most; `None` sets no byte limit (the message count, the age and
    /// the server's own storage limits still apply). Default `None`: JetStream reserves a
    /// stream's byte limit in full when the stream is created, so a limit per topic multiplies
    /// by the number of topics.
    pub topic_bytes_max: Option<i64>,
    /// Age after which a topic's messages are removed; `None` keeps them (within the other
    /// limits). Default 7 days.
    pub topic_age_max: Option<Duration>,
    /// At a topic's limit, refuse publishes (JetStream `discard: new`) instead of removing the
    /// oldest messages (the default, `discard: old`).
    pub refuse_publish_when_full: bool,
    /// Window in which JetStream drops a second publish of the same message id. Default 2 min.
    pub duplicate_window: Duration,
    /// How long a publish waits for JetStream's acknowledgement. Default 10 s.
    pub publish_timeout: Duration,
    /// Publishes of one call sent before their acknowledgements are awaited. Default 256.
    pub publish_window: usize,
    /// How long a delivery may stay unsettled before JetStream delivers it again. Default 30 s.
    pub ack_wait: Duration,
    /// Unsettled deliveries per consumer (a group shares one consumer): JetStream's
    /// `max_ack_pending`. Default 1,024.
    pub in_flight_max: usize,
    /// Messages asked for per pull request. Default 128.
    pub fetch_batch: usize,
    /// Where new consumers start. Default [`DeliverFrom::Oldest`].
    pub deliver_from: DeliverFrom,
    /// A subscription without a group has a consumer of its own, deleted when the subscription
    /// ends; if the process dies first, JetStream deletes it after this long without a pull.
    /// Default 10 min.
    pub private_consumer_idle_max: Duration,
    /// How long [`factline_messaging::Subscriber::close`] waits to flush acknowledgements.
    /// Default 5 s.
    pub close_timeout: Duration,
}

impl NatsConfig {
    /// The defaults, for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect_timeout: Duration::from_secs(5),
            stream_prefix: "factline_".to_owned(),
            create_streams: true,
            storage: Storage::File,
            topic_messages_max: 1_000_000,
            topic_bytes_max: None,
            topic_age_max: Some(Duration::from_secs(7 * 24 * 3600)),
            refuse_publish_when_full: false,
            duplicate_window: Duration::from_secs(120),
            publish_timeout: Duration::from_secs(10),
            publish_window: 256,
            ack_wait: Duration::from_secs(30),
            in_flight_max: 1_024,
            fetch_batch: 128,
            deliver_from: DeliverFrom::Oldest,
            private_consumer_idle_max: Duration::from_secs(600),
            close_timeout: Duration::from_secs(5),
        }
    }

    /// Builder: see [`NatsConfig::connect_timeout`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Builder: see [`NatsConfig::stream_prefix`].
    #[must_use]
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = prefix.into();
        self
    }

    /// Builder: see [`NatsConfig::create_streams`].
    #[must_use]
    pub fn create_streams(mut self, create: bool) -> Self {
        self.create_streams = create;
        self
    }

    /// Builder: see [`NatsConfig::storage`].
    #[must_use]
    pub fn storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// Builder: see [`NatsConfig::topic_messages_max`].
    #[must_use]
    pub fn topic_messages_max(mut self, messages: i64) -> Self {
        self.topic_messages_max = messages;
        self
    }

    /// Builder: see [`NatsConfig::topic_bytes_max`].
    #[must_use]
    pub fn topic_bytes_max(mut self, bytes: Option<i64>) -> Self {
        self.topic_bytes_max = bytes;
        self
    }

    /// Builder: see [`NatsConfig::topic_age_max`].
    #[must_use]
    pub fn topic_age_max(mut self, age: Option<Duration>) -> Self {
        self.topic_age_max = age;
        self
    }

    /// Builder: see [`NatsConfig::refuse_publish_when_full`].
    #[must_use]
    pub fn refuse_publish_when_full(mut self, refuse: bool) -> Self {
        self.refuse_publish_when_full = refuse;
        self
    }

    /// Builder: see [`NatsConfig::duplicate_window`].
    #[must_use]
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Builder: see [`NatsConfig::publish_timeout`].
    #[must_use]
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Builder: see [`NatsConfig::ack_wait`].
    #[must_use]
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// Builder: see [`NatsConfig::in_flight_max`].
    #[must_use]
    pub fn in_flight_max(mut self, deliveries: usize) -> Self {
        self.in_flight_max = deliveries;
        self
    }

    /// Builder: see [`NatsConfig::fetch_batch`].
    #[must_use]
    pub fn fetch_batch(mut self, messages: usize) -> Self {
        self.fetch_batch = messages;
        self
    }

    /// Builder: see [`NatsConfig::deliver_from`].
    #[must_use]
    pub fn deliver_from(mut self, from: DeliverFrom) -> Self {
        self.deliver_from = from;
        self
    }

    /// Builder: see [`NatsConfig::private_consumer_idle_max`].
    #[must_use]
    pub fn private_consumer_idle_max(mut self, idle: Duration) -> Self {
        self.private_consumer_idle_max = idle;
        self
    }

    /// Every setting that cannot work, as `(field, reason)`.
    pub(crate) fn check(&self) -> Result<(), (&'static str, String)> {
        let positive = [
            ("connect_timeout", self.connect_timeout),
            ("duplicate_window", self.duplicate_window),
            ("publish_timeout", self.publish_timeout),
            ("ack_wait", self.ack_wait),
            ("private_consumer_idle_max", self.private_consumer_idle_max),
            ("close_timeout", self.close_timeout),
        ];
        for (field, value) in positive {
            if value.is_zero() {
                return Err((field, "must be more than 0".into()));
            }
        }
        if self.topic_age_max.is_some_and(|age| age.is_zero()) {
            return Err(("topic_age_max", "must be more than 0 (or None)".into()));
        }
        for (field, value) in [
            ("topic_messages_max", Some(self.topic_messages_max)),
            ("topic_bytes_max", self.topic_bytes_max),
        ] {
            if let Some(value) = value
                && value < 1
            {
                return Err((field, format!("must be at least 1, not {value}")));
            }
        }
        for (field, value) in [
            ("publish_window", self.publish_window),
            ("in_flight_max", self.in_flight_max),
            ("fetch_batch", self.fetch_batch),
        ] {
            if value < 1 {
                return Err((field, "must be at least 1".into()));
            }
        }
        if self.in_flight_max > i64::MAX as usize {
            return Err(("in_flight_max", "is too large".into()));
        }
        let prefix_ok = self
            .stream_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !prefix_ok || self.stream_prefix.len() > 64 {
            return Err((
                "stream_prefix",
                format!(
                    "{:?} must be at most 64 bytes of [A-Za-z0-9_-]",
                    self.stream_prefix
                ),
            ));
        }
        Ok(())
    }
}
