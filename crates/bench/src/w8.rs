//! Workload W8: a broker adapter through factline beside the broker's own client doing the same
//! work, on the same server, in interleaved rounds (median reported).
//!
//! Two phases per adapter, each a fixed number of 200-byte messages on a fresh topic:
//! - **publish**: one task publishes batches of `publish_batch` and waits for the broker to
//!   confirm each batch — factline's `Publisher::publish` against the raw client sending the
//!   same messages (same id header) and awaiting the same confirmations;
//! - **consume**: a preloaded backlog is read and every message acked — a `Router` consumer
//!   handler (the router acks after the handler) against the raw client's consumer loop that
//!   acks each message itself, with the same fetch size and in-flight limit.
//!
//! The figure is messages per second from the first publish (or the subscription) to the last
//! confirmation (or the last ack sent for the backlog's final message). The ratio is factline's
//! figure over the raw client's: 1.00x means no overhead, the target is at least 0.80x.
//!
//! Adapters measured: NATS JetStream (`nats`, file storage, the server at `--nats-url`),
//! Redis Streams (`redis`, the server at `--redis-url`) and RabbitMQ (`rabbitmq`, a durable
//! fanout exchange and a durable queue, persistent messages with publisher confirms, the broker
//! at `--amqp-url`).
//! MQTT (`mqtt`, QoS 1 on Mosquitto at `--mqtt-url`) is measured too; its consume phase is fed
//! live rather than from a preloaded backlog (see `w8_mqtt.rs`).
//! Kafka (`kafka`, the broker at `--kafka-url`): `factline-kafka` against `rdkafka` with the
//! adapter's producer and consumer settings, on a topic of 4 partitions made before the clock
//! (see `w8_kafka.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use factline_messaging::{Message, Router, RouterConfig, consumer_fn};
use futures::StreamExt as _;
use serde::Serialize;

/// Sizes of a W8 run.
#[derive(Debug, Clone)]
pub struct W8Options {
    /// Rounds; the median is reported.
    pub rounds: usize,
    /// Messages per phase.
    pub messages: usize,
    /// Messages per publish call (and per confirmation wait of the raw client).
    pub publish_batch: usize,
    /// Adapters to run.
    pub adapters: Vec<W8Adapter>,
    /// The NATS server.
    pub nats_url: String,
    /// The Redis server.
    pub redis_url: String,
    /// The PostgreSQL database of the SQL adapter.
    pub postgres_url: String,
    /// The RabbitMQ broker.
    pub amqp_url: String,
    /// The MQTT broker.
    pub mqtt_url: String,
    /// The Kafka bootstrap brokers (`host:port[,host:port…]`).
    pub kafka_url: String,
    /// How long one phase may take before the run fails.
    pub phase_timeout: Duration,
}

impl W8Options {
    /// The full run.
    pub fn full() -> Self {
        Self {
            rounds: 3,
            messages: 50_000,
            publish_batch: 100,
            adapters: W8Adapter::ALL.to_vec(),
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            postgres_url: "postgres://postgres@127.0.0.1:5432/test".to_owned(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            mqtt_url: "mqtt://127.0.0.1:1883".to_owned(),
            kafka_url: "127.0.0.1:9092".to_owned(),
            phase_timeout: Duration::from_secs(120),
        }
    }

    /// A short run.
    pub fn quick() -> Self {
        Self {
            rounds: 1,
            messages: 10_000,
            ..Self::full()
        }
    }

    /// Tiny, for tests of the harness.
    pub fn smoke() -> Self {
        Self {
            rounds: 1,
            messages: 500,
            ..Self::full()
        }
    }
}

/// The adapters of W8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum W8Adapter {
    /// NATS JetStream: `factline-nats` against `async-nats`.
    Nats,
    /// Redis Streams: `factline-redis` against the `redis` crate.
    Redis,
    /// PostgreSQL tables: `factline-sql` against `sqlx` running the same statements.
    Sql,
    /// RabbitMQ: `factline-rabbitmq` against `lapin`.
    Rabbitmq,
    /// MQTT (Mosquitto): `factline-mqtt` against `rumqttc`.
    Mqtt,
    /// Kafka: `factline-kafka` against `rdkafka`.
    Kafka,
}

impl W8Adapter {
    /// All, in report order.
    pub const ALL: [Self; 6] = [
        Self::Nats,
        Self::Redis,
        Self::Rabbitmq,
        Self::Sql,
        Self::Mqtt,
        Self::Kafka,
    ];

    /// Name in the table.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Nats => "nats",
            Self::Redis => "redis",
            Self::Sql => "sql",
            Self::Rabbitmq => "rabbitmq",
            Self::Mqtt => "mqtt",
            Self::Kafka => "kafka",
        }
    }
}

/// One measured (adapter, phase) cell: the median round of each side.
#[derive(Debug, Clone, Serialize)]
pub struct W8Row {
    /// Adapter name.
    pub adapter: String,
    /// `publish` or `consume`.
    pub phase: String,
    /// Messages per second through factline.
    pub factline_per_sec: f64,
    /// Messages per second with the raw client.
    pub raw_per_sec: f64,
    /// Every round's factline/raw ratio, in run order.
    pub round_ratios: Vec<f64>,
}

impl W8Row {
    /// factline over raw (1.0: no overhead).
    pub fn ratio(&self) -> f64 {
        if self.raw_per_sec > 0.0 {
            self.factline_per_sec / self.raw_per_sec
        } else {
            0.0
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
        .get(sorted.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0.0)
}

/// Runs W8 and returns a row per adapter and phase.
pub async fn run_w8(options: &W8Options) -> Result<Vec<W8Row>> {
    let mut rows = Vec::new();
    for &adapter in &options.adapters {
        for phase in [Phase::Publish, Phase::Consume] {
            let (mut factline, mut raw, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..options.rounds {
                // Alternate which side goes first, so neither always meets a warmer server.
                let order = if round % 2 == 0 {
                    [Side::Factline, Side::Raw]
                } else {
                    [Side::Raw, Side::Factline]
                };
                let mut this_round = [0.0f64; 2];
                for side in order {
                    eprintln!(
                        "[factline-bench] W8 round {}/{} {} {} {}",
                        round + 1,
                        options.rounds,
                        adapter.name(),
                        phase.name(),
                        side.name()
                    );
                    let rate = tokio::time::timeout(
                        options.phase_timeout,
                        measure(adapter, phase, side, options),
                    )
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "W8 {} {} {} took over {:?}",
                            adapter.name(),
                            phase.name(),
                            side.name(),
                            options.phase_timeout
                        )
                    })??;
                    eprintln!("[factline-bench]   {:.0} messages/s", rate);
                    this_round[side as usize] = rate;
                }
                factline.push(this_round[Side::Factline as usize]);
                raw.push(this_round[Side::Raw as usize]);
                ratios.push(this_round[Side::Factline as usize] / this_round[Side::Raw as usize]);
            }
            rows.push(W8Row {
                adapter: adapter.name().to_owned(),
                phase: phase.name().to_owned(),
                factline_per_sec: median(&factline),
                raw_per_sec: median(&raw),
                round_ratios: ratios,
            });
        }
    }
    Ok(rows)
}

/// The table.
pub fn render_w8(rows: &[W8Row]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "W8: broker adapters through factline (router for consuming) vs the raw client, messages/s\n",
    );
    let _ = writeln!(
        out,
        "{:<8} {:<8} {:>14} {:>14} {:>9}  rounds",
        "adapter", "phase", "factline/s", "raw client/s", "ratio"
    );
    for row in rows {
        let rounds: Vec<String> = row
            .round_ratios
            .iter()
            .map(|r| format!("{r:.2}x"))
            .collect();
        let _ = writeln!(
            out,
            "{:<8} {:<8} {:>14.0} {:>14.0} {:>8.2}x  {}",
            row.adapter,
            row.phase,
            row.factline_per_sec,
            row.raw_per_sec,
            row.ratio(),
            rounds.join(" ")
        );
    }
    out
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Publish,
    Consume,
}

impl Phase {
    const fn name(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Consume => "consume",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Factline = 0,
    Raw = 1,
}

impl Side {
    const fn name(self) -> &'static str {
        match self {
            Self::Factline => "factline",
            Self::Raw => "raw",
        }
    }
}

fn payload() -> Bytes {
    Bytes::from(vec![b'x'; 200])
}

/// factline's side of the publish phase: `count` messages in batches through `publisher`.
async fn factline_publish(
    publisher: &dyn factline_messaging::Publisher,
    topic: &str,
    count: usize,
    batch: usize,
) -> Result<()> {
    let body = payload();
    let mut sent = 0;
    while sent < count {
        let n = batch.min(count - sent);
        let messages: Vec<Message> = (0..n).map(|_| Message::new(body.clone())).collect();
        publisher
            .publish(topic, messages)
            .await
            .context("publish")?;
        sent += n;
    }
    Ok(())
}

/// factline's side of the consume phase: a router consumer handler over `subscriber` that
/// counts (the router acks); messages/s until the `count`th is handled.
async fn router_consume(
    subscriber: Arc<dyn factline_messaging::Subscriber>,
    topic: &str,
    count: usize,
) -> Result<f64> {
    let clocks = router_consume_clocked(subscriber, topic, count).await?;
    Ok(count as f64 / clocks.last.duration_since(clocks.started).as_secs_f64())
}

/// When a [`router_consume_clocked`] run started, handled its first message and its last.
struct ConsumeClocks {
    started: Instant,
    first: Instant,
    last: Instant,
}

/// Runs a router consumer handler over `subscriber` that counts (the router acks) until the
/// `count`th message is handled.
async fn router_consume_clocked(
    subscriber: Arc<dyn factline_messaging::Subscriber>,
    topic: &str,
    count: usize,
) -> Result<ConsumeClocks> {
    let handled = Arc::new(AtomicU64::new(0));
    let first = Arc::new(std::sync::OnceLock::new());
    let done = Arc::new(tokio::sync::Notify::new());
    let mut router = Router::new(RouterConfig::default().close_timeout(Duration::from_secs(10)));
    {
        let (handled, first, done) = (handled.clone(), first.clone(), done.clone());
        let target = count as u64;
        router
            .add_consumer_handler(
                "w8-count",
                topic,
                subscriber,
                consumer_fn(move |_message: Message| {
                    first.get_or_init(Instant::now);
                    if handled.fetch_add(1, Ordering::Relaxed) + 1 == target {
                        done.notify_one();
                    }
                    async { Ok(()) }
                }),
            )
            .context("add handler")?;
    }
    let started = Instant::now();
    let running = router.start().await.context("start the router")?;
    done.notified().await;
    let last = Instant::now();
    running.shutdown().await;
    let first = *first.get().context("no message was handled")?;
    Ok(ConsumeClocks {
        started,
        first,
        last,
    })
}

async fn measure(adapter: W8Adapter, phase: Phase, side: Side, options: &W8Options) -> Result<f64> {
    match adapter {
        W8Adapter::Nats => nats::measure(phase, side, options).await,
        W8Adapter::Redis => redis_streams::measure(phase, side, options).await,
        W8Adapter::Sql => sql::measure(phase, side, options).await,
        W8Adapter::Rabbitmq => rabbitmq::measure(phase, side, options).await,
        W8Adapter::Mqtt => mqtt::measure(phase, side, options).await,
        W8Adapter::Kafka => kafka::measure(phase, side, options).await,
    }
}

/// W8 on PostgreSQL tables.
#[path = "w8_sql.rs"]
mod sql;

/// W8 on MQTT (Mosquitto).
#[path = "w8_mqtt.rs"]
mod mqtt;

/// W8 on Kafka.
#[path = "w8_kafka.rs"]
mod kafka;

/// W8 on NATS JetStream.
mod nats {
    use super::*;
    use async_nats::jetstream::{self, AckKind, consumer::pull};
    use factline_nats::{NatsConfig, NatsPubSub};

    const PREFIX: &str = "flbench_";
    /// The adapter's defaults, which the raw side copies.
    const FETCH_BATCH: usize = 128;
    const IN_FLIGHT_MAX: i64 = 1_024;
    const PUBLISH_WINDOW: usize = 256;

    fn topic() -> String {
        format!("w8_{}", uuid::Uuid::now_v7().simple())
    }

    async fn connect(options: &W8Options) -> Result<NatsPubSub> {
        NatsPubSub::connect(NatsConfig::new(options.nats_url.clone()).stream_prefix(PREFIX))
            .await
            .with_context(|| format!("connect to NATS at {}", options.nats_url))
    }

    /// The raw client's publish of `count` messages in batches, as the adapter does it: every
    /// message with its id header, each batch's confirmations awaited (in windows of the
    /// adapter's size) before the next.
    async fn raw_publish(
        jetstream: &jetstream::Context,
        subject: &str,
        count: usize,
        batch: usize,
    ) -> Result<()> {
        let body = payload();
        let mut sent = 0;
        while sent < count {
            let n = batch.min(count - sent);
            let mut acks = Vec::with_capacity(PUBLISH_WINDOW.min(n));
            for _ in 0..n {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string());
                acks.push(
                    jetstream
                        .publish_with_headers(subject.to_owned(), headers, body.clone())
                        .await
                        .context("raw publish")?,
                );
                if acks.len() == PUBLISH_WINDOW {
                    for ack in acks.drain(..) {
                        ack.await.context("raw publish ack")?;
                    }
                }
            }
            for ack in acks {
                ack.await.context("raw publish ack")?;
            }
            sent += n;
        }
        Ok(())
    }

    pub(super) async fn measure(phase: Phase, side: Side, options: &W8Options) -> Result<f64> {
        let pubsub = connect(options).await?;
        let topic = topic();
        let subject = factline_nats::stream_name(PREFIX, &topic)?;
        let jetstream = jetstream::new(pubsub.client().clone());
        // The stream exists, with the adapter's default settings, before either side's clock
        // starts.
        jetstream
            .get_or_create_stream(jetstream::stream::Config {
                name: subject.clone(),
                subjects: vec![subject.clone()],
                max_messages: 1_000_000,
                max_age: Duration::from_secs(7 * 24 * 3600),
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .context("make the stream")?;
        let count = options.messages;
        let rate = match phase {
            Phase::Publish => {
                let started = Instant::now();
                match side {
                    Side::Factline => {
                        factline_publish(&pubsub.publisher(), &topic, count, options.publish_batch)
                            .await?
                    }
                    Side::Raw => {
                        raw_publish(&jetstream, &subject, count, options.publish_batch).await?
                    }
                }
                count as f64 / started.elapsed().as_secs_f64()
            }
            Phase::Consume => {
                raw_publish(&jetstream, &subject, count, options.publish_batch).await?;
                match side {
                    Side::Factline => {
                        let subscriber = pubsub.subscriber_in_group("w8").context("group name")?;
                        router_consume(Arc::new(subscriber), &topic, count).await?
                    }
                    Side::Raw => raw_consume(&jetstream, &subject, count).await?,
                }
            }
        };
        pubsub
            .delete_topics(&[&topic])
            .await
            .map_err(|error| anyhow::anyhow!("delete the W8 stream: {error}"))?;
        Ok(rate)
    }

    async fn raw_consume(
        jetstream: &jetstream::Context,
        subject: &str,
        count: usize,
    ) -> Result<f64> {
        let started = Instant::now();
        let stream = jetstream
            .get_stream(subject)
            .await
            .context("get the stream")?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                "g_w8",
                pull::Config {
                    durable_name: Some("g_w8".to_owned()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    max_ack_pending: IN_FLIGHT_MAX,
                    ..Default::default()
                },
            )
            .await
            .context("make the consumer")?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(FETCH_BATCH)
            .heartbeat(Duration::from_secs(2))
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .context("start pulling")?;
        let mut handled = 0;
        while handled < count {
            let Some(message) = messages.next().await else {
                bail!("the raw pull ended after {handled} messages");
            };
            let message = message.context("raw pull")?;
            message
                .ack_with(AckKind::Ack)
                .await
                .map_err(|error| anyhow::anyhow!("raw ack: {error}"))?;
            handled += 1;
        }
        Ok(count as f64 / started.elapsed().as_secs_f64())
    }
}

/// W8 on Redis Streams.
mod redis_streams {
    use super::*;
    use factline_redis::{RedisConfig, RedisPubSub};
    use redis::streams::StreamReadReply;

    const PREFIX: &str = "flbench:";
    /// The adapter's defaults, which the raw side copies.
    const FETCH_BATCH: usize = 128;
    const MAXLEN: u64 = 1_000_000;

    async fn raw_publish(
        conn: &mut redis::aio::MultiplexedConnection,
        key: &str,
        count: usize,
        batch: usize,
    ) -> Result<()> {
        let body = payload();
        let mut sent = 0;
        while sent < count {
            let n = batch.min(count - sent);
            let mut pipe = redis::pipe();
            for _ in 0..n {
                pipe.cmd("XADD")
                    .arg(key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(MAXLEN)
                    .arg("*")
                    .arg("i")
                    .arg(uuid::Uuid::now_v7().to_string())
                    .arg("p")
                    .arg(body.as_ref());
            }
            pipe.query_async::<Vec<String>>(conn)
                .await
                .context("raw XADD")?;
            sent += n;
        }
        Ok(())
    }

    pub(super) async fn measure(phase: Phase, side: Side, options: &W8Options) -> Result<f64> {
        let pubsub =
            RedisPubSub::connect(RedisConfig::new(options.redis_url.clone()).key_prefix(PREFIX))
                .await
                .with_context(|| format!("connect to Redis at {}", options.redis_url))?;
        let client = redis::Client::open(options.redis_url.as_str()).context("the Redis URL")?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .context("connect the raw client")?;
        let topic = format!("w8_{}", uuid::Uuid::now_v7().simple());
        let key = format!("{PREFIX}{topic}");
        let count = options.messages;
        let rate = match phase {
            Phase::Publish => {
                let started = Instant::now();
                match side {
                    Side::Factline => {
                        factline_publish(&pubsub.publisher(), &topic, count, options.publish_batch)
                            .await?
                    }
                    Side::Raw => raw_publish(&mut conn, &key, count, options.publish_batch).await?,
                }
                count as f64 / started.elapsed().as_secs_f64()
            }
            Phase::Consume => {
                raw_publish(&mut conn, &key, count, options.publish_batch).await?;
                match side {
                    Side::Factline => {
                        let subscriber = pubsub.subscriber_in_group("w8").context("group name")?;
                        router_consume(Arc::new(subscriber), &topic, count).await?
                    }
                    Side::Raw => raw_consume(&client, &key, count).await?,
                }
            }
        };
        pubsub
            .delete_topics(&[&topic])
            .await
            .map_err(|error| anyhow::anyhow!("delete the W8 stream: {error}"))?;
        Ok(rate)
    }

    /// The raw client's consumer: a group from the start, blocking reads of the adapter's
    /// batch size on a connection of its own, and every read batch acked with one `XACK`.
    async fn raw_consume(client: &redis::Client, key: &str, count: usize) -> Result<f64> {
        let started = Instant::now();
        let mut reads = client
            .get_multiplexed_async_connection()
            .await
            .context("connect the raw reader")?;
        let mut acks = client
            .get_multiplexed_async_connection()
            .await
            .context("connect the raw acker")?;
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg("w8")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut acks)
            .await
            .context("XGROUP CREATE")?;
        let mut handled = 0;
        while handled < count {
            let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("w8")
                .arg("raw")
                .arg("COUNT")
                .arg(FETCH_BATCH)
                .arg("BLOCK")
                .arg(1_000)
                .arg("STREAMS")
                .arg(key)
                .arg(">")
                .query_async(&mut reads)
                .await
                .context("XREADGROUP")?;
            let ids: Vec<String> = reply
                .map(|reply| {
                    reply
                        .keys
                        .into_iter()
                        .flat_map(|key| key.ids)
                        .map(|entry| entry.id)
                        .collect()
                })
                .unwrap_or_default();
            if ids.is_empty() {
                bail!("the raw read found nothing after {handled} entries");
            }
            handled += ids.len();
            let _: i64 = redis::cmd("XACK")
                .arg(key)
                .arg("w8")
                .arg(&ids)
                .query_async(&mut acks)
                .await
                .context("XACK")?;
        }
        Ok(count as f64 / started.elapsed().as_secs_f64())
    }
}

/// W8 on RabbitMQ.
mod rabbitmq {
    use super::*;
    use factline_rabbitmq::{RabbitConfig, RabbitPubSub};
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    };
    use lapin::types::{FieldTable, ShortString};
    use lapin::{BasicProperties, Channel, ExchangeKind};

    const PREFIX: &str = "flbench.";
    const GROUP: &str = "w8";
    /// The adapter's default prefetch, which the raw side copies.
    const PREFETCH: u16 = 1_024;

    /// The raw client's publish of `count` messages in batches, as the adapter does it: each
    /// message persistent with its id as `message-id`, every batch's publisher confirms awaited
    /// before the next.
    async fn raw_publish(
        channel: &Channel,
        exchange: &str,
        count: usize,
        batch: usize,
    ) -> Result<()> {
        let body = payload();
        let exchange = ShortString::try_new(exchange).context("the exchange name")?;
        let mut sent = 0;
        while sent < count {
            let n = batch.min(count - sent);
            let mut confirms = Vec::with_capacity(n);
            for _ in 0..n {
                let properties = BasicProperties::default()
                    .with_message_id(uuid::Uuid::now_v7().to_string().into())
                    .with_delivery_mode(2);
                confirms.push(
                    channel
                        .basic_publish(
                            exchange.clone(),
                            ShortString::default(),
                            BasicPublishOptions::default(),
                            &body,
                            properties,
                        )
                        .await
                        .context("raw publish")?,
                );
            }
            for confirm in confirms {
                let confirmation = confirm.await.context("raw publish confirm")?;
                if confirmation.is_nack() {
                    bail!("the broker nacked a raw publish");
                }
            }
            sent += n;
        }
        Ok(())
    }

    pub(super) async fn measure(phase: Phase, side: Side, options: &W8Options) -> Result<f64> {
        let pubsub =
            RabbitPubSub::connect(RabbitConfig::new(options.amqp_url.clone()).name_prefix(PREFIX))
                .await
                .with_context(|| {
                    format!(
                        "connect to RabbitMQ at {}",
                        factline_messaging::redact_url(&options.amqp_url)
                    )
                })?;
        let raw =
            lapin::Connection::connect(&options.amqp_url, lapin::ConnectionProperties::default())
                .await
                .context("connect the raw client")?;
        let channel = raw.create_channel().await.context("open a raw channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("confirm mode")?;
        let topic = format!("w8_{}", uuid::Uuid::now_v7().simple());
        let exchange = factline_rabbitmq::exchange_name(PREFIX, &topic);
        let queue = factline_rabbitmq::group_queue_name(PREFIX, &topic, GROUP);
        // The exchange and the group's queue exist, as the adapter declares them, before either
        // side's clock starts.
        channel
            .exchange_declare(
                ShortString::try_new(exchange.as_str()).context("exchange name")?,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declare the exchange")?;
        channel
            .queue_declare(
                ShortString::try_new(queue.as_str()).context("queue name")?,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declare the queue")?;
        channel
            .queue_bind(
                ShortString::try_new(queue.as_str()).context("queue name")?,
                ShortString::try_new(exchange.as_str()).context("exchange name")?,
                ShortString::default(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("bind the queue")?;
        let count = options.messages;
        let rate = match phase {
            Phase::Publish => {
                let started = Instant::now();
                match side {
                    Side::Factline => {
                        factline_publish(&pubsub.publisher(), &topic, count, options.publish_batch)
                            .await?
                    }
                    Side::Raw => {
                        raw_publish(&channel, &exchange, count, options.publish_batch).await?
                    }
                }
                count as f64 / started.elapsed().as_secs_f64()
            }
            Phase::Consume => {
                raw_publish(&channel, &exchange, count, options.publish_batch).await?;
                match side {
                    Side::Factline => {
                        let subscriber = pubsub.subscriber_in_group(GROUP).context("group name")?;
                        router_consume(Arc::new(subscriber), &topic, count).await?
                    }
                    Side::Raw => raw_consume(&raw, &queue, count).await?,
                }
            }
        };
        let _ = channel.close(200, "done".into()).await;
        let _ = raw.close(200, "done".into()).await;
        pubsub
            .delete_topics(&[&topic], &[GROUP])
            .await
            .map_err(|error| anyhow::anyhow!("delete the W8 exchange and queue: {error}"))?;
        Ok(rate)
    }

    /// The raw client's consumer: a channel of its own with the adapter's prefetch, manual
    /// acknowledgement, every delivery acked (`basic.ack` of its tag) as it arrives, the acks
    /// in flight concurrently (not one awaited before the next delivery is taken).
    async fn raw_consume(raw: &lapin::Connection, queue: &str, count: usize) -> Result<f64> {
        let started = Instant::now();
        let channel = raw
            .create_channel()
            .await
            .context("open the consuming channel")?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .context("basic.qos")?;
        let mut consumer = channel
            .basic_consume(
                ShortString::try_new(queue).context("queue name")?,
                ShortString::default(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("basic.consume")?;
        let mut handled = 0;
        let mut acks: futures::stream::FuturesUnordered<
            futures::future::BoxFuture<'static, lapin::Result<bool>>,
        > = futures::stream::FuturesUnordered::new();
        while handled < count || !acks.is_empty() {
            tokio::select! {
                Some(acked) = acks.next(), if !acks.is_empty() => {
                    let _: bool = acked.context("raw ack")?;
                }
                delivery = consumer.next(), if handled < count => {
                    let Some(delivery) = delivery else {
                        bail!("the raw consumer ended after {handled} messages");
                    };
                    let acker = delivery.context("raw delivery")?.acker;
                    acks.push(Box::pin(async move { acker.ack(BasicAckOptions::default()).await }));
                    handled += 1;
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let _ = channel.close(200, "done".into()).await;
        Ok(count as f64 / elapsed)
    }
}
