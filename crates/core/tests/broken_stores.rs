//! The conformance suite must catch a store that breaks any contract rule.
//!
//! `Broken` wraps the in-memory store and breaks exactly one rule, chosen by `Fault`. For each
//! fault the whole suite runs and the test asserts that the case guarding that rule fails.
//! `Fault::None` shows the wrapper itself keeps the contract, so the failures come from the
//! faults alone.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use async_trait::async_trait;
use factline_core::{
    AllSlice, AppendError, AppendRequest, AppendResult, DeleteError, DeleteMode, Direction,
    EventFilter, EventStore, ExpectedVersion, InMemoryStore, Limits, MetadataError, Position,
    ReadAllError, ReadAllOptions, ReadStreamError, ReadStreamOptions, Revision, Snapshot,
    SnapshotError, SnapshotStore, StorageError, StreamId, StreamMetadata, StreamSlice,
    SubscribeError, SubscribeFrom, Subscription, Uuid, testkit,
};
use futures::StreamExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    IgnoreExpectedVersion,
    NoIdempotency,
    NonAtomicMulti,
    TruncateOversizeEvents,
    TombstoneActsAsSoftDelete,
    BackwardsReadsForwards,
    IgnoreMaxCount,
    IgnoreEventTypeFilter,
    SubscriptionDropsAnEvent,
    SlowSubscriberLosesEvents,
    SnapshotsRegress,
    LimitOnReadsIgnored,
}

struct Broken {
    inner: InMemoryStore,
    fault: Fault,
}

#[async_trait]
impl EventStore for Broken {
    fn limits(&self) -> &Limits {
        self.inner.limits()
    }

    async fn append_multi(
        &self,
        mut requests: Vec<AppendRequest>,
    ) -> Result<Vec<AppendResult>, AppendError> {
        match self.fault {
            Fault::IgnoreExpectedVersion => {
                for r in &mut requests {
                    r.expected = ExpectedVersion::Any;
                }
            }
            Fault::NoIdempotency => {
                for e in requests.iter_mut().flat_map(|r| r.events.iter_mut()) {
                    e.id = Uuid::now_v7();
                }
            }
            Fault::TruncateOversizeEvents => {
                let max = self.inner.limits().event_size_bytes_max;
                for e in requests.iter_mut().flat_map(|r| r.events.iter_mut()) {
                    if e.size_bytes() > max {
                        e.data.truncate(max - e.event_type.len());
                    }
                }
            }
            Fault::NonAtomicMulti => {
                let mut results = Vec::new();
                for r in requests {
                    results.push(self.inner.append(&r.stream, r.expected, r.events).await?);
                }
                return Ok(results);
            }
            _ => {}
        }
        self.inner.append_multi(requests).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        mut options: ReadStreamOptions,
    ) -> Result<StreamSlice, ReadStreamError> {
        if self.fault == Fault::LimitOnReadsIgnored {
            options.limit = options.limit.min(self.inner.limits().read_count_max);
        }
        let mut slice = self.inner.read_stream(stream, options).await?;
        if self.fault == Fault::BackwardsReadsForwards && options.direction == Direction::Backwards
        {
            slice.events.reverse();
        }
        Ok(slice)
    }

    async fn read_all(&self, mut options: ReadAllOptions) -> Result<AllSlice, ReadAllError> {
        if self.fault == Fault::IgnoreEventTypeFilter {
            options.filter.event_type_prefix = None;
        }
        if self.fault == Fault::LimitOnReadsIgnored {
            options.limit = options.limit.min(self.inner.limits().read_count_max);
        }
        self.inner.read_all(options).await
    }

    async fn head_position(&self) -> Result<Option<Position>, StorageError> {
        self.inner.head_position().await
    }

    async fn subscribe_to_stream(
        &self,
        stream: &StreamId,
        from: SubscribeFrom<Revision>,
    ) -> Result<Subscription, SubscribeError> {
        self.inner.subscribe_to_stream(stream, from).await
    }

    async fn subscribe_to_all(
        &self,
        from: SubscribeFrom<Position>,
        filter: EventFilter,
    ) -> Result<Subscription, SubscribeError> {
        let inner = self.inner.subscribe_to_all(from, filter).await?;
        Ok(match self.fault {
            // Loses one event as if the catch-up → live switch had a hole.
            Fault::SubscriptionDropsAnEvent => Subscription::new(inner.filter(|item| {
                let keep = !matches!(item, Ok(e) if e.position == Position(6));
                async move { keep }
            })),
            // A bounded live buffer that drops what does not fit instead of falling back to reads.
            Fault::SlowSubscriberLosesEvents => {
                let (sender, receiver) = tokio::sync::mpsc::channel(256);
                tokio::spawn(async move {
                    let mut inner = inner;
                    while let Some(item) = inner.next().await {
                        if sender.is_closed() {
                            return;
                        }
                        let _ = sender.try_send(item);
                    }
                });
                Subscription::new(tokio_stream_from(receiver))
            }
            _ => inner,
        })
    }

    async fn stream_metadata(&self, stream: &StreamId) -> Result<StreamMetadata, MetadataError> {
        self.inner.stream_metadata(stream).await
    }

    async fn set_stream_metadata(
        &self,
        stream: &StreamId,
        mut metadata: StreamMetadata,
    ) -> Result<(), MetadataError> {
        if self.fault == Fault::IgnoreMaxCount && metadata.max_count.is_some_and(|n| n > 0) {
            metadata.max_count = None;
        }
        self.inner.set_stream_metadata(stream, metadata).await
    }

    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mut mode: DeleteMode,
    ) -> Result<(), DeleteError> {
        if self.fault == Fault::TombstoneActsAsSoftDelete {
            mode = DeleteMode::Soft;
        }
        self.inner.delete_stream(stream, expected, mode).await
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

#[async_trait]
impl SnapshotStore for Broken {
    async fn save_snapshot(
        &self,
        stream: &StreamId,
        snapshot: Snapshot,
    ) -> Result<bool, SnapshotError> {
        if self.fault == Fault::SnapshotsRegress {
            self.inner.delete_snapshot(stream).await?;
        }
        self.inner.save_snapshot(stream, snapshot).await
    }
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        self.inner.load_snapshot(stream).await
    }
    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), SnapshotError> {
        self.inner.delete_snapshot(stream).await
    }
}

fn run(fault: Fault) -> testkit::SuiteReport {
    testkit::run_suite(move || async move {
        Broken {
            inner: InMemoryStore::new(),
            fault,
        }
    })
}

fn assert_caught(fault: Fault, guarding_cases: &[&str]) {
    let report = run(fault);
    for case in guarding_cases {
        assert!(
            report.failed(case),
            "{fault:?} should fail {case}; failed: {:?}",
            report.failed.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
    }
}

#[test]
fn the_wrapper_without_a_fault_passes_everything() {
    let report = run(Fault::None);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(
        report.passed.len(),
        testkit::contract_cases::<Broken>().len()
    );
}

#[test]
fn ignoring_the_expected_version_is_caught() {
    assert_caught(
        Fault::IgnoreExpectedVersion,
        &[
            "expected_no_stream",
            "expected_exact",
            "concurrent_exact_appends_have_one_winner_per_revision",
            "append_multi_writes_nothing_when_one_check_fails",
        ],
    );
}

#[test]
fn writing_retries_twice_is_caught() {
    assert_caught(
        Fault::NoIdempotency,
        &[
            "idempotent_retry_returns_the_original_result",
            "partial_overlap_is_a_conflict",
        ],
    );
}

#[test]
fn a_non_atomic_append_multi_is_caught() {
    assert_caught(
        Fault::NonAtomicMulti,
        &["append_multi_writes_nothing_when_one_check_fails"],
    );
}

#[test]
fn truncating_instead_of_refusing_is_caught() {
    assert_caught(
        Fault::TruncateOversizeEvents,
        &["oversized_event_is_refused_naming_the_limit"],
    );
}

#[test]
fn a_tombstone_that_is_only_a_soft_delete_is_caught() {
    assert_caught(
        Fault::TombstoneActsAsSoftDelete,
        &[
            "tombstone_is_permanent",
            "tombstone_of_an_unwritten_stream_blocks_it",
            "subscription_to_a_tombstoned_stream_ends",
        ],
    );
}

#[test]
fn wrong_backwards_order_is_caught() {
    assert_caught(
        Fault::BackwardsReadsForwards,
        &[
            "read_stream_backwards_pages",
            "max_count_hides_older_events",
        ],
    );
}

#[test]
fn ignored_retention_is_caught() {
    assert_caught(Fault::IgnoreMaxCount, &["max_count_hides_older_events"]);
}

#[test]
fn an_ignored_filter_is_caught() {
    assert_caught(
        Fault::IgnoreEventTypeFilter,
        &["read_all_filters_by_prefix_category_and_type"],
    );
}

#[test]
fn a_subscription_gap_is_caught() {
    assert_caught(
        Fault::SubscriptionDropsAnEvent,
        &[
            "subscribe_to_all_catches_up_then_goes_live",
            "subscription_switch_is_seamless_under_concurrent_writes",
            "slow_subscriber_receives_everything",
        ],
    );
}

#[test]
fn a_slow_subscriber_losing_events_is_caught() {
    assert_caught(
        Fault::SlowSubscriberLosesEvents,
        &["slow_subscriber_receives_everything"],
    );
}

#[test]
fn regressing_snapshots_are_caught() {
    assert_caught(Fault::SnapshotsRegress, &["snapshots_keep_the_newest"]);
}

#[test]
fn unenforced_read_limits_are_caught() {
    assert_caught(
        Fault::LimitOnReadsIgnored,
        &["read_count_limit_is_enforced"],
    );
}

fn model_test_fails(fault: Fault) -> String {
    let outcome = std::panic::catch_unwind(|| {
        testkit::model::check_against_model(
            move || async move {
                Broken {
                    inner: InMemoryStore::new(),
                    fault,
                }
            },
            256,
        )
    });
    match outcome {
        Ok(()) => panic!("the model test passed a store with {fault:?}"),
        Err(panic) => panic.downcast_ref::<String>().cloned().unwrap_or_default(),
    }
}

#[test]
fn the_model_test_catches_broken_stores() {
    for fault in [
        Fault::IgnoreExpectedVersion,
        Fault::NoIdempotency,
        Fault::NonAtomicMulti,
        Fault::TombstoneActsAsSoftDelete,
        Fault::BackwardsReadsForwards,
        Fault::IgnoreMaxCount,
    ] {
        let message = model_test_fails(fault);
        assert!(
            message.contains("disagrees with the model"),
            "{fault:?}: {message}"
        );
    }
}
