//! Projections over the in-memory store: resuming after the checkpoint, live following, a
//! failing event, checkpoint cadence, filters, and events that do not decode.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use factline_core::{
    CheckpointError, CheckpointStore, EventData, EventFilter, EventStore, ExpectedVersion,
    InMemoryCheckpointStore, InMemoryStore, Position, RecordedEvent, StreamId, async_trait,
};
use factline_domain::{DomainEvent, Projection, ProjectionError, ProjectionRunner, RunnerOptions};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
enum OrderEvent {
    OrderPlaced { total: u64 },
    OrderShipped,
}

#[derive(Debug, thiserror::Error)]
#[error("totals of 13 are unlucky")]
struct Unlucky;

/// Sums order totals per stream; refuses a total of 13 unless told to take it.
#[derive(Debug)]
struct Totals {
    name: String,
    seen: Arc<Mutex<Vec<(String, u64)>>>,
    refuse_13: bool,
    filter: EventFilter,
    flushes: Arc<Mutex<Vec<Position>>>,
}

impl Totals {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            seen: Arc::default(),
            refuse_13: false,
            filter: EventFilter::all(),
            flushes: Arc::default(),
        }
    }

    fn seen(&self) -> Vec<(String, u64)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Projection for Totals {
    type Event = OrderEvent;
    type Error = Unlucky;

    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> EventFilter {
        self.filter.clone()
    }

    async fn apply(&mut self, event: OrderEvent, recorded: &RecordedEvent) -> Result<(), Unlucky> {
        if let OrderEvent::OrderPlaced { total } = event {
            if total == 13 && self.refuse_13 {
                return Err(Unlucky);
            }
            self.seen
                .lock()
                .unwrap()
                .push((recorded.stream.to_string(), total));
        }
        Ok(())
    }

    async fn flush(&mut self, position: Position) -> Result<(), Unlucky> {
        self.flushes.lock().unwrap().push(position);
        Ok(())
    }
}

fn placed(total: u64) -> EventData {
    OrderEvent::OrderPlaced { total }
        .to_event_data(Default::default())
        .unwrap()
}

async fn append(store: &InMemoryStore, stream: &str, events: Vec<EventData>) {
    store
        .append(
            &StreamId::new(stream).unwrap(),
            ExpectedVersion::Any,
            events,
        )
        .await
        .unwrap();
}

fn runner(
    projection: Totals,
    store: &Arc<InMemoryStore>,
    checkpoints: &Arc<dyn CheckpointStore>,
) -> ProjectionRunner<Totals> {
    ProjectionRunner::new(
        projection,
        Arc::clone(store) as Arc<dyn EventStore>,
        Arc::clone(checkpoints),
    )
}

#[tokio::test]
async fn a_projection_resumes_after_its_checkpoint_and_passes_over_other_types() {
    let store = Arc::new(InMemoryStore::new());
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
    append(&store, "order-1", vec![placed(5), placed(7)]).await;
    append(
        &store,
        "invoice-1",
        vec![EventData::json("InvoiceIssued", &serde_json::json!({})).unwrap()],
    )
    .await;
    append(&store, "order-2", vec![placed(11)]).await;

    let done = runner(Totals::new("totals"), &store, &checkpoints)
        .catch_up()
        .await
        .unwrap();
    assert_eq!(
        done.projection.seen(),
        [
            ("order-1".to_owned(), 5),
            ("order-1".to_owned(), 7),
            ("order-2".to_owned(), 11)
        ]
    );
    assert_eq!(done.position, Some(Position(3)));
    assert_eq!(
        checkpoints.load_checkpoint("totals").await.unwrap(),
        Some(Position(3))
    );

    // A fresh instance of the same name starts after the checkpoint: only the new events.
    append(&store, "order-3", vec![placed(1), placed(2)]).await;
    let resumed = runner(Totals::new("totals"), &store, &checkpoints)
        .catch_up()
        .await
        .unwrap();
    assert_eq!(
        resumed.projection.seen(),
        [("order-3".to_owned(), 1), ("order-3".to_owned(), 2)]
    );
    assert_eq!(resumed.position, Some(Position(5)));

    // Caught up already: nothing applied, nothing waited for.
    let again = runner(Totals::new("totals"), &store, &checkpoints)
        .catch_up()
        .await
        .unwrap();
    assert!(again.projection.seen().is_empty());
    // A new name is a rebuild from position 0, beside the old one's checkpoint.
    let rebuilt = runner(Totals::new("totals-v2"), &store, &checkpoints)
        .catch_up()
        .await
        .unwrap();
    assert_eq!(rebuilt.projection.seen().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_until_follows_live_events_and_saves_when_stopped() {
    let store = Arc::new(InMemoryStore::new());
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
    append(&store, "order-1", vec![placed(1)]).await;
    let projection = Totals::new("live");
    let seen = Arc::clone(&projection.seen);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(runner(projection, &store, &checkpoints).run_until(async {
        let _ = stopped.await;
    }));
    append(&store, "order-2", vec![placed(2), placed(3)]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "live events applied"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.send(()).unwrap();
    let stopped = running.await.unwrap().unwrap();
    assert_eq!(stopped.position, Some(Position(2)));
    assert_eq!(
        checkpoints.load_checkpoint("live").await.unwrap(),
        Some(Position(2))
    );
}

#[tokio::test]
async fn a_refused_event_stops_the_projection_and_is_applied_again_after_a_fix() {
    let store = Arc::new(InMemoryStore::new());
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
    append(&store, "order-1", vec![placed(1), placed(13), placed(2)]).await;
    let mut strict = Totals::new("strict");
    strict.refuse_13 = true;
    let failed = runner(strict, &store, &checkpoints).catch_up().await;
    assert!(
        matches!(
            failed,
            Err(ProjectionError::Apply { position: Position(1), ref projection, .. })
                if projection == "strict"
        ),
        "{failed:?}"
    );
    assert_eq!(
        checkpoints.load_checkpoint("strict").await.unwrap(),
        Some(Position(0)),
        "the checkpoint is the event before the refused one"
    );
    let fixed = runner(Totals::new("strict"), &store, &checkpoints)
        .catch_up()
        .await
        .unwrap();
    assert_eq!(
        fixed.projection.seen(),
        [("order-1".to_owned(), 13), ("order-1".to_owned(), 2)]
    );
}

/// Counts saves.
#[derive(Debug, Default)]
struct CountingCheckpoints {
    inner: InMemoryCheckpointStore,
    saves: AtomicU64,
}

#[async_trait]
impl CheckpointStore for CountingCheckpoints {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, CheckpointError> {
        self.inner.load_checkpoint(name).await
    }
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), CheckpointError> {
        self.saves.fetch_add(1, Ordering::Relaxed);
        self.inner.save_checkpoint(name, position).await
    }
    async fn delete_checkpoint(&self, name: &str) -> Result<(), CheckpointError> {
        self.inner.delete_checkpoint(name).await
    }
    async fn list_checkpoints(
        &self,
        count_max: usize,
    ) -> Result<Vec<(String, Position)>, CheckpointError> {
        self.inner.list_checkpoints(count_max).await
    }
}

#[tokio::test]
async fn checkpoints_are_saved_every_n_events_and_at_the_end() {
    let store = Arc::new(InMemoryStore::new());
    let counting = Arc::new(CountingCheckpoints::default());
    let checkpoints: Arc<dyn CheckpointStore> = Arc::clone(&counting) as Arc<dyn CheckpointStore>;
    append(&store, "order-1", (0..5).map(placed).collect()).await;
    let done = runner(Totals::new("cadence"), &store, &checkpoints)
        .options(RunnerOptions::default().checkpoint_every_events(2))
        .catch_up()
        .await
        .unwrap();
    // After the 2nd and 4th events, and the 5th at the end; the projection flushed first each
    // time, up to the position then saved.
    assert_eq!(counting.saves.load(Ordering::Relaxed), 3);
    assert_eq!(
        *done.projection.flushes.lock().unwrap(),
        [Position(1), Position(3), Position(4)]
    );
}

#[tokio::test]
async fn a_filtered_catch_up_ends_on_the_last_matching_event() {
    let store = Arc::new(InMemoryStore::new());
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
    append(&store, "order-1", vec![placed(4)]).await;
    // The log ends with events the filter does not let through.
    append(&store, "other-1", vec![placed(100), placed(200)]).await;
    let mut orders_only = Totals::new("orders-only");
    orders_only.filter = EventFilter::all().category("order");
    let done = tokio::time::timeout(
        Duration::from_secs(10),
        runner(orders_only, &store, &checkpoints).catch_up(),
    )
    .await
    .expect("the catch-up ends")
    .unwrap();
    assert_eq!(done.projection.seen(), [("order-1".to_owned(), 4)]);
    assert_eq!(done.position, Some(Position(0)));
}

#[tokio::test]
async fn an_event_of_a_known_type_that_does_not_decode_stops_with_its_position() {
    let store = Arc::new(InMemoryStore::new());
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
    append(&store, "order-1", vec![placed(1)]).await;
    append(
        &store,
        "order-1",
        vec![EventData::json("OrderPlaced", &serde_json::json!({"total": "twelve"})).unwrap()],
    )
    .await;
    let failed = runner(Totals::new("decode"), &store, &checkpoints)
        .catch_up()
        .await;
    assert!(
        matches!(
            failed,
            Err(ProjectionError::Decode {
                position: Position(1),
                ..
            })
        ),
        "{failed:?}"
    );
    assert_eq!(
        checkpoints.load_checkpoint("decode").await.unwrap(),
        Some(Position(0))
    );
}

#[tokio::test]
async fn replay_to_gives_the_read_model_as_of_a_position_without_touching_checkpoints() {
    let store = Arc::new(InMemoryStore::new());
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
    append(&store, "order-1", vec![placed(1), placed(2)]).await;
    append(&store, "order-2", vec![placed(3)]).await;
    checkpoints
        .save_checkpoint("totals", Position(2))
        .await
        .unwrap();
    let events: Arc<dyn EventStore> = Arc::clone(&store) as Arc<dyn EventStore>;

    let at_one =
        ProjectionRunner::replay_to(Totals::new("totals"), Arc::clone(&events), Position(1))
            .await
            .unwrap();
    assert_eq!(
        at_one.seen(),
        [("order-1".to_owned(), 1), ("order-1".to_owned(), 2)]
    );
    let everything =
        ProjectionRunner::replay_to(Totals::new("totals"), Arc::clone(&events), Position(99))
            .await
            .unwrap();
    assert_eq!(everything.seen().len(), 3);
    // With a filter, up to the last match at or before the position.
    let mut second_only = Totals::new("second");
    second_only.filter = EventFilter::all().stream_prefix("order-2");
    let before_it = ProjectionRunner::replay_to(second_only, Arc::clone(&events), Position(1))
        .await
        .unwrap();
    assert!(before_it.seen().is_empty());
    assert_eq!(
        checkpoints.load_checkpoint("totals").await.unwrap(),
        Some(Position(2)),
        "no stored checkpoint was touched"
    );
}

#[tokio::test]
async fn a_rebuild_reports_its_progress_towards_the_head() {
    let store = Arc::new(InMemoryStore::new());
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
    append(&store, "order-1", (0..1_500).map(placed).collect()).await;
    append(&store, "order-2", (0..1_000).map(placed).collect()).await;
    let reports = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&reports);
    runner(Totals::new("progress"), &store, &checkpoints)
        .on_progress(move |progress| seen.lock().unwrap().push(progress))
        .catch_up()
        .await
        .unwrap();
    let reports = reports.lock().unwrap();
    let summary: Vec<_> = reports
        .iter()
        .map(|p| (p.events, p.position, p.target))
        .collect();
    let end = Some(Position(2_499));
    assert_eq!(
        summary,
        [
            (1_000, Position(999), end),
            (2_000, Position(1_999), end),
            (2_500, Position(2_499), end),
        ]
    );
}
