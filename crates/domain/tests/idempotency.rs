//! Idempotent handling: a command executed with an idempotency key is applied at most once —
//! again later, concurrently, and when a persistent subscription redelivers the event that
//! caused it to another consumer after a timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

mod common;

use std::{sync::Arc, time::Duration};

use common::{Account, deposit, open};
use factline_core::{
    EventData, EventFilter, EventStore, ExpectedVersion, InMemoryStore, ReadStreamOptions,
    StreamId,
    persistent::{ConnectOptions, GroupSettings, GroupStart, PersistentSubscriptions},
};
use factline_domain::{COMMAND_HANDLED_EVENT_TYPE, ExecuteOptions, Repository, handled_stream_for};

fn keyed(key: &str) -> ExecuteOptions {
    ExecuteOptions::new()
        .with_idempotency_key(key)
        .with_conflict_retries(100)
}

async fn balance_events(store: &InMemoryStore, id: &str) -> usize {
    store
        .read_stream(
            &StreamId::new(format!("account-{id}")).unwrap(),
            ReadStreamOptions::forwards().limit(10_000),
        )
        .await
        .unwrap()
        .events
        .len()
}

#[tokio::test]
async fn a_key_is_applied_once_however_often_it_comes_back() {
    let store = InMemoryStore::new();
    let accounts = Repository::<Account>::new(Arc::new(store.clone()));
    accounts
        .execute("1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();

    let first = accounts
        .execute("1", deposit(100), keyed("billing/evt-1"))
        .await
        .unwrap();
    assert!(!first.already_handled);
    assert_eq!(first.recorded.len(), 1);
    for _ in 0..3 {
        let again = accounts
            .execute("1", deposit(100), keyed("billing/evt-1"))
            .await
            .unwrap();
        assert!(again.already_handled);
        assert!(again.events.is_empty() && again.recorded.is_empty());
    }
    let other = accounts
        .execute("1", deposit(5), keyed("billing/evt-2"))
        .await
        .unwrap();
    assert!(!other.already_handled);
    assert_eq!(accounts.load("1").await.unwrap().state.balance_cents, 105);

    // The key's record: its own stream, one event naming the key and the aggregate's stream.
    let record = store
        .read_stream(
            &handled_stream_for("billing/evt-1"),
            ReadStreamOptions::forwards(),
        )
        .await
        .unwrap();
    assert_eq!(record.events.len(), 1);
    assert_eq!(record.events[0].event_type, COMMAND_HANDLED_EVENT_TYPE);
    let data: serde_json::Value = record.events[0].data_json().unwrap();
    assert_eq!(data["key"], "billing/evt-1");
    assert_eq!(data["stream"], "account-1");

    // A command deciding nothing records no key: it may run again (and decide nothing again).
    let nothing = accounts
        .execute("1", open("ada"), keyed("billing/evt-3"))
        .await
        .unwrap();
    assert!(!nothing.already_handled && nothing.recorded.is_empty());
    assert!(
        store
            .read_stream(
                &handled_stream_for("billing/evt-3"),
                ReadStreamOptions::forwards()
            )
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_executions_of_one_key_apply_it_once() {
    let store = InMemoryStore::new();
    let accounts = Repository::<Account>::new(Arc::new(store.clone()));
    accounts
        .execute("1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    for round in 0..20 {
        let key = format!("transfer/{round}");
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let accounts = accounts.clone();
                let key = key.clone();
                // No conflict retries: the losers must see the key, not a conflict.
                let options = ExecuteOptions::new().with_idempotency_key(&key);
                tokio::spawn(async move { accounts.execute("1", deposit(1), options).await })
            })
            .collect();
        let mut applied = 0;
        for task in tasks {
            if !task.await.unwrap().unwrap().already_handled {
                applied += 1;
            }
        }
        assert_eq!(applied, 1, "round {round}");
    }
    assert_eq!(accounts.load("1").await.unwrap().state.balance_cents, 20);
    assert_eq!(balance_events(&store, "1").await, 21);
}

#[tokio::test]
async fn an_event_redelivered_to_another_consumer_after_a_timeout_is_not_applied_twice() {
    let store = InMemoryStore::new();
    let events: Arc<dyn EventStore> = Arc::new(store.clone());
    let accounts = Repository::<Account>::new(events.clone());
    accounts
        .execute("1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    let groups = PersistentSubscriptions::open(events.clone()).await.unwrap();
    groups
        .create(
            "deposits",
            GroupSettings::all(EventFilter::all().category("payment"))
                .start(GroupStart::Start)
                .message_timeout_ms(100),
        )
        .await
        .unwrap();
    store
        .append(
            &StreamId::new("payment-7").unwrap(),
            ExpectedVersion::Any,
            vec![EventData::json("PaymentReceived", &serde_json::json!({"cents": 40})).unwrap()],
        )
        .await
        .unwrap();

    // The handler: deposit the payment, keyed by the event id.
    let handle = |event_id: String| {
        let accounts = accounts.clone();
        async move {
            accounts
                .execute("1", deposit(40), keyed(&format!("deposits/{event_id}")))
                .await
                .unwrap()
        }
    };
    // One delivery at a time, so that the retry cannot go back to it.
    let mut slow = groups
        .connect("deposits", ConnectOptions::named("slow").in_flight_max(1))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), slow.next())
        .await
        .unwrap()
        .unwrap();
    // It applies the deposit, then stalls past the timeout without acking.
    assert!(!handle(first.event.id.to_string()).await.already_handled);
    let mut other = groups
        .connect("deposits", ConnectOptions::named("other"))
        .await
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(5), other.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        again.event.id, first.event.id,
        "the same event, redelivered"
    );
    assert!(again.retry_count >= 1);
    assert!(
        handle(again.event.id.to_string()).await.already_handled,
        "the redelivery finds its key handled"
    );
    other.ack(&[again.id]).await.unwrap();
    let late = slow.ack(&[first.id]).await.unwrap();
    assert_eq!(
        late.settled, 0,
        "the timed-out delivery is no longer the slow one's"
    );
    assert_eq!(accounts.load("1").await.unwrap().state.balance_cents, 40);
    groups.shutdown().await;
}
