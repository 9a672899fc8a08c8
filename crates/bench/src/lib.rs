//! factline-bench: factline's embedded engine side by side with its peers, every
//! acknowledgement fsynced.
//!
//! One run interleaves rounds (for each round, for each workload, for each system) so that
//! drift on the machine affects every system alike, and reports the median round. The systems
//! (`factline-log`, `factline-memory`, `fsync-floor`, `sqlite`, `postgres`, `cqrs-es`) sit
//! behind one small interface in `systems`; the workloads W1–W6 of the issue are in
//! `workloads`; `report` holds the pure parts (median, ratios, table, JSON).
//!
//! The binary (`src/main.rs`) only parses the command line and prints; [`run`] is the harness.

mod config;
mod files;
mod messaging;
mod report;
mod runner;
mod systems;
mod w10;
mod w8;
mod w9;
mod workloads;

pub use config::{
    Cell, Cli, Config, DEFAULT_POSTGRES_URL, Profile, Sizes, SystemKind, WorkloadKind,
};
pub use files::RunFiles;
pub use messaging::{W7Options, W7Row, W7System, render_w7, run_w7};
pub use report::{
    CellReport, CellStatus, Ratio, Report, Row, format_ratios, format_table, group_thousands,
    median_round, ratios,
};
pub use runner::run;
pub use systems::open_factline_log;
pub use w8::{W8Adapter, W8Options, W8Row, render_w8, run_w8};
pub use w9::{W9Event, W9Options, W9Row, render_w9, run_w9};
pub use w10::{W10Options, W10Round, median_w10, run_w10};
