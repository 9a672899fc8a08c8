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
//! 4. writes all accepted events, the new stream heads and the new log head in one statement,
//!    which also queues the commit notification.
//!
//! Positions come from `log_head.next_position` under the lock, so they are gapless, and the
//! lock is held until commit, so they are handed out in commit order: a reader that sees
//! position `p` committed already sees every position below `p`.

use std::{collections::HashMap, sync::Arc};

use factline_core::{
    AppendError, AppendRequest, AppendResult, EventData, MultiDecision, Position, RecordedEvent,
    Revision, StorageError, StreamView, Timestamp, category_of, decide_append_multi,
};
use sqlx::{AssertSqlSafe, PgConnection, Row as _};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    InlineProjection, InlineProjectionError,
    error::storage,
    rows::{
        StreamRow, content_code, encode_metadata, from_sql, offset_date_time, timestamp, to_sql,
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
    categories: Vec<&'a str>,
    content_types: Vec<i16>,
    data: Vec<&'a [u8]>,
    metadata: Vec<Option<Vec<u8>>>,
}

/// One job's outcome.
pub(crate) type JobResult = Result<Vec<AppendResult>, AppendError>;

/// See the module docs. `jobs` have passed `check_append_requests`. The connection must be in a
/// transaction; the caller commits (or, on `Err`, rolls back).
pub(crate) async fn append_jobs(
    conn: &mut PgConnection,
    sql: &Sql,
    jobs: &[&[AppendRequest]],
    projections: &[Arc<dyn InlineProjection>],
) -> Result<Vec<JobResult>, BatchError> {
    let head = sqlx::query(AssertSqlSafe(Arc::clone(&sql.lock_head)))
        .fetch_one(&mut *conn)
        .await
        .map_err(storage("locking the log head"))?;
    let mut next_position = from_sql("next_position", decode(&head, 0)?)?;
    let last_recorded_at = timestamp(decode::<OffsetDateTime>(&head, 1)?);
    let now = timestamp(decode::<OffsetDateTime>(&head, 2)?);
    // Recorded times never go backwards along the log, even if the server clock does.
    let recorded_at = now.max(last_recorded_at);

    let mut work = load_work(conn, sql, jobs).await?;

    let mut results = Vec::with_capacity(jobs.len());
    let mut columns = Columns::default();
    let mut heads: Vec<(&str, Revision)> = Vec::new();
    // The events as recorded, in position order, when inline projections want them.
    let mut projected: Option<Vec<RecordedEvent>> = (!projections.is_empty()).then(Vec::new);
    for job in jobs {
        let decision = decide_append_multi(job, |r| View {
            work: work.get(r.stream.as_str()),
            now,
        });
        let result = match decision {
            Err(error) => Err(error),
            Ok(MultiDecision::Replay(last_revisions)) => {
                replay(job, &last_revisions, &work).map_err(AppendError::from)
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
                    heads.push((request.stream.as_str(), last));
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
    if columns.positions.is_empty() {
        return Ok(results);
    }
    // A stream written by several jobs keeps its last head.
    let mut last_heads: HashMap<&str, Revision> = HashMap::with_capacity(heads.len());
    for (stream, revision) in heads {
        last_heads.insert(stream, revision);
    }
    let (head_streams, head_revisions): (Vec<&str>, Vec<i64>) = last_heads
        .into_iter()
        .map(|(stream, revision)| (stream, to_sql(revision.value())))
        .unzip();
    let recorded_at_sql = offset_date_time(recorded_at);
    sqlx::query(AssertSqlSafe(Arc::clone(&sql.write)))
        .bind(&columns.positions)
        .bind(&columns.streams)
        .bind(&columns.revisions)
        .bind(&columns.ids)
        .bind(&columns.types)
        .bind(&columns.categories)
        .bind(&columns.content_types)
        .bind(&columns.data)
        .bind(&columns.metadata)
        .bind(recorded_at_sql)
        .bind(&head_streams)
        .bind(&head_revisions)
        .bind(to_sql(next_position))
        .bind(&sql.channel)
        .execute(&mut *conn)
        .await
        .map_err(storage("writing events"))?;
    if let Some(events) = projected {
        for projection in projections {
            projection
                .apply(conn, &events)
                .await
                .map_err(BatchError::Projection)?;
        }
    }
    Ok(results)
}

fn decode<'r, T>(row: &'r sqlx::postgres::PgRow, index: usize) -> Result<T, StorageError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(index)
        .map_err(|error| crate::rows::corrupt("log_head", error))
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
        let name: &str = row
            .try_get(0)
            .map_err(|e| crate::rows::corrupt("stream", e))?;
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
        let name: &str = row
            .try_get(0)
            .map_err(|e| crate::rows::corrupt("stream", e))?;
        let Some(entry) = work.get_mut(name) else {
            continue; // the same id in a stream these jobs do not write
        };
        let id: Uuid = row.try_get(1).map_err(|e| crate::rows::corrupt("id", e))?;
        let revision = Revision(from_sql(
            "revision",
            row.try_get(2)
                .map_err(|e| crate::rows::corrupt("revision", e))?,
        )?);
        let known = Known {
            revision,
            position: Position(from_sql(
                "position",
                row.try_get(3)
                    .map_err(|e| crate::rows::corrupt("position", e))?,
            )?),
            recorded_at: timestamp(
                row.try_get(4)
                    .map_err(|e| crate::rows::corrupt("recorded_at", e))?,
            ),
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
    columns
        .categories
        .push(category_of(request.stream.as_str()));
    columns.content_types.push(content_code(event.content_type));
    columns.data.push(&event.data);
    columns.metadata.push(encode_metadata(&event.metadata));
}
