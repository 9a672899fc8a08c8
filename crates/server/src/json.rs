//! The JSON shapes of the API and their conversions to and from the core types.

use std::collections::BTreeMap;

use base64::Engine as _;
use factline_core::{
    AppendResult, ContentType, EventData, Limits, Metadata, RecordedEvent, Revision,
    STREAM_ID_BYTES_MAX, Snapshot, StreamId, StreamMetadata, Timestamp, Uuid,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{
    ToSchema,
    openapi::{
        AllOfBuilder, ArrayBuilder, Object, ObjectBuilder, OneOfBuilder, RefOr, Schema, Type,
        schema::SchemaType,
    },
};

use crate::error::{ApiError, ErrorCode};

/// What `StreamId::new` checks, as a JSON Schema pattern: no control character (Unicode `Cc`,
/// what `char::is_control` means) and no leading `$`.
const STREAM_ID_PATTERN: &str =
    "^[^$\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$";

/// The rules of a stream id as a JSON Schema, for every place the API takes one. `maxLength`
/// counts characters where the rule counts UTF-8 bytes (255), so an id of multi-byte
/// characters can fit the schema and still be refused with `invalid_stream_id`.
pub(crate) fn stream_id_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(STREAM_ID_BYTES_MAX))
        .pattern(Some(STREAM_ID_PATTERN))
        .build()
}

/// The rules of a persistent-subscription group name (`check_group_name`) as a JSON Schema:
/// 1 to 100 bytes (`maxLength` counts characters), no control character.
pub(crate) fn group_name_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(factline_core::persistent::GROUP_NAME_BYTES_MAX))
        .pattern(Some("^[^\\u0000-\\u001f\\u007f-\\u009f]+$"))
        .build()
}

/// Base64 as the `STANDARD` engine decodes it: the standard alphabet, padded, and the unused
/// bits of the last character zero.
const BASE64_PATTERN: &str =
    "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$";

/// A base64 string (`data_base64`, `state_base64`).
fn base64_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(BASE64_PATTERN))
        .content_encoding("base64")
        .build()
}

/// The `NewEvent` schema with what [`NewEvent::into_event_data`] checks beyond the fields'
/// types (`derived` is the schema the derive makes of the fields): either `data` (without
/// `content_type`) or `data_base64` (with an optional `content_type` of the two it takes).
pub(crate) fn new_event_schema(derived: RefOr<Schema>) -> Schema {
    let null = || ObjectBuilder::new().schema_type(Type::Null);
    let json_payload = ObjectBuilder::new()
        .required("data")
        .property("data_base64", null())
        .property("content_type", null());
    let base64_payload = ObjectBuilder::new()
        .required("data_base64")
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([
                    "id",
                    "type",
                    "data_base64",
                    "content_type",
                    "metadata",
                ])),
        ))
        .property("data_base64", base64_schema())
        .property(
            "content_type",
            ObjectBuilder::new()
                .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
                .enum_values(Some([
                    serde_json::json!("application/octet-stream"),
                    serde_json::json!("application/json"),
                    serde_json::Value::Null,
                ])),
        );
    AllOfBuilder::new()
        .item(derived)
        .item(OneOfBuilder::new().item(json_payload).item(base64_payload))
        .build()
        .into()
}

/// The body of `POST /streams/{stream}`: one event, or an array of at least one.
pub(crate) fn events_body_schema() -> Schema {
    let event = || RefOr::Ref(utoipa::openapi::Ref::from_schema_name("NewEvent"));
    OneOfBuilder::new()
        .item(event())
        .item(ArrayBuilder::new().items(event()).min_items(Some(1)))
        .build()
        .into()
}

/// An event to append.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewEvent {
    /// The event id, the key of idempotent retries. A UUIDv7 is assigned when absent.
    #[serde(default)]
    pub(crate) id: Option<Uuid>,
    /// The event type, a past-tense name such as `OrderPlaced`.
    #[serde(rename = "type")]
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"
    )]
    pub(crate) event_type: String,
    /// The payload: any JSON value, stored byte for byte as sent. Give `data` or `data_base64`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<serde_json::Value>)]
    pub(crate) data: Option<Box<RawValue>>,
    /// A binary payload, base64 (standard alphabet, padded). Give `data` or `data_base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) data_base64: Option<String>,
    /// With `data_base64` only: `application/octet-stream` (the default) or `application/json`
    /// for bytes that are labelled JSON but are not sent as a JSON value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "application/octet-stream")]
    pub(crate) content_type: Option<String>,
    /// String metadata; well-known keys are `correlation_id`, `causation_id`, `schema_version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) metadata: Option<BTreeMap<String, String>>,
}

impl NewEvent {
    pub(crate) fn into_event_data(self, index: usize) -> Result<EventData, ApiError> {
        let mut event = match (self.data, self.data_base64) {
            (Some(_), None) if self.content_type.is_some() => {
                return Err(ApiError::new(
                    ErrorCode::InvalidEvent,
                    format!("event {index}: content_type goes with data_base64 only"),
                )
                .with("index", index));
            }
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
                let mut event = EventData::binary(self.event_type, data);
                match self.content_type.as_deref() {
                    None | Some("application/octet-stream") => {}
                    Some("application/json") => event.content_type = ContentType::Json,
                    Some(other) => {
                        return Err(ApiError::new(
                            ErrorCode::InvalidEvent,
                            format!(
                                "event {index}: content_type {other:?} is neither \
                                 application/octet-stream nor application/json"
                            ),
                        )
                        .with("index", index));
                    }
                }
                event
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

impl NewEvent {
    /// The JSON form of `event`, for a client: JSON payloads go as `data` byte for byte where
    /// that keeps them exact, everything else as `data_base64` with its content type.
    pub(crate) fn from_event_data(event: &EventData) -> Self {
        let exact_json = match event.content_type {
            ContentType::Json => exact_raw_json(&event.data),
            ContentType::Binary => None,
        };
        let (data, data_base64, content_type) = match exact_json {
            Some(raw) => (Some(raw), None, None),
            None => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&event.data)),
                Some(event.content_type.as_mime().to_owned()),
            ),
        };
        Self {
            id: Some(event.id),
            event_type: event.event_type.to_string(),
            data,
            data_base64,
            content_type,
            metadata: (!event.metadata.is_empty()).then(|| {
                event
                    .metadata
                    .iter()
                    .map(|(key, value)| (key.to_owned(), value.to_owned()))
                    .collect()
            }),
        }
    }
}

/// `bytes` as a JSON value that serializes back to exactly these bytes, if they are one (valid
/// UTF-8 JSON without surrounding whitespace, which a JSON parser would not keep).
fn exact_raw_json(bytes: &[u8]) -> Option<Box<RawValue>> {
    let trimmed = bytes.first().is_some_and(|b| !b.is_ascii_whitespace())
        && bytes.last().is_some_and(|b| !b.is_ascii_whitespace());
    if !trimmed {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    RawValue::from_string(text.to_owned()).ok()
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
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamAppend {
    /// The stream.
    #[schema(schema_with = stream_id_schema)]
    pub(crate) stream: String,
    /// `any` (default), `no-stream`, `exists` or a revision number.
    #[serde(default)]
    #[schema(
        value_type = Option<String>,
        example = "no-stream",
        pattern = "^(any|no-stream|exists|[0-9]+)$"
    )]
    pub(crate) expected_version: Option<serde_json::Value>,
    /// The events, in order.
    #[schema(min_items = 1)]
    pub(crate) events: Vec<NewEvent>,
}

/// A multi-stream append: every stream's check passes and everything is written, or nothing.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MultiAppend {
    /// The streams, each with its condition and events.
    #[schema(min_items = 1)]
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
    /// When the events were recorded (RFC 3339, UTC, microseconds).
    pub(crate) recorded_at: String,
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
    #[serde(default, deserialize_with = "present")]
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

impl EventJson {
    /// The recorded event this JSON describes, for a client; `Err` names the field that is
    /// not what the server sends.
    pub(crate) fn into_recorded(self) -> Result<RecordedEvent, String> {
        let stream = StreamId::new(&self.stream)
            .map_err(|error| format!("stream {:?}: {error}", self.stream))?;
        let recorded_at = Timestamp::parse_rfc3339(&self.recorded_at)
            .map_err(|error| format!("recorded_at {:?}: {error}", self.recorded_at))?;
        let content_type = match self.content_type.as_str() {
            "application/json" => ContentType::Json,
            "application/octet-stream" => ContentType::Binary,
            other => return Err(format!("content_type {other:?}")),
        };
        let data = match (self.data_base64, self.data) {
            (Some(encoded), _) => base64::engine::general_purpose::STANDARD
                .decode(encoded.as_bytes())
                .map(bytes::Bytes::from)
                .map_err(|error| format!("data_base64: {error}"))?,
            (None, Some(raw)) => bytes::Bytes::from(String::from(Box::<str>::from(raw))),
            (None, None) => return Err("neither data nor data_base64".to_owned()),
        };
        let mut metadata = Metadata::new();
        for (key, value) in self.metadata {
            metadata.insert(key, value);
        }
        Ok(RecordedEvent {
            stream,
            revision: Revision(self.revision),
            position: factline_core::Position(self.position),
            recorded_at,
            id: self.id,
            event_type: self.event_type.into(),
            content_type,
            data,
            metadata,
        })
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

/// A stream's snapshot: the state of its aggregate as of a revision.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotJson {
    /// Revision of the last event folded into the state.
    pub(crate) revision: u64,
    /// Version of the state's encoding (readers drop snapshots of another version).
    #[serde(default)]
    pub(crate) state_version: u32,
    /// The encoded state, base64 (standard alphabet, padded).
    #[schema(schema_with = base64_schema)]
    pub(crate) state_base64: String,
    /// When it was taken (RFC 3339); the server's clock when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) taken_at: Option<String>,
}

impl From<&Snapshot> for SnapshotJson {
    fn from(snapshot: &Snapshot) -> Self {
        Self {
            revision: snapshot.revision.value(),
            state_version: snapshot.state_version,
            state_base64: base64::engine::general_purpose::STANDARD.encode(&snapshot.state),
            taken_at: Some(snapshot.taken_at.to_rfc3339()),
        }
    }
}

impl SnapshotJson {
    pub(crate) fn into_snapshot(self) -> Result<Snapshot, ApiError> {
        let state = base64::engine::general_purpose::STANDARD
            .decode(self.state_base64.as_bytes())
            .map_err(|error| {
                ApiError::new(
                    ErrorCode::InvalidJson,
                    format!("state_base64 is not base64: {error}"),
                )
            })?;
        let taken_at = match self.taken_at {
            None => Timestamp::now(),
            Some(text) => Timestamp::parse_rfc3339(&text).map_err(|error| {
                ApiError::new(
                    ErrorCode::InvalidJson,
                    format!("taken_at {text:?} is not RFC 3339: {error}"),
                )
            })?,
        };
        Ok(Snapshot {
            revision: Revision(self.revision),
            state_version: self.state_version,
            state: bytes::Bytes::from(state),
            taken_at,
        })
    }
}

/// What saving a snapshot answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct SnapshotSaved {
    /// False when a snapshot of a higher revision was stored already (this one is dropped).
    pub(crate) stored: bool,
}

/// The limits the store enforces (see `Limits` in factline-core).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct LimitsJson {
    /// Largest event (type + data + metadata), bytes.
    pub(crate) event_size_bytes_max: usize,
    /// Most events in one append.
    pub(crate) events_per_append_max: usize,
    /// Largest append, bytes.
    pub(crate) append_size_bytes_max: usize,
    /// Most streams in one multi-stream append.
    pub(crate) streams_per_append_max: usize,
    /// Most metadata entries on one event.
    pub(crate) metadata_entries_max: usize,
    /// Most events one read may ask for.
    pub(crate) read_count_max: usize,
    /// Longest stream id, bytes.
    pub(crate) stream_id_bytes_max: usize,
    /// Longest event type, bytes.
    pub(crate) event_type_bytes_max: usize,
}

impl From<&Limits> for LimitsJson {
    fn from(limits: &Limits) -> Self {
        Self {
            event_size_bytes_max: limits.event_size_bytes_max,
            events_per_append_max: limits.events_per_append_max,
            append_size_bytes_max: limits.append_size_bytes_max,
            streams_per_append_max: limits.streams_per_append_max,
            metadata_entries_max: limits.metadata_entries_max,
            read_count_max: limits.read_count_max,
            stream_id_bytes_max: limits.stream_id_bytes_max,
            event_type_bytes_max: limits.event_type_bytes_max,
        }
    }
}

impl LimitsJson {
    pub(crate) fn to_limits(&self) -> Limits {
        let mut limits = Limits::default();
        limits.event_size_bytes_max = self.event_size_bytes_max;
        limits.events_per_append_max = self.events_per_append_max;
        limits.append_size_bytes_max = self.append_size_bytes_max;
        limits.streams_per_append_max = self.streams_per_append_max;
        limits.metadata_entries_max = self.metadata_entries_max;
        limits.read_count_max = self.read_count_max;
        limits.stream_id_bytes_max = self.stream_id_bytes_max;
        limits.event_type_bytes_max = self.event_type_bytes_max;
        limits
    }
}

/// What `/info` answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Info {
    /// `factline`.
    pub(crate) server: String,
    /// The server's version.
    pub(crate) version: String,
    /// The store's limits.
    pub(crate) limits: LimitsJson,
    /// The largest request body the server takes, bytes.
    pub(crate) body_bytes_max: usize,
}
