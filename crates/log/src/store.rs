//! [`LogStore`]: the embedded engine behind the [`EventStore`] and [`SnapshotStore`] traits.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use factline_core::{
    AllSlice, AppendError, AppendRequest, AppendResult, ChangeNotifier, DeleteError, DeleteMode,
    Direction, EventFilter, EventStore, ExpectedVersion, Limits, MetadataError, Position,
    ReadAllError, ReadAllOptions, ReadStreamError, ReadStreamOptions, Revision, Snapshot,
    SnapshotError, SnapshotStore, StorageError, StreamId, StreamMetadata, StreamSlice,
    SubscribeError, SubscribeFrom, Subscription, Timestamp, check_append_requests, follow_all,
    follow_stream,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    format::RECORD_BODY_BYTES_MAX,
    index::{Index, IndexReader, InfoCache, LogOffset, StreamInfo},
    reader::{Files, read_index},
    recovery::{OpenError, Repair, ScanMode, ScanOptions, scan},
    snapshots,
    storage::{DiskStorage, Storage},
    writer::{Indexer, Request, Writer},
};

/// Settings of a [`LogStore`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LogOptions {
    /// The limits of the contract. `event_size_bytes_max` may be at most 16 MiB here.
    pub limits: Limits,
    /// Nominal segment size; the writer moves to a new segment at the first group that starts
    /// past it. Default 256 MiB.
    pub segment_size_bytes_max: u64,
    /// Requests that may wait for the writer; more wait in their callers. Default 4,096.
    pub writer_queue_requests_max: usize,
    /// Bytes of requests one group commit takes at most (a single larger request still goes
    /// alone). Default 8 MiB.
    pub group_bytes_max: usize,
    /// How many of each stream's newest event ids are searched for `Any`/`NoStream`/
    /// `StreamExists` retries. Default 32.
    pub idempotency_window_events: usize,
    /// Bytes read at a time by `$all` scans. Default 1 MiB.
    pub read_chunk_bytes: usize,
    /// Bytes a filtered `$all` read examines at most before returning a short page. Default
    /// 64 MiB.
    pub scan_bytes_max: u64,
    /// Index entries (events, plus one per stream for metadata and tombstone) the memtable
    /// holds before it is written to an index table. It bounds the index's memory (about 40
    /// bytes per entry, plus about 100 per stream touched) and the log replayed on open.
    /// Default 262,144.
    pub index_memtable_entries_max: usize,
    /// Streams whose facts (last revision, metadata, idempotency window) are cached, in the
    /// writer and for readers each. Default 65,536.
    pub stream_cache_streams_max: usize,
    /// Check the framing and CRC of every record at open, also of those the index checkpoint
    /// covers (which open otherwise does not read: they are checked when read, and by
    /// `factline verify`). Damage then refuses to open, naming file and offset. Costs a read
    /// of the whole log (about 0.7 s per million events here). Default false.
    pub verify_on_open: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            segment_size_bytes_max: 256 * 1024 * 1024,
            writer_queue_requests_max: 4_096,
            group_bytes_max: 8 * 1024 * 1024,
            idempotency_window_events: 32,
            read_chunk_bytes: 1024 * 1024,
            scan_bytes_max: 64 * 1024 * 1024,
            index_memtable_entries_max: 262_144,
            stream_cache_streams_max: 65_536,
            verify_on_open: false,
        }
    }
}

impl LogOptions {
    fn validate(&self) -> Result<(), OpenError> {
        let invalid = |option, reason| Err(OpenError::InvalidOptions { option, reason });
        if self.limits.event_size_bytes_max > RECORD_BODY_BYTES_MAX - 64 * 1024 {
            return invalid("limits.event_size_bytes_max", "must be at most 16 MiB");
        }
        if self.segment_size_bytes_max < 4096 || self.segment_size_bytes_max > 1 << 39 {
            return invalid(
                "segment_size_bytes_max",
                "must be between 4 KiB and 512 GiB",
            );
        }
        if self.writer_queue_requests_max == 0 {
            return invalid("writer_queue_requests_max", "must be at least 1");
        }
        if self.idempotency_window_events == 0 {
            return invalid("idempotency_window_events", "must be at least 1");
        }
        if self.read_chunk_bytes < 4096 {
            return invalid("read_chunk_bytes", "must be at least 4 KiB");
        }
        if self.index_memtable_entries_max == 0 {
            return invalid("index_memtable_entries_max", "must be at least 1");
        }
        if self.stream_cache_streams_max < 2 {
            return invalid("stream_cache_streams_max", "must be at least 2");
        }
        Ok(())
    }
}

/// What readers, the writer and snapshots share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) index: RwLock<Index>,
    pub(crate) files: Files,
    pub(crate) changes: ChangeNotifier,
    pub(crate) options: LogOptions,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) dir: PathBuf,
    pub(crate) snapshot_lock: Mutex<()>,
    pub(crate) info_cache: Mutex<InfoCache>,
    /// Commit groups written since open (each one `fdatasync`).
    pub(crate) commit_groups: AtomicU64,
    /// Events committed since open.
    pub(crate) events_committed: AtomicU64,
}

impl Shared {
    /// Lookups over the index.
    pub(crate) fn reader(&self) -> IndexReader<'_> {
        IndexReader {
            index: &self.index,
            files: &self.files,
            cache: &self.info_cache,
        }
    }

    /// Write access to the index (a poisoned lock is taken over: the index changes in whole
    /// steps).
    pub(crate) fn write_index(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn remove_snapshot(&self, stream: &StreamId) -> std::io::Result<()> {
        let _guard = self
            .snapshot_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        snapshots::remove(&*self.storage, &self.dir, stream)
    }
}

/// The embedded event store: a durable, group-committed, append-only log in a directory.
///
/// Cheap to clone; clones share the writer. The writer thread ends, and the directory lock is
/// released, when [`LogStore::close`] is called or every clone (and every subscription) is gone.
#[derive(Debug, Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
}

/// Counters of a [`LogStore`]'s writer since open ([`LogStore::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct LogStats {
    /// Groups committed, each with one `fdatasync`.
    pub commit_groups: u64,
    /// Events committed.
    pub events_committed: u64,
}

/// Facts about an opened log.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpenReport {
    /// Repairs made while opening (torn tails truncated).
    pub repairs: Vec<Repair>,
    /// Records read: those after the index checkpoint (all of them without one).
    pub records: u64,
    /// Events in the log.
    pub events: u64,
    /// True when the index was rebuilt from the whole log (no usable checkpoint).
    pub index_rebuilt: bool,
}

impl LogStore {
    /// Opens (or creates) the log in `dir` on the real file system with default options.
    pub async fn open(dir: impl AsRef<Path>) -> Result<Self, OpenError> {
        Self::open_with(Arc::new(DiskStorage), dir.as_ref(), LogOptions::default())
            .await
            .map(|(store, _)| store)
    }

    /// Opens (or creates) the log in `dir` on `storage` with `options`, reporting repairs.
    pub async fn open_with(
        storage: Arc<dyn Storage>,
        dir: &Path,
        options: LogOptions,
    ) -> Result<(Self, OpenReport), OpenError> {
        options.validate()?;
        let dir = dir.to_path_buf();
        let task_storage = Arc::clone(&storage);
        let task_dir = dir.clone();
        let task_options = options.clone();
        tokio::task::spawn_blocking(move || {
            Self::open_blocking(task_storage, task_dir, task_options)
        })
        .await
        .map_err(|error| OpenError::Io {
            action: "opening (the open task panicked)",
            path: dir,
            source: std::io::Error::other(error.to_string()),
        })?
    }

    fn open_blocking(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        options: LogOptions,
    ) -> Result<(Self, OpenReport), OpenError> {
        storage
            .create_dir_all(&dir)
            .map_err(|source| OpenError::Io {
                action: "creating",
                path: dir.clone(),
                source,
            })?;
        let lock_path = dir.join("LOCK");
        let lock = storage.lock(&lock_path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::WouldBlock {
                OpenError::Locked { dir: dir.clone() }
            } else {
                OpenError::Io {
                    action: "locking",
                    path: lock_path.clone(),
                    source,
                }
            }
        })?;
        let recovered = scan(
            &storage,
            &dir,
            ScanOptions {
                memtable_entries_max: options.index_memtable_entries_max,
                cache_entries_max: options.stream_cache_streams_max,
                verify_covered: options.verify_on_open,
            },
            ScanMode::Repair,
        )?;
        let report = OpenReport {
            repairs: recovered.repairs.clone(),
            records: recovered.records,
            events: recovered.next_position,
            index_rebuilt: recovered.index_rebuilt,
        };
        let segments = recovered.files.into_segments();
        let active_no = segments.len() as u64 - 1;
        let active = Arc::clone(&segments[active_no as usize]);
        let shared = Arc::new(Shared {
            index: RwLock::new(recovered.index),
            files: Files {
                segments: RwLock::new(segments),
            },
            changes: ChangeNotifier::new(),
            options: options.clone(),
            storage,
            dir: dir.clone(),
            snapshot_lock: Mutex::new(()),
            info_cache: Mutex::new(InfoCache::new(options.stream_cache_streams_max)),
            commit_groups: AtomicU64::new(0),
            events_committed: AtomicU64::new(0),
        });
        let indexer =
            Indexer::start(Arc::clone(&shared), recovered.index_files).map_err(|source| {
                OpenError::Io {
                    action: "starting the index threads for",
                    path: dir.clone(),
                    source,
                }
            })?;
        let writer = Writer {
            shared: Arc::clone(&shared),
            heads: std::collections::HashMap::new(),
            indexer,
            groups: 0,
            next_position: recovered.next_position,
            last_recorded_at: recovered.last_recorded_at,
            active_no,
            active,
            active_end: recovered.active_end,
            failed: None,
            lock,
        };
        let (requests, receiver) = mpsc::channel(options.writer_queue_requests_max);
        std::thread::Builder::new()
            .name("factline-log-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|source| OpenError::Io {
                action: "starting the writer thread for",
                path: dir.clone(),
                source,
            })?;
        tracing::info!(dir = %dir.display(), events = report.events, repairs = report.repairs.len(), "opened the log");
        Ok((Self { shared, requests }, report))
    }

    /// Stops the writer after the requests already queued, and releases the directory lock.
    /// Later writes on any clone fail with `StorageError::Closed`; reads keep working.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.requests.send(Request::Close { reply }).await.is_ok() {
            let _ = done.await;
        }
    }

    /// The directory of this log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The checkpoints kept in this log's directory (`checkpoints/`), for projections and
    /// subscribers over this log.
    pub fn checkpoints(&self) -> crate::LogCheckpointStore {
        crate::LogCheckpointStore::new(Arc::clone(&self.shared.storage), &self.shared.dir)
    }

    /// Counters of the writer since open.
    pub fn stats(&self) -> LogStats {
        LogStats {
            commit_groups: self.shared.commit_groups.load(Ordering::Relaxed),
            events_committed: self.shared.events_committed.load(Ordering::Relaxed),
        }
    }

    async fn call<T, E>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, E>>) -> Request,
    ) -> Result<T, E>
    where
        E: From<StorageError>,
    {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(make(reply))
            .await
            .map_err(|_| StorageError::Closed)?;
        answer.await.map_err(|_| StorageError::Closed)?
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        read_index(&self.shared.index)
    }

    fn reader(&self) -> IndexReader<'_> {
        self.shared.reader()
    }

    fn stream_info(&self, stream: &StreamId) -> Result<StreamInfo, StorageError> {
        self.reader().stream_info(stream)
    }

    /// First visible and last revision of a stream, or the read error.
    fn visible_range(&self, stream: &StreamId) -> Result<(Revision, Revision), ReadStreamError> {
        let info = self.stream_info(stream)?;
        if info.tombstoned {
            return Err(ReadStreamError::Deleted {
                stream: stream.clone(),
            });
        }
        let Some(last) = info.last else {
            return Err(ReadStreamError::NotFound {
                stream: stream.clone(),
            });
        };
        let reader = self.reader();
        let first = info
            .metadata
            .first_visible_revision(last, Timestamp::now(), |revision| {
                // Only with max_age: a binary search reading recorded times from disk.
                match reader.stream_events(stream, revision.0..revision.0 + 1) {
                    Ok(events) if !events.is_empty() => events[0].recorded_at,
                    _ => Timestamp::from_unix_micros(i64::MIN),
                }
            });
        if first > last {
            return Err(ReadStreamError::NotFound {
                stream: stream.clone(),
            });
        }
        Ok((first, last))
    }
}

#[async_trait]
impl EventStore for LogStore {
    fn limits(&self) -> &Limits {
        &self.shared.options.limits
    }

    async fn append_multi(
        &self,
        requests: Vec<AppendRequest>,
    ) -> Result<Vec<AppendResult>, AppendError> {
        check_append_requests(self.limits(), &requests)?;
        self.call(|reply| Request::Append { requests, reply }).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadStreamOptions,
    ) -> Result<StreamSlice, ReadStreamError> {
        self.limits().check_read_count(options.limit)?;
        let (first, last) = self.visible_range(stream)?;
        let page = options.page(first, last);
        let events = self
            .reader()
            .stream_events(stream, page.revisions.clone())?;
        Ok(page.slice(events, last))
    }

    async fn read_all(&self, options: ReadAllOptions) -> Result<AllSlice, ReadAllError> {
        self.limits().check_read_count(options.limit)?;
        let (len, end) = {
            let index = self.index();
            (index.next_position(), index.committed_end)
        };
        let start_offset = match options.direction {
            Direction::Forwards => {
                let from = options.from.map_or(0, |p| p.0);
                self.reader()
                    .position_offsets(from..from.saturating_add(1).min(len))?
                    .first()
                    .copied()
            }
            Direction::Backwards => None,
        };
        match options.direction {
            Direction::Forwards => {
                let from = options.from.map_or(0, |p| p.0);
                let (Some(start), Some(end)) = (start_offset, end) else {
                    return Ok(AllSlice {
                        events: Vec::new(),
                        next_position: Position(from.max(len)),
                        is_end: true,
                    });
                };
                let scanned = self.shared.files.scan(
                    start,
                    end,
                    options.limit,
                    &options.filter,
                    self.shared.options.read_chunk_bytes,
                    self.shared.options.scan_bytes_max,
                )?;
                // Resume after the last event examined (matching or not).
                let next_position = if scanned.reached_end {
                    Position(len)
                } else {
                    scanned.last_examined.map_or(Position(from), Position::next)
                };
                Ok(AllSlice {
                    is_end: scanned.reached_end,
                    next_position,
                    events: scanned.events,
                })
            }
            Direction::Backwards => {
                let mut cursor = options.from.map_or(len, |p| p.0.saturating_add(1).min(len));
                let mut events = Vec::new();
                let batch = 256u64;
                while cursor > 0 && events.len() < options.limit {
                    let low = cursor.saturating_sub(batch);
                    let offsets: Vec<LogOffset> = self.reader().position_offsets(low..cursor)?;
                    let mut page = self.shared.files.events_at(&offsets)?;
                    page.reverse();
                    for event in page {
                        if events.len() >= options.limit {
                            break;
                        }
                        cursor = event.position.0;
                        if options.filter.matches_event(&event) {
                            events.push(event);
                        }
                    }
                    if events.len() < options.limit {
                        cursor = low;
                    }
                }
                Ok(AllSlice {
                    events,
                    next_position: Position(cursor.saturating_sub(1)),
                    is_end: cursor == 0,
                })
            }
        }
    }

    async fn head_position(&self) -> Result<Option<Position>, StorageError> {
        Ok(self.index().next_position().checked_sub(1).map(Position))
    }

    async fn subscribe_to_stream(
        &self,
        stream: &StreamId,
        from: SubscribeFrom<Revision>,
    ) -> Result<Subscription, SubscribeError> {
        let mut changes = self.shared.changes.listen();
        changes.mark_seen();
        let info = self.stream_info(stream)?;
        if info.tombstoned {
            return Err(SubscribeError::Deleted {
                stream: stream.clone(),
            });
        }
        let next = from.first_revision(info.last);
        Ok(follow_stream(self.clone(), changes, stream.clone(), next))
    }

    async fn subscribe_to_all(
        &self,
        from: SubscribeFrom<Position>,
        filter: EventFilter,
    ) -> Result<Subscription, SubscribeError> {
        let mut changes = self.shared.changes.listen();
        changes.mark_seen();
        let next = from.first_position(Position(self.index().next_position()));
        Ok(follow_all(self.clone(), changes, next, filter))
    }

    async fn stream_metadata(&self, stream: &StreamId) -> Result<StreamMetadata, MetadataError> {
        let info = self.stream_info(stream)?;
        if info.tombstoned {
            return Err(MetadataError::Deleted {
                stream: stream.clone(),
            });
        }
        Ok(info.metadata)
    }

    async fn set_stream_metadata(
        &self,
        stream: &StreamId,
        metadata: StreamMetadata,
    ) -> Result<(), MetadataError> {
        metadata.validate()?;
        let stream = stream.clone();
        self.call(|reply| Request::SetMetadata {
            stream,
            metadata,
            reply,
        })
        .await
    }

    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<(), DeleteError> {
        let stream = stream.clone();
        self.call(|reply| Request::Delete {
            stream,
            expected,
            mode,
            reply,
        })
        .await
    }
}

#[async_trait]
impl SnapshotStore for LogStore {
    async fn save_snapshot(
        &self,
        stream: &StreamId,
        snapshot: Snapshot,
    ) -> Result<bool, SnapshotError> {
        factline_core::LimitExceeded::check(
            factline_core::Limit::EventSizeBytes,
            self.limits().event_size_bytes_max,
            snapshot.state.len(),
        )?;
        let _guard = self
            .shared
            .snapshot_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.stream_info(stream)?.tombstoned {
            return Err(SnapshotError::Deleted {
                stream: stream.clone(),
            });
        }
        let storage = &*self.shared.storage;
        if let Some(stored) = snapshots::load(storage, &self.shared.dir, stream)?
            && stored.revision > snapshot.revision
        {
            return Ok(false);
        }
        snapshots::save(storage, &self.shared.dir, stream, &snapshot)?;
        Ok(true)
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        let _guard = self
            .shared
            .snapshot_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(snapshots::load(
            &*self.shared.storage,
            &self.shared.dir,
            stream,
        )?)
    }

    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), SnapshotError> {
        self.shared
            .remove_snapshot(stream)
            .map_err(|error| SnapshotError::Storage(StorageError::backend(error)))
    }
}
