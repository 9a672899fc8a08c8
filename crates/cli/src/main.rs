//! `factline`: the command-line tool and server binary.
//!
//! Exit codes: 0 success, 1 failure, 2 usage error (clap), 3 conflict (a wrong expected
//! version or an idempotency conflict: reload and decide again), 4 stream not found.

mod checkpoints;
mod commands;
mod serve;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// factline: an event store and event-driven messaging toolkit.
#[derive(Debug, Parser)]
#[command(name = "factline", version, about, long_about = None, arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP/JSON API server (SSE subscriptions, metrics) on an embedded data directory,
    /// or on PostgreSQL with --store postgres://….
    Serve(serve::ServeArgs),
    /// Apply the missing schema migrations of a PostgreSQL store (serve also applies them at
    /// start unless --no-migrate).
    Migrate(serve::MigrateArgs),
    /// Append events to a stream (one from --type/--data, or many from --file).
    Append(commands::AppendArgs),
    /// Print a stream's events.
    Read(commands::ReadArgs),
    /// Print the events of $all, the global log, optionally filtered.
    ReadAll(commands::ReadAllArgs),
    /// Follow a stream or $all live (catch-up from --from, then new events as they commit).
    Tail(commands::TailArgs),
    /// Soft-delete a stream, or tombstone it with --hard.
    Delete(commands::DeleteArgs),
    /// Read or replace a stream's retention settings.
    #[command(subcommand)]
    Metadata(commands::MetadataCommand),
    /// Write $all as NDJSON (the API's event shape, or CloudEvents).
    Export(commands::ExportArgs),
    /// Append the events of an export, keeping their streams, ids and revisions.
    Import(commands::ImportArgs),
    /// Measure append throughput and latency against a server or data directory (closed-loop
    /// writers on their own streams). The side-by-side comparison with peers is crates/bench.
    Bench(commands::BenchArgs),
    /// Print the limits every store enforces by default.
    Limits {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check a stream id against the naming rules and print its category.
    CheckStreamId {
        /// The stream id, e.g. order-42.
        stream: String,
    },
    /// List or reset the checkpoints of projections, process managers and subscribers.
    #[command(subcommand)]
    Checkpoints(checkpoints::CheckpointsCommand),
    /// Check every record, header, position and revision of a data directory without changing
    /// it. Exits 1 when the data is corrupt (naming file and offset).
    Verify {
        /// The data directory.
        #[arg(long, default_value = "./factline-data")]
        data: std::path::PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(commands::exit_code(&error))
        }
    }
}

/// Runs a store command on a runtime of its own.
fn block_on(future: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(future)
}

#[allow(clippy::print_stdout)]
fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Limits { json } => {
            let limits = factline_core::Limits::default();
            let value = serde_json::to_value(&limits).context("encoding the limits")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else if let Some(fields) = value.as_object() {
                for (name, max) in fields {
                    println!("{name:<26} {max}");
                }
            }
        }
        Command::CheckStreamId { stream } => {
            let id = factline_core::StreamId::new(&stream)
                .with_context(|| format!("stream id {stream:?} is not valid"))?;
            println!("valid; category {:?}", id.category());
        }
        Command::Verify { data, json } => verify(&data, json)?,
        Command::Serve(args) => serve::run(args)?,
        Command::Migrate(args) => serve::migrate(args)?,
        Command::Append(args) => block_on(commands::append(args))?,
        Command::Read(args) => block_on(commands::read(args))?,
        Command::ReadAll(args) => block_on(commands::read_all(args))?,
        Command::Tail(args) => block_on(commands::tail(args))?,
        Command::Delete(args) => block_on(commands::delete(args))?,
        Command::Metadata(command) => block_on(commands::metadata(command))?,
        Command::Export(args) => block_on(commands::export(args))?,
        Command::Import(args) => block_on(commands::import(args))?,
        Command::Bench(args) => block_on(commands::bench(args))?,
        Command::Checkpoints(command) => block_on(checkpoints::run(command))?,
    }
    Ok(())
}

/// Fails unless `data` holds a factline log (a command that reads one must not create it).
pub(crate) fn require_log_dir(data: &std::path::Path) -> anyhow::Result<()> {
    if !data.join("segments").is_dir() {
        anyhow::bail!(
            "{} holds no factline log (no segments folder)",
            data.display()
        );
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
fn verify(data: &std::path::Path, json: bool) -> anyhow::Result<()> {
    require_log_dir(data)?;
    // The check reads every record; a spinner with the elapsed time shows it is working.
    let spinner = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("verify {spinner} {elapsed} {msg}") {
        spinner.set_style(style);
    }
    spinner.set_message(format!("checking {}", data.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let report = factline_log::verify(data);
    spinner.finish_and_clear();
    let report = report.with_context(|| format!("verifying {}", data.display()))?;
    let repairs: Vec<String> = report
        .pending_repairs
        .iter()
        .map(|repair| format!("{repair:?}"))
        .collect();
    if json {
        let value = serde_json::json!({
            "ok": true,
            "segments": report.segments,
            "records": report.records,
            "events": report.events,
            "index_entries": report.index_entries,
            "index_events_checked": report.index_events_checked,
            "pending_repairs": repairs,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "ok: {} segments, {} records, {} events, {} index entries, {} events checked \
             against the index",
            report.segments,
            report.records,
            report.events,
            report.index_entries,
            report.index_events_checked
        );
        for repair in repairs {
            println!("will repair on open (nothing acknowledged is lost): {repair}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
