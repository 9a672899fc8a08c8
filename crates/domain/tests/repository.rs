//! `Repository` against the in-memory store: load, execute, conflicts, metadata, paging and
//! snapshots.
// Test helpers outside #[test] functions panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{
    Account, AccountError, AccountEvent, InstrumentedStore, deposit, open,
    store_with_read_count_max, withdraw,
};
use factline_core::{
    DeleteMode, EventData, EventStore, ExpectedVersion, InMemoryStore, Position, ReadStreamOptions,
    Revision, Snapshot, SnapshotError, SnapshotStore, StorageError, StreamId, StreamState,
    Timestamp, async_trait,
};
use factline_domain::{
    AggregateIdError, DecodeError, ExecuteError, ExecuteOptions, LoadError, Repository,
    SnapshotPolicy, stream_id_for,
};

fn repository_over(store: &InMemoryStore) -> Repository<Account> {
    Repository::new(Arc::new(store.clone()))
}

fn stream(id: &str) -> StreamId {
    StreamId::new(format!("account-{id}")).unwrap()
}

#[test]
fn stream_ids_are_category_dash_id() {
    assert_eq!(
        stream_id_for::<Account>("a-1").unwrap().as_str(),
        "account-a-1"
    );
    assert_eq!(stream_id_for::<Account>(""), Err(AggregateIdError::Empty));
    assert!(matches!(
        stream_id_for::<Account>("bad\nid"),
        Err(AggregateIdError::InvalidStreamId { .. })
    ));
    assert!(matches!(
        stream_id_for::<Account>(&"x".repeat(300)),
        Err(AggregateIdError::InvalidStreamId { .. })
    ));
}

#[tokio::test]
async fn an_unknown_aggregate_loads_as_a_fresh_state() {
    let loaded = repository_over(&InMemoryStore::new())
        .load("nobody")
        .await
        .unwrap();
    assert_eq!(loaded.state, Account::default());
    assert_eq!(loaded.version, None);
    assert_eq!(loaded.events_replayed, 0);
}

#[tokio::test]
async fn invalid_ids_are_typed_errors() {
    let repository = repository_over(&InMemoryStore::new());
    assert!(matches!(
        repository.load("").await,
        Err(LoadError::InvalidId(AggregateIdError::Empty))
    ));
    assert!(matches!(
        repository
            .execute("a\u{7}", open("ada"), ExecuteOptions::new())
            .await,
        Err(ExecuteError::Load(LoadError::InvalidId(
            AggregateIdError::InvalidStreamId { .. }
        )))
    ));
}

#[tokio::test]
async fn the_first_command_creates_the_stream() {
    let store = InMemoryStore::new();
    let executed = repository_over(&store)
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    assert_eq!(executed.version, Some(Revision(0)));
    assert_eq!(
        executed.events,
        [AccountEvent::AccountOpened {
            owner: "ada".into()
        }]
    );
    assert_eq!(executed.state.owner.as_deref(), Some("ada"));
    assert_eq!(executed.conflict_retries, 0);
    let [recorded] = &executed.recorded[..] else {
        panic!("one event expected: {:?}", executed.recorded);
    };
    assert_eq!(recorded.stream, stream("a1"));
    assert_eq!(recorded.revision, Revision(0));
    assert_eq!(recorded.position, Position(0));
    assert_eq!(recorded.event_type, "AccountOpened");

    // What the repository reports is what the store holds.
    let stored = store
        .read_stream(&stream("a1"), ReadStreamOptions::forwards())
        .await
        .unwrap();
    assert_eq!(stored.events, executed.recorded);
}

#[tokio::test]
async fn later_commands_append_after_the_loaded_version() {
    let store = InMemoryStore::new();
    let repository = repository_over(&store);
    repository
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    // Another stream in between, so positions and revisions differ.
    repository
        .execute("b2", open("bob"), ExecuteOptions::new())
        .await
        .unwrap();
    let executed = repository
        .execute("a1", deposit(500), ExecuteOptions::new())
        .await
        .unwrap();
    assert_eq!(executed.version, Some(Revision(1)));
    assert_eq!(executed.recorded[0].revision, Revision(1));
    assert_eq!(executed.recorded[0].position, Position(2));
    assert_eq!(executed.state.balance_cents, 500);

    let loaded = repository.load("a1").await.unwrap();
    assert_eq!(loaded.version, Some(Revision(1)));
    assert_eq!(loaded.state, executed.state);
    assert_eq!(loaded.events_replayed, 2);
}

#[tokio::test]
async fn a_decision_without_events_appends_nothing() {
    let store = InMemoryStore::new();
    let repository = repository_over(&store);
    repository
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    let executed = repository
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    assert!(executed.events.is_empty());
    assert!(executed.recorded.is_empty());
    assert_eq!(executed.version, Some(Revision(0)));
    assert_eq!(store.head_position().await.unwrap(), Some(Position(0)));
}

#[tokio::test]
async fn rejected_commands_append_nothing() {
    let store = InMemoryStore::new();
    let repository = repository_over(&store);
    let error = repository
        .execute("a1", deposit(5), ExecuteOptions::new())
        .await
        .unwrap_err();
    assert_eq!(error.rejection(), Some(&AccountError::NotOpen));
    repository
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    let error = repository
        .execute("a1", withdraw(1), ExecuteOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        ExecuteError::Rejected(AccountError::InsufficientFunds {
            balance_cents: 0,
            requested_cents: 1
        })
    ));
    assert_eq!(
        error.to_string(),
        "command rejected: insufficient funds: balance 0, requested 1"
    );
    assert_eq!(store.head_position().await.unwrap(), Some(Position(0)));
}

/// Two deposits that both load version 0 before either appends.
async fn concurrent_deposits(
    retries_max: u32,
) -> (
    InMemoryStore,
    [Result<factline_domain::Executed<Account>, ExecuteError<AccountError>>; 2],
) {
    let memory = InMemoryStore::new();
    repository_over(&memory)
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    let store = Arc::new(InstrumentedStore::holding_first_appends(memory.clone(), 2));
    let repository = Repository::<Account>::new(store);
    let options = ExecuteOptions::new().with_conflict_retries(retries_max);
    let (first, second) = tokio::join!(
        repository.execute("a1", deposit(100), options.clone()),
        repository.execute("a1", deposit(20), options.clone()),
    );
    (memory, [first, second])
}

#[tokio::test]
async fn a_retry_resolves_a_concurrent_write() {
    let (memory, results) = concurrent_deposits(1).await;
    let [first, second] = results.map(Result::unwrap);
    let mut retries = [first.conflict_retries, second.conflict_retries];
    retries.sort_unstable();
    assert_eq!(retries, [0, 1], "exactly one of the two had to retry");
    let mut versions = [first.version, second.version];
    versions.sort_unstable();
    assert_eq!(versions, [Some(Revision(1)), Some(Revision(2))]);
    let retried = if first.conflict_retries == 1 {
        &first
    } else {
        &second
    };
    assert_eq!(
        retried.state.balance_cents, 120,
        "the retry saw the other deposit"
    );

    let loaded = repository_over(&memory).load("a1").await.unwrap();
    assert_eq!(loaded.state.balance_cents, 120);
    assert_eq!(loaded.version, Some(Revision(2)));
}

#[tokio::test]
async fn without_retries_a_concurrent_write_is_a_conflict() {
    let (memory, results) = concurrent_deposits(0).await;
    let (succeeded, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!(succeeded.len(), 1);
    let Some(Err(error)) = failed.into_iter().next() else {
        panic!("one command should have failed");
    };
    let ExecuteError::Conflict {
        stream: conflicted,
        expected,
        actual,
        attempts,
    } = &error
    else {
        panic!("expected a conflict, got {error:?}");
    };
    assert_eq!(conflicted, &stream("a1"));
    assert_eq!(*expected, ExpectedVersion::Exact(Revision(0)));
    assert_eq!(*actual, StreamState::At(Revision(1)));
    assert_eq!(*attempts, 1);
    assert!(
        error.to_string().contains("expected 0, actual 1"),
        "{error}"
    );

    let loaded = repository_over(&memory).load("a1").await.unwrap();
    assert_eq!(loaded.version, Some(Revision(1)));
}

#[tokio::test]
async fn conflicts_on_a_new_stream_expect_no_stream() {
    let memory = InMemoryStore::new();
    let store = Arc::new(InstrumentedStore::holding_first_appends(memory, 2));
    let repository = Repository::<Account>::new(store);
    let (first, second) = tokio::join!(
        repository.execute("a1", open("ada"), ExecuteOptions::new()),
        repository.execute(
            "a1",
            open("bob"),
            ExecuteOptions::new().with_conflict_retries(3)
        ),
    );
    // Whoever lost reloads; the second one then sees the account open for someone else (or
    // for itself), and the first one without retries reports the conflict.
    match (first, second) {
        (Ok(_), Err(error)) => {
            assert_eq!(
                error.rejection(),
                Some(&AccountError::OpenForSomeoneElse {
                    owner: "ada".into()
                })
            );
        }
        (
            Err(ExecuteError::Conflict {
                expected, actual, ..
            }),
            Ok(executed),
        ) => {
            assert_eq!(expected, ExpectedVersion::NoStream);
            assert_eq!(actual, StreamState::At(Revision(0)));
            assert_eq!(executed.state.owner.as_deref(), Some("bob"));
        }
        other => panic!("unexpected outcome: {other:?}"),
    }
}

#[tokio::test]
async fn options_set_correlation_causation_and_extra_metadata_on_every_event() {
    let store = InMemoryStore::new();
    let repository = repository_over(&store);
    let options = ExecuteOptions::new()
        .with_correlation_id("corr-42")
        .with_causation_id("cmd-7")
        .with_metadata("tenant", "acme");
    let executed = repository
        .execute("a1", open("ada"), options)
        .await
        .unwrap();
    let stored = store
        .read_stream(&stream("a1"), ReadStreamOptions::forwards())
        .await
        .unwrap();
    assert_eq!(stored.events, executed.recorded);
    let metadata = &stored.events[0].metadata;
    assert_eq!(metadata.correlation_id(), Some("corr-42"));
    assert_eq!(metadata.causation_id(), Some("cmd-7"));
    assert_eq!(metadata.get("tenant"), Some("acme"));
    assert_eq!(metadata.schema_version(), Some(1));
    assert_eq!(stored.events[0].id.get_version_num(), 7);
}

#[tokio::test]
async fn long_streams_load_in_pages_within_read_count_max() {
    let memory = store_with_read_count_max(10);
    let store = Arc::new(InstrumentedStore::new(memory));
    let repository = Repository::<Account>::new(store.clone());
    repository
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    for amount in 1..=24 {
        repository
            .execute("a1", deposit(amount), ExecuteOptions::new())
            .await
            .unwrap();
    }
    store.reset_counters();
    let loaded = repository.load("a1").await.unwrap();
    assert_eq!(loaded.version, Some(Revision(24)));
    assert_eq!(loaded.state.balance_cents, (1..=24).sum::<u64>());
    assert_eq!(loaded.events_replayed, 25);
    assert_eq!(store.events_read(), 25);
    assert_eq!(store.stream_reads(), 3, "pages of 10, 10 and 5 events");
}

#[tokio::test]
async fn undecodable_events_name_stream_and_revision() {
    let store = InMemoryStore::new();
    let repository = repository_over(&store);
    repository
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    let bogus = EventData::json(
        "MoneyDeposited",
        &serde_json::json!({"amount_cents": "lots"}),
    )
    .unwrap();
    store
        .append(
            &stream("a1"),
            ExpectedVersion::Exact(Revision(0)),
            vec![bogus],
        )
        .await
        .unwrap();
    let error = repository.load("a1").await.unwrap_err();
    let LoadError::Decode {
        stream: failed_stream,
        revision,
        source,
    } = &error
    else {
        panic!("expected a decode error, got {error:?}");
    };
    assert_eq!(failed_stream, &stream("a1"));
    assert_eq!(*revision, Revision(1));
    assert!(matches!(source, DecodeError::MalformedData { .. }));
    assert!(
        error
            .to_string()
            .contains("revision 1 of stream account-a1"),
        "{error}"
    );

    let unknown = EventData::json("AccountFrozen", &serde_json::Value::Null).unwrap();
    store
        .append(&stream("a1"), ExpectedVersion::Any, vec![unknown])
        .await
        .unwrap();
    repository
        .execute("b1", open("bob"), ExecuteOptions::new())
        .await
        .unwrap();
    store
        .append(
            &stream("b1"),
            ExpectedVersion::Any,
            vec![EventData::json("AccountFrozen", &serde_json::Value::Null).unwrap()],
        )
        .await
        .unwrap();
    assert!(matches!(
        repository
            .execute("b1", deposit(1), ExecuteOptions::new())
            .await,
        Err(ExecuteError::Load(LoadError::Decode {
            revision: Revision(1),
            source: DecodeError::UnknownEventType { .. },
            ..
        }))
    ));
}

#[tokio::test]
async fn tombstoned_streams_fail_to_load() {
    let store = InMemoryStore::new();
    let repository = repository_over(&store);
    repository
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    store
        .delete_stream(&stream("a1"), ExpectedVersion::Any, DeleteMode::Tombstone)
        .await
        .unwrap();
    assert!(matches!(
        repository.load("a1").await,
        Err(LoadError::Read { .. })
    ));
}

#[tokio::test]
async fn a_soft_deleted_stream_starts_over_and_keeps_its_revisions() {
    let store = InMemoryStore::new();
    let repository = repository_over(&store);
    repository
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    store
        .delete_stream(&stream("a1"), ExpectedVersion::Any, DeleteMode::Soft)
        .await
        .unwrap();
    let loaded = repository.load("a1").await.unwrap();
    assert_eq!(loaded.version, None);
    let executed = repository
        .execute("a1", open("bob"), ExecuteOptions::new())
        .await
        .unwrap();
    assert_eq!(executed.recorded[0].revision, Revision(1));
    assert_eq!(
        repository.load("a1").await.unwrap().version,
        Some(Revision(1))
    );
}

#[test]
fn execute_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let repository = repository_over(&InMemoryStore::new());
    let future = repository.execute("a1", open("ada"), ExecuteOptions::new());
    assert_send(&future);
    let load = repository.load("a1");
    assert_send(&load);
}

// --- snapshots ---

fn snapshotting_repository(
    memory: &InMemoryStore,
    every_events: u64,
) -> (Arc<InstrumentedStore>, Repository<Account>) {
    let store = Arc::new(InstrumentedStore::new(memory.clone()));
    let repository = Repository::<Account>::new(store.clone()).with_snapshots(
        Arc::new(memory.clone()),
        SnapshotPolicy::every(every_events),
    );
    (store, repository)
}

async fn snapshot_revision(memory: &InMemoryStore, id: &str) -> Option<Revision> {
    memory
        .load_snapshot(&stream(id))
        .await
        .unwrap()
        .map(|snapshot| snapshot.revision)
}

#[tokio::test]
async fn snapshots_are_taken_every_n_events() {
    let memory = InMemoryStore::new();
    let (_, repository) = snapshotting_repository(&memory, 5);
    repository
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    for amount in 1..=3 {
        repository
            .execute("a1", deposit(amount), ExecuteOptions::new())
            .await
            .unwrap();
    }
    assert_eq!(
        snapshot_revision(&memory, "a1").await,
        None,
        "4 events so far"
    );
    repository
        .execute("a1", deposit(4), ExecuteOptions::new())
        .await
        .unwrap();
    assert_eq!(snapshot_revision(&memory, "a1").await, Some(Revision(4)));
    for amount in 5..=8 {
        repository
            .execute("a1", deposit(amount), ExecuteOptions::new())
            .await
            .unwrap();
    }
    assert_eq!(snapshot_revision(&memory, "a1").await, Some(Revision(4)));
    repository
        .execute("a1", deposit(9), ExecuteOptions::new())
        .await
        .unwrap();
    assert_eq!(snapshot_revision(&memory, "a1").await, Some(Revision(9)));

    let stored = memory.load_snapshot(&stream("a1")).await.unwrap().unwrap();
    assert_eq!(stored.state_version, 1);
    let state: Account = serde_json::from_slice(&stored.state).unwrap();
    assert_eq!(state.balance_cents, (1..=9).sum::<u64>());
}

#[tokio::test]
async fn loads_start_from_the_snapshot_and_read_only_the_tail() {
    let memory = InMemoryStore::new();
    let (store, repository) = snapshotting_repository(&memory, 5);
    repository
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    for amount in 1..=6 {
        repository
            .execute("a1", deposit(amount), ExecuteOptions::new())
            .await
            .unwrap();
    }
    assert_eq!(snapshot_revision(&memory, "a1").await, Some(Revision(4)));

    store.reset_counters();
    let loaded = repository.load("a1").await.unwrap();
    assert_eq!(loaded.snapshot_revision, Some(Revision(4)));
    assert_eq!(loaded.events_replayed, 2);
    assert_eq!(store.events_read(), 2, "only revisions 5 and 6 are read");
    assert_eq!(loaded.version, Some(Revision(6)));
    let full_replay = repository_over(&memory).load("a1").await.unwrap();
    assert_eq!(loaded.state, full_replay.state);

    // The state really comes from the snapshot: a doctored one shows through.
    let doctored = Account {
        owner: Some("ada".into()),
        balance_cents: 1_000_000,
    };
    memory
        .save_snapshot(
            &stream("a1"),
            Snapshot {
                revision: Revision(4),
                state_version: 1,
                state: serde_json::to_vec(&doctored).unwrap().into(),
                taken_at: Timestamp::now(),
            },
        )
        .await
        .unwrap();
    let loaded = repository.load("a1").await.unwrap();
    assert_eq!(loaded.state.balance_cents, 1_000_000 + 5 + 6);
}

async fn plant_snapshot(memory: &InMemoryStore, state_version: u32, state: Vec<u8>) {
    // Remove the real one first: a save never replaces a snapshot of a higher revision.
    memory.delete_snapshot(&stream("a1")).await.unwrap();
    memory
        .save_snapshot(
            &stream("a1"),
            Snapshot {
                revision: Revision(2),
                state_version,
                state: state.into(),
                taken_at: Timestamp::now(),
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn snapshots_of_another_state_version_or_undecodable_ones_are_ignored() {
    let memory = InMemoryStore::new();
    let (store, repository) = snapshotting_repository(&memory, 100);
    repository
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    for amount in 1..=3 {
        repository
            .execute("a1", deposit(amount), ExecuteOptions::new())
            .await
            .unwrap();
    }
    let doctored = serde_json::to_vec(&Account {
        owner: Some("mallory".into()),
        balance_cents: 999,
    })
    .unwrap();

    for (state_version, state) in [(2, doctored.clone()), (1, b"{not json".to_vec())] {
        plant_snapshot(&memory, state_version, state).await;
        store.reset_counters();
        let loaded = repository.load("a1").await.unwrap();
        assert_eq!(loaded.snapshot_revision, None);
        assert_eq!(loaded.events_replayed, 4);
        assert_eq!(store.events_read(), 4);
        assert_eq!(loaded.state.owner.as_deref(), Some("ada"));
        assert_eq!(loaded.state.balance_cents, 6);
    }

    // The next command replaces the unusable snapshot, as 5 events are past the last usable one.
    let snapshotting_every_5 = Repository::<Account>::new(store.clone())
        .with_snapshots(Arc::new(memory.clone()), SnapshotPolicy::every(5));
    snapshotting_every_5
        .execute("a1", deposit(4), ExecuteOptions::new())
        .await
        .unwrap();
    let replaced = memory.load_snapshot(&stream("a1")).await.unwrap().unwrap();
    assert_eq!(
        (replaced.revision, replaced.state_version),
        (Revision(4), 1)
    );
}

/// A snapshot store that fails every call.
struct BrokenSnapshotStore;

#[async_trait]
impl SnapshotStore for BrokenSnapshotStore {
    async fn save_snapshot(&self, _: &StreamId, _: Snapshot) -> Result<bool, SnapshotError> {
        Err(StorageError::Closed.into())
    }
    async fn load_snapshot(&self, _: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        Err(StorageError::Closed.into())
    }
    async fn delete_snapshot(&self, _: &StreamId) -> Result<(), SnapshotError> {
        Err(StorageError::Closed.into())
    }
}

#[tokio::test]
async fn a_failing_snapshot_store_never_fails_a_command() {
    let memory = InMemoryStore::new();
    let repository = repository_over(&memory)
        .with_snapshots(Arc::new(BrokenSnapshotStore), SnapshotPolicy::every(1));
    repository
        .execute("a1", open("ada"), ExecuteOptions::new())
        .await
        .unwrap();
    let executed = repository
        .execute("a1", deposit(3), ExecuteOptions::new())
        .await
        .unwrap();
    assert_eq!(executed.state.balance_cents, 3);
    let loaded = repository.load("a1").await.unwrap();
    assert_eq!(loaded.events_replayed, 2);
}

#[tokio::test]
async fn time_travel_loads_an_aggregate_as_of_a_revision_or_a_time() {
    use factline_domain::AsOf;

    let store = InMemoryStore::new();
    let accounts = repository_over(&store);
    // Apart in time, so that each event has its own recorded time (microseconds).
    for command in [open("ada"), deposit(100), deposit(50)] {
        accounts
            .execute("tt", command, ExecuteOptions::new())
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let stream = stream_id_for::<Account>("tt").unwrap();
    let recorded = store
        .read_stream(&stream, ReadStreamOptions::forwards())
        .await
        .unwrap()
        .events;

    let at_one = accounts
        .load_as_of("tt", AsOf::Revision(Revision(1)))
        .await
        .unwrap();
    assert_eq!(at_one.state.balance_cents, 100);
    assert_eq!(at_one.version, Some(Revision(1)));
    assert_eq!(at_one.events_replayed, 2);
    let at_first = accounts
        .load_as_of("tt", AsOf::Revision(Revision(0)))
        .await
        .unwrap();
    assert_eq!(at_first.state.balance_cents, 0);
    assert_eq!(at_first.version, Some(Revision(0)));
    let beyond = accounts
        .load_as_of("tt", AsOf::Revision(Revision(99)))
        .await
        .unwrap();
    assert_eq!(beyond.state.balance_cents, 150);

    // By recorded time: inclusive of an event recorded exactly then.
    let when = recorded[1].recorded_at;
    let at_time = accounts.load_as_of("tt", AsOf::Time(when)).await.unwrap();
    assert_eq!(at_time.version, Some(Revision(1)));
    assert_eq!(at_time.state.balance_cents, 100);
    let before = Timestamp::from_unix_micros(recorded[0].recorded_at.as_unix_micros() - 1);
    let nothing = accounts.load_as_of("tt", AsOf::Time(before)).await.unwrap();
    assert_eq!(nothing.version, None);
    assert_eq!(nothing.state.balance_cents, 0);
    // The present is untouched.
    assert_eq!(accounts.load("tt").await.unwrap().state.balance_cents, 150);
}
