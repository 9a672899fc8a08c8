//! Typed events: [`DomainEvent`] and its encode and decode errors.

use factline_core::{ContentType, EventData, Metadata, RecordedEvent};
use serde_json::Value;

/// A typed domain event with a stable event type name and a schema version.
///
/// Usually derived with [`#[derive(DomainEvent)]`](macro@crate::DomainEvent) on an enum whose
/// variants are the event types (or on a struct that is one event type). The stored form is
/// an [`EventData`] whose `event_type` names the variant and whose `data` is the variant's JSON,
/// with the schema version in the `schema_version` metadata key.
pub trait DomainEvent: Sized + Send + Sync + 'static {
    /// The stored event type name of this event, e.g. `OrderPlaced`.
    fn event_type(&self) -> &'static str;

    /// The schema version this event is written with (1 unless set otherwise).
    fn schema_version(&self) -> u32;

    /// Every event type name this type can encode and decode.
    fn event_types() -> &'static [&'static str];

    /// This event's data as JSON, without its type name.
    fn encode(&self) -> Result<Value, EncodeError>;

    /// The event named `event_type`, stored with `schema_version`, from its JSON `data`.
    ///
    /// The derived implementation refuses a `schema_version` newer than the one it writes and
    /// decodes older versions as they are (serde defaults cover added fields; other changes
    /// need an upcaster before this point).
    fn decode(event_type: &str, schema_version: u32, data: Value) -> Result<Self, DecodeError>;

    /// The event as an [`EventData`] ready to append: JSON content, a fresh UUIDv7 id, and
    /// `metadata` plus the `schema_version` key (which this sets, overriding any given value).
    fn to_event_data(&self, metadata: Metadata) -> Result<EventData, EncodeError> {
        let event_type = self.event_type();
        let data = self.encode()?;
        let event = EventData::json(event_type, &data)
            .map_err(|source| EncodeError::Serialize { event_type, source })?;
        let mut metadata = metadata;
        metadata.insert(Metadata::SCHEMA_VERSION, self.schema_version().to_string());
        Ok(event.with_all_metadata(metadata))
    }

    /// Decodes a stored event, reading its schema version from the metadata (1 when absent).
    fn from_recorded(event: &RecordedEvent) -> Result<Self, DecodeError> {
        let (schema_version, data) = stored_parts(event)?;
        Self::decode(&event.event_type, schema_version, data)
    }
}

/// The schema version (from the metadata, 1 when absent) and the JSON data of a stored event.
pub(crate) fn stored_parts(event: &RecordedEvent) -> Result<(u32, Value), DecodeError> {
    {
        if event.content_type != ContentType::Json {
            return Err(DecodeError::NotJson {
                event_type: event.event_type.to_string(),
                content_type: event.content_type.as_mime(),
            });
        }
        let schema_version = match event.metadata.get(Metadata::SCHEMA_VERSION) {
            None => 1,
            Some(text) => text
                .parse::<u32>()
                .map_err(|_| DecodeError::InvalidSchemaVersion {
                    event_type: event.event_type.to_string(),
                    value: text.to_owned(),
                })?,
        };
        let data: Value =
            serde_json::from_slice(&event.data).map_err(|error| DecodeError::MalformedData {
                event_type: event.event_type.to_string(),
                message: error.to_string(),
            })?;
        Ok((schema_version, data))
    }
}

/// Why an event could not be turned into JSON.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// serde refused to serialize the event.
    #[error("event {event_type} could not be serialized to JSON: {source}")]
    Serialize {
        /// The event type.
        event_type: &'static str,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// The enum did not serialize as serde's externally tagged `{"Variant": data}` (or
    /// `"Variant"` for a unit variant), e.g. because of a hand-written `Serialize`.
    #[error(
        "event {event_type} serialized as {found}, not as serde's externally tagged variant \
         {variant:?}; a DomainEvent enum needs serde's default enum representation"
    )]
    NotExternallyTagged {
        /// The event type.
        event_type: &'static str,
        /// The variant name serde was expected to write.
        variant: &'static str,
        /// A short description of what was written instead.
        found: String,
    },
}

/// Why a stored event could not be turned into a typed event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The event type is not one this event type knows.
    #[error("unknown event type {event_type:?}")]
    UnknownEventType {
        /// The stored event type.
        event_type: String,
    },
    /// The data does not match the event's shape.
    #[error("event {event_type} has malformed data: {message}")]
    MalformedData {
        /// The stored event type.
        event_type: String,
        /// What serde reported.
        message: String,
    },
    /// The event was written with a newer schema version than this code knows.
    #[error(
        "event {event_type} has schema version {found}, newer than the version {supported} this \
         code knows"
    )]
    UnsupportedSchemaVersion {
        /// The stored event type.
        event_type: String,
        /// The stored schema version.
        found: u32,
        /// The newest version this code decodes.
        supported: u32,
    },
    /// The `schema_version` metadata is not a number.
    #[error("event {event_type} has schema_version metadata {value:?}, which is not a number")]
    InvalidSchemaVersion {
        /// The stored event type.
        event_type: String,
        /// The stored value.
        value: String,
    },
    /// The event's content type is not JSON.
    #[error("event {event_type} has content type {content_type}, not application/json")]
    NotJson {
        /// The stored event type.
        event_type: String,
        /// The stored content type.
        content_type: &'static str,
    },
    /// An upcaster refused the stored data, or upcasters went round in a loop.
    #[error("event {event_type} at schema version {schema_version} cannot be upcast: {reason}")]
    Upcast {
        /// The event type the failing step was given.
        event_type: String,
        /// Its schema version.
        schema_version: u32,
        /// What went wrong.
        reason: String,
    },
}

impl DecodeError {
    /// The stored event type the error is about.
    pub fn event_type(&self) -> &str {
        match self {
            Self::UnknownEventType { event_type }
            | Self::MalformedData { event_type, .. }
            | Self::UnsupportedSchemaVersion { event_type, .. }
            | Self::InvalidSchemaVersion { event_type, .. }
            | Self::NotJson { event_type, .. }
            | Self::Upcast { event_type, .. } => event_type,
        }
    }
}
