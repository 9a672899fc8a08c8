//! The conformance cases, one per contract rule. Each takes a fresh, empty store.

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use uuid::Uuid;

use super::{
    TestStore, all_events, assert_quiet, event, events, next_event, stream, stream_events,
};
use crate::{
    AppendError, AppendRequest, ContentType, DeleteError, DeleteMode, EventData, EventFilter,
    EventsRejected, ExpectedVersion, InvalidEvent, Limit, Metadata, MetadataError, Position,
    ReadAllError, ReadAllOptions, ReadStreamError, ReadStreamOptions, Revision, Snapshot,
    SnapshotError, StreamMetadata, StreamState, SubscribeError, SubscribeFrom, SubscriptionError,
    Timestamp,
};

pub use super::persistent::*;

use ExpectedVersion::{Any, Exact, NoStream, StreamExists};

fn ids(events: &[EventData]) -> Vec<Uuid> {
    events.iter().map(|e| e.id).collect()
}

fn assert_wrong_version(
    result: Result<impl std::fmt::Debug, AppendError>,
    expected: ExpectedVersion,
    actual: StreamState,
) {
    match result {
        Err(AppendError::WrongExpectedVersion {
            expected: e,
            actual: a,
            ..
        }) => {
            assert_eq!(e, expected, "error carries the expected version");
            assert_eq!(a, actual, "error carries the actual version");
        }
        other => panic!("expected WrongExpectedVersion({expected} vs {actual}), got {other:?}"),
    }
}

fn assert_limit(result: Result<impl std::fmt::Debug, AppendError>, limit: Limit) {
    match result {
        Err(AppendError::Rejected(EventsRejected::LimitExceeded(error))) => {
            assert_eq!(error.limit, limit);
            assert!(error.actual > error.max);
            let text = error.to_string();
            assert!(
                text.contains(limit.name()),
                "message names the limit: {text}"
            );
        }
        other => panic!("expected {limit} to be exceeded, got {other:?}"),
    }
}

async fn head<S: TestStore>(store: &S) -> Option<Position> {
    store.head_position().await.unwrap()
}

pub async fn append_returns_last_revision_and_position<S: TestStore>(store: S) {
    let s = stream("order-1");
    assert_eq!(head(&store).await, None);
    let r = store.append(&s, NoStream, events(3)).await.unwrap();
    assert_eq!(r.next_expected_version, Revision(2));
    assert_eq!(r.position, Position(2));
    assert_eq!(head(&store).await, Some(Position(2)));
    let r = store
        .append(&s, Exact(Revision(2)), events(1))
        .await
        .unwrap();
    assert_eq!(r.next_expected_version, Revision(3));
    assert_eq!(r.position, Position(3));
    let other = store
        .append(&stream("order-2"), Any, events(2))
        .await
        .unwrap();
    assert_eq!(other.next_expected_version, Revision(1));
    assert_eq!(other.position, Position(5));
}

pub async fn revisions_and_positions_are_gapless<S: TestStore>(store: S) {
    let names = ["a-1", "b-1", "c-1"];
    let mut expected_stream_len = HashMap::new();
    let mut batches = Vec::new();
    for round in 0..12usize {
        let name = names[round % 3];
        let batch = events(1 + round % 4);
        let r = store
            .append(&stream(name), Any, batch.clone())
            .await
            .unwrap();
        let len = expected_stream_len.entry(name).or_insert(0u64);
        *len += batch.len() as u64;
        assert_eq!(r.next_expected_version, Revision(*len - 1));
        batches.push((r, ids(&batch)));
    }
    let all = all_events(&store).await;
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.position, Position(i as u64), "positions are gapless");
    }
    for pair in all.windows(2) {
        assert!(
            pair[0].recorded_at <= pair[1].recorded_at,
            "recorded_at never goes back"
        );
    }
    // One stream's events in one append occupy contiguous positions ending at `position`.
    for (result, batch_ids) in &batches {
        let end = result.position.0 as usize;
        let start = end + 1 - batch_ids.len();
        let got: Vec<Uuid> = all[start..=end].iter().map(|e| e.id).collect();
        assert_eq!(&got, batch_ids);
    }
    for name in names {
        let events = stream_events(&store, &stream(name)).await.unwrap();
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.revision, Revision(i as u64), "revisions are gapless");
            assert_eq!(e.stream.as_str(), name);
        }
        assert_eq!(events.len() as u64, expected_stream_len[name]);
    }
}

pub async fn recorded_events_keep_every_field<S: TestStore>(store: S) {
    let s = stream("order-fields");
    let id = Uuid::now_v7();
    let binary = EventData::binary("BytesStored", Bytes::from_static(&[0, 159, 146, 150, 255]))
        .with_id(id)
        .with_metadata(Metadata::CORRELATION_ID, "corr-1")
        .with_metadata(Metadata::CAUSATION_ID, "cause-1")
        .with_metadata("tenant", "ünïcødé ✓");
    let json = EventData::json(
        "OrderPlaced",
        &serde_json::json!({"total": 12.5, "lines": [1, 2]}),
    )
    .unwrap()
    .with_metadata(Metadata::SCHEMA_VERSION, "3");
    let before = Timestamp::now().saturating_sub(Duration::from_secs(2));
    store
        .append(&s, NoStream, vec![binary.clone(), json.clone()])
        .await
        .unwrap();
    let after = Timestamp::from_unix_micros(Timestamp::now().as_unix_micros() + 2_000_000);
    let stored = stream_events(&store, &s).await.unwrap();
    assert_eq!(stored.len(), 2);
    for (got, sent) in stored.iter().zip([&binary, &json]) {
        assert_eq!(got.to_event_data(), *sent);
        assert_eq!(got.stream, s);
        assert!(
            got.recorded_at >= before && got.recorded_at <= after,
            "recorded_at is now"
        );
    }
    assert_eq!(stored[0].content_type, ContentType::Binary);
    assert_eq!(stored[1].content_type, ContentType::Json);
    assert_eq!(stored[1].metadata.schema_version(), Some(3));
    assert_eq!(
        all_events(&store).await,
        stored,
        "$all returns the same events"
    );
}

pub async fn expected_no_stream<S: TestStore>(store: S) {
    let s = stream("order-ns");
    store.append(&s, NoStream, events(1)).await.unwrap();
    assert_wrong_version(
        store.append(&s, NoStream, events(1)).await,
        NoStream,
        StreamState::At(Revision(0)),
    );
    assert_eq!(head(&store).await, Some(Position(0)), "nothing written");
}

pub async fn expected_stream_exists<S: TestStore>(store: S) {
    let s = stream("order-se");
    assert_wrong_version(
        store.append(&s, StreamExists, events(1)).await,
        StreamExists,
        StreamState::NoStream,
    );
    assert_eq!(head(&store).await, None, "nothing written");
    store.append(&s, Any, events(1)).await.unwrap();
    let r = store.append(&s, StreamExists, events(1)).await.unwrap();
    assert_eq!(r.next_expected_version, Revision(1));
}

pub async fn expected_exact<S: TestStore>(store: S) {
    let s = stream("order-ex");
    assert_wrong_version(
        store.append(&s, Exact(Revision(0)), events(1)).await,
        Exact(Revision(0)),
        StreamState::NoStream,
    );
    store.append(&s, NoStream, events(2)).await.unwrap();
    for stale in [0, 2, 7] {
        assert_wrong_version(
            store.append(&s, Exact(Revision(stale)), events(1)).await,
            Exact(Revision(stale)),
            StreamState::At(Revision(1)),
        );
    }
    assert_eq!(head(&store).await, Some(Position(1)), "nothing written");
    let r = store
        .append(&s, Exact(Revision(1)), events(1))
        .await
        .unwrap();
    assert_eq!(r.next_expected_version, Revision(2));
}

pub async fn expected_any<S: TestStore>(store: S) {
    let s = stream("order-any");
    store.append(&s, Any, events(1)).await.unwrap();
    let r = store.append(&s, Any, events(1)).await.unwrap();
    assert_eq!(r.next_expected_version, Revision(1));
}

pub async fn empty_append_is_rejected<S: TestStore>(store: S) {
    let result = store.append(&stream("order-empty"), Any, vec![]).await;
    assert!(
        matches!(result, Err(AppendError::Rejected(EventsRejected::Empty))),
        "{result:?}"
    );
    assert_eq!(head(&store).await, None);
}

pub async fn duplicate_ids_in_one_append_are_rejected<S: TestStore>(store: S) {
    let e = event("Happened");
    let result = store
        .append(
            &stream("order-dup"),
            Any,
            vec![e.clone(), event("Other"), e],
        )
        .await;
    assert!(
        matches!(
            result,
            Err(AppendError::Rejected(EventsRejected::Invalid(
                InvalidEvent::DuplicateId { index: 2, .. }
            )))
        ),
        "{result:?}"
    );
    assert_eq!(head(&store).await, None);
}

pub async fn idempotent_retry_returns_the_original_result<S: TestStore>(store: S) {
    for (i, expected) in [NoStream, Any, StreamExists, Exact(Revision(0))]
        .into_iter()
        .enumerate()
    {
        let s = stream(&format!("order-retry{i}"));
        if matches!(expected, StreamExists | Exact(_)) {
            store.append(&s, NoStream, events(1)).await.unwrap();
        }
        let batch = events(3);
        let first = store.append(&s, expected, batch.clone()).await.unwrap();
        let head_before = head(&store).await;
        let again = store.append(&s, expected, batch.clone()).await.unwrap();
        assert_eq!(
            again, first,
            "a retry with {expected} answers the original result"
        );
        // Still a retry after the stream moved on.
        store.append(&s, Any, events(1)).await.unwrap();
        let later = store.append(&s, expected, batch.clone()).await.unwrap();
        assert_eq!(
            later, first,
            "a late retry with {expected} answers the original result"
        );
        let stored = stream_events(&store, &s).await.unwrap();
        let count = stored
            .iter()
            .filter(|e| batch.iter().any(|b| b.id == e.id))
            .count();
        assert_eq!(count, 3, "nothing written twice");
        assert_eq!(
            head(&store).await.map(|p| p.0),
            head_before.map(|p| p.0 + 1)
        );
    }
}

pub async fn partial_overlap_is_a_conflict<S: TestStore>(store: S) {
    let s = stream("order-overlap");
    let batch = events(2);
    store.append(&s, NoStream, batch.clone()).await.unwrap();
    let (a, b) = (batch[0].clone(), batch[1].clone());
    let attempts: Vec<(ExpectedVersion, Vec<EventData>)> = vec![
        (NoStream, vec![a.clone(), b.clone(), event("New")]), // longer than the original
        (NoStream, vec![b.clone(), a.clone()]),               // stored, but out of order
        (Any, vec![a.clone(), event("New")]),                 // second id differs
        (Any, vec![event("New"), a.clone()]),                 // known id not first
        (Exact(Revision(0)), vec![b.clone(), event("New")]),  // runs past the end
        (Exact(Revision(5)), vec![a.clone(), b.clone()]),     // right ids, wrong place
    ];
    for (expected, attempt) in attempts {
        let result = store.append(&s, expected, attempt).await;
        assert!(
            matches!(result, Err(AppendError::IdempotencyConflict { .. })),
            "partial overlap with {expected} must conflict, got {result:?}"
        );
    }
    assert_eq!(
        stream_events(&store, &s).await.unwrap().len(),
        2,
        "nothing written"
    );
    assert_eq!(head(&store).await, Some(Position(1)));
    // A request whose events are all stored, contiguous and in order is a retry even when it
    // is a part of the original append: it writes nothing and answers the stored result.
    let part = store.append(&s, Any, vec![a.clone()]).await.unwrap();
    assert_eq!(part.next_expected_version, Revision(0));
    assert_eq!(part.position, Position(0));
}

pub async fn concurrent_exact_appends_have_one_winner_per_revision<S: TestStore>(store: S) {
    const TASKS: usize = 16;
    const ROUNDS: u64 = 20;
    let store = Arc::new(store);
    let s = stream("order-race");
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let (store, s, barrier) = (store.clone(), s.clone(), barrier.clone());
        handles.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            for round in 0..ROUNDS {
                barrier.wait().await;
                let expected = if round == 0 {
                    NoStream
                } else {
                    Exact(Revision(round - 1))
                };
                let e = event("RaceWon");
                match store.append(&s, expected, vec![e.clone()]).await {
                    Ok(r) => {
                        assert_eq!(r.next_expected_version, Revision(round));
                        wins.push((round, e.id));
                    }
                    Err(AppendError::WrongExpectedVersion { actual, .. }) => {
                        assert_eq!(
                            actual,
                            StreamState::At(Revision(round)),
                            "loser sees winner"
                        );
                    }
                    Err(other) => panic!("unexpected error: {other}"),
                }
                barrier.wait().await;
            }
            wins
        }));
    }
    let mut winners: Vec<(u64, Uuid)> = Vec::new();
    for handle in handles {
        winners.extend(handle.await.unwrap());
    }
    winners.sort();
    let rounds: Vec<u64> = winners.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        rounds,
        (0..ROUNDS).collect::<Vec<_>>(),
        "exactly one winner per revision"
    );
    let stored: Vec<Uuid> = stream_events(&store, &s)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let won: Vec<Uuid> = winners.iter().map(|(_, id)| *id).collect();
    assert_eq!(
        stored, won,
        "the stream holds exactly the winners, in order"
    );
}

pub async fn concurrent_appends_to_many_streams_stay_gapless<S: TestStore>(store: S) {
    const TASKS: usize = 8;
    const APPENDS: usize = 40;
    let store = Arc::new(store);
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let s = stream(&format!("load-{task}"));
            let mut positions = Vec::new();
            for i in 0..APPENDS {
                let r = store.append(&s, Any, events(1 + i % 3)).await.unwrap();
                positions.push(r.position);
            }
            positions
        }));
    }
    let mut result_positions = Vec::new();
    for handle in handles {
        let positions = handle.await.unwrap();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "per writer increasing"
        );
        result_positions.extend(positions);
    }
    let all = all_events(&store).await;
    let total: usize = (0..APPENDS).map(|i| 1 + i % 3).sum::<usize>() * TASKS;
    assert_eq!(all.len(), total);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.position, Position(i as u64), "gapless under concurrency");
    }
    let mut next_revision: HashMap<String, u64> = HashMap::new();
    for e in &all {
        let next = next_revision.entry(e.stream.to_string()).or_default();
        assert_eq!(
            e.revision,
            Revision(*next),
            "stream order matches $all order"
        );
        *next += 1;
    }
    result_positions.sort();
    result_positions.dedup();
    assert_eq!(
        result_positions.len(),
        TASKS * APPENDS,
        "every append got its own position"
    );
}

pub async fn append_multi_writes_every_stream<S: TestStore>(store: S) {
    let (a, b, c) = (stream("multi-a"), stream("multi-b"), stream("multi-c"));
    store.append(&b, NoStream, events(2)).await.unwrap();
    let requests = vec![
        AppendRequest::new(a.clone(), NoStream, events(2)),
        AppendRequest::new(b.clone(), Exact(Revision(1)), events(1)),
        AppendRequest::new(c.clone(), Any, events(3)),
    ];
    let results = store.append_multi(requests.clone()).await.unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0].next_expected_version, Revision(1));
    assert_eq!(results[1].next_expected_version, Revision(2));
    assert_eq!(results[2].next_expected_version, Revision(2));
    let all = all_events(&store).await;
    assert_eq!(all.len(), 8);
    for (request, result) in requests.iter().zip(&results) {
        let end = result.position.0 as usize;
        let start = end + 1 - request.events.len();
        let got: Vec<Uuid> = all[start..=end].iter().map(|e| e.id).collect();
        assert_eq!(
            got,
            ids(&request.events),
            "each stream's part is contiguous"
        );
        assert!(all[start..=end].iter().all(|e| e.stream == request.stream));
    }
}

pub async fn append_multi_writes_nothing_when_one_check_fails<S: TestStore>(store: S) {
    let (a, b) = (stream("atomic-a"), stream("atomic-b"));
    store.append(&b, NoStream, events(1)).await.unwrap();
    let result = store
        .append_multi(vec![
            AppendRequest::new(a.clone(), NoStream, events(2)),
            AppendRequest::new(b.clone(), NoStream, events(1)),
        ])
        .await;
    match result {
        Err(AppendError::WrongExpectedVersion { stream, actual, .. }) => {
            assert_eq!(stream, b, "the error names the failing stream");
            assert_eq!(actual, StreamState::At(Revision(0)));
        }
        other => panic!("expected WrongExpectedVersion, got {other:?}"),
    }
    assert!(matches!(
        store.read_stream(&a, ReadStreamOptions::forwards()).await,
        Err(ReadStreamError::NotFound { .. })
    ));
    assert_eq!(head(&store).await, Some(Position(0)), "nothing written");
}

pub async fn append_multi_rejects_a_stream_twice<S: TestStore>(store: S) {
    let a = stream("twice-a");
    let result = store
        .append_multi(vec![
            AppendRequest::new(a.clone(), Any, events(1)),
            AppendRequest::new(a.clone(), Any, events(1)),
        ])
        .await;
    assert!(
        matches!(result, Err(AppendError::DuplicateStream { .. })),
        "{result:?}"
    );
    assert_eq!(head(&store).await, None);
}

pub async fn append_multi_retry_is_idempotent<S: TestStore>(store: S) {
    let (a, b) = (stream("mretry-a"), stream("mretry-b"));
    let requests = vec![
        AppendRequest::new(a.clone(), NoStream, events(2)),
        AppendRequest::new(b.clone(), NoStream, events(1)),
    ];
    let first = store.append_multi(requests.clone()).await.unwrap();
    let again = store.append_multi(requests.clone()).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(all_events(&store).await.len(), 3);
    // One part repeated, one part new: not a retry.
    let mixed = vec![
        requests[0].clone(),
        AppendRequest::new(stream("mretry-c"), NoStream, events(1)),
    ];
    let result = store.append_multi(mixed).await;
    assert!(
        matches!(result, Err(AppendError::IdempotencyConflict { .. })),
        "{result:?}"
    );
    assert_eq!(all_events(&store).await.len(), 3, "nothing written");
}

pub async fn oversized_event_is_refused_naming_the_limit<S: TestStore>(store: S) {
    let max = store.limits().event_size_bytes_max;
    let s = stream("order-big");
    let big = EventData::binary("Big", vec![7u8; max + 1 - "Big".len()]);
    let result = store.append(&s, Any, vec![event("Small"), big]).await;
    assert_limit(result, Limit::EventSizeBytes);
    assert_eq!(head(&store).await, None, "nothing of the request written");
    let exactly = EventData::binary("Big", vec![7u8; max - "Big".len()]);
    store.append(&s, Any, vec![exactly]).await.unwrap();
    let stored = stream_events(&store, &s).await.unwrap();
    assert_eq!(
        stored[0].data.len(),
        max - 3,
        "an event at the limit is kept whole"
    );
}

pub async fn too_many_events_are_refused_naming_the_limit<S: TestStore>(store: S) {
    let max = store.limits().events_per_append_max;
    let batch: Vec<EventData> = (0..=max).map(|_| EventData::binary("E", vec![])).collect();
    assert_limit(
        store.append(&stream("order-many"), Any, batch).await,
        Limit::EventsPerAppend,
    );
    assert_eq!(head(&store).await, None);
}

pub async fn invalid_event_types_are_refused<S: TestStore>(store: S) {
    let s = stream("order-types");
    let empty = store
        .append(&s, Any, vec![EventData::binary("", vec![])])
        .await;
    assert!(
        matches!(
            empty,
            Err(AppendError::Rejected(EventsRejected::Invalid(
                InvalidEvent::EmptyType { .. }
            )))
        ),
        "{empty:?}"
    );
    let control = store
        .append(&s, Any, vec![EventData::binary("Bad\u{7}Type", vec![])])
        .await;
    assert!(
        matches!(
            control,
            Err(AppendError::Rejected(EventsRejected::Invalid(
                InvalidEvent::ControlCharacterInType { .. }
            )))
        ),
        "{control:?}"
    );
    let long = "T".repeat(store.limits().event_type_bytes_max + 1);
    assert_limit(
        store
            .append(&s, Any, vec![EventData::binary(long, vec![])])
            .await,
        Limit::EventTypeBytes,
    );
    assert_eq!(head(&store).await, None);
}

pub async fn reading_a_missing_stream_is_not_found<S: TestStore>(store: S) {
    for options in [
        ReadStreamOptions::forwards(),
        ReadStreamOptions::backwards(),
    ] {
        let result = store.read_stream(&stream("nobody-1"), options).await;
        assert!(
            matches!(result, Err(ReadStreamError::NotFound { .. })),
            "{result:?}"
        );
    }
    let slice = store.read_all(ReadAllOptions::forwards()).await.unwrap();
    assert!(slice.events.is_empty() && slice.is_end);
    let slice = store.read_all(ReadAllOptions::backwards()).await.unwrap();
    assert!(slice.events.is_empty() && slice.is_end);
    // Metadata alone does not make a stream exist.
    let s = stream("nobody-2");
    store
        .set_stream_metadata(
            &s,
            StreamMetadata {
                max_count: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let result = store.read_stream(&s, ReadStreamOptions::forwards()).await;
    assert!(
        matches!(result, Err(ReadStreamError::NotFound { .. })),
        "{result:?}"
    );
    store.append(&s, NoStream, events(1)).await.unwrap();
}

fn revisions(events: &[crate::RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.revision.0).collect()
}

pub async fn read_stream_forwards_pages<S: TestStore>(store: S) {
    let s = stream("page-f");
    store.append(&s, NoStream, events(10)).await.unwrap();
    let mut options = ReadStreamOptions::forwards().limit(3);
    let mut pages = Vec::new();
    loop {
        let slice = store.read_stream(&s, options).await.unwrap();
        assert_eq!(slice.last_revision, Revision(9));
        pages.push(revisions(&slice.events));
        if slice.is_end {
            assert_eq!(slice.next_revision, Revision(10));
            break;
        }
        options = options.from(slice.next_revision);
    }
    assert_eq!(
        pages,
        vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![9]]
    );
    let tail = store
        .read_stream(
            &s,
            ReadStreamOptions::forwards().from(Revision(7)).limit(100),
        )
        .await
        .unwrap();
    assert_eq!(revisions(&tail.events), vec![7, 8, 9]);
    assert!(tail.is_end);
    let past = store
        .read_stream(&s, ReadStreamOptions::forwards().from(Revision(20)))
        .await
        .unwrap();
    assert!(past.events.is_empty() && past.is_end);
}

pub async fn read_stream_backwards_pages<S: TestStore>(store: S) {
    let s = stream("page-b");
    store.append(&s, NoStream, events(10)).await.unwrap();
    let mut options = ReadStreamOptions::backwards().limit(4);
    let mut pages = Vec::new();
    loop {
        let slice = store.read_stream(&s, options).await.unwrap();
        pages.push(revisions(&slice.events));
        if slice.is_end {
            break;
        }
        options = options.from(slice.next_revision);
    }
    assert_eq!(pages, vec![vec![9, 8, 7, 6], vec![5, 4, 3, 2], vec![1, 0]]);
    let slice = store
        .read_stream(
            &s,
            ReadStreamOptions::backwards().from(Revision(2)).limit(5),
        )
        .await
        .unwrap();
    assert_eq!(revisions(&slice.events), vec![2, 1, 0]);
    assert!(slice.is_end);
    let slice = store
        .read_stream(
            &s,
            ReadStreamOptions::backwards().from(Revision(50)).limit(2),
        )
        .await
        .unwrap();
    assert_eq!(
        revisions(&slice.events),
        vec![9, 8],
        "from past the end starts at the end"
    );
}

pub async fn read_count_limit_is_enforced<S: TestStore>(store: S) {
    let s = stream("order-limit");
    store.append(&s, NoStream, events(1)).await.unwrap();
    let too_many = store.limits().read_count_max + 1;
    let result = store
        .read_stream(&s, ReadStreamOptions::forwards().limit(too_many))
        .await;
    match result {
        Err(ReadStreamError::LimitExceeded(e)) => assert_eq!(e.limit, Limit::ReadCount),
        other => panic!("expected read_count_max to be exceeded, got {other:?}"),
    }
    let result = store
        .read_all(ReadAllOptions::forwards().limit(too_many))
        .await;
    match result {
        Err(ReadAllError::LimitExceeded(e)) => assert_eq!(e.limit, Limit::ReadCount),
        other => panic!("expected read_count_max to be exceeded, got {other:?}"),
    }
}

fn positions(events: &[crate::RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.position.0).collect()
}

pub async fn read_all_pages_both_ways<S: TestStore>(store: S) {
    for i in 0..5 {
        store.append(&stream("x-1"), Any, events(1)).await.unwrap();
        store
            .append(&stream(&format!("y-{i}")), Any, events(1))
            .await
            .unwrap();
    }
    let mut forwards = Vec::new();
    let mut options = ReadAllOptions::forwards().limit(4);
    loop {
        let slice = store.read_all(options.clone()).await.unwrap();
        forwards.push(positions(&slice.events));
        if slice.is_end {
            assert_eq!(
                slice.next_position,
                Position(10),
                "forwards end: next commit's position"
            );
            break;
        }
        options = options.from(slice.next_position);
    }
    assert_eq!(
        forwards,
        vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]
    );
    let mut backwards = Vec::new();
    let mut options = ReadAllOptions::backwards().limit(4);
    loop {
        let slice = store.read_all(options.clone()).await.unwrap();
        backwards.push(positions(&slice.events));
        if slice.is_end {
            break;
        }
        options = options.from(slice.next_position);
    }
    assert_eq!(
        backwards,
        vec![vec![9, 8, 7, 6], vec![5, 4, 3, 2], vec![1, 0]]
    );
    let from_middle = store
        .read_all(ReadAllOptions::forwards().from(Position(7)))
        .await
        .unwrap();
    assert_eq!(positions(&from_middle.events), vec![7, 8, 9]);
}

async fn filtered<S: TestStore>(
    store: &S,
    filter: EventFilter,
    direction: crate::Direction,
) -> Vec<(String, String)> {
    let mut options = ReadAllOptions {
        direction,
        from: None,
        limit: 2,
        filter,
    };
    let mut out = Vec::new();
    loop {
        let slice = store.read_all(options.clone()).await.unwrap();
        assert!(slice.events.len() <= 2);
        out.extend(
            slice
                .events
                .into_iter()
                .map(|e| (e.stream.to_string(), e.event_type.into())),
        );
        if slice.is_end {
            return out;
        }
        options = options.from(slice.next_position);
    }
}

pub async fn read_all_filters_by_prefix_category_and_type<S: TestStore>(store: S) {
    let writes = [
        ("customer-1", "CustomerRegistered"),
        ("order-1", "OrderPlaced"),
        ("orderline-1", "OrderLineAdded"),
        ("order-2", "OrderPlaced"),
        ("customer-1", "CustomerMoved"),
        ("order-1", "OrderShipped"),
        ("order", "OrderAudited"),
    ];
    for (s, t) in writes {
        store.append(&stream(s), Any, vec![event(t)]).await.unwrap();
    }
    let pick = |f: &dyn Fn(&str, &str) -> bool| -> Vec<(String, String)> {
        writes
            .iter()
            .filter(|(s, t)| f(s, t))
            .map(|(s, t)| ((*s).to_owned(), (*t).to_owned()))
            .collect()
    };
    let cases: Vec<(EventFilter, Vec<(String, String)>)> = vec![
        (
            EventFilter::all().category("order"),
            pick(&|s, _| s == "order" || s.starts_with("order-")),
        ),
        (
            EventFilter::all().stream_prefix("order"),
            pick(&|s, _| s.starts_with("order")),
        ),
        (
            EventFilter::all().event_type_prefix("Customer"),
            pick(&|_, t| t.starts_with("Customer")),
        ),
        (
            EventFilter::all()
                .category("order")
                .event_type_prefix("OrderPlaced"),
            pick(&|s, t| s.starts_with("order-") && t == "OrderPlaced"),
        ),
        (EventFilter::all().category("nothing"), vec![]),
    ];
    for (filter, expected) in cases {
        let got = filtered(&store, filter.clone(), crate::Direction::Forwards).await;
        assert_eq!(got, expected, "forwards with {filter:?}");
        let mut reversed = expected.clone();
        reversed.reverse();
        let got = filtered(&store, filter.clone(), crate::Direction::Backwards).await;
        assert_eq!(got, reversed, "backwards with {filter:?}");
    }
}

pub async fn subscribe_to_all_catches_up_then_goes_live<S: TestStore>(store: S) {
    store
        .append(&stream("sub-1"), Any, events(5))
        .await
        .unwrap();
    let mut sub = store
        .subscribe_to_all(SubscribeFrom::Start, EventFilter::all())
        .await
        .unwrap();
    for p in 0..5 {
        assert_eq!(next_event(&mut sub).await.position, Position(p));
    }
    store
        .append(&stream("sub-2"), Any, events(3))
        .await
        .unwrap();
    for p in 5..8 {
        let e = next_event(&mut sub).await;
        assert_eq!(e.position, Position(p));
        assert_eq!(e.stream.as_str(), "sub-2");
    }
    assert_quiet(&mut sub, Duration::from_millis(100)).await;
}

pub async fn subscribe_to_all_after_a_position<S: TestStore>(store: S) {
    store
        .append(&stream("sub-1"), Any, events(5))
        .await
        .unwrap();
    let mut sub = store
        .subscribe_to_all(SubscribeFrom::After(Position(2)), EventFilter::all())
        .await
        .unwrap();
    assert_eq!(next_event(&mut sub).await.position, Position(3));
    assert_eq!(next_event(&mut sub).await.position, Position(4));
    store
        .append(&stream("sub-1"), Any, events(1))
        .await
        .unwrap();
    assert_eq!(next_event(&mut sub).await.position, Position(5));
}

pub async fn subscribe_to_all_from_end_gets_only_new_events<S: TestStore>(store: S) {
    store
        .append(&stream("sub-1"), Any, events(5))
        .await
        .unwrap();
    let mut sub = store
        .subscribe_to_all(SubscribeFrom::End, EventFilter::all())
        .await
        .unwrap();
    assert_quiet(&mut sub, Duration::from_millis(50)).await;
    store
        .append(&stream("sub-1"), Any, events(2))
        .await
        .unwrap();
    assert_eq!(next_event(&mut sub).await.position, Position(5));
    assert_eq!(next_event(&mut sub).await.position, Position(6));
}

pub async fn subscription_switch_is_seamless_under_concurrent_writes<S: TestStore>(store: S) {
    const WRITERS: usize = 4;
    const APPENDS: usize = 100;
    let store = Arc::new(store);
    store
        .append(&stream("seed-1"), Any, events(50))
        .await
        .unwrap();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..APPENDS {
                let s = stream(&format!("w{w}-{}", i % 5));
                store.append(&s, Any, events(1 + i % 3)).await.unwrap();
                if i % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    // Subscribe while the writers are busy: part of what they write is caught up, part live.
    tokio::task::yield_now().await;
    let mut from_start = store
        .subscribe_to_all(SubscribeFrom::Start, EventFilter::all())
        .await
        .unwrap();
    let mut from_middle = store
        .subscribe_to_all(SubscribeFrom::After(Position(24)), EventFilter::all())
        .await
        .unwrap();
    let total = 50 + WRITERS * (0..APPENDS).map(|i| 1 + i % 3).sum::<usize>();
    let mut seen = Vec::with_capacity(total);
    while seen.len() < total {
        let e = next_event(&mut from_start).await;
        assert_eq!(
            e.position,
            Position(seen.len() as u64),
            "no gap, duplicate or reorder"
        );
        seen.push(e);
    }
    for expected in &seen[25..] {
        let e = next_event(&mut from_middle).await;
        assert_eq!(e.position, expected.position);
        assert_eq!(e.id, expected.id);
    }
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(
        seen,
        all_events(&*store).await,
        "the subscription saw exactly $all"
    );
    assert_quiet(&mut from_start, Duration::from_millis(50)).await;
}

pub async fn subscribe_to_stream_gets_only_its_events<S: TestStore>(store: S) {
    let (mine, other) = (stream("mine-1"), stream("other-1"));
    store.append(&mine, Any, events(2)).await.unwrap();
    store.append(&other, Any, events(2)).await.unwrap();
    store.append(&mine, Any, events(1)).await.unwrap();
    let mut sub = store
        .subscribe_to_stream(&mine, SubscribeFrom::Start)
        .await
        .unwrap();
    let mut after = store
        .subscribe_to_stream(&mine, SubscribeFrom::After(Revision(1)))
        .await
        .unwrap();
    let mut end = store
        .subscribe_to_stream(&mine, SubscribeFrom::End)
        .await
        .unwrap();
    for r in 0..3 {
        let e = next_event(&mut sub).await;
        assert_eq!((e.stream.as_str(), e.revision), ("mine-1", Revision(r)));
    }
    assert_eq!(next_event(&mut after).await.revision, Revision(2));
    store.append(&other, Any, events(3)).await.unwrap();
    store.append(&mine, Any, events(1)).await.unwrap();
    assert_eq!(next_event(&mut sub).await.revision, Revision(3));
    assert_eq!(next_event(&mut after).await.revision, Revision(3));
    assert_eq!(next_event(&mut end).await.revision, Revision(3));
    assert_quiet(&mut sub, Duration::from_millis(50)).await;
}

pub async fn subscribe_to_a_stream_before_it_exists<S: TestStore>(store: S) {
    let s = stream("late-1");
    let mut sub = store
        .subscribe_to_stream(&s, SubscribeFrom::Start)
        .await
        .unwrap();
    assert_quiet(&mut sub, Duration::from_millis(50)).await;
    store
        .append(&stream("noise-1"), Any, events(2))
        .await
        .unwrap();
    store.append(&s, NoStream, events(2)).await.unwrap();
    assert_eq!(next_event(&mut sub).await.revision, Revision(0));
    assert_eq!(next_event(&mut sub).await.revision, Revision(1));
}

pub async fn subscribe_to_a_category<S: TestStore>(store: S) {
    store
        .append(&stream("order-1"), Any, events(1))
        .await
        .unwrap();
    store
        .append(&stream("customer-1"), Any, events(1))
        .await
        .unwrap();
    let mut sub = store
        .subscribe_to_all(SubscribeFrom::Start, EventFilter::all().category("order"))
        .await
        .unwrap();
    assert_eq!(next_event(&mut sub).await.stream.as_str(), "order-1");
    store
        .append(&stream("customer-2"), Any, events(3))
        .await
        .unwrap();
    store
        .append(&stream("order-2"), Any, events(1))
        .await
        .unwrap();
    let e = next_event(&mut sub).await;
    assert_eq!((e.stream.as_str(), e.position), ("order-2", Position(5)));
    assert_quiet(&mut sub, Duration::from_millis(50)).await;
}

pub async fn slow_subscriber_receives_everything<S: TestStore>(store: S) {
    let mut sub = store
        .subscribe_to_all(SubscribeFrom::Start, EventFilter::all())
        .await
        .unwrap();
    // Far more than any subscription buffer, appended before the subscriber reads anything.
    const TOTAL: u64 = 5_000;
    for i in 0..TOTAL / 100 {
        store
            .append(&stream(&format!("slow-{i}")), Any, events(100))
            .await
            .unwrap();
    }
    for p in 0..TOTAL {
        assert_eq!(next_event(&mut sub).await.position, Position(p));
    }
    assert_quiet(&mut sub, Duration::from_millis(50)).await;
}

pub async fn subscription_to_a_tombstoned_stream_ends<S: TestStore>(store: S) {
    let s = stream("doomed-1");
    store.append(&s, Any, events(1)).await.unwrap();
    let mut sub = store
        .subscribe_to_stream(&s, SubscribeFrom::Start)
        .await
        .unwrap();
    assert_eq!(next_event(&mut sub).await.revision, Revision(0));
    store
        .delete_stream(&s, Any, DeleteMode::Tombstone)
        .await
        .unwrap();
    match tokio::time::timeout(super::EVENT_TIMEOUT, sub.next()).await {
        Ok(Some(Err(SubscriptionError::Deleted { stream }))) => assert_eq!(stream, s),
        other => panic!("expected the subscription to end with Deleted, got {other:?}"),
    }
    assert!(sub.next().await.is_none(), "nothing after the error");
    let result = store.subscribe_to_stream(&s, SubscribeFrom::Start).await;
    assert!(
        matches!(result, Err(SubscribeError::Deleted { .. })),
        "{result:?}"
    );
}

pub async fn stream_metadata_round_trips<S: TestStore>(store: S) {
    let s = stream("meta-1");
    assert_eq!(
        store.stream_metadata(&s).await.unwrap(),
        StreamMetadata::default()
    );
    let metadata = StreamMetadata {
        max_count: Some(10),
        max_age: Some(Duration::from_secs(3600)),
        truncate_before: Some(Revision(0)),
    };
    store
        .set_stream_metadata(&s, metadata.clone())
        .await
        .unwrap();
    assert_eq!(store.stream_metadata(&s).await.unwrap(), metadata);
    store.append(&s, NoStream, events(1)).await.unwrap();
    assert_eq!(
        store.stream_metadata(&s).await.unwrap(),
        metadata,
        "kept across appends"
    );
    let invalid = store
        .set_stream_metadata(
            &s,
            StreamMetadata {
                max_count: Some(0),
                ..Default::default()
            },
        )
        .await;
    assert!(
        matches!(
            invalid,
            Err(MetadataError::Invalid {
                field: "max_count",
                ..
            })
        ),
        "{invalid:?}"
    );
    assert_eq!(
        store.stream_metadata(&s).await.unwrap(),
        metadata,
        "unchanged after refusal"
    );
}

pub async fn max_count_hides_older_events<S: TestStore>(store: S) {
    let s = stream("maxcount-1");
    store.append(&s, NoStream, events(5)).await.unwrap();
    store
        .set_stream_metadata(
            &s,
            StreamMetadata {
                max_count: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        revisions(&stream_events(&store, &s).await.unwrap()),
        vec![3, 4]
    );
    let back = store
        .read_stream(&s, ReadStreamOptions::backwards())
        .await
        .unwrap();
    assert_eq!(revisions(&back.events), vec![4, 3]);
    assert!(back.is_end);
    assert_eq!(all_events(&store).await.len(), 5, "$all keeps every event");
    let r = store
        .append(&s, Exact(Revision(4)), events(1))
        .await
        .unwrap();
    assert_eq!(r.next_expected_version, Revision(5), "revisions continue");
    assert_eq!(
        revisions(&stream_events(&store, &s).await.unwrap()),
        vec![4, 5]
    );
}

pub async fn truncate_before_hides_older_events<S: TestStore>(store: S) {
    let s = stream("truncate-1");
    store.append(&s, NoStream, events(5)).await.unwrap();
    store
        .set_stream_metadata(
            &s,
            StreamMetadata {
                truncate_before: Some(Revision(3)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        revisions(&stream_events(&store, &s).await.unwrap()),
        vec![3, 4]
    );
    let from_zero = store
        .read_stream(&s, ReadStreamOptions::forwards().from(Revision(0)).limit(1))
        .await
        .unwrap();
    assert_eq!(
        revisions(&from_zero.events),
        vec![3],
        "a read below the cut starts at it"
    );
    let mut sub = store
        .subscribe_to_stream(&s, SubscribeFrom::Start)
        .await
        .unwrap();
    assert_eq!(next_event(&mut sub).await.revision, Revision(3));
}

pub async fn max_age_hides_expired_events<S: TestStore>(store: S) {
    let s = stream("maxage-1");
    store.append(&s, NoStream, events(2)).await.unwrap();
    store
        .set_stream_metadata(
            &s,
            StreamMetadata {
                max_age: Some(Duration::from_secs(1)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        stream_events(&store, &s).await.unwrap().len(),
        2,
        "young events visible"
    );
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let result = store.read_stream(&s, ReadStreamOptions::forwards()).await;
    assert!(
        matches!(result, Err(ReadStreamError::NotFound { .. })),
        "{result:?}"
    );
    let r = store
        .append(&s, Exact(Revision(1)), events(1))
        .await
        .unwrap();
    assert_eq!(r.next_expected_version, Revision(2));
    assert_eq!(
        revisions(&stream_events(&store, &s).await.unwrap()),
        vec![2]
    );
}

pub async fn soft_delete_hides_events_and_the_stream_continues<S: TestStore>(store: S) {
    let s = stream("soft-1");
    store.append(&s, NoStream, events(3)).await.unwrap();
    store
        .save_snapshot(&s, snapshot(2, b"state"))
        .await
        .unwrap();
    store
        .delete_stream(&s, Exact(Revision(2)), DeleteMode::Soft)
        .await
        .unwrap();
    let result = store.read_stream(&s, ReadStreamOptions::forwards()).await;
    assert!(
        matches!(result, Err(ReadStreamError::NotFound { .. })),
        "{result:?}"
    );
    assert_eq!(
        store.stream_metadata(&s).await.unwrap().truncate_before,
        Some(Revision(3))
    );
    assert_eq!(
        store.load_snapshot(&s).await.unwrap(),
        None,
        "snapshot dropped"
    );
    assert_eq!(all_events(&store).await.len(), 3, "$all keeps the events");
    // The stream reads as absent, so NoStream holds; revisions continue.
    let r = store.append(&s, NoStream, events(1)).await.unwrap();
    assert_eq!(r.next_expected_version, Revision(3));
    assert_eq!(
        revisions(&stream_events(&store, &s).await.unwrap()),
        vec![3]
    );
    store
        .delete_stream(&s, Any, DeleteMode::Soft)
        .await
        .unwrap();
    let r = store
        .append(&s, Exact(Revision(3)), events(1))
        .await
        .unwrap();
    assert_eq!(r.next_expected_version, Revision(4));
}

pub async fn soft_delete_checks_expected_version<S: TestStore>(store: S) {
    let s = stream("soft-2");
    let missing = store.delete_stream(&s, Any, DeleteMode::Soft).await;
    assert!(
        matches!(missing, Err(DeleteError::NotFound { .. })),
        "{missing:?}"
    );
    store.append(&s, NoStream, events(3)).await.unwrap();
    let stale = store
        .delete_stream(&s, Exact(Revision(0)), DeleteMode::Soft)
        .await;
    match stale {
        Err(DeleteError::WrongExpectedVersion { actual, .. }) => {
            assert_eq!(actual, StreamState::At(Revision(2)));
        }
        other => panic!("expected WrongExpectedVersion, got {other:?}"),
    }
    assert_eq!(
        stream_events(&store, &s).await.unwrap().len(),
        3,
        "nothing deleted"
    );
}

fn snapshot(revision: u64, state: &'static [u8]) -> Snapshot {
    Snapshot {
        revision: Revision(revision),
        state_version: 1,
        state: Bytes::from_static(state),
        taken_at: Timestamp::now(),
    }
}

pub async fn tombstone_is_permanent<S: TestStore>(store: S) {
    let s = stream("tomb-1");
    store.append(&s, NoStream, events(2)).await.unwrap();
    store.save_snapshot(&s, snapshot(1, b"x")).await.unwrap();
    store
        .delete_stream(&s, Exact(Revision(1)), DeleteMode::Tombstone)
        .await
        .unwrap();
    for options in [
        ReadStreamOptions::forwards(),
        ReadStreamOptions::backwards(),
    ] {
        let result = store.read_stream(&s, options).await;
        assert!(
            matches!(result, Err(ReadStreamError::Deleted { .. })),
            "{result:?}"
        );
    }
    for expected in [Any, NoStream, StreamExists, Exact(Revision(1))] {
        let result = store.append(&s, expected, events(1)).await;
        assert!(
            matches!(result, Err(AppendError::StreamDeleted { .. })),
            "{result:?}"
        );
    }
    for mode in [DeleteMode::Soft, DeleteMode::Tombstone] {
        let result = store.delete_stream(&s, Any, mode).await;
        assert!(
            matches!(result, Err(DeleteError::Deleted { .. })),
            "{result:?}"
        );
    }
    assert!(matches!(
        store.stream_metadata(&s).await,
        Err(MetadataError::Deleted { .. })
    ));
    assert!(matches!(
        store
            .set_stream_metadata(&s, StreamMetadata::default())
            .await,
        Err(MetadataError::Deleted { .. })
    ));
    assert_eq!(
        store.load_snapshot(&s).await.unwrap(),
        None,
        "snapshot dropped"
    );
    assert!(matches!(
        store.save_snapshot(&s, snapshot(1, b"x")).await,
        Err(SnapshotError::Deleted { .. })
    ));
    let result = store
        .append_multi(vec![
            AppendRequest::new(stream("tomb-ok"), Any, events(1)),
            AppendRequest::new(s.clone(), Any, events(1)),
        ])
        .await;
    assert!(
        matches!(result, Err(AppendError::StreamDeleted { .. })),
        "{result:?}"
    );
    assert_eq!(
        all_events(&store).await.len(),
        2,
        "$all keeps the events; nothing new"
    );
}

pub async fn tombstone_of_an_unwritten_stream_blocks_it<S: TestStore>(store: S) {
    let s = stream("tomb-2");
    store
        .delete_stream(&s, NoStream, DeleteMode::Tombstone)
        .await
        .unwrap();
    let result = store.append(&s, Any, events(1)).await;
    assert!(
        matches!(result, Err(AppendError::StreamDeleted { .. })),
        "{result:?}"
    );
    let stale = store
        .delete_stream(&stream("tomb-3"), Exact(Revision(4)), DeleteMode::Tombstone)
        .await;
    assert!(
        matches!(stale, Err(DeleteError::WrongExpectedVersion { .. })),
        "{stale:?}"
    );
    store
        .append(&stream("tomb-3"), NoStream, events(1))
        .await
        .unwrap();
}

pub async fn snapshots_keep_the_newest<S: TestStore>(store: S) {
    let s = stream("snap-1");
    assert_eq!(store.load_snapshot(&s).await.unwrap(), None);
    assert!(store.save_snapshot(&s, snapshot(5, b"five")).await.unwrap());
    assert!(
        !store
            .save_snapshot(&s, snapshot(3, b"three"))
            .await
            .unwrap(),
        "older is ignored"
    );
    assert_eq!(
        store.load_snapshot(&s).await.unwrap().unwrap().state,
        &b"five"[..]
    );
    assert!(store.save_snapshot(&s, snapshot(9, b"nine")).await.unwrap());
    let loaded = store.load_snapshot(&s).await.unwrap().unwrap();
    assert_eq!(
        (loaded.revision, &loaded.state[..]),
        (Revision(9), &b"nine"[..])
    );
    assert_eq!(loaded.state_version, 1);
    store.delete_snapshot(&s).await.unwrap();
    assert_eq!(store.load_snapshot(&s).await.unwrap(), None);
    let max = store.limits().event_size_bytes_max;
    let big = Snapshot {
        state: Bytes::from(vec![0u8; max + 1]),
        ..snapshot(10, b"")
    };
    let result = store.save_snapshot(&s, big).await;
    match result {
        Err(SnapshotError::LimitExceeded(e)) => assert_eq!(e.limit, Limit::EventSizeBytes),
        other => panic!("expected event_size_bytes_max to be exceeded, got {other:?}"),
    }
}
