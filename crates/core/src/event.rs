//! What clients append ([`EventData`]) and what stores return ([`RecordedEvent`]).

use std::{borrow::Borrow, collections::BTreeMap, fmt, ops::Deref, sync::Arc};

use bytes::Bytes;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

use crate::{Position, Revision, StreamId, Timestamp};

/// The name of an event's type: what happened, in the past tense (`OrderPlaced`).
///
/// Cloning is cheap (a shared `Arc<str>`), so the events of one read can share one copy of each
/// name instead of allocating it per event. It is not validated here: stores check it at append
/// against [`Limits::event_type_bytes_max`](crate::Limits) and the naming rules.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType(Arc<str>);

impl EventType {
    /// Wraps `name`.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for EventType {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for EventType {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for EventType {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for EventType {
    fn from(name: &str) -> Self {
        Self(name.into())
    }
}

impl From<String> for EventType {
    fn from(name: String) -> Self {
        Self(name.into())
    }
}

impl From<&String> for EventType {
    fn from(name: &String) -> Self {
        Self(name.as_str().into())
    }
}

impl From<EventType> for String {
    fn from(name: EventType) -> Self {
        name.0.as_ref().to_owned()
    }
}

impl PartialEq<str> for EventType {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for EventType {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for EventType {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<EventType> for str {
    fn eq(&self, other: &EventType) -> bool {
        self == &*other.0
    }
}

impl PartialEq<EventType> for &str {
    fn eq(&self, other: &EventType) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<EventType> for String {
    fn eq(&self, other: &EventType) -> bool {
        **self == *other.0
    }
}

impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::from)
    }
}

/// String metadata of an event, with accessors for the well-known keys.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    /// Key of the id that ties together everything caused by one original request.
    pub const CORRELATION_ID: &'static str = "correlation_id";
    /// Key of the id of the message or command that directly caused this event.
    pub const CAUSATION_ID: &'static str = "causation_id";
    /// Key of the schema version of the event's data.
    pub const SCHEMA_VERSION: &'static str = "schema_version";

    /// Empty metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Sets `key` to `value`, returning the previous value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.0.insert(key.into(), value.into())
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// Builder form of [`Metadata::insert`].
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.insert(key, value);
        self
    }

    /// All entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The correlation id, if set.
    pub fn correlation_id(&self) -> Option<&str> {
        self.get(Self::CORRELATION_ID)
    }

    /// The causation id, if set.
    pub fn causation_id(&self) -> Option<&str> {
        self.get(Self::CAUSATION_ID)
    }

    /// The schema version, if set and a number.
    pub fn schema_version(&self) -> Option<u32> {
        self.get(Self::SCHEMA_VERSION)?.parse().ok()
    }

    /// Sum of the byte lengths of all keys and values.
    pub fn size_bytes(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

impl FromIterator<(String, String)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// The encoding of an event's `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ContentType {
    /// UTF-8 JSON (`application/json`).
    #[default]
    #[serde(rename = "application/json")]
    Json,
    /// Opaque bytes (`application/octet-stream`).
    #[serde(rename = "application/octet-stream")]
    Binary,
}

impl ContentType {
    /// The MIME type.
    pub const fn as_mime(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Binary => "application/octet-stream",
        }
    }
}

/// An event as a client appends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventData {
    /// Unique id; the key of idempotent retries. A UUIDv7 unless the client sets one.
    pub id: Uuid,
    /// Past-tense name of what happened, e.g. `OrderPlaced`.
    pub event_type: EventType,
    /// How `data` is encoded.
    pub content_type: ContentType,
    /// The payload.
    pub data: Bytes,
    /// String metadata (correlation id, causation id, schema version, …).
    pub metadata: Metadata,
}

impl EventData {
    /// An event with a JSON payload serialized from `data` and a fresh UUIDv7 id.
    pub fn json<T: Serialize + ?Sized>(
        event_type: impl Into<EventType>,
        data: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            content_type: ContentType::Json,
            data: Bytes::from(serde_json::to_vec(data)?),
            metadata: Metadata::new(),
        })
    }

    /// An event with an opaque binary payload and a fresh UUIDv7 id.
    pub fn binary(event_type: impl Into<EventType>, data: impl Into<Bytes>) -> Self {
        Self {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            content_type: ContentType::Binary,
            data: data.into(),
            metadata: Metadata::new(),
        }
    }

    /// Sets the id (for idempotent retries, reuse the id of the first attempt).
    #[must_use]
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Adds one metadata entry.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// Replaces all metadata.
    #[must_use]
    pub fn with_all_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// The size that counts against `event_size_bytes_max`: type + data + metadata keys and values.
    pub fn size_bytes(&self) -> usize {
        self.event_type.len() + self.data.len() + self.metadata.size_bytes()
    }
}

/// An event as stored: the appended [`EventData`] plus where and when it was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    /// The stream it belongs to.
    pub stream: StreamId,
    /// Its 0-based index in the stream.
    pub revision: Revision,
    /// Its place in `$all`.
    pub position: Position,
    /// When the store committed it (UTC, microseconds).
    pub recorded_at: Timestamp,
    /// The id given at append.
    pub id: Uuid,
    /// The event type given at append.
    pub event_type: EventType,
    /// How `data` is encoded.
    pub content_type: ContentType,
    /// The payload, byte for byte as appended.
    pub data: Bytes,
    /// The metadata, as appended.
    pub metadata: Metadata,
}

impl RecordedEvent {
    /// Builds the recorded form of `event` (used by backends).
    pub fn new(
        stream: StreamId,
        revision: Revision,
        position: Position,
        recorded_at: Timestamp,
        event: EventData,
    ) -> Self {
        Self {
            stream,
            revision,
            position,
            recorded_at,
            id: event.id,
            event_type: event.event_type,
            content_type: event.content_type,
            data: event.data,
            metadata: event.metadata,
        }
    }

    /// Deserializes the JSON payload.
    pub fn data_json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.data)
    }

    /// The appended form of this event (same id, type, data and metadata).
    pub fn to_event_data(&self) -> EventData {
        EventData {
            id: self.id,
            event_type: self.event_type.clone(),
            content_type: self.content_type,
            data: self.data.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_events_serialize_their_payload_and_get_v7_ids() {
        let e = EventData::json("OrderPlaced", &serde_json::json!({"total": 5}))
            .unwrap()
            .with_metadata(Metadata::CORRELATION_ID, "c-1")
            .with_metadata(Metadata::SCHEMA_VERSION, "2");
        assert_eq!(e.id.get_version_num(), 7);
        assert_eq!(&e.data[..], br#"{"total":5}"#);
        assert_eq!(e.metadata.correlation_id(), Some("c-1"));
        assert_eq!(e.metadata.schema_version(), Some(2));
        assert_eq!(e.size_bytes(), "OrderPlaced".len() + 11 + 14 + 3 + 14 + 1);
    }
}
