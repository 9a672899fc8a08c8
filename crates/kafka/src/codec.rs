//! Messages to Kafka records and back.
//!
//! - the id is the header [`ID_HEADER`] (the id's text);
//! - every metadata entry is a header of the same name whose value is the entry's UTF-8 bytes;
//!   a key starting with `~`, or equal to [`ID_HEADER`], is sent as `~` + key, and decoding
//!   strips one leading `~`; a key with a NUL byte (which ends a librdkafka header name) is sent
//!   as `~hex:` + its bytes in hex. So every key round-trips;
//! - the record key is the message's partition key ([`Metadata::PARTITION_KEY`]), which also
//!   stays in the headers; a message without one has no record key (the producer spreads such
//!   messages over the partitions);
//! - the payload is the record value, as it is.
//!
//! A record another client produced is decoded the same way. Header values that are not UTF-8
//! become text lossily; a header without a value becomes an empty entry. Without an id header
//! (or with one that is no valid id) the id is `kafka-{topic}-{partition}-{offset}`: the record's
//! place in the log, the same at every redelivery. Without a partition-key header, a UTF-8 record
//! key becomes the partition key.

use bytes::Bytes;
use factline_messaging::{Message, MessageId, Metadata};
use rdkafka::message::{Header, OwnedHeaders};

/// The header that carries the message id.
pub const ID_HEADER: &str = "factline.id";

/// Names of headers that carry a key librdkafka cannot (a NUL byte ends its header names) start
/// with this, followed by the key's bytes in hex.
const HEX_NAME_PREFIX: &str = "~hex:";

fn header_name(key: &str) -> std::borrow::Cow<'_, str> {
    if key.contains('\0') {
        let mut name = String::with_capacity(HEX_NAME_PREFIX.len() + 2 * key.len());
        name.push_str(HEX_NAME_PREFIX);
        for byte in key.bytes() {
            name.push_str(&format!("{byte:02x}"));
        }
        name.into()
    } else if key.starts_with('~') || key == ID_HEADER {
        format!("~{key}").into()
    } else {
        key.into()
    }
}

/// The metadata key a header name carries (undoes [`header_name`]).
fn metadata_key(name: &str) -> std::borrow::Cow<'_, str> {
    if let Some(hex) = name.strip_prefix(HEX_NAME_PREFIX)
        && let Some(key) = from_hex(hex)
    {
        return key.into();
    }
    name.strip_prefix('~').unwrap_or(name).into()
}

fn from_hex(hex: &str) -> Option<String> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(hex.get(at..at + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// The headers of `message`: its id, then its metadata.
pub(crate) fn encode_headers(message: &Message) -> OwnedHeaders {
    let id = message.id.to_text();
    let mut headers = OwnedHeaders::new_with_capacity(1 + message.metadata.len()).insert(Header {
        key: ID_HEADER,
        value: Some(id.as_bytes()),
    });
    for (key, value) in message.metadata.iter() {
        headers = headers.insert(Header {
            key: &header_name(key),
            value: Some(value.as_bytes()),
        });
    }
    headers
}

/// Where a record sits: what a foreign record's id is made of.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Place<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// The message a record carries.
pub(crate) fn decode<H: rdkafka::message::Headers>(
    place: Place<'_>,
    key: Option<&[u8]>,
    headers: Option<&H>,
    payload: Option<&[u8]>,
) -> Message {
    let mut id = None;
    let mut metadata = Metadata::new();
    if let Some(headers) = headers {
        for header in headers.iter() {
            let value = header
                .value
                .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
                .unwrap_or_default();
            if header.key == ID_HEADER {
                id = MessageId::parse(&value).ok();
            } else {
                metadata.insert(metadata_key(header.key), value);
            }
        }
    }
    if !metadata.contains_key(Metadata::PARTITION_KEY)
        && let Some(key) = key.and_then(|key| std::str::from_utf8(key).ok())
    {
        metadata.insert(Metadata::PARTITION_KEY, key);
    }
    let id = id.unwrap_or_else(|| foreign_id(place));
    let mut message = Message::with_id(id, Bytes::copy_from_slice(payload.unwrap_or_default()));
    message.metadata = metadata;
    message
}

/// The id of a record that has no valid id header.
fn foreign_id(place: Place<'_>) -> MessageId {
    let text = format!("kafka-{}-{}-{}", place.topic, place.partition, place.offset);
    // A topic name is at most 249 bytes of [A-Za-z0-9._-]: always a valid text id, but never
    // panic on it.
    MessageId::parse(&text).unwrap_or_else(|_| {
        MessageId::from_uuid(uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            text.as_bytes(),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PLACE: Place<'static> = Place {
        topic: "orders",
        partition: 2,
        offset: 41,
    };

    fn round_trip(message: &Message) -> Message {
        let headers = encode_headers(message);
        let key = message.partition_key().map(str::as_bytes);
        decode(PLACE, key, Some(&headers), Some(&message.payload))
    }

    #[test]
    fn reserved_keys_round_trip() {
        let message = Message::new("x")
            .with_metadata(ID_HEADER, "not the id")
            .with_metadata("~tilde", "one")
            .with_metadata("~~two", "two")
            .with_metadata("", "empty key")
            .with_metadata("nul\0inside", "hex")
            .with_metadata("~hex:41", "looks escaped")
            .with_metadata("hex:41", "plain");
        let back = round_trip(&message);
        assert!(back.same_content(&message), "{:?}", back.metadata);
    }

    #[test]
    fn a_foreign_record_gets_its_place_as_id_and_its_key_as_partition_key() {
        let headers = OwnedHeaders::new().insert(Header {
            key: "kind",
            value: Some(&[0xff, b'a']),
        });
        let message = decode(PLACE, Some(b"customer-7"), Some(&headers), None);
        assert_eq!(message.id.to_text(), "kafka-orders-2-41");
        assert_eq!(message.partition_key(), Some("customer-7"));
        assert_eq!(message.metadata.get("kind"), Some("\u{fffd}a"));
        assert!(message.payload.is_empty());
        let again = decode(PLACE, Some(b"customer-7"), Some(&headers), None);
        assert_eq!(again.id, message.id, "stable across redeliveries");
    }

    #[test]
    fn an_invalid_id_header_is_replaced_by_the_place() {
        let headers = OwnedHeaders::new().insert(Header {
            key: ID_HEADER,
            value: Some(b""),
        });
        let message = decode::<OwnedHeaders>(PLACE, None, Some(&headers), Some(b"p"));
        assert_eq!(message.id.to_text(), "kafka-orders-2-41");
    }

    proptest! {
        #[test]
        fn every_message_round_trips(
            entries in proptest::collection::btree_map(".{0,12}", ".{0,12}", 0..6),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            text_id in proptest::option::of("[a-z0-9-]{1,20}"),
        ) {
            let mut message = Message::new(payload);
            if let Some(text) = text_id {
                message.id = MessageId::parse(&text).unwrap_or(message.id);
            }
            for (key, value) in entries {
                message.metadata.insert(key, value);
            }
            let back = round_trip(&message);
            prop_assert!(back.same_content(&message), "{:?} vs {:?}", back.metadata, message.metadata);
        }
    }
}
