//! `factline-bench-w8`: workload W8, broker adapters through factline beside the raw clients.
//! See `factline_bench::run_w8`.
#![allow(clippy::print_stdout)]

use anyhow::Context as _;
use clap::Parser;
use factline_bench::{W8Adapter, W8Options, render_w8, run_w8};

/// W8: publish and consume throughput of each adapter against its raw client.
#[derive(Debug, Parser)]
#[command(name = "factline-bench-w8")]
struct Cli {
    /// Short run.
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// Tiny sizes, for tests of the harness; the numbers mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Rounds (the median is reported).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=99))]
    rounds: Option<u32>,
    /// Messages per phase.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    messages: Option<u32>,
    /// Adapters, comma separated (default: all): nats, redis, rabbitmq, sql, mqtt, kafka.
    #[arg(long, value_delimiter = ',', value_name = "a,b")]
    adapters: Option<Vec<String>>,
    /// The NATS server.
    #[arg(
        long,
        env = "FACTLINE_BENCH_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// The Redis server.
    #[arg(
        long,
        env = "FACTLINE_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// The PostgreSQL database of the SQL adapter.
    #[arg(
        long,
        env = "FACTLINE_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// The RabbitMQ broker.
    #[arg(
        long,
        env = "FACTLINE_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// The MQTT broker.
    #[arg(
        long,
        env = "FACTLINE_BENCH_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    mqtt_url: String,
    /// The Kafka bootstrap brokers (`host:port[,host:port…]`).
    #[arg(
        long,
        env = "FACTLINE_BENCH_KAFKA_URL",
        default_value = "127.0.0.1:9092"
    )]
    kafka_url: String,
    /// Also write the rows as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut options = if cli.smoke {
        W8Options::smoke()
    } else if cli.quick {
        W8Options::quick()
    } else {
        W8Options::full()
    };
    options.nats_url = cli.nats_url;
    options.redis_url = cli.redis_url;
    options.postgres_url = cli.postgres_url;
    options.amqp_url = cli.amqp_url;
    options.mqtt_url = cli.mqtt_url;
    options.kafka_url = cli.kafka_url;
    if let Some(names) = cli.adapters {
        let mut adapters = Vec::new();
        for name in names {
            let adapter = W8Adapter::ALL
                .into_iter()
                .find(|adapter| adapter.name() == name.trim())
                .with_context(|| {
                    let known: Vec<&str> = W8Adapter::ALL.iter().map(|a| a.name()).collect();
                    format!("unknown adapter {name:?} (known: {})", known.join(", "))
                })?;
            adapters.push(adapter);
        }
        options.adapters = adapters;
    }
    if let Some(rounds) = cli.rounds {
        options.rounds = rounds as usize;
    }
    if let Some(messages) = cli.messages {
        options.messages = messages as usize;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let rows = runtime.block_on(run_w8(&options))?;
    print!("{}", render_w8(&rows));
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}
