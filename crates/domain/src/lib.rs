//! factline domain layer: typed events, aggregates as deciders, repositories and snapshots,
//! projections, process managers.
//!
//! - [`DomainEvent`] (derive it with [`#[derive(DomainEvent)]`](macro@DomainEvent)): serde types
//!   with a stable event type name and a schema version.
//! - [`Aggregate`]: `decide(&self, command) -> events` (pure) and `evolve(&mut self, event)`.
//! - [`Repository`]: loads an aggregate (snapshot + tail), decides, appends with the expected
//!   version, retries on conflict when asked, and returns the recorded events.
//! - [`Projection`] and [`ProjectionRunner`]: read models fed from `$all`, resumed from a
//!   durable checkpoint, rebuilt by catching a fresh instance up.
//! - [`ProcessManager`] and [`ProcessManagerRunner`]: sagas that react to events, keep their
//!   state as their own stream, send commands (recorded before they are sent) and schedule
//!   timeouts that survive restarts.
//! - [`Upcasters`] and [`check_stored_events`]: older stored events read in the current shape,
//!   and a check that a changed event schema still reads every stored event.
//! - [`testing::AggregateTest`]: given/when/then tests of an aggregate's rules.
//!
//! ```
//! use std::sync::Arc;
//!
//! use factline_core::InMemoryStore;
//! use factline_domain::{Aggregate, DomainEvent, ExecuteOptions, Repository};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
//! enum CounterEvent {
//!     Incremented { by: u32 },
//! }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("an increment must be positive")]
//! struct ZeroIncrement;
//!
//! #[derive(Debug, Default)]
//! struct Counter {
//!     total: u64,
//! }
//!
//! impl Aggregate for Counter {
//!     type Command = u32;
//!     type Event = CounterEvent;
//!     type Error = ZeroIncrement;
//!     const CATEGORY: &'static str = "counter";
//!
//!     fn decide(&self, by: &u32) -> Result<Vec<CounterEvent>, ZeroIncrement> {
//!         if *by == 0 {
//!             return Err(ZeroIncrement);
//!         }
//!         Ok(vec![CounterEvent::Incremented { by: *by }])
//!     }
//!
//!     fn evolve(&mut self, event: &CounterEvent) {
//!         match event {
//!             CounterEvent::Incremented { by } => self.total += u64::from(*by),
//!         }
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let repository = Repository::<Counter>::new(Arc::new(InMemoryStore::new()));
//! let executed = repository.execute("a", 5, ExecuteOptions::new()).await?;
//! assert_eq!(executed.recorded[0].stream.as_str(), "counter-a");
//! assert_eq!(executed.recorded[0].event_type, "Incremented");
//! assert_eq!(repository.load("a").await?.state.total, 5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

// Lets `#[derive(DomainEvent)]` name this crate `::factline_domain` inside the crate too (its
// integration tests and doc tests see it as an ordinary dependency).
#[allow(unused_extern_crates)]
extern crate self as factline_domain;

mod aggregate;
mod event;
mod process;
mod projection;
mod repository;
pub mod testing;
mod upcast;

#[doc(hidden)]
pub mod __private;

pub use aggregate::{Aggregate, AggregateIdError, SnapshotState, stream_id_for};
pub use event::{DecodeError, DomainEvent, EncodeError};
pub use factline_macros::DomainEvent;
pub use process::{
    CommandSink, IssuedCommand, ProcessError, ProcessInstance, ProcessManager,
    ProcessManagerRunner, ProcessOptions, ProcessStopped, REACTED_EVENT_TYPE, RECENT_REACTIONS_MAX,
    Reaction, SinkError, process_checkpoint_name, timeout_index_stream,
};
pub use projection::{
    Progress, Projection, ProjectionError, ProjectionRunner, RunnerOptions, Stopped,
};
pub use repository::{
    AsOf, COMMAND_HANDLED_EVENT_TYPE, ExecuteError, ExecuteOptions, Executed, LoadError, Loaded,
    Repository, SnapshotPolicy, handled_stream_for,
};
pub use upcast::{
    SchemaProblem, SchemaProblemKind, SchemaReport, UPCAST_STEPS_MAX, Upcasters,
    check_stored_events,
};
