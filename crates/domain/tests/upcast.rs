//! Schema evolution: a log written with an older schema read through upcasters by a repository
//! and a projection, and the stored-events check that refuses a breaking change unless an
//! upcaster covers it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::sync::Arc;

use factline_core::{
    CheckpointStore, EventData, EventFilter, EventStore, ExpectedVersion, InMemoryCheckpointStore,
    InMemoryStore, Metadata, RecordedEvent, StreamId,
};
use factline_domain::{
    Aggregate, DecodeError, DomainEvent, LoadError, Projection, ProjectionRunner, Repository,
    SchemaProblemKind, Upcasters, check_stored_events,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The current schema. Version 1 of `OrderPlaced` was `{"total": <euros>}`; `OrderWithdrawn`
/// was called `OrderCanceled` with `{"why": …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
enum OrderEvent {
    #[event(version = 2)]
    OrderPlaced {
        total_cents: u64,
        currency: String,
    },
    OrderWithdrawn {
        reason: String,
    },
}

#[derive(Debug, Default)]
struct Order {
    total_cents: u64,
    withdrawn: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Order {
    type Command = ();
    type Event = OrderEvent;
    type Error = Never;
    const CATEGORY: &'static str = "order";

    fn decide(&self, (): &()) -> Result<Vec<OrderEvent>, Never> {
        Ok(Vec::new())
    }

    fn evolve(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderPlaced { total_cents, .. } => self.total_cents = *total_cents,
            OrderEvent::OrderWithdrawn { reason } => self.withdrawn = Some(reason.clone()),
        }
    }
}

fn stored(event_type: &str, version: Option<u32>, data: Value) -> EventData {
    let mut metadata = Metadata::new();
    if let Some(version) = version {
        metadata.insert(Metadata::SCHEMA_VERSION, version.to_string());
    }
    EventData::json(event_type, &data)
        .unwrap()
        .with_all_metadata(metadata)
}

/// What the old code wrote (no schema_version metadata: version 1), then the new code.
async fn old_log() -> Arc<InMemoryStore> {
    let store = Arc::new(InMemoryStore::new());
    store
        .append(
            &StreamId::new("order-1").unwrap(),
            ExpectedVersion::NoStream,
            vec![
                stored("OrderPlaced", None, json!({"total": 12})),
                stored("OrderCanceled", Some(1), json!({"why": "too slow"})),
            ],
        )
        .await
        .unwrap();
    let current = OrderEvent::OrderPlaced {
        total_cents: 500,
        currency: "USD".into(),
    };
    store
        .append(
            &StreamId::new("order-2").unwrap(),
            ExpectedVersion::NoStream,
            vec![current.to_event_data(Metadata::new()).unwrap()],
        )
        .await
        .unwrap();
    store
}

fn upcasters() -> Upcasters {
    Upcasters::new()
        .add("OrderPlaced", 1, |data| {
            let euros = data["total"].as_u64().ok_or("total is not a number")?;
            Ok(json!({"total_cents": euros * 100, "currency": "EUR"}))
        })
        .add_renaming("OrderCanceled", 1, "OrderWithdrawn", 1, |data| {
            Ok(json!({"reason": data["why"].clone()}))
        })
}

#[tokio::test]
async fn a_log_written_with_an_older_schema_loads_through_upcasters() {
    let store = old_log().await;
    let plain = Repository::<Order>::new(store.clone());
    let refused = plain.load("1").await;
    assert!(
        matches!(refused, Err(LoadError::Decode { .. })),
        "without upcasters the old shape does not decode: {refused:?}"
    );

    let orders = Repository::<Order>::new(store.clone()).with_upcasters(upcasters());
    let order = orders.load("1").await.unwrap().state;
    assert_eq!(order.total_cents, 1_200);
    assert_eq!(order.withdrawn.as_deref(), Some("too slow"));
    // Events in the current shape read as they are.
    assert_eq!(orders.load("2").await.unwrap().state.total_cents, 500);
}

struct Currencies {
    seen: Vec<(String, String)>,
}

impl Projection for Currencies {
    type Event = OrderEvent;
    type Error = Never;

    fn name(&self) -> &str {
        "currencies"
    }

    async fn apply(&mut self, event: OrderEvent, recorded: &RecordedEvent) -> Result<(), Never> {
        let what = match event {
            OrderEvent::OrderPlaced { currency, .. } => currency,
            OrderEvent::OrderWithdrawn { reason } => reason,
        };
        self.seen.push((recorded.stream.to_string(), what));
        Ok(())
    }
}

#[tokio::test]
async fn a_projection_reads_old_events_and_renamed_types_through_upcasters() {
    let store = old_log().await;
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::new());
    let done = ProjectionRunner::new(Currencies { seen: Vec::new() }, store, checkpoints)
        .upcasters(upcasters())
        .catch_up()
        .await
        .unwrap();
    assert_eq!(
        done.projection.seen,
        [
            ("order-1".to_owned(), "EUR".to_owned()),
            ("order-1".to_owned(), "too slow".to_owned()),
            ("order-2".to_owned(), "USD".to_owned()),
        ]
    );
}

#[tokio::test]
async fn the_stored_events_check_refuses_a_breaking_schema_unless_an_upcaster_covers_it() {
    let store = old_log().await;
    let orders = EventFilter::all().category("order");

    // The new schema without upcasters: the version-1 OrderPlaced no longer decodes (its
    // field changed). The old OrderCanceled is a type the new code does not know, so it is
    // not checked (nothing reads it).
    let broken = check_stored_events::<OrderEvent>(&*store, orders.clone(), &Upcasters::new(), 10)
        .await
        .unwrap();
    assert!(!broken.is_compatible());
    assert_eq!(broken.checked, 2);
    assert_eq!(broken.problem_count, 1);
    assert_eq!(broken.problems[0].event_type, "OrderPlaced");
    assert!(matches!(
        broken.problems[0].kind,
        SchemaProblemKind::Undecodable(DecodeError::MalformedData { .. })
    ));

    let covered = check_stored_events::<OrderEvent>(&*store, orders.clone(), &upcasters(), 10)
        .await
        .unwrap();
    assert!(covered.is_compatible(), "{covered:?}");
    assert_eq!(covered.checked, 3);

    // A field that stored events have and the schema removed is reported as dropped...
    store
        .append(
            &StreamId::new("order-3").unwrap(),
            ExpectedVersion::NoStream,
            vec![stored(
                "OrderPlaced",
                Some(2),
                json!({"total_cents": 5, "currency": "EUR", "gift_note": "for Ada"}),
            )],
        )
        .await
        .unwrap();
    let dropped = check_stored_events::<OrderEvent>(&*store, orders.clone(), &upcasters(), 10)
        .await
        .unwrap();
    assert_eq!(dropped.problem_count, 1);
    assert_eq!(
        dropped.problems[0].kind,
        SchemaProblemKind::FieldsDropped(vec!["gift_note".to_owned()])
    );
    // ... unless an upcaster drops it on purpose (here: version 2 → 3, which the code then
    // has to know: a check against a schema that does not know version 3 refuses it).
    let on_purpose = upcasters().add("OrderPlaced", 2, |mut data| {
        if let Some(object) = data.as_object_mut() {
            object.remove("gift_note");
        }
        Ok(data)
    });
    let too_new = check_stored_events::<OrderEvent>(&*store, orders, &on_purpose, 10)
        .await
        .unwrap();
    assert!(!too_new.is_compatible());
    assert!(
        too_new.problems.iter().all(|p| matches!(
            p.kind,
            SchemaProblemKind::Undecodable(DecodeError::UnsupportedSchemaVersion { found: 3, .. })
        )),
        "{too_new:?}"
    );
}

#[test]
fn upcasters_that_loop_are_an_error_not_a_hang() {
    let looping = Upcasters::new()
        .add_renaming("A", 1, "B", 1, Ok)
        .add_renaming("B", 1, "A", 1, Ok);
    let error = looping.upcast("A", 1, json!({})).unwrap_err();
    assert!(error.to_string().contains("loop"), "{error}");
    let refusing = Upcasters::new().add("A", 1, |_| Err("no".to_owned()));
    assert!(matches!(
        refusing.upcast("A", 1, json!({})),
        Err(DecodeError::Upcast {
            schema_version: 1,
            ..
        })
    ));
}
