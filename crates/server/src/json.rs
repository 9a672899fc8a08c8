//! The JSON shapes of the API and their conversions to and from the core types.

use std::collections::BTreeMap;

use base64::Engine as _;
use factline_core::{
    AppendResult, ContentType, EventData, Metadata, RecordedEvent, StreamMetadata, Uuid,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorCode};

/// An event to append.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewEvent {
    /// The event id, the key of idempotent retries. A UUIDv7 is assigned when absent.
    #[serde(default)]
    pub(crate) id: Option<Uuid>,
    /// The event type, a past-tense name such as `OrderPlaced`.
    #[serde(rename = "type")]
    #[schema(min_length = 1, max_length = 255)]
    pub(crate) event_type: String,
    /// The payload: any JSON value, stored byte for byte as sent. Give `data` or `data_base64`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub(crate) data: Option<Box<RawValue>>,
    /// A binary payload, base64 (standard alphabet, padded). Give `data` or `data_base64`.
    #[serde(default)]
    pub(crate) data_base64: Option<String>,
    /// String metadata; well-known keys are `correlation_id`, `causation_id`, `schema_version`.
    #[serde(default)]
    pub(crate) metadata: Option<BTreeMap<String, String>>,
}

impl NewEvent {
    pub(crate) fn into_event_data(self, index: usize) -> Result<EventData, ApiError> {
        let mut event = match (self.data, self.data_base64) {
            (Some(data), None) => EventData {
                id: Uuid::nil(),
                event_type: self.event_type.into(),
                content_type: ContentType::Json,
                data: bytes::Bytes::from(String::from(Box::<str>::from(data))),
                metadata: Metadata::new(),
            },
            (None, Some(encoded)) => {
                let data = base64::engine::general_purpose::STANDARD
                    .decode(encoded.as_bytes())
                    .map_err(|error| {
                        ApiError::new(
                            ErrorCode::InvalidEvent,
                            format!("event {index}: data_base64 is not base64: {error}"),
                        )
                        .with("index", index)
                    })?;
                EventData::binary(self.event_type, data)
            }
            (Some(_), Some(_)) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidEvent,
                    format!("event {index}: give either data or data_base64, not both"),
                )
                .with("index", index));
            }
            (None, None) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidEvent,
                    format!("event {index}: data is missing (give data or data_base64)"),
                )
                .with("index", index));
            }
        };
        event.id = self.id.unwrap_or_else(Uuid::now_v7);
        if let Some(metadata) = self.metadata {
            let mut all = Metadata::new();
            for (key, value) in metadata {
                all.insert(key, value);
            }
            event.metadata = all;
        }
        Ok(event)
    }
}

/// `Some` for any value that is present, `null` included (absence is the `default`, `None`).
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(deserializer).map(Some)
}

/// A body of one event or an array of events.
pub(crate) fn parse_events(body: &[u8]) -> Result<Vec<NewEvent>, ApiError> {
    let first = body.iter().find(|byte| !byte.is_ascii_whitespace());
    match first {
        Some(b'{') => parse_json::<NewEvent>(body).map(|event| vec![event]),
        _ => parse_json::<Vec<NewEvent>>(body),
    }
}

/// Parses a JSON body, naming line and column of the first problem.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        ApiError::new(
            ErrorCode::InvalidJson,
            format!("the body is not valid for this endpoint: {error}"),
        )
        .with("line", error.line())
        .with("column", error.column())
    })
}

/// What an append answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct AppendResponse {
    /// Revision of the last event written; send it as `Expected-Version` next time.
    pub(crate) next_expected_version: u64,
    /// Position of the last event written in `$all`.
    pub(crate) position: u64,
    /// When the events were recorded (RFC 3339, UTC, microseconds).
    pub(crate) recorded_at: String,
}

impl From<AppendResult> for AppendResponse {
    fn from(result: AppendResult) -> Self {
        Self {
            next_expected_version: result.next_expected_version.value(),
            position: result.position.value(),
            recorded_at: result.recorded_at.to_rfc3339(),
        }
    }
}

/// One stream's part of a multi-stream append.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamAppend {
    /// The stream.
    pub(crate) stream: String,
    /// `any` (default), `no-stream`, `exists` or a revision number.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "no-stream")]
    pub(crate) expected_version: Option<serde_json::Value>,
    /// The events, in order.
    pub(crate) events: Vec<NewEvent>,
}

/// A multi-stream append: every stream's check passes and everything is written, or nothing.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MultiAppend {
    /// The streams, each with its condition and events.
    pub(crate) streams: Vec<StreamAppend>,
}

/// What a multi-stream append answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct MultiAppendResponse {
    /// One result per stream, in request order.
    pub(crate) results: Vec<StreamAppendResult>,
}

/// One stream's result in a multi-stream append.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct StreamAppendResult {
    /// The stream.
    pub(crate) stream: String,
    /// Revision of its last event written.
    pub(crate) next_expected_version: u64,
    /// Position of its last event written.
    pub(crate) position: u64,
}

/// A recorded event.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct EventJson {
    /// The event id.
    pub(crate) id: Uuid,
    /// The stream.
    pub(crate) stream: String,
    /// The event type.
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    /// Its 0-based index in the stream.
    pub(crate) revision: u64,
    /// Its place in `$all`.
    pub(crate) position: u64,
    /// When it was recorded (RFC 3339, UTC, microseconds).
    pub(crate) recorded_at: String,
    /// `application/json` or `application/octet-stream`.
    pub(crate) content_type: String,
    /// The JSON payload as appended (null for a binary payload, see `data_base64`).
    #[schema(value_type = serde_json::Value)]
    pub(crate) data: Option<Box<RawValue>>,
    /// A binary payload (or JSON-labelled bytes that are not valid JSON), base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) data_base64: Option<String>,
    /// String metadata.
    pub(crate) metadata: BTreeMap<String, String>,
}

impl From<&RecordedEvent> for EventJson {
    fn from(event: &RecordedEvent) -> Self {
        let json = match event.content_type {
            ContentType::Json => std::str::from_utf8(&event.data)
                .ok()
                .and_then(|text| RawValue::from_string(text.to_owned()).ok()),
            ContentType::Binary => None,
        };
        let (data, data_base64) = match json {
            Some(raw) => (Some(raw), None),
            None => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&event.data)),
            ),
        };
        Self {
            id: event.id,
            stream: event.stream.as_str().to_owned(),
            event_type: event.event_type.to_string(),
            revision: event.revision.value(),
            position: event.position.value(),
            recorded_at: event.recorded_at.to_rfc3339(),
            content_type: event.content_type.as_mime().to_owned(),
            data,
            data_base64,
            metadata: event
                .metadata
                .iter()
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect(),
        }
    }
}

/// A page of one stream.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct StreamPage {
    /// The stream.
    pub(crate) stream: String,
    /// The events, in the requested direction.
    pub(crate) events: Vec<EventJson>,
    /// The last revision written to the stream when it was read.
    pub(crate) last_revision: u64,
    /// Where the next page starts (pass as `from`).
    pub(crate) next_revision: u64,
    /// True when the page reached the end of the stream in its direction.
    pub(crate) is_end: bool,
}

/// A page of `$all`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct AllPage {
    /// The matching events, in the requested direction.
    pub(crate) events: Vec<EventJson>,
    /// Where the next page starts (pass as `from`).
    pub(crate) next_position: u64,
    /// True when the page reached the end of the log in its direction. A filtered page may
    /// hold fewer than `limit` events although more match further on: read on until `is_end`.
    pub(crate) is_end: bool,
}

/// A stream's retention settings.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetadataJson {
    /// Keep only the newest `max_count` events visible (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub(crate) max_count: Option<u64>,
    /// Hide events older than this many seconds (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub(crate) max_age_seconds: Option<u64>,
    /// Hide events with a lower revision (a soft delete sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) truncate_before: Option<u64>,
}

impl From<StreamMetadata> for MetadataJson {
    fn from(metadata: StreamMetadata) -> Self {
        Self {
            max_count: metadata.max_count,
            max_age_seconds: metadata.max_age.map(|age| age.as_secs()),
            truncate_before: metadata.truncate_before.map(|revision| revision.value()),
        }
    }
}

impl From<MetadataJson> for StreamMetadata {
    fn from(json: MetadataJson) -> Self {
        StreamMetadata {
            max_count: json.max_count,
            max_age: json.max_age_seconds.map(std::time::Duration::from_secs),
            truncate_before: json.truncate_before.map(factline_core::Revision),
        }
    }
}

/// What `/health` answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Health {
    /// `ok`.
    pub(crate) status: String,
    /// Position of the last committed event; absent while the log is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) head_position: Option<u64>,
}
