//! W10 with a light client in its own process: `factline serve`'s HTTP API (over factline-log,
//! on a fresh data directory each round) driven by `wrk` (Debian's package) with 32 keep-alive
//! connections, each POST a single-event append to its own stream. The main bench's
//! `factline-http` measures the same API through `HttpStore` in the bench's own process, where
//! the Rust client shares the two cores with the server; this measures what the server
//! sustains when the client costs little.
//!
//! Every round checks the log afterwards: it must hold at least as many events as wrk counted
//! 201 answers (an append is answered after its fsync), and wrk must have seen no other status.

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use factline_core::EventStore as _;
use serde::Serialize;

/// The wrk script: single-event appends, each connection to its own streams.
const APPEND_SCRIPT: &str = include_str!("../wrk/append.lua");

/// Sizes of a W10 run.
#[derive(Debug, Clone)]
pub struct W10Options {
    /// Rounds, each on a fresh data directory (the median round is reported).
    pub rounds: usize,
    /// How long wrk sends, per round.
    pub duration: Duration,
    /// Keep-alive connections (concurrent clients).
    pub connections: usize,
    /// The wrk binary.
    pub wrk: String,
}

impl W10Options {
    /// Three rounds of 10 s.
    pub fn full() -> Self {
        Self {
            rounds: 3,
            duration: Duration::from_secs(10),
            connections: 32,
            wrk: "wrk".to_owned(),
        }
    }

    /// One round of 3 s.
    pub fn quick() -> Self {
        Self {
            rounds: 1,
            duration: Duration::from_secs(3),
            ..Self::full()
        }
    }
}

/// One round as wrk and the log saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct W10Round {
    /// Answers wrk counted.
    pub requests: u64,
    /// Answers that were not 201.
    pub non_2xx: u64,
    /// Appends answered per second (wrk's `Requests/sec`).
    pub requests_per_sec: f64,
    /// Latency percentiles wrk measured, in microseconds.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Events in the log after the round.
    pub events_stored: u64,
}

/// What wrk printed, parsed.
#[derive(Debug, Clone, PartialEq)]
struct WrkOutput {
    requests: u64,
    non_2xx: u64,
    requests_per_sec: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
}

/// A wrk duration such as `811.00us`, `2.43ms` or `1.02s`, in microseconds.
fn micros(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1_000.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

/// Parses the output of `wrk --latency`.
fn parse_wrk(output: &str) -> Result<WrkOutput> {
    let mut parsed = WrkOutput {
        requests: 0,
        non_2xx: 0,
        requests_per_sec: f64::NAN,
        p50_us: f64::NAN,
        p90_us: f64::NAN,
        p99_us: f64::NAN,
    };
    for line in output.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", rate] => parsed.requests_per_sec = rate.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", count] => parsed.non_2xx = count.parse()?,
            [count, "requests", "in", ..] => parsed.requests = count.parse()?,
            ["50%", value] => parsed.p50_us = micros(value).context("wrk's p50")?,
            ["90%", value] => parsed.p90_us = micros(value).context("wrk's p90")?,
            ["99%", value] => parsed.p99_us = micros(value).context("wrk's p99")?,
            _ => {}
        }
    }
    if parsed.requests == 0 || parsed.requests_per_sec.is_nan() || parsed.p99_us.is_nan() {
        bail!("wrk's output lacks its summary (run with --latency):\n{output}");
    }
    Ok(parsed)
}

/// One round: a fresh data directory, a server on a free port, wrk against it, the log checked.
async fn round(options: &W10Options, root: &Path) -> Result<W10Round> {
    let data = tempfile::tempdir_in(root).context("create a data directory")?;
    let log = Arc::new(factline_log::LogStore::open(data.path()).await?);
    let server = factline_server::Server::bind(
        Arc::clone(&log) as Arc<dyn factline_server::Store>,
        factline_server::ServerOptions::default().listen(([127, 0, 0, 1], 0).into()),
    )
    .await?;
    let url = format!("http://{}", server.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let script = data.path().join("append.lua");
    std::fs::write(&script, APPEND_SCRIPT).context("write the wrk script")?;
    let wrk = options.wrk.clone();
    let args = vec![
        "-t1".to_owned(),
        format!("-c{}", options.connections),
        format!("-d{}s", options.duration.as_secs().max(1)),
        "--latency".to_owned(),
        "-s".to_owned(),
        script.display().to_string(),
        url,
    ];
    let output = tokio::task::spawn_blocking(move || Command::new(&wrk).args(&args).output())
        .await?
        .with_context(|| {
            format!(
                "run {} (install Debian's wrk package: apt-get install wrk)",
                options.wrk
            )
        })?;
    let _ = stop.send(());
    serving.await??;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {}\n{text}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let parsed = parse_wrk(&text)?;
    let events_stored = log.head_position().await?.map_or(0, |p| p.value() + 1);
    log.close().await;
    if parsed.non_2xx > 0 {
        bail!("{} appends were not answered 201:\n{text}", parsed.non_2xx);
    }
    if events_stored < parsed.requests {
        bail!(
            "wrk counted {} appends answered 201 but the log holds {events_stored} events",
            parsed.requests
        );
    }
    Ok(W10Round {
        requests: parsed.requests,
        non_2xx: parsed.non_2xx,
        requests_per_sec: parsed.requests_per_sec,
        p50_us: parsed.p50_us,
        p90_us: parsed.p90_us,
        p99_us: parsed.p99_us,
        events_stored,
    })
}

/// Runs every round under `root` (a temporary directory each); returns them in order.
pub async fn run_w10(options: &W10Options, root: &Path) -> Result<Vec<W10Round>> {
    let mut rounds = Vec::with_capacity(options.rounds);
    for index in 0..options.rounds {
        let measured = round(options, root).await?;
        eprintln!(
            "[factline-bench-w10] round {}/{}: {:.0} appends/s, p50 {:.0} µs, p99 {:.0} µs, {} answered, {} stored",
            index + 1,
            options.rounds,
            measured.requests_per_sec,
            measured.p50_us,
            measured.p99_us,
            measured.requests,
            measured.events_stored
        );
        rounds.push(measured);
    }
    Ok(rounds)
}

/// The median round by throughput.
pub fn median_w10(rounds: &[W10Round]) -> Option<&W10Round> {
    let mut sorted: Vec<&W10Round> = rounds.iter().collect();
    sorted.sort_by(|a, b| a.requests_per_sec.total_cmp(&b.requests_per_sec));
    sorted.get(sorted.len() / 2).copied()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const OUTPUT: &str = "Running 10s test @ http://127.0.0.1:7615
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.91ms    1.10ms  41.77ms   98.74%
    Req/Sec    36.66k     1.64k   39.06k    84.00%
  Latency Distribution
     50%  811.00us
     75%    0.96ms
     90%    1.12ms
     99%    2.43ms
  368477 requests in 10.10s, 71.94MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  36485.04
Transfer/sec:      7.12MB
";

    #[test]
    fn wrk_latency_output_is_parsed_with_its_units() {
        let parsed = parse_wrk(OUTPUT).unwrap();
        assert_eq!(parsed.requests, 368_477);
        assert_eq!(parsed.non_2xx, 3);
        assert!((parsed.requests_per_sec - 36_485.04).abs() < 1e-6);
        assert!((parsed.p50_us - 811.0).abs() < 1e-6);
        assert!((parsed.p90_us - 1_120.0).abs() < 1e-6);
        assert!((parsed.p99_us - 2_430.0).abs() < 1e-6);
        assert_eq!(micros("1.5s"), Some(1_500_000.0));
        assert!(parse_wrk("wrk: connection refused").is_err());
    }

    #[test]
    fn the_median_round_is_the_middle_throughput() {
        let round = |rate: f64| W10Round {
            requests: 1,
            non_2xx: 0,
            requests_per_sec: rate,
            p50_us: 1.0,
            p90_us: 1.0,
            p99_us: 1.0,
            events_stored: 1,
        };
        let rounds = [round(3.0), round(1.0), round(2.0)];
        assert_eq!(median_w10(&rounds).unwrap().requests_per_sec, 2.0);
        assert!(median_w10(&[]).is_none());
    }
}
