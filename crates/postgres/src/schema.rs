//! The database schema: its name, its versioned migrations and the runner that applies them.
//!
//! Every object lives in one PostgreSQL schema (default `factline`), so that several stores,
//! or the tests, can share a database without seeing each other. Every statement names its
//! tables with the schema (never through `search_path`), because appends also run on the
//! caller's own connection, whose `search_path` is the caller's business.
//!
//! Migrations are plain SQL with `{schema}` standing for the quoted schema name. They are
//! applied in version order, each in its own transaction, under an advisory lock so that
//! several processes starting at once apply each migration exactly once. The applied versions
//! are recorded with a checksum of their text; a recorded migration whose text has changed, or
//! a version this build does not know (a database migrated by a newer factline), refuses to
//! open instead of guessing.

use sqlx::{AssertSqlSafe, Connection as _, PgConnection, Row as _};

use crate::error::MigrateError;

/// Longest schema name accepted (PostgreSQL identifiers have at most 63 bytes, and the
/// notification channel `factline_{schema}` must fit too).
pub const SCHEMA_NAME_BYTES_MAX: usize = 54;

/// A validated schema name: 1..=54 bytes of `a-z`, `0-9` and `_`, not starting with a digit
/// and not starting with `pg_`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

/// Why a schema name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaNameError {
    /// Empty, or longer than [`SCHEMA_NAME_BYTES_MAX`].
    #[error("schema name {name:?} must have 1..={max} bytes")]
    Length {
        /// The name given.
        name: String,
        /// The limit.
        max: usize,
    },
    /// A character outside `a-z0-9_`, a leading digit or the reserved `pg_` prefix.
    #[error("schema name {name:?} may only hold a-z, 0-9 and _, may not start with a digit or pg_")]
    Characters {
        /// The name given.
        name: String,
    },
}

impl SchemaName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, SchemaNameError> {
        let name = name.into();
        if name.is_empty() || name.len() > SCHEMA_NAME_BYTES_MAX {
            return Err(SchemaNameError::Length {
                name,
                max: SCHEMA_NAME_BYTES_MAX,
            });
        }
        let valid = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit()
            && !name.starts_with("pg_");
        if !valid {
            return Err(SchemaNameError::Characters { name });
        }
        Ok(Self(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name quoted as an SQL identifier.
    pub fn quoted(&self) -> String {
        // The character set excludes `"`, so quoting cannot be escaped out of.
        format!("\"{}\"", self.0)
    }

    /// The LISTEN/NOTIFY channel of the store in this schema.
    pub fn channel(&self) -> String {
        format!("factline_{}", self.0)
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        Self("factline".to_owned())
    }
}

impl std::fmt::Display for SchemaName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One versioned change of the schema.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Applied in increasing order; never reused.
    pub version: i64,
    /// What it does, for `factline migrate` and the migrations table.
    pub description: &'static str,
    sql: &'static str,
}

impl Migration {
    /// The SQL with the schema name filled in.
    pub fn sql(&self, schema: &SchemaName) -> String {
        self.sql.replace("{schema}", &schema.quoted())
    }

    /// A checksum of the migration's text (FNV-1a, 64 bits), recorded when it is applied.
    pub fn checksum(&self) -> i64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.sql.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        i64::from_ne_bytes(hash.to_ne_bytes())
    }
}

/// Every migration this build knows, in version order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "log head, streams, events, snapshots, checkpoints",
        sql: r#"
-- The single row that orders every append. A writer locks it before it numbers its events and
-- keeps the lock until it commits, so positions are handed out in commit order and without gaps
-- (see docs/design/postgres.md). `generation` grows with every change to the log or to a
-- stream's head, metadata or tombstone: a writer that finds it unchanged since its own last
-- commit knows its cached stream heads are still exact.
CREATE TABLE {schema}.log_head (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    next_position    bigint NOT NULL CHECK (next_position >= 0),
    generation       bigint NOT NULL,
    last_recorded_at timestamptz NOT NULL
);
INSERT INTO {schema}.log_head (singleton, next_position, generation, last_recorded_at)
VALUES (true, 0, 0, 'epoch');

-- One row per stream that was ever written, given metadata, or tombstoned.
CREATE TABLE {schema}.streams (
    stream           text PRIMARY KEY,
    last_revision    bigint CHECK (last_revision >= 0),
    last_recorded_at timestamptz,
    max_count        bigint CHECK (max_count >= 1),
    max_age_us       bigint CHECK (max_age_us >= 1),
    truncate_before  bigint CHECK (truncate_before >= 0),
    tombstoned       boolean NOT NULL DEFAULT false
);

-- The log. `position` is gapless and commit-ordered; `category` is the part of the stream id
-- before the first '-'. `data` is byte for byte what was appended (JSON or binary, see
-- content_type: 0 = application/json, 1 = application/octet-stream); `metadata` is a JSON
-- object of strings, NULL when empty.
CREATE TABLE {schema}.events (
    position     bigint PRIMARY KEY CHECK (position >= 0),
    stream       text NOT NULL,
    revision     bigint NOT NULL CHECK (revision >= 0),
    id           uuid NOT NULL,
    event_type   text NOT NULL,
    category     text NOT NULL,
    content_type smallint NOT NULL,
    data         bytea NOT NULL,
    metadata     bytea,
    recorded_at  timestamptz NOT NULL
);
CREATE UNIQUE INDEX events_stream_revision ON {schema}.events (stream, revision);
CREATE INDEX events_id ON {schema}.events (id);
CREATE INDEX events_category_position ON {schema}.events (category, position);

CREATE TABLE {schema}.snapshots (
    stream        text PRIMARY KEY,
    revision      bigint NOT NULL CHECK (revision >= 0),
    state_version integer NOT NULL,
    state         bytea NOT NULL,
    taken_at      timestamptz NOT NULL
);

-- Where each named projection or subscriber has got to: the position of the last event it
-- processed. Saved in the same transaction as a read model, it makes the pair exactly-once.
CREATE TABLE {schema}.checkpoints (
    name       text PRIMARY KEY,
    position   bigint NOT NULL CHECK (position >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
"#,
    },
    Migration {
        version: 2,
        description: "stream heads from the events index: streams keeps metadata and tombstones",
        sql: r#"
-- A stream's head (its last revision and that event's recorded time) is read from the
-- (stream, revision) index of events, which every append writes anyway, instead of being
-- upserted into streams by every append. streams now has a row per stream given metadata,
-- soft-deleted, tombstoned or snapshotted. Events are never deleted, so nothing is lost.
ALTER TABLE {schema}.streams DROP COLUMN last_revision, DROP COLUMN last_recorded_at;
"#,
    },
    Migration {
        version: 3,
        description: "narrower event rows: no category column, fixed-width columns first",
        sql: r#"
-- Every byte of an event row is read again by every scan of $all. The table is rewritten with
-- the fixed-width columns first (no alignment padding between them and the variable-width ones)
-- and without `category`, which is derived from `stream`: category reads use an index on the
-- same expression instead (`split_part(stream, '-', 1)` is the part before the first '-', or
-- the whole id, as `factline_core::category_of`). Rows are copied in position order; the
-- names, types and meaning of the other columns do not change. A view or trigger on `events`
-- makes the DROP fail, and the migration with it, in its transaction: nothing is lost.
CREATE TABLE {schema}.events_v3 (
    position     bigint NOT NULL CHECK (position >= 0),
    revision     bigint NOT NULL CHECK (revision >= 0),
    recorded_at  timestamptz NOT NULL,
    id           uuid NOT NULL,
    content_type smallint NOT NULL,
    stream       text NOT NULL,
    event_type   text NOT NULL,
    data         bytea NOT NULL,
    metadata     bytea
);
INSERT INTO {schema}.events_v3
    (position, revision, recorded_at, id, content_type, stream, event_type, data, metadata)
SELECT position, revision, recorded_at, id, content_type, stream, event_type, data, metadata
FROM {schema}.events ORDER BY position;
DROP TABLE {schema}.events;
ALTER TABLE {schema}.events_v3 RENAME TO events;
ALTER TABLE {schema}.events ADD CONSTRAINT events_pkey PRIMARY KEY (position);
CREATE UNIQUE INDEX events_stream_revision ON {schema}.events (stream, revision);
CREATE INDEX events_id ON {schema}.events (id);
CREATE INDEX events_category_position ON {schema}.events (split_part(stream, '-', 1), position);
"#,
    },
];

/// The highest version this build knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// A migration as recorded in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    /// Its version.
    pub version: i64,
    /// Its description when it was applied.
    pub description: String,
    /// True when it was applied by this call (false: it was already there).
    pub applied_now: bool,
}

fn advisory_key(schema: &SchemaName) -> i64 {
    // A fixed prefix keeps the key apart from other users of advisory locks.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"factline-migrate:"
        .iter()
        .chain(schema.as_str().as_bytes())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// The migrations recorded in `schema`, in version order (empty when none was ever applied).
pub async fn applied(
    conn: &mut PgConnection,
    schema: &SchemaName,
) -> Result<Vec<(i64, String, i64)>, MigrateError> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'migrations')",
    )
    .bind(schema.as_str())
    .fetch_one(&mut *conn)
    .await?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT version, description, checksum FROM {}.migrations ORDER BY version",
        schema.quoted()
    )))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
        .collect()
}

/// Creates the schema if needed and applies every migration not yet recorded. Safe to run
/// from several processes at once.
pub async fn migrate(
    conn: &mut PgConnection,
    schema: &SchemaName,
) -> Result<Vec<AppliedMigration>, MigrateError> {
    migrate_up_to(conn, schema, latest_version()).await
}

/// [`migrate`], applying only the migrations up to and including `version` (the ones after it
/// are neither applied nor listed). For staged upgrades and for tests that build an older
/// schema; a database already past `version` is left as it is.
pub async fn migrate_up_to(
    conn: &mut PgConnection,
    schema: &SchemaName,
    version: i64,
) -> Result<Vec<AppliedMigration>, MigrateError> {
    let key = advisory_key(schema);
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    let outcome = migrate_locked(conn, schema, version).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *conn)
        .await;
    let applied = outcome?;
    unlocked?;
    Ok(applied)
}

async fn migrate_locked(
    conn: &mut PgConnection,
    schema: &SchemaName,
    version_max: i64,
) -> Result<Vec<AppliedMigration>, MigrateError> {
    let quoted = schema.quoted();
    sqlx::query(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {quoted}"
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {quoted}.migrations (
             version     bigint PRIMARY KEY,
             description text NOT NULL,
             checksum    bigint NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now()
         )"
    )))
    .execute(&mut *conn)
    .await?;
    let recorded = applied(conn, schema).await?;
    for (version, _, checksum) in &recorded {
        match MIGRATIONS.iter().find(|m| m.version == *version) {
            None => {
                return Err(MigrateError::UnknownVersion {
                    schema: schema.as_str().to_owned(),
                    version: *version,
                    latest_known: latest_version(),
                });
            }
            Some(migration) if migration.checksum() != *checksum => {
                return Err(MigrateError::ChecksumMismatch {
                    schema: schema.as_str().to_owned(),
                    version: *version,
                });
            }
            Some(_) => {}
        }
    }
    let mut out = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| m.version <= version_max) {
        if let Some((_, description, _)) = recorded.iter().find(|(v, _, _)| *v == migration.version)
        {
            out.push(AppliedMigration {
                version: migration.version,
                description: description.clone(),
                applied_now: false,
            });
            continue;
        }
        let mut tx = conn.begin().await?;
        sqlx::raw_sql(AssertSqlSafe(migration.sql(schema)))
            .execute(&mut *tx)
            .await
            .map_err(|source| MigrateError::Failed {
                version: migration.version,
                source,
            })?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {quoted}.migrations (version, description, checksum) VALUES ($1, $2, $3)"
        )))
        .bind(migration.version)
        .bind(migration.description)
        .bind(migration.checksum())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(
            schema = schema.as_str(),
            version = migration.version,
            description = migration.description,
            "migration applied"
        );
        out.push(AppliedMigration {
            version: migration.version,
            description: migration.description.to_owned(),
            applied_now: true,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_checked() {
        assert!(SchemaName::new("factline").is_ok());
        assert!(SchemaName::new("t_1").is_ok());
        assert!(SchemaName::new("_x").is_ok());
        for bad in ["", "1abc", "Upper", "a-b", "a\"b", "pg_catalog", "a b"] {
            assert!(SchemaName::new(bad).is_err(), "{bad:?}");
        }
        assert!(SchemaName::new("a".repeat(SCHEMA_NAME_BYTES_MAX)).is_ok());
        assert!(matches!(
            SchemaName::new("a".repeat(SCHEMA_NAME_BYTES_MAX + 1)),
            Err(SchemaNameError::Length { max: 54, .. })
        ));
        assert_eq!(SchemaName::default().channel(), "factline_factline");
    }

    #[test]
    fn migrations_are_ordered_and_fill_in_the_schema() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        let sql = MIGRATIONS[0].sql(&SchemaName::new("s1").unwrap());
        assert!(sql.contains("CREATE TABLE \"s1\".events"));
        assert!(!sql.contains("{schema}"));
        assert_ne!(MIGRATIONS[0].checksum(), 0);
    }
}
