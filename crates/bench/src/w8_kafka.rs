//! W8 on Kafka: `factline-kafka` against `rdkafka` (the same bundled librdkafka) doing the same
//! work.
//!
//! Before either side's clock starts, the topic is made by the adapter's own create path (a
//! subscription without a group, closed at once) with the adapter's default of 4 partitions.
//! Messages carry no record key on either side, so the producer spreads them over the
//! partitions (`murmur2_random` partitions keyless records at random, with librdkafka's sticky
//! partitioning).
//!
//! - **publish**: the raw side is a `FutureProducer` with the adapter's producer settings
//!   (idempotent, `acks=all`, `murmur2_random`, `linger.ms=1`) enqueuing each batch's records
//!   with the same id header (`factline.id`, a UUID v7 text) and awaiting every delivery report
//!   of the batch before the next, as `Publisher::publish` does per call.
//!   Each side first sends one message through its own producer, outside the clock: an
//!   idempotent librdkafka producer's first send waits for its producer id (0.5–1 s here when
//!   it has no broker connection yet) and for the new topic's metadata.
//! - **consume**: a backlog preloaded by a raw producer, read from the earliest offset by a
//!   consumer in a fresh group with the adapter's consumer settings (auto commit on, automatic
//!   offset store off, cooperative-sticky); the raw loop "acks" each record by storing its offset
//!   as it is handled, where factline's router acks after its handler and the adapter stores the
//!   offsets of what was acked. Joining a fresh group takes about 5 s on the test broker (tansu)
//!   with every heartbeat interval and assignor tried, against some 50 ms to read the backlog:
//!   counted in, it would be nearly all of either side's figure. So here, unlike the other
//!   adapters, both clocks start at the first message handed to the handler (or to the raw loop)
//!   and stop at the last; the join time is printed beside the rate.

use super::*;
use factline_kafka::{ID_HEADER, KafkaConfig, KafkaPubSub};
use factline_messaging::{DeliverFrom, Subscriber as _};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const PREFIX: &str = "flbench.";
/// The adapter's defaults, which the raw side copies.
const CONNECT_TIMEOUT_MS: &str = "5000";
const MESSAGE_MAX_BYTES: &str = "1065536";
const PUBLISH_TIMEOUT_MS: &str = "30000";
const COMMIT_INTERVAL_MS: &str = "200";
const SESSION_TIMEOUT_MS: &str = "10000";
const HEARTBEAT_INTERVAL_MS: &str = "2500";
const FETCH_QUEUE_BACKOFF_MS: &str = "100";

/// The settings the adapter gives every client.
fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("socket.connection.setup.timeout.ms", CONNECT_TIMEOUT_MS)
        .set("reconnect.backoff.max.ms", "2000")
        .set("message.max.bytes", MESSAGE_MAX_BYTES);
    config
}

/// A producer with the adapter's producer settings.
fn raw_producer(bootstrap: &str) -> Result<FutureProducer> {
    client_config(bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "1")
        .set("message.timeout.ms", PUBLISH_TIMEOUT_MS)
        .set("allow.auto.create.topics", "false")
        .create()
        .context("create the raw producer")
}

/// A consumer in `group` with the adapter's consumer settings, from the earliest offset.
fn raw_consumer(bootstrap: &str, group: &str) -> Result<StreamConsumer> {
    client_config(bootstrap)
        .set("enable.partition.eof", "false")
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
        .set("allow.auto.create.topics", "false")
        .set("auto.offset.reset", "earliest")
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", COMMIT_INTERVAL_MS)
        .set("session.timeout.ms", SESSION_TIMEOUT_MS)
        .set("heartbeat.interval.ms", HEARTBEAT_INTERVAL_MS)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()
        .context("create the raw consumer")
}

/// The raw client's publish of `count` messages in batches, as the adapter does it: every
/// record with its id header and no key, each batch's delivery reports awaited before the next.
async fn raw_publish(
    producer: &FutureProducer,
    topic: &str,
    count: usize,
    batch: usize,
) -> Result<()> {
    let body = payload();
    let mut sent = 0;
    while sent < count {
        let n = batch.min(count - sent);
        let mut deliveries = Vec::with_capacity(n);
        for _ in 0..n {
            let id = uuid::Uuid::now_v7().to_string();
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                key: ID_HEADER,
                value: Some(id.as_bytes()),
            });
            let record = FutureRecord::<str, [u8]>::to(topic)
                .payload(&body[..])
                .headers(headers);
            let delivery = producer
                .send_result(record)
                .map_err(|(error, _)| anyhow::anyhow!("raw send: {error}"))?;
            deliveries.push(delivery);
        }
        for delivery in deliveries {
            delivery
                .await
                .context("raw delivery report dropped")?
                .map_err(|(error, _)| anyhow::anyhow!("raw delivery: {error}"))?;
        }
        sent += n;
    }
    Ok(())
}

/// Messages/s from the first message to the last; the time from subscribing to the first
/// message (the group join) is printed, not counted.
fn rate_after_join(subscribed: Instant, first: Instant, last: Instant, count: usize) -> f64 {
    eprintln!(
        "[factline-bench]   first message {:.2} s after subscribing (group join, not timed)",
        first.duration_since(subscribed).as_secs_f64()
    );
    count as f64 / last.duration_since(first).as_secs_f64()
}

/// factline's side of the consume phase: a router consumer handler over `subscriber` that
/// counts (the router acks); messages/s from the first message handled to the `count`th.
async fn router_consume_timed(
    subscriber: factline_kafka::KafkaSubscriber,
    topic: &str,
    count: usize,
) -> Result<f64> {
    let clocks = router_consume_clocked(Arc::new(subscriber), topic, count).await?;
    Ok(rate_after_join(
        clocks.started,
        clocks.first,
        clocks.last,
        count,
    ))
}

/// The raw consumer: subscribes in a fresh group and reads until `count` records were
/// handled, reading each one's id header and payload and storing its offset for commit;
/// messages/s from the first record to the `count`th.
async fn raw_consume(bootstrap: &str, topic: &str, group: &str, count: usize) -> Result<f64> {
    let subscribed = Instant::now();
    let consumer = raw_consumer(bootstrap, group)?;
    consumer.subscribe(&[topic]).context("raw subscribe")?;
    let mut records = consumer.stream();
    let mut first = None;
    let mut handled = 0;
    while handled < count {
        let Some(record) = records.next().await else {
            bail!("the raw consumer ended after {handled} records");
        };
        let record = record.context("raw consume")?;
        first.get_or_insert_with(Instant::now);
        let has_id = record
            .headers()
            .is_some_and(|headers| headers.iter().any(|header| header.key == ID_HEADER));
        if !has_id || record.payload().is_none() {
            bail!("a raw record without an id header or payload");
        }
        consumer
            .store_offset_from_message(&record)
            .context("raw store_offset")?;
        handled += 1;
    }
    let last = Instant::now();
    drop(records);
    // Outside the clock, as at the adapter's close: commit what was stored, leave the group.
    tokio::task::spawn_blocking(move || {
        let _ = consumer.commit_consumer_state(CommitMode::Sync);
        drop(consumer);
    })
    .await
    .context("close the raw consumer")?;
    let first = first.context("no record was read")?;
    Ok(rate_after_join(subscribed, first, last, count))
}

pub(super) async fn measure(phase: Phase, side: Side, options: &W8Options) -> Result<f64> {
    let bootstrap = options.kafka_url.as_str();
    let pubsub = KafkaPubSub::connect(
        KafkaConfig::new(bootstrap)
            .topic_prefix(PREFIX)
            .group_prefix(PREFIX)
            .deliver_from(DeliverFrom::Oldest),
    )
    .await
    .with_context(|| {
        format!(
            "connect to Kafka at {}",
            factline_messaging::redact_url(bootstrap)
        )
    })?;
    let raw = raw_producer(bootstrap)?;
    let topic = format!("w8_{}", uuid::Uuid::now_v7().simple());
    let name = factline_kafka::kafka_topic_name(PREFIX, &topic).context("the topic name")?;
    // The topic, made by the adapter (its default of 4 partitions) for both sides.
    let setup = pubsub.subscriber();
    drop(setup.subscribe(&topic).await.context("make the topic")?);
    setup.close().await.context("close the setup subscriber")?;
    let count = options.messages;
    let rate = match phase {
        Phase::Publish => {
            // One message through the side's own producer first, outside the clock: an
            // idempotent producer's first send waits for its producer id (up to a second here
            // when it has no broker connection yet) and for the new topic's metadata.
            let publisher = pubsub.publisher();
            match side {
                Side::Factline => factline_publish(&publisher, &topic, 1, 1).await?,
                Side::Raw => raw_publish(&raw, &name, 1, 1).await?,
            }
            let started = Instant::now();
            match side {
                Side::Factline => {
                    factline_publish(&publisher, &topic, count, options.publish_batch).await?
                }
                Side::Raw => raw_publish(&raw, &name, count, options.publish_batch).await?,
            }
            count as f64 / started.elapsed().as_secs_f64()
        }
        Phase::Consume => {
            raw_publish(&raw, &name, count, options.publish_batch).await?;
            let group = format!("w8-{}", uuid::Uuid::now_v7().simple());
            match side {
                Side::Factline => {
                    let subscriber = pubsub.subscriber_in_group(&group).context("group name")?;
                    router_consume_timed(subscriber, &topic, count).await?
                }
                Side::Raw => {
                    raw_consume(bootstrap, &name, &format!("{PREFIX}{group}"), count).await?
                }
            }
        }
    };
    drop(raw);
    delete_topic(bootstrap, &name).await?;
    Ok(rate)
}

/// Deletes the W8 topic (the broker keeps it in memory otherwise).
async fn delete_topic(bootstrap: &str, name: &str) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap)
        .create()
        .context("create the admin client")?;
    let results = admin
        .delete_topics(&[name], &AdminOptions::new())
        .await
        .context("delete the W8 topic")?;
    for result in results {
        result.map_err(|(topic, code)| anyhow::anyhow!("delete the W8 topic {topic}: {code}"))?;
    }
    Ok(())
}
