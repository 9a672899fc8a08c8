//! factline's Kafka adapter: a [`Publisher`] and a
//! [`Subscriber`](factline_messaging::Subscriber) that keep the pub/sub contract of
//! `docs/specs/pubsub-adapter.md` on Apache Kafka and Kafka-protocol brokers (through
//! `rdkafka`, the bundled librdkafka). `docs/design/kafka.md` explains the design.
//!
//! - A topic is a Kafka topic of the same name (with [`KafkaConfig::topic_prefix`] before it).
//!   Kafka allows 1..=249 bytes of `[A-Za-z0-9._-]`; other names are refused with
//!   [`InvalidTopic`] rather than rewritten, so that other
//!   Kafka clients see the names the application chose. A topic that does not exist is created
//!   (with [`KafkaConfig::topic_partitions`]) when first used, unless
//!   [`KafkaConfig::create_topics`] is off: then using it is an error that names it.
//! - `publish` sends through one idempotent producer (`enable.idempotence`, `acks=all`) and
//!   returns when the broker acknowledged every message of the call. A message's partition key
//!   ([`Metadata::PARTITION_KEY`](factline_messaging::Metadata::PARTITION_KEY)) is its record key,
//!   partitioned with murmur2 as Java clients do: one key's messages share a partition and keep
//!   their publish order. The id and metadata travel as headers (`codec`).
//! - A consumer group is a Kafka consumer group (`{group_prefix}{group}`), each subscription one
//!   member (cooperative-sticky assignment). An offset is committed only once the application
//!   acked every message before it in its partition: librdkafka commits what the adapter stored,
//!   every [`KafkaConfig::commit_interval`] and when a partition is revoked or the subscription
//!   closes. A nack (or a dropped delivery) redelivers the message from memory after its delay
//!   while the partition goes on; its offset stays uncommitted until it is acked, so a crash or a
//!   rebalance redelivers it (and what came after it) to the partition's next owner.
//! - A subscription without a group reads every partition itself (no group, nothing committed),
//!   from the oldest message or from the end as of `subscribe` ([`KafkaConfig::deliver_from`]).
//! - librdkafka reconnects by itself; the adapter rides through a broker restart.
//! - Bad configuration is a typed [`ConnectError`] from [`KafkaPubSub::connect`], within
//!   [`KafkaConfig::connect_timeout`]: an invalid setting, a bootstrap list that cannot be
//!   parsed, a broker that cannot be reached or refuses the login.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use factline_messaging::{Message, Publisher as _, Subscriber as _};
//! use factline_kafka::{KafkaConfig, KafkaPubSub};
//! use futures::StreamExt as _;
//!
//! let kafka = KafkaPubSub::connect(KafkaConfig::new("127.0.0.1:9092")).await?;
//! let subscriber = kafka.subscriber_in_group("billing")?;
//! let mut orders = subscriber.subscribe("orders").await?;
//! let placed = Message::new("order 42 placed").with_metadata("partition_key", "order-42");
//! kafka.publisher().publish("orders", vec![placed]).await?;
//! if let Some(Ok(message)) = orders.next().await {
//!     message.ack();
//! }
//! subscriber.close().await?;
//! # Ok(())
//! # }
//! ```

mod codec;
mod subscribe;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::{
    BoxError, CloseError, DeliverFrom, InvalidTopic, Message, PublishError, Publisher, check_topic,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

pub use codec::ID_HEADER;
pub use factline_messaging::redact_url;
pub use subscribe::KafkaSubscriber;

/// Longest Kafka topic name, in bytes (the broker's own limit).
pub const KAFKA_TOPIC_BYTES_MAX: usize = 249;

/// Longest consumer group name accepted (prefix included), in bytes.
pub const GROUP_BYTES_MAX: usize = 255;

/// How long past [`KafkaConfig::publish_timeout`] a publish waits for librdkafka's own
/// timeout report before it gives up on the producer itself.
const PUBLISH_TIMEOUT_GRACE: Duration = Duration::from_millis(500);

/// Largest [`KafkaConfig::message_size_bytes_max`] accepted: 64 MiB.
pub const MESSAGE_SIZE_BYTES_LIMIT: usize = 64 * 1024 * 1024;

/// Settings of a [`KafkaPubSub`]; every value is checked by [`KafkaPubSub::connect`].
/// Its `Debug` form shows the bootstrap list with any password hidden and only the keys of
/// [`KafkaConfig::client_options`] (their values may be passwords or keys).
#[derive(Clone)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// The bootstrap brokers: `host:port[,host:port…]`, optionally written as a URL
    /// (`kafka://host:port,host:port`).
    pub bootstrap_servers: String,
    /// Put before every topic name. Default empty.
    pub topic_prefix: String,
    /// Put before every consumer group name. Default `factline.`.
    pub group_prefix: String,
    /// Create a topic that does not exist when it is first published to or subscribed to.
    /// Default true; when false, using a missing topic fails with an error that names it.
    pub create_topics: bool,
    /// Partitions of the topics the adapter creates, 1..=10,000. Default 4: up to four members
    /// of a group share a topic's messages.
    pub topic_partitions: i32,
    /// Replication factor of the topics the adapter creates; `None` takes the broker's
    /// default. Default `None`.
    pub topic_replication: Option<i32>,
    /// Where a new consumer group, or a subscription without a group, starts reading.
    /// Default [`DeliverFrom::Oldest`]. A group that committed offsets resumes from them.
    pub deliver_from: DeliverFrom,
    /// Largest message accepted (payload, id and metadata; [`Message::size_bytes`]), at most
    /// [`MESSAGE_SIZE_BYTES_LIMIT`]. Default 1,000,000 bytes (Kafka's default
    /// `message.max.bytes` less room for the record's framing); a broker with a lower limit
    /// refuses larger records itself.
    pub message_size_bytes_max: usize,
    /// Unsettled deliveries per subscription, 1..=1,000,000: at this many the subscription
    /// pauses fetching until the application settles some. Default 1,024.
    pub in_flight_max: usize,
    /// How long connecting (the first metadata request) may take. Default 5 s.
    pub connect_timeout: Duration,
    /// How long one `publish` may take before it fails, retries included (librdkafka's
    /// `message.timeout.ms`). Default 30 s.
    pub publish_timeout: Duration,
    /// How often stored offsets are committed (`auto.commit.interval.ms`). Default 200 ms.
    pub commit_interval: Duration,
    /// A group member that stops sending heartbeats leaves the group after this
    /// (`session.timeout.ms`), and its partitions move to the others. Default 10 s.
    pub session_timeout: Duration,
    /// How long [`Subscriber::close`](factline_messaging::Subscriber::close) and
    /// [`Publisher::close`] wait for commits and outstanding sends. Default 10 s.
    pub close_timeout: Duration,
    /// Further librdkafka settings for every client (`security.protocol`, `sasl.username`,
    /// `client.id`, …), applied after the adapter's own. Default none.
    pub client_options: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let option_keys: Vec<&str> = self
            .client_options
            .iter()
            .map(|(key, _)| key.as_str())
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &redact_url(&self.bootstrap_servers))
            .field("topic_prefix", &self.topic_prefix)
            .field("group_prefix", &self.group_prefix)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication", &self.topic_replication)
            .field("deliver_from", &self.deliver_from)
            .field("message_size_bytes_max", &self.message_size_bytes_max)
            .field("in_flight_max", &self.in_flight_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("commit_interval", &self.commit_interval)
            .field("session_timeout", &self.session_timeout)
            .field("close_timeout", &self.close_timeout)
            .field("client_option_keys", &option_keys)
            .finish()
    }
}

impl KafkaConfig {
    /// The defaults, for the brokers in `bootstrap_servers`.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            topic_prefix: String::new(),
            group_prefix: "factline.".into(),
            create_topics: true,
            topic_partitions: 4,
            topic_replication: None,
            deliver_from: DeliverFrom::Oldest,
            message_size_bytes_max: 1_000_000,
            in_flight_max: 1_024,
            connect_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(30),
            commit_interval: Duration::from_millis(200),
            session_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(10),
            client_options: Vec::new(),
        }
    }

    /// Builder: see [`KafkaConfig::topic_prefix`].
    #[must_use]
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    /// Builder: see [`KafkaConfig::group_prefix`].
    #[must_use]
    pub fn group_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.group_prefix = prefix.into();
        self
    }

    /// Builder: see [`KafkaConfig::create_topics`].
    #[must_use]
    pub fn create_topics(mut self, yes: bool) -> Self {
        self.create_topics = yes;
        self
    }

    /// Builder: see [`KafkaConfig::topic_partitions`].
    #[must_use]
    pub fn topic_partitions(mut self, partitions: i32) -> Self {
        self.topic_partitions = partitions;
        self
    }

    /// Builder: see [`KafkaConfig::topic_replication`].
    #[must_use]
    pub fn topic_replication(mut self, replication: Option<i32>) -> Self {
        self.topic_replication = replication;
        self
    }

    /// Builder: see [`KafkaConfig::deliver_from`].
    #[must_use]
    pub fn deliver_from(mut self, from: DeliverFrom) -> Self {
        self.deliver_from = from;
        self
    }

    /// Builder: see [`KafkaConfig::message_size_bytes_max`].
    #[must_use]
    pub fn message_size_bytes_max(mut self, size: usize) -> Self {
        self.message_size_bytes_max = size;
        self
    }

    /// Builder: see [`KafkaConfig::in_flight_max`].
    #[must_use]
    pub fn in_flight_max(mut self, count: usize) -> Self {
        self.in_flight_max = count;
        self
    }

    /// Builder: see [`KafkaConfig::connect_timeout`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Builder: see [`KafkaConfig::publish_timeout`].
    #[must_use]
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Builder: see [`KafkaConfig::commit_interval`].
    #[must_use]
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// Builder: see [`KafkaConfig::session_timeout`].
    #[must_use]
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// Builder: see [`KafkaConfig::close_timeout`].
    #[must_use]
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Builder: adds a librdkafka setting (see [`KafkaConfig::client_options`]).
    #[must_use]
    pub fn client_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.client_options.push((key.into(), value.into()));
        self
    }

    /// The bootstrap list librdkafka takes (`host:port,…`), or why there is none.
    fn bootstrap_list(&self) -> Result<String, String> {
        let text = self.bootstrap_servers.trim();
        let list = match text.split_once("://") {
            Some(("kafka", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "the scheme {scheme:?} is not kafka:// (or leave the scheme out)"
                ));
            }
            None => text,
        };
        let list = list.trim_end_matches('/');
        if list.is_empty() {
            return Err("no broker is named".into());
        }
        for server in list.split(',') {
            let server = server.trim();
            let Some((host, port)) = server.rsplit_once(':') else {
                return Err(format!("{server:?} is not host:port"));
            };
            // Credentials belong in client_options (sasl.*), never in the list.
            if host.is_empty() || host.contains('@') || port.parse::<u16>().is_err() {
                return Err(format!("{server:?} is not host:port"));
            }
        }
        Ok(list.to_owned())
    }

    fn check(&self) -> Result<String, ConnectError> {
        let invalid =
            |field: &'static str, reason: String| ConnectError::InvalidConfig { field, reason };
        let list = self
            .bootstrap_list()
            .map_err(|reason| ConnectError::InvalidUrl {
                url: redact_url(&self.bootstrap_servers),
                reason,
            })?;
        if !(1..=10_000).contains(&self.topic_partitions) {
            return Err(invalid(
                "topic_partitions",
                format!("{} is outside 1..=10,000", self.topic_partitions),
            ));
        }
        if let Some(replication) = self.topic_replication
            && !(1..=1_000).contains(&replication)
        {
            return Err(invalid(
                "topic_replication",
                format!("{replication} is outside 1..=1,000"),
            ));
        }
        if !(1..=MESSAGE_SIZE_BYTES_LIMIT).contains(&self.message_size_bytes_max) {
            return Err(invalid(
                "message_size_bytes_max",
                format!(
                    "{} is outside 1..={MESSAGE_SIZE_BYTES_LIMIT}",
                    self.message_size_bytes_max
                ),
            ));
        }
        if !(1..=1_000_000).contains(&self.in_flight_max) {
            return Err(invalid(
                "in_flight_max",
                format!("{} is outside 1..=1,000,000", self.in_flight_max),
            ));
        }
        let ms = |field: &'static str, value: Duration, min_ms: u128, max_ms: u128| {
            let got = value.as_millis();
            if (min_ms..=max_ms).contains(&got) {
                Ok(())
            } else {
                Err(invalid(
                    field,
                    format!("{got} ms is outside {min_ms}..={max_ms} ms"),
                ))
            }
        };
        ms("connect_timeout", self.connect_timeout, 1, 3_600_000)?;
        ms("publish_timeout", self.publish_timeout, 1, 3_600_000)?;
        ms("commit_interval", self.commit_interval, 1, 3_600_000)?;
        // Kafka brokers accept 6..=300 s by default (group.min/max.session.timeout.ms).
        ms("session_timeout", self.session_timeout, 1_000, 3_600_000)?;
        ms("close_timeout", self.close_timeout, 1, 3_600_000)?;
        check_prefix("topic_prefix", &self.topic_prefix)?;
        if self.topic_prefix.len() >= KAFKA_TOPIC_BYTES_MAX {
            return Err(invalid(
                "topic_prefix",
                format!(
                    "{} bytes leave no room in a topic name of at most {KAFKA_TOPIC_BYTES_MAX}",
                    self.topic_prefix.len()
                ),
            ));
        }
        if self.group_prefix.len() >= GROUP_BYTES_MAX
            || self.group_prefix.chars().any(char::is_control)
        {
            return Err(invalid(
                "group_prefix",
                format!("must be under {GROUP_BYTES_MAX} bytes, without control characters"),
            ));
        }
        Ok(list)
    }

    /// The settings every client shares.
    fn client_config(&self, bootstrap: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set(
                "socket.connection.setup.timeout.ms",
                millis(self.connect_timeout),
            )
            .set("reconnect.backoff.max.ms", "2000")
            .set(
                "message.max.bytes",
                (self.message_size_bytes_max + 64 * 1024).to_string(),
            );
        for (key, value) in &self.client_options {
            config.set(key, value);
        }
        config
    }
}

fn millis(duration: Duration) -> String {
    duration.as_millis().min(i32::MAX as u128).to_string()
}

/// `duration` in whole milliseconds, for errors that report a limit.
pub(crate) fn millis_u64(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A publish that did not finish within `timeout`.
fn timed_out(timeout: Duration) -> PublishError {
    PublishError::TimedOut {
        timeout_ms: millis_u64(timeout),
    }
}

fn check_prefix(field: &'static str, prefix: &str) -> Result<(), ConnectError> {
    if let Some(bad) = prefix.chars().find(|c| !is_topic_char(*c)) {
        return Err(ConnectError::InvalidConfig {
            field,
            reason: format!("{bad:?} is not one of Kafka's [A-Za-z0-9._-]"),
        });
    }
    Ok(())
}

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// The Kafka topic for `topic`, or why Kafka cannot carry it.
pub fn kafka_topic_name(prefix: &str, topic: &str) -> Result<String, InvalidTopic> {
    check_topic(topic)?;
    let refuse = |reason: String| InvalidTopic {
        topic: topic.chars().take(64).collect(),
        reason,
    };
    if let Some(bad) = topic.chars().find(|c| !is_topic_char(*c)) {
        return Err(refuse(format!(
            "{bad:?} is not allowed: Kafka topic names are [A-Za-z0-9._-]"
        )));
    }
    let name = format!("{prefix}{topic}");
    if name.len() > KAFKA_TOPIC_BYTES_MAX {
        return Err(refuse(format!(
            "the Kafka topic name would be {} bytes, over Kafka's limit of \
             {KAFKA_TOPIC_BYTES_MAX} bytes",
            name.len()
        )));
    }
    if name == "." || name == ".." {
        return Err(refuse("Kafka does not allow the names . and ..".into()));
    }
    Ok(name)
}

/// Why [`KafkaPubSub::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// A setting cannot work.
    #[error("invalid Kafka setting {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The bootstrap list cannot be parsed.
    #[error("invalid Kafka bootstrap servers {url}: {reason}")]
    InvalidUrl {
        /// The list as given (any password hidden).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// librdkafka refused a setting (an unknown `client_options` key, a bad value).
    #[error("librdkafka refused the configuration: {0}")]
    Client(#[source] KafkaError),
    /// No broker answered the first metadata request in time, or it failed (unreachable,
    /// refused login, TLS failure).
    #[error("cannot reach Kafka at {url} within {timeout_ms} ms: {source}")]
    Unreachable {
        /// The bootstrap list.
        url: String,
        /// The connect timeout.
        timeout_ms: u64,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
}

/// What publisher, subscribers and topic creation share.
pub(crate) struct Shared {
    pub(crate) config: KafkaConfig,
    pub(crate) bootstrap: String,
    admin: AdminClient<DefaultClientContext>,
    /// Kafka topics known to exist (created or seen).
    known_topics: Mutex<HashSet<String>>,
    /// The producer every publisher sends through, replaced when it stops delivering.
    producer: RwLock<CurrentProducer>,
}

/// The shared producer and how many times it was replaced.
struct CurrentProducer {
    generation: u64,
    producer: Arc<FutureProducer>,
}

/// The producer's settings: idempotent, every in-sync replica acknowledges, keys partitioned
/// with murmur2 like the Java clients.
fn create_producer(config: &KafkaConfig, bootstrap: &str) -> Result<FutureProducer, KafkaError> {
    config
        .client_config(bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "1")
        .set("message.timeout.ms", millis(config.publish_timeout))
        .set("allow.auto.create.topics", "false")
        .create()
}

impl Shared {
    /// The producer to send through, with its generation (for [`Shared::replace_producer`]).
    fn producer(&self) -> (u64, Arc<FutureProducer>) {
        let current = self
            .producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (current.generation, Arc::clone(&current.producer))
    }

    /// Replaces the producer of `generation` with a new one (unless another publish already
    /// did). librdkafka's idempotent producer cannot always recover by itself: a broker that
    /// lost its state (a restart of a broker without storage, a cluster rebuilt under the
    /// same address) answers its retries with `UNKNOWN_PRODUCER_ID` until every message times
    /// out, and a fatal error ends the producer for good. A new producer starts a new
    /// producer id. Messages the old one still held fail (their publishes see an error and
    /// may be retried: delivery is at least once).
    fn replace_producer(&self, generation: u64, why: &KafkaError) {
        let fresh = match create_producer(&self.config, &self.bootstrap) {
            Ok(fresh) => fresh,
            Err(error) => {
                tracing::error!(%error, "cannot create a new Kafka producer; keeping the old one");
                return;
            }
        };
        let old = {
            let mut current = self
                .producer
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if current.generation != generation {
                return; // Another publish replaced it already; `fresh` is dropped unused.
            }
            current.generation += 1;
            std::mem::replace(&mut current.producer, Arc::new(fresh))
        };
        tracing::warn!(
            error = %why,
            generation = generation + 1,
            "replaced the Kafka producer after it stopped delivering"
        );
        // Dropping a producer purges and flushes it, which blocks for up to half a second.
        drop(tokio::task::spawn_blocking(move || drop(old)));
    }

    /// Makes sure the Kafka topic `name` exists: creates it when allowed, or fails naming it.
    pub(crate) async fn ensure_topic(self: &Arc<Self>, name: &str) -> Result<(), BoxError> {
        if self.topic_known(name) {
            return Ok(());
        }
        if self.config.create_topics {
            let replication = match self.config.topic_replication {
                Some(factor) => TopicReplication::Fixed(factor),
                None => TopicReplication::Fixed(-1),
            };
            let topic = NewTopic::new(name, self.config.topic_partitions, replication);
            let options = AdminOptions::new().operation_timeout(Some(self.config.connect_timeout));
            let results = self.admin.create_topics([&topic], &options).await?;
            for result in results {
                match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((topic, code)) => {
                        return Err(
                            format!("creating the Kafka topic {topic:?} failed: {code}").into()
                        );
                    }
                }
            }
        } else {
            let partitions = self.partition_count(name).await?;
            if partitions == 0 {
                return Err(format!(
                    "the Kafka topic {name:?} does not exist (and create_topics is off)"
                )
                .into());
            }
        }
        self.remember_topic(name);
        Ok(())
    }

    fn topic_known(&self, name: &str) -> bool {
        self.known_topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(name)
    }

    fn forget_topic(&self, name: &str) {
        self.known_topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
    }

    fn remember_topic(&self, name: &str) {
        self.known_topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned());
    }

    /// The number of partitions of `name` the broker reports (0 when it has no such topic).
    pub(crate) async fn partition_count(self: &Arc<Self>, name: &str) -> Result<usize, BoxError> {
        let shared = Arc::clone(self);
        let topic = name.to_owned();
        let metadata = tokio::task::spawn_blocking(move || {
            shared
                .admin
                .inner()
                .fetch_metadata(Some(&topic), shared.config.connect_timeout)
        })
        .await??;
        let count = metadata
            .topics()
            .iter()
            .filter(|topic| topic.name() == name && topic.error().is_none())
            .map(|topic| topic.partitions().len())
            .sum();
        Ok(count)
    }
}

/// A connection to a Kafka cluster: hands out the [`KafkaPublisher`] and subscribers.
/// Cheap to clone; clones and their publishers share one producer.
#[derive(Clone)]
pub struct KafkaPubSub {
    shared: Arc<Shared>,
    publisher: KafkaPublisher,
}

impl std::fmt::Debug for KafkaPubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPubSub")
            .field("bootstrap_servers", &self.shared.bootstrap)
            .finish_non_exhaustive()
    }
}

impl KafkaPubSub {
    /// Checks `config`, creates the clients and asks the cluster for its metadata: an
    /// unreachable cluster, or one that refuses the login, fails here within
    /// [`KafkaConfig::connect_timeout`] rather than at the first publish.
    pub async fn connect(config: KafkaConfig) -> Result<Self, ConnectError> {
        let bootstrap = config.check()?;
        let mut admin_config = config.client_config(&bootstrap);
        // Asking for a topic's metadata must not create it.
        admin_config.set("allow.auto.create.topics", "false");
        let admin: AdminClient<DefaultClientContext> =
            admin_config.create().map_err(ConnectError::Client)?;
        let producer = create_producer(&config, &bootstrap).map_err(ConnectError::Client)?;
        let shared = Arc::new(Shared {
            bootstrap: bootstrap.clone(),
            config,
            admin,
            known_topics: Mutex::new(HashSet::new()),
            producer: RwLock::new(CurrentProducer {
                generation: 0,
                producer: Arc::new(producer),
            }),
        });
        let probe = Arc::clone(&shared);
        let metadata = tokio::task::spawn_blocking(move || {
            probe
                .admin
                .inner()
                .fetch_metadata(None, probe.config.connect_timeout)
        })
        .await;
        let timeout_ms = millis_u64(shared.config.connect_timeout);
        match metadata {
            Ok(Ok(_)) => {}
            Ok(Err(source)) => {
                return Err(ConnectError::Unreachable {
                    url: redact_url(&bootstrap),
                    timeout_ms,
                    source,
                });
            }
            Err(join) => {
                return Err(ConnectError::Unreachable {
                    url: redact_url(&bootstrap),
                    timeout_ms,
                    source: KafkaError::MetadataFetch(if join.is_cancelled() {
                        RDKafkaErrorCode::OperationTimedOut
                    } else {
                        RDKafkaErrorCode::Fail
                    }),
                });
            }
        }
        let publisher = KafkaPublisher {
            shared: Arc::clone(&shared),
            closed: Arc::new(AtomicBool::new(false)),
        };
        Ok(Self { shared, publisher })
    }

    /// A publisher. Publishers share the connection's producer, but each closes on its own:
    /// closing one flushes the producer and refuses that publisher's further publishes.
    pub fn publisher(&self) -> KafkaPublisher {
        KafkaPublisher {
            closed: Arc::new(AtomicBool::new(false)),
            ..self.publisher.clone()
        }
    }

    /// A subscriber whose subscriptions each read every partition of their topic, with no
    /// consumer group (nothing is committed; see [`KafkaConfig::deliver_from`]).
    pub fn subscriber(&self) -> KafkaSubscriber {
        KafkaSubscriber::new(Arc::clone(&self.shared), None)
    }

    /// A subscriber whose subscriptions are members of the consumer group
    /// `{group_prefix}{group}`: each topic's partitions are shared among the members.
    pub fn subscriber_in_group(&self, group: &str) -> Result<KafkaSubscriber, InvalidGroup> {
        let name = format!("{}{group}", self.shared.config.group_prefix);
        if group.is_empty() {
            return Err(InvalidGroup {
                group: group.to_owned(),
                reason: "a group name must not be empty".into(),
            });
        }
        if name.len() > GROUP_BYTES_MAX {
            return Err(InvalidGroup {
                group: group.chars().take(64).collect(),
                reason: format!(
                    "the group name would be {} bytes, over the limit of {GROUP_BYTES_MAX} bytes",
                    name.len()
                ),
            });
        }
        if group.chars().any(char::is_control) {
            return Err(InvalidGroup {
                group: group.escape_debug().to_string(),
                reason: "a group name must not contain control characters".into(),
            });
        }
        Ok(KafkaSubscriber::new(Arc::clone(&self.shared), Some(name)))
    }

    /// The largest message the publisher accepts ([`KafkaConfig::message_size_bytes_max`]).
    pub fn message_size_bytes_max(&self) -> usize {
        self.shared.config.message_size_bytes_max
    }
}

/// A consumer group name the adapter refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid consumer group {group:?}: {reason}")]
pub struct InvalidGroup {
    /// The group (shortened or escaped for display).
    pub group: String,
    /// What was wrong.
    pub reason: String,
}

/// Publishes to Kafka topics through one idempotent producer; see the crate documentation.
#[derive(Clone)]
pub struct KafkaPublisher {
    shared: Arc<Shared>,
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Whether `error` from `producer` means it will not deliver again by itself: its messages
/// timed out (the broker kept refusing them), or librdkafka raised a fatal error.
fn producer_stuck(error: &KafkaError, producer: &FutureProducer) -> bool {
    matches!(
        error,
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)
    ) || producer.client().fatal_error().is_some()
}

fn publish_error(error: KafkaError, timeout: Duration) -> PublishError {
    match error {
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut) => timed_out(timeout),
        other => PublishError::Transport(Box::new(other)),
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<(), PublishError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PublishError::Closed);
        }
        let name = kafka_topic_name(&self.shared.config.topic_prefix, topic)?;
        let size_bytes_max = self.shared.config.message_size_bytes_max;
        for message in &messages {
            let size_bytes = message.size_bytes();
            if size_bytes > size_bytes_max {
                return Err(PublishError::MessageTooLarge {
                    message_id: message.id.to_text(),
                    size_bytes,
                    size_bytes_max,
                });
            }
        }
        if messages.is_empty() {
            return Ok(());
        }
        self.shared
            .ensure_topic(&name)
            .await
            .map_err(PublishError::Transport)?;
        let timeout = self.shared.config.publish_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let (generation, producer) = self.shared.producer();
        let failed = |error: KafkaError| {
            if producer_stuck(&error, &producer) {
                // The topic may be gone too (deleted, or a broker without storage restarted):
                // the next publish makes sure it exists again.
                self.shared.forget_topic(&name);
                self.shared.replace_producer(generation, &error);
            }
            publish_error(error, timeout)
        };
        // Enqueue all, then wait for all: librdkafka batches them, and the idempotent producer
        // keeps their order within each partition, retries included.
        let mut deliveries = Vec::with_capacity(messages.len());
        for message in &messages {
            let headers = codec::encode_headers(message);
            let mut record = FutureRecord::<str, [u8]>::to(&name)
                .payload(&message.payload[..])
                .headers(headers);
            if let Some(key) = message.partition_key() {
                record = record.key(key);
            }
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        if tokio::time::Instant::now() >= deadline {
                            return Err(timed_out(timeout));
                        }
                        record = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((error, _)) => return Err(failed(error)),
                }
            }
        }
        // librdkafka fails a message after `message.timeout.ms`, but not always an idempotent
        // producer's in-flight one that the broker keeps refusing (`UNKNOWN_PRODUCER_ID` after
        // the broker lost its state): past the deadline (and a grace for librdkafka's own
        // report), the producer counts as stuck.
        let hard_deadline = deadline + PUBLISH_TIMEOUT_GRACE;
        for delivery in deliveries {
            let Ok(report) = tokio::time::timeout_at(hard_deadline, delivery).await else {
                return Err(failed(KafkaError::MessageProduction(
                    RDKafkaErrorCode::MessageTimedOut,
                )));
            };
            match report {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => return Err(failed(error)),
                Err(_canceled) => {
                    return Err(PublishError::Transport(
                        "the producer dropped a message without a delivery report".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<(), CloseError> {
        self.closed.store(true, Ordering::Release);
        let (_, producer) = self.shared.producer();
        let timeout = self.shared.config.close_timeout;
        let flushing = Arc::clone(&producer);
        let flushed = tokio::task::spawn_blocking(move || flushing.flush(timeout))
            .await
            .map_err(|join| CloseError::Transport(Box::new(join)))?;
        match flushed {
            Ok(()) => Ok(()),
            Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {
                Err(CloseError::TimedOut {
                    timeout_ms: millis_u64(timeout),
                    pending: usize::try_from(producer.in_flight_count()).unwrap_or(0),
                })
            }
            Err(other) => Err(CloseError::Transport(Box::new(other))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_topic_names_follow_kafka_rules() {
        assert_eq!(
            kafka_topic_name("", "orders.v1-x_y").unwrap(),
            "orders.v1-x_y"
        );
        assert_eq!(kafka_topic_name("app.", "orders").unwrap(), "app.orders");
        for bad in ["with space", "slash/es", "ümlaut", "", "a\u{7}"] {
            assert!(kafka_topic_name("", bad).is_err(), "{bad:?}");
        }
        assert!(kafka_topic_name("", ".").is_err());
        assert!(kafka_topic_name("", &"a".repeat(249)).is_ok());
        let error = kafka_topic_name("", &"a".repeat(250)).unwrap_err();
        assert!(error.reason.contains("249"), "{error}");
        assert!(kafka_topic_name("p.", &"a".repeat(248)).is_err());
    }

    #[test]
    fn bootstrap_lists_parse_or_say_why_not() {
        let list = |text: &str| KafkaConfig::new(text).bootstrap_list();
        assert_eq!(list("127.0.0.1:9092").unwrap(), "127.0.0.1:9092");
        assert_eq!(list("kafka://a:1,b:2/").unwrap(), "a:1,b:2");
        assert!(list("http://a:1").unwrap_err().contains("http"));
        assert!(list("kafka://").is_err());
        assert!(list("a").is_err());
        assert!(list("a:port").is_err());
        assert!(list("user:secret@a:1").is_err());
    }

    #[test]
    fn debug_hides_passwords_and_option_values() {
        let config = KafkaConfig::new("kafka://user:hunter2@broker:9092")
            .client_option("sasl.password", "s3cret-value");
        let text = format!("{config:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("s3cret-value"), "{text}");
        assert!(text.contains("sasl.password"), "{text}");
    }

    #[test]
    fn settings_outside_their_limits_are_refused() {
        let refused = |config: KafkaConfig| match config.check() {
            Err(ConnectError::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        };
        let base = || KafkaConfig::new("127.0.0.1:9092");
        assert_eq!(refused(base().topic_partitions(0)), "topic_partitions");
        assert_eq!(refused(base().in_flight_max(0)), "in_flight_max");
        assert_eq!(
            refused(base().message_size_bytes_max(MESSAGE_SIZE_BYTES_LIMIT + 1)),
            "message_size_bytes_max"
        );
        assert_eq!(
            refused(base().session_timeout(Duration::from_millis(10))),
            "session_timeout"
        );
        assert_eq!(refused(base().topic_prefix("bad prefix")), "topic_prefix");
        assert_eq!(
            refused(base().topic_replication(Some(0))),
            "topic_replication"
        );
        assert!(base().check().is_ok());
    }
}
