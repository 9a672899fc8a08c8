//! Property test of persistent subscriptions against a simple model: random appends, joins,
//! leaves, acks, nacks, clean restarts and crashes, then a drain. Whatever the sequence:
//! - every event appended ends settled (acked, skipped or parked); nothing is lost;
//! - no event is parked twice, crash or not;
//! - without a crash no settled event is delivered again;
//! - Pinned: two deliveries of one stream are never open at once, and (without a crash) a
//!   stream's events are settled in revision order.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use factline_core::{
    EventData, EventFilter, EventStore, ExpectedVersion, InMemoryStore, StreamId,
    persistent::{
        ConnectOptions, ConsumerStrategy, Delivery, GroupSettings, NackAction, ParkedEvent,
        PersistentConsumer, PersistentSubscriptions,
    },
    testkit::stream_events,
};
use proptest::prelude::*;
use uuid::Uuid;

const SLOTS: usize = 2;
const STREAMS: usize = 4;
const GROUP: &str = "model";

#[derive(Debug, Clone)]
enum Op {
    Append { stream: usize, count: usize },
    Connect { slot: usize },
    Leave { slot: usize },
    Settle { slot: usize, how: How },
    Restart,
    Crash,
}

#[derive(Debug, Clone, Copy)]
enum How {
    Ack,
    Retry,
    Park,
    Skip,
    /// Take a delivery and keep it open for now.
    Hold,
}

fn op() -> impl Strategy<Value = Op> {
    let how = prop_oneof![
        4 => Just(How::Ack),
        2 => Just(How::Retry),
        1 => Just(How::Park),
        1 => Just(How::Skip),
        4 => Just(How::Hold),
    ];
    prop_oneof![
        4 => (0..STREAMS, 1..4usize).prop_map(|(stream, count)| Op::Append { stream, count }),
        2 => (0..SLOTS).prop_map(|slot| Op::Connect { slot }),
        1 => (0..SLOTS).prop_map(|slot| Op::Leave { slot }),
        10 => (0..SLOTS, how).prop_map(|(slot, how)| Op::Settle { slot, how }),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
    ]
}

#[derive(Default)]
struct Observed {
    appended: Vec<Uuid>,
    stream_of: HashMap<Uuid, String>,
    revision_of: HashMap<Uuid, u64>,
    /// Events settled for good (ack, skip, park), with how many times.
    settled: HashMap<Uuid, usize>,
    /// Per stream, the revisions settled, in order.
    settled_order: BTreeMap<String, Vec<u64>>,
    crashed: bool,
}

struct Slot {
    consumer: PersistentConsumer,
    held: Vec<Delivery>,
}

struct Harness {
    store: Arc<dyn EventStore>,
    subscriptions: PersistentSubscriptions,
    slots: Vec<Option<Slot>>,
    pinned: bool,
    observed: Observed,
}

impl Harness {
    fn open_streams(&self) -> HashMap<String, usize> {
        let mut open = HashMap::new();
        for slot in self.slots.iter().flatten() {
            for delivery in &slot.held {
                *open
                    .entry(delivery.event.stream.as_str().to_owned())
                    .or_default() += 1;
            }
        }
        open
    }

    /// Takes one delivery of slot `index` if one arrives soon.
    async fn take(&mut self, index: usize) -> Option<Delivery> {
        let slot = self.slots[index].as_mut()?;
        let delivery = tokio::time::timeout(Duration::from_millis(20), slot.consumer.next())
            .await
            .ok()
            .flatten()?;
        let stream = delivery.event.stream.as_str().to_owned();
        if self.pinned {
            let open = self.open_streams();
            assert!(
                !open.contains_key(&stream),
                "pinned: a second delivery of {stream} while one is open"
            );
        }
        if !self.observed.crashed {
            assert!(
                !self.observed.settled.contains_key(&delivery.event.id),
                "without a crash a settled event is not delivered again: {} revision {}",
                stream,
                delivery.event.revision.0
            );
        }
        Some(delivery)
    }

    fn record_settled(&mut self, delivery: &Delivery) {
        *self.observed.settled.entry(delivery.event.id).or_default() += 1;
        self.observed
            .settled_order
            .entry(delivery.event.stream.as_str().to_owned())
            .or_default()
            .push(delivery.event.revision.0);
    }

    async fn settle(&mut self, index: usize, how: How) {
        // First an open delivery, oldest first; else a new one.
        // Hold takes a new delivery; the others settle the oldest held one first.
        let held = self.slots[index].as_mut().and_then(|slot| {
            (!matches!(how, How::Hold) && !slot.held.is_empty()).then(|| slot.held.remove(0))
        });
        let delivery = match held {
            Some(delivery) => Some(delivery),
            None => self.take(index).await,
        };
        let Some(delivery) = delivery else { return };
        let Some(slot) = self.slots[index].as_mut() else {
            return;
        };
        let outcome = match how {
            How::Hold => {
                slot.held.push(delivery);
                return;
            }
            How::Ack => slot.consumer.ack(&[delivery.id]).await,
            How::Retry => {
                slot.consumer
                    .nack(&[delivery.id], NackAction::Retry, "try again")
                    .await
            }
            How::Park => {
                slot.consumer
                    .nack(&[delivery.id], NackAction::Park, "poison")
                    .await
            }
            How::Skip => {
                slot.consumer
                    .nack(&[delivery.id], NackAction::Skip, "not for us")
                    .await
            }
        };
        let settled = outcome.expect("the group runs").settled == 1;
        assert!(settled, "an open delivery settles");
        match how {
            How::Ack | How::Skip | How::Park => self.record_settled(&delivery),
            // A retry past the limit parks it; the parked records tell (checked at the end).
            How::Retry | How::Hold => {}
        }
    }

    async fn connect(&mut self, index: usize) {
        if self.slots[index].is_none() {
            let consumer = self
                .subscriptions
                .connect(GROUP, ConnectOptions::named(format!("slot-{index}")))
                .await
                .unwrap();
            self.slots[index] = Some(Slot {
                consumer,
                held: Vec::new(),
            });
        }
    }

    async fn reopen(&mut self, crash: bool) {
        for slot in &mut self.slots {
            *slot = None;
        }
        if crash {
            self.subscriptions.crash().await;
            self.observed.crashed = true;
        } else {
            self.subscriptions.shutdown().await;
        }
        self.subscriptions = PersistentSubscriptions::open(Arc::clone(&self.store))
            .await
            .unwrap();
    }

    async fn apply(&mut self, op: Op) {
        match op {
            Op::Append { stream, count } => {
                let id = StreamId::new(format!("item-{stream}")).unwrap();
                let events: Vec<_> = (0..count)
                    .map(|n| {
                        EventData::json("ItemChanged", &serde_json::json!({ "n": n })).unwrap()
                    })
                    .collect();
                let written = self
                    .store
                    .append(&id, ExpectedVersion::Any, events.clone())
                    .await
                    .unwrap();
                let first = written.next_expected_version.value() + 1 - count as u64;
                for (offset, event) in events.iter().enumerate() {
                    self.observed.appended.push(event.id);
                    self.observed
                        .stream_of
                        .insert(event.id, id.as_str().to_owned());
                    self.observed
                        .revision_of
                        .insert(event.id, first + offset as u64);
                }
            }
            Op::Connect { slot } => self.connect(slot).await,
            Op::Leave { slot } => self.slots[slot] = None,
            Op::Settle { slot, how } => self.settle(slot, how).await,
            Op::Restart => self.reopen(false).await,
            Op::Crash => self.reopen(true).await,
        }
    }

    /// Acks everything still coming until the group is quiet.
    async fn drain(&mut self) {
        for index in 0..SLOTS {
            let held = self.slots[index]
                .as_mut()
                .map(|slot| std::mem::take(&mut slot.held))
                .unwrap_or_default();
            for delivery in held {
                let slot = self.slots[index].as_ref().unwrap();
                assert_eq!(slot.consumer.ack(&[delivery.id]).await.unwrap().settled, 1);
                self.record_settled(&delivery);
            }
        }
        // What sits unread in a consumer's queue goes back to the group when it leaves.
        for slot in &mut self.slots {
            *slot = None;
        }
        self.connect(0).await;
        loop {
            let slot = self.slots[0].as_mut().unwrap();
            let Ok(Some(delivery)) =
                tokio::time::timeout(Duration::from_millis(300), slot.consumer.next()).await
            else {
                break;
            };
            assert_eq!(slot.consumer.ack(&[delivery.id]).await.unwrap().settled, 1);
            self.record_settled(&delivery);
        }
    }
}

async fn run(ops: Vec<Op>, pinned: bool) {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let subscriptions = PersistentSubscriptions::open(Arc::clone(&store))
        .await
        .unwrap();
    let strategy = if pinned {
        ConsumerStrategy::Pinned
    } else {
        ConsumerStrategy::RoundRobin
    };
    subscriptions
        .create(
            GROUP,
            GroupSettings::all(EventFilter::all().category("item"))
                .strategy(strategy)
                .retries_max(2)
                .in_flight_per_consumer_max(3)
                .buffer_events_max(8)
                .checkpoint_after_events(3),
        )
        .await
        .unwrap();
    let mut harness = Harness {
        store,
        subscriptions,
        slots: (0..SLOTS).map(|_| None).collect(),
        pinned,
        observed: Observed::default(),
    };
    for slot in 0..SLOTS {
        harness.connect(slot).await;
    }
    for op in ops {
        harness.apply(op).await;
    }
    harness.drain().await;

    let parked = stream_events(
        harness.store.as_ref(),
        &StreamId::new(format!("factline.parked-{GROUP}")).unwrap(),
    )
    .await
    .unwrap_or_default();
    let mut parked_ids = HashSet::new();
    for record in &parked {
        let record: ParkedEvent = record.data_json().unwrap();
        assert!(
            parked_ids.insert(record.event_id),
            "event {} revision {} parked twice",
            record.stream,
            record.revision.0
        );
    }
    let observed = &harness.observed;
    for id in &observed.appended {
        assert!(
            observed.settled.contains_key(id) || parked_ids.contains(id),
            "event {} revision {} was never settled",
            observed.stream_of[id],
            observed.revision_of[id]
        );
    }
    if !observed.crashed {
        for (id, count) in &observed.settled {
            assert_eq!(*count, 1, "settled once without a crash: {id}");
        }
        if pinned {
            for (stream, revisions) in &observed.settled_order {
                assert!(
                    revisions.windows(2).all(|pair| pair[0] < pair[1]),
                    "pinned: {stream} settled in order: {revisions:?}"
                );
            }
        }
    }
    harness.subscriptions.shutdown().await;
}

fn block_on(future: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn round_robin_groups_settle_every_event(ops in prop::collection::vec(op(), 1..40)) {
        block_on(run(ops, false));
    }

    #[test]
    fn pinned_groups_keep_streams_in_order(ops in prop::collection::vec(op(), 1..40)) {
        block_on(run(ops, true));
    }
}

/// The smallest case of the Pinned rule, kept as a fixed sequence.
#[test]
fn pinned_holds_a_streams_second_event_until_the_first_settles() {
    block_on(run(
        vec![
            Op::Connect { slot: 0 },
            Op::Append {
                stream: 0,
                count: 3,
            },
            Op::Settle {
                slot: 0,
                how: How::Hold,
            },
            Op::Settle {
                slot: 0,
                how: How::Hold,
            },
        ],
        true,
    ));
}
