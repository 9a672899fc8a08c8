//! The six workloads. Each phase warms up, then measures: per-operation latency into an
//! HDR histogram (µs), events/s = events acknowledged / wall time of the measured phase (from
//! its start to the last measured completion). Only operations that *start* inside the
//! measured phase count; every writer completes at least one measured operation.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use crate::{
    config::{Cell, Sizes, WorkloadKind},
    systems::{Expected, Feed, Outcome, System},
};

/// Highest latency the histograms hold: one hour, in µs.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;

/// The stream W4 loads.
pub(crate) const W4_STREAM: &str = "w4-load";

/// W6 offers at most one append per this interval, so that it measures delivery, not backlog.
pub(crate) const W6_INTERVAL: Duration = Duration::from_millis(2);

/// What one phase measured.
#[derive(Debug, Clone)]
pub(crate) struct Measurement {
    pub(crate) events: u64,
    pub(crate) elapsed: Duration,
    pub(crate) histogram: Histogram<u64>,
    pub(crate) wins: Option<u64>,
    pub(crate) conflicts: Option<u64>,
}

impl Measurement {
    pub(crate) fn events_per_sec(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.events as f64 / seconds
        } else {
            0.0
        }
    }

    pub(crate) fn p50_us(&self) -> u64 {
        self.histogram.value_at_quantile(0.50)
    }

    pub(crate) fn p99_us(&self) -> u64 {
        self.histogram.value_at_quantile(0.99)
    }
}

pub(crate) fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_max(HISTOGRAM_MAX_US, 3).map_err(|error| anyhow!("histogram: {error}"))
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// When a phase's measured part starts and ends.
#[derive(Debug, Clone, Copy)]
struct Timing {
    start: Instant,
    end: Instant,
}

impl Timing {
    fn from_now(sizes: &Sizes) -> Self {
        let start = Instant::now() + sizes.warmup;
        Self {
            start,
            end: start + sizes.measure,
        }
    }
}

/// One writer's (or reader's) tally.
struct Tally {
    histogram: Histogram<u64>,
    ops: u64,
    events: u64,
    wins: u64,
    conflicts: u64,
    last_done: Option<Instant>,
}

impl Tally {
    fn new() -> Result<Self> {
        Ok(Self {
            histogram: new_histogram()?,
            ops: 0,
            events: 0,
            wins: 0,
            conflicts: 0,
            last_done: None,
        })
    }

    /// Whether to start another operation at `now`.
    fn goes_on(&self, timing: &Timing, now: Instant) -> bool {
        now < timing.end || self.ops == 0
    }

    fn record(&mut self, timing: &Timing, started: Instant, done: Instant, events: u64) -> bool {
        if started < timing.start {
            return false;
        }
        self.histogram.saturating_record(micros(done - started));
        self.ops += 1;
        self.events += events;
        self.last_done = Some(self.last_done.map_or(done, |last| last.max(done)));
        true
    }

    fn merge(&mut self, other: Self) -> Result<()> {
        self.histogram
            .add(&other.histogram)
            .map_err(|error| anyhow!("histogram: {error}"))?;
        self.ops += other.ops;
        self.events += other.events;
        self.wins += other.wins;
        self.conflicts += other.conflicts;
        self.last_done = match (self.last_done, other.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(())
    }

    fn into_measurement(self, start: Instant, contention: bool) -> Result<Measurement> {
        let last_done = self
            .last_done
            .ok_or_else(|| anyhow!("no operation completed in the measured phase"))?;
        Ok(Measurement {
            events: self.events,
            elapsed: last_done.saturating_duration_since(start),
            histogram: self.histogram,
            wins: contention.then_some(self.wins),
            conflicts: contention.then_some(self.conflicts),
        })
    }
}

/// Runs one phase of `cell` against `system` (which was prepared for it).
pub(crate) async fn run_cell(
    system: &Arc<dyn System>,
    cell: Cell,
    sizes: &Sizes,
    round: usize,
) -> Result<Measurement> {
    let writers = cell.writers;
    match cell.workload {
        WorkloadKind::W1 => {
            appends(system, writers, 1, &format!("w1-r{round}c{writers}"), sizes).await
        }
        WorkloadKind::W2 => {
            appends(
                system,
                writers,
                sizes.w2_batch,
                &format!("w2-r{round}c{writers}"),
                sizes,
            )
            .await
        }
        WorkloadKind::W3 => contention(system, writers, &format!("w3-r{round}"), sizes).await,
        WorkloadKind::W4 => loads(system, sizes).await,
        WorkloadKind::W5 => scans(system, sizes).await,
        WorkloadKind::W6 => lag(system, &format!("w6-r{round}"), sizes).await,
    }
}

async fn join_all(mut tasks: JoinSet<Result<Tally>>) -> Result<Tally> {
    let mut total = Tally::new()?;
    while let Some(joined) = tasks.join_next().await {
        total.merge(joined.context("writer task")??)?;
    }
    Ok(total)
}

/// W1, W2: `writers` tasks, each appending `batch` events at a time to its own stream.
async fn appends(
    system: &Arc<dyn System>,
    writers: usize,
    batch: usize,
    prefix: &str,
    sizes: &Sizes,
) -> Result<Measurement> {
    let timing = Timing::from_now(sizes);
    let mut tasks = JoinSet::new();
    for writer in 0..writers {
        let system = Arc::clone(system);
        let stream = format!("{prefix}-{writer}");
        tasks.spawn(async move {
            let mut tally = Tally::new()?;
            let mut expected = Expected::NoStream;
            while tally.goes_on(&timing, Instant::now()) {
                let started = Instant::now();
                match system.append(&stream, expected, batch).await? {
                    Outcome::Written => expected = expected.after(batch),
                    Outcome::Conflict { .. } => {
                        bail!("{stream}: conflict although this writer is the stream's only writer")
                    }
                }
                tally.record(&timing, started, Instant::now(), batch as u64);
            }
            Ok(tally)
        });
    }
    join_all(tasks).await?.into_measurement(timing.start, false)
}

/// W3: `writers` tasks appending one event at a time to the same stream with an expected
/// version; a loser re-reads the version (or takes it from the error) and tries again.
/// Latency is per attempt; events/s counts wins.
async fn contention(
    system: &Arc<dyn System>,
    writers: usize,
    stream: &str,
    sizes: &Sizes,
) -> Result<Measurement> {
    let timing = Timing::from_now(sizes);
    let mut tasks = JoinSet::new();
    for _ in 0..writers {
        let system = Arc::clone(system);
        let stream = stream.to_owned();
        tasks.spawn(async move {
            let mut tally = Tally::new()?;
            let mut expected = system.stream_version(&stream).await?;
            while tally.goes_on(&timing, Instant::now()) {
                let started = Instant::now();
                let outcome = system.append(&stream, expected, 1).await?;
                let done = Instant::now();
                match outcome {
                    Outcome::Written => {
                        if tally.record(&timing, started, done, 1) {
                            tally.wins += 1;
                        }
                        expected = expected.after(1);
                    }
                    Outcome::Conflict { actual } => {
                        if tally.record(&timing, started, done, 0) {
                            tally.conflicts += 1;
                        }
                        expected = match actual {
                            Some(actual) => actual,
                            None => system.stream_version(&stream).await?,
                        };
                    }
                }
            }
            Ok(tally)
        });
    }
    join_all(tasks).await?.into_measurement(timing.start, true)
}

/// W4: one reader loading the preloaded stream over and over; latency per full load.
async fn loads(system: &Arc<dyn System>, sizes: &Sizes) -> Result<Measurement> {
    let timing = Timing::from_now(sizes);
    let mut tally = Tally::new()?;
    while tally.goes_on(&timing, Instant::now()) {
        let started = Instant::now();
        let events = system.read_stream(W4_STREAM).await?;
        ensure!(
            events == sizes.w4_events,
            "loaded {events} events from {W4_STREAM}, expected {}",
            sizes.w4_events
        );
        tally.record(&timing, started, Instant::now(), events);
    }
    tally.into_measurement(timing.start, false)
}

/// W5: one reader scanning `$all` from the start over the preloaded events; latency per full
/// scan. Warm-up is at least one scan, and at least one scan is measured.
async fn scans(system: &Arc<dyn System>, sizes: &Sizes) -> Result<Measurement> {
    let warm_until = Instant::now() + sizes.warmup;
    loop {
        system.scan_all(sizes.w5_events).await?;
        if Instant::now() >= warm_until {
            break;
        }
    }
    let start = Instant::now();
    let timing = Timing {
        start,
        end: start + sizes.measure,
    };
    let mut tally = Tally::new()?;
    while tally.goes_on(&timing, Instant::now()) {
        let started = Instant::now();
        let events = system.scan_all(sizes.w5_events).await?;
        ensure!(
            events == sizes.w5_events,
            "scanned {events} events, expected {}",
            sizes.w5_events
        );
        tally.record(&timing, started, Instant::now(), events);
    }
    tally.into_measurement(start, false)
}

/// W6: a live subscription from the end, and one writer appending single events (paced at one
/// per [`W6_INTERVAL`] at most). Latency = delivery time − the writer's acknowledgement time
/// of the same event (0 when the subscriber had it first). events/s = events delivered / time.
async fn lag(system: &Arc<dyn System>, stream: &str, sizes: &Sizes) -> Result<Measurement> {
    let feed = system.subscribe().await?;
    let deliveries: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let delivered = Arc::new(AtomicU64::new(0));
    let mut subscriber = JoinSet::new();
    subscriber.spawn(deliver(
        feed,
        Arc::clone(&deliveries),
        Arc::clone(&delivered),
    ));

    let timing = Timing::from_now(sizes);
    let mut pace = tokio::time::interval(W6_INTERVAL);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acks: Vec<Instant> = Vec::new();
    let mut warm = 0;
    let mut expected = Expected::NoStream;
    loop {
        pace.tick().await;
        let started = Instant::now();
        if started >= timing.end && acks.len() > warm {
            break;
        }
        match system.append(stream, expected, 1).await? {
            Outcome::Written => expected = expected.after(1),
            Outcome::Conflict { .. } => bail!("{stream}: unexpected conflict"),
        }
        acks.push(Instant::now());
        if started < timing.start {
            warm += 1;
        }
    }

    // Wait (bounded) for the subscriber to deliver everything acknowledged.
    let wait_until = Instant::now() + sizes.phase_slack;
    while delivered.load(Ordering::Acquire) < acks.len() as u64 {
        if let Some(joined) = subscriber.try_join_next() {
            joined.context("subscriber task")??;
            bail!("the subscription ended early");
        }
        if Instant::now() >= wait_until {
            bail!(
                "only {} of {} events delivered within {}s",
                delivered.load(Ordering::Acquire),
                acks.len(),
                sizes.phase_slack.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    subscriber.abort_all();

    let deliveries = deliveries
        .lock()
        .map_err(|_| anyhow!("deliveries lock poisoned"))?
        .clone();
    let mut histogram = new_histogram()?;
    for (ack, delivery) in acks.iter().zip(&deliveries).skip(warm) {
        histogram.saturating_record(micros(delivery.saturating_duration_since(*ack)));
    }
    let last = deliveries
        .get(acks.len() - 1)
        .copied()
        .ok_or_else(|| anyhow!("no delivery"))?;
    Ok(Measurement {
        events: (acks.len() - warm) as u64,
        elapsed: last.saturating_duration_since(timing.start),
        histogram,
        wins: None,
        conflicts: None,
    })
}

/// The W6 subscriber: notes the time of every delivery.
async fn deliver(
    mut feed: Box<dyn Feed>,
    deliveries: Arc<Mutex<Vec<Instant>>>,
    delivered: Arc<AtomicU64>,
) -> Result<()> {
    loop {
        let count = feed.next_batch().await?;
        let at = Instant::now();
        deliveries
            .lock()
            .map_err(|_| anyhow!("deliveries lock poisoned"))?
            .extend(std::iter::repeat_n(at, count));
        delivered.fetch_add(count as u64, Ordering::Release);
    }
}

/// Appends `total` events to `stream` in batches of `batch` (untimed setup).
pub(crate) async fn preload_stream(
    system: &Arc<dyn System>,
    stream: &str,
    total: u64,
    batch: usize,
) -> Result<()> {
    let mut expected = system.stream_version(stream).await?;
    let mut written = 0;
    while written < total {
        let count = batch.min(usize::try_from(total - written).unwrap_or(batch));
        match system.append(stream, expected, count).await? {
            Outcome::Written => expected = expected.after(count),
            Outcome::Conflict { .. } => bail!("preload of {stream}: unexpected conflict"),
        }
        written += count as u64;
    }
    Ok(())
}

/// Preloads `$all` for W5 with `total` events, `batch` per append, one stream per batch.
pub(crate) async fn preload_all(
    system: &Arc<dyn System>,
    total: u64,
    batch: usize,
    mut progress: impl FnMut(u64),
) -> Result<()> {
    let mut written = 0;
    let mut stream = 0;
    while written < total {
        let count = batch.min(usize::try_from(total - written).unwrap_or(batch));
        match system
            .append(&format!("w5-{stream}"), Expected::NoStream, count)
            .await?
        {
            Outcome::Written => {}
            Outcome::Conflict { .. } => bail!("preload of w5-{stream}: unexpected conflict"),
        }
        written += count as u64;
        stream += 1;
        progress(written);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::{Profile, SystemKind};

    fn memory() -> Arc<dyn System> {
        Arc::new(crate::systems::store_system_for_tests())
    }

    fn tiny() -> Sizes {
        Sizes::for_profile(Profile::Smoke)
    }

    #[tokio::test]
    async fn every_workload_measures_the_memory_store() {
        let system = memory();
        assert_eq!(system.kind(), SystemKind::FactlineMemory);
        let sizes = tiny();
        preload_all(&system, sizes.w5_events, sizes.w5_batch, |_| {})
            .await
            .unwrap();
        preload_stream(&system, W4_STREAM, sizes.w4_events, sizes.w4_batch)
            .await
            .unwrap();
        for (workload, writers) in [
            (WorkloadKind::W1, 4),
            (WorkloadKind::W2, 1),
            (WorkloadKind::W3, 4),
            (WorkloadKind::W4, 1),
            (WorkloadKind::W5, 1),
            (WorkloadKind::W6, 1),
        ] {
            let m = run_cell(&system, Cell { workload, writers }, &sizes, 0)
                .await
                .unwrap();
            assert!(m.events > 0, "{workload}: no events");
            assert!(m.events_per_sec() > 0.0, "{workload}");
            assert!(m.p99_us() >= m.p50_us(), "{workload}");
            assert_eq!(m.wins.is_some(), workload == WorkloadKind::W3);
            if workload == WorkloadKind::W3 {
                assert_eq!(m.wins, Some(m.events));
            }
        }
    }
}
