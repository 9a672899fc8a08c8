//! W8 on MQTT (Mosquitto): `factline-mqtt` against `rumqttc`'s v5 client doing the same work.
//!
//! - **publish**: QoS 1 publishes in batches, every batch's PUBACKs awaited before the next;
//!   the raw side sends the same user property with the message id (`fl-id`) as the adapter.
//! - **consume**: MQTT keeps no backlog for late subscribers, and Mosquitto queues at most
//!   `max_queued_messages` (1,000 by default) for a session beyond its in-flight window, so a
//!   50,000-message backlog cannot be preloaded. The consuming session is made (subscribed)
//!   before the clock starts; then the raw publisher publishes the messages while the consumer
//!   reads and acks them (manual PUBACKs, the same receive maximum of 1,024 on both sides), and
//!   the figure is messages per second until the last one was handled. Both sides are fed by the
//!   same raw publisher, which does not wait for each batch's PUBACKs but never runs more than
//!   900 messages ahead of what the consumer has received (counted as each arrives, on both
//!   sides), so that the broker never has to drop.

use super::*;
use factline_mqtt::{MqttConfig, MqttPubSub};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

const TOPIC_PREFIX: &str = "flbench/";
const CLIENT_PREFIX: &str = "flbench-";
/// The adapter's defaults, which the raw side copies.
const IN_FLIGHT_MAX: u16 = 1_024;
const PUBLISH_IN_FLIGHT_MAX: u16 = 1_024;
/// Sessions the benchmark leaves behind expire after this long.
const SESSION_EXPIRY_SECS: u32 = 120;

fn host_port(url: &str) -> Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .with_context(|| format!("an mqtt:// URL, not {url}"))?;
    let rest = rest.trim_end_matches('/');
    let address = rest.rsplit_once('@').map_or(rest, |(_, address)| address);
    Ok(match address.rsplit_once(':') {
        Some((host, port)) => (host.to_owned(), port.parse().context("the port")?),
        None => (address.to_owned(), 1883),
    })
}

/// Options as the adapter sets them.
fn raw_options(url: &str, client_id: String, clean_start: bool) -> Result<MqttOptions> {
    let (host, port) = host_port(url)?;
    let mut options = MqttOptions::new(client_id, host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_start(clean_start)
        .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
        .set_max_packet_size(Some(2 * (1 << 20) + 65_536))
        .set_outgoing_inflight_upper_limit(PUBLISH_IN_FLIGHT_MAX);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    Ok(options)
}

/// Polls until the CONNACK.
async fn connected(eventloop: &mut EventLoop) -> Result<()> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) =
            eventloop.poll().await.context("raw MQTT connect")?
        {
            return Ok(());
        }
    }
}

/// The raw publishing client: every publish QoS 1 with the id as `fl-id`, each batch's PUBACKs
/// awaited before the next.
struct RawPublisher {
    client: AsyncClient,
    acked: Arc<AtomicU64>,
    progress: Arc<tokio::sync::Notify>,
    driver: tokio::task::JoinHandle<()>,
}

impl RawPublisher {
    async fn connect(url: &str) -> Result<Self> {
        let options = raw_options(
            url,
            format!("{CLIENT_PREFIX}rawp-{}", uuid::Uuid::now_v7().simple()),
            true,
        )?;
        let (client, mut eventloop) =
            AsyncClient::new(options, usize::from(PUBLISH_IN_FLIGHT_MAX) + 8);
        connected(&mut eventloop).await?;
        let acked = Arc::new(AtomicU64::new(0));
        let progress = Arc::new(tokio::sync::Notify::new());
        let driver = {
            let (acked, progress) = (acked.clone(), progress.clone());
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked.fetch_add(1, Ordering::Release);
                            progress.notify_one();
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
        };
        Ok(Self {
            client,
            acked,
            progress,
            driver,
        })
    }

    async fn publish(&self, topic: &str, count: usize, batch: usize) -> Result<()> {
        let body = payload();
        let mut sent = 0u64;
        while sent < count as u64 {
            let n = batch.min(count - sent as usize);
            for _ in 0..n {
                let properties = PublishProperties {
                    user_properties: vec![("fl-id".to_owned(), uuid::Uuid::now_v7().to_string())],
                    ..PublishProperties::default()
                };
                self.client
                    .publish_with_properties(
                        topic.to_owned(),
                        QoS::AtLeastOnce,
                        false,
                        body.clone(),
                        properties,
                    )
                    .await
                    .context("raw MQTT publish")?;
            }
            sent += n as u64;
            while self.acked.load(Ordering::Acquire) < sent {
                if self.driver.is_finished() {
                    bail!("the raw MQTT publishing connection failed");
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), self.progress.notified())
                    .await;
            }
        }
        Ok(())
    }

    /// Publishes `count` messages without waiting for each batch's PUBACKs, but never more
    /// than `GATE` ahead of what the consumer has received (`received`), so that Mosquitto's
    /// queue of 1,000 messages per session is never exceeded (it drops QoS 1 messages past
    /// it); then waits for every PUBACK.
    async fn feed(&self, topic: &str, count: usize, received: &Progress) -> Result<()> {
        const GATE: u64 = 900;
        let body = payload();
        for sent in 0..count as u64 {
            while sent.saturating_sub(received.count.load(Ordering::Acquire)) >= GATE {
                let _ =
                    tokio::time::timeout(Duration::from_millis(10), received.changed.notified())
                        .await;
            }
            let properties = PublishProperties {
                user_properties: vec![("fl-id".to_owned(), uuid::Uuid::now_v7().to_string())],
                ..PublishProperties::default()
            };
            self.client
                .publish_with_properties(
                    topic.to_owned(),
                    QoS::AtLeastOnce,
                    false,
                    body.clone(),
                    properties,
                )
                .await
                .context("raw MQTT publish")?;
        }
        while self.acked.load(Ordering::Acquire) < count as u64 {
            if self.driver.is_finished() {
                bail!("the raw MQTT publishing connection failed");
            }
            let _ =
                tokio::time::timeout(Duration::from_millis(100), self.progress.notified()).await;
        }
        Ok(())
    }

    async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.driver).await;
    }
}

/// How many messages the consumer has received (both sides count the same way: as each arrives).
#[derive(Default)]
struct Progress {
    count: AtomicU64,
    changed: tokio::sync::Notify,
}

impl Progress {
    fn received(&self) {
        self.count.fetch_add(1, Ordering::Release);
        self.changed.notify_one();
    }
}

/// factline's subscriber, counting what its stream yields for the feeder's gate.
struct Counting {
    inner: factline_mqtt::MqttSubscriber,
    progress: Arc<Progress>,
}

#[async_trait::async_trait]
impl factline_messaging::Subscriber for Counting {
    async fn subscribe(
        &self,
        topic: &str,
    ) -> std::result::Result<factline_messaging::MessageStream, factline_messaging::SubscribeError>
    {
        let stream = self.inner.subscribe(topic).await?;
        let progress = self.progress.clone();
        Ok(factline_messaging::MessageStream::new(
            stream.inspect(move |_| progress.received()),
        ))
    }

    async fn close(&self) -> std::result::Result<(), factline_messaging::CloseError> {
        self.inner.close().await
    }
}

/// The raw consumer: a session made before the clock (subscribed, then disconnected), resumed
/// with manual acks and the adapter's receive maximum; every PUBLISH acked as it arrives.
async fn raw_session(url: &str, client_id: &str, topic: &str) -> Result<()> {
    let options = raw_options(url, client_id.to_owned(), true)?;
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    connected(&mut eventloop).await?;
    client
        .subscribe(topic.to_owned(), QoS::AtLeastOnce)
        .await
        .context("raw subscribe")?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) =
            eventloop.poll().await.context("raw subscribe")?
        {
            break;
        }
    }
    client.disconnect().await.context("raw disconnect")?;
    while !matches!(
        eventloop.poll().await,
        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)
    ) {}
    Ok(())
}

async fn raw_consume(url: &str, client_id: &str, count: usize, progress: &Progress) -> Result<()> {
    let mut options = raw_options(url, client_id.to_owned(), false)?;
    options
        .set_manual_acks(true)
        .set_receive_maximum(Some(IN_FLIGHT_MAX));
    let (client, mut eventloop) = AsyncClient::new(options, usize::from(IN_FLIGHT_MAX) + 16);
    let mut handled = 0;
    while handled < count {
        if let Event::Incoming(Packet::Publish(publish)) =
            eventloop.poll().await.context("raw consume")?
        {
            progress.received();
            client.try_ack(&publish).context("raw ack")?;
            handled += 1;
        }
    }
    // Let the last acks go out before disconnecting.
    client.disconnect().await.context("raw disconnect")?;
    while !matches!(
        eventloop.poll().await,
        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)
    ) {}
    Ok(())
}

pub(super) async fn measure(phase: Phase, side: Side, options: &W8Options) -> Result<f64> {
    let url = options.mqtt_url.as_str();
    let pubsub = MqttPubSub::connect(
        MqttConfig::new(url)
            .topic_prefix(TOPIC_PREFIX)
            .client_id_prefix(CLIENT_PREFIX)
            .session_expiry(Duration::from_secs(u64::from(SESSION_EXPIRY_SECS))),
    )
    .await
    .with_context(|| format!("connect to MQTT at {}", factline_messaging::redact_url(url)))?;
    let topic = format!("w8_{}", uuid::Uuid::now_v7().simple());
    let name = pubsub.topic_name(&topic).context("the topic name")?;
    let raw = RawPublisher::connect(url).await?;
    let count = options.messages;
    let rate = match phase {
        Phase::Publish => {
            let started = Instant::now();
            match side {
                Side::Factline => {
                    factline_publish(&pubsub.publisher(), &topic, count, options.publish_batch)
                        .await?
                }
                Side::Raw => raw.publish(&name, count, options.publish_batch).await?,
            }
            count as f64 / started.elapsed().as_secs_f64()
        }
        Phase::Consume => {
            let session = format!("w8-{}", uuid::Uuid::now_v7().simple());
            let raw_client_id = format!("{CLIENT_PREFIX}{session}");
            // The consuming session exists, subscribed, before the clock starts.
            match side {
                Side::Factline => {
                    let subscriber = pubsub
                        .subscriber_with_session(&session)
                        .context("session name")?;
                    let stream = factline_messaging::Subscriber::subscribe(&subscriber, &topic)
                        .await
                        .context("make the session")?;
                    factline_messaging::Subscriber::close(&subscriber)
                        .await
                        .context("close the session's first subscription")?;
                    drop(stream);
                }
                Side::Raw => raw_session(url, &raw_client_id, &name).await?,
            }
            let raw = Arc::new(raw);
            let progress = Arc::new(Progress::default());
            let feeding = {
                let (raw, name, progress) = (raw.clone(), name.clone(), progress.clone());
                tokio::spawn(async move { raw.feed(&name, count, &progress).await })
            };
            let rate = match side {
                Side::Factline => {
                    let subscriber = pubsub
                        .subscriber_with_session(&session)
                        .context("session name")?;
                    let counting = Counting {
                        inner: subscriber,
                        progress: progress.clone(),
                    };
                    router_consume(Arc::new(counting), &topic, count).await?
                }
                Side::Raw => {
                    let started = Instant::now();
                    raw_consume(url, &raw_client_id, count, &progress).await?;
                    count as f64 / started.elapsed().as_secs_f64()
                }
            };
            feeding.await.context("the feeding publisher")??;
            let raw = Arc::try_unwrap(raw).map_err(|_| anyhow::anyhow!("publisher in use"))?;
            raw.close().await;
            return Ok(rate);
        }
    };
    raw.close().await;
    Ok(rate)
}
