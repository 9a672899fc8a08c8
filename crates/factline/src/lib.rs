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
//! - `mqtt` (opt-in): [`mqtt`] — the MQTT 5 publisher and subscriber (QoS 1, persistent
//!   sessions, PUBACK after the application acked), `mqtt::MqttPubSub`;
//! - `sql` (opt-in): [`sql`] — pub/sub on PostgreSQL tables (`sql::postgres::PgPubSub`),
//!   publishing inside your own transaction, the outbox and a persistent deduplication store;
//! - `rabbitmq` (opt-in): [`rabbitmq`] — the RabbitMQ (AMQP 0-9-1) publisher and subscriber,
//!   `rabbitmq::RabbitPubSub`;
//! - `kafka` (opt-in): [`kafka`] — the Kafka publisher and subscriber (consumer groups with
//!   offsets committed only after acks, keyed partitioning), `kafka::KafkaPubSub`;
//! - `testkit`: [`testkit`] — the conformance suite for your own backend (and, with
//!   `messaging`, `messaging::testkit` for your own pub/sub adapter).
//!

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

#[cfg(feature = "mqtt")]
pub use factline_mqtt as mqtt;

#[cfg(feature = "sql")]
pub use factline_sql as sql;

#[cfg(feature = "rabbitmq")]
pub use factline_rabbitmq as rabbitmq;

#[cfg(feature = "kafka")]
pub use factline_kafka as kafka;
