//! Projections: read models fed by the events of `$all`, resumable from a durable checkpoint.
//!
//! A [`Projection`] names itself (its checkpoint key), says which part of `$all` it reads
//! ([`Projection::filter`]) and applies typed events one at a time, in log order. A
//! [`ProjectionRunner`] subscribes from the projection's checkpoint (after the last event it
//! processed, or from the start), decodes each event whose type the projection's
//! [`DomainEvent`] knows (others are passed over, and count as processed), applies it, and saves
//! the checkpoint every [`RunnerOptions::checkpoint_every_events`] events and when it stops.
//! Delivery is at least once: after a crash the events since the last saved checkpoint are
//! applied again, so a read model outside the checkpoint's transaction must apply
//! idempotently (one in the same SQL transaction as its checkpoint is exactly once).
//!
//! Rebuild while the old read model keeps serving: give a fresh instance a new name (e.g.
//! `orders-summary-v2`), [`ProjectionRunner::catch_up`] builds it from position 0 up to the
//! head as of the call, then switch readers to it and keep it current with
//! [`ProjectionRunner::run_until`]. Time travel: [`ProjectionRunner::replay_to`] feeds a
//! fresh instance up to a position, without touching any stored checkpoint. Lag — how many positions the log head is ahead of the
//! projection — is the gauge `factline_projection_lag_positions{projection}`, set at every
//! checkpoint.

use std::{future::Future, sync::Arc};

use factline_core::{
    CheckpointError, CheckpointStore, EventFilter, EventStore, Position, ReadAllError,
    ReadAllOptions, RecordedEvent, StorageError, SubscribeError, SubscribeFrom, Subscription,
    SubscriptionError,
};
use futures::FutureExt as _;

use crate::{DecodeError, DomainEvent, Upcasters};

/// A read model built from events.
pub trait Projection: Send + 'static {
    /// The events it reads; stored events of other types are passed over.
    type Event: DomainEvent;
    /// Why applying an event failed (the runner stops with it).
    type Error: std::error::Error + Send + Sync + 'static;

    /// The name, unique among the projections sharing a checkpoint store: the checkpoint key.
    fn name(&self) -> &str;

    /// The part of `$all` it reads (default: all of it). A narrower filter lets the store
    /// skip what the projection would pass over.
    fn filter(&self) -> EventFilter {
        EventFilter::all()
    }

    /// Applies one event, recorded as `recorded` (stream, revision, position, metadata…).
    fn apply(
        &mut self,
        event: Self::Event,
        recorded: &RecordedEvent,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Called before the runner saves a checkpoint at `position` (the last event processed):
    /// write out whatever `apply` batched, so that everything up to `position` is in the read
    /// model when the checkpoint says so. A read model in SQL writes its batch and saves the
    /// same checkpoint in one transaction here, which makes it exactly once. The default does
    /// nothing.
    fn flush(
        &mut self,
        position: Position,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = position;
        std::future::ready(Ok(()))
    }
}

/// How a [`ProjectionRunner`] checkpoints.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunnerOptions {
    /// Save the checkpoint after this many processed events (at least 1). Default 1,000.
    pub checkpoint_every_events: u64,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self {
            checkpoint_every_events: 1_000,
        }
    }
}

impl RunnerOptions {
    /// Sets [`RunnerOptions::checkpoint_every_events`] (0 counts as 1).
    #[must_use]
    pub fn checkpoint_every_events(mut self, events: u64) -> Self {
        self.checkpoint_every_events = events.max(1);
        self
    }
}

/// Why a projection stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError<E: std::error::Error + Send + Sync + 'static> {
    /// The projection refused an event. The checkpoint is the event before it, so a restart
    /// applies it again.
    #[error("projection {projection} failed on the event at position {position}: {source}")]
    Apply {
        /// The projection.
        projection: String,
        /// The event's position.
        position: Position,
        /// What the projection said.
        #[source]
        source: E,
    },
    /// The projection could not write out its batch before a checkpoint; the checkpoint was
    /// not saved, so a restart applies the batch again.
    #[error("projection {projection} could not flush up to position {position}: {source}")]
    Flush {
        /// The projection.
        projection: String,
        /// The position of the checkpoint it was to reach.
        position: Position,
        /// What the projection said.
        #[source]
        source: E,
    },
    /// An event of a type the projection reads could not be decoded (add an upcaster, or fix
    /// the event type); the checkpoint is the event before it.
    #[error("projection {projection}: the event at position {position} does not decode: {source}")]
    Decode {
        /// The projection.
        projection: String,
        /// The event's position.
        position: Position,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// Loading or saving the checkpoint failed.
    #[error("projection {projection}: checkpoint: {source}")]
    Checkpoint {
        /// The projection.
        projection: String,
        /// The cause.
        #[source]
        source: CheckpointError,
    },
    /// The store failed, or the subscription ended.
    #[error("projection {projection}: the event store: {source}")]
    Store {
        /// The projection.
        projection: String,
        /// The cause.
        #[source]
        source: StorageError,
    },
}

/// A projection that stopped as asked, with where it got to.
#[derive(Debug)]
#[non_exhaustive]
pub struct Stopped<P> {
    /// The projection, with its read model.
    pub projection: P,
    /// The position of the last event it processed (`None`: none yet, ever).
    pub position: Option<Position>,
}

/// Feeds a [`Projection`] from an [`EventStore`], checkpointing in a [`CheckpointStore`].
pub struct ProjectionRunner<P: Projection> {
    projection: P,
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    options: RunnerOptions,
    upcasters: Upcasters,
    progress: Option<ProgressFn>,
}

type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// How far a run has come, as reported to [`ProjectionRunner::on_progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// The position of the last event processed.
    pub position: Position,
    /// Where a catch-up (a rebuild) ends; `None` for a run that follows the log live.
    pub target: Option<Position>,
    /// Events processed in this run (passed-over ones included).
    pub events: u64,
}

/// Events between two progress reports.
const PROGRESS_EVERY_EVENTS: u64 = 1_000;

impl<P: Projection> std::fmt::Debug for ProjectionRunner<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("projection", &self.projection.name())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Progress of one run.
struct Cursor {
    /// Last event processed.
    position: Option<Position>,
    /// Last position saved.
    saved: Option<Position>,
    since_saved: u64,
}

impl<P: Projection> ProjectionRunner<P> {
    /// A runner of `projection` over `store`, with its checkpoint in `checkpoints`.
    pub fn new(
        projection: P,
        store: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
    ) -> Self {
        Self {
            projection,
            store,
            checkpoints,
            options: RunnerOptions::default(),
            upcasters: Upcasters::new(),
            progress: None,
        }
    }

    /// Calls `report` every 1,000 events and at the end of a run — e.g. to drive a progress
    /// bar through a rebuild (`target` says where a catch-up ends).
    #[must_use]
    pub fn on_progress(mut self, report: impl Fn(Progress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(report));
        self
    }

    /// Reads stored events through `upcasters` (older schema versions into the current one;
    /// renamed types are read too).
    #[must_use]
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// Sets how it checkpoints.
    #[must_use]
    pub fn options(mut self, options: RunnerOptions) -> Self {
        self.options = options;
        self
    }

    /// Runs until `stop` completes (then saves the checkpoint and returns the projection) or
    /// something fails.
    pub async fn run_until(
        self,
        stop: impl Future<Output = ()> + Send,
    ) -> Result<Stopped<P>, ProjectionError<P::Error>> {
        self.run(None, stop).await
    }

    /// Runs from the checkpoint until the projection has processed everything committed when
    /// this is called (the head position then), saves the checkpoint and returns — a rebuild
    /// of a fresh instance, or a catch-up before serving.
    pub async fn catch_up(self) -> Result<Stopped<P>, ProjectionError<P::Error>> {
        match self.last_matching(None).await? {
            Some(last) => self.run(Some(last), std::future::pending()).await,
            None => {
                let position = self.load_checkpoint().await?;
                Ok(Stopped {
                    projection: self.projection,
                    position,
                })
            }
        }
    }

    /// The position of the newest committed event the projection's filter lets through, at or
    /// before `at_most` when given (the subscription delivers no other, so a catch-up ends on
    /// it).
    async fn last_matching(
        &self,
        at_most: Option<Position>,
    ) -> Result<Option<Position>, ProjectionError<P::Error>> {
        let mut options = ReadAllOptions::backwards()
            .limit(1)
            .filter(self.projection.filter());
        if let Some(position) = at_most {
            options = options.from(position);
        }
        loop {
            let page = self
                .store
                .read_all(options.clone())
                .await
                .map_err(|error| match error {
                    ReadAllError::Storage(source) => self.store_error(source),
                    other => self.store_error(StorageError::backend(other)),
                })?;
            if let Some(event) = page.events.first() {
                return Ok(Some(event.position));
            }
            if page.is_end {
                return Ok(None);
            }
            // A filtered page may come back empty before the end (bounded work per read).
            options = options.from(page.next_position);
        }
    }

    /// Time travel: `projection` (a fresh instance) fed every event of its filter up to and
    /// including `position`, from the start, with a checkpoint kept in memory only (no stored
    /// checkpoint is read or written) — the read model as it was at `position`.
    pub async fn replay_to(
        projection: P,
        store: Arc<dyn EventStore>,
        position: Position,
    ) -> Result<P, ProjectionError<P::Error>> {
        let runner = Self::new(
            projection,
            store,
            Arc::new(factline_core::InMemoryCheckpointStore::new()),
        );
        match runner.last_matching(Some(position)).await? {
            Some(last) => Ok(runner
                .run(Some(last), std::future::pending())
                .await?
                .projection),
            None => Ok(runner.projection),
        }
    }

    fn store_error(&self, source: StorageError) -> ProjectionError<P::Error> {
        ProjectionError::Store {
            projection: self.projection.name().to_owned(),
            source,
        }
    }

    fn checkpoint_error(&self, source: CheckpointError) -> ProjectionError<P::Error> {
        ProjectionError::Checkpoint {
            projection: self.projection.name().to_owned(),
            source,
        }
    }

    async fn load_checkpoint(&self) -> Result<Option<Position>, ProjectionError<P::Error>> {
        self.checkpoints
            .load_checkpoint(self.projection.name())
            .await
            .map_err(|source| self.checkpoint_error(source))
    }

    async fn subscribe(
        &self,
        from: Option<Position>,
    ) -> Result<Subscription, ProjectionError<P::Error>> {
        let from = from.map_or(SubscribeFrom::Start, SubscribeFrom::After);
        self.store
            .subscribe_to_all(from, self.projection.filter())
            .await
            .map_err(|error| match error {
                SubscribeError::Storage(source) => self.store_error(source),
                other => self.store_error(StorageError::backend(other)),
            })
    }

    /// Flushes the projection and saves the cursor's position if it moved, and updates the
    /// lag gauge.
    async fn save(&mut self, cursor: &mut Cursor) -> Result<(), ProjectionError<P::Error>> {
        let Some(position) = cursor.position else {
            return Ok(());
        };
        if cursor.saved != Some(position) {
            self.projection
                .flush(position)
                .await
                .map_err(|source| ProjectionError::Flush {
                    projection: self.projection.name().to_owned(),
                    position,
                    source,
                })?;
            self.checkpoints
                .save_checkpoint(self.projection.name(), position)
                .await
                .map_err(|source| self.checkpoint_error(source))?;
            cursor.saved = Some(position);
        }
        cursor.since_saved = 0;
        if let Ok(Some(head)) = self.store.head_position().await {
            metrics::gauge!(
                "factline_projection_lag_positions",
                "projection" => self.projection.name().to_owned()
            )
            .set(head.value().saturating_sub(position.value()) as f64);
        }
        Ok(())
    }

    async fn run(
        mut self,
        until: Option<Position>,
        stop: impl Future<Output = ()> + Send,
    ) -> Result<Stopped<P>, ProjectionError<P::Error>> {
        let start = self.load_checkpoint().await?;
        let mut cursor = Cursor {
            position: start,
            saved: start,
            since_saved: 0,
        };
        let mut processed = 0u64;
        let reached = |cursor: &Cursor| {
            until.is_some_and(|until| cursor.position.is_some_and(|p| p >= until))
        };
        if !reached(&cursor) {
            let mut subscription = self.subscribe(start).await?;
            let mut stop = std::pin::pin!(stop.fuse());
            tracing::info!(projection = self.projection.name(), from = ?start, "projection started");
            loop {
                let next = futures::select_biased! {
                    () = stop => break,
                    next = subscription.next().fuse() => next,
                };
                let event = match next {
                    Some(Ok(event)) => event,
                    Some(Err(SubscriptionError::Storage(source))) => {
                        self.save(&mut cursor).await?;
                        return Err(self.store_error(source));
                    }
                    Some(Err(other)) => {
                        self.save(&mut cursor).await?;
                        return Err(self.store_error(StorageError::backend(other)));
                    }
                    None => {
                        self.save(&mut cursor).await?;
                        return Err(self.store_error(StorageError::Closed));
                    }
                };
                if let Err(error) = self.process(&event).await {
                    self.save(&mut cursor).await?;
                    return Err(error);
                }
                cursor.position = Some(event.position);
                cursor.since_saved += 1;
                processed += 1;
                if processed.is_multiple_of(PROGRESS_EVERY_EVENTS) {
                    self.report(event.position, until, processed);
                }
                if reached(&cursor) {
                    break;
                }
                if cursor.since_saved >= self.options.checkpoint_every_events {
                    self.save(&mut cursor).await?;
                }
            }
        }
        self.save(&mut cursor).await?;
        if let Some(position) = cursor.position {
            self.report(position, until, processed);
        }
        tracing::info!(projection = self.projection.name(), position = ?cursor.position, "projection stopped");
        Ok(Stopped {
            projection: self.projection,
            position: cursor.position,
        })
    }

    fn report(&self, position: Position, target: Option<Position>, events: u64) {
        if let Some(report) = &self.progress {
            report(Progress {
                position,
                target,
                events,
            });
        }
    }

    /// Decodes and applies one event (or passes it over).
    async fn process(&mut self, event: &RecordedEvent) -> Result<(), ProjectionError<P::Error>> {
        if !self.upcasters.is_for::<P::Event>(event) {
            return Ok(());
        }
        let typed = match self.upcasters.decode::<P::Event>(event) {
            Ok(typed) => typed,
            // A type only an upcaster reads, upcast into a type this projection does not
            // decode: not for it.
            Err(DecodeError::UnknownEventType { .. })
                if !P::Event::event_types().contains(&event.event_type.as_str()) =>
            {
                return Ok(());
            }
            Err(source) => {
                return Err(ProjectionError::Decode {
                    projection: self.projection.name().to_owned(),
                    position: event.position,
                    source,
                });
            }
        };
        self.projection
            .apply(typed, event)
            .await
            .map_err(|source| ProjectionError::Apply {
                projection: self.projection.name().to_owned(),
                position: event.position,
                source,
            })
    }
}
