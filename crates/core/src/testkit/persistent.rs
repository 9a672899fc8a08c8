//! Conformance cases for persistent subscriptions hosted over a backend: the groups keep their
//! registry, checkpoints and parked records in the store under test, so every backend runs
//! these too (they are part of [`crate::event_store_conformance!`]).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use uuid::Uuid;

use super::{EVENT_TIMEOUT, TestStore, event, stream, stream_events};
use crate::{
    EventFilter, EventStore, ExpectedVersion, RecordedEvent, Revision,
    persistent::{
        ConnectOptions, ConsumerStrategy, Delivery, EVENT_PARKED, GroupError, GroupSettings,
        GroupStart, NackAction, ParkedEvent, PersistentConsumer, PersistentSubscriptions,
    },
};

fn shared<S: TestStore>(store: S) -> Arc<dyn EventStore> {
    Arc::new(store)
}

async fn open(store: &Arc<dyn EventStore>) -> PersistentSubscriptions {
    PersistentSubscriptions::open(Arc::clone(store))
        .await
        .expect("open persistent subscriptions")
}

async fn connect(subscriptions: &PersistentSubscriptions, group: &str) -> PersistentConsumer {
    subscriptions
        .connect(group, ConnectOptions::named("test"))
        .await
        .expect("connect")
}

/// The next delivery; panics when none comes within [`EVENT_TIMEOUT`] or the group stopped.
async fn next(consumer: &mut PersistentConsumer) -> Delivery {
    match tokio::time::timeout(EVENT_TIMEOUT, consumer.next()).await {
        Ok(Some(delivery)) => delivery,
        Ok(None) => panic!("the group stopped"),
        Err(_) => panic!("no delivery within {EVENT_TIMEOUT:?}"),
    }
}

async fn assert_nothing(consumer: &mut PersistentConsumer, quiet: Duration) {
    if let Ok(Some(delivery)) = tokio::time::timeout(quiet, consumer.next()).await {
        panic!(
            "expected no delivery, got {} revision {}",
            delivery.event.stream, delivery.event.revision.0
        );
    }
}

async fn append(store: &Arc<dyn EventStore>, name: &str, count: usize) -> Vec<RecordedEvent> {
    let id = stream(name);
    let batch: Vec<_> = (0..count).map(|_| event("ThingHappened")).collect();
    store
        .append(&id, ExpectedVersion::Any, batch)
        .await
        .expect("append");
    let all = stream_events(store.as_ref(), &id).await.expect("read");
    all[all.len() - count..].to_vec()
}

async fn parked_records(store: &Arc<dyn EventStore>, group: &str) -> Vec<ParkedEvent> {
    let parked = stream(&format!("factline.parked-{group}"));
    match stream_events(store.as_ref(), &parked).await {
        Ok(events) => events
            .iter()
            .map(|event| {
                assert_eq!(event.event_type, EVENT_PARKED);
                event.data_json().expect("a parked record")
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Every event of the source reaches exactly one of two round-robin consumers; the store's
/// own streams (the group's checkpoints) are never delivered; the checkpoint reaches the end.
pub async fn persistent_group_delivers_each_event_to_one_consumer<S: TestStore>(store: S) {
    let store = shared(store);
    let subscriptions = open(&store).await;
    subscriptions
        .create(
            "billing",
            GroupSettings::all(EventFilter::all()).checkpoint_after_events(7),
        )
        .await
        .unwrap();
    let mut first = connect(&subscriptions, "billing").await;
    let mut second = connect(&subscriptions, "billing").await;
    let mut written = Vec::new();
    for n in 0..5 {
        written.extend(append(&store, &format!("order-{n}"), 10).await);
    }
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    let mut by_consumer = [0usize; 2];
    while seen.len() < written.len() {
        let (delivery, index) = tokio::select! {
            delivery = next(&mut first) => (delivery, 0),
            delivery = next(&mut second) => (delivery, 1),
        };
        assert!(
            !delivery.event.stream.as_str().starts_with("factline."),
            "the store's own streams are not delivered"
        );
        *seen.entry(delivery.event.id).or_default() += 1;
        by_consumer[index] += 1;
        let consumer = if index == 0 { &first } else { &second };
        let settled = consumer.ack(&[delivery.id]).await.unwrap();
        assert_eq!(settled.settled, 1);
    }
    assert!(
        seen.values().all(|count| *count == 1),
        "one delivery per event"
    );
    let wanted: HashSet<Uuid> = written.iter().map(|event| event.id).collect();
    assert_eq!(seen.keys().copied().collect::<HashSet<_>>(), wanted);
    assert!(
        by_consumer[0] > 0 && by_consumer[1] > 0,
        "both consumers got work: {by_consumer:?}"
    );
    assert_nothing(&mut first, Duration::from_millis(100)).await;
    let info = subscriptions.info("billing").await.unwrap();
    assert_eq!(info.acked_total, 50);
    assert_eq!(info.in_flight, 0);
    assert!(info.checkpoint >= Some(written[written.len() - 1].position.0));
    subscriptions.shutdown().await;
}

/// A nacked event is delivered again with a growing retry count; past `retries_max` it is
/// parked once (a record in the dead-letter stream naming the reason) and not delivered again.
pub async fn persistent_nack_retries_then_parks_past_the_limit<S: TestStore>(store: S) {
    let store = shared(store);
    let subscriptions = open(&store).await;
    subscriptions
        .create(
            "ship",
            GroupSettings::stream(stream("order-1")).retries_max(2),
        )
        .await
        .unwrap();
    let mut consumer = connect(&subscriptions, "ship").await;
    let written = append(&store, "order-1", 3).await;
    let poison = written[1].id;
    let mut poison_retries = Vec::new();
    let mut acked = Vec::new();
    while acked.len() < 2 || poison_retries.len() < 3 {
        let delivery = next(&mut consumer).await;
        if delivery.event.id == poison {
            poison_retries.push(delivery.retry_count);
            consumer
                .nack(&[delivery.id], NackAction::Retry, "card declined")
                .await
                .unwrap();
        } else {
            acked.push(delivery.event.id);
            consumer.ack(&[delivery.id]).await.unwrap();
        }
    }
    assert_eq!(poison_retries, vec![0, 1, 2]);
    assert_nothing(&mut consumer, Duration::from_millis(200)).await;
    let records = parked_records(&store, "ship").await;
    assert_eq!(records.len(), 1, "parked once: {records:?}");
    assert_eq!(records[0].event_id, poison);
    assert_eq!(records[0].revision, Revision(1));
    assert_eq!(records[0].retry_count, 3);
    assert!(
        records[0].reason.contains("card declined"),
        "{}",
        records[0].reason
    );
    let info = subscriptions.info("ship").await.unwrap();
    assert_eq!((info.parked_total, info.retried_total), (1, 3));
    assert_eq!(info.parked_waiting, 1);
    assert_eq!(info.checkpoint, Some(2));
    subscriptions.shutdown().await;
}

/// A delivery not settled in time goes to another consumer; the late ack of the first one
/// finds nothing (the first outcome wins).
pub async fn persistent_unsettled_delivery_times_out_to_another_consumer<S: TestStore>(store: S) {
    let store = shared(store);
    let subscriptions = open(&store).await;
    subscriptions
        .create(
            "slow",
            GroupSettings::stream(stream("order-7")).message_timeout_ms(150),
        )
        .await
        .unwrap();
    let mut stalled = connect(&subscriptions, "slow").await;
    append(&store, "order-7", 1).await;
    let held = next(&mut stalled).await;
    let mut healthy = connect(&subscriptions, "slow").await;
    let again = tokio::select! {
        delivery = next(&mut healthy) => delivery,
        delivery = next(&mut stalled) => delivery,
    };
    assert_eq!(again.event.id, held.event.id);
    assert_eq!(again.retry_count, 1);
    assert_ne!(again.id, held.id, "a retry is a new delivery");
    let late = stalled.ack(&[held.id]).await.unwrap();
    assert_eq!((late.settled, late.unknown.clone()), (0, vec![held.id]));
    let owner = if healthy.ack(&[again.id]).await.unwrap().settled == 1 {
        "healthy"
    } else {
        stalled.ack(&[again.id]).await.unwrap();
        "stalled"
    };
    let info = subscriptions.info("slow").await.unwrap();
    assert!(info.timed_out_total >= 1, "{owner}: {info:?}");
    assert_eq!(info.acked_total, 1);
    subscriptions.shutdown().await;
}

/// Pinned: each stream's events go to one member at a time, in stream order; when a member
/// leaves with deliveries open, its streams pass to the others and nothing is lost or reordered.
pub async fn persistent_pinned_members_keep_stream_order_across_a_leave<S: TestStore>(store: S) {
    let store = shared(store);
    let subscriptions = open(&store).await;
    subscriptions
        .create(
            "pinned",
            GroupSettings::all(EventFilter::all().category("cart"))
                .strategy(ConsumerStrategy::Pinned)
                .in_flight_per_consumer_max(4),
        )
        .await
        .unwrap();
    let mut members = vec![
        connect(&subscriptions, "pinned").await,
        connect(&subscriptions, "pinned").await,
        connect(&subscriptions, "pinned").await,
    ];
    let streams = 6;
    let per_stream = 8;
    for n in 0..streams {
        append(&store, &format!("cart-{n}"), per_stream).await;
    }
    // stream -> revisions acked, in the order they were acked (across members)
    let mut acked: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut owners: BTreeMap<String, HashSet<usize>> = BTreeMap::new();
    let mut left = false;
    let total = streams * per_stream;
    while acked.values().map(Vec::len).sum::<usize>() < total {
        let mut progressed = false;
        for (index, member) in members.iter_mut().enumerate() {
            while let Some(delivery) = member.try_next() {
                progressed = true;
                let stream = delivery.event.stream.as_str().to_owned();
                owners.entry(stream.clone()).or_default().insert(index);
                acked
                    .entry(stream)
                    .or_default()
                    .push(delivery.event.revision.0);
                member.ack(&[delivery.id]).await.unwrap();
            }
        }
        if !left && acked.values().map(Vec::len).sum::<usize>() >= total / 3 {
            // The first member leaves with whatever it holds unread: those are retried
            // elsewhere, after which the stream carries on from there.
            let leaving = members.remove(0);
            drop(leaving);
            left = true;
        }
        if !progressed {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert!(left);
    for (stream, revisions) in &acked {
        let expected: Vec<u64> = (0..per_stream as u64).collect();
        assert_eq!(
            revisions, &expected,
            "stream {stream} handled once each, in order"
        );
    }
    for member in &mut members {
        assert_nothing(member, Duration::from_millis(100)).await;
    }
    subscriptions.shutdown().await;
}

/// After a restart only events whose outcome was not saved come again: settled events above
/// the checkpoint (acked out of order) are not redelivered, the unsettled one is.
pub async fn persistent_group_resumes_after_a_restart<S: TestStore>(store: S) {
    let store = shared(store);
    let subscriptions = open(&store).await;
    subscriptions
        .create(
            "resume",
            GroupSettings::stream(stream("order-3")).in_flight_per_consumer_max(10),
        )
        .await
        .unwrap();
    let mut consumer = connect(&subscriptions, "resume").await;
    let written = append(&store, "order-3", 5).await;
    let mut deliveries = Vec::new();
    for _ in 0..5 {
        deliveries.push(next(&mut consumer).await);
    }
    // Settle all but revision 2.
    let settle: Vec<_> = deliveries
        .iter()
        .filter(|delivery| delivery.event.revision.0 != 2)
        .map(|delivery| delivery.id)
        .collect();
    consumer.ack(&settle).await.unwrap();
    drop(consumer);
    subscriptions.shutdown().await;

    let reopened = open(&store).await;
    let mut consumer = connect(&reopened, "resume").await;
    let again = next(&mut consumer).await;
    assert_eq!(
        again.event.id, written[2].id,
        "the unsettled event comes again"
    );
    consumer.ack(&[again.id]).await.unwrap();
    assert_nothing(&mut consumer, Duration::from_millis(200)).await;
    let later = append(&store, "order-3", 1).await;
    let fresh = next(&mut consumer).await;
    assert_eq!(fresh.event.id, later[0].id);
    consumer.ack(&[fresh.id]).await.unwrap();
    reopened.shutdown().await;
}

/// An event parked just before a crash (record written, checkpoint not saved) is not parked
/// again, nor delivered again, after the restart.
pub async fn persistent_event_parked_before_a_crash_is_not_parked_twice<S: TestStore>(store: S) {
    let store = shared(store);
    let subscriptions = open(&store).await;
    subscriptions
        .create(
            "crash",
            GroupSettings::stream(stream("order-9")).checkpoint_after_events(1_000),
        )
        .await
        .unwrap();
    let mut consumer = connect(&subscriptions, "crash").await;
    let written = append(&store, "order-9", 2).await;
    let first = next(&mut consumer).await;
    consumer
        .nack(&[first.id], NackAction::Park, "bad address")
        .await
        .unwrap();
    let second = next(&mut consumer).await;
    assert_eq!(second.event.id, written[1].id);
    drop(consumer);
    subscriptions.crash().await;
    assert_eq!(parked_records(&store, "crash").await.len(), 1);

    let reopened = open(&store).await;
    let mut consumer = connect(&reopened, "crash").await;
    let again = next(&mut consumer).await;
    assert_eq!(
        again.event.id, written[1].id,
        "only the unsettled event comes again, not the parked one"
    );
    consumer
        .nack(&[again.id], NackAction::Skip, "seen")
        .await
        .unwrap();
    assert_nothing(&mut consumer, Duration::from_millis(200)).await;
    assert_eq!(
        parked_records(&store, "crash").await.len(),
        1,
        "parked once"
    );
    reopened.shutdown().await;
}

/// Replay hands the parked events out again (marked replayed, pages bounded by the buffer);
/// once settled they leave the parked stream.
pub async fn persistent_parked_events_replay_and_leave_the_parked_stream<S: TestStore>(store: S) {
    let store = shared(store);
    let subscriptions = open(&store).await;
    subscriptions
        .create(
            "replay",
            GroupSettings::stream(stream("order-5"))
                .buffer_events_max(4)
                .in_flight_per_consumer_max(2),
        )
        .await
        .unwrap();
    let mut consumer = connect(&subscriptions, "replay").await;
    let written = append(&store, "order-5", 10).await;
    for _ in 0..10 {
        let delivery = next(&mut consumer).await;
        consumer
            .nack(&[delivery.id], NackAction::Park, "downstream down")
            .await
            .unwrap();
    }
    assert_eq!(parked_records(&store, "replay").await.len(), 10);
    assert_eq!(
        subscriptions.info("replay").await.unwrap().parked_waiting,
        10
    );

    assert_eq!(
        subscriptions.replay_parked("replay", None).await.unwrap(),
        10
    );
    let mut replayed = Vec::new();
    while replayed.len() < 10 {
        let delivery = next(&mut consumer).await;
        assert!(delivery.replayed);
        assert_eq!(delivery.retry_count, 0);
        let info = subscriptions.info("replay").await.unwrap();
        assert!(info.buffered <= 8, "bounded: {} held", info.buffered);
        replayed.push(delivery.event.id);
        consumer.ack(&[delivery.id]).await.unwrap();
    }
    let original: Vec<Uuid> = written.iter().map(|event| event.id).collect();
    assert_eq!(replayed, original, "replayed in parking order");
    assert_nothing(&mut consumer, Duration::from_millis(200)).await;
    drop(consumer);
    subscriptions.shutdown().await;
    assert!(
        parked_records(&store, "replay").await.is_empty(),
        "settled replays leave the parked stream"
    );
    let reopened = open(&store).await;
    let info = reopened.info("replay").await.unwrap();
    assert_eq!((info.parked_waiting, info.replay_remaining), (0, 0));
    assert_eq!(reopened.replay_parked("replay", None).await.unwrap(), 0);
    reopened.shutdown().await;
}

/// Groups are created, listed, updated and deleted; names and settings are checked; a group
/// starting at the end gets only later events; a deleted name created again starts afresh.
pub async fn persistent_groups_are_managed_and_checked<S: TestStore>(store: S) {
    let store = shared(store);
    append(&store, "order-1", 2).await;
    let subscriptions = open(&store).await;
    let settings = GroupSettings::stream(stream("order-1"));
    subscriptions.create("a", settings.clone()).await.unwrap();
    assert!(matches!(
        subscriptions.create("a", settings.clone()).await,
        Err(GroupError::GroupExists { .. })
    ));
    assert!(matches!(
        subscriptions.create("", settings.clone()).await,
        Err(GroupError::InvalidGroupName { .. })
    ));
    assert!(matches!(
        subscriptions
            .create(&"g".repeat(101), settings.clone())
            .await,
        Err(GroupError::InvalidGroupName { max: 100, .. })
    ));
    match subscriptions
        .create("b", settings.clone().message_timeout_ms(0))
        .await
    {
        Err(GroupError::InvalidSettings { field, reason }) => {
            assert_eq!(field, "message_timeout_ms");
            assert!(reason.contains("10..="), "{reason}");
        }
        other => panic!("expected InvalidSettings, got {other:?}"),
    }
    assert!(matches!(
        subscriptions
            .connect("missing", ConnectOptions::default())
            .await,
        Err(GroupError::GroupNotFound { .. })
    ));

    subscriptions
        .create("late", settings.clone().start(GroupStart::End))
        .await
        .unwrap();
    let mut late = connect(&subscriptions, "late").await;
    assert_nothing(&mut late, Duration::from_millis(100)).await;
    let newer = append(&store, "order-1", 1).await;
    let delivery = next(&mut late).await;
    assert_eq!(
        delivery.event.id, newer[0].id,
        "starts after the end at creation"
    );
    late.ack(&[delivery.id]).await.unwrap();

    let names: Vec<String> = subscriptions
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|info| info.group)
        .collect();
    assert_eq!(names, vec!["a".to_owned(), "late".to_owned()]);

    // Update: the consumer is disconnected; the new settings hold after a restart too.
    subscriptions
        .update("late", settings.clone().retries_max(3))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(EVENT_TIMEOUT, late.next())
            .await
            .unwrap()
            .is_none(),
        "an update disconnects the consumers"
    );
    assert!(matches!(
        subscriptions
            .update("late", GroupSettings::stream(stream("order-2")))
            .await,
        Err(GroupError::InvalidSettings {
            field: "source",
            ..
        })
    ));
    subscriptions.shutdown().await;
    let reopened = open(&store).await;
    let info = reopened.info("late").await.unwrap();
    assert_eq!(info.settings.retries_max, 3);
    assert_eq!(
        info.checkpoint,
        Some(2),
        "the checkpoint survives an update"
    );

    // Delete, then create the name again: it starts from its own start, not the old state.
    let mut consumer = connect(&reopened, "a").await;
    for _ in 0..3 {
        let delivery = next(&mut consumer).await;
        consumer.ack(&[delivery.id]).await.unwrap();
    }
    reopened.delete("a").await.unwrap();
    assert!(
        tokio::time::timeout(EVENT_TIMEOUT, consumer.next())
            .await
            .unwrap()
            .is_none(),
        "a delete disconnects the consumers"
    );
    assert!(matches!(
        reopened.info("a").await,
        Err(GroupError::GroupNotFound { .. })
    ));
    reopened.create("a", settings.clone()).await.unwrap();
    let mut consumer = connect(&reopened, "a").await;
    let first = next(&mut consumer).await;
    assert_eq!(
        first.event.revision,
        Revision(0),
        "a re-created group starts afresh"
    );
    reopened.shutdown().await;
    assert!(matches!(
        reopened.info("late").await,
        Err(GroupError::ShutDown)
    ));
    let events = stream_events(
        store.as_ref(),
        &stream("factline.registry-persistent-subscriptions"),
    )
    .await
    .unwrap();
    assert_eq!(
        events.len(),
        5,
        "created a, created late, updated late, deleted a, created a"
    );
}

/// Pinned: while a member holds a stream's event, no other member gets that stream's next
/// event, even when a join moves the stream to the newcomer; it moves once the open delivery
/// is settled.
pub async fn persistent_pinned_stream_moves_only_after_its_open_delivery_settles<S: TestStore>(
    store: S,
) {
    let store = shared(store);
    let subscriptions = open(&store).await;
    subscriptions
        .create(
            "handover",
            GroupSettings::all(EventFilter::all().category("cart"))
                .strategy(ConsumerStrategy::Pinned)
                .in_flight_per_consumer_max(100),
        )
        .await
        .unwrap();
    let mut holder = connect(&subscriptions, "handover").await;
    let streams = 20;
    for n in 0..streams {
        append(&store, &format!("cart-{n}"), 1).await;
    }
    let mut held = Vec::new();
    for _ in 0..streams {
        held.push(next(&mut holder).await);
    }
    let mut newcomer = connect(&subscriptions, "handover").await;
    for n in 0..streams {
        append(&store, &format!("cart-{n}"), 1).await;
    }
    // Each stream is busy at the holder: its second event waits, wherever it now belongs.
    assert_nothing(&mut newcomer, Duration::from_millis(300)).await;
    assert_nothing(&mut holder, Duration::from_millis(50)).await;
    let ids: Vec<_> = held.iter().map(|delivery| delivery.id).collect();
    holder.ack(&ids).await.unwrap();
    let mut second: BTreeMap<String, usize> = BTreeMap::new();
    while second.len() < streams {
        let (delivery, index) = tokio::select! {
            delivery = next(&mut holder) => (delivery, 0),
            delivery = next(&mut newcomer) => (delivery, 1),
        };
        assert_eq!(delivery.event.revision, Revision(1));
        second.insert(delivery.event.stream.as_str().to_owned(), index);
        let member = if index == 0 { &holder } else { &newcomer };
        member.ack(&[delivery.id]).await.unwrap();
    }
    let moved = second.values().filter(|index| **index == 1).count();
    assert!(
        moved > 0 && moved < streams,
        "rendezvous hashing moves some streams to the newcomer, not all: {moved} of {streams}"
    );
    subscriptions.shutdown().await;
}
