//! Opening a data directory: scanning the segments, truncating a torn tail, refusing corruption,
//! and rebuilding the index. `verify` runs the same scan without changing anything.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use factline_core::{StorageError, Timestamp};

use crate::{
    format::{
        self, DecodeError, FRAME_LEN, Record, SEGMENT_HEADER_LEN, SegmentHeader, decode_record,
        decode_segment_header, encode_segment_header,
    },
    index::{
        Index, IndexFiles, IndexReader, IndexUpdate, InfoCache, Loaded, LogOffset, TableError,
    },
    reader::Files,
    storage::{Storage, StorageFile, read_exact_at, write_all_at},
};

/// The folder of the segment files inside a data directory.
pub(crate) const SEGMENTS_DIR: &str = "segments";

/// The file name of segment `number`.
pub(crate) fn segment_name(number: u64) -> String {
    format!("{number:010}.seg")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    (digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Why a data directory cannot be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another process holds the directory.
    #[error("data directory {dir} is in use by another process")]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Data that was once durable is damaged; nothing was changed.
    #[error("corrupt data in {file} at offset {offset}: {reason}")]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Byte offset of the damaged record or header.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A segment was written by a newer factline.
    #[error(
        "{file} has format version {found}; this build reads up to {}",
        format::FORMAT_VERSION
    )]
    UnsupportedVersion {
        /// The segment file.
        file: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The options are not usable.
    #[error("invalid option {option}: {reason}")]
    InvalidOptions {
        /// The option's name.
        option: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OpenError {
    let path = path.to_path_buf();
    move |source| OpenError::Io {
        action,
        path,
        source,
    }
}

/// A change recovery made to the files.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Repair {
    /// Bytes after the last complete transaction were cut off (an interrupted write).
    TruncatedTail {
        /// The segment file.
        file: PathBuf,
        /// Where the valid data ends.
        valid_end: u64,
        /// The file length before.
        length_before: u64,
    },
    /// A last segment whose header never became durable was removed (a crash while rolling).
    RemovedTornSegment {
        /// The segment file.
        file: PathBuf,
    },
    /// The index files were unusable and the index was rebuilt from the log (the index is
    /// derived data: nothing is lost).
    RebuiltIndex {
        /// Why.
        reason: String,
    },
}

/// Whether the scan may change files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanMode {
    /// Open for writing: repair a torn tail, refuse corruption.
    Repair,
    /// Report only.
    ReadOnly,
}

/// Limits the scan keeps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScanOptions {
    /// Flush the memtable to a table at this many entries (when writable).
    pub(crate) memtable_entries_max: usize,
    /// Streams the cache of table facts holds.
    pub(crate) cache_entries_max: usize,
    /// Check the records the checkpoint covers too (read-only: also against the index).
    pub(crate) verify_covered: bool,
}

/// The state rebuilt from the log.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// The readers' index.
    pub(crate) index: Index,
    /// The index files, for the indexer.
    pub(crate) index_files: IndexFiles,
    /// Open segment files.
    pub(crate) files: Files,
    /// The position the next event gets.
    pub(crate) next_position: u64,
    /// The newest recorded time.
    pub(crate) last_recorded_at: Option<Timestamp>,
    /// End of the valid data in the last segment.
    pub(crate) active_end: u64,
    /// Repairs made (or, read-only, that opening would make).
    pub(crate) repairs: Vec<Repair>,
    /// Records scanned after the checkpoint (read-only: and before it).
    pub(crate) records: u64,
    /// True when no checkpoint was used.
    pub(crate) index_rebuilt: bool,
    /// Events whose index entries were checked against the log (read-only).
    pub(crate) index_checked: u64,
}

struct Scan<'a> {
    mode: ScanMode,
    options: ScanOptions,
    index: &'a RwLock<Index>,
    files: &'a Files,
    cache: &'a Mutex<InfoCache>,
    index_files: &'a mut IndexFiles,
    next_position: u64,
    last_recorded_at: Option<Timestamp>,
    records: u64,
    index_checked: u64,
}

impl From<TableError> for OpenError {
    fn from(error: TableError) -> Self {
        index_error(error)
    }
}

fn index_error(error: TableError) -> OpenError {
    match error {
        TableError::Io {
            action,
            path,
            source,
        } => OpenError::Io {
            action,
            path,
            source,
        },
        TableError::Corrupt {
            path,
            offset,
            reason,
        } => OpenError::Corrupt {
            file: path,
            offset,
            reason,
        },
    }
}

impl Scan<'_> {
    fn corrupt(file: &Path, offset: u64, reason: impl Into<String>) -> OpenError {
        OpenError::Corrupt {
            file: file.to_path_buf(),
            offset,
            reason: reason.into(),
        }
    }

    fn reader(&self) -> IndexReader<'_> {
        IndexReader {
            index: self.index,
            files: self.files,
            cache: self.cache,
        }
    }

    fn write_index(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies one committed transaction, checking that positions and revisions continue;
    /// `end` is the offset after it.
    fn commit(
        &mut self,
        file: &Path,
        segment: u64,
        transaction: Vec<(Record, u64)>,
        end: u64,
    ) -> Result<(), OpenError> {
        let unreadable = |offset: u64| {
            move |error: StorageError| {
                Scan::corrupt(file, offset, format!("reading the index failed: {error}"))
            }
        };
        for (record, offset) in transaction {
            self.records += 1;
            let at = LogOffset::new(segment, offset);
            let update = match record {
                Record::Event(event) => {
                    if event.position.0 != self.next_position {
                        return Err(Self::corrupt(
                            file,
                            offset,
                            format!(
                                "event has position {}, expected {}",
                                event.position, self.next_position
                            ),
                        ));
                    }
                    let info = self
                        .reader()
                        .stream_info(&event.stream)
                        .map_err(unreadable(offset))?;
                    let expected = info.last.map_or(0, |r| r.0 + 1);
                    if event.revision.0 != expected || info.tombstoned {
                        return Err(Self::corrupt(
                            file,
                            offset,
                            format!(
                                "event of {} has revision {}, expected {expected}{}",
                                event.stream,
                                event.revision,
                                if info.tombstoned {
                                    " (stream is tombstoned)"
                                } else {
                                    ""
                                }
                            ),
                        ));
                    }
                    self.last_recorded_at = Some(
                        self.last_recorded_at
                            .map_or(event.recorded_at, |t| t.max(event.recorded_at)),
                    );
                    self.next_position += 1;
                    IndexUpdate::Event {
                        stream: event.stream,
                        revision: event.revision,
                        position: event.position,
                        recorded_at: event.recorded_at,
                        offset: at,
                    }
                }
                Record::Metadata { stream, metadata } => IndexUpdate::Metadata {
                    stream,
                    metadata,
                    offset: at,
                },
                Record::Tombstone { stream } => IndexUpdate::Tombstone { stream, offset: at },
            };
            self.write_index().apply(update);
        }
        let full = {
            let mut index = self.write_index();
            index.committed_end = Some(LogOffset::new(segment, end));
            index.mem.entries >= self.options.memtable_entries_max
        };
        if full && self.mode == ScanMode::Repair {
            let (mem, covered_end) = {
                let mut index = self.write_index();
                (index.freeze(), LogOffset::new(segment, end))
            };
            self.index_files
                .flush(&mem, covered_end, self.last_recorded_at)
                .map_err(index_error)?;
            self.write_index().publish(self.index_files, true);
            while self.index_files.merge_step().map_err(index_error)? {
                self.write_index().publish(self.index_files, false);
            }
            self.index_files.remove_retired();
        }
        Ok(())
    }

    /// Checks the framing and CRC of the records in `from..to` of a segment, which the
    /// checkpoint says the index covers, and read-only also that the index agrees with them.
    fn check_covered(
        &mut self,
        path: &Path,
        segment: u64,
        window: &mut Window<'_>,
        from: u64,
        to: u64,
        position: &mut u64,
    ) -> Result<(), OpenError> {
        let mut offset = from;
        while offset < to {
            let framed = window
                .record(offset)
                .map_err(io_error("reading", path))?
                .map_err(|error| Self::corrupt(path, offset, error.to_string()))?;
            self.records += 1;
            let at = LogOffset::new(segment, offset);
            if let Record::Event(event) = &framed.record {
                if event.position.0 != *position {
                    return Err(Self::corrupt(
                        path,
                        offset,
                        format!("event has position {}, expected {position}", event.position),
                    ));
                }
                if self.mode == ScanMode::Repair {
                    *position += 1;
                    offset += framed.len_bytes as u64;
                    continue;
                }
                let reader = self.reader();
                let unreadable = |error: StorageError| {
                    Self::corrupt(path, offset, format!("reading the index failed: {error}"))
                };
                let by_position = reader
                    .position_offsets(*position..*position + 1)
                    .map_err(unreadable)?;
                if by_position != [at] {
                    return Err(Self::corrupt(
                        path,
                        offset,
                        format!(
                            "the index's positions file does not point at event {position} here"
                        ),
                    ));
                }
                let revision = event.revision.0;
                let by_stream = reader
                    .stream_offsets(&event.stream, revision..revision + 1)
                    .map_err(unreadable)?;
                if !by_stream.contains(&at) {
                    return Err(Self::corrupt(
                        path,
                        offset,
                        format!(
                            "the index has no entry for revision {revision} of {} here",
                            event.stream
                        ),
                    ));
                }
                self.index_checked += 1;
                *position += 1;
            }
            offset += framed.len_bytes as u64;
        }
        if offset != to {
            return Err(Self::corrupt(
                path,
                to,
                "the index checkpoint does not end at a record boundary",
            ));
        }
        Ok(())
    }
}

/// A window over a file, read in chunks: a scan holds at most one chunk (or one record, when a
/// record is larger) in memory, whatever the segment size.
struct Window<'a> {
    file: &'a dyn StorageFile,
    len: u64,
    start: u64,
    bytes: Vec<u8>,
}

impl<'a> Window<'a> {
    const CHUNK_BYTES: u64 = 4 * 1024 * 1024;

    fn new(file: &'a dyn StorageFile, len: u64) -> Self {
        Self {
            file,
            len,
            start: 0,
            bytes: Vec::new(),
        }
    }

    /// The bytes from `offset` on: at least `want` of them (fewer only at the end of the file),
    /// usually up to the end of the current chunk.
    fn at(&mut self, offset: u64, want: usize) -> std::io::Result<&[u8]> {
        let end = offset.saturating_add(want as u64).min(self.len);
        let held_end = self.start + self.bytes.len() as u64;
        if offset < self.start || end > held_end {
            let read_end = offset
                .saturating_add(Self::CHUNK_BYTES)
                .max(end)
                .min(self.len);
            self.bytes
                .resize(read_end.saturating_sub(offset) as usize, 0);
            read_exact_at(self.file, &mut self.bytes, offset)?;
            self.start = offset;
        }
        let from = (offset - self.start) as usize;
        Ok(&self.bytes[from.min(self.bytes.len())..])
    }

    /// Decodes the record at `offset`, reading more when the record runs past the window.
    fn record(&mut self, offset: u64) -> std::io::Result<Result<format::Framed, DecodeError>> {
        let mut want = FRAME_LEN + 2;
        loop {
            let bytes = self.at(offset, want)?;
            match decode_record(bytes) {
                Err(DecodeError::Truncated { needed, .. })
                    if needed > bytes.len() && needed as u64 <= self.len - offset =>
                {
                    want = needed;
                }
                result => return Ok(result),
            }
        }
    }

    /// True when a record that frames and checks correctly starts anywhere from `from` on.
    fn valid_record_follows(&mut self, from: u64) -> std::io::Result<bool> {
        let mut i = from;
        while i + (FRAME_LEN + 2) as u64 <= self.len {
            let head = self.at(i, FRAME_LEN + 2)?;
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as u64;
            let (kind, flags) = (head[FRAME_LEN], head[FRAME_LEN + 1]);
            let plausible = len >= 2
                && len <= self.len - i - FRAME_LEN as u64
                && (1..=3).contains(&kind)
                && flags <= 1;
            if plausible && self.record(i)?.is_ok() {
                return Ok(true);
            }
            i += 1;
        }
        Ok(false)
    }
}

/// One opened segment.
struct Segment {
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    len: u64,
    first_position: u64,
}

/// Scans (and in [`ScanMode::Repair`], repairs) the log in `dir`, creating an empty one when
/// there is none. With a usable index checkpoint only the log after it is read (read-only:
/// everything, checking the index against it).
pub(crate) fn scan(
    storage: &Arc<dyn Storage>,
    dir: &Path,
    options: ScanOptions,
    mode: ScanMode,
) -> Result<Recovered, OpenError> {
    let segments_dir = dir.join(SEGMENTS_DIR);
    let writable = mode == ScanMode::Repair;
    if writable {
        storage
            .create_dir_all(&segments_dir)
            .map_err(io_error("creating", &segments_dir))?;
    }
    let mut numbers: Vec<u64> = storage
        .list_dir(&segments_dir)
        .map_err(io_error("listing", &segments_dir))?
        .iter()
        .filter_map(|name| parse_segment_name(name))
        .collect();
    numbers.sort_unstable();
    for (expected, number) in numbers.iter().enumerate() {
        if *number != expected as u64 {
            return Err(Scan::corrupt(
                &segments_dir.join(segment_name(expected as u64)),
                0,
                "segment file is missing",
            ));
        }
    }
    let mut repairs = Vec::new();
    // Pass 1: open every segment and check its header.
    let mut segments: Vec<Segment> = Vec::new();
    let count = numbers.len();
    for number in numbers {
        let is_last = number as usize + 1 == count;
        let path = segments_dir.join(segment_name(number));
        let file = storage
            .open(&path, false)
            .map_err(io_error("opening", &path))?;
        let len = file
            .size_bytes()
            .map_err(io_error("reading the length of", &path))?;
        let mut window = Window::new(&*file, len);
        let header = window
            .at(0, SEGMENT_HEADER_LEN)
            .map(decode_segment_header)
            .map_err(io_error("reading", &path))?;
        let header = match header {
            Ok(header) => header,
            Err(DecodeError::Version { found }) => {
                return Err(OpenError::UnsupportedVersion { file: path, found });
            }
            Err(error)
                if is_last
                    && !window
                        .valid_record_follows((SEGMENT_HEADER_LEN as u64).min(len))
                        .map_err(io_error("reading", &path))? =>
            {
                // The header is written and synced before any record: a torn header in the
                // last segment means the crash came while rolling, before any data.
                tracing::warn!(file = %path.display(), %error, "removing a segment whose header was torn by a crash");
                if writable {
                    storage
                        .remove_file(&path)
                        .map_err(io_error("removing", &path))?;
                    storage
                        .sync_dir(&segments_dir)
                        .map_err(io_error("syncing", &segments_dir))?;
                }
                repairs.push(Repair::RemovedTornSegment { file: path });
                continue;
            }
            Err(error) => return Err(Scan::corrupt(&path, 0, format!("segment header: {error}"))),
        };
        let previous_first = segments.last().map_or(0, |s| s.first_position);
        if header.segment_no != number || header.first_position < previous_first {
            return Err(Scan::corrupt(
                &path,
                0,
                format!(
                    "segment header says number {} first position {}, expected {number} and at \
                     least {previous_first}",
                    header.segment_no, header.first_position
                ),
            ));
        }
        drop(window);
        segments.push(Segment {
            path,
            file,
            len,
            first_position: header.first_position,
        });
    }
    if segments.is_empty() && writable {
        let path = segments_dir.join(segment_name(0));
        let file = create_segment(&**storage, &segments_dir, 0, 0)?;
        tracing::info!(file = %path.display(), "created a new log");
        segments.push(Segment {
            path,
            file,
            len: SEGMENT_HEADER_LEN as u64,
            first_position: 0,
        });
    }
    // The index: where the scan starts.
    let (mut index_files, loaded) =
        IndexFiles::open(Arc::clone(storage), dir, writable).map_err(index_error)?;
    let mut start = (0usize, SEGMENT_HEADER_LEN as u64, 0u64, None);
    let mut index_rebuilt = true;
    match loaded {
        Loaded::Checkpoint(checkpoint) => {
            let s = checkpoint.covered_end.segment() as usize;
            let at = checkpoint.covered_end.offset();
            let fits = segments.get(s).is_some_and(|segment| {
                at >= SEGMENT_HEADER_LEN as u64
                    && at <= segment.len
                    && segment.first_position <= checkpoint.next_position
            }) && segments
                .get(s + 1)
                .is_none_or(|next| next.first_position >= checkpoint.next_position);
            if fits {
                start = (s, at, checkpoint.next_position, checkpoint.last_recorded_at);
                index_rebuilt = false;
            } else {
                let reason = format!(
                    "the index checkpoint covers the log up to segment {s} offset {at}, which \
                     the log does not hold"
                );
                tracing::warn!(%reason, "rebuilding the index from the log");
                index_files.discard(writable).map_err(index_error)?;
                repairs.push(Repair::RebuiltIndex { reason });
            }
        }
        Loaded::Discarded(reason) => repairs.push(Repair::RebuiltIndex { reason }),
        Loaded::Empty => {}
    }
    let files = Files {
        segments: std::sync::RwLock::new(segments.iter().map(|s| Arc::clone(&s.file)).collect()),
    };
    let index = RwLock::new(Index::new(&index_files));
    let cache = Mutex::new(InfoCache::new(options.cache_entries_max));
    let mut scan = Scan {
        mode,
        options,
        index: &index,
        files: &files,
        cache: &cache,
        index_files: &mut index_files,
        next_position: start.2,
        last_recorded_at: start.3,
        records: 0,
        index_checked: 0,
    };
    let mut active_end = SEGMENT_HEADER_LEN as u64;
    let mut covered_position = 0u64;
    let segment_count = segments.len();
    for (number, segment) in segments.iter().enumerate() {
        let is_last = number + 1 == segment_count;
        let Segment {
            path, file, len, ..
        } = segment;
        let len = *len;
        let mut window = Window::new(&**file, len);
        // Records the checkpoint covers: skipped, or checked when read-only.
        if number <= start.0 && options.verify_covered && !index_rebuilt {
            let to = if number < start.0 { len } else { start.1 };
            if covered_position != segment.first_position {
                return Err(Scan::corrupt(
                    path,
                    0,
                    format!(
                        "segment starts at position {}, the previous ended at {covered_position}",
                        segment.first_position
                    ),
                ));
            }
            scan.check_covered(
                path,
                number as u64,
                &mut window,
                SEGMENT_HEADER_LEN as u64,
                to,
                &mut covered_position,
            )?;
        }
        if number < start.0 {
            continue;
        }
        let mut offset = if number == start.0 {
            start.1
        } else {
            SEGMENT_HEADER_LEN as u64
        };
        if offset == SEGMENT_HEADER_LEN as u64 && segment.first_position != scan.next_position {
            return Err(Scan::corrupt(
                path,
                0,
                format!(
                    "segment header says first position {}, expected {}",
                    segment.first_position, scan.next_position
                ),
            ));
        }
        let mut committed_end = offset;
        let mut transaction: Vec<(Record, u64)> = Vec::new();
        let mut torn = false;
        while offset < len {
            match window.record(offset).map_err(io_error("reading", path))? {
                Ok(framed) => {
                    transaction.push((framed.record, offset));
                    offset += framed.len_bytes as u64;
                    if framed.commit {
                        scan.commit(
                            path,
                            number as u64,
                            std::mem::take(&mut transaction),
                            offset,
                        )?;
                        committed_end = offset;
                    }
                }
                Err(error) => {
                    let follows = window
                        .valid_record_follows(offset + 1)
                        .map_err(io_error("reading", path))?;
                    if is_last && !follows {
                        torn = true;
                        break;
                    }
                    return Err(Scan::corrupt(path, offset, error.to_string()));
                }
            }
        }
        if !transaction.is_empty() || torn {
            if !is_last {
                return Err(Scan::corrupt(
                    path,
                    committed_end,
                    "a sealed segment ends inside a transaction",
                ));
            }
            tracing::warn!(
                file = %path.display(),
                valid_end = committed_end,
                length = len,
                "truncating the torn tail of an interrupted write"
            );
            if writable {
                file.set_len(committed_end)
                    .map_err(io_error("truncating", path))?;
                file.sync_data().map_err(io_error("syncing", path))?;
            }
            repairs.push(Repair::TruncatedTail {
                file: path.clone(),
                valid_end: committed_end,
                length_before: len,
            });
        }
        if is_last {
            active_end = committed_end;
        }
    }
    let (next_position, last_recorded_at, records, index_checked) = (
        scan.next_position,
        scan.last_recorded_at,
        scan.records,
        scan.index_checked,
    );
    let mut index = index
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(last) = segment_count.checked_sub(1) {
        index.committed_end = Some(LogOffset::new(last as u64, active_end));
    }
    Ok(Recovered {
        index,
        index_files,
        files,
        next_position,
        last_recorded_at,
        active_end,
        repairs,
        records,
        index_rebuilt,
        index_checked,
    })
}

/// Creates segment `number` with its header, and makes file and directory entry durable.
pub(crate) fn create_segment(
    storage: &dyn Storage,
    segments_dir: &Path,
    number: u64,
    first_position: u64,
) -> Result<Arc<dyn StorageFile>, OpenError> {
    let path = segments_dir.join(segment_name(number));
    let file = storage
        .open(&path, true)
        .map_err(io_error("creating", &path))?;
    let header = encode_segment_header(&SegmentHeader {
        segment_no: number,
        first_position,
    });
    write_all_at(&*file, &header, 0).map_err(io_error("writing", &path))?;
    file.sync_data().map_err(io_error("syncing", &path))?;
    storage
        .sync_dir(segments_dir)
        .map_err(io_error("syncing", segments_dir))?;
    Ok(file)
}
