//! Errors of the operations this crate adds to the [`EventStore`](factline_core::EventStore)
//! contract. The contract's own operations return the core error types; an SQL failure reaches
//! the caller as [`StorageError::Backend`] wrapping a [`DatabaseError`], never as a bare
//! `sqlx::Error`.

use factline_core::StorageError;

use crate::schema::SchemaNameError;

/// An SQL or connection failure, with what the store was doing when it happened.
#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL failed while {doing}: {source}")]
pub struct DatabaseError {
    /// What the store was doing.
    pub doing: &'static str,
    /// The driver's error.
    #[source]
    pub source: sqlx::Error,
}

impl DatabaseError {
    /// True for a serialization failure or deadlock (SQLSTATE 40001 / 40P01): the transaction
    /// can be retried as a whole.
    pub fn is_retryable(&self) -> bool {
        matches!(&self.source, sqlx::Error::Database(db)
            if matches!(db.code().as_deref(), Some("40001" | "40P01")))
    }
}

/// Wraps a driver error as the contract's storage error.
pub(crate) fn storage(doing: &'static str) -> impl FnOnce(sqlx::Error) -> StorageError {
    move |source| match source {
        sqlx::Error::PoolClosed => StorageError::Closed,
        source => StorageError::backend(DatabaseError { doing, source }),
    }
}

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The database records a migration this build does not know: it was migrated by a newer
    /// factline. Upgrade factline; nothing was changed.
    #[error(
        "schema {schema} has migration {version} applied, but this build knows only up to {latest_known}: it was migrated by a newer factline"
    )]
    UnknownVersion {
        /// The schema.
        schema: String,
        /// The unknown version.
        version: i64,
        /// The highest version this build knows.
        latest_known: i64,
    },
    /// A recorded migration's text differs from this build's: the schema cannot be trusted to
    /// match. Nothing was changed.
    #[error(
        "schema {schema}: migration {version} was applied with different SQL than this build's"
    )]
    ChecksumMismatch {
        /// The schema.
        schema: String,
        /// The migration.
        version: i64,
    },
    /// A migration's SQL failed; its transaction was rolled back.
    #[error("migration {version} failed: {source}")]
    Failed {
        /// The migration.
        version: i64,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Talking to the database failed.
    #[error("PostgreSQL failed while migrating: {0}")]
    Database(#[from] sqlx::Error),
}

/// Why [`PostgresStore::open`](crate::PostgresStore::open) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The connection URL could not be parsed.
    #[error("invalid PostgreSQL URL {url}: {source}")]
    InvalidUrl {
        /// The URL, password hidden.
        url: String,
        /// The parser's error.
        #[source]
        source: sqlx::Error,
    },
    /// The schema name is not acceptable.
    #[error(transparent)]
    SchemaName(#[from] SchemaNameError),
    /// The server could not be reached in time.
    #[error("PostgreSQL at {url} is unreachable: {source}")]
    Unreachable {
        /// The URL, password hidden.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The schema is not migrated and `migrate_on_open` is off.
    #[error(
        "schema {schema} is at migration {current}, this build needs {required}: run `factline migrate` or open with migrate_on_open"
    )]
    NotMigrated {
        /// The schema.
        schema: String,
        /// The latest applied version (0: none).
        current: i64,
        /// The version this build needs.
        required: i64,
    },
    /// Migrating failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// A query while opening failed.
    #[error(transparent)]
    Database(#[from] DatabaseError),
}

/// Hides the password of a connection URL for messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact_url("postgres://me:secret@db:5432/x"),
            "postgres://me:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
