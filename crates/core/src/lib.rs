//! factline core: the event model, limits, typed errors and the [`EventStore`] contract.
//!
//! - [`StreamId`], [`Revision`], [`Position`], [`ExpectedVersion`], [`EventData`],
//!   [`RecordedEvent`], [`Metadata`]: the vocabulary of `shared/DESIGN.md`.
//! - [`EventStore`] and [`SnapshotStore`]: the traits every backend implements.
//! - [`InMemoryStore`]: the reference backend.
//! - [`CheckpointStore`] (and [`InMemoryCheckpointStore`]): where projections and subscribers
//!   resume.
//! - [`persistent`]: persistent subscriptions — competing consumers with ack, nack, retry,
//!   parking in a dead-letter stream and replay, hosted over any [`EventStore`].
//! - [`rules`]: the append rules as pure functions, shared by backends.
//! - [`testkit`] (feature `testkit`): the conformance suite and the reference model.
//!
//! ```
//! use factline_core::{EventData, EventStore, ExpectedVersion, InMemoryStore, ReadStreamOptions, StreamId};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store = InMemoryStore::new();
//! let stream = StreamId::new("order-42")?;
//! let placed = EventData::json("OrderPlaced", &serde_json::json!({"total_cents": 1250}))?;
//! let written = store.append(&stream, ExpectedVersion::NoStream, vec![placed]).await?;
//! assert_eq!(written.next_expected_version.value(), 0);
//!
//! let slice = store.read_stream(&stream, ReadStreamOptions::forwards()).await?;
//! assert_eq!(slice.events[0].event_type, "OrderPlaced");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod checkpoint;
mod error;
mod event;
mod ids;
mod limits;
mod memory;
pub mod persistent;
pub mod rules;
mod store;
mod subscription;
#[cfg(feature = "testkit")]
pub mod testkit;
mod version;

pub use checkpoint::{
    CHECKPOINT_NAME_BYTES_MAX, CheckpointError, CheckpointStore, InMemoryCheckpointStore,
    check_checkpoint_name,
};
pub use error::{
    AppendError, DeleteError, MetadataError, ReadAllError, ReadStreamError, SnapshotError,
    StorageError, SubscribeError, SubscriptionError,
};
pub use event::{ContentType, EventData, EventType, Metadata, RecordedEvent};
pub use ids::{EVENT_TYPE_BYTES_MAX, STREAM_ID_BYTES_MAX, StreamId, StreamIdError, category_of};
pub use limits::{EventsRejected, InvalidEvent, Limit, LimitExceeded, Limits};
pub use memory::InMemoryStore;
pub use rules::{
    AppendDecision, MultiDecision, StreamView, check_append_requests, decide_append,
    decide_append_multi, decide_delete, expected_version_holds, stream_state,
};
pub use store::{
    AllSlice, AppendRequest, AppendResult, DeleteMode, Direction, EventFilter, EventStore,
    ParseSubscribeFromError, ReadAllOptions, ReadStreamOptions, Snapshot, SnapshotStore,
    StreamMetadata, StreamPage, StreamSlice, SubscribeFrom,
};
pub use subscription::{
    ChangeListener, ChangeNotifier, SUBSCRIPTION_PAGE_EVENTS, Subscription, follow_all,
    follow_stream,
};
pub use version::{
    ExpectedVersion, ParseExpectedVersionError, Position, Revision, StreamState, Timestamp,
};

/// Re-exported so that backends and users name the same versions.
pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use uuid::Uuid;
