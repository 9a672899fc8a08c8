//! Messages to AMQP properties and back.
//!
//! - the id is the `message-id` property;
//! - every metadata entry is a header of the same name whose value is a long string (the
//!   value's UTF-8 bytes). A key starting with `~`, or named like a header the broker adds
//!   itself (`x-delivery-count`, which decoding drops), is sent as `~` + key; a key that would not fit
//!   a 255-byte header name goes, with its value, into the array header `~long` as a
//!   `[key, value]` pair. Decoding undoes both, so every key round-trips;
//! - `content_type`, `correlation_id` and `message_type` are also set as the `content-type`,
//!   `correlation-id` and `type` properties (for other AMQP clients); decoding reads the headers,
//!   and takes the properties only for a key the headers lack (a foreign message);
//! - the payload is the body, as it is.
//!
//! A message another client published is decoded the same way: its headers of other types become
//! text (numbers and booleans as written, arrays and tables in a debug form). Without a
//! `message-id` (or with one that is no valid id) its id is `amqp-{UUID v5}` of its exchange,
//! routing key, headers and body: stable when the broker redelivers it, shared by identical
//! copies.

use bytes::Bytes;
use factline_messaging::{Message, MessageId, Metadata, PublishError};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use uuid::Uuid;

/// The header that carries entries whose key is too long for a header name.
pub(crate) const LONG_KEYS_HEADER: &str = "~long";

/// Headers the broker adds itself (quorum queues count redeliveries): broker data, not
/// metadata. A metadata entry of such a name is sent as `~` + name.
const BROKER_HEADERS: &[&str] = &["x-delivery-count"];

const NAMESPACE: Uuid = Uuid::from_u128(0x2b7f_91c4_0e6a_4f3d_8c25_d1a0_5e9b_4f67);

/// The properties of `message` (without the delivery mode, which the publisher sets).
pub(crate) fn encode(message: &Message) -> Result<BasicProperties, PublishError> {
    let id = message.id.to_text();
    let id = ShortString::try_new(id).map_err(|error| PublishError::Transport(Box::new(error)))?;
    let mut properties = BasicProperties::default().with_message_id(id);
    if message.metadata.is_empty() {
        return Ok(properties);
    }
    let mut headers = FieldTable::default();
    let mut long = Vec::new();
    for (key, value) in message.metadata.iter() {
        let name = if key.starts_with('~') || BROKER_HEADERS.contains(&key) {
            format!("~{key}")
        } else {
            key.to_owned()
        };
        match ShortString::try_new(name) {
            Ok(name) => {
                headers.insert(name, AMQPValue::LongString(LongString::from(value)));
            }
            Err(_) => long.push(AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongString(LongString::from(key)),
                AMQPValue::LongString(LongString::from(value)),
            ]))),
        }
    }
    if !long.is_empty() {
        headers.insert(
            ShortString::from(LONG_KEYS_HEADER),
            AMQPValue::FieldArray(FieldArray::from(long)),
        );
    }
    let short = |key: &str| {
        message
            .metadata
            .get(key)
            .and_then(|value| ShortString::try_new(value).ok())
    };
    if let Some(value) = short(Metadata::CONTENT_TYPE) {
        properties = properties.with_content_type(value);
    }
    if let Some(value) = short(Metadata::CORRELATION_ID) {
        properties = properties.with_correlation_id(value);
    }
    if let Some(value) = short(Metadata::MESSAGE_TYPE) {
        properties = properties.with_type(value);
    }
    Ok(properties.with_headers(headers))
}

/// The message a delivery carries.
pub(crate) fn decode(
    exchange: &str,
    routing_key: &str,
    properties: &BasicProperties,
    body: Vec<u8>,
) -> Message {
    let mut metadata = Metadata::new();
    if let Some(headers) = properties.headers() {
        for (name, value) in headers {
            let name = name.as_str();
            if name == LONG_KEYS_HEADER
                && let AMQPValue::FieldArray(pairs) = value
            {
                for pair in pairs.as_slice() {
                    if let AMQPValue::FieldArray(pair) = pair
                        && let [key, value] = pair.as_slice()
                    {
                        metadata.insert(text(key), text(value));
                    }
                }
                continue;
            }
            if BROKER_HEADERS.contains(&name) {
                continue;
            }
            let key = match name.strip_prefix('~') {
                Some(rest) if rest.starts_with('~') || BROKER_HEADERS.contains(&rest) => rest,
                _ => name,
            };
            metadata.insert(key, text(value));
        }
    }
    for (key, property) in [
        (Metadata::CONTENT_TYPE, properties.content_type()),
        (Metadata::CORRELATION_ID, properties.correlation_id()),
        (Metadata::MESSAGE_TYPE, properties.kind()),
    ] {
        if let Some(value) = property
            && !metadata.contains_key(key)
        {
            metadata.insert(key, value.as_str());
        }
    }
    let id = properties
        .message_id()
        .as_ref()
        .and_then(|id| MessageId::parse(id.as_str()).ok())
        .unwrap_or_else(|| foreign_id(exchange, routing_key, &metadata, &body));
    let mut message = Message::with_id(id, Bytes::from(body));
    message.metadata = metadata;
    message
}

fn foreign_id(exchange: &str, routing_key: &str, metadata: &Metadata, body: &[u8]) -> MessageId {
    let mut seed = Vec::with_capacity(body.len() + 64);
    for part in [exchange, routing_key] {
        seed.extend_from_slice(&(part.len() as u64).to_le_bytes());
        seed.extend_from_slice(part.as_bytes());
    }
    for (key, value) in metadata.iter() {
        for part in [key, value] {
            seed.extend_from_slice(&(part.len() as u64).to_le_bytes());
            seed.extend_from_slice(part.as_bytes());
        }
    }
    seed.extend_from_slice(body);
    let uuid = Uuid::new_v5(&NAMESPACE, &seed);
    MessageId::parse(&format!("amqp-{}", uuid.simple()))
        .unwrap_or_else(|_| MessageId::from_uuid(uuid))
}

/// A header value as text.
fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::ByteArray(bytes) => String::from_utf8_lossy(bytes.as_slice()).into_owned(),
        AMQPValue::Boolean(v) => v.to_string(),
        AMQPValue::ShortShortInt(v) => v.to_string(),
        AMQPValue::ShortShortUInt(v) => v.to_string(),
        AMQPValue::ShortInt(v) => v.to_string(),
        AMQPValue::ShortUInt(v) => v.to_string(),
        AMQPValue::LongInt(v) => v.to_string(),
        AMQPValue::LongUInt(v) => v.to_string(),
        AMQPValue::LongLongInt(v) => v.to_string(),
        AMQPValue::Float(v) => v.to_string(),
        AMQPValue::Double(v) => v.to_string(),
        AMQPValue::Timestamp(v) => v.to_string(),
        AMQPValue::Void => String::new(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn metadata_round_trips_with_odd_keys() {
        let long_key = "k".repeat(300);
        let sent = Message::new("body")
            .with_metadata("~tilde", "1")
            .with_metadata("~~two", "2")
            .with_metadata("~long", "not the array")
            .with_metadata(long_key.as_str(), "long")
            .with_metadata(format!("~{}", "x".repeat(254)), "escaped past 255")
            .with_metadata("ünï cødé", "  v  ")
            .with_metadata(Metadata::CONTENT_TYPE, "text/plain")
            .with_metadata("", "empty key")
            .with_metadata("x-delivery-count", "mine")
            .with_metadata("~x-delivery-count", "mine too");
        let properties = encode(&sent).unwrap();
        let back = decode("x", "", &properties, b"body".to_vec());
        assert!(back.same_content(&sent), "{back:?} vs {sent:?}");
    }

    #[test]
    fn foreign_messages_get_properties_and_a_stable_id() {
        let mut headers = FieldTable::default();
        headers.insert("count".into(), AMQPValue::LongInt(7));
        headers.insert("flag".into(), AMQPValue::Boolean(true));
        let properties = BasicProperties::default()
            .with_headers(headers)
            .with_content_type("application/json".into())
            .with_correlation_id("c-1".into());
        let a = decode("ex", "rk", &properties, b"{}".to_vec());
        let b = decode("ex", "rk", &properties, b"{}".to_vec());
        assert_eq!(a.id, b.id);
        assert!(a.id.to_text().starts_with("amqp-"));
        assert_eq!(a.metadata.get("count"), Some("7"));
        assert_eq!(a.metadata.get("flag"), Some("true"));
        assert_eq!(
            a.metadata.get(Metadata::CONTENT_TYPE),
            Some("application/json")
        );
        assert_eq!(a.metadata.get(Metadata::CORRELATION_ID), Some("c-1"));
    }
}
