//! `factline checkpoints list|reset`: the checkpoints projections, process managers and
//! subscribers saved in a data directory's (or a PostgreSQL store's) checkpoint store. A reset
//! forgets one, so whatever owns it rebuilds from position 0 on its next start.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context as _, bail};
use factline_core::{CheckpointStore, EventStore};
use factline_log::LogStore;
use factline_postgres::PostgresStore;

use crate::serve::{is_postgres_url, postgres_options};

/// Most checkpoints `list` prints.
const LISTED_MAX: usize = 100_000;

/// Where the checkpoints are.
#[derive(Debug, clap::Args)]
pub(crate) struct CheckpointsAt {
    /// The data directory (no server may have it open).
    #[arg(long, env = "FACTLINE_DATA", default_value = "./factline-data")]
    data: PathBuf,
    /// A PostgreSQL store instead: postgres://user:password@host:port/db.
    #[arg(long, env = "FACTLINE_STORE")]
    store: Option<String>,
    /// The schema of the PostgreSQL store.
    #[arg(long, default_value = "factline", env = "FACTLINE_PG_SCHEMA")]
    pg_schema: String,
}

/// `factline checkpoints …`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum CheckpointsCommand {
    /// Print every saved checkpoint, its position and how far it is behind the head.
    List {
        #[command(flatten)]
        at: CheckpointsAt,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Forget a checkpoint: its projection (or process manager, or subscriber) starts from
    /// position 0 again — a rebuild — the next time it starts. Stop it first.
    Reset {
        /// The checkpoint's name, as `list` prints it.
        name: String,
        #[command(flatten)]
        at: CheckpointsAt,
    },
}

/// The opened store, closed at the end.
enum Opened {
    Log(LogStore),
    Postgres(PostgresStore),
}

impl Opened {
    async fn open(at: &CheckpointsAt) -> anyhow::Result<Self> {
        if let Some(url) = &at.store {
            if !is_postgres_url(url) {
                bail!(
                    "--store {}: give a postgres:// URL (or --data DIR for a data directory)",
                    factline_postgres::redact_url(url)
                );
            }
            let options = postgres_options(url, &at.pg_schema, false)?;
            let store = PostgresStore::open(options).await.with_context(|| {
                format!(
                    "opening the PostgreSQL store at {}",
                    factline_postgres::redact_url(url)
                )
            })?;
            return Ok(Self::Postgres(store));
        }
        crate::require_log_dir(&at.data)?;
        let log = LogStore::open(&at.data)
            .await
            .with_context(|| format!("opening the data directory {}", at.data.display()))?;
        Ok(Self::Log(log))
    }

    fn checkpoints(&self) -> Arc<dyn CheckpointStore> {
        match self {
            Self::Log(log) => Arc::new(log.checkpoints()),
            Self::Postgres(store) => Arc::new(store.checkpoints()),
        }
    }

    fn store(&self) -> &dyn EventStore {
        match self {
            Self::Log(log) => log,
            Self::Postgres(store) => store,
        }
    }

    async fn close(self) {
        match self {
            Self::Log(log) => log.close().await,
            Self::Postgres(store) => store.close().await,
        }
    }
}

/// A checkpoint that is not saved (exit code 4, like a missing stream).
#[derive(Debug, thiserror::Error)]
#[error("no checkpoint named {0:?} is saved here")]
pub(crate) struct CheckpointNotFound(pub(crate) String);

#[allow(clippy::print_stdout)] // the command's output is its report
pub(crate) async fn run(command: CheckpointsCommand) -> anyhow::Result<()> {
    match command {
        CheckpointsCommand::List { at, json } => {
            let opened = Opened::open(&at).await?;
            let listed = opened
                .checkpoints()
                .list_checkpoints(LISTED_MAX)
                .await
                .context("listing the checkpoints");
            let head = opened.store().head_position().await.ok().flatten();
            opened.close().await;
            let listed = listed?;
            for (name, position) in &listed {
                let behind = head.map(|head| head.value().saturating_sub(position.value()));
                if json {
                    let line = serde_json::json!({
                        "name": name,
                        "position": position.value(),
                        "behind": behind,
                    });
                    println!("{line}");
                } else {
                    let behind = behind.map_or_else(|| "-".to_owned(), |b| b.to_string());
                    println!("{:>12}  {:>10} behind  {name}", position.value(), behind);
                }
            }
            if listed.is_empty() && !json {
                println!("no checkpoints saved");
            }
        }
        CheckpointsCommand::Reset { name, at } => {
            let opened = Opened::open(&at).await?;
            let checkpoints = opened.checkpoints();
            let outcome = async {
                let saved = checkpoints
                    .load_checkpoint(&name)
                    .await
                    .with_context(|| format!("loading the checkpoint {name:?}"))?;
                let Some(position) = saved else {
                    return Err(anyhow::Error::new(CheckpointNotFound(name.clone())));
                };
                checkpoints
                    .delete_checkpoint(&name)
                    .await
                    .with_context(|| format!("deleting the checkpoint {name:?}"))?;
                Ok(position)
            }
            .await;
            opened.close().await;
            let position = outcome?;
            println!(
                "checkpoint {name:?} (at position {}) is reset: it rebuilds from position 0 on its next start",
                position.value()
            );
        }
    }
    Ok(())
}
