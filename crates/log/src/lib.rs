//! factline's embedded storage engine: a segmented, group-committed, append-only log that
//! implements the [`EventStore`](factline_core::EventStore) contract on local disk.
//!
//! The byte layout, the commit protocol and the crash analysis are in
//! `docs/design/log-format.md`. In short: one writer thread owns the tail; concurrent appends
//! share one `fdatasync` (group commit) and are acknowledged only after it; a torn tail is
//! truncated on open; damage anywhere else is refused, naming file and offset (at open for the
//! log after the index checkpoint, or for all of it with `LogOptions::verify_on_open`; by reads
//! and by [`verify`] otherwise). The index is bounded in memory and checkpointed, so open
//! replays only the log written since the last checkpoint.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use factline_core::{EventData, EventStore, ExpectedVersion, StreamId};
//! use factline_log::LogStore;
//!
//! let store = LogStore::open("./factline-data").await?;
//! let stream = StreamId::new("order-42")?;
//! let event = EventData::json("OrderPlaced", &serde_json::json!({"total_cents": 1250}))?;
//! store.append(&stream, ExpectedVersion::NoStream, vec![event]).await?;
//! store.close().await;
//! # Ok(()) }
//! ```

mod checkpoints;
pub mod faulty;
pub mod format;
mod index;
mod reader;
mod recovery;
mod small_file;
mod snapshots;
pub mod storage;
mod store;
mod verify;
mod writer;

pub use checkpoints::LogCheckpointStore;
pub use recovery::{OpenError, Repair};
pub use storage::{DiskStorage, Storage, StorageFile};
pub use store::{LogOptions, LogStats, LogStore, OpenReport};
pub use verify::{VerifyReport, verify, verify_with};
