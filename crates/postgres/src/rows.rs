//! Conversions between rows and the event model. A row that cannot be decoded is reported as a
//! storage error naming the column, never as a panic.

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use factline_core::{
    ContentType, EventType, Metadata, Position, RecordedEvent, Revision, StorageError, StreamId,
    StreamMetadata, Timestamp,
};
use sqlx::{Row as _, postgres::PgRow};
use time::OffsetDateTime;
use uuid::Uuid;

/// A row held something the store never writes.
#[derive(Debug, thiserror::Error)]
#[error("a stored row cannot be decoded: column {column}: {reason}")]
pub struct CorruptRow {
    /// The column.
    pub column: &'static str,
    /// What is wrong.
    pub reason: String,
}

pub(crate) fn corrupt(column: &'static str, reason: impl ToString) -> StorageError {
    StorageError::backend(CorruptRow {
        column,
        reason: reason.to_string(),
    })
}

/// A `u64` as a `bigint`, saturating (revisions and positions never come near `i64::MAX`).
pub(crate) fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn from_sql(column: &'static str, value: i64) -> Result<u64, StorageError> {
    u64::try_from(value).map_err(|_| corrupt(column, format!("negative value {value}")))
}

pub(crate) fn timestamp(value: OffsetDateTime) -> Timestamp {
    Timestamp::from_unix_micros(
        i64::try_from(value.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX),
    )
}

pub(crate) fn offset_date_time(value: Timestamp) -> OffsetDateTime {
    value.to_offset_date_time()
}

pub(crate) const CONTENT_JSON: i16 = 0;
pub(crate) const CONTENT_BINARY: i16 = 1;

pub(crate) fn content_code(content_type: ContentType) -> i16 {
    match content_type {
        ContentType::Json => CONTENT_JSON,
        ContentType::Binary => CONTENT_BINARY,
    }
}

fn content_type(code: i16) -> Result<ContentType, StorageError> {
    match code {
        CONTENT_JSON => Ok(ContentType::Json),
        CONTENT_BINARY => Ok(ContentType::Binary),
        other => Err(corrupt("content_type", format!("unknown code {other}"))),
    }
}

/// Metadata as stored: `None` when empty, else a JSON object of strings.
pub(crate) fn encode_metadata(metadata: &Metadata) -> Option<Vec<u8>> {
    if metadata.is_empty() {
        return None;
    }
    // A map of strings always serializes.
    serde_json::to_vec(metadata).ok()
}

/// Column `index` of `row` as `T`; a value that does not decode is a [`CorruptRow`] naming
/// `column`.
pub(crate) fn get<'r, T>(
    row: &'r PgRow,
    index: usize,
    column: &'static str,
) -> Result<T, StorageError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(index).map_err(|error| corrupt(column, error))
}

/// Shares one [`StreamId`] and one [`EventType`] per distinct value within a page. Neighbours in
/// the log often share both (a batch of one stream, one event type), so the last value is
/// checked before the map.
#[derive(Default)]
pub(crate) struct Interner {
    streams: HashMap<String, StreamId>,
    types: HashMap<String, EventType>,
    last_stream: Option<StreamId>,
    last_type: Option<EventType>,
}

impl Interner {
    fn stream(&mut self, name: &str) -> Result<StreamId, StorageError> {
        if let Some(last) = &self.last_stream
            && last.as_str() == name
        {
            return Ok(last.clone());
        }
        let stream = match self.streams.get(name) {
            Some(stream) => stream.clone(),
            None => {
                let stream = StreamId::new(name).map_err(|error| corrupt("stream", error))?;
                self.streams.insert(name.to_owned(), stream.clone());
                stream
            }
        };
        self.last_stream = Some(stream.clone());
        Ok(stream)
    }

    fn event_type(&mut self, name: &str) -> EventType {
        if let Some(last) = &self.last_type
            && last.as_str() == name
        {
            return last.clone();
        }
        let event_type = match self.types.get(name) {
            Some(event_type) => event_type.clone(),
            None => {
                let event_type = EventType::from(name);
                self.types.insert(name.to_owned(), event_type.clone());
                event_type
            }
        };
        self.last_type = Some(event_type.clone());
        event_type
    }
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// The binary value of column `index`, `None` when NULL. Scans read millions of rows: decoding
/// the wire format directly (it is fixed and documented) skips sqlx's per-value type checks and
/// conversions, which cost more than the rest of the read.
fn raw<'r>(
    row: &'r PgRow,
    index: usize,
    column: &'static str,
) -> Result<Option<&'r [u8]>, StorageError> {
    use sqlx::ValueRef as _;
    let value = row
        .try_get_raw(index)
        .map_err(|error| corrupt(column, error))?;
    if value.is_null() {
        return Ok(None);
    }
    if value.format() != sqlx::postgres::PgValueFormat::Binary {
        return Err(corrupt(column, "expected the binary format"));
    }
    value
        .as_bytes()
        .map(Some)
        .map_err(|error| corrupt(column, error))
}

fn raw_required<'r>(
    row: &'r PgRow,
    index: usize,
    column: &'static str,
) -> Result<&'r [u8], StorageError> {
    raw(row, index, column)?.ok_or_else(|| corrupt(column, "NULL"))
}

fn raw_fixed<const N: usize>(
    row: &PgRow,
    index: usize,
    column: &'static str,
) -> Result<[u8; N], StorageError> {
    raw_required(row, index, column)?
        .try_into()
        .map_err(|_| corrupt(column, format!("expected {N} bytes")))
}

fn raw_u64(row: &PgRow, index: usize, column: &'static str) -> Result<u64, StorageError> {
    from_sql(column, i64::from_be_bytes(raw_fixed(row, index, column)?))
}

fn raw_str<'r>(
    row: &'r PgRow,
    index: usize,
    column: &'static str,
) -> Result<&'r str, StorageError> {
    std::str::from_utf8(raw_required(row, index, column)?).map_err(|error| corrupt(column, error))
}

fn raw_timestamp(
    row: &PgRow,
    index: usize,
    column: &'static str,
) -> Result<Timestamp, StorageError> {
    let micros = i64::from_be_bytes(raw_fixed(row, index, column)?);
    Ok(Timestamp::from_unix_micros(
        micros.saturating_add(POSTGRES_EPOCH_UNIX_MICROS),
    ))
}

/// Decodes a row of [`crate::sql::EVENT_COLUMNS`]. `stream` is the stream when the caller knows
/// it (a stream read), which skips decoding the column.
pub(crate) fn decode_event(
    row: &PgRow,
    stream: Option<&StreamId>,
    interner: &mut Interner,
) -> Result<RecordedEvent, StorageError> {
    let stream = match stream {
        Some(stream) => stream.clone(),
        None => interner.stream(raw_str(row, 1, "stream")?)?,
    };
    let metadata = match raw(row, 7, "metadata")? {
        None => Metadata::new(),
        Some(bytes) => serde_json::from_slice(bytes).map_err(|e| corrupt("metadata", e))?,
    };
    Ok(RecordedEvent {
        stream,
        revision: Revision(raw_u64(row, 2, "revision")?),
        position: Position(raw_u64(row, 0, "position")?),
        recorded_at: raw_timestamp(row, 8, "recorded_at")?,
        id: Uuid::from_bytes(raw_fixed(row, 3, "id")?),
        event_type: interner.event_type(raw_str(row, 4, "event_type")?),
        content_type: content_type(i16::from_be_bytes(raw_fixed(row, 5, "content_type")?))?,
        data: Bytes::copy_from_slice(raw_required(row, 6, "data")?),
        metadata,
    })
}

/// A row of the `streams` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StreamRow {
    pub(crate) last_revision: Option<Revision>,
    pub(crate) last_recorded_at: Option<Timestamp>,
    pub(crate) metadata: StreamMetadata,
    pub(crate) tombstoned: bool,
}

impl StreamRow {
    /// Decodes the columns `last_revision, last_recorded_at, max_count, max_age_us,
    /// truncate_before, tombstoned` starting at `first`.
    pub(crate) fn decode(row: &PgRow, first: usize) -> Result<Self, StorageError> {
        let last: Option<i64> = get(row, first, "last_revision")?;
        let recorded: Option<OffsetDateTime> = get(row, first + 1, "last_recorded_at")?;
        let max_count: Option<i64> = get(row, first + 2, "max_count")?;
        let max_age: Option<i64> = get(row, first + 3, "max_age_us")?;
        let truncate: Option<i64> = get(row, first + 4, "truncate_before")?;
        Ok(Self {
            last_revision: last
                .map(|v| from_sql("last_revision", v).map(Revision))
                .transpose()?,
            last_recorded_at: recorded.map(timestamp),
            metadata: StreamMetadata {
                max_count: max_count.map(|v| from_sql("max_count", v)).transpose()?,
                max_age: max_age
                    .map(|v| from_sql("max_age_us", v).map(Duration::from_micros))
                    .transpose()?,
                truncate_before: truncate
                    .map(|v| from_sql("truncate_before", v).map(Revision))
                    .transpose()?,
            },
            tombstoned: get(row, first + 5, "tombstoned")?,
        })
    }

    /// True when the last event is visible at `now` (then at least one event is).
    pub(crate) fn has_visible_events(&self, now: Timestamp) -> bool {
        let Some(last) = self.last_revision else {
            return false;
        };
        let metadata = &self.metadata;
        let truncated = metadata.truncate_before.is_some_and(|t| last < t);
        let expired = match (metadata.max_age, self.last_recorded_at) {
            (Some(age), Some(recorded_at)) => recorded_at < now.saturating_sub(age),
            _ => false,
        };
        !truncated && !expired
    }
}

/// Metadata as bound to the `streams` columns.
pub(crate) fn metadata_columns(
    metadata: &StreamMetadata,
) -> (Option<i64>, Option<i64>, Option<i64>) {
    (
        metadata.max_count.map(to_sql),
        // Whole microseconds, rounded up so that a positive age never becomes zero.
        metadata
            .max_age
            .map(|age| i64::try_from(age.as_nanos().div_ceil(1_000)).unwrap_or(i64::MAX)),
        metadata.truncate_before.map(|r| to_sql(r.value())),
    )
}
