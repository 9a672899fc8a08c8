//! factline's SQL transport: pub/sub on database tables — [`postgres`], [`mysql`] (MariaDB) and
//! [`sqlite`] — the outbox (stage messages in the application's own transaction, forward them
//! with `run_forwarder`, one active forwarder at a time) and a persistent store for the
//! deduplication middleware on each backend ([`DedupConfig`]). Every backend shares one subscriber ([`SqlSubscriber`]) and passes
//! the shared conformance suite.
//!
//! [`postgres`] keeps the pub/sub contract of `docs/specs/pubsub-adapter.md`
//! (`docs/design/sql-pubsub.md` has the design and its proof obligations):
//!
//! - A topic is a table of its own, `{schema}.t_{readable}_{hash}` ([`table_for_topic`]),
//!   registered in `{schema}.fl_topics`; a row is one message (its id, payload and metadata
//!   as JSON), numbered by an identity column and stamped with its transaction's id.
//! - **No row is ever skipped**, however transactions commit: a group reads rows in
//!   `(transaction id, offset)` order and only those of transactions older than the oldest
//!   one still running (a snapshot's `xmin`), so a row that commits late can never land behind
//!   the group's frontier.
//! - A consumer group's frontier is a row of `{schema}.fl_groups`; the rows its members hold
//!   are rows of `{schema}.fl_deliveries` until acked. A nack frees only its own row (for any
//!   member, once its delay has passed): **it never blocks the group**. Claims are leased and
//!   renewed while the subscription lives; a member that died loses its rows to the others
//!   after [`postgres::PgPubSubConfig::claim_lease`].
//! - Publishing is one statement, which `NOTIFY`s the schema's channel: subscribers wake at
//!   once, and look on their own every [`postgres::PgPubSubConfig::poll_interval`].
//! - [`postgres::PgPublisher::publish_in`] publishes inside the caller's transaction: state
//!   changes and messages commit together (the outbox is built on it: [`postgres::PgOutbox`]).
//!
//! [`mysql`] and [`sqlite`] keep the same tables and guarantees; they differ in how late commits
//! are kept from being skipped (offsets taken under a per-topic lock held to commit on MariaDB;
//! SQLite's single writer) and wake up by polling plus in-process notifications.

mod dedup;
mod engine;
mod forwarding;
pub mod mysql;
mod names;
pub mod postgres;
pub mod sqlite;

pub use dedup::DedupConfig;
pub use engine::SqlSubscriber;
pub use forwarding::RunForwarderError;
pub use names::{InvalidSchemaName, SCHEMA_NAME_BYTES_MAX, check_schema_name, table_for_topic};
pub use sqlx;
