//! The append path, shared by the batching writer and by appends inside a caller's
//! transaction.
//!
//! [`append_jobs`] runs on a connection that is inside a transaction. It
//! 1. locks the `log_head` row (`SELECT … FOR UPDATE`): from here until the transaction ends no
//!    other writer, in this process or any other, can append, delete or change metadata;
//! 2. reads the heads of every stream the jobs touch and the events that already carry one of
//!    their ids (for idempotent retries), in fresh statements — so under READ COMMITTED they see
//!    everything the previous lock holder committed;
//! 3. decides every job with the shared rules of `factline_core::rules`, in order, each against
//!    the state the jobs before it left (so two jobs of one batch can conflict or replay each
//!    other exactly as if they had run one after the other);
//! 4. writes all accepted events and the new log head in one statement, which also queues the
//!    commit notification (a stream's head is its highest stored revision: nothing else is
//!    written per stream).
//!
//! Positions come from `log_head.next_position` under the lock, so they are gapless, and the
//! lock is held until commit, so they are handed out in commit order: a reader that sees
//! position `p` committed already sees every position below `p`.

use std::{collections::HashMap, sync::Arc};

use factline_core::{
    AppendError, AppendRequest, AppendResult, EventData, MultiDecision, Position, RecordedEvent,
    Revision, StorageError, StreamView, Timestamp, decide_append_multi,
};
use sqlx::{AssertSqlSafe, PgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    InlineProjection, InlineProjectionError,
    error::storage,
    rows::{
        StreamRow, content_code, encode_metadata, from_sql, get, offset_date_time, timestamp,
        to_sql,
    },
    sql::Sql,
};

/// A stored event the jobs' ids refer to.
#[derive(Debug, Clone, Copy)]
struct Known {
    revision: Revision,
    position: Position,
    recorded_at: Timestamp,
}

/// What the decisions know of one stream, updated as jobs are accepted.
#[derive(Debug, Default)]
struct Work {
    row: StreamRow,
    ids: HashMap<Uuid, Known>,
    by_revision: HashMap<Revision, Uuid>,
}

struct View<'a> {
    work: Option<&'a Work>,
    now: Timestamp,
}

impl StreamView for View<'_> {
    fn is_tombstoned(&self) -> bool {
        self.work.is_some_and(|w| w.row.tombstoned)
    }
    fn last_revision(&self) -> Option<Revision> {
        self.work.and_then(|w| w.row.last_revision)
    }
    fn has_visible_events(&self) -> bool {
        self.work
            .is_some_and(|w| w.row.has_visible_events(self.now))
    }
    fn revision_of(&self, event_id: &Uuid) -> Option<Revision> {
        self.work?.ids.get(event_id).map(|k| k.revision)
    }
    fn id_at(&self, revision: Revision) -> Option<Uuid> {
        self.work?.by_revision.get(&revision).copied()
    }
}

/// Why a whole batch failed (each job's own refusals are in its result instead).
#[derive(Debug)]
pub(crate) enum BatchError {
    Storage(StorageError),
    Projection(InlineProjectionError),
}

impl From<StorageError> for BatchError {
    fn from(error: StorageError) -> Self {
        Self::Storage(error)
    }
}

/// The columns of the events a batch writes.
#[derive(Default)]
struct Columns<'a> {
    positions: Vec<i64>,
    streams: Vec<&'a str>,
    revisions: Vec<i64>,
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    content_types: Vec<i16>,
    data: Vec<&'a [u8]>,
    metadata: Vec<Option<Vec<u8>>>,
}

impl<'a> Columns<'a> {
    /// Binds the eight column arrays as `$1..$8`, as both write statements take them.
    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.positions)
            .bind(&self.streams)
            .bind(&self.revisions)
            .bind(&self.ids)
            .bind(&self.types)
            .bind(&self.content_types)
            .bind(&self.data)
            .bind(&self.metadata)
    }
}

/// One job's outcome.
pub(crate) type JobResult = Result<Vec<AppendResult>, AppendError>;

/// The log head as a writer last saw it commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeadState {
    pub(crate) generation: i64,
    pub(crate) next_position: u64,
    pub(crate) last_recorded_at: Timestamp,
}

/// What [`append_jobs`] did, for the caller to answer with and the writer to cache once the
/// transaction has committed.
pub(crate) struct Applied {
    pub(crate) results: Vec<JobResult>,
    /// The generation found under the lock, before this transaction's change.
    generation_before: i64,
    /// The log head after this transaction.
    head: HeadState,
    /// Every stream the jobs touched, as it is after this transaction.
    rows: Vec<(String, StreamRow)>,
}

/// Longest the writer's cache of stream heads gets before it starts over.
const CACHED_STREAMS_MAX: usize = 65_536;

/// The writer's knowledge of the log as of its own last commit: exact for as long as the
/// `log_head` generation has not moved (nobody else appended, deleted or changed metadata).
#[derive(Debug, Default)]
pub(crate) struct Cache {
    head: Option<HeadState>,
    streams: HashMap<String, StreamRow>,
}

impl Cache {
    /// Forgets everything (after an error, or when another writer has moved the log).
    pub(crate) fn invalidate(&mut self) {
        self.head = None;
        self.streams.clear();
    }

    /// True when the one-statement path can be tried.
    pub(crate) fn is_exact(&self) -> bool {
        self.head.is_some()
    }

    /// Marks the cache as not known to be exact, returning what it knew.
    pub(crate) fn take_head(&mut self) -> Option<HeadState> {
        self.head.take()
    }

    /// Puts back what [`Cache::take_head`] returned.
    pub(crate) fn restore_head(&mut self, head: Option<HeadState>) {
        self.head = head;
    }

    /// Takes in what a committed [`append_jobs`] saw and wrote.
    pub(crate) fn absorb(&mut self, applied: &Applied) {
        let still_exact = self
            .head
            .is_some_and(|head| head.generation == applied.generation_before);
        if !still_exact || self.streams.len() + applied.rows.len() > CACHED_STREAMS_MAX {
            self.streams.clear();
        }
        for (stream, row) in &applied.rows {
            self.streams.insert(stream.clone(), row.clone());
        }
        self.head = Some(applied.head);
    }
}

/// The decisions over a batch and the rows they write.
struct Decided<'a> {
    results: Vec<JobResult>,
    columns: Columns<'a>,
    next_position: u64,
    projected: Option<Vec<RecordedEvent>>,
}

/// Decides every job in order against `work` (updated as jobs are accepted), numbering the
/// accepted events from `next_position`.
fn decide_jobs<'a>(
    jobs: &[&'a [AppendRequest]],
    work: &mut HashMap<&'a str, Work>,
    mut next_position: u64,
    recorded_at: Timestamp,
    now: Timestamp,
    want_events: bool,
) -> Decided<'a> {
    let mut results = Vec::with_capacity(jobs.len());
    let mut columns = Columns::default();
    let mut projected: Option<Vec<RecordedEvent>> = want_events.then(Vec::new);
    for job in jobs {
        let decision = decide_append_multi(job, |r| View {
            work: work.get(r.stream.as_str()),
            now,
        });
        let result = match decision {
            Err(error) => Err(error),
            Ok(MultiDecision::Replay(last_revisions)) => {
                replay(job, &last_revisions, work).map_err(AppendError::from)
            }
            Ok(MultiDecision::Write(first_revisions)) => {
                let mut out = Vec::with_capacity(job.len());
                for (request, first) in job.iter().zip(first_revisions) {
                    let entry = work.entry(request.stream.as_str()).or_default();
                    let mut revision = first;
                    for event in &request.events {
                        let position = Position(next_position);
                        next_position += 1;
                        push(&mut columns, request, event, revision, position);
                        if let Some(events) = projected.as_mut() {
                            events.push(RecordedEvent::new(
                                request.stream.clone(),
                                revision,
                                position,
                                recorded_at,
                                event.clone(),
                            ));
                        }
                        entry.ids.insert(
                            event.id,
                            Known {
                                revision,
                                position,
                                recorded_at,
                            },
                        );
                        entry.by_revision.insert(revision, event.id);
                        revision = revision.next();
                    }
                    let last = Revision(revision.0 - 1);
                    entry.row.last_revision = Some(last);
                    entry.row.last_recorded_at = Some(recorded_at);
                    out.push(AppendResult {
                        next_expected_version: last,
                        position: Position(next_position - 1),
                        recorded_at,
                    });
                }
                Ok(out)
            }
        };
        results.push(result);
    }
    Decided {
        results,
        columns,
        next_position,
        projected,
    }
}

fn touched_rows(work: HashMap<&str, Work>) -> Vec<(String, StreamRow)> {
    work.into_iter()
        .map(|(stream, work)| (stream.to_owned(), work.row))
        .collect()
}

/// See the module docs. `jobs` have passed `check_append_requests`. The connection must be in a
/// transaction; the caller commits (or, on `Err`, rolls back).
pub(crate) async fn append_jobs(
    conn: &mut PgConnection,
    sql: &Sql,
    jobs: &[&[AppendRequest]],
    projections: &[Arc<dyn InlineProjection>],
) -> Result<Applied, BatchError> {
    let head = sqlx::query(AssertSqlSafe(Arc::clone(&sql.lock_head)))
        .fetch_one(&mut *conn)
        .await
        .map_err(storage("locking the log head"))?;
    let next_position = from_sql("next_position", get(&head, 0, "next_position")?)?;
    let last_recorded_at = timestamp(get::<OffsetDateTime>(&head, 1, "last_recorded_at")?);
    let now = timestamp(get::<OffsetDateTime>(&head, 2, "clock_timestamp")?);
    let generation: i64 = get(&head, 3, "generation")?;
    // Recorded times never go backwards along the log, even if the server clock does.
    let recorded_at = now.max(last_recorded_at);

    let mut work = load_work(conn, sql, jobs).await?;
    let decided = decide_jobs(
        jobs,
        &mut work,
        next_position,
        recorded_at,
        now,
        !projections.is_empty(),
    );
    let mut head = HeadState {
        generation,
        next_position,
        last_recorded_at,
    };
    if !decided.columns.positions.is_empty() {
        decided
            .columns
            .bind(sqlx::query(AssertSqlSafe(Arc::clone(&sql.write))))
            .bind(offset_date_time(recorded_at))
            .bind(to_sql(decided.next_position))
            .bind(&sql.channel)
            .execute(&mut *conn)
            .await
            .map_err(storage("writing events"))?;
        head = HeadState {
            generation: generation + 1,
            next_position: decided.next_position,
            last_recorded_at: recorded_at,
        };
        if let Some(events) = &decided.projected {
            for projection in projections {
                projection
                    .apply(conn, events)
                    .await
                    .map_err(BatchError::Projection)?;
            }
        }
    }
    Ok(Applied {
        results: decided.results,
        generation_before: generation,
        head,
        rows: touched_rows(work),
    })
}

/// The one-statement path of the writer: when `cache` is exact, the jobs are decided against it
/// and written by a single autocommitted statement that takes the log lock, checks that the
/// generation is still the cached one and that none of the ids is stored anywhere, and writes
/// only if both hold. Returns `None` — nothing written, cache dropped — when it cannot decide
/// or the checks fail; the caller then takes the locked path ([`append_jobs`]).
///
/// Why the checks make the cache's answers exact: every change to the log or to a stream head
/// moves the generation under the same row lock, and the statement re-reads the locked row at
/// its newest version before comparing. An equal generation means nothing changed since the
/// cache was last exact, so the heads the jobs were decided against are the stored ones. Ids
/// are not cached, so a job whose ids may already be stored (a retry) fails the id check and is
/// decided again under the lock, with the stored events loaded.
pub(crate) async fn append_fast(
    conn: &mut PgConnection,
    sql: &Sql,
    jobs: &[&[AppendRequest]],
    cache: &mut Cache,
) -> Result<Option<Vec<JobResult>>, StorageError> {
    let Some(head) = cache.head else {
        return Ok(None);
    };
    let mut missing: Vec<&str> = jobs
        .iter()
        .flat_map(|job| job.iter().map(|r| r.stream.as_str()))
        .filter(|stream| !cache.streams.contains_key(*stream))
        .collect();
    if !missing.is_empty() {
        missing.sort_unstable();
        missing.dedup();
        let rows = sqlx::query(AssertSqlSafe(Arc::clone(&sql.select_streams)))
            .bind(&missing)
            .fetch_all(&mut *conn)
            .await
            .map_err(storage("reading stream heads"))?;
        for stream in &missing {
            cache
                .streams
                .insert((*stream).to_owned(), StreamRow::default());
        }
        for row in &rows {
            let name: String = get(row, 0, "stream")?;
            cache.streams.insert(name, StreamRow::decode(row, 1)?);
        }
    }
    let mut work: HashMap<&str, Work> = HashMap::new();
    for job in jobs {
        for request in job.iter() {
            let stream = request.stream.as_str();
            let Some(row) = cache.streams.get(stream) else {
                return Ok(None);
            };
            // Visibility by age depends on the server's clock: decide those under the lock.
            if row.metadata.max_age.is_some() {
                return Ok(None);
            }
            work.entry(stream).or_insert_with(|| Work {
                row: row.clone(),
                ..Work::default()
            });
        }
    }
    // Placeholder time: the statement returns the real one, patched in below.
    let decided = decide_jobs(
        jobs,
        &mut work,
        head.next_position,
        head.last_recorded_at,
        Timestamp::now(),
        false,
    );
    // The decisions assumed that none of the jobs' ids is stored (a stored one would make a job
    // a replay or a conflict instead): the statements check it.
    let mut guard_ids: Vec<Uuid> = jobs
        .iter()
        .flat_map(|job| job.iter().flat_map(|r| r.events.iter().map(|e| e.id)))
        .collect();
    guard_ids.sort_unstable();
    guard_ids.dedup();
    if decided.columns.positions.is_empty() {
        // Only refusals: they hold if nothing changed since the cache was exact.
        let (generation, ids_stored): (i64, bool) =
            sqlx::query_as(AssertSqlSafe(Arc::clone(&sql.generation)))
                .bind(&guard_ids)
                .fetch_one(&mut *conn)
                .await
                .map_err(storage("reading the log generation"))?;
        if generation != head.generation {
            cache.invalidate();
            return Ok(None);
        }
        if ids_stored {
            return Ok(None);
        }
        return Ok(Some(decided.results));
    }
    let written = decided
        .columns
        .bind(sqlx::query(AssertSqlSafe(Arc::clone(&sql.write_fast))))
        .bind(to_sql(decided.next_position))
        .bind(&sql.channel)
        .bind(head.generation)
        .bind(&guard_ids)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|error| {
            cache.invalidate();
            storage("writing events (the outcome is unknown: retry with the same event ids)")(error)
        })?
        .map(|row| get::<OffsetDateTime>(&row, 0, "last_recorded_at"))
        .transpose()?;
    let Some(recorded_at) = written.map(timestamp) else {
        cache.invalidate();
        return Ok(None);
    };
    let mut results = decided.results;
    for result in results.iter_mut().flatten() {
        for appended in result.iter_mut() {
            appended.recorded_at = recorded_at;
        }
    }
    for (stream, work) in work {
        let mut row = work.row;
        // In this path only this batch's events are known by revision: the streams it wrote.
        if !work.by_revision.is_empty() {
            row.last_recorded_at = Some(recorded_at);
        }
        cache.streams.insert(stream.to_owned(), row);
    }
    cache.head = Some(HeadState {
        generation: head.generation + 1,
        next_position: decided.next_position,
        last_recorded_at: recorded_at,
    });
    Ok(Some(results))
}

async fn load_work<'j>(
    conn: &mut PgConnection,
    sql: &Sql,
    jobs: &[&'j [AppendRequest]],
) -> Result<HashMap<&'j str, Work>, StorageError> {
    let mut streams: Vec<&'j str> = jobs
        .iter()
        .flat_map(|job| job.iter().map(|r| r.stream.as_str()))
        .collect();
    streams.sort_unstable();
    streams.dedup();
    let mut work: HashMap<&'j str, Work> = HashMap::with_capacity(streams.len());
    let rows = sqlx::query(AssertSqlSafe(Arc::clone(&sql.select_streams)))
        .bind(&streams)
        .fetch_all(&mut *conn)
        .await
        .map_err(storage("reading stream heads"))?;
    for row in &rows {
        let name: &str = get(row, 0, "stream")?;
        if let Ok(index) = streams.binary_search(&name) {
            work.entry(streams[index]).or_default().row = StreamRow::decode(row, 1)?;
        }
    }
    // Only a stream that has events can hold one of the ids.
    let ids: Vec<Uuid> = jobs
        .iter()
        .flat_map(|job| job.iter())
        .filter(|r| {
            work.get(r.stream.as_str())
                .is_some_and(|w| w.row.last_revision.is_some())
        })
        .flat_map(|r| r.events.iter().map(|e| e.id))
        .collect();
    if ids.is_empty() {
        return Ok(work);
    }
    let rows = sqlx::query(AssertSqlSafe(Arc::clone(&sql.select_known_ids)))
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await
        .map_err(storage("looking up event ids"))?;
    for row in &rows {
        let name: &str = get(row, 0, "stream")?;
        let Some(entry) = work.get_mut(name) else {
            continue; // the same id in a stream these jobs do not write
        };
        let id: Uuid = get(row, 1, "id")?;
        let revision = Revision(from_sql("revision", get(row, 2, "revision")?)?);
        let known = Known {
            revision,
            position: Position(from_sql("position", get(row, 3, "position")?)?),
            recorded_at: timestamp(get(row, 4, "recorded_at")?),
        };
        entry.ids.insert(id, known);
        entry.by_revision.insert(revision, id);
    }
    Ok(work)
}

fn replay(
    job: &[AppendRequest],
    last_revisions: &[Revision],
    work: &HashMap<&str, Work>,
) -> Result<Vec<AppendResult>, StorageError> {
    job.iter()
        .zip(last_revisions)
        .map(|(request, last)| {
            let known = work
                .get(request.stream.as_str())
                .and_then(|w| w.by_revision.get(last).and_then(|id| w.ids.get(id)))
                .ok_or_else(|| {
                    StorageError::Backend(
                        format!(
                            "replayed revision {last} of {} was not among the loaded events",
                            request.stream
                        )
                        .into(),
                    )
                })?;
            Ok(AppendResult {
                next_expected_version: *last,
                position: known.position,
                recorded_at: known.recorded_at,
            })
        })
        .collect()
}

fn push<'a>(
    columns: &mut Columns<'a>,
    request: &'a AppendRequest,
    event: &'a EventData,
    revision: Revision,
    position: Position,
) {
    columns.positions.push(to_sql(position.value()));
    columns.streams.push(request.stream.as_str());
    columns.revisions.push(to_sql(revision.value()));
    columns.ids.push(event.id);
    columns.types.push(event.event_type.as_str());
    columns.content_types.push(content_code(event.content_type));
    columns.data.push(&event.data);
    columns.metadata.push(encode_metadata(&event.metadata));
}
