//! The conformance suite every [`EventStore`] backend runs, and the reference model its property
//! tests compare against.
//!
//! A backend runs the whole suite, one `#[test]` per contract rule, with one macro call:
//!
//! ```text
//! factline_core::event_store_conformance!(async { factline_core::InMemoryStore::new() });
//! // A backend that needs a service marks every generated test:
//! factline_core::event_store_conformance!(
//!     #[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
//!     async { my_backend::connect_fresh_schema().await }
//! );
//! ```
//!
//! The factory future must give a fresh, empty store each time it is evaluated. [`run_suite`]
//! runs every case and reports failures instead of panicking; the suite's own tests use it to
//! show that deliberately broken stores fail.
//!
//! This is test code: it panics (through assertions) to report a broken contract.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod cases;
mod checkpoints;
pub mod model;
mod persistent;

pub use checkpoints::checkpoint_store_conformance;

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use futures::future::BoxFuture;

use crate::{
    EventData, EventStore, ReadAllOptions, ReadStreamError, ReadStreamOptions, RecordedEvent,
    SnapshotStore, StreamId, Subscription,
};

/// What the suite needs of a store.
pub trait TestStore: EventStore + SnapshotStore + 'static {}
impl<T: EventStore + SnapshotStore + 'static> TestStore for T {}

/// Longest a single case may run before it counts as hung.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest the suite waits for one subscription event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Generates one `#[test]` per conformance case for the store made by the factory future.
/// Attributes given before the factory (e.g. `#[ignore = "…"]`) go on every generated test.
#[macro_export]
macro_rules! event_store_conformance {
    (@emit $attrs:tt ($factory:expr) ; $($case:ident),* $(,)?) => {
        $( $crate::event_store_conformance! { @one $attrs ($factory) $case } )*
    };
    (@one [$($attr:tt)*] ($factory:expr) $case:ident) => {
        #[test]
        $($attr)*
        fn $case() {
            $crate::testkit::run_case(async { $factory.await }, $crate::testkit::cases::$case);
        }
    };
    (@table ; $($case:ident),* $(,)?) => {
        vec![
            $((
                stringify!($case),
                (|store| ::std::boxed::Box::pin($crate::testkit::cases::$case(store))
                    as $crate::testkit::CaseFuture) as fn(_) -> $crate::testkit::CaseFuture,
            )),*
        ]
    };
    (@list $($head:tt)*) => {
        $crate::event_store_conformance! { @emit_or_table $($head)* }
    };
    (@emit_or_table $($head:tt)*) => {
        $crate::event_store_conformance! {
            $($head)* ;
            append_returns_last_revision_and_position,
            revisions_and_positions_are_gapless,
            recorded_events_keep_every_field,
            expected_no_stream,
            expected_stream_exists,
            expected_exact,
            expected_any,
            empty_append_is_rejected,
            duplicate_ids_in_one_append_are_rejected,
            idempotent_retry_returns_the_original_result,
            partial_overlap_is_a_conflict,
            concurrent_exact_appends_have_one_winner_per_revision,
            concurrent_appends_to_many_streams_stay_gapless,
            append_multi_writes_every_stream,
            append_multi_writes_nothing_when_one_check_fails,
            append_multi_rejects_a_stream_twice,
            append_multi_retry_is_idempotent,
            oversized_event_is_refused_naming_the_limit,
            too_many_events_are_refused_naming_the_limit,
            invalid_event_types_are_refused,
            reading_a_missing_stream_is_not_found,
            read_stream_forwards_pages,
            read_stream_backwards_pages,
            read_count_limit_is_enforced,
            read_all_pages_both_ways,
            read_all_filters_by_prefix_category_and_type,
            subscribe_to_all_catches_up_then_goes_live,
            subscribe_to_all_after_a_position,
            subscribe_to_all_from_end_gets_only_new_events,
            subscription_switch_is_seamless_under_concurrent_writes,
            subscribe_to_stream_gets_only_its_events,
            subscribe_to_a_stream_before_it_exists,
            subscribe_to_a_category,
            slow_subscriber_receives_everything,
            subscription_to_a_tombstoned_stream_ends,
            stream_metadata_round_trips,
            max_count_hides_older_events,
            truncate_before_hides_older_events,
            max_age_hides_expired_events,
            soft_delete_hides_events_and_the_stream_continues,
            soft_delete_checks_expected_version,
            tombstone_is_permanent,
            tombstone_of_an_unwritten_stream_blocks_it,
            snapshots_keep_the_newest,
            persistent_group_delivers_each_event_to_one_consumer,
            persistent_nack_retries_then_parks_past_the_limit,
            persistent_unsettled_delivery_times_out_to_another_consumer,
            persistent_pinned_members_keep_stream_order_across_a_leave,
            persistent_pinned_stream_moves_only_after_its_open_delivery_settles,
            persistent_group_resumes_after_a_restart,
            persistent_event_parked_before_a_crash_is_not_parked_twice,
            persistent_parked_events_replay_and_leave_the_parked_stream,
            persistent_groups_are_managed_and_checked,
        }
    };
    // The attributes are taken one at a time: an expression may itself start with `#[…]`, so
    // `$(#[$attr:meta])* $factory:expr` would be ambiguous.
    (@attrs [$($done:tt)*] #[$attr:meta] $($rest:tt)*) => {
        $crate::event_store_conformance! { @attrs [$($done)* #[$attr]] $($rest)* }
    };
    (@attrs [$($done:tt)*] $factory:expr $(,)?) => {
        $crate::event_store_conformance! { @list @emit [$($done)*] ($factory) }
    };
    ($($input:tt)*) => {
        $crate::event_store_conformance! { @attrs [] $($input)* }
    };
}

/// A boxed conformance case.
pub type CaseFuture = BoxFuture<'static, ()>;
/// A named conformance case for store type `S`.
pub type NamedCase<S> = (&'static str, fn(S) -> CaseFuture);

/// Every case, by name, for a store type.
pub fn all_cases<S: TestStore>() -> Vec<NamedCase<S>> {
    crate::event_store_conformance!(@list @table)
}

/// The cases that state the store contract itself: all but the `persistent_…` ones, which
/// build on the contract rather than state it (against a broken store they mostly wait out
/// their delivery timeouts). [`run_suite`] runs these.
pub fn contract_cases<S: TestStore>() -> Vec<NamedCase<S>> {
    all_cases::<S>()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("persistent_"))
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the conformance suite")
}

/// Runs one case on a fresh runtime with a fresh store; panics when the case fails or hangs.
pub fn run_case<S, Fut, C, CFut>(factory: Fut, case: C)
where
    Fut: Future<Output = S>,
    C: FnOnce(S) -> CFut,
    CFut: Future<Output = ()>,
{
    runtime().block_on(async move {
        let store = factory.await;
        if tokio::time::timeout(CASE_TIMEOUT, case(store))
            .await
            .is_err()
        {
            panic!("conformance case did not finish within {CASE_TIMEOUT:?}");
        }
    });
}

/// The outcome of [`run_suite`].
#[derive(Debug, Default)]
pub struct SuiteReport {
    /// Cases that passed.
    pub passed: Vec<&'static str>,
    /// Cases that failed, with the panic message.
    pub failed: Vec<(&'static str, String)>,
}

impl SuiteReport {
    /// True when `case` failed.
    pub fn failed(&self, case: &str) -> bool {
        self.failed.iter().any(|(name, _)| *name == case)
    }
}

/// Runs every [`contract_cases`] case against stores from `factory`
/// and reports, without panicking.
pub fn run_suite<S, F, Fut>(factory: F) -> SuiteReport
where
    S: TestStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let mut report = SuiteReport::default();
    for (name, case) in contract_cases::<S>() {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run_case(factory(), case)));
        match outcome {
            Ok(()) => report.passed.push(name),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panic".to_owned());
                report.failed.push((name, message));
            }
        }
    }
    report
}

// ---- helpers shared by the cases and by backend tests ----

/// A valid stream id (panics on an invalid one: test input).
pub fn stream(name: &str) -> StreamId {
    StreamId::new(name).expect("a valid test stream id")
}

static EVENT_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A JSON event of type `event_type` with a unique payload.
pub fn event(event_type: &str) -> EventData {
    let n = EVENT_COUNTER.fetch_add(1, Ordering::Relaxed);
    EventData::json(event_type, &serde_json::json!({ "n": n })).expect("JSON of a number")
}

/// `count` events of type `TestEventRecorded`.
pub fn events(count: usize) -> Vec<EventData> {
    (0..count).map(|_| event("TestEventRecorded")).collect()
}

/// Every event of `$all`, forwards, read in pages.
pub async fn all_events<S: EventStore + ?Sized>(store: &S) -> Vec<RecordedEvent> {
    let mut out = Vec::new();
    let mut options = ReadAllOptions::forwards().limit(500);
    loop {
        let slice = store.read_all(options.clone()).await.expect("read_all");
        out.extend(slice.events);
        if slice.is_end {
            return out;
        }
        options = options.from(slice.next_position);
    }
}

/// Every visible event of one stream, forwards, read in pages.
pub async fn stream_events<S: EventStore + ?Sized>(
    store: &S,
    stream: &StreamId,
) -> Result<Vec<RecordedEvent>, ReadStreamError> {
    let mut out = Vec::new();
    let mut options = ReadStreamOptions::forwards().limit(500);
    loop {
        let slice = store.read_stream(stream, options).await?;
        out.extend(slice.events);
        if slice.is_end {
            return Ok(out);
        }
        options = options.from(slice.next_revision);
    }
}

/// The next event of a subscription; panics on an error, an end, or [`EVENT_TIMEOUT`].
pub async fn next_event(subscription: &mut Subscription) -> RecordedEvent {
    match tokio::time::timeout(EVENT_TIMEOUT, subscription.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(error))) => panic!("subscription failed: {error}"),
        Ok(None) => panic!("subscription ended"),
        Err(_) => panic!("no event within {EVENT_TIMEOUT:?}"),
    }
}

/// Asserts that the subscription yields nothing for `quiet`.
pub async fn assert_quiet(subscription: &mut Subscription, quiet: Duration) {
    if let Ok(item) = tokio::time::timeout(quiet, subscription.next()).await {
        panic!("expected no more events, got {item:?}");
    }
}
