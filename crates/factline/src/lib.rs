//! factline: an event store and event-driven messaging toolkit.
//!
//! This facade re-exports the public API behind features:
//!
//! - always: the event model, the [`EventStore`] contract and [`InMemoryStore`]
//!   (from `factline-core`);
//! - `domain` (default): [`domain`] — typed events, aggregates as deciders, repositories;
//! - `log` (default): [`log`] — the embedded durable engine, `log::LogStore`;
//! - `messaging` (default): [`messaging`] — messages with ack/nack, publishers and subscribers,
//!   the router and its middleware, the in-memory pub/sub, CQRS buses, the store as a source;
//! - `postgres` (opt-in): [`postgres`] — the PostgreSQL event store, `postgres::PostgresStore`,
//!   with appends inside your own transaction, inline projections and a checkpoint store;
//! - `nats` (opt-in): [`nats`] — the NATS JetStream publisher and subscriber,
//!   `nats::NatsPubSub`;
//! - `redis` (opt-in): [`redis`] — the Redis Streams publisher and subscriber,
//!   `redis::RedisPubSub`;
//! - `testkit`: [`testkit`] — the conformance suite for your own backend (and, with
//!   `messaging`, `messaging::testkit` for your own pub/sub adapter).
//!
//! The other broker adapters arrive as their own crates and features.

pub use factline_core::*;

#[cfg(feature = "domain")]
pub use factline_domain as domain;

#[cfg(feature = "log")]
pub use factline_log as log;

#[cfg(feature = "messaging")]
pub use factline_messaging as messaging;

#[cfg(feature = "postgres")]
pub use factline_postgres as postgres;

#[cfg(feature = "nats")]
pub use factline_nats as nats;

#[cfg(feature = "redis")]
pub use factline_redis as redis;
