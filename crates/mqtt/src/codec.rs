//! How a [`Message`] travels as an MQTT 5 PUBLISH: the payload as it is, the id and the
//! metadata as user properties (escaped so that Mosquitto's UTF-8 rules never refuse them).

use bytes::Bytes;
use factline_messaging::{InvalidTopic, Message, MessageId, Metadata, check_topic};
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};

/// The user property that carries the message id; its presence marks a factline message.
pub(crate) const ID_PROPERTY: &str = "fl-id";
/// The prefix of the user properties that carry metadata entries (`fl-m:{key}`).
pub(crate) const METADATA_PREFIX: &str = "fl-m:";

/// Whether Mosquitto refuses `c` inside a UTF-8 string of a packet: control characters and
/// Unicode non-characters (it disconnects a client that sends one).
fn refused_by_broker(c: char) -> bool {
    let code = u32::from(c);
    c.is_control() || (0xFDD0..=0xFDEF).contains(&code) || (code & 0xFFFE) == 0xFFFE
}

/// `text` with `%` and every character the broker refuses written as `%` and six hex digits
/// of the code point: injective, and the identity on everyday text.
pub(crate) fn escape(text: &str) -> String {
    if !text.chars().any(|c| c == '%' || refused_by_broker(c)) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c == '%' || refused_by_broker(c) {
            out.push_str(&format!("%{:06X}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// The inverse of [`escape`]; `None` for a text [`escape`] cannot have written.
pub(crate) fn unescape(text: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !text.contains('%') {
        return Some(std::borrow::Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let hex = rest.get(at + 1..at + 7)?;
        let code = u32::from_str_radix(hex, 16).ok()?;
        out.push(char::from_u32(code)?);
        rest = &rest[at + 7..];
    }
    out.push_str(rest);
    Some(std::borrow::Cow::Owned(out))
}

/// The MQTT topic name for `topic` under `prefix`, or why it cannot be one.
pub(crate) fn topic_name(prefix: &str, topic: &str) -> Result<String, InvalidTopic> {
    check_topic(topic)?;
    let refuse = |reason: &str| InvalidTopic {
        topic: topic.chars().take(64).collect(),
        reason: reason.to_owned(),
    };
    if topic.contains(['+', '#']) {
        return Err(refuse(
            "MQTT topic names must not contain the wildcards `+` and `#`",
        ));
    }
    if topic.chars().any(refused_by_broker) {
        return Err(refuse(
            "MQTT topic names must not contain Unicode non-characters",
        ));
    }
    let name = format!("{prefix}{topic}");
    if name.starts_with('$') {
        return Err(refuse(
            "MQTT topic names starting with `$` are reserved for the broker",
        ));
    }
    Ok(name)
}

/// The user properties of `message`: its id, then its metadata entries.
pub(crate) fn properties(message: &Message) -> PublishProperties {
    let mut user_properties = Vec::with_capacity(1 + message.metadata.len());
    user_properties.push((ID_PROPERTY.to_owned(), escape(&message.id.to_text())));
    for (key, value) in message.metadata.iter() {
        user_properties.push((format!("{METADATA_PREFIX}{}", escape(key)), escape(value)));
    }
    PublishProperties {
        user_properties,
        ..PublishProperties::default()
    }
}

/// About how many bytes the PUBLISH of `message` takes on the wire.
pub(crate) fn packet_size_bytes(topic: &str, payload: &Bytes, props: &PublishProperties) -> usize {
    let properties: usize = props
        .user_properties
        .iter()
        .map(|(k, v)| 1 + 2 + k.len() + 2 + v.len())
        .sum();
    // Fixed header (up to 5), topic length (2), packet id (2), properties length (up to 4).
    5 + 2 + topic.len() + 2 + 4 + properties + payload.len()
}

/// The message a PUBLISH carries. A factline message (an `fl-id` user property) gets back its
/// id and metadata; any other publish (a foreign client's) gets a new id, its user properties
/// as metadata (the first of repeated keys) and its content type as `content_type`.
pub(crate) fn to_message(publish: &Publish) -> Message {
    let props = publish.properties.as_ref();
    let user = props.map(|p| p.user_properties.as_slice()).unwrap_or(&[]);
    if let Some(message) = own_message(publish, user) {
        return message;
    }
    let mut metadata = Metadata::new();
    for (key, value) in user {
        if !metadata.contains_key(key) {
            metadata.insert(key.clone(), value.clone());
        }
    }
    if let Some(content_type) = props.and_then(|p| p.content_type.as_ref())
        && !metadata.contains_key(Metadata::CONTENT_TYPE)
    {
        metadata.insert(Metadata::CONTENT_TYPE, content_type.clone());
    }
    let mut message = Message::new(publish.payload.clone());
    message.metadata = metadata;
    message
}

fn own_message(publish: &Publish, user: &[(String, String)]) -> Option<Message> {
    let (_, id) = user.iter().find(|(key, _)| key == ID_PROPERTY)?;
    let id = MessageId::parse(&unescape(id)?).ok()?;
    let mut metadata = Metadata::new();
    for (key, value) in user {
        if let Some(key) = key.strip_prefix(METADATA_PREFIX) {
            metadata.insert(unescape(key)?.into_owned(), unescape(value)?.into_owned());
        }
    }
    let mut message = Message::with_id(id, publish.payload.clone());
    message.metadata = metadata;
    Some(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_injective_and_reversible() {
        for text in [
            "",
            "plain",
            "100%",
            "%000041",
            "line\nbreak",
            "tab\t",
            "nul\0",
            "\u{7f}\u{85}",
            "\u{FFFE}\u{FDD0}",
            "ünïcødé ✓ 🦀",
            "  padded  ",
        ] {
            let escaped = escape(text);
            assert!(!escaped.chars().any(refused_by_broker), "{escaped:?}");
            assert_eq!(unescape(&escaped).as_deref(), Some(text));
        }
        assert_ne!(escape("%000041"), escape("A"));
        assert_eq!(unescape("%zz"), None);
    }

    #[test]
    fn topics_are_mapped_or_refused() {
        assert_eq!(topic_name("", "a/b").ok().as_deref(), Some("a/b"));
        assert_eq!(topic_name("fl/", "x").ok().as_deref(), Some("fl/x"));
        assert!(topic_name("", "a/+").is_err());
        assert!(topic_name("", "a/#").is_err());
        assert!(topic_name("", "$SYS/x").is_err());
        assert_eq!(topic_name("p/", "$x").ok().as_deref(), Some("p/$x"));
        assert!(topic_name("", "bad\u{FFFF}").is_err());
        assert!(topic_name("", "").is_err());
    }

    #[test]
    fn messages_round_trip_and_foreign_ones_get_an_id() {
        let message = Message::new(Bytes::from_static(b"\0\xff"))
            .with_metadata("k\n", "v%")
            .with_metadata("fl-id", "not the id");
        let publish = Publish {
            properties: Some(properties(&message)),
            payload: message.payload.clone(),
            ..Publish::new(
                "t",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                Bytes::new(),
                None,
            )
        };
        assert!(to_message(&publish).same_content(&message));

        let mut foreign = Publish::new(
            "t",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            Bytes::from_static(b"plain"),
            None,
        );
        foreign.properties = Some(PublishProperties {
            user_properties: vec![("trace".into(), "1".into()), ("trace".into(), "2".into())],
            content_type: Some("text/plain".into()),
            ..PublishProperties::default()
        });
        let received = to_message(&foreign);
        assert_eq!(&received.payload[..], b"plain");
        assert_eq!(received.metadata.get("trace"), Some("1"));
        assert_eq!(received.metadata.get("content_type"), Some("text/plain"));
    }
}
