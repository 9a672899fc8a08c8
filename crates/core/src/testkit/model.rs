//! A reference model of the contract and a property test that drives a store and the model
//! with the same random operations and compares every answer and the whole visible state.
//!
//! The model restates the rules in the plainest form (vectors and linear scans) and shares no
//! code with the backends, so a mistake in [`crate::rules`] or in a backend shows up as a
//! disagreement. Retention by age is left out (it depends on the clock); the conformance
//! suite covers it.

use std::{collections::BTreeMap, future::Future};

use proptest::{
    prelude::*,
    sample::Index,
    test_runner::{Config, TestCaseError, TestError, TestRunner},
};
use uuid::Uuid;

use super::{TestStore, all_events, event, stream};
use crate::{
    AppendError, AppendRequest, DeleteError, DeleteMode, EventData, ExpectedVersion,
    ReadStreamError, ReadStreamOptions, Revision, StreamMetadata,
};

const STREAMS: [&str; 3] = ["model-a", "model-b", "model-c"];

/// How an operation states its expected version; `ExactLast` and `ExactOffset` are resolved
/// against the model's current last revision so that both hits and misses are common.
#[derive(Debug, Clone, Copy)]
pub enum ExpectedSpec {
    Any,
    NoStream,
    StreamExists,
    ExactLast,
    ExactOffset(i8),
}

/// One random operation.
#[derive(Debug, Clone)]
pub enum Op {
    Append {
        stream: usize,
        expected: ExpectedSpec,
        count: usize,
    },
    /// Re-issue an earlier append exactly (same stream, expected version and ids).
    Retry { earlier: Index },
    /// An earlier append's ids plus new ones, or in another order: a partial overlap.
    Overlap {
        earlier: Index,
        extra: usize,
        reversed: bool,
    },
    AppendMulti {
        parts: Vec<(usize, ExpectedSpec, usize)>,
    },
    SoftDelete {
        stream: usize,
        expected: ExpectedSpec,
    },
    Tombstone {
        stream: usize,
        expected: ExpectedSpec,
    },
    SetMetadata {
        stream: usize,
        max_count: Option<u64>,
        truncate_before: Option<u64>,
    },
}

fn expected_spec() -> impl Strategy<Value = ExpectedSpec> {
    prop_oneof![
        2 => Just(ExpectedSpec::Any),
        2 => Just(ExpectedSpec::NoStream),
        1 => Just(ExpectedSpec::StreamExists),
        3 => Just(ExpectedSpec::ExactLast),
        1 => (-2i8..=2).prop_map(ExpectedSpec::ExactOffset),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let stream = 0..STREAMS.len();
    prop_oneof![
        8 => (stream.clone(), expected_spec(), 1usize..4)
            .prop_map(|(stream, expected, count)| Op::Append { stream, expected, count }),
        3 => any::<Index>().prop_map(|earlier| Op::Retry { earlier }),
        2 => (any::<Index>(), 0usize..2, any::<bool>())
            .prop_map(|(earlier, extra, reversed)| Op::Overlap { earlier, extra, reversed }),
        2 => proptest::collection::vec((stream.clone(), expected_spec(), 1usize..3), 1..3)
            .prop_map(|parts| Op::AppendMulti { parts }),
        1 => (stream.clone(), expected_spec())
            .prop_map(|(stream, expected)| Op::SoftDelete { stream, expected }),
        1 => (stream.clone(), expected_spec())
            .prop_map(|(stream, expected)| Op::Tombstone { stream, expected }),
        1 => (stream, proptest::option::of(1u64..4), proptest::option::of(0u64..6))
            .prop_map(|(stream, max_count, truncate_before)| Op::SetMetadata {
                stream,
                max_count,
                truncate_before,
            }),
    ]
}

/// Random operation sequences.
pub fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..40)
}

/// What an operation answered, reduced to what the contract fixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// (last revision, last position) per stream written or replayed.
    Appended(Vec<(u64, u64)>),
    WrongVersion {
        actual: Option<u64>,
    },
    Conflict,
    Deleted,
    NotFound,
    Done,
    Other(String),
}

fn append_outcome(result: Result<Vec<crate::AppendResult>, AppendError>) -> Outcome {
    match result {
        Ok(results) => Outcome::Appended(
            results
                .iter()
                .map(|r| (r.next_expected_version.0, r.position.0))
                .collect(),
        ),
        Err(AppendError::WrongExpectedVersion { actual, .. }) => Outcome::WrongVersion {
            actual: match actual {
                crate::StreamState::NoStream => None,
                crate::StreamState::At(r) => Some(r.0),
            },
        },
        Err(AppendError::IdempotencyConflict { .. }) => Outcome::Conflict,
        Err(AppendError::StreamDeleted { .. }) => Outcome::Deleted,
        Err(other) => Outcome::Other(other.to_string()),
    }
}

fn delete_outcome(result: Result<(), DeleteError>) -> Outcome {
    match result {
        Ok(()) => Outcome::Done,
        Err(DeleteError::WrongExpectedVersion { actual, .. }) => Outcome::WrongVersion {
            actual: match actual {
                crate::StreamState::NoStream => None,
                crate::StreamState::At(r) => Some(r.0),
            },
        },
        Err(DeleteError::NotFound { .. }) => Outcome::NotFound,
        Err(DeleteError::Deleted { .. }) => Outcome::Deleted,
        Err(other) => Outcome::Other(other.to_string()),
    }
}

#[derive(Debug, Default, Clone)]
struct ModelStream {
    /// (event id, position) by revision.
    events: Vec<(Uuid, u64)>,
    max_count: Option<u64>,
    truncate_before: u64,
    tombstoned: bool,
}

impl ModelStream {
    fn last(&self) -> Option<u64> {
        (self.events.len() as u64).checked_sub(1)
    }
    fn first_visible(&self) -> u64 {
        let by_count = self
            .max_count
            .map_or(0, |n| (self.events.len() as u64).saturating_sub(n));
        self.truncate_before.max(by_count)
    }
    fn visible(&self) -> &[(Uuid, u64)] {
        let first = (self.first_visible() as usize).min(self.events.len());
        &self.events[first..]
    }
    fn holds(&self, expected: ExpectedVersion) -> bool {
        match expected {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => self.visible().is_empty(),
            ExpectedVersion::StreamExists => !self.visible().is_empty(),
            ExpectedVersion::Exact(r) => self.last() == Some(r.0),
        }
    }
    /// The newest revision holding `id` (with an idempotency window, an old id can be
    /// written again once it left the window).
    fn position_of(&self, id: Uuid) -> Option<usize> {
        self.events.iter().rposition(|(e, _)| *e == id)
    }
}

/// What a backend declares about itself to the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelConfig {
    /// For `Any`, `NoStream` and `StreamExists` retries, how many of a stream's newest events the
    /// backend searches for the request's ids (`None`: all of them). `Exact(r)` retries are
    /// always recognized: the events at `r + 1 …` count as searched.
    pub idempotency_window_events: Option<usize>,
}

/// The reference model.
#[derive(Debug, Default, Clone)]
pub struct Model {
    /// (stream, revision, id) by position.
    log: Vec<(String, u64, Uuid)>,
    streams: BTreeMap<String, ModelStream>,
    config: ModelConfig,
}

enum Verdict {
    Write,
    Replay(u64, u64),
}

impl Model {
    fn stream(&self, name: &str) -> ModelStream {
        self.streams.get(name).cloned().unwrap_or_default()
    }

    fn resolve(&self, name: &str, spec: ExpectedSpec) -> ExpectedVersion {
        let last = self.stream(name).last();
        match spec {
            ExpectedSpec::Any => ExpectedVersion::Any,
            ExpectedSpec::NoStream => ExpectedVersion::NoStream,
            ExpectedSpec::StreamExists => ExpectedVersion::StreamExists,
            ExpectedSpec::ExactLast => match last {
                Some(r) => ExpectedVersion::Exact(Revision(r)),
                None => ExpectedVersion::NoStream,
            },
            ExpectedSpec::ExactOffset(offset) => {
                let base = last.map_or(0, |r| r as i64);
                ExpectedVersion::Exact(Revision((base + i64::from(offset)).max(0) as u64))
            }
        }
    }

    fn verdict(
        &self,
        name: &str,
        expected: ExpectedVersion,
        ids: &[Uuid],
    ) -> Result<Verdict, Outcome> {
        let s = self.stream(name);
        if s.tombstoned {
            return Err(Outcome::Deleted);
        }
        let len = s.events.len();
        let searched = |revision: usize| {
            self.config
                .idempotency_window_events
                .is_none_or(|window| revision + window >= len)
                || matches!(expected, ExpectedVersion::Exact(r)
                    if revision as u64 > r.0 && (revision as u64) <= r.0 + ids.len() as u64)
        };
        let known = |id: Uuid| s.position_of(id).filter(|revision| searched(*revision));
        if ids.iter().any(|id| known(*id).is_some()) {
            if let Some(k) = known(ids[0]) {
                let contiguous = ids
                    .iter()
                    .enumerate()
                    .all(|(i, id)| s.events.get(k + i).map(|(e, _)| e) == Some(id));
                let placed = match expected {
                    ExpectedVersion::Exact(r) => k as u64 == r.0 + 1,
                    _ => true,
                };
                if contiguous && placed {
                    let last = k + ids.len() - 1;
                    return Ok(Verdict::Replay(last as u64, s.events[last].1));
                }
            }
            return Err(Outcome::Conflict);
        }
        if !s.holds(expected) {
            return Err(Outcome::WrongVersion { actual: s.last() });
        }
        Ok(Verdict::Write)
    }

    fn append_multi(&mut self, parts: &[(String, ExpectedVersion, Vec<Uuid>)]) -> Outcome {
        let mut verdicts = Vec::new();
        for (name, expected, ids) in parts {
            match self.verdict(name, *expected, ids) {
                Ok(v) => verdicts.push(v),
                Err(outcome) => return outcome,
            }
        }
        let replays = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Replay(..)))
            .count();
        if replays == verdicts.len() {
            return Outcome::Appended(
                verdicts
                    .iter()
                    .map(|v| match v {
                        Verdict::Replay(r, p) => (*r, *p),
                        Verdict::Write => unreachable!(),
                    })
                    .collect(),
            );
        }
        if replays > 0 {
            return Outcome::Conflict;
        }
        let mut results = Vec::new();
        for (name, _, ids) in parts {
            let s = self.streams.entry(name.clone()).or_default();
            for id in ids {
                let position = self.log.len() as u64;
                let revision = s.events.len() as u64;
                s.events.push((*id, position));
                self.log.push((name.clone(), revision, *id));
            }
            results.push((s.last().unwrap_or(0), self.log.len() as u64 - 1));
        }
        Outcome::Appended(results)
    }

    fn delete(&mut self, name: &str, expected: ExpectedVersion, mode: DeleteMode) -> Outcome {
        let s = self.stream(name);
        if s.tombstoned {
            return Outcome::Deleted;
        }
        if mode == DeleteMode::Soft && s.events.is_empty() {
            return Outcome::NotFound;
        }
        if !s.holds(expected) {
            return Outcome::WrongVersion { actual: s.last() };
        }
        let entry = self.streams.entry(name.to_owned()).or_default();
        match mode {
            DeleteMode::Soft => entry.truncate_before = entry.events.len() as u64,
            DeleteMode::Tombstone => entry.tombstoned = true,
        }
        Outcome::Done
    }

    fn set_metadata(
        &mut self,
        name: &str,
        max_count: Option<u64>,
        truncate_before: Option<u64>,
    ) -> Outcome {
        let entry = self.streams.entry(name.to_owned()).or_default();
        if entry.tombstoned {
            return Outcome::Deleted;
        }
        entry.max_count = max_count;
        entry.truncate_before = truncate_before.unwrap_or(0);
        Outcome::Done
    }

    /// What a full forwards read of `name` returns: `Err` with NotFound or Deleted.
    fn read(&self, name: &str) -> Result<Vec<(u64, Uuid)>, Outcome> {
        let s = self.stream(name);
        if s.tombstoned {
            return Err(Outcome::Deleted);
        }
        let first = s.first_visible();
        let visible: Vec<(u64, Uuid)> = s
            .visible()
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (first + i as u64, *id))
            .collect();
        if visible.is_empty() {
            return Err(Outcome::NotFound);
        }
        Ok(visible)
    }
}

async fn store_read<S: TestStore>(store: &S, name: &str) -> Result<Vec<(u64, Uuid)>, Outcome> {
    let s = stream(name);
    let mut out = Vec::new();
    let mut options = ReadStreamOptions::forwards().limit(2);
    loop {
        match store.read_stream(&s, options).await {
            Ok(slice) => {
                out.extend(slice.events.iter().map(|e| (e.revision.0, e.id)));
                if slice.is_end {
                    break;
                }
                options = options.from(slice.next_revision);
            }
            Err(ReadStreamError::NotFound { .. }) => return Err(Outcome::NotFound),
            Err(ReadStreamError::Deleted { .. }) => return Err(Outcome::Deleted),
            Err(other) => return Err(Outcome::Other(other.to_string())),
        }
    }
    let mut backwards = Vec::new();
    let mut options = ReadStreamOptions::backwards().limit(3);
    loop {
        let slice = store
            .read_stream(&s, options)
            .await
            .map_err(|e| Outcome::Other(e.to_string()))?;
        backwards.extend(slice.events.iter().map(|e| (e.revision.0, e.id)));
        if slice.is_end {
            break;
        }
        options = options.from(slice.next_revision);
    }
    backwards.reverse();
    if backwards != out {
        return Err(Outcome::Other(format!(
            "backwards read {backwards:?} differs from forwards read {out:?}"
        )));
    }
    Ok(out)
}

fn fresh(count: usize) -> Vec<EventData> {
    (0..count).map(|_| event("ModelEventRecorded")).collect()
}

/// Runs `ops` against a store and the model; `Err` describes the first disagreement.
pub async fn run_ops<S: TestStore>(
    store: S,
    ops: &[Op],
    config: ModelConfig,
) -> Result<(), String> {
    let mut model = Model {
        config,
        ..Model::default()
    };
    // Earlier single-stream appends: (stream, expected, events).
    let mut history: Vec<(String, ExpectedVersion, Vec<EventData>)> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        let (got, want) = match op {
            Op::Append {
                stream: i,
                expected,
                count,
            } => {
                let name = STREAMS[*i];
                let expected = model.resolve(name, *expected);
                let events = fresh(*count);
                history.push((name.to_owned(), expected, events.clone()));
                let ids = events.iter().map(|e| e.id).collect();
                let want = model.append_multi(&[(name.to_owned(), expected, ids)]);
                let got = store
                    .append(&stream(name), expected, events)
                    .await
                    .map(|r| vec![r]);
                (append_outcome(got), want)
            }
            Op::Retry { earlier } | Op::Overlap { earlier, .. } if history.is_empty() => {
                let _ = earlier;
                continue;
            }
            Op::Retry { earlier } => {
                let (name, expected, events) = history[earlier.index(history.len())].clone();
                let ids = events.iter().map(|e| e.id).collect();
                let want = model.append_multi(&[(name.clone(), expected, ids)]);
                let got = store
                    .append(&stream(&name), expected, events)
                    .await
                    .map(|r| vec![r]);
                (append_outcome(got), want)
            }
            Op::Overlap {
                earlier,
                extra,
                reversed,
            } => {
                let (name, expected, mut events) = history[earlier.index(history.len())].clone();
                events.extend(fresh(*extra));
                if *reversed {
                    events.reverse();
                }
                let ids = events.iter().map(|e| e.id).collect();
                let want = model.append_multi(&[(name.clone(), expected, ids)]);
                let got = store
                    .append(&stream(&name), expected, events)
                    .await
                    .map(|r| vec![r]);
                (append_outcome(got), want)
            }
            Op::AppendMulti { parts } => {
                let mut seen = std::collections::HashSet::new();
                let parts: Vec<_> = parts.iter().filter(|(i, _, _)| seen.insert(*i)).collect();
                let requests: Vec<AppendRequest> = parts
                    .iter()
                    .map(|(i, spec, count)| {
                        let name = STREAMS[*i];
                        AppendRequest::new(stream(name), model.resolve(name, *spec), fresh(*count))
                    })
                    .collect();
                let model_parts: Vec<_> = requests
                    .iter()
                    .map(|r| {
                        (
                            r.stream.to_string(),
                            r.expected,
                            r.events.iter().map(|e| e.id).collect::<Vec<_>>(),
                        )
                    })
                    .collect();
                let want = model.append_multi(&model_parts);
                (append_outcome(store.append_multi(requests).await), want)
            }
            Op::SoftDelete {
                stream: i,
                expected,
            }
            | Op::Tombstone {
                stream: i,
                expected,
            } => {
                let name = STREAMS[*i];
                let expected = model.resolve(name, *expected);
                let mode = if matches!(op, Op::SoftDelete { .. }) {
                    DeleteMode::Soft
                } else {
                    DeleteMode::Tombstone
                };
                let want = model.delete(name, expected, mode);
                let got = store.delete_stream(&stream(name), expected, mode).await;
                (delete_outcome(got), want)
            }
            Op::SetMetadata {
                stream: i,
                max_count,
                truncate_before,
            } => {
                let name = STREAMS[*i];
                let want = model.set_metadata(name, *max_count, *truncate_before);
                let metadata = StreamMetadata {
                    max_count: *max_count,
                    max_age: None,
                    truncate_before: truncate_before.map(Revision),
                };
                let got = match store.set_stream_metadata(&stream(name), metadata).await {
                    Ok(()) => Outcome::Done,
                    Err(crate::MetadataError::Deleted { .. }) => Outcome::Deleted,
                    Err(other) => Outcome::Other(other.to_string()),
                };
                (got, want)
            }
        };
        if got != want {
            return Err(format!(
                "step {step} ({op:?}): store answered {got:?}, model {want:?}"
            ));
        }
        // The whole visible state agrees after every step.
        let log: Vec<(String, u64, Uuid)> = all_events(&store)
            .await
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                assert_eq!(e.position.0, i as u64, "positions are gapless");
                (e.stream.to_string(), e.revision.0, e.id)
            })
            .collect();
        if log != model.log {
            return Err(format!(
                "after step {step} ({op:?}): $all is {log:?}, model {:?}",
                model.log
            ));
        }
        for name in STREAMS {
            let got = store_read(&store, name).await;
            let want = model.read(name);
            if got != want {
                return Err(format!(
                    "after step {step} ({op:?}): read of {name} is {got:?}, model {want:?}"
                ));
            }
        }
    }
    Ok(())
}

/// Property test: `cases` random operation sequences, each on a fresh store from `factory`.
/// Panics with the shrunk failing sequence.
pub fn check_against_model<S, F, Fut>(factory: F, cases: u32)
where
    S: TestStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    check_against_model_with(factory, cases, ModelConfig::default());
}

/// [`check_against_model`] for a backend that declares a [`ModelConfig`].
pub fn check_against_model_with<S, F, Fut>(factory: F, cases: u32, config: ModelConfig)
where
    S: TestStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for the model test");
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&ops(), |ops| {
        runtime
            .block_on(async { run_ops(factory().await, &ops, config).await })
            .map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, ops)) => {
            panic!("store disagrees with the model: {reason}\nminimal operations: {ops:#?}")
        }
        Err(TestError::Abort(reason)) => panic!("model test aborted: {reason}"),
    }
}
