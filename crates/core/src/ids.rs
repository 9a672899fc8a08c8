//! Validated names: [`StreamId`] and the event-type rules.

use std::{fmt, str::FromStr, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest stream id, in UTF-8 bytes.
pub const STREAM_ID_BYTES_MAX: usize = 255;
/// Longest event type name, in UTF-8 bytes.
pub const EVENT_TYPE_BYTES_MAX: usize = 255;

/// Why a stream id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamIdError {
    /// The id was the empty string.
    #[error("stream id is empty (it must be 1..={STREAM_ID_BYTES_MAX} bytes of UTF-8)")]
    Empty,
    /// The id is longer than [`STREAM_ID_BYTES_MAX`].
    #[error(
        "stream id is {len_bytes} bytes long; the limit stream_id_bytes_max is {STREAM_ID_BYTES_MAX}"
    )]
    TooLong {
        /// Length of the refused id in bytes.
        len_bytes: usize,
    },
    /// The id contains a control character.
    #[error("stream id contains a control character (U+{code_point:04X}) at byte {byte_offset}")]
    ControlCharacter {
        /// Byte offset of the character.
        byte_offset: usize,
        /// The character's code point.
        code_point: u32,
    },
    /// The id starts with `$`, which is reserved for system streams.
    #[error("stream id {id:?} starts with '$', which is reserved for system streams")]
    Reserved {
        /// The refused id.
        id: String,
    },
}

/// The id of a stream: `"{category}-{id}"` by convention.
///
/// Invariants (checked by [`StreamId::new`]): 1..=255 bytes of UTF-8, no control characters,
/// and no leading `$` (reserved for system streams). Cloning is cheap (a shared `Arc<str>`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(Arc<str>);

impl StreamId {
    /// Validates `id` and wraps it.
    pub fn new(id: impl AsRef<str>) -> Result<Self, StreamIdError> {
        let id = id.as_ref();
        validate_name(id, STREAM_ID_BYTES_MAX).map_err(|problem| match problem {
            NameProblem::Empty => StreamIdError::Empty,
            NameProblem::TooLong { len_bytes } => StreamIdError::TooLong { len_bytes },
            NameProblem::ControlCharacter {
                byte_offset,
                code_point,
            } => StreamIdError::ControlCharacter {
                byte_offset,
                code_point,
            },
        })?;
        if id.starts_with('$') {
            return Err(StreamIdError::Reserved { id: id.to_owned() });
        }
        Ok(Self(Arc::from(id)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The category: the part before the first `-`, or the whole id when it has no `-`.
    pub fn category(&self) -> &str {
        category_of(&self.0)
    }
}

/// The category of a stream name: the part before the first `-`, or the whole name.
pub fn category_of(stream: &str) -> &str {
    match stream.find('-') {
        Some(index) => &stream[..index],
        None => stream,
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for StreamId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for StreamId {
    type Err = StreamIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for StreamId {
    type Error = StreamIdError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for StreamId {
    type Error = StreamIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl Serialize for StreamId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::new(&*raw).map_err(serde::de::Error::custom)
    }
}

/// What is wrong with a name (shared by stream ids and event types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameProblem {
    Empty,
    TooLong { len_bytes: usize },
    ControlCharacter { byte_offset: usize, code_point: u32 },
}

pub(crate) fn validate_name(name: &str, len_bytes_max: usize) -> Result<(), NameProblem> {
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if name.len() > len_bytes_max {
        return Err(NameProblem::TooLong {
            len_bytes: name.len(),
        });
    }
    if let Some((byte_offset, c)) = name.char_indices().find(|(_, c)| c.is_control()) {
        return Err(NameProblem::ControlCharacter {
            byte_offset,
            code_point: c as u32,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids_and_splits_the_category() {
        let id = StreamId::new("order-42").unwrap();
        assert_eq!(id.as_str(), "order-42");
        assert_eq!(id.category(), "order");
        assert_eq!(StreamId::new("order").unwrap().category(), "order");
        assert_eq!(StreamId::new("a-b-c").unwrap().category(), "a");
        assert_eq!(StreamId::new("ünïcødé-1").unwrap().category(), "ünïcødé");
    }

    #[test]
    fn refuses_bad_ids_with_a_reason() {
        assert_eq!(StreamId::new(""), Err(StreamIdError::Empty));
        assert_eq!(
            StreamId::new("x".repeat(256)),
            Err(StreamIdError::TooLong { len_bytes: 256 })
        );
        assert!(StreamId::new("x".repeat(255)).is_ok());
        // 128 two-byte characters: 256 bytes although only 128 chars.
        assert_eq!(
            StreamId::new("é".repeat(128)),
            Err(StreamIdError::TooLong { len_bytes: 256 })
        );
        assert_eq!(
            StreamId::new("a\nb"),
            Err(StreamIdError::ControlCharacter {
                byte_offset: 1,
                code_point: 10
            })
        );
        assert!(matches!(
            StreamId::new("$all"),
            Err(StreamIdError::Reserved { .. })
        ));
        let message = StreamId::new("x".repeat(300)).unwrap_err().to_string();
        assert!(message.contains("stream_id_bytes_max"), "{message}");
    }

    #[test]
    fn serde_validates_on_the_way_in() {
        let id: StreamId = serde_json::from_str("\"order-1\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"order-1\"");
        assert!(serde_json::from_str::<StreamId>("\"$system\"").is_err());
    }
}
