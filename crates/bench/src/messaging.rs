//! Workload W7: in-memory messaging throughput and delivery latency.
//!
//! Three systems do the same work side by side, in interleaved rounds (median reported):
//! - `factline-router`: `InMemoryPubSub` + `Router`, one consumer handler per subscriber that
//!   counts and returns `Ok` (the router acks);
//! - `factline-pubsub`: the same pub/sub read directly (`subscribe`, then `ack` each message),
//!   no router — what the router costs on top;
//! - `tokio-mpsc`: a bounded tokio channel per subscriber carrying the same messages, no ack —
//!   the floor of any in-process delivery.
//!
//! Throughput phase: one publisher task publishes batches as fast as the transport accepts
//! them (a full topic makes it wait); the figure is deliveries handled per second across all
//! subscribers (with 16 subscribers every message is delivered 16 times). Latency phase: the
//! publisher paces itself to a fixed rate, each payload carries its publish time, and every
//! delivery records now − publish time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use factline_messaging::{
    InMemoryPubSub, Message, Publisher as _, Router, RouterConfig, Subscriber as _, consumer_fn,
};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use serde::Serialize;

/// Sizes of a W7 run.
#[derive(Debug, Clone)]
pub struct W7Options {
    /// Rounds; the median is reported.
    pub rounds: usize,
    /// Unmeasured time at the start of each phase.
    pub warmup: Duration,
    /// Measured time of each phase.
    pub measure: Duration,
    /// Subscriber counts to run.
    pub subscribers: Vec<usize>,
    /// Systems to run.
    pub systems: Vec<W7System>,
    /// Messages per publish call in the throughput phase.
    pub publish_batch: usize,
    /// Messages per second the publisher paces itself to in the latency phase.
    pub latency_rate_per_sec: u64,
}

impl W7Options {
    /// The full run (about a minute and a half).
    pub fn full() -> Self {
        Self {
            rounds: 3,
            warmup: Duration::from_millis(500),
            measure: Duration::from_secs(2),
            subscribers: vec![1, 16],
            systems: W7System::ALL.to_vec(),
            publish_batch: 100,
            latency_rate_per_sec: 50_000,
        }
    }

    /// A short run (about 10 s).
    pub fn quick() -> Self {
        Self {
            rounds: 1,
            warmup: Duration::from_millis(200),
            measure: Duration::from_millis(600),
            ..Self::full()
        }
    }

    /// Tiny, for tests of the harness.
    pub fn smoke() -> Self {
        Self {
            rounds: 1,
            warmup: Duration::from_millis(20),
            measure: Duration::from_millis(100),
            latency_rate_per_sec: 5_000,
            ..Self::full()
        }
    }
}

/// The systems of W7.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum W7System {
    /// Router over the in-memory pub/sub.
    FactlineRouter,
    /// The in-memory pub/sub read and acked directly.
    FactlinePubSub,
    /// A tokio mpsc channel per subscriber.
    TokioMpsc,
}

impl W7System {
    /// All, in report order.
    pub const ALL: [Self; 3] = [Self::FactlineRouter, Self::FactlinePubSub, Self::TokioMpsc];

    /// Name in the table.
    pub const fn name(self) -> &'static str {
        match self {
            Self::FactlineRouter => "factline-router",
            Self::FactlinePubSub => "factline-pubsub",
            Self::TokioMpsc => "tokio-mpsc",
        }
    }
}

/// One measured (system, subscribers) cell.
#[derive(Debug, Clone, Serialize)]
pub struct W7Row {
    /// System name.
    pub system: String,
    /// Subscribers (each receives every message).
    pub subscribers: usize,
    /// Deliveries handled per second, all subscribers together (throughput phase).
    pub deliveries_per_sec: f64,
    /// Messages published per second (throughput phase).
    pub published_per_sec: f64,
    /// Delivery latency p50 in µs (latency phase).
    pub latency_p50_us: u64,
    /// Delivery latency p99 in µs (latency phase).
    pub latency_p99_us: u64,
    /// Delivery latency max in µs (latency phase).
    pub latency_max_us: u64,
}

/// Runs W7 and returns the median row of every cell.
pub async fn run_w7(options: &W7Options) -> Result<Vec<W7Row>> {
    let mut rows = Vec::new();
    for &subscribers in &options.subscribers {
        let mut rounds: Vec<Vec<W7Row>> = vec![Vec::new(); options.systems.len()];
        for round in 0..options.rounds {
            for (index, &system) in options.systems.iter().enumerate() {
                eprintln!(
                    "[factline-bench] W7 round {}/{} {} with {subscribers} subscriber(s)",
                    round + 1,
                    options.rounds,
                    system.name()
                );
                let (delivered, published) = throughput(system, subscribers, options)
                    .await
                    .with_context(|| format!("W7 throughput of {}", system.name()))?;
                let latency = latency(system, subscribers, options)
                    .await
                    .with_context(|| format!("W7 latency of {}", system.name()))?;
                rounds[index].push(W7Row {
                    system: system.name().to_owned(),
                    subscribers,
                    deliveries_per_sec: delivered,
                    published_per_sec: published,
                    latency_p50_us: latency.value_at_quantile(0.50),
                    latency_p99_us: latency.value_at_quantile(0.99),
                    latency_max_us: latency.max(),
                });
            }
        }
        for mut system_rounds in rounds {
            system_rounds.sort_by(|a, b| a.deliveries_per_sec.total_cmp(&b.deliveries_per_sec));
            if let Some(median) = system_rounds.get((system_rounds.len().saturating_sub(1)) / 2) {
                rows.push(median.clone());
            }
        }
    }
    Ok(rows)
}

/// The table, with each factline system's ratio to the mpsc floor.
pub fn render_w7(rows: &[W7Row]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "W7: in-memory messaging; deliveries/s = handled deliveries of all subscribers per second;\n\
         latency = publish to handler, at a paced publish rate\n",
    );
    let _ = writeln!(
        out,
        "{:<16} {:>4} {:>14} {:>13} {:>9} {:>9} {:>9} {:>10}",
        "system", "subs", "deliveries/s", "published/s", "p50 µs", "p99 µs", "max µs", "vs mpsc"
    );
    for row in rows {
        let floor = rows
            .iter()
            .find(|r| r.system == W7System::TokioMpsc.name() && r.subscribers == row.subscribers)
            .map(|r| r.deliveries_per_sec);
        let ratio = floor.filter(|f| *f > 0.0).map_or_else(
            || "-".to_owned(),
            |f| format!("{:.2}x", row.deliveries_per_sec / f),
        );
        let _ = writeln!(
            out,
            "{:<16} {:>4} {:>14.0} {:>13.0} {:>9} {:>9} {:>9} {:>10}",
            row.system,
            row.subscribers,
            row.deliveries_per_sec,
            row.published_per_sec,
            row.latency_p50_us,
            row.latency_p99_us,
            row.latency_max_us,
            ratio
        );
    }
    out
}

const TOPIC: &str = "w7";

/// What every system's subscribers do with a delivery.
struct Sink {
    delivered: AtomicU64,
    /// When set, the payload's publish time is read and the lag recorded.
    latency: Option<std::sync::Mutex<Histogram<u64>>>,
    epoch: Instant,
}

impl Sink {
    fn new(record_latency: bool, epoch: Instant) -> Result<Arc<Self>> {
        let latency = if record_latency {
            Some(std::sync::Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram")?,
            ))
        } else {
            None
        };
        Ok(Arc::new(Self {
            delivered: AtomicU64::new(0),
            latency,
            epoch,
        }))
    }

    fn deliver(&self, payload: &[u8]) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if let Some(latency) = &self.latency
            && let Some(bytes) = payload.get(..8)
        {
            let mut sent = [0u8; 8];
            sent.copy_from_slice(bytes);
            let sent_us = u64::from_le_bytes(sent);
            let now_us = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
            let mut histogram = latency.lock().unwrap_or_else(|e| e.into_inner());
            histogram.saturating_record(now_us.saturating_sub(sent_us).max(1));
        }
    }
}

/// A running system: publish into it, stop it.
enum Running {
    PubSub {
        publisher: factline_messaging::InMemoryPublisher,
        stop: Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send + Sync>,
    },
    Mpsc {
        senders: Vec<tokio::sync::mpsc::Sender<Message>>,
        readers: Vec<tokio::task::JoinHandle<()>>,
    },
}

impl Running {
    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        match self {
            Self::PubSub { publisher, .. } => {
                publisher.publish(TOPIC, messages).await.context("publish")
            }
            Self::Mpsc { senders, .. } => {
                for message in messages {
                    for sender in senders {
                        sender
                            .send(message.clone())
                            .await
                            .map_err(|_| anyhow::anyhow!("a reader stopped"))?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn stop(self) {
        match self {
            Self::PubSub { stop, .. } => stop().await,
            Self::Mpsc { senders, readers } => {
                drop(senders);
                for reader in readers {
                    let _ = reader.await;
                }
            }
        }
    }
}

async fn start(system: W7System, subscribers: usize, sink: &Arc<Sink>) -> Result<Running> {
    match system {
        W7System::FactlineRouter => {
            let pubsub = InMemoryPubSub::default();
            let mut router =
                Router::new(RouterConfig::default().close_timeout(Duration::from_secs(10)));
            for index in 0..subscribers {
                let sink = sink.clone();
                router
                    .add_consumer_handler(
                        &format!("count-{index}"),
                        TOPIC,
                        Arc::new(pubsub.subscriber()),
                        consumer_fn(move |message: Message| {
                            sink.deliver(&message.payload);
                            async { Ok(()) }
                        }),
                    )
                    .context("add handler")?;
            }
            let running = router.start().await.context("start router")?;
            Ok(Running::PubSub {
                publisher: pubsub.publisher(),
                stop: Box::new(move || {
                    Box::pin(async move {
                        running.shutdown().await;
                    })
                }),
            })
        }
        W7System::FactlinePubSub => {
            let pubsub = InMemoryPubSub::default();
            let subscriber = pubsub.subscriber();
            let mut readers = Vec::new();
            for _ in 0..subscribers {
                let mut stream = subscriber.subscribe(TOPIC).await.context("subscribe")?;
                let sink = sink.clone();
                readers.push(tokio::spawn(async move {
                    while let Some(Ok(message)) = stream.next().await {
                        sink.deliver(&message.payload);
                        message.ack();
                    }
                }));
            }
            Ok(Running::PubSub {
                publisher: pubsub.publisher(),
                stop: Box::new(move || {
                    Box::pin(async move {
                        let _ = factline_messaging::Subscriber::close(&subscriber).await;
                        for reader in readers {
                            let _ = reader.await;
                        }
                    })
                }),
            })
        }
        W7System::TokioMpsc => {
            let mut senders = Vec::new();
            let mut readers = Vec::new();
            for _ in 0..subscribers {
                let (sender, mut receiver) = tokio::sync::mpsc::channel::<Message>(65_536);
                senders.push(sender);
                let sink = sink.clone();
                readers.push(tokio::spawn(async move {
                    while let Some(message) = receiver.recv().await {
                        sink.deliver(&message.payload);
                    }
                }));
            }
            Ok(Running::Mpsc { senders, readers })
        }
    }
}

/// Deliveries/s and published/s at full speed.
async fn throughput(
    system: W7System,
    subscribers: usize,
    options: &W7Options,
) -> Result<(f64, f64)> {
    let sink = Sink::new(false, Instant::now())?;
    let running = Arc::new(start(system, subscribers, &sink).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let payload = Bytes::from_static(b"0123456789abcdef");
    let publisher = {
        let (running, stop, published, batch) = (
            running.clone(),
            stop.clone(),
            published.clone(),
            options.publish_batch,
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let messages: Vec<Message> =
                    (0..batch).map(|_| Message::new(payload.clone())).collect();
                running.publish(messages).await?;
                published.fetch_add(batch as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(options.warmup).await;
    let (delivered_0, published_0, started) = (
        sink.delivered.load(Ordering::Relaxed),
        published.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(options.measure).await;
    let elapsed = started.elapsed().as_secs_f64();
    let delivered = sink.delivered.load(Ordering::Relaxed) - delivered_0;
    let sent = published.load(Ordering::Relaxed) - published_0;
    stop.store(true, Ordering::Relaxed);
    publisher.await.context("publisher task")??;
    let running = Arc::try_unwrap(running)
        .map_err(|_| anyhow::anyhow!("publisher still holds the system"))?;
    running.stop().await;
    Ok((delivered as f64 / elapsed, sent as f64 / elapsed))
}

/// Publish-to-handler latency at a paced rate.
async fn latency(
    system: W7System,
    subscribers: usize,
    options: &W7Options,
) -> Result<Histogram<u64>> {
    let epoch = Instant::now();
    let warm_sink = Sink::new(true, epoch)?;
    let running = start(system, subscribers, &warm_sink).await?;
    // Publish every millisecond; a batch carries one millisecond's worth of messages.
    let per_tick = usize::try_from(options.latency_rate_per_sec / 1_000)
        .unwrap_or(1)
        .max(1);
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let warm_until = Instant::now() + options.warmup;
    let end = warm_until + options.measure;
    let mut reset = false;
    while Instant::now() < end {
        ticker.tick().await;
        if !reset && Instant::now() >= warm_until {
            if let Some(latency) = &warm_sink.latency {
                latency.lock().unwrap_or_else(|e| e.into_inner()).reset();
            }
            reset = true;
        }
        let messages: Vec<Message> = (0..per_tick)
            .map(|_| {
                let sent_us = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
                let mut payload = Vec::with_capacity(16);
                payload.extend_from_slice(&sent_us.to_le_bytes());
                payload.extend_from_slice(b"abcdefgh");
                Message::new(payload)
            })
            .collect();
        running.publish(messages).await?;
    }
    // Let the last deliveries land.
    tokio::time::sleep(Duration::from_millis(50)).await;
    running.stop().await;
    let histogram = warm_sink
        .latency
        .as_ref()
        .map(|latency| latency.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .context("latency histogram")?;
    Ok(histogram)
}
