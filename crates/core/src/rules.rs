//! The append and delete rules of the contract as pure functions, shared by the backends.
//!
//! A backend describes one stream through [`StreamView`]; [`decide_append`] then says whether
//! to write, to answer a retry with the original result, or to refuse. Keeping this in one
//! place means every backend agrees on the corner cases (soft-deleted streams, partial
//! retries). The reference model in `testkit` re-states the rules independently, so a bug
//! here is caught by the property tests.

use uuid::Uuid;

use std::collections::HashSet;

use crate::{
    AppendError, AppendRequest, DeleteError, DeleteMode, EventData, EventsRejected,
    ExpectedVersion, Limit, LimitExceeded, Limits, Revision, StreamId, StreamState,
};

/// Validates an `append_multi` request before any stored state is consulted: at least one
/// stream, each with at least one event, no stream twice, and every limit of
/// [`Limits::check_events`] over all events together.
pub fn check_append_requests(
    limits: &Limits,
    requests: &[AppendRequest],
) -> Result<(), AppendError> {
    if requests.is_empty() || requests.iter().any(|r| r.events.is_empty()) {
        return Err(EventsRejected::Empty.into());
    }
    LimitExceeded::check(
        Limit::StreamsPerAppend,
        limits.streams_per_append_max,
        requests.len(),
    )?;
    let mut streams = HashSet::new();
    for request in requests {
        if !streams.insert(&request.stream) {
            return Err(AppendError::DuplicateStream {
                stream: request.stream.clone(),
            });
        }
    }
    limits.check_events(requests.iter().flat_map(|r| r.events.iter()))?;
    Ok(())
}

/// What a backend knows about one stream when it checks an append.
pub trait StreamView {
    /// True when the stream is tombstoned.
    fn is_tombstoned(&self) -> bool;
    /// The last revision ever written, visible or not.
    fn last_revision(&self) -> Option<Revision>;
    /// True when at least one event is visible (not hidden by truncation, soft delete,
    /// `max_count` or `max_age`).
    fn has_visible_events(&self) -> bool;
    /// The revision of the event with this id, if it is in the stream. A backend may look only
    /// at a bounded window of recent events; it must look at least as far back as the events
    /// an `Exact` retry would occupy.
    fn revision_of(&self, event_id: &Uuid) -> Option<Revision>;
    /// The id of the event at `revision`, if there is one.
    fn id_at(&self, revision: Revision) -> Option<Uuid>;
}

/// The verdict of [`decide_append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendDecision {
    /// Write the events starting at this revision.
    Write {
        /// Revision of the first new event.
        first_revision: Revision,
    },
    /// The request repeats an earlier append; answer with the result of the event at this
    /// revision (the last of the earlier append) and write nothing.
    Replay {
        /// Revision of the earlier append's last event.
        last_revision: Revision,
    },
}

/// The current state of a stream as reported in errors.
pub fn stream_state(view: &impl StreamView) -> StreamState {
    match view.last_revision() {
        Some(revision) => StreamState::At(revision),
        None => StreamState::NoStream,
    }
}

/// True when `expected` holds for the stream described by `view`.
pub fn expected_version_holds(expected: ExpectedVersion, view: &impl StreamView) -> bool {
    match expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => !view.has_visible_events(),
        ExpectedVersion::StreamExists => view.has_visible_events(),
        ExpectedVersion::Exact(revision) => view.last_revision() == Some(revision),
    }
}

/// Applies the append rules, in this order:
/// 1. a tombstoned stream refuses everything;
/// 2. if any of the request's ids is already in the stream, the request is a replay when its
///    first id is stored and the following ids sit at the following revisions (and, for
///    `Exact(r)`, the first sits at `r + 1`); anything else is an idempotency conflict;
/// 3. otherwise the expected version must hold.
///
/// The caller has validated the events ([`Limits::check_events`](crate::Limits::check_events)).
pub fn decide_append(
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[EventData],
    view: &impl StreamView,
) -> Result<AppendDecision, AppendError> {
    if view.is_tombstoned() {
        return Err(AppendError::StreamDeleted {
            stream: stream.clone(),
        });
    }
    let known = events
        .iter()
        .find(|event| view.revision_of(&event.id).is_some());
    if let Some(known) = known {
        if let Some(first) = events.first().and_then(|e| view.revision_of(&e.id)) {
            let in_place = events
                .iter()
                .enumerate()
                .all(|(i, event)| view.id_at(Revision(first.0 + i as u64)) == Some(event.id));
            let at_expected_place = match expected {
                ExpectedVersion::Exact(revision) => first == revision.next(),
                _ => true,
            };
            if in_place && at_expected_place {
                return Ok(AppendDecision::Replay {
                    last_revision: Revision(first.0 + events.len() as u64 - 1),
                });
            }
        }
        return Err(AppendError::IdempotencyConflict {
            stream: stream.clone(),
            event_id: known.id,
        });
    }
    if !expected_version_holds(expected, view) {
        return Err(AppendError::WrongExpectedVersion {
            stream: stream.clone(),
            expected,
            actual: stream_state(view),
        });
    }
    Ok(AppendDecision::Write {
        first_revision: view.last_revision().map_or(Revision::FIRST, Revision::next),
    })
}

/// What an `append_multi` does once every part has its [`AppendDecision`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MultiDecision {
    /// Write every part; the first revision of each, in request order.
    Write(Vec<Revision>),
    /// Every part repeats an earlier append; the last revision of each, in request order.
    Replay(Vec<Revision>),
}

/// Applies [`decide_append`] to every part of an `append_multi` (in request order, the first
/// refusal wins), with `view_of` describing each part's stream, then combines the decisions:
/// all writes, or all replays; a mix (some parts written before, some not) is an idempotency
/// conflict naming the first replayed part.
pub fn decide_append_multi<'r, V: StreamView>(
    requests: &'r [AppendRequest],
    mut view_of: impl FnMut(&'r AppendRequest) -> V,
) -> Result<MultiDecision, AppendError> {
    let decisions = requests
        .iter()
        .map(|r| decide_append(&r.stream, r.expected, &r.events, &view_of(r)))
        .collect::<Result<Vec<_>, _>>()?;
    settle(requests, decisions)
}

fn settle(
    requests: &[AppendRequest],
    decisions: Vec<AppendDecision>,
) -> Result<MultiDecision, AppendError> {
    let replayed = decisions
        .iter()
        .position(|d| matches!(d, AppendDecision::Replay { .. }));
    let Some(index) = replayed else {
        return Ok(MultiDecision::Write(
            decisions
                .into_iter()
                .filter_map(|d| match d {
                    AppendDecision::Write { first_revision } => Some(first_revision),
                    AppendDecision::Replay { .. } => None,
                })
                .collect(),
        ));
    };
    let replays: Vec<Revision> = decisions
        .iter()
        .filter_map(|d| match d {
            AppendDecision::Replay { last_revision } => Some(*last_revision),
            AppendDecision::Write { .. } => None,
        })
        .collect();
    if replays.len() != decisions.len() {
        return Err(AppendError::IdempotencyConflict {
            stream: requests[index].stream.clone(),
            event_id: requests[index].events[0].id,
        });
    }
    Ok(MultiDecision::Replay(replays))
}

/// Applies the delete rules: a tombstoned stream refuses; a soft delete of a stream never
/// written is `NotFound`; then the expected version must hold. Returns the stream's last
/// revision (a soft delete sets `truncate_before` to the one after it).
pub fn decide_delete(
    stream: &StreamId,
    expected: ExpectedVersion,
    mode: DeleteMode,
    view: &impl StreamView,
) -> Result<Option<Revision>, DeleteError> {
    if view.is_tombstoned() {
        return Err(DeleteError::Deleted {
            stream: stream.clone(),
        });
    }
    let last = view.last_revision();
    if mode == DeleteMode::Soft && last.is_none() {
        return Err(DeleteError::NotFound {
            stream: stream.clone(),
        });
    }
    if !expected_version_holds(expected, view) {
        return Err(DeleteError::WrongExpectedVersion {
            stream: stream.clone(),
            expected,
            actual: stream_state(view),
        });
    }
    Ok(last)
}
