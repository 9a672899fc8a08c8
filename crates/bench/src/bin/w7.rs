//! `factline-bench-w7`: workload W7, in-memory messaging through the router, beside the bare
//! pub/sub and a tokio channel. See `factline_bench::run_w7`.
#![allow(clippy::print_stdout)]

use anyhow::Context as _;
use clap::Parser;
use factline_bench::{W7Options, W7System, render_w7, run_w7};

/// W7: router throughput (handler that acks) and delivery latency, 1 and 16 subscribers.
#[derive(Debug, Parser)]
#[command(name = "factline-bench-w7")]
struct Cli {
    /// Short run (about 10 s).
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// Tiny sizes, for tests of the harness; the numbers mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Rounds (the median is reported).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=99))]
    rounds: Option<u32>,
    /// Subscriber counts, comma separated (default 1,16).
    #[arg(long, value_delimiter = ',', value_name = "N,M")]
    subscribers: Option<Vec<usize>>,
    /// Systems, comma separated (default: all): factline-router, factline-pubsub, tokio-mpsc.
    #[arg(long, value_delimiter = ',', value_name = "a,b")]
    systems: Option<Vec<String>>,
    /// Also write the rows as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut options = if cli.smoke {
        W7Options::smoke()
    } else if cli.quick {
        W7Options::quick()
    } else {
        W7Options::full()
    };
    if let Some(subscribers) = cli.subscribers {
        options.subscribers = subscribers.into_iter().map(|n| n.max(1)).collect();
    }
    if let Some(names) = cli.systems {
        let mut systems = Vec::new();
        for name in names {
            let system = W7System::ALL
                .into_iter()
                .find(|system| system.name() == name.trim())
                .with_context(|| format!("unknown system {name:?} (known: factline-router, factline-pubsub, tokio-mpsc)"))?;
            systems.push(system);
        }
        options.systems = systems;
    }
    if let Some(rounds) = cli.rounds {
        options.rounds = rounds as usize;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let rows = runtime.block_on(run_w7(&options))?;
    print!("{}", render_w7(&rows));
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}
