//! Schema evolution: [`Upcasters`] turn stored events of an older shape into the current one
//! on read, and [`check_stored_events`] tells whether a new event schema still reads every
//! stored event.
//!
//! An upcaster is registered for one `(event type, schema version)` and returns the data of the
//! next version (optionally under a new type name). On read, steps are chained until no
//! upcaster matches, then the event is decoded as the current code knows it. Events are never
//! rewritten in the store: the log keeps what happened, in the shape it was written.

use std::{borrow::Cow, collections::HashMap, sync::Arc};

use factline_core::{
    EventFilter, EventStore, Position, ReadAllError, ReadAllOptions, RecordedEvent,
};
use serde_json::Value;

use crate::{DecodeError, DomainEvent, event::stored_parts};

/// Most steps one event may be upcast through (a longer chain is a loop).
pub const UPCAST_STEPS_MAX: usize = 100;

type UpcastFn = dyn Fn(Value) -> Result<Value, String> + Send + Sync;

#[derive(Clone)]
struct Step {
    to_type: String,
    to_version: u32,
    upcast: Arc<UpcastFn>,
}

/// Registered upcasters, by the `(event type, schema version)` they read.
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), Step>,
}

impl std::fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<_> = self.steps.keys().collect();
        keys.sort();
        f.debug_struct("Upcasters").field("from", &keys).finish()
    }
}

impl Upcasters {
    /// No upcasters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Upcasts `event_type` stored at `version` to `version + 1` with `upcast` (which gets the
    /// stored data and returns the next version's, or why it cannot). Replaces an upcaster
    /// registered for the same type and version.
    #[must_use]
    pub fn add(
        self,
        event_type: &str,
        version: u32,
        upcast: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.add_renaming(
            event_type,
            version,
            event_type,
            version.saturating_add(1),
            upcast,
        )
    }

    /// Upcasts `event_type` at `version` to `new_type` at `new_version` (a renamed event).
    #[must_use]
    pub fn add_renaming(
        mut self,
        event_type: &str,
        version: u32,
        new_type: &str,
        new_version: u32,
        upcast: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.steps.insert(
            (event_type.to_owned(), version),
            Step {
                to_type: new_type.to_owned(),
                to_version: new_version,
                upcast: Arc::new(upcast),
            },
        );
        self
    }

    /// True when some upcaster reads events of `event_type` (at any version).
    pub fn reads_type(&self, event_type: &str) -> bool {
        self.steps.keys().any(|(t, _)| t == event_type)
    }

    /// The event type, version and data after every matching step.
    pub fn upcast(
        &self,
        event_type: &str,
        version: u32,
        data: Value,
    ) -> Result<(String, u32, Value), DecodeError> {
        let (mut event_type, mut version, mut data) = (event_type.to_owned(), version, data);
        for _ in 0..UPCAST_STEPS_MAX {
            let Some(step) = self.steps.get(&(event_type.clone(), version)) else {
                return Ok((event_type, version, data));
            };
            data = (step.upcast)(data).map_err(|reason| DecodeError::Upcast {
                event_type: event_type.clone(),
                schema_version: version,
                reason,
            })?;
            event_type.clone_from(&step.to_type);
            version = step.to_version;
        }
        Err(DecodeError::Upcast {
            event_type,
            schema_version: version,
            reason: format!("more than {UPCAST_STEPS_MAX} steps: the upcasters loop"),
        })
    }

    /// The type, version and data of a stored event after every matching step. The type is
    /// borrowed from the event when no step reads it (always so without upcasters): no copy
    /// of the type name per event, which a rebuild of a million events pays for.
    fn upcast_recorded<'a>(
        &self,
        recorded: &'a RecordedEvent,
    ) -> Result<(Cow<'a, str>, u32, Value), DecodeError> {
        let (version, data) = stored_parts(recorded)?;
        if !self.reads_type(&recorded.event_type) {
            return Ok((Cow::Borrowed(recorded.event_type.as_str()), version, data));
        }
        let (event_type, version, data) = self.upcast(&recorded.event_type, version, data)?;
        Ok((Cow::Owned(event_type), version, data))
    }

    /// Decodes a stored event as `E`, after upcasting it.
    pub fn decode<E: DomainEvent>(&self, recorded: &RecordedEvent) -> Result<E, DecodeError> {
        let (event_type, version, data) = self.upcast_recorded(recorded)?;
        E::decode(&event_type, version, data)
    }

    /// True when `recorded` is, once upcast, of a type `E` decodes (so a projection of `E`
    /// must read it); false for other types, without parsing their data.
    pub(crate) fn is_for<E: DomainEvent>(&self, recorded: &RecordedEvent) -> bool {
        let stored = recorded.event_type.as_str();
        E::event_types().contains(&stored) || self.reads_type(stored)
    }
}

/// What is wrong with one stored event under the current schema.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SchemaProblemKind {
    /// It does not decode (a field's type changed, a required field is missing, …).
    Undecodable(DecodeError),
    /// It decodes, but these top-level fields of its (upcast) data are not in the event
    /// written back: the new schema would silently drop them.
    FieldsDropped(Vec<String>),
}

/// One stored event the current schema breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchemaProblem {
    /// Where it is in `$all`.
    pub position: Position,
    /// Its stream.
    pub stream: String,
    /// Its stored event type.
    pub event_type: String,
    /// What is wrong.
    pub kind: SchemaProblemKind,
}

/// The outcome of [`check_stored_events`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchemaReport {
    /// Stored events of the checked types.
    pub checked: u64,
    /// The first problems found (at most `problems_max`).
    pub problems: Vec<SchemaProblem>,
    /// All problems found, including those not kept.
    pub problem_count: u64,
}

impl SchemaReport {
    /// True when every checked event reads, with nothing dropped.
    pub fn is_compatible(&self) -> bool {
        self.problem_count == 0
    }
}

/// Reads every stored event of `filter` whose type `E` decodes (after `upcasters`) and checks
/// that the current schema reads it: it must decode, and writing it back must keep every
/// top-level field of its data (a field the new schema removed, without an upcaster that
/// drops it on purpose, would be lost). Run it before deploying a changed event type (e.g. in
/// a test over a copy of production's log): a report that is not
/// [compatible](SchemaReport::is_compatible) means the change breaks stored events unless an
/// upcaster covers it. Keeps the first `problems_max` problems.
pub async fn check_stored_events<E: DomainEvent>(
    store: &dyn EventStore,
    filter: EventFilter,
    upcasters: &Upcasters,
    problems_max: usize,
) -> Result<SchemaReport, ReadAllError> {
    let page = store.limits().read_count_max.clamp(1, 1_000);
    let mut report = SchemaReport::default();
    let mut from = Position(0);
    loop {
        let slice = store
            .read_all(
                ReadAllOptions::forwards()
                    .from(from)
                    .limit(page)
                    .filter(filter.clone()),
            )
            .await?;
        for recorded in &slice.events {
            if !upcasters.is_for::<E>(recorded) {
                continue;
            }
            report.checked += 1;
            if let Some(kind) = check_one::<E>(recorded, upcasters) {
                report.problem_count += 1;
                if report.problems.len() < problems_max {
                    report.problems.push(SchemaProblem {
                        position: recorded.position,
                        stream: recorded.stream.to_string(),
                        event_type: recorded.event_type.to_string(),
                        kind,
                    });
                }
            }
        }
        if slice.is_end {
            return Ok(report);
        }
        from = slice.next_position;
    }
}

fn check_one<E: DomainEvent>(
    recorded: &RecordedEvent,
    upcasters: &Upcasters,
) -> Option<SchemaProblemKind> {
    let (event_type, version, data) = match upcasters.upcast_recorded(recorded) {
        Ok(parts) => parts,
        Err(error) => return Some(SchemaProblemKind::Undecodable(error)),
    };
    let event = match E::decode(&event_type, version, data.clone()) {
        Ok(event) => event,
        Err(error) => return Some(SchemaProblemKind::Undecodable(error)),
    };
    let written = event.encode().ok()?;
    let (Value::Object(stored), Value::Object(written)) = (&data, &written) else {
        return None;
    };
    let mut dropped: Vec<String> = stored
        .keys()
        .filter(|key| !written.contains_key(*key))
        .cloned()
        .collect();
    dropped.sort();
    (!dropped.is_empty()).then_some(SchemaProblemKind::FieldsDropped(dropped))
}
