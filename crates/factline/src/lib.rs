//! factline: an event store and event-driven messaging toolkit.
//!
//! This facade re-exports the public API behind features:
//!
//! - always: the event model, the [`EventStore`] contract and [`InMemoryStore`]
//!   (from `factline-core`);
//! - `domain` (default): [`domain`] — typed events, aggregates as deciders, repositories;
//! - `log` (default): [`log`] — the embedded durable engine, `log::LogStore`;
//! - `testkit`: [`testkit`] — the conformance suite for your own backend.
//!
//! PostgreSQL, messaging and the server arrive as their own crates and features.

pub use factline_core::*;

#[cfg(feature = "domain")]
pub use factline_domain as domain;

#[cfg(feature = "log")]
pub use factline_log as log;
