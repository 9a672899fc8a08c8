//! JSON errors: `{"error": code, "message": text, ...details}` with the status the code implies.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use factline_core::{
    AppendError, DeleteError, EventsRejected, ExpectedVersion, InvalidEvent, Limit, LimitExceeded,
    MetadataError, ReadAllError, ReadStreamError, SnapshotError, StorageError, StreamState,
    SubscribeError, SubscriptionError,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The `error` field of every error response. Each code has one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// 400: the stream id breaks the naming rules (details: `reason`).
    InvalidStreamId,
    /// 400: the `Expected-Version` header is not `any`, `no-stream`, `exists` or a number.
    InvalidExpectedVersion,
    /// 400: the body is not the JSON the endpoint takes (details: `line`, `column`).
    InvalidJson,
    /// 400: an event breaks the event model's rules (empty type, nil or repeated id, …).
    InvalidEvent,
    /// 400: a query parameter is malformed.
    InvalidQuery,
    /// 400: stream metadata has a value it may not have (details: `field`).
    InvalidMetadata,
    /// 400: `Last-Event-ID` is not the position of an event of the subscribed stream.
    InvalidLastEventId,
    /// 400: one stream appears twice in one multi-stream append.
    DuplicateStream,
    /// 400 (a read over `read_count_max`) or 413 (an event or append too large): a store limit
    /// (details: `limit`, `max`, `actual`).
    LimitExceeded,
    /// 413: the request body is larger than the server's `body_bytes_max` (details: `max`).
    BodyTooLarge,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 401: no valid bearer token.
    Unauthorized,
    /// 403: the token does not grant this operation on this stream.
    Forbidden,
    /// 404: the stream has no visible events.
    StreamNotFound,
    /// 404: the stream has no snapshot.
    SnapshotNotFound,
    /// 404: no such route.
    NotFound,
    /// 405: the route does not take this method.
    MethodNotAllowed,
    /// 409: the stream is not at the expected version (details: `stream`, `expected`, `actual`).
    WrongExpectedVersion,
    /// 409: some event ids are stored already, but the request is not an exact retry.
    IdempotencyConflict,
    /// 410: the stream is tombstoned.
    StreamDeleted,
    /// 429: `subscribers_max` subscriptions are open already.
    TooManySubscribers,
    /// 503: the store refuses writes (a failed fsync or a full disk: details `state` =
    /// `failed`) or is closed (`state` = `closed`).
    StoreUnavailable,
    /// 400: a persistent subscription group name breaks the rules (1..=100 bytes, no control
    /// characters).
    InvalidGroupName,
    /// 400: a group setting is out of its range (details: `field`).
    InvalidGroupSettings,
    /// 404: no persistent subscription group of that name.
    GroupNotFound,
    /// 409: a group of that name exists already.
    GroupExists,
    /// 429: the group limit (groups per store, consumers per group) is reached (details:
    /// `limit`, `max`).
    TooManyGroupMembers,
    /// 500: a bug; the message says what failed.
    Internal,
}

impl ErrorCode {
    /// The HTTP status of this code (`LimitExceeded` is 413 or 400 depending on the limit).
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidStreamId
            | Self::InvalidExpectedVersion
            | Self::InvalidJson
            | Self::InvalidEvent
            | Self::InvalidQuery
            | Self::InvalidMetadata
            | Self::InvalidLastEventId
            | Self::DuplicateStream
            | Self::InvalidGroupName
            | Self::InvalidGroupSettings => StatusCode::BAD_REQUEST,
            Self::LimitExceeded | Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::StreamNotFound
            | Self::SnapshotNotFound
            | Self::NotFound
            | Self::GroupNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::WrongExpectedVersion | Self::IdempotencyConflict | Self::GroupExists => {
                StatusCode::CONFLICT
            }
            Self::StreamDeleted => StatusCode::GONE,
            Self::TooManySubscribers | Self::TooManyGroupMembers => StatusCode::TOO_MANY_REQUESTS,
            Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code as it appears in the `error` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidStreamId => "invalid_stream_id",
            Self::InvalidExpectedVersion => "invalid_expected_version",
            Self::InvalidJson => "invalid_json",
            Self::InvalidEvent => "invalid_event",
            Self::InvalidQuery => "invalid_query",
            Self::InvalidMetadata => "invalid_metadata",
            Self::InvalidLastEventId => "invalid_last_event_id",
            Self::DuplicateStream => "duplicate_stream",
            Self::LimitExceeded => "limit_exceeded",
            Self::BodyTooLarge => "body_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::StreamNotFound => "stream_not_found",
            Self::SnapshotNotFound => "snapshot_not_found",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::WrongExpectedVersion => "wrong_expected_version",
            Self::IdempotencyConflict => "idempotency_conflict",
            Self::StreamDeleted => "stream_deleted",
            Self::TooManySubscribers => "too_many_subscribers",
            Self::StoreUnavailable => "store_unavailable",
            Self::InvalidGroupName => "invalid_group_name",
            Self::InvalidGroupSettings => "invalid_group_settings",
            Self::GroupNotFound => "group_not_found",
            Self::GroupExists => "group_exists",
            Self::TooManyGroupMembers => "too_many_group_members",
            Self::Internal => "internal",
        }
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    /// What went wrong, as a stable code.
    pub(crate) error: ErrorCode,
    /// What went wrong, for people.
    pub(crate) message: String,
    /// Details that depend on the code (`expected`/`actual`, `limit`/`max`/`actual`, …).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub(crate) details: Map<String, Value>,
}

/// An error a handler returns; renders as [`ErrorBody`].
#[derive(Debug)]
pub(crate) struct ApiError {
    code: ErrorCode,
    status: StatusCode,
    message: String,
    details: Map<String, Value>,
}

impl ApiError {
    /// The error's code.
    pub(crate) fn code(&self) -> ErrorCode {
        self.code
    }

    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            status: code.status(),
            message: message.into(),
            details: Map::new(),
        }
    }

    pub(crate) fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// Overrides the code's usual status (`LimitExceeded` is 400 for request-shape limits).
    pub(crate) fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub(crate) fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.code,
            message: self.message.clone(),
            details: self.details.clone(),
        }
    }

    /// A stream id the rules refuse, with the reason.
    pub(crate) fn invalid_stream_id(error: &factline_core::StreamIdError) -> Self {
        Self::new(ErrorCode::InvalidStreamId, error.to_string()).with("reason", error.to_string())
    }

    pub(crate) fn limit(error: &LimitExceeded) -> Self {
        let mut api = Self::new(ErrorCode::LimitExceeded, error.to_string())
            .with("limit", error.limit.name())
            .with("max", error.max)
            .with("actual", error.actual);
        if matches!(error.limit, Limit::ReadCount | Limit::EventTypeBytes) {
            api.status = StatusCode::BAD_REQUEST;
        }
        api
    }

    pub(crate) fn storage(error: &StorageError) -> Self {
        match error {
            StorageError::Failed { .. } => {
                Self::new(ErrorCode::StoreUnavailable, error.to_string()).with("state", "failed")
            }
            StorageError::Closed => {
                Self::new(ErrorCode::StoreUnavailable, error.to_string()).with("state", "closed")
            }
            other => {
                tracing::error!(error = %other, "storage error");
                Self::new(ErrorCode::Internal, other.to_string())
            }
        }
    }

    fn wrong_expected_version(
        stream: &str,
        expected: ExpectedVersion,
        actual: StreamState,
        message: String,
    ) -> Self {
        Self::new(ErrorCode::WrongExpectedVersion, message)
            .with("stream", stream)
            .with("expected", expected_json(expected))
            .with("actual", state_json(actual))
    }

    /// `invalid_event` with `reason` (`empty_type`, `control_character_in_type`, `duplicate_id`,
    /// `nil_id`) and `index`, plus `byte_offset` or `id` where the reason has one.
    fn invalid_event(invalid: &InvalidEvent, message: String) -> Self {
        let api = Self::new(ErrorCode::InvalidEvent, message);
        match invalid {
            InvalidEvent::EmptyType { index } => {
                api.with("reason", "empty_type").with("index", *index)
            }
            InvalidEvent::ControlCharacterInType { index, byte_offset } => api
                .with("reason", "control_character_in_type")
                .with("index", *index)
                .with("byte_offset", *byte_offset),
            InvalidEvent::DuplicateId { index, id } => api
                .with("reason", "duplicate_id")
                .with("index", *index)
                .with("id", id.to_string()),
            InvalidEvent::NilId { index } => api.with("reason", "nil_id").with("index", *index),
            _ => api,
        }
    }

    pub(crate) fn from_serde(error: &serde_json::Error) -> Self {
        tracing::error!(%error, "cannot encode a response");
        Self::new(
            ErrorCode::Internal,
            format!("cannot encode the response: {error}"),
        )
    }

    fn unexpected(error: &dyn std::error::Error) -> Self {
        tracing::error!(error = %error, "unexpected store error");
        Self::new(ErrorCode::Internal, error.to_string())
    }
}

/// `Exact(n)` as the number n, the others as their header spelling.
pub(crate) fn expected_json(expected: ExpectedVersion) -> Value {
    match expected {
        ExpectedVersion::Exact(revision) => json!(revision.value()),
        other => json!(other.to_string()),
    }
}

/// `At(n)` as the number n, `NoStream` as `"no-stream"`.
pub(crate) fn state_json(state: StreamState) -> Value {
    match state {
        StreamState::At(revision) => json!(revision.value()),
        StreamState::NoStream => json!("no-stream"),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::metrics::error_returned(self.code);
        let unauthorized = self.code == ErrorCode::Unauthorized;
        let status = self.status;
        let mut response = (status, axum::Json(self.body())).into_response();
        if unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"factline\""),
            );
        }
        response
    }
}

impl From<AppendError> for ApiError {
    fn from(error: AppendError) -> Self {
        let message = error.to_string();
        match error {
            AppendError::WrongExpectedVersion {
                stream,
                expected,
                actual,
            } => Self::wrong_expected_version(stream.as_str(), expected, actual, message),
            AppendError::IdempotencyConflict { stream, event_id } => {
                Self::new(ErrorCode::IdempotencyConflict, message)
                    .with("stream", stream.as_str())
                    .with("event_id", event_id.to_string())
            }
            AppendError::StreamDeleted { stream } => {
                Self::new(ErrorCode::StreamDeleted, message).with("stream", stream.as_str())
            }
            AppendError::Rejected(EventsRejected::LimitExceeded(limit)) => Self::limit(&limit),
            AppendError::Rejected(EventsRejected::Invalid(invalid)) => {
                Self::invalid_event(&invalid, message)
            }
            AppendError::Rejected(EventsRejected::Empty) => {
                Self::new(ErrorCode::InvalidEvent, message).with("reason", "empty")
            }
            AppendError::Rejected(_) => Self::new(ErrorCode::InvalidEvent, message),
            AppendError::DuplicateStream { stream } => {
                Self::new(ErrorCode::DuplicateStream, message).with("stream", stream.as_str())
            }
            AppendError::Storage(storage) => Self::storage(&storage),
            other => Self::unexpected(&other),
        }
    }
}

impl From<ReadStreamError> for ApiError {
    fn from(error: ReadStreamError) -> Self {
        let message = error.to_string();
        match error {
            ReadStreamError::NotFound { stream } => {
                Self::new(ErrorCode::StreamNotFound, message).with("stream", stream.as_str())
            }
            ReadStreamError::Deleted { stream } => {
                Self::new(ErrorCode::StreamDeleted, message).with("stream", stream.as_str())
            }
            ReadStreamError::LimitExceeded(limit) => Self::limit(&limit),
            ReadStreamError::Storage(storage) => Self::storage(&storage),
            other => Self::unexpected(&other),
        }
    }
}

impl From<ReadAllError> for ApiError {
    fn from(error: ReadAllError) -> Self {
        match error {
            ReadAllError::LimitExceeded(limit) => Self::limit(&limit),
            ReadAllError::Storage(storage) => Self::storage(&storage),
            other => Self::unexpected(&other),
        }
    }
}

impl From<SubscribeError> for ApiError {
    fn from(error: SubscribeError) -> Self {
        let message = error.to_string();
        match error {
            SubscribeError::Deleted { stream } => {
                Self::new(ErrorCode::StreamDeleted, message).with("stream", stream.as_str())
            }
            SubscribeError::Storage(storage) => Self::storage(&storage),
            other => Self::unexpected(&other),
        }
    }
}

impl From<SubscriptionError> for ApiError {
    fn from(error: SubscriptionError) -> Self {
        let message = error.to_string();
        match error {
            SubscriptionError::Deleted { stream } => {
                Self::new(ErrorCode::StreamDeleted, message).with("stream", stream.as_str())
            }
            SubscriptionError::Storage(storage) => Self::storage(&storage),
            other => Self::unexpected(&other),
        }
    }
}

impl From<MetadataError> for ApiError {
    fn from(error: MetadataError) -> Self {
        let message = error.to_string();
        match error {
            MetadataError::Deleted { stream } => {
                Self::new(ErrorCode::StreamDeleted, message).with("stream", stream.as_str())
            }
            MetadataError::Invalid { field, .. } => {
                Self::new(ErrorCode::InvalidMetadata, message).with("field", field)
            }
            MetadataError::Storage(storage) => Self::storage(&storage),
            other => Self::unexpected(&other),
        }
    }
}

impl From<DeleteError> for ApiError {
    fn from(error: DeleteError) -> Self {
        let message = error.to_string();
        match error {
            DeleteError::WrongExpectedVersion {
                stream,
                expected,
                actual,
            } => Self::wrong_expected_version(stream.as_str(), expected, actual, message),
            DeleteError::NotFound { stream } => {
                Self::new(ErrorCode::StreamNotFound, message).with("stream", stream.as_str())
            }
            DeleteError::Deleted { stream } => {
                Self::new(ErrorCode::StreamDeleted, message).with("stream", stream.as_str())
            }
            DeleteError::Storage(storage) => Self::storage(&storage),
            other => Self::unexpected(&other),
        }
    }
}

impl From<SnapshotError> for ApiError {
    fn from(error: SnapshotError) -> Self {
        let message = error.to_string();
        match error {
            SnapshotError::LimitExceeded(limit) => Self::limit(&limit),
            SnapshotError::Deleted { stream } => {
                Self::new(ErrorCode::StreamDeleted, message).with("stream", stream.as_str())
            }
            SnapshotError::Storage(storage) => Self::storage(&storage),
            other => Self::unexpected(&other),
        }
    }
}
