//! Revisions, positions, expected versions and timestamps.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// The 0-based, gapless index of an event within its stream.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Revision(pub u64);

impl Revision {
    /// The first revision of every stream.
    pub const FIRST: Self = Self(0);

    /// The revision as a number.
    pub const fn value(self) -> u64 {
        self.0
    }

    /// The revision after this one (`u64::MAX` stays: no stream gets that far, and a request
    /// naming it must not overflow).
    #[must_use]
    pub const fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// An event's place in the global log (`$all`): 0-based, gapless, strictly increasing and
/// assigned in commit order. A reader that has seen position `p` never later sees a lower one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    /// The first position of the log.
    pub const FIRST: Self = Self(0);

    /// The position as a number.
    pub const fn value(self) -> u64 {
        self.0
    }

    /// The position after this one (`u64::MAX` stays: no log gets that far, and a request
    /// naming it must not overflow).
    #[must_use]
    pub const fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The optimistic-concurrency condition of an append or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ExpectedVersion {
    /// No check.
    #[default]
    Any,
    /// The stream must not exist (never written, or no visible events after a soft delete).
    NoStream,
    /// The stream must exist and have at least one visible event.
    StreamExists,
    /// The last revision written to the stream must be exactly this.
    Exact(Revision),
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no-stream"),
            Self::StreamExists => f.write_str("exists"),
            Self::Exact(revision) => write!(f, "{revision}"),
        }
    }
}

/// A string that is not an expected version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not an expected version (any, no-stream, exists or a revision number)")]
pub struct ParseExpectedVersionError {
    /// The refused input.
    pub input: String,
}

impl FromStr for ExpectedVersion {
    type Err = ParseExpectedVersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "any" => Ok(Self::Any),
            "no-stream" => Ok(Self::NoStream),
            "exists" => Ok(Self::StreamExists),
            number => number
                .parse::<u64>()
                .map(|n| Self::Exact(Revision(n)))
                .map_err(|_| ParseExpectedVersionError {
                    input: s.to_owned(),
                }),
        }
    }
}

/// What a stream actually is, as reported in a concurrency error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamState {
    /// Nothing was ever written to the stream.
    NoStream,
    /// The last revision written is this one (its events may be hidden by a soft delete).
    At(Revision),
}

impl fmt::Display for StreamState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoStream => f.write_str("no-stream"),
            Self::At(revision) => write!(f, "{revision}"),
        }
    }
}

/// A UTC instant with microsecond precision (microseconds since the Unix epoch).
///
/// Serialized as RFC 3339 text, e.g. `2026-11-23T18:05:49.123456Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current time from the system clock.
    pub fn now() -> Self {
        let now = time::OffsetDateTime::now_utc();
        Self((now.unix_timestamp_nanos() / 1_000) as i64)
    }

    /// From microseconds since the Unix epoch.
    pub const fn from_unix_micros(micros: i64) -> Self {
        Self(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_unix_micros(self) -> i64 {
        self.0
    }

    /// This instant moved back by `duration` (saturating).
    #[must_use]
    pub fn saturating_sub(self, duration: std::time::Duration) -> Self {
        let micros = i64::try_from(duration.as_micros()).unwrap_or(i64::MAX);
        Self(self.0.saturating_sub(micros))
    }

    /// As a `time` date-time in UTC.
    pub fn to_offset_date_time(self) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    }

    /// RFC 3339 text with microseconds and a `Z` suffix.
    pub fn to_rfc3339(self) -> String {
        let t = self.to_offset_date_time();
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        )
    }

    /// Parses RFC 3339 text (any offset; kept to microseconds).
    pub fn parse_rfc3339(text: &str) -> Result<Self, time::error::Parse> {
        let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)?;
        Ok(Self((t.unix_timestamp_nanos() / 1_000) as i64))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_version_text_round_trips() {
        for v in [
            ExpectedVersion::Any,
            ExpectedVersion::NoStream,
            ExpectedVersion::StreamExists,
            ExpectedVersion::Exact(Revision(17)),
        ] {
            assert_eq!(v.to_string().parse::<ExpectedVersion>().unwrap(), v);
        }
        assert!("-1".parse::<ExpectedVersion>().is_err());
        assert!("latest".parse::<ExpectedVersion>().is_err());
    }

    #[test]
    fn timestamps_round_trip_through_rfc3339() {
        let t = Timestamp::from_unix_micros(1_795_000_000_123_456);
        let text = t.to_rfc3339();
        assert!(text.ends_with(".123456Z"), "{text}");
        assert_eq!(Timestamp::parse_rfc3339(&text).unwrap(), t);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
        assert!(Timestamp::now() > t);
    }
}
