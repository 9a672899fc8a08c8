//! `factline-bench-w9`: workload W9, projection rebuilds over 1M events into an in-memory read
//! model and into PostgreSQL. See `factline_bench::run_w9`.
#![allow(clippy::print_stdout)]

use anyhow::Context as _;
use clap::Parser;
use factline_bench::{RunFiles, W9Options, render_w9, run_w9};

/// W9: rebuild throughput of the projection runner.
#[derive(Debug, Parser)]
#[command(name = "factline-bench-w9")]
struct Cli {
    /// 100k events, one round.
    #[arg(long)]
    quick: bool,
    /// Events preloaded and rebuilt.
    #[arg(long)]
    events: Option<u64>,
    /// Rounds (the median is reported).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=99))]
    rounds: Option<u32>,
    /// PostgreSQL for the `postgres` read model.
    #[arg(
        long,
        env = "FACTLINE_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// Skip the PostgreSQL read model.
    #[arg(long)]
    no_postgres: bool,
    #[command(flatten)]
    files: RunFiles,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let url = (!cli.no_postgres).then_some(cli.postgres_url);
    let mut options = if cli.quick {
        W9Options::quick(url)
    } else {
        W9Options::full(url)
    };
    if let Some(events) = cli.events {
        options.events = events.max(1);
    }
    if let Some(rounds) = cli.rounds {
        options.rounds = rounds as usize;
    }
    let root = cli.files.data_root();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let rows = runtime.block_on(run_w9(&options, &root))?;
    print!("{}", render_w9(&rows));
    cli.files.write_json(&rows)?;
    Ok(())
}
