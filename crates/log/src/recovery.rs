//! Opening a data directory: scanning the segments, truncating a torn tail, refusing corruption,
//! and rebuilding the index. `verify` runs the same scan without changing anything.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use factline_core::{StreamId, Timestamp};

use crate::{
    format::{
        self, DecodeError, FRAME_LEN, Record, SEGMENT_HEADER_LEN, SegmentHeader, decode_record,
        decode_segment_header, encode_segment_header,
    },
    index::{Head, Index, IndexUpdate, LogOffset},
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
}

/// Whether the scan may change files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanMode {
    /// Open for writing: repair a torn tail, refuse corruption.
    Repair,
    /// Report only.
    ReadOnly,
}

/// The state rebuilt from the log.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// The readers' index.
    pub(crate) index: Index,
    /// The writer's stream heads.
    pub(crate) heads: HashMap<StreamId, Head>,
    /// The position the next event gets.
    pub(crate) next_position: u64,
    /// The newest recorded time.
    pub(crate) last_recorded_at: Option<Timestamp>,
    /// Open segment files, by number.
    pub(crate) segments: Vec<Arc<dyn StorageFile>>,
    /// End of the valid data in the last segment.
    pub(crate) active_end: u64,
    /// Repairs made (or, read-only, that opening would make).
    pub(crate) repairs: Vec<Repair>,
    /// Records scanned.
    pub(crate) records: u64,
}

struct Scan<'a> {
    storage: &'a dyn Storage,
    window: usize,
    mode: ScanMode,
    index: Index,
    heads: HashMap<StreamId, Head>,
    next_position: u64,
    last_recorded_at: Option<Timestamp>,
    records: u64,
}

impl Scan<'_> {
    fn corrupt(file: &Path, offset: u64, reason: impl Into<String>) -> OpenError {
        OpenError::Corrupt {
            file: file.to_path_buf(),
            offset,
            reason: reason.into(),
        }
    }

    /// Applies one committed transaction, checking that positions and revisions continue.
    fn commit(
        &mut self,
        file: &Path,
        segment: u64,
        transaction: Vec<(Record, u64)>,
    ) -> Result<(), OpenError> {
        for (record, offset) in transaction {
            self.records += 1;
            match record {
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
                    let head = self.heads.entry(event.stream.clone()).or_default();
                    let expected = head.last.map_or(0, |r| r.0 + 1);
                    if event.revision.0 != expected || head.tombstoned {
                        return Err(Self::corrupt(
                            file,
                            offset,
                            format!(
                                "event of {} has revision {}, expected {expected}{}",
                                event.stream,
                                event.revision,
                                if head.tombstoned {
                                    " (stream is tombstoned)"
                                } else {
                                    ""
                                }
                            ),
                        ));
                    }
                    head.push_event(event.revision, event.id, event.recorded_at, self.window);
                    self.last_recorded_at = Some(
                        self.last_recorded_at
                            .map_or(event.recorded_at, |t| t.max(event.recorded_at)),
                    );
                    self.index.apply(IndexUpdate::Event {
                        stream: event.stream,
                        revision: event.revision,
                        position: event.position,
                        recorded_at: event.recorded_at,
                        offset: LogOffset::new(segment, offset),
                    });
                    self.next_position += 1;
                }
                Record::Metadata { stream, metadata } => {
                    self.heads.entry(stream.clone()).or_default().metadata = metadata.clone();
                    self.index.apply(IndexUpdate::Metadata { stream, metadata });
                }
                Record::Tombstone { stream } => {
                    self.heads.entry(stream.clone()).or_default().tombstoned = true;
                    self.index.apply(IndexUpdate::Tombstone { stream });
                }
            }
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

/// Scans (and in [`ScanMode::Repair`], repairs) the log in `dir`, creating an empty one when
/// there is none.
pub(crate) fn scan(
    storage: &dyn Storage,
    dir: &Path,
    window: usize,
    mode: ScanMode,
) -> Result<Recovered, OpenError> {
    let segments_dir = dir.join(SEGMENTS_DIR);
    if mode == ScanMode::Repair {
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
    let mut scan = Scan {
        storage,
        window,
        mode,
        index: Index::default(),
        heads: HashMap::new(),
        next_position: 0,
        last_recorded_at: None,
        records: 0,
    };
    let mut files = Vec::new();
    let mut repairs = Vec::new();
    let mut active_end = SEGMENT_HEADER_LEN as u64;
    let count = numbers.len();
    for number in numbers {
        let is_last = number as usize + 1 == count;
        let path = segments_dir.join(segment_name(number));
        let file = scan
            .storage
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
                if scan.mode == ScanMode::Repair {
                    scan.storage
                        .remove_file(&path)
                        .map_err(io_error("removing", &path))?;
                    scan.storage
                        .sync_dir(&segments_dir)
                        .map_err(io_error("syncing", &segments_dir))?;
                }
                repairs.push(Repair::RemovedTornSegment { file: path });
                continue;
            }
            Err(error) => return Err(Scan::corrupt(&path, 0, format!("segment header: {error}"))),
        };
        if header.segment_no != number || header.first_position != scan.next_position {
            return Err(Scan::corrupt(
                &path,
                0,
                format!(
                    "segment header says number {} first position {}, expected {number} and {}",
                    header.segment_no, header.first_position, scan.next_position
                ),
            ));
        }
        let mut offset = SEGMENT_HEADER_LEN as u64;
        let mut committed_end = offset;
        let mut transaction: Vec<(Record, u64)> = Vec::new();
        let mut torn = false;
        while offset < len {
            match window.record(offset).map_err(io_error("reading", &path))? {
                Ok(framed) => {
                    transaction.push((framed.record, offset));
                    offset += framed.len_bytes as u64;
                    if framed.commit {
                        scan.commit(&path, number, std::mem::take(&mut transaction))?;
                        committed_end = offset;
                    }
                }
                Err(error) => {
                    let follows = window
                        .valid_record_follows(offset + 1)
                        .map_err(io_error("reading", &path))?;
                    if is_last && !follows {
                        torn = true;
                        break;
                    }
                    return Err(Scan::corrupt(&path, offset, error.to_string()));
                }
            }
        }
        if !transaction.is_empty() || torn {
            if !is_last {
                return Err(Scan::corrupt(
                    &path,
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
            if scan.mode == ScanMode::Repair {
                file.set_len(committed_end)
                    .map_err(io_error("truncating", &path))?;
                file.sync_data().map_err(io_error("syncing", &path))?;
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
        drop(window);
        files.push(file);
    }
    if files.is_empty() && mode == ScanMode::Repair {
        let path = segments_dir.join(segment_name(0));
        let file = create_segment(storage, &segments_dir, 0, scan.next_position)?;
        tracing::info!(file = %path.display(), "created a new log");
        files.push(file);
        active_end = SEGMENT_HEADER_LEN as u64;
    }
    if let Some(last) = files.len().checked_sub(1) {
        scan.index.committed_end = Some(LogOffset::new(last as u64, active_end));
    }
    Ok(Recovered {
        index: scan.index,
        heads: scan.heads,
        next_position: scan.next_position,
        last_recorded_at: scan.last_recorded_at,
        segments: files,
        active_end,
        repairs,
        records: scan.records,
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
