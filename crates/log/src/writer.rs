//! The writer thread: group commit (see `docs/design/log-format.md`, "Commit protocol").
//!
//! It runs on its own OS thread because it spends its life in `pwrite` and `fdatasync`, which
//! block; appenders talk to it over a bounded channel and wait on a oneshot reply.

use std::{
    any::Any,
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering, mpsc as std_mpsc},
    thread::JoinHandle,
    time::Instant,
};

use factline_core::{
    AppendError, AppendRequest, AppendResult, DeleteError, DeleteMode, ExpectedVersion,
    MetadataError, MultiDecision, Position, RecordedEvent, Revision, StorageError, StreamId,
    StreamMetadata, StreamView, Timestamp, Uuid, decide_append_multi, decide_delete,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    format::{Record, encode_record, event_record_len},
    index::{Head, IndexFiles, IndexUpdate, LogOffset, MemTable, evict_least_used},
    recovery::{SEGMENTS_DIR, create_segment},
    storage::{StorageFile, write_all_at},
    store::Shared,
};

/// A request to the writer.
pub(crate) enum Request {
    Append {
        requests: Vec<AppendRequest>,
        reply: oneshot::Sender<Result<Vec<AppendResult>, AppendError>>,
    },
    SetMetadata {
        stream: StreamId,
        metadata: StreamMetadata,
        reply: oneshot::Sender<Result<(), MetadataError>>,
    },
    Delete {
        stream: StreamId,
        expected: ExpectedVersion,
        mode: DeleteMode,
        reply: oneshot::Sender<Result<(), DeleteError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

impl Request {
    /// Rough encoded size, to bound a group.
    fn size_bytes(&self) -> usize {
        match self {
            Self::Append { requests, .. } => requests
                .iter()
                .flat_map(|r| r.events.iter())
                .map(|e| e.size_bytes() + 64)
                .sum(),
            _ => 64,
        }
    }
}

enum Reply {
    Append(
        oneshot::Sender<Result<Vec<AppendResult>, AppendError>>,
        Result<Vec<AppendResult>, AppendError>,
    ),
    Metadata(
        oneshot::Sender<Result<(), MetadataError>>,
        Result<(), MetadataError>,
    ),
    Delete(
        oneshot::Sender<Result<(), DeleteError>>,
        Result<(), DeleteError>,
    ),
}

impl Reply {
    fn fail(self, reason: &str) -> Self {
        let failed = || StorageError::Failed {
            reason: reason.to_owned(),
        };
        match self {
            Self::Append(tx, _) => Self::Append(tx, Err(failed().into())),
            Self::Metadata(tx, _) => Self::Metadata(tx, Err(failed().into())),
            Self::Delete(tx, _) => Self::Delete(tx, Err(failed().into())),
        }
    }

    fn send(self) {
        // A caller that stopped waiting (dropped its future) needs no answer.
        match self {
            Self::Append(tx, result) => drop(tx.send(result)),
            Self::Metadata(tx, result) => drop(tx.send(result)),
            Self::Delete(tx, result) => drop(tx.send(result)),
        }
    }
}

/// A flush for the flush thread.
struct FlushJob {
    mem: Arc<MemTable>,
    covered_end: LogOffset,
    last_recorded_at: Option<Timestamp>,
}

/// The indexer: one thread writes frozen memtables to index tables and checkpoints, another
/// merges tables. The writer never waits for index I/O unless a second memtable fills before
/// the first is written; a flush never waits for a merge (the merge's I/O runs without the
/// index files' lock, which it takes only to pick its inputs and to swap in the result).
pub(crate) struct Indexer {
    jobs: Option<std_mpsc::Sender<FlushJob>>,
    done: std_mpsc::Receiver<Result<(), String>>,
    outstanding: bool,
    threads: Vec<JoinHandle<()>>,
}

impl Indexer {
    /// Starts the indexer threads over `files`.
    pub(crate) fn start(shared: Arc<Shared>, files: IndexFiles) -> std::io::Result<Self> {
        let files = Arc::new(Mutex::new(files));
        let (jobs, job_receiver) = std_mpsc::channel::<FlushJob>();
        let (done_sender, done) = std_mpsc::channel();
        let (merge_sender, merge_receiver) = std_mpsc::channel::<()>();
        let flusher = {
            let (shared, files) = (Arc::clone(&shared), Arc::clone(&files));
            std::thread::Builder::new()
                .name("factline-log-flush".into())
                .spawn(move || {
                    for job in job_receiver {
                        let flushed = {
                            let mut files = lock(&files);
                            let flushed =
                                files.flush(&job.mem, job.covered_end, job.last_recorded_at);
                            if flushed.is_ok() {
                                shared.write_index().publish(&files, true);
                            }
                            flushed
                        };
                        let failed = flushed.is_err();
                        let _ = done_sender.send(flushed.map_err(|e| e.to_string()));
                        if failed {
                            return;
                        }
                        let _ = merge_sender.send(());
                    }
                })?
        };
        let merger = std::thread::Builder::new()
            .name("factline-log-merge".into())
            .spawn(move || {
                for () in merge_receiver {
                    loop {
                        let Some(plan) = lock(&files).plan_merge() else {
                            break;
                        };
                        let finished = plan.write().and_then(|merged| {
                            let mut files = lock(&files);
                            files.finish_merge(plan, merged)?;
                            shared.write_index().publish(&files, false);
                            Ok(())
                        });
                        if let Err(error) = finished {
                            // The index stays as it was; the next open removes the
                            // half-written table.
                            tracing::error!(%error, "merging index tables failed");
                            break;
                        }
                    }
                    lock(&files).remove_retired();
                }
                lock(&files).remove_retired();
            })?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            outstanding: false,
            threads: vec![flusher, merger],
        })
    }

    /// Waits for the outstanding flush, if any; `Err` if it failed.
    fn wait(&mut self) -> Result<(), String> {
        if !self.outstanding {
            return Ok(());
        }
        self.outstanding = false;
        self.done
            .recv()
            .unwrap_or_else(|_| Err("the index flush thread stopped".into()))
    }

    /// Checks a finished flush without waiting.
    fn poll(&mut self) -> Result<(), String> {
        if !self.outstanding {
            return Ok(());
        }
        match self.done.try_recv() {
            Ok(result) => {
                self.outstanding = false;
                result
            }
            Err(std_mpsc::TryRecvError::Empty) => Ok(()),
            Err(std_mpsc::TryRecvError::Disconnected) => {
                self.outstanding = false;
                Err("the index flush thread stopped".into())
            }
        }
    }

    /// Lets the threads finish their work and waits for them.
    fn stop(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("an indexer thread panicked");
            }
        }
    }
}

/// Locks the index files (a panic elsewhere is a bug; the files change in whole steps).
fn lock(files: &Mutex<IndexFiles>) -> std::sync::MutexGuard<'_, IndexFiles> {
    files
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The writer's state; it alone appends to the log.
pub(crate) struct Writer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) heads: HashMap<StreamId, Head>,
    pub(crate) indexer: Indexer,
    pub(crate) groups: u64,
    pub(crate) next_position: u64,
    pub(crate) last_recorded_at: Option<Timestamp>,
    pub(crate) active_no: u64,
    pub(crate) active: Arc<dyn StorageFile>,
    pub(crate) active_end: u64,
    pub(crate) failed: Option<String>,
    pub(crate) lock: Box<dyn Any + Send + Sync>,
}

/// A stream as the append rules see it from the writer: the head's window, plus ids read back
/// from disk for an `Exact` retry older than the window.
struct HeadView<'a> {
    head: Option<&'a Head>,
    now: Timestamp,
    extra: Vec<(Uuid, Revision)>,
    shared: &'a Shared,
    stream: &'a StreamId,
}

impl StreamView for HeadView<'_> {
    fn is_tombstoned(&self) -> bool {
        self.head.is_some_and(|h| h.tombstoned)
    }
    fn last_revision(&self) -> Option<Revision> {
        self.head.and_then(|h| h.last)
    }
    fn has_visible_events(&self) -> bool {
        self.head.is_some_and(|h| h.has_visible_events(self.now))
    }
    fn revision_of(&self, event_id: &Uuid) -> Option<Revision> {
        let head = self.head?;
        if let Some(i) = head.recent_ids.iter().position(|id| id == event_id) {
            return head
                .window_start()
                .map(|start| Revision(start.0 + i as u64));
        }
        self.extra
            .iter()
            .find(|(id, _)| id == event_id)
            .map(|(_, revision)| *revision)
    }
    fn id_at(&self, revision: Revision) -> Option<Uuid> {
        let head = self.head?;
        let start = head.window_start()?;
        if revision >= start {
            return head
                .recent_ids
                .get((revision.0 - start.0) as usize)
                .copied();
        }
        committed_event(self.shared, self.stream, revision).map(|e| e.id)
    }
}

/// The committed event of `stream` at `revision`, read from disk (rare paths only).
fn committed_event(
    shared: &Shared,
    stream: &StreamId,
    revision: Revision,
) -> Option<RecordedEvent> {
    match shared
        .reader()
        .stream_events(stream, revision.0..revision.0.saturating_add(1))
    {
        Ok(events) => events.into_iter().next(),
        Err(error) => {
            tracing::error!(%stream, %revision, %error, "reading back an event failed");
            None
        }
    }
}

impl Writer {
    /// Serves requests until the channel closes or a `Close` arrives.
    pub(crate) fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut close_reply = None;
        while let Some(first) = requests.blocking_recv() {
            let mut bytes = first.size_bytes();
            let mut group = vec![first];
            while bytes < self.shared.options.group_bytes_max {
                match requests.try_recv() {
                    Ok(request) => {
                        bytes += request.size_bytes();
                        group.push(request);
                    }
                    Err(_) => break,
                }
            }
            if let Some(reply) = self.process(group) {
                close_reply = Some(reply);
                break;
            }
        }
        requests.close();
        // Answer whatever was still queued, then release the directory lock.
        while let Ok(request) = requests.try_recv() {
            if let Some(reply) = refuse(request, || StorageError::Closed) {
                let _ = reply.send(());
            }
        }
        self.indexer.stop();
        let Self { lock, .. } = self;
        drop(lock);
        if let Some(reply) = close_reply {
            let _ = reply.send(());
        }
    }

    /// Stages, writes, syncs and answers one group.
    fn process(&mut self, group: Vec<Request>) -> Option<oneshot::Sender<()>> {
        self.groups += 1;
        if self.failed.is_none()
            && let Err(reason) = self.indexer.poll()
        {
            self.fail(format!("writing the index failed: {reason}"));
        }
        if self.failed.is_none()
            && self.active_end >= self.shared.options.segment_size_bytes_max
            && let Err(error) = self.roll()
        {
            self.fail(format!("rolling to a new segment failed: {error}"));
        }
        let positions_before = self.next_position;
        let mut buffer = Vec::new();
        let mut updates = Vec::new();
        let mut dropped_snapshots = Vec::new();
        let mut replies = Vec::with_capacity(group.len());
        let mut close = None;
        for request in group {
            if let Some(reason) = &self.failed {
                // A failed store stages nothing: every request is refused, a close is honoured.
                let reason = reason.clone();
                if let Some(reply) = refuse(request, || StorageError::Failed {
                    reason: reason.clone(),
                }) {
                    close = Some(reply);
                }
                continue;
            }
            match request {
                Request::Close { reply } => close = Some(reply),
                Request::Append { requests, reply } => {
                    let result = self.stage_append(requests, &mut buffer, &mut updates);
                    replies.push(Reply::Append(reply, result));
                }
                Request::SetMetadata {
                    stream,
                    metadata,
                    reply,
                } => {
                    let result = self.stage_metadata(stream, metadata, &mut buffer, &mut updates);
                    replies.push(Reply::Metadata(reply, result));
                }
                Request::Delete {
                    stream,
                    expected,
                    mode,
                    reply,
                } => {
                    let result =
                        self.stage_delete(&stream, expected, mode, &mut buffer, &mut updates);
                    if result.is_ok() {
                        dropped_snapshots.push(stream);
                    }
                    replies.push(Reply::Delete(reply, result));
                }
            }
        }
        if self.failed.is_none() && !buffer.is_empty() {
            let written = write_all_at(&*self.active, &buffer, self.active_end).and_then(|()| {
                let sync_started = Instant::now();
                let synced = self.active.sync_data();
                metrics::histogram!("factline_log_fsync_duration_seconds")
                    .record(sync_started.elapsed().as_secs_f64());
                synced
            });
            match written {
                Ok(()) => {
                    self.active_end += buffer.len() as u64;
                    let events = self.next_position - positions_before;
                    self.shared.commit_groups.fetch_add(1, Ordering::Relaxed);
                    self.shared
                        .events_committed
                        .fetch_add(events, Ordering::Relaxed);
                    metrics::counter!("factline_log_commit_groups_total").increment(1);
                    metrics::counter!("factline_log_bytes_written_total")
                        .increment(buffer.len() as u64);
                    metrics::counter!("factline_log_events_written_total").increment(events);
                }
                Err(error) => {
                    let reason = if error.raw_os_error() == Some(28) {
                        format!(
                            "disk full (ENOSPC) writing segment {} at offset {}; acknowledged \
                             data is intact; free space and reopen",
                            self.active_no, self.active_end
                        )
                    } else {
                        format!(
                            "writing or syncing segment {} at offset {} failed: {error}",
                            self.active_no, self.active_end
                        )
                    };
                    self.fail(reason);
                }
            }
        }
        if let Some(reason) = &self.failed {
            for reply in replies {
                reply.fail(reason).send();
            }
            return close;
        }
        let mut memtable_full = false;
        if !updates.is_empty() {
            let mut index = self.shared.write_index();
            for update in updates {
                index.apply(update);
            }
            index.committed_end = Some(LogOffset::new(self.active_no, self.active_end));
            memtable_full = index.mem.entries >= self.shared.options.index_memtable_entries_max;
        }
        if memtable_full {
            self.freeze_memtable();
        }
        let heads_max = self.shared.options.stream_cache_streams_max;
        if self.heads.len() > heads_max {
            evict_least_used(&mut self.heads, |head| head.used, heads_max / 2);
        }
        for stream in dropped_snapshots {
            if let Err(error) = self.shared.remove_snapshot(&stream) {
                tracing::warn!(%stream, %error, "removing the snapshot of a deleted stream failed");
            }
        }
        self.shared.changes.notify();
        for reply in replies {
            reply.send();
        }
        close
    }

    /// Hands the full memtable to the indexer (after the previous flush finished).
    fn freeze_memtable(&mut self) {
        if let Err(reason) = self.indexer.wait() {
            self.fail(format!("writing the index failed: {reason}"));
            return;
        }
        let (mem, covered_end) = {
            let mut index = self.shared.write_index();
            let covered_end = index.committed_end;
            (index.freeze(), covered_end)
        };
        let Some(covered_end) = covered_end else {
            return;
        };
        let job = FlushJob {
            mem,
            covered_end,
            last_recorded_at: self.last_recorded_at,
        };
        match &self.indexer.jobs {
            Some(jobs) if jobs.send(job).is_ok() => self.indexer.outstanding = true,
            _ => self.fail("the index flush thread stopped".into()),
        }
    }

    /// Makes sure the head of `stream` is in memory, loading it from the index on a miss.
    fn load_head(&mut self, stream: &StreamId) -> Result<(), StorageError> {
        let groups = self.groups;
        if let Some(head) = self.heads.get_mut(stream) {
            head.used = groups;
            return Ok(());
        }
        let reader = self.shared.reader();
        let info = reader.stream_info(stream)?;
        let mut head = Head {
            last: info.last,
            metadata: info.metadata,
            tombstoned: info.tombstoned,
            used: groups,
            ..Head::default()
        };
        if let Some(last) = info.last {
            let window = self.shared.options.idempotency_window_events as u64;
            let from = (last.0 + 1).saturating_sub(window);
            let events = reader.stream_events(stream, from..last.0 + 1)?;
            if events.first().map(|e| e.revision.0) != Some(from)
                || events.last().map(|e| e.revision) != Some(last)
                || events.len() as u64 != last.0 + 1 - from
            {
                return Err(StorageError::Backend(
                    format!("the index of {stream} does not match the log").into(),
                ));
            }
            head.last_recorded_at = events.last().map(|e| e.recorded_at);
            head.recent_ids = events.iter().map(|e| e.id).collect();
        }
        self.heads.insert(stream.clone(), head);
        Ok(())
    }

    fn fail(&mut self, reason: String) {
        tracing::error!(%reason, "the log failed; refusing all writes until reopened");
        metrics::gauge!("factline_log_failed").set(1.0);
        self.failed = Some(reason);
    }

    fn roll(&mut self) -> Result<(), crate::OpenError> {
        let number = self.active_no + 1;
        let dir = self.shared.dir.join(SEGMENTS_DIR);
        let file = create_segment(&*self.shared.storage, &dir, number, self.next_position)?;
        self.shared
            .files
            .segments
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::clone(&file));
        tracing::info!(
            segment = number,
            first_position = self.next_position,
            "rolled to a new segment"
        );
        self.active = file;
        self.active_no = number;
        self.active_end = crate::format::SEGMENT_HEADER_LEN as u64;
        Ok(())
    }

    fn view<'a>(
        &'a self,
        stream: &'a StreamId,
        expected: ExpectedVersion,
        count: usize,
        now: Timestamp,
    ) -> HeadView<'a> {
        let head = self.heads.get(stream);
        let mut extra = Vec::new();
        if let (ExpectedVersion::Exact(r), Some(head)) = (expected, head)
            && let (Some(last), Some(start)) = (head.last, head.window_start())
        {
            {
                // An Exact retry whose events are older than the window: read them back.
                let to = last
                    .0
                    .min(r.0.saturating_add(count as u64))
                    .min(start.0.saturating_sub(1));
                for revision in r.0.saturating_add(1)..=to {
                    if let Some(event) = committed_event(&self.shared, stream, Revision(revision)) {
                        extra.push((event.id, Revision(revision)));
                    }
                }
            }
        }
        HeadView {
            head,
            now,
            extra,
            shared: &self.shared,
            stream,
        }
    }

    /// The stored result of the event at `revision` (committed, or staged in this group).
    fn result_of(
        &self,
        stream: &StreamId,
        revision: Revision,
        updates: &[IndexUpdate],
    ) -> Result<AppendResult, AppendError> {
        for update in updates.iter().rev() {
            if let IndexUpdate::Event {
                stream: s,
                revision: r,
                position,
                recorded_at,
                ..
            } = update
                && s == stream
                && *r == revision
            {
                return Ok(AppendResult {
                    next_expected_version: revision,
                    position: *position,
                    recorded_at: *recorded_at,
                });
            }
        }
        let event = committed_event(&self.shared, stream, revision).ok_or_else(|| {
            StorageError::Backend(
                format!("event {revision} of {stream} could not be read back").into(),
            )
        })?;
        Ok(AppendResult {
            next_expected_version: revision,
            position: event.position,
            recorded_at: event.recorded_at,
        })
    }

    fn stage_append(
        &mut self,
        requests: Vec<AppendRequest>,
        buffer: &mut Vec<u8>,
        updates: &mut Vec<IndexUpdate>,
    ) -> Result<Vec<AppendResult>, AppendError> {
        for request in &requests {
            self.load_head(&request.stream)?;
        }
        let now = Timestamp::now();
        let first_revisions = match decide_append_multi(&requests, |r| {
            self.view(&r.stream, r.expected, r.events.len(), now)
        })? {
            MultiDecision::Write(first_revisions) => first_revisions,
            MultiDecision::Replay(last_revisions) => {
                return requests
                    .iter()
                    .zip(last_revisions)
                    .map(|(request, last)| self.result_of(&request.stream, last, updates))
                    .collect();
            }
        };
        let recorded_at = self.last_recorded_at.map_or(now, |t| t.max(now));
        let window = self.shared.options.idempotency_window_events;
        let request_count = requests.len();
        let mut results = Vec::with_capacity(request_count);
        for (i, (request, first_revision)) in requests.into_iter().zip(first_revisions).enumerate()
        {
            let head = self.heads.entry(request.stream.clone()).or_default();
            let event_count = request.events.len();
            let mut revision = first_revision;
            for (j, event) in request.events.into_iter().enumerate() {
                let commit = i + 1 == request_count && j + 1 == event_count;
                let position = Position(self.next_position);
                self.next_position += 1;
                let offset = LogOffset::new(self.active_no, self.active_end + buffer.len() as u64);
                let id = event.id;
                let recorded = RecordedEvent::new(
                    request.stream.clone(),
                    revision,
                    position,
                    recorded_at,
                    event,
                );
                buffer.reserve(event_record_len(&recorded));
                encode_record(buffer, &Record::Event(recorded), commit);
                head.push_event(revision, id, recorded_at, window);
                updates.push(IndexUpdate::Event {
                    stream: request.stream.clone(),
                    revision,
                    position,
                    recorded_at,
                    offset,
                });
                revision = revision.next();
            }
            results.push(AppendResult {
                next_expected_version: Revision(revision.0 - 1),
                position: Position(self.next_position - 1),
                recorded_at,
            });
        }
        self.last_recorded_at = Some(recorded_at);
        Ok(results)
    }

    fn stage_metadata(
        &mut self,
        stream: StreamId,
        metadata: StreamMetadata,
        buffer: &mut Vec<u8>,
        updates: &mut Vec<IndexUpdate>,
    ) -> Result<(), MetadataError> {
        self.load_head(&stream)?;
        if self.heads.get(&stream).is_some_and(|head| head.tombstoned) {
            return Err(MetadataError::Deleted { stream });
        }
        self.put_metadata(stream, metadata, buffer, updates);
        Ok(())
    }

    /// Stages a metadata record (also how a soft delete is stored) and the head change.
    fn put_metadata(
        &mut self,
        stream: StreamId,
        metadata: StreamMetadata,
        buffer: &mut Vec<u8>,
        updates: &mut Vec<IndexUpdate>,
    ) {
        self.heads.entry(stream.clone()).or_default().metadata = metadata.clone();
        let offset = LogOffset::new(self.active_no, self.active_end + buffer.len() as u64);
        encode_record(
            buffer,
            &Record::Metadata {
                stream: stream.clone(),
                metadata: metadata.clone(),
            },
            true,
        );
        updates.push(IndexUpdate::Metadata {
            stream,
            metadata,
            offset,
        });
    }

    fn stage_delete(
        &mut self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mode: DeleteMode,
        buffer: &mut Vec<u8>,
        updates: &mut Vec<IndexUpdate>,
    ) -> Result<(), DeleteError> {
        self.load_head(stream)?;
        let view = self.view(stream, ExpectedVersion::Any, 0, Timestamp::now());
        let last = decide_delete(stream, expected, mode, &view)?;
        match mode {
            DeleteMode::Soft => {
                let mut metadata = self
                    .heads
                    .get(stream)
                    .map(|head| head.metadata.clone())
                    .unwrap_or_default();
                metadata.truncate_before = last.map(Revision::next);
                self.put_metadata(stream.clone(), metadata, buffer, updates);
            }
            DeleteMode::Tombstone => {
                self.heads.entry(stream.clone()).or_default().tombstoned = true;
                let offset = LogOffset::new(self.active_no, self.active_end + buffer.len() as u64);
                encode_record(
                    buffer,
                    &Record::Tombstone {
                        stream: stream.clone(),
                    },
                    true,
                );
                updates.push(IndexUpdate::Tombstone {
                    stream: stream.clone(),
                    offset,
                });
            }
        }
        Ok(())
    }
}

/// Answers a data request with `error` (a caller that stopped waiting needs no answer);
/// returns the reply of a `Close` for the caller to honour.
fn refuse(request: Request, error: impl Fn() -> StorageError) -> Option<oneshot::Sender<()>> {
    match request {
        Request::Append { reply, .. } => drop(reply.send(Err(error().into()))),
        Request::SetMetadata { reply, .. } => drop(reply.send(Err(error().into()))),
        Request::Delete { reply, .. } => drop(reply.send(Err(error().into()))),
        Request::Close { reply } => return Some(reply),
    }
    None
}
