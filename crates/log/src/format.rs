//! Byte layout of segment headers and records (see `docs/design/log-format.md`).
//!
//! Pure functions only: encoding appends to a `Vec<u8>`, decoding reads a byte slice and never
//! panics on any input (the fuzz target and the property tests feed it arbitrary bytes).

use std::{ops::Range, time::Duration};

use bytes::Bytes;
use factline_core::{
    ContentType, EventType, Metadata, Position, RecordedEvent, Revision, StreamId, StreamMetadata,
    Timestamp, Uuid,
};

/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Magic bytes at the start of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"FLSEG\0\0\x01";
/// Length of a segment header.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Length of a record's frame (length + CRC).
pub const FRAME_LEN: usize = 8;
/// Largest record body accepted on decode: the largest event (1 MiB by default, at most
/// 16 MiB here) plus room for the fixed fields, stream id and metadata.
pub const RECORD_BODY_BYTES_MAX: usize = 16 * 1024 * 1024 + 64 * 1024;

const KIND_EVENT: u8 = 1;
const KIND_METADATA: u8 = 2;
const KIND_TOMBSTONE: u8 = 3;
const FLAG_COMMIT: u8 = 1;

/// A segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The segment's number.
    pub segment_no: u64,
    /// The position of the first event that may live in this segment.
    pub first_position: u64,
}

/// Why bytes are not a valid header or record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the frame or body needs (a torn write, at the tail).
    #[error("truncated: needs {needed} bytes, {available} available")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The CRC does not match.
    #[error("checksum mismatch")]
    Checksum,
    /// The length field is out of range.
    #[error("record length {len} is out of range")]
    Length {
        /// The length read.
        len: u32,
    },
    /// A segment header with the wrong magic bytes.
    #[error("not a factline segment (bad magic)")]
    Magic,
    /// A segment written by a newer format.
    #[error("segment format version {found} is newer than {FORMAT_VERSION}")]
    Version {
        /// The version found.
        found: u32,
    },
    /// The body is not a valid record (unknown kind, bad UTF-8, invalid names, trailing bytes).
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

/// Encodes a segment header.
pub fn encode_segment_header(header: &SegmentHeader) -> [u8; SEGMENT_HEADER_LEN] {
    let mut out = [0u8; SEGMENT_HEADER_LEN];
    out[0..8].copy_from_slice(&SEGMENT_MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
    out[16..24].copy_from_slice(&header.segment_no.to_le_bytes());
    out[24..32].copy_from_slice(&header.first_position.to_le_bytes());
    let crc = crc32c::crc32c(&out[..60]);
    out[60..64].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a segment header.
pub fn decode_segment_header(bytes: &[u8]) -> Result<SegmentHeader, DecodeError> {
    if bytes.len() < SEGMENT_HEADER_LEN {
        return Err(DecodeError::Truncated {
            needed: SEGMENT_HEADER_LEN,
            available: bytes.len(),
        });
    }
    let stored_crc = u32::from_le_bytes([bytes[60], bytes[61], bytes[62], bytes[63]]);
    if crc32c::crc32c(&bytes[..60]) != stored_crc {
        return Err(DecodeError::Checksum);
    }
    if bytes[0..8] != SEGMENT_MAGIC {
        return Err(DecodeError::Magic);
    }
    let mut reader = Reader::new(&bytes[8..60]);
    let version = reader.u32()?;
    if version > FORMAT_VERSION {
        return Err(DecodeError::Version { found: version });
    }
    if reader.u32()? as usize != SEGMENT_HEADER_LEN {
        return Err(DecodeError::Malformed("segment header length"));
    }
    Ok(SegmentHeader {
        segment_no: reader.u64()?,
        first_position: reader.u64()?,
    })
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// An event.
    Event(RecordedEvent),
    /// New metadata for a stream (also how a soft delete is stored).
    Metadata {
        /// The stream.
        stream: StreamId,
        /// Its new metadata.
        metadata: StreamMetadata,
    },
    /// A stream was tombstoned.
    Tombstone {
        /// The stream.
        stream: StreamId,
    },
}

impl Record {
    /// The stream the record is about.
    pub fn stream(&self) -> &StreamId {
        match self {
            Self::Event(event) => &event.stream,
            Self::Metadata { stream, .. } | Self::Tombstone { stream } => stream,
        }
    }
}

/// A record plus its framing facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framed {
    /// The record.
    pub record: Record,
    /// True when this record ends a transaction.
    pub commit: bool,
    /// Bytes the record occupies including its frame.
    pub len_bytes: usize,
}

/// Appends one framed record to `out`.
pub fn encode_record(out: &mut Vec<u8>, record: &Record, commit: bool) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_LEN]);
    let flags = if commit { FLAG_COMMIT } else { 0 };
    match record {
        Record::Event(event) => {
            out.push(KIND_EVENT);
            out.push(flags);
            out.extend_from_slice(&event.position.0.to_le_bytes());
            out.extend_from_slice(&event.revision.0.to_le_bytes());
            out.extend_from_slice(&event.recorded_at.as_unix_micros().to_le_bytes());
            out.extend_from_slice(event.id.as_bytes());
            out.push(match event.content_type {
                ContentType::Json => 1,
                ContentType::Binary => 2,
            });
            put_str16(out, event.stream.as_str());
            put_str16(out, &event.event_type);
            out.extend_from_slice(&(event.metadata.len() as u16).to_le_bytes());
            for (key, value) in event.metadata.iter() {
                put_str16(out, key);
                put_bytes32(out, value.as_bytes());
            }
            put_bytes32(out, &event.data);
        }
        Record::Metadata { stream, metadata } => {
            out.push(KIND_METADATA);
            out.push(flags);
            put_str16(out, stream.as_str());
            let presence = u8::from(metadata.max_count.is_some())
                | u8::from(metadata.max_age.is_some()) << 1
                | u8::from(metadata.truncate_before.is_some()) << 2;
            out.push(presence);
            out.extend_from_slice(&metadata.max_count.unwrap_or(0).to_le_bytes());
            let age = metadata.max_age.map_or(0, |age| age.as_secs());
            out.extend_from_slice(&age.to_le_bytes());
            let before = metadata.truncate_before.map_or(0, |r| r.0);
            out.extend_from_slice(&before.to_le_bytes());
        }
        Record::Tombstone { stream } => {
            out.push(KIND_TOMBSTONE);
            out.push(flags);
            put_str16(out, stream.as_str());
        }
    }
    let body_len = (out.len() - start - FRAME_LEN) as u32;
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    let mut crc = crc32c::crc32c(&body_len.to_le_bytes());
    crc = crc32c::crc32c_append(crc, &out[start + FRAME_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The encoded size of an event record (for limits and buffer sizing).
pub fn event_record_len(event: &RecordedEvent) -> usize {
    FRAME_LEN
        + 2
        + 8
        + 8
        + 8
        + 16
        + 1
        + 2
        + event.stream.as_str().len()
        + 2
        + event.event_type.len()
        + 2
        + event
            .metadata
            .iter()
            .map(|(k, v)| 2 + k.len() + 4 + v.len())
            .sum::<usize>()
        + 4
        + event.data.len()
}

/// Decodes the record at the start of `bytes`, copying the event data.
pub fn decode_record(bytes: &[u8]) -> Result<Framed, DecodeError> {
    decode_with(bytes, Bytes::copy_from_slice, &mut Recent::default())
}

/// Decodes the record at the start of `source`, sharing the event data with `source` instead
/// of copying it.
pub fn decode_record_shared(source: &Bytes) -> Result<Framed, DecodeError> {
    decode_with(
        source,
        |data| source.slice_ref(data),
        &mut Recent::default(),
    )
}

/// Decodes records one after another, reusing the stream id and event type of recent records
/// when the next one names the same (runs of one stream and a few types are common in a log), so
/// that decoding a batch does not allocate a name per event.
#[derive(Debug, Default)]
pub struct Decoder {
    recent: Recent,
}

/// Event types kept by a [`Decoder`] for reuse.
const RECENT_EVENT_TYPES: usize = 8;

/// The names a [`Decoder`] reuses: the last stream id and the last few event types.
#[derive(Debug, Default)]
struct Recent {
    stream: Option<StreamId>,
    event_types: [Option<EventType>; RECENT_EVENT_TYPES],
    /// Where the next new event type goes (round robin).
    next_event_type: usize,
}

impl Recent {
    fn event_type(&mut self, name: &str) -> EventType {
        for event_type in self.event_types.iter().flatten() {
            if event_type.as_str() == name {
                return event_type.clone();
            }
        }
        let event_type = EventType::from(name);
        self.event_types[self.next_event_type] = Some(event_type.clone());
        self.next_event_type = (self.next_event_type + 1) % RECENT_EVENT_TYPES;
        event_type
    }
}

impl Decoder {
    /// Decodes the record at the start of `bytes` without copying the event data: an event
    /// comes back with empty `data`, and the range of its payload within `bytes` comes with it
    /// (empty for other records), so that a batch reader can gather the payloads it keeps into
    /// one buffer instead of allocating once per event.
    pub fn decode_deferring_data(
        &mut self,
        bytes: &[u8],
    ) -> Result<(Framed, Range<usize>), DecodeError> {
        let mut range = 0..0;
        let base = bytes.as_ptr() as usize;
        let framed = decode_with(
            bytes,
            |data| {
                let start = data.as_ptr() as usize - base;
                range = start..start + data.len();
                Bytes::new()
            },
            &mut self.recent,
        )?;
        Ok((framed, range))
    }
}

fn decode_with(
    bytes: &[u8],
    data_of: impl FnOnce(&[u8]) -> Bytes,
    recent: &mut Recent,
) -> Result<Framed, DecodeError> {
    if bytes.len() < FRAME_LEN {
        return Err(DecodeError::Truncated {
            needed: FRAME_LEN,
            available: bytes.len(),
        });
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if len < 2 || len as usize > RECORD_BODY_BYTES_MAX {
        return Err(DecodeError::Length { len });
    }
    let total = FRAME_LEN + len as usize;
    if bytes.len() < total {
        return Err(DecodeError::Truncated {
            needed: total,
            available: bytes.len(),
        });
    }
    let stored_crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let body = &bytes[FRAME_LEN..total];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[0..4]), body);
    if crc != stored_crc {
        return Err(DecodeError::Checksum);
    }
    let mut reader = Reader::new(body);
    let kind = reader.u8()?;
    let flags = reader.u8()?;
    if flags & !FLAG_COMMIT != 0 {
        return Err(DecodeError::Malformed("unknown flags"));
    }
    let record = match kind {
        KIND_EVENT => {
            let position = Position(reader.u64()?);
            let revision = Revision(reader.u64()?);
            let recorded_at = Timestamp::from_unix_micros(reader.i64()?);
            let id = Uuid::from_bytes(reader.array::<16>()?);
            let content_type = match reader.u8()? {
                1 => ContentType::Json,
                2 => ContentType::Binary,
                _ => return Err(DecodeError::Malformed("content type")),
            };
            let stream = reader.stream(&mut recent.stream)?;
            let event_type = recent.event_type(reader.str16()?);
            let metadata_len = reader.u16()?;
            let mut metadata = Metadata::new();
            let mut previous_key: Option<&str> = None;
            for _ in 0..metadata_len {
                let key = reader.str16()?;
                // Keys are written in ascending order, each once: anything else is damage.
                if previous_key.is_some_and(|previous| previous >= key) {
                    return Err(DecodeError::Malformed(
                        "metadata keys out of order or repeated",
                    ));
                }
                previous_key = Some(key);
                let key = key.to_owned();
                let value = std::str::from_utf8(reader.bytes32()?)
                    .map_err(|_| DecodeError::Malformed("metadata value is not UTF-8"))?
                    .to_owned();
                metadata.insert(key, value);
            }
            let data = data_of(reader.bytes32()?);
            Record::Event(RecordedEvent {
                stream,
                revision,
                position,
                recorded_at,
                id,
                event_type,
                content_type,
                data,
                metadata,
            })
        }
        KIND_METADATA => {
            let stream = reader.stream(&mut recent.stream)?;
            let presence = reader.u8()?;
            if presence & !0b111 != 0 {
                return Err(DecodeError::Malformed("metadata presence bits"));
            }
            let max_count = reader.u64()?;
            let max_age = reader.u64()?;
            let truncate_before = reader.u64()?;
            // An absent field is written as zero: anything else is damage.
            let absent_but_set = (presence & 1 == 0 && max_count != 0)
                || (presence & 2 == 0 && max_age != 0)
                || (presence & 4 == 0 && truncate_before != 0);
            if absent_but_set {
                return Err(DecodeError::Malformed(
                    "value present for an absent metadata field",
                ));
            }
            Record::Metadata {
                stream,
                metadata: StreamMetadata {
                    max_count: (presence & 1 != 0).then_some(max_count),
                    max_age: (presence & 2 != 0).then_some(Duration::from_secs(max_age)),
                    truncate_before: (presence & 4 != 0).then_some(Revision(truncate_before)),
                },
            }
        }
        KIND_TOMBSTONE => Record::Tombstone {
            stream: reader.stream(&mut recent.stream)?,
        },
        _ => return Err(DecodeError::Malformed("unknown record kind")),
    };
    if !reader.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes in record"));
    }
    Ok(Framed {
        record,
        commit: flags & FLAG_COMMIT != 0,
        len_bytes: total,
    })
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    // Stream ids and event types are at most 255 bytes and metadata keys are bounded by the
    // event size limit checked before encoding; u16 always fits.
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_bytes32(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Malformed(
                "field runs past the end of the record",
            ));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn str16(&mut self) -> Result<&'a str, DecodeError> {
        let len = self.u16()? as usize;
        std::str::from_utf8(self.take(len)?)
            .map_err(|_| DecodeError::Malformed("string is not UTF-8"))
    }

    fn bytes32(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn stream(&mut self, last: &mut Option<StreamId>) -> Result<StreamId, DecodeError> {
        let name = self.str16()?;
        if let Some(stream) = last.as_ref().filter(|s| s.as_str() == name) {
            return Ok(stream.clone());
        }
        let stream =
            StreamId::new(name).map_err(|_| DecodeError::Malformed("invalid stream id"))?;
        *last = Some(stream.clone());
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_event() -> RecordedEvent {
        RecordedEvent {
            stream: StreamId::new("order-1").unwrap(),
            revision: Revision(3),
            position: Position(99),
            recorded_at: Timestamp::from_unix_micros(1_795_000_000_000_000),
            id: Uuid::now_v7(),
            event_type: "OrderPlaced".into(),
            content_type: ContentType::Json,
            data: Bytes::from_static(br#"{"total":5}"#),
            metadata: Metadata::new().with("correlation_id", "c-1"),
        }
    }

    #[test]
    fn records_round_trip() {
        let records = [
            Record::Event(sample_event()),
            Record::Metadata {
                stream: StreamId::new("order-1").unwrap(),
                metadata: StreamMetadata {
                    max_count: Some(5),
                    max_age: None,
                    truncate_before: Some(Revision(2)),
                },
            },
            Record::Tombstone {
                stream: StreamId::new("order-2").unwrap(),
            },
        ];
        let mut buffer = Vec::new();
        for (i, record) in records.iter().enumerate() {
            encode_record(&mut buffer, record, i == 2);
        }
        let source = Bytes::from(buffer);
        let mut offset = 0;
        for (i, record) in records.iter().enumerate() {
            let framed = decode_record_shared(&source.slice(offset..)).unwrap();
            assert_eq!(&framed.record, record);
            assert_eq!(framed.commit, i == 2);
            offset += framed.len_bytes;
        }
        assert_eq!(offset, source.len());
        let mut single = Vec::new();
        encode_record(&mut single, &records[0], false);
        let Record::Event(event) = &records[0] else {
            unreachable!()
        };
        assert_eq!(single.len(), event_record_len(event));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut buffer = Vec::new();
        encode_record(&mut buffer, &Record::Event(sample_event()), true);
        for byte in 0..buffer.len() {
            for bit in 0..8 {
                let mut damaged = buffer.clone();
                damaged[byte] ^= 1 << bit;
                assert!(decode_record(&damaged).is_err(), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn every_prefix_is_truncated() {
        let mut buffer = Vec::new();
        encode_record(&mut buffer, &Record::Event(sample_event()), true);
        for len in 0..buffer.len() {
            assert!(matches!(
                decode_record(&buffer[..len]),
                Err(DecodeError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn segment_headers_round_trip_and_refuse_damage() {
        let header = SegmentHeader {
            segment_no: 7,
            first_position: 1234,
        };
        let bytes = encode_segment_header(&header);
        assert_eq!(decode_segment_header(&bytes).unwrap(), header);
        let mut damaged = bytes;
        damaged[20] ^= 1;
        assert_eq!(decode_segment_header(&damaged), Err(DecodeError::Checksum));
        assert!(decode_segment_header(&bytes[..10]).is_err());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_record(&bytes);
            let _ = decode_segment_header(&bytes);
        }

        #[test]
        fn arbitrary_events_round_trip(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            event_type in "[A-Za-z]{1,40}",
            stream in "[a-z]{1,10}-[0-9]{1,5}",
            meta in proptest::collection::btree_map("[a-z_]{1,12}", "\\PC{0,20}", 0..4),
            revision in any::<u64>(),
            position in any::<u64>(),
            micros in any::<i64>(),
            binary in any::<bool>(),
        ) {
            let event = RecordedEvent {
                stream: StreamId::new(&stream).unwrap(),
                revision: Revision(revision),
                position: Position(position),
                recorded_at: Timestamp::from_unix_micros(micros),
                id: Uuid::now_v7(),
                event_type: event_type.into(),
                content_type: if binary { ContentType::Binary } else { ContentType::Json },
                data: Bytes::from(data),
                metadata: meta.into_iter().collect(),
            };
            let mut buffer = Vec::new();
            encode_record(&mut buffer, &Record::Event(event.clone()), true);
            let framed = decode_record(&buffer).unwrap();
            prop_assert_eq!(framed.record, Record::Event(event));
            prop_assert!(framed.commit);
        }
    }
}
