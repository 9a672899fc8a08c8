//! Aggregates as deciders: [`Aggregate`], its stream naming and [`SnapshotState`].

use factline_core::{StreamId, StreamIdError};
use serde::{Serialize, de::DeserializeOwned};

use crate::DomainEvent;

/// A consistency boundary written as a decider.
///
/// The state is rebuilt by folding its events with [`evolve`](Aggregate::evolve), starting from
/// [`Default`]. A command is handled by [`decide`](Aggregate::decide), which is pure: it only
/// looks at the state and the command, and returns the events that record what happened, or
/// an error and no events. The [`Repository`](crate::Repository) does the I/O around it.
///
/// The events of aggregate `id` live in the stream `"{CATEGORY}-{id}"` (see [`stream_id_for`]).
pub trait Aggregate: Default + Send + Sync + 'static {
    /// What callers ask the aggregate to do.
    type Command: Send + Sync;
    /// What the aggregate records.
    type Event: DomainEvent;
    /// Why a command is refused.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The stream category: non-empty and without `-`, e.g. `order`.
    const CATEGORY: &'static str;

    /// Decides what happens when `command` meets the current state: the events to record (none
    /// when there is nothing to do), or why the command is refused. Must not have side effects.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Applies one recorded event to the state. Must not fail: the event already happened.
    fn evolve(&mut self, event: &Self::Event);
}

/// An aggregate whose state can be stored as a snapshot (serialized as JSON).
pub trait SnapshotState: Aggregate + Serialize + DeserializeOwned {
    /// The version of the state's serialized shape. Change it whenever that shape changes: a
    /// stored snapshot of another version is ignored and the state rebuilt from the events.
    const SNAPSHOT_VERSION: u32;
}

/// Why an aggregate id does not make a valid stream id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AggregateIdError {
    /// The aggregate id is empty.
    #[error("aggregate id is empty")]
    Empty,
    /// The aggregate's `CATEGORY` is empty or contains `-`.
    #[error("aggregate category {category:?} is invalid: it must be non-empty and contain no '-'")]
    InvalidCategory {
        /// The category.
        category: &'static str,
    },
    /// `"{category}-{id}"` is not a valid stream id.
    #[error("aggregate id {id:?} does not make a valid stream id: {source}")]
    InvalidStreamId {
        /// The aggregate id.
        id: String,
        /// Why the stream id was refused.
        #[source]
        source: StreamIdError,
    },
}

/// The stream of aggregate `id` of type `A`: `"{A::CATEGORY}-{id}"`.
pub fn stream_id_for<A: Aggregate>(id: &str) -> Result<StreamId, AggregateIdError> {
    let category = A::CATEGORY;
    if category.is_empty() || category.contains('-') {
        return Err(AggregateIdError::InvalidCategory { category });
    }
    if id.is_empty() {
        return Err(AggregateIdError::Empty);
    }
    StreamId::new(format!("{category}-{id}")).map_err(|source| AggregateIdError::InvalidStreamId {
        id: id.to_owned(),
        source,
    })
}
