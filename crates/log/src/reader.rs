//! Reading committed records: single records, batches of known offsets, and sequential scans.
//!
//! Readers use positional reads on shared file handles and never wait for the writer; they only
//! ever follow offsets the writer published after its `fdatasync`.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use bytes::BytesMut;

use factline_core::{EventFilter, RecordedEvent, StorageError};

use crate::{
    format::{DecodeError, Decoder, Record, decode_record},
    index::{Index, LogOffset},
    storage::{StorageFile, read_exact_at},
};

/// The first read of a record guesses this many bytes and reads more only if needed.
const RECORD_GUESS_BYTES: usize = 4 * 1024;
/// A batch of offsets within this span of one segment is read with one `pread`.
const BATCH_SPAN_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Open segment files plus the index, shared by readers and the writer.
#[derive(Debug)]
pub(crate) struct Files {
    /// Segment files by number.
    pub(crate) segments: RwLock<Vec<Arc<dyn StorageFile>>>,
}

impl Files {
    /// The segment files, by number.
    pub(crate) fn into_segments(self) -> Vec<Arc<dyn StorageFile>> {
        self.segments
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn file(&self, segment: u64) -> Result<Arc<dyn StorageFile>, StorageError> {
        let segments = self
            .segments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        segments
            .get(segment as usize)
            .cloned()
            .ok_or_else(|| corrupt(LogOffset::new(segment, 0), "segment is not open"))
    }

    /// Reads and decodes the record at `at`.
    pub(crate) fn record_at(&self, at: LogOffset) -> Result<Record, StorageError> {
        let file = self.file(at.segment())?;
        let mut buffer = vec![0u8; RECORD_GUESS_BYTES];
        let n = read_some(&*file, &mut buffer, at.offset())?;
        buffer.truncate(n);
        match decode_record(&buffer) {
            Ok(framed) => Ok(framed.record),
            Err(DecodeError::Truncated { needed, .. }) => {
                let mut whole = vec![0u8; needed];
                read_exact_at(&*file, &mut whole, at.offset()).map_err(StorageError::backend)?;
                decode_record(&whole)
                    .map(|framed| framed.record)
                    .map_err(|error| corrupt(at, &error.to_string()))
            }
            Err(error) => Err(corrupt(at, &error.to_string())),
        }
    }

    /// Reads the events at `offsets` (in that order), one `pread` per run of nearby offsets.
    pub(crate) fn events_at(
        &self,
        offsets: &[LogOffset],
    ) -> Result<Vec<RecordedEvent>, StorageError> {
        let mut out = Vec::with_capacity(offsets.len());
        let mut decoder = Decoder::default();
        let mut i = 0;
        while i < offsets.len() {
            let first = offsets[i];
            // Extend the run while offsets stay in one segment, ascending, within the span.
            let mut j = i + 1;
            while j < offsets.len()
                && offsets[j].segment() == first.segment()
                && offsets[j] > offsets[j - 1]
                && offsets[j].offset() - first.offset() < BATCH_SPAN_BYTES_MAX
            {
                j += 1;
            }
            let run = &offsets[i..j];
            if run.len() == 1 {
                out.push(expect_event(self.record_at(first)?, first)?);
            } else {
                let file = self.file(first.segment())?;
                let last = run[run.len() - 1];
                let span = (last.offset() - first.offset()) as usize + RECORD_GUESS_BYTES;
                let mut payloads = Payloads::with_capacity(span);
                with_read_buffer(|buffer| -> Result<(), StorageError> {
                    buffer.resize(span, 0);
                    let n = read_some(&*file, &mut buffer[..span], first.offset())?;
                    let bytes = &buffer[..n];
                    for at in run {
                        let start = (at.offset() - first.offset()) as usize;
                        let source = &bytes[start..];
                        match decoder.decode_deferring_data(source) {
                            Ok((framed, data)) => {
                                payloads.keep(out.len(), &source[data]);
                                out.push(expect_event(framed.record, *at)?);
                            }
                            Err(DecodeError::Truncated { .. }) => {
                                out.push(expect_event(self.record_at(*at)?, *at)?);
                            }
                            Err(error) => return Err(corrupt(*at, &error.to_string())),
                        }
                    }
                    Ok(())
                })?;
                payloads.attach(&mut out);
            }
            i = j;
        }
        Ok(out)
    }

    /// Scans forwards from the record at `from`, returning matching events until `limit` events
    /// matched, `scan_bytes_max` bytes were read, or `end` (the committed end) was reached.
    pub(crate) fn scan(
        &self,
        from: LogOffset,
        end: LogOffset,
        limit: usize,
        filter: &EventFilter,
        chunk_bytes: usize,
        scan_bytes_max: u64,
    ) -> Result<ScanResult, StorageError> {
        let mut events = Vec::new();
        let mut at = from;
        let mut scanned = 0u64;
        let mut last_examined = None;
        let mut decoder = Decoder::default();
        let mut payloads = Payloads::with_capacity(0);
        with_read_buffer(|buffer| -> Result<(), StorageError> {
            loop {
                if at >= end || events.len() >= limit || scanned >= scan_bytes_max {
                    return Ok(());
                }
                let file = self.file(at.segment())?;
                let segment_end = if at.segment() == end.segment() {
                    end.offset()
                } else {
                    file.size_bytes().map_err(StorageError::backend)?
                };
                if at.offset() >= segment_end {
                    at = LogOffset::new(at.segment() + 1, crate::format::SEGMENT_HEADER_LEN as u64);
                    continue;
                }
                let mut want = chunk_bytes.min((segment_end - at.offset()) as usize);
                buffer.resize(want, 0);
                read_exact_at(&*file, &mut buffer[..want], at.offset())
                    .map_err(StorageError::backend)?;
                let mut cursor = 0usize;
                while cursor < want && events.len() < limit {
                    let source = &buffer[cursor..want];
                    match decoder.decode_deferring_data(source) {
                        Ok((framed, data)) => {
                            if let Record::Event(event) = framed.record {
                                last_examined = Some(event.position);
                                if filter.matches_event(&event) {
                                    payloads.keep(events.len(), &source[data]);
                                    events.push(event);
                                }
                            }
                            cursor += framed.len_bytes;
                        }
                        Err(DecodeError::Truncated { needed, .. })
                            if cursor == 0 && needed > want =>
                        {
                            // One record larger than the chunk: read it whole, then decode again.
                            want = needed;
                            buffer.resize(want, 0);
                            read_exact_at(&*file, &mut buffer[..want], at.offset())
                                .map_err(StorageError::backend)?;
                        }
                        Err(DecodeError::Truncated { .. }) => break,
                        Err(error) => {
                            let bad = LogOffset::new(at.segment(), at.offset() + cursor as u64);
                            return Err(corrupt(bad, &error.to_string()));
                        }
                    }
                }
                scanned += cursor as u64;
                at = LogOffset::new(at.segment(), at.offset() + cursor as u64);
            }
        })?;
        payloads.attach(&mut events);
        Ok(ScanResult {
            reached_end: at >= end,
            events,
            last_examined,
        })
    }
}

/// The payloads of a batch of decoded events, gathered into one buffer: the batch then costs one
/// allocation for its payloads instead of one per event. The buffer lives as long as any event of
/// the batch holds its slice of it (a batch is at most `read_count_max` events).
struct Payloads {
    arena: BytesMut,
    /// (index of the event in the batch, its payload's range in `arena`).
    slices: Vec<(usize, std::ops::Range<usize>)>,
}

impl Payloads {
    fn with_capacity(bytes: usize) -> Self {
        Self {
            arena: BytesMut::with_capacity(bytes),
            slices: Vec::new(),
        }
    }

    /// Copies `data`, the payload of the event that will sit at `index` of the batch.
    fn keep(&mut self, index: usize, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let start = self.arena.len();
        self.arena.extend_from_slice(data);
        self.slices.push((index, start..self.arena.len()));
    }

    /// Gives each kept event its payload.
    fn attach(self, events: &mut [RecordedEvent]) {
        let arena = self.arena.freeze();
        for (index, range) in self.slices {
            events[index].data = arena.slice(range);
        }
    }
}

thread_local! {
    /// One read buffer per thread, kept between reads: a fresh buffer per read would be
    /// zero-filled and page-faulted in every time. Its size is bounded by the largest read
    /// (`read_chunk_bytes`, a batch span of at most 4 MiB, or one record).
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's read buffer (a fresh one if it is already in use).
fn with_read_buffer<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut buffer = READ_BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut()));
    let result = f(&mut buffer);
    READ_BUFFER.with(|b| *b.borrow_mut() = buffer);
    result
}

/// What [`Files::scan`] found.
#[derive(Debug)]
pub(crate) struct ScanResult {
    /// The matching events.
    pub(crate) events: Vec<RecordedEvent>,
    /// The position of the last event examined (matching or not).
    pub(crate) last_examined: Option<factline_core::Position>,
    /// True when the scan reached the committed end.
    pub(crate) reached_end: bool,
}

fn read_some(
    file: &dyn StorageFile,
    buffer: &mut [u8],
    offset: u64,
) -> Result<usize, StorageError> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read_at(&mut buffer[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) => return Err(StorageError::backend(error)),
        }
    }
    Ok(filled)
}

fn expect_event(record: Record, at: LogOffset) -> Result<RecordedEvent, StorageError> {
    match record {
        Record::Event(event) => Ok(event),
        _ => Err(corrupt(
            at,
            "the index points at a record that is not an event",
        )),
    }
}

/// A storage error for damaged data found while reading.
pub(crate) fn corrupt(at: LogOffset, reason: &str) -> StorageError {
    StorageError::Backend(
        format!(
            "corrupt record in segment {} at offset {}: {reason}",
            at.segment(),
            at.offset()
        )
        .into(),
    )
}

/// Read access to the index that tolerates a poisoned lock (a panic elsewhere is a bug, the
/// index itself is only changed in whole steps).
pub(crate) fn read_index(index: &RwLock<Index>) -> RwLockReadGuard<'_, Index> {
    index
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
