//! `factline-bench-w10`: workload W10 with a light client — the HTTP API over factline-log
//! driven by `wrk` with 32 keep-alive connections of single-event appends. See
//! `factline_bench::run_w10`.
#![allow(clippy::print_stdout)]

use anyhow::Context as _;
use clap::Parser;
use factline_bench::{RunFiles, W10Options, median_w10, run_w10};

/// W10: HTTP appends of single events from wrk, every answer checked against the log.
#[derive(Debug, Parser)]
#[command(name = "factline-bench-w10")]
struct Cli {
    /// One round of 3 s instead of three of 10 s.
    #[arg(long)]
    quick: bool,
    /// Rounds (the median is reported).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=99))]
    rounds: Option<u32>,
    /// Seconds wrk sends per round.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600))]
    duration_secs: Option<u64>,
    /// Keep-alive connections.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    connections: Option<u64>,
    /// The wrk binary.
    #[arg(long, default_value = "wrk")]
    wrk: String,
    #[command(flatten)]
    files: RunFiles,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut options = if cli.quick {
        W10Options::quick()
    } else {
        W10Options::full()
    };
    if let Some(rounds) = cli.rounds {
        options.rounds = rounds as usize;
    }
    if let Some(secs) = cli.duration_secs {
        options.duration = std::time::Duration::from_secs(secs);
    }
    if let Some(connections) = cli.connections {
        options.connections = connections as usize;
    }
    options.wrk = cli.wrk;
    let root = cli.files.data_root();
    // The server's runtime, as `factline serve` builds it (one worker per core).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let rounds = runtime.block_on(run_w10(&options, &root))?;
    let median = median_w10(&rounds).context("no round ran")?;
    println!(
        "W10 factline serve (factline-log) from wrk, {} keep-alive connections, {} round(s) of {} s (median round):",
        options.connections,
        rounds.len(),
        options.duration.as_secs()
    );
    println!(
        "  {:.0} appends/s, p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs; {} answered 201, {} events in the log",
        median.requests_per_sec,
        median.p50_us,
        median.p90_us,
        median.p99_us,
        median.requests,
        median.events_stored
    );
    cli.files.write_json(&rounds)?;
    Ok(())
}
