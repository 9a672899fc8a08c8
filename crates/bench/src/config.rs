//! Command line, run profiles and the names of systems and workloads.

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use clap::Parser;

/// The PostgreSQL address used when neither `--postgres-url` nor the environment names one.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// `factline-bench`: factline against its peers, every acknowledgement fsynced.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "factline-bench",
    about = "Side-by-side benchmark: factline-log and factline-postgres against an fsync floor, SQLite, PostgreSQL and cqrs-es",
    long_about = None
)]
pub struct Cli {
    /// Short run (under a minute): one round, short phases, 100k events for W5.
    #[arg(long, conflicts_with = "smoke")]
    pub quick: bool,
    /// Tiny sizes (a few seconds), for tests of the harness itself; the numbers mean nothing.
    #[arg(long)]
    pub smoke: bool,
    /// Also write the results as a JSON array to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Systems to run, comma separated (default: all): factline-log, factline-http, factline-memory,
    /// fsync-floor, sqlite, factline-postgres, postgres, cqrs-es.
    #[arg(long, value_delimiter = ',', value_name = "a,b,c")]
    pub systems: Option<Vec<SystemKind>>,
    /// Workloads to run, comma separated (default: all): W1..W6.
    #[arg(long, value_delimiter = ',', value_name = "W1,W2")]
    pub workloads: Option<Vec<WorkloadKind>>,
    /// Rounds (the median round is reported); default 3, 1 with --quick or --smoke.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=99))]
    pub rounds: Option<u32>,
    /// PostgreSQL server for the `postgres` and `cqrs-es` systems.
    #[arg(
        long,
        env = "FACTLINE_BENCH_POSTGRES_URL",
        default_value = DEFAULT_POSTGRES_URL,
        value_name = "URL"
    )]
    pub postgres_url: String,
    /// Directory under which a fresh temporary directory holds the file-backed systems' data
    /// (default: the system temp dir). The temporary directory is removed at the end.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// One system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SystemKind {
    /// The embedded engine, `factline_log`.
    FactlineLog,
    /// `factline serve` (in process, on a loopback port) over the embedded engine, through the
    /// HTTP API and its client (`HttpStore`, keep-alive connections): workload W10.
    FactlineHttp,
    /// factline's in-memory reference store: not durable, for reference only.
    FactlineMemory,
    /// A plain write + fdatasync per append, serialized by a mutex: the durability floor.
    FsyncFloor,
    /// SQLite through sqlx: WAL, synchronous=FULL.
    Sqlite,
    /// PostgreSQL through sqlx: synchronous_commit=on.
    Postgres,
    /// cqrs-es with postgres-es.
    CqrsEs,
    /// factline's PostgreSQL store, `factline_postgres`.
    FactlinePostgres,
}

impl SystemKind {
    /// Every system, in report order.
    pub const ALL: [Self; 8] = [
        Self::FactlineLog,
        Self::FactlineHttp,
        Self::FactlineMemory,
        Self::FsyncFloor,
        Self::Sqlite,
        Self::FactlinePostgres,
        Self::Postgres,
        Self::CqrsEs,
    ];

    /// The name used on the command line, in the table and in the JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Self::FactlineLog => "factline-log",
            Self::FactlineHttp => "factline-http",
            Self::FactlineMemory => "factline-memory",
            Self::FsyncFloor => "fsync-floor",
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::CqrsEs => "cqrs-es",
            Self::FactlinePostgres => "factline-postgres",
        }
    }

    /// False for the systems whose acknowledgement does not mean "on stable storage".
    pub const fn durable(self) -> bool {
        !matches!(self, Self::FactlineMemory)
    }

    /// True for the systems that need the PostgreSQL server.
    pub const fn needs_postgres(self) -> bool {
        matches!(self, Self::Postgres | Self::CqrsEs | Self::FactlinePostgres)
    }
}

impl fmt::Display for SystemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SystemKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == wanted)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|kind| kind.name()).collect();
                format!("unknown system {s:?} (known: {})", known.join(", "))
            })
    }
}

/// One workload of the issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    /// Single-event appends, concurrent writers on distinct streams.
    W1,
    /// Batch appends of 100 events.
    W2,
    /// Writers contending on one stream: wins and conflicts.
    W3,
    /// Load one stream of 1,000 events (warm).
    W4,
    /// Scan `$all`.
    W5,
    /// Live subscription lag, append acknowledgement to delivery.
    W6,
}

impl WorkloadKind {
    /// Every workload, in report order.
    pub const ALL: [Self; 6] = [Self::W1, Self::W2, Self::W3, Self::W4, Self::W5, Self::W6];

    /// `W1` … `W6`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::W1 => "W1",
            Self::W2 => "W2",
            Self::W3 => "W3",
            Self::W4 => "W4",
            Self::W5 => "W5",
            Self::W6 => "W6",
        }
    }

    /// One line on what is measured.
    pub const fn description(self) -> &'static str {
        match self {
            Self::W1 => "single-event appends, one stream per writer: latency per append",
            Self::W2 => "appends of 100 events each: latency per append",
            Self::W3 => {
                "writers contending on one stream with expected versions: latency per attempt, events/s = wins/s"
            }
            Self::W4 => "load one preloaded stream (warm), latency per full load",
            Self::W5 => "scan the preloaded events of $all from the start, latency per full scan",
            Self::W6 => "live subscription: p50/p99 = lag from append ack to delivery",
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WorkloadKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_uppercase();
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == wanted)
            .ok_or_else(|| format!("unknown workload {s:?} (known: W1, W2, W3, W4, W5, W6)"))
    }
}

/// Which size of run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The full run (under 15 minutes).
    Full,
    /// `--quick` (under a minute).
    Quick,
    /// `--smoke`: tiny sizes, for tests.
    Smoke,
}

impl Profile {
    /// The name shown in the report header.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Quick => "quick",
            Self::Smoke => "smoke",
        }
    }
}

/// Every size and duration of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizes {
    /// Rounds; the median round is reported.
    pub rounds: usize,
    /// Unmeasured time at the start of every phase.
    pub warmup: Duration,
    /// Measured time of every phase (W5 always completes at least one scan).
    pub measure: Duration,
    /// W1 writer counts.
    pub w1_writers: Vec<usize>,
    /// W2 events per append.
    pub w2_batch: usize,
    /// W2 writer counts.
    pub w2_writers: Vec<usize>,
    /// W3 writers on the one stream.
    pub w3_writers: usize,
    /// W4 stream length.
    pub w4_events: u64,
    /// W4 preload batch size.
    pub w4_batch: usize,
    /// W5 events preloaded and scanned.
    pub w5_events: u64,
    /// W5 preload batch size.
    pub w5_batch: usize,
    /// Events per page when a system reads in pages.
    pub read_page: usize,
    /// Bound on one phase beyond warm-up + measure.
    pub phase_slack: Duration,
    /// Bound on one W5 phase beyond warm-up + measure (scans may be long).
    pub scan_slack: Duration,
    /// Bound on a system's setup and preload.
    pub setup_timeout: Duration,
    /// Bound on connecting to PostgreSQL.
    pub connect_timeout: Duration,
}

impl Sizes {
    /// The sizes of `profile`.
    pub fn for_profile(profile: Profile) -> Self {
        let full = Self {
            rounds: 3,
            warmup: Duration::from_millis(500),
            measure: Duration::from_secs(2),
            w1_writers: vec![1, 8, 32, 128],
            w2_batch: 100,
            w2_writers: vec![1, 16],
            w3_writers: 32,
            w4_events: 1_000,
            w4_batch: 100,
            w5_events: 1_000_000,
            w5_batch: 1_000,
            read_page: 10_000,
            phase_slack: Duration::from_secs(30),
            scan_slack: Duration::from_secs(120),
            setup_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
        };
        match profile {
            Profile::Full => full,
            Profile::Quick => Self {
                rounds: 1,
                warmup: Duration::from_millis(150),
                measure: Duration::from_millis(500),
                w5_events: 100_000,
                phase_slack: Duration::from_secs(10),
                scan_slack: Duration::from_secs(20),
                setup_timeout: Duration::from_secs(30),
                ..full
            },
            Profile::Smoke => Self {
                rounds: 1,
                warmup: Duration::from_millis(20),
                measure: Duration::from_millis(100),
                w1_writers: vec![1, 4],
                w3_writers: 4,
                w4_events: 100,
                w4_batch: 50,
                w5_events: 1_000,
                w5_batch: 500,
                phase_slack: Duration::from_secs(10),
                scan_slack: Duration::from_secs(10),
                setup_timeout: Duration::from_secs(30),
                ..full
            },
        }
    }

    /// The most connections any phase uses.
    pub fn max_writers(&self) -> usize {
        self.w1_writers
            .iter()
            .copied()
            .chain(self.w2_writers.iter().copied())
            .chain([self.w3_writers, 1])
            .max()
            .unwrap_or(1)
    }
}

/// A run, resolved from the command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which size of run.
    pub profile: Profile,
    /// Sizes and durations.
    pub sizes: Sizes,
    /// Systems to run, in report order.
    pub systems: Vec<SystemKind>,
    /// Workloads to run, in report order.
    pub workloads: Vec<WorkloadKind>,
    /// PostgreSQL address.
    pub postgres_url: String,
    /// Parent of the run's temporary data directory.
    pub data_dir: Option<PathBuf>,
}

impl Config {
    /// Resolves the command line.
    pub fn from_cli(cli: &Cli) -> Self {
        let profile = if cli.smoke {
            Profile::Smoke
        } else if cli.quick {
            Profile::Quick
        } else {
            Profile::Full
        };
        let mut sizes = Sizes::for_profile(profile);
        if let Some(rounds) = cli.rounds {
            sizes.rounds = rounds as usize;
        }
        Self {
            profile,
            sizes,
            systems: dedup_sorted(
                cli.systems
                    .clone()
                    .unwrap_or_else(|| SystemKind::ALL.to_vec()),
            ),
            workloads: dedup_sorted(
                cli.workloads
                    .clone()
                    .unwrap_or_else(|| WorkloadKind::ALL.to_vec()),
            ),
            postgres_url: cli.postgres_url.clone(),
            data_dir: cli.data_dir.clone(),
        }
    }

    /// The phases of one round, in order: each workload with each of its writer counts.
    pub fn cells(&self) -> Vec<Cell> {
        let sizes = &self.sizes;
        self.workloads
            .iter()
            .flat_map(|&workload| {
                let writers: Vec<usize> = match workload {
                    WorkloadKind::W1 => sizes.w1_writers.clone(),
                    WorkloadKind::W2 => sizes.w2_writers.clone(),
                    WorkloadKind::W3 => vec![sizes.w3_writers],
                    WorkloadKind::W4 | WorkloadKind::W5 | WorkloadKind::W6 => vec![1],
                };
                writers
                    .into_iter()
                    .map(move |writers| Cell { workload, writers })
            })
            .collect()
    }
}

fn dedup_sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items.dedup();
    items
}

/// One workload at one concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    /// The workload.
    pub workload: WorkloadKind,
    /// Concurrent writers (readers for W4/W5).
    pub writers: usize,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in SystemKind::ALL {
            assert_eq!(kind.name().parse::<SystemKind>().unwrap(), kind);
        }
        for kind in WorkloadKind::ALL {
            assert_eq!(
                kind.name().to_lowercase().parse::<WorkloadKind>().unwrap(),
                kind
            );
        }
        assert!("mysql".parse::<SystemKind>().is_err());
        assert!("W7".parse::<WorkloadKind>().is_err());
    }

    #[test]
    fn command_line_selects_systems_workloads_and_profile() {
        let cli = Cli::try_parse_from([
            "factline-bench",
            "--quick",
            "--systems",
            "sqlite,postgres,sqlite",
            "--workloads",
            "W3,w1",
            "--rounds",
            "2",
        ])
        .unwrap();
        let config = Config::from_cli(&cli);
        assert_eq!(config.profile, Profile::Quick);
        assert_eq!(config.sizes.rounds, 2);
        assert_eq!(
            config.systems,
            vec![SystemKind::Sqlite, SystemKind::Postgres]
        );
        assert_eq!(config.workloads, vec![WorkloadKind::W1, WorkloadKind::W3]);
        let cells = config.cells();
        assert_eq!(cells.len(), 5);
        assert_eq!(
            cells[4],
            Cell {
                workload: WorkloadKind::W3,
                writers: 32
            }
        );
        assert!(Cli::try_parse_from(["factline-bench", "--quick", "--smoke"]).is_err());
        assert!(Cli::try_parse_from(["factline-bench", "--rounds", "0"]).is_err());
    }

    #[test]
    fn full_profile_matches_the_issue() {
        let sizes = Sizes::for_profile(Profile::Full);
        assert_eq!(sizes.w1_writers, vec![1, 8, 32, 128]);
        assert_eq!(sizes.w2_batch, 100);
        assert_eq!(sizes.w3_writers, 32);
        assert_eq!(sizes.w4_events, 1_000);
        assert_eq!(sizes.w5_events, 1_000_000);
        assert_eq!(Sizes::for_profile(Profile::Quick).w5_events, 100_000);
        assert_eq!(sizes.max_writers(), 128);
    }
}
