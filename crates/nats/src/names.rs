//! How factline names and messages map onto JetStream: topics and groups to stream and consumer
//! names, message ids and metadata to headers. Every mapping is injective, so distinct topics
//! never share a stream and every metadata entry comes back as it was published.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use factline_messaging::{InvalidTopic, MessageId, Metadata, check_topic};

/// Longest stream or consumer name this adapter creates, in bytes (JetStream names become
/// directory names under file storage).
pub const NAME_BYTES_MAX: usize = 255;

/// The header that carries the metadata entries that cannot be plain headers, as a JSON object
/// written in ASCII.
pub const METADATA_HEADER: &str = "Factline-Metadata";

/// JetStream's deduplication header.
pub const MESSAGE_ID_HEADER: &str = "Nats-Msg-Id";

/// Bytes kept as they are in names; every other byte (and `=`) is written `=XX`.
fn name_byte_is_plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-'
}

/// `text` with every byte outside `[A-Za-z0-9_-]` escaped as `=XX` (upper-case hex): valid in
/// stream, consumer and subject names (no `.`, `*`, `>`, whitespace or path separator), and
/// injective.
pub fn escape_name(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &byte in text.as_bytes() {
        if name_byte_is_plain(byte) {
            out.push(char::from(byte));
        } else {
            out.push('=');
            out.push_str(&format!("{byte:02X}"));
        }
    }
    out
}

/// The JetStream stream (and subject) that holds `topic`: `prefix` + the escaped topic.
pub fn stream_name(prefix: &str, topic: &str) -> Result<String, InvalidTopic> {
    check_topic(topic)?;
    let name = format!("{prefix}{}", escape_name(topic));
    if name.len() > NAME_BYTES_MAX {
        return Err(InvalidTopic {
            topic: topic.chars().take(64).collect(),
            reason: format!(
                "the JetStream stream name for this topic would be {} bytes (the prefix {prefix:?} \
                 plus the topic, with every byte outside [A-Za-z0-9_-] written as three); the \
                 limit is {NAME_BYTES_MAX}",
                name.len()
            ),
        });
    }
    Ok(name)
}

/// Why a consumer group name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid consumer group {group:?}: {reason}")]
pub struct InvalidGroup {
    /// The group (shortened for display).
    pub group: String,
    /// What was wrong.
    pub reason: String,
}

/// The durable consumer of `group` on a topic's stream: `g_` + the escaped group name.
pub fn group_consumer_name(group: &str) -> Result<String, InvalidGroup> {
    if group.is_empty() {
        return Err(InvalidGroup {
            group: String::new(),
            reason: "a group name must not be empty".into(),
        });
    }
    if group.chars().any(char::is_control) {
        return Err(InvalidGroup {
            group: group.escape_debug().to_string(),
            reason: "a group name must not contain control characters".into(),
        });
    }
    let name = format!("g_{}", escape_name(group));
    if name.len() > NAME_BYTES_MAX {
        return Err(InvalidGroup {
            group: group.chars().take(64).collect(),
            reason: format!(
                "its consumer name would be {} bytes (every byte outside [A-Za-z0-9_-] is written \
                 as three); the limit is {NAME_BYTES_MAX}",
                name.len()
            ),
        });
    }
    Ok(name)
}

/// Whether `value` survives a NATS header line as it is: printable ASCII, not empty, no
/// leading or trailing space (the parser trims values).
fn header_value_is_plain(value: &str) -> bool {
    !value.is_empty()
        && value.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !value.starts_with(' ')
        && !value.ends_with(' ')
}

/// Whether a metadata key can be a header of its own: `[A-Za-z0-9_.-]+`, and not in the
/// namespaces NATS and this adapter use (`Nats-`, `Factline-`, any case).
fn key_is_plain_header(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !lower.starts_with("nats-")
        && !lower.starts_with("factline-")
}

/// The id as `Nats-Msg-Id` carries it: printable ASCII as it is, every other byte and `%`
/// percent-encoded (so that it survives the header line, and distinct ids stay distinct).
pub fn encode_message_id(id: &MessageId) -> String {
    let text = id.to_text();
    let mut out = String::with_capacity(text.len());
    for (index, &byte) in text.as_bytes().iter().enumerate() {
        let edge_space = byte == b' ' && (index == 0 || index + 1 == text.len());
        if (0x21..0x7f).contains(&byte) && byte != b'%' || (byte == b' ' && !edge_space) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push_str(&format!("{byte:02X}"));
        }
    }
    out
}

/// The inverse of [`encode_message_id`]; `None` for text it never produces.
pub fn decode_message_id(text: &str) -> Option<MessageId> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text.get(index + 1..index + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    MessageId::parse(std::str::from_utf8(&out).ok()?).ok()
}

/// JSON text of `entries` with every non-ASCII character written `\uXXXX`, so that it is one
/// printable ASCII line.
fn ascii_json(entries: &BTreeMap<&str, &str>) -> String {
    // A map of strings always serializes.
    let json = serde_json::to_string(entries).unwrap_or_default();
    let mut out = String::with_capacity(json.len());
    for ch in json.chars() {
        if ch.is_ascii() {
            out.push(ch);
        } else {
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// The headers of a published message: its id as `Nats-Msg-Id` (JetStream deduplicates by it),
/// metadata entries that fit a header line as headers of their own (readable by any NATS
/// client), and the rest in one [`METADATA_HEADER`].
pub fn encode_headers(id: &MessageId, metadata: &Metadata) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(MESSAGE_ID_HEADER, encode_message_id(id));
    let mut rest: BTreeMap<&str, &str> = BTreeMap::new();
    for (key, value) in metadata.iter() {
        match key.parse::<async_nats::HeaderName>() {
            Ok(name) if key_is_plain_header(key) && header_value_is_plain(value) => {
                headers.insert(name, value);
            }
            _ => {
                rest.insert(key, value);
            }
        }
    }
    if !rest.is_empty() {
        headers.insert(METADATA_HEADER, ascii_json(&rest));
    }
    headers
}

/// Why a received message's headers could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The metadata header is not a JSON object of strings.
    #[error("the {METADATA_HEADER} header is not a JSON object of strings: {0}")]
    Metadata(#[source] serde_json::Error),
}

/// The id and metadata of a received message. A message without a `Nats-Msg-Id` we can read
/// (published by another client) gets `fallback_id`. Headers in the `Nats-` and `Factline-`
/// namespaces are not metadata.
pub fn decode_headers(
    headers: Option<&HeaderMap>,
    fallback_id: impl FnOnce() -> MessageId,
) -> Result<(MessageId, Metadata), HeaderError> {
    let Some(headers) = headers else {
        return Ok((fallback_id(), Metadata::new()));
    };
    let mut id = None;
    let mut entries: BTreeMap<String, String> = BTreeMap::new();
    for (name, values) in headers.iter() {
        let name = name.as_ref();
        let Some(value) = values.first() else {
            continue;
        };
        if name == MESSAGE_ID_HEADER {
            id = decode_message_id(value.as_str());
        } else if name == METADATA_HEADER {
            let rest: BTreeMap<String, String> =
                serde_json::from_str(value.as_str()).map_err(HeaderError::Metadata)?;
            entries.extend(rest);
        } else if key_is_plain_header(name) {
            entries.insert(name.to_owned(), value.as_str().to_owned());
        }
    }
    Ok((
        id.unwrap_or_else(fallback_id),
        entries.into_iter().collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_escape_everything_but_the_safe_bytes() {
        assert_eq!(escape_name("orders_v1-x"), "orders_v1-x");
        assert_eq!(escape_name("a.b"), "a=2Eb");
        assert_eq!(escape_name("a=2Eb"), "a=3D2Eb");
        assert_eq!(escape_name("*>"), "=2A=3E");
        assert_eq!(escape_name("ü"), "=C3=BC");
        assert_eq!(stream_name("fl_", "x").unwrap(), "fl_x");
        let long = stream_name("fl_", &".".repeat(100)).unwrap_err();
        assert!(long.reason.contains("limit is 255"), "{}", long.reason);
        assert!(stream_name("fl_", "").is_err());
        assert!(group_consumer_name("").is_err());
        assert_eq!(group_consumer_name("billing").unwrap(), "g_billing");
    }

    #[test]
    fn message_ids_survive_the_header_line() {
        for text in [
            "0190d3a0-0000-7000-8000-000000000000",
            " leading",
            "trailing ",
            "in side",
            "100%",
            "ünïcode",
            "tab\there",
        ] {
            let id = MessageId::parse(text).unwrap();
            let encoded = encode_message_id(&id);
            assert!(header_value_is_plain(&encoded), "{encoded:?}");
            assert_eq!(decode_message_id(&encoded), Some(id), "{text:?}");
        }
        assert_eq!(decode_message_id("%zz"), None);
        assert_eq!(decode_message_id("%4"), None);
    }

    #[test]
    fn metadata_round_trips_through_headers() {
        let metadata: Metadata = [
            ("correlation_id", "c-1"),
            ("Case", "upper"),
            ("case", "lower"),
            ("spaces", "  both  "),
            ("empty", ""),
            ("ünï", "cödé ✓ 𝄞"),
            ("Nats-Msg-Id", "not ours"),
            ("with:colon", "v"),
            ("newline", "a\r\nb"),
        ]
        .into_iter()
        .collect();
        let id = MessageId::new_v7();
        let headers = encode_headers(&id, &metadata);
        assert_eq!(
            headers.get("correlation_id").map(|v| v.as_str()),
            Some("c-1")
        );
        let (back_id, back) = decode_headers(Some(&headers), MessageId::new_v7).unwrap();
        assert_eq!(back_id, id);
        assert_eq!(back, metadata);
        let json = headers.get(METADATA_HEADER).unwrap().as_str();
        assert!(json.is_ascii(), "{json}");
    }

    #[test]
    fn foreign_messages_get_the_fallback_id() {
        let fallback = MessageId::parse("nats-s-1").unwrap();
        let (id, metadata) = decode_headers(None, || fallback.clone()).unwrap();
        assert_eq!(id, fallback);
        assert!(metadata.is_empty());
        let mut headers = HeaderMap::new();
        headers.insert(METADATA_HEADER, "[1]");
        assert!(decode_headers(Some(&headers), || fallback.clone()).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any id and any metadata come back from the headers exactly.
        #[test]
        fn every_message_round_trips(
            id in "\\PC{1,40}",
            entries in proptest::collection::btree_map("\\PC{1,12}", "\\PC{0,20}", 0..6),
        ) {
            let id = MessageId::parse(&id).unwrap();
            let metadata: Metadata = entries.into_iter().collect();
            let headers = encode_headers(&id, &metadata);
            for (name, values) in headers.iter() {
                for value in values {
                    let name: &str = name.as_ref();
                    proptest::prop_assert!(name != MESSAGE_ID_HEADER || header_value_is_plain(value.as_str()));
                    proptest::prop_assert!(!value.as_str().contains(['\r', '\n']));
                }
            }
            let (back_id, back) = decode_headers(Some(&headers), MessageId::new_v7).unwrap();
            proptest::prop_assert_eq!(back_id, id);
            proptest::prop_assert_eq!(back, metadata);
        }

        /// Headers from anybody decode to a message or a typed error, never a panic.
        #[test]
        fn foreign_headers_never_panic(
            pairs in proptest::collection::vec(("[!-9;-~]{1,16}", "[ -~]{0,40}"), 0..8),
            id in proptest::option::of("[ -~]{0,40}"),
        ) {
            let mut headers = HeaderMap::new();
            for (name, value) in &pairs {
                if let Ok(name) = name.parse::<async_nats::HeaderName>() {
                    headers.insert(name, value.as_str());
                }
            }
            if let Some(id) = &id {
                headers.insert(MESSAGE_ID_HEADER, id.as_str());
            }
            let _ = decode_headers(Some(&headers), MessageId::new_v7);
            let _ = decode_message_id(id.as_deref().unwrap_or(""));
        }
    }
}
