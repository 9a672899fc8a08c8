//! Typed errors, one per operation. Every enum is `#[non_exhaustive]`.

use uuid::Uuid;

use crate::{EventsRejected, ExpectedVersion, LimitExceeded, StreamId, StreamState};

/// A failure of the storage itself, shared by every operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An earlier write failed durably (e.g. fsync); the store refuses writes until reopened.
    #[error("the store has failed and refuses writes until it is reopened: {reason}")]
    Failed {
        /// What failed first.
        reason: String,
    },
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
    /// The backend reported an error.
    #[error("storage backend error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StorageError {
    /// Wraps any backend error.
    pub fn backend(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Backend(Box::new(error))
    }
}

/// Why an `append` or `append_multi` wrote nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The stream was not at the expected version.
    #[error("wrong expected version on stream {stream}: expected {expected}, actual {actual}")]
    WrongExpectedVersion {
        /// The stream that failed the check.
        stream: StreamId,
        /// What the request expected.
        expected: ExpectedVersion,
        /// What the stream was.
        actual: StreamState,
    },
    /// Some of the request's event ids are already in the stream, but the request is not an exact
    /// retry of an earlier append (a partial overlap). Writing would duplicate events.
    #[error(
        "event {event_id} is already in stream {stream}, but the request is not an exact retry of the append that wrote it"
    )]
    IdempotencyConflict {
        /// The stream.
        stream: StreamId,
        /// An id of the request that is already stored.
        event_id: Uuid,
    },
    /// The stream is tombstoned and can never be written again.
    #[error("stream {stream} is deleted (tombstoned) and can never be written again")]
    StreamDeleted {
        /// The stream.
        stream: StreamId,
    },
    /// The request is malformed or over a limit.
    #[error("append refused: {0}")]
    Rejected(#[from] EventsRejected),
    /// The same stream appears twice in one `append_multi`.
    #[error("stream {stream} appears more than once in one append_multi")]
    DuplicateStream {
        /// The repeated stream.
        stream: StreamId,
    },
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<LimitExceeded> for AppendError {
    fn from(error: LimitExceeded) -> Self {
        Self::Rejected(EventsRejected::LimitExceeded(error))
    }
}

/// Why a stream read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadStreamError {
    /// The stream has no visible events: never written, soft-deleted, or fully truncated.
    #[error("stream {stream} not found")]
    NotFound {
        /// The stream.
        stream: StreamId,
    },
    /// The stream is tombstoned.
    #[error("stream {stream} is deleted (tombstoned)")]
    Deleted {
        /// The stream.
        stream: StreamId,
    },
    /// The read asked for more than `read_count_max`.
    #[error(transparent)]
    LimitExceeded(#[from] LimitExceeded),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a `$all` read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadAllError {
    /// The read asked for more than `read_count_max`.
    #[error(transparent)]
    LimitExceeded(#[from] LimitExceeded),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a subscription could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The stream is tombstoned.
    #[error("stream {stream} is deleted (tombstoned)")]
    Deleted {
        /// The stream.
        stream: StreamId,
    },
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a running subscription ended. A subscription yields at most one error, then ends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscriptionError {
    /// The subscribed stream was tombstoned.
    #[error("stream {stream} was deleted (tombstoned)")]
    Deleted {
        /// The stream.
        stream: StreamId,
    },
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why reading or writing stream metadata failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// The stream is tombstoned.
    #[error("stream {stream} is deleted (tombstoned)")]
    Deleted {
        /// The stream.
        stream: StreamId,
    },
    /// A field has a value it may not have.
    #[error("invalid stream metadata: {field} {reason}")]
    Invalid {
        /// The field's name.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a delete did nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeleteError {
    /// The stream was not at the expected version.
    #[error("wrong expected version on stream {stream}: expected {expected}, actual {actual}")]
    WrongExpectedVersion {
        /// The stream.
        stream: StreamId,
        /// What the request expected.
        expected: ExpectedVersion,
        /// What the stream was.
        actual: StreamState,
    },
    /// A soft delete of a stream that was never written.
    #[error("stream {stream} not found")]
    NotFound {
        /// The stream.
        stream: StreamId,
    },
    /// The stream is already tombstoned.
    #[error("stream {stream} is already deleted (tombstoned)")]
    Deleted {
        /// The stream.
        stream: StreamId,
    },
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a snapshot operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The snapshot is larger than `event_size_bytes_max`.
    #[error(transparent)]
    LimitExceeded(#[from] LimitExceeded),
    /// The stream is tombstoned.
    #[error("stream {stream} is deleted (tombstoned)")]
    Deleted {
        /// The stream.
        stream: StreamId,
    },
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}
