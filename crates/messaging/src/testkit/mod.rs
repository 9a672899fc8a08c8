//! The pub/sub conformance suite (feature `testkit`): the cases every [`Publisher`] and
//! [`Subscriber`] adapter runs, one per rule of `docs/specs/pubsub-adapter.md`.
//!
//! An adapter describes itself with a [`PubSubFixture`]: how to get a publisher and a
//! subscriber (optionally in a consumer group), which optional guarantees it makes
//! ([`Features`]), and how long the suite should wait for it. One macro call then generates one
//! `#[tokio::test]` per case:
//!
//! ```text
//! factline_messaging::pubsub_conformance!(async { MyFixture::connect().await });
//! // An adapter that needs a running broker marks every generated test:
//! factline_messaging::pubsub_conformance!(
//!     #[ignore = "needs nats: set FACTLINE_TEST_NATS_URL"]
//!     async { MyFixture::connect().await }
//! );
//! ```
//!
//! The factory future is evaluated once per case. Every case works on topics and groups of its
//! own, named with a random suffix ([`support::unique_name`]), so fixtures may share one broker
//! (and one connection) between cases and between test runs; the one case that restarts the
//! broker ([`EXCLUSIVE_CASES`]) runs alone. The generating crate needs `tokio` with the `macros`
//! and `rt-multi-thread` features (as a dev-dependency).
//!
//! A case for a feature the fixture does not declare returns [`Verdict::Skipped`] at once; the
//! runners print `skipped <case>: adapter does not declare <feature>` so that a skip never passes
//! for a check. [`run_suite`] runs every case against one fixture and reports passes, failures
//! (with the panic message) and skips instead of panicking; the crate's own tests use it to show
//! that deliberately broken pub/subs fail.
//!
//! This is test code: cases report a broken contract by panicking with a message that names the
//! rule.

pub mod cases;
pub mod dedup;
pub mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::future::BoxFuture;

use crate::pubsub::{Publisher, Subscriber};

/// Longest a single case may run before it counts as hung (every wait inside a case has its own,
/// shorter timeout; this one only catches a case stuck where no timeout applies).
pub const CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// The optional guarantees an adapter declares. The suite checks the baseline of the contract
/// (at-least-once delivery, identity round trip, ack/nack, close and error rules) for every
/// adapter and the rest only where declared: a case for an undeclared feature is skipped, and
/// the skip is printed and reported.
///
/// Build one with [`Features::none`] or [`Features::all`] and the builder methods:
///
/// ```
/// use factline_messaging::testkit::Features;
/// let features = Features::none().ordering(true).consumer_groups(true).fan_out(true);
/// assert!(features.ordering && !features.persistent);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Features {
    /// Messages one publisher publishes to one topic (with one partition key) reach a
    /// subscription in publish order, when each delivery is acked.
    pub ordering: bool,
    /// Messages published while nobody is subscribed are kept (up to the adapter's retention):
    /// a later subscription receives them.
    pub persistent: bool,
    /// A named group outlives its members: while none is connected, messages are kept for it,
    /// and the next member resumes where the group left off (acked messages stay handled,
    /// unsettled ones come again).
    pub durable_groups: bool,
    /// `subscriber(Some(group))` gives competing consumers: the group's subscriptions to a
    /// topic share its messages, each delivered to one of them; distinct groups each get all.
    pub consumer_groups: bool,
    /// When every delivery is acked, no message is ever delivered twice to one group, not even
    /// across a subscriber handover, a group resuming, or a broker restart. (Every adapter
    /// must not redeliver an acked message while nothing fails; this is the stronger promise.)
    pub exactly_once: bool,
    /// A nacked or dropped delivery is delivered again (after the nack's delay, if any) while
    /// the subscription stays open.
    pub redelivery_on_nack: bool,
    /// The fixture can restart the broker ([`PubSubFixture::restart_broker`]), and
    /// subscriptions survive it (or end so the application can subscribe again) without losing
    /// messages the broker kept.
    pub reconnect: bool,
    /// Many subscribes may run at once, on one subscriber and on several.
    pub concurrent_subscribe: bool,
    /// Closing a subscriber while its messages are unsettled loses none of them: another
    /// subscription of the same group receives them.
    pub close_while_in_flight: bool,
    /// Two subscribers without a group (`subscriber(None)`) each receive every message.
    pub fan_out: bool,
    /// The largest payload the adapter promises to carry; the round-trip case sends
    /// `min(this, LARGE_PAYLOAD_BYTES)` bytes.
    pub payload_size_bytes_max: usize,
}

impl Features {
    /// The size of the large payload the round-trip case sends when the adapter allows it.
    pub const LARGE_PAYLOAD_BYTES: usize = 256 * 1024;

    /// Only the baseline contract; a payload limit of [`Features::LARGE_PAYLOAD_BYTES`].
    pub fn none() -> Self {
        Self {
            ordering: false,
            persistent: false,
            durable_groups: false,
            consumer_groups: false,
            exactly_once: false,
            redelivery_on_nack: false,
            reconnect: false,
            concurrent_subscribe: false,
            close_while_in_flight: false,
            fan_out: false,
            payload_size_bytes_max: Self::LARGE_PAYLOAD_BYTES,
        }
    }

    /// Every feature declared.
    pub fn all() -> Self {
        Self {
            ordering: true,
            persistent: true,
            durable_groups: true,
            consumer_groups: true,
            exactly_once: true,
            redelivery_on_nack: true,
            reconnect: true,
            concurrent_subscribe: true,
            close_while_in_flight: true,
            fan_out: true,
            payload_size_bytes_max: Self::LARGE_PAYLOAD_BYTES,
        }
    }

    /// Builder: see [`Features::ordering`].
    #[must_use]
    pub fn ordering(mut self, yes: bool) -> Self {
        self.ordering = yes;
        self
    }

    /// Builder: see [`Features::persistent`].
    #[must_use]
    pub fn persistent(mut self, yes: bool) -> Self {
        self.persistent = yes;
        self
    }

    /// Builder: see [`Features::durable_groups`].
    #[must_use]
    pub fn durable_groups(mut self, yes: bool) -> Self {
        self.durable_groups = yes;
        self
    }

    /// Builder: see [`Features::consumer_groups`].
    #[must_use]
    pub fn consumer_groups(mut self, yes: bool) -> Self {
        self.consumer_groups = yes;
        self
    }

    /// Builder: see [`Features::exactly_once`].
    #[must_use]
    pub fn exactly_once(mut self, yes: bool) -> Self {
        self.exactly_once = yes;
        self
    }

    /// Builder: see [`Features::redelivery_on_nack`].
    #[must_use]
    pub fn redelivery_on_nack(mut self, yes: bool) -> Self {
        self.redelivery_on_nack = yes;
        self
    }

    /// Builder: see [`Features::reconnect`].
    #[must_use]
    pub fn reconnect(mut self, yes: bool) -> Self {
        self.reconnect = yes;
        self
    }

    /// Builder: see [`Features::concurrent_subscribe`].
    #[must_use]
    pub fn concurrent_subscribe(mut self, yes: bool) -> Self {
        self.concurrent_subscribe = yes;
        self
    }

    /// Builder: see [`Features::close_while_in_flight`].
    #[must_use]
    pub fn close_while_in_flight(mut self, yes: bool) -> Self {
        self.close_while_in_flight = yes;
        self
    }

    /// Builder: see [`Features::fan_out`].
    #[must_use]
    pub fn fan_out(mut self, yes: bool) -> Self {
        self.fan_out = yes;
        self
    }

    /// Builder: see [`Features::payload_size_bytes_max`].
    #[must_use]
    pub fn payload_size_bytes_max(mut self, size_bytes: usize) -> Self {
        self.payload_size_bytes_max = size_bytes;
        self
    }

    /// The names of the declared boolean features, in declaration order (for reports).
    pub fn declared(&self) -> Vec<&'static str> {
        [
            ("ordering", self.ordering),
            ("persistent", self.persistent),
            ("durable_groups", self.durable_groups),
            ("consumer_groups", self.consumer_groups),
            ("exactly_once", self.exactly_once),
            ("redelivery_on_nack", self.redelivery_on_nack),
            ("reconnect", self.reconnect),
            ("concurrent_subscribe", self.concurrent_subscribe),
            ("close_while_in_flight", self.close_while_in_flight),
            ("fan_out", self.fan_out),
        ]
        .into_iter()
        .filter_map(|(name, declared)| declared.then_some(name))
        .collect()
    }
}

impl Default for Features {
    fn default() -> Self {
        Self::none()
    }
}

/// What the suite needs of an adapter under test.
#[async_trait]
pub trait PubSubFixture: Send + Sync + 'static {
    /// The guarantees the adapter makes; cases for the others are skipped.
    fn features(&self) -> Features;

    /// A publisher (a new one per call; the suite closes some of them).
    async fn publisher(&self) -> Arc<dyn Publisher>;

    /// A subscriber (a new one per call; the suite closes some of them). With `Some(group)`,
    /// its subscriptions are members of consumer group `group`; with `None`, every
    /// subscription receives every message published to its topic from when `subscribe`
    /// returned (an adapter that only has groups gives each such subscriber a fresh group).
    async fn subscriber(&self, group: Option<&str>) -> Arc<dyn Subscriber>;

    /// Restarts the broker (stop, then start again) and returns once it accepts connections.
    /// Needed when [`Features::reconnect`] is declared.
    async fn restart_broker(&self) -> Result<(), String> {
        Err("this fixture cannot restart its broker".to_owned())
    }

    /// The longest the suite waits for one expected message (or for a publish, subscribe or
    /// close to return).
    fn delivery_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }

    /// Scales the suite's short waits: how long "nothing more arrives" is watched (200 ms at
    /// 1.0) and the nack delay it asks for. Raise it for a slow broker.
    fn time_scale(&self) -> f64 {
        1.0
    }
}

#[async_trait]
impl<F: PubSubFixture + ?Sized> PubSubFixture for Arc<F> {
    fn features(&self) -> Features {
        (**self).features()
    }
    async fn publisher(&self) -> Arc<dyn Publisher> {
        (**self).publisher().await
    }
    async fn subscriber(&self, group: Option<&str>) -> Arc<dyn Subscriber> {
        (**self).subscriber(group).await
    }
    async fn restart_broker(&self) -> Result<(), String> {
        (**self).restart_broker().await
    }
    fn delivery_timeout(&self) -> Duration {
        (**self).delivery_timeout()
    }
    fn time_scale(&self) -> f64 {
        (**self).time_scale()
    }
}

/// How a case ended without a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Every check held.
    Passed,
    /// Nothing was checked: the adapter does not declare the feature the case is about.
    Skipped {
        /// The feature (or alternatives, `a or b`) the case needs.
        missing: &'static str,
    },
}

/// A boxed conformance case.
pub type CaseFuture = BoxFuture<'static, Verdict>;
/// A conformance case.
pub type CaseFn = fn(Arc<dyn PubSubFixture>) -> CaseFuture;
/// A conformance case with its name.
pub type NamedCase = (&'static str, CaseFn);

/// Generates one `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` per conformance
/// case for the fixture made by the factory future (evaluated once per case). Attributes given
/// before the factory (e.g. `#[ignore = "…"]`) go on every generated test. To run the suite
/// twice in one file, call the macro in two modules.
#[macro_export]
macro_rules! pubsub_conformance {
    (@emit $attrs:tt ($factory:expr) ; $($case:ident),* $(,)?) => {
        $( $crate::pubsub_conformance! { @one $attrs ($factory) $case } )*
    };
    (@one [$($attr:tt)*] ($factory:expr) $case:ident) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $($attr)*
        async fn $case() {
            $crate::testkit::run_case(
                ::core::stringify!($case),
                async { $factory.await },
                $crate::testkit::cases::$case,
            )
            .await;
        }
    };
    (@table ; $($case:ident),* $(,)?) => {
        ::std::vec![
            $((
                ::core::stringify!($case),
                (|fixture| ::std::boxed::Box::pin($crate::testkit::cases::$case(fixture))
                    as $crate::testkit::CaseFuture) as $crate::testkit::CaseFn,
            )),*
        ]
    };
    (@list $($head:tt)*) => {
        $crate::pubsub_conformance! {
            $($head)* ;
            round_trip_keeps_id_metadata_and_payload,
            publishing_nothing_or_to_nobody_succeeds,
            topics_are_isolated,
            ordering_follows_publish_order,
            concurrent_publishers_lose_nothing,
            acked_message_is_not_redelivered,
            no_duplicates_when_everything_is_acked,
            nack_redelivers_the_same_message,
            nack_with_delay_redelivers_no_sooner,
            first_settlement_wins,
            dropped_delivery_is_redelivered,
            late_subscriber_receives_retained_messages,
            group_resumes_where_it_left_off,
            group_members_share_messages_without_duplicates,
            each_group_receives_every_message,
            plain_subscribers_each_receive_every_message,
            stalled_subscription_does_not_block_others,
            concurrent_subscribes_all_receive,
            close_with_messages_in_flight_loses_nothing,
            subscriber_close_ends_streams_and_refuses_subscribe,
            publisher_close_flushes_and_refuses_publish,
            invalid_topics_are_refused,
            many_messages_arrive_without_loss,
            reconnect_after_broker_restart_loses_nothing,
        }
    };
    // The attributes are taken one at a time: an expression may itself start with `#[…]`, so
    // `$(#[$attr:meta])* $factory:expr` would be ambiguous.
    (@attrs [$($done:tt)*] #[$attr:meta] $($rest:tt)*) => {
        $crate::pubsub_conformance! { @attrs [$($done)* #[$attr]] $($rest)* }
    };
    (@attrs [$($done:tt)*] $factory:expr $(,)?) => {
        $crate::pubsub_conformance! { @list @emit [$($done)*] ($factory) }
    };
    ($($input:tt)*) => {
        $crate::pubsub_conformance! { @attrs [] $($input)* }
    };
}

/// Restarts a broker for [`PubSubFixture::restart_broker`] by running `command` with `sh -c`
/// (the command an adapter's tests read from the environment variable `variable`, e.g. a
/// `scripts/services/restart-*` script); `None` is an error naming the variable.
pub async fn run_restart_command(command: Option<&str>, variable: &str) -> Result<(), String> {
    let Some(command) = command else {
        return Err(format!("{variable} is not set"));
    };
    let owned = command.to_owned();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&owned)
            .status()
    })
    .await
    .map_err(|error| format!("running {command:?}: {error}"))?
    .map_err(|error| format!("running {command:?}: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} exited with {status}"))
    }
}

/// Every case, by name, in suite order.
pub fn all_cases() -> Vec<NamedCase> {
    crate::pubsub_conformance!(@list @table)
}

/// Cases that restart the broker (when the fixture declares [`Features::reconnect`]): the
/// runners give them the broker alone, so that the restart disturbs no other case.
pub const EXCLUSIVE_CASES: &[&str] = &["reconnect_after_broker_restart_loses_nothing"];

/// Held by every running case: shared by most, exclusively by [`EXCLUSIVE_CASES`]. One lock
/// per process, so it orders the generated tests of one test binary (each on its own runtime).
static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[allow(dead_code)] // The guards are held for their drop, never read.
enum BrokerGuard {
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    Exclusive(tokio::sync::RwLockWriteGuard<'static, ()>),
}

async fn broker_guard(name: &str, fixture: &dyn PubSubFixture) -> BrokerGuard {
    if fixture.features().reconnect && EXCLUSIVE_CASES.contains(&name) {
        BrokerGuard::Exclusive(BROKER.write().await)
    } else {
        BrokerGuard::Shared(BROKER.read().await)
    }
}

/// Runs one case against the fixture made by `fixture`; panics when the case fails or hangs,
/// prints when it is skipped. The generated tests call this.
pub async fn run_case<F, Fut, C, CFut>(name: &str, fixture: Fut, case: C)
where
    F: PubSubFixture,
    Fut: Future<Output = F>,
    C: FnOnce(Arc<dyn PubSubFixture>) -> CFut,
    CFut: Future<Output = Verdict>,
{
    let fixture: Arc<dyn PubSubFixture> = Arc::new(fixture.await);
    let _guard = broker_guard(name, &*fixture).await;
    match tokio::time::timeout(CASE_TIMEOUT, Box::pin(case(fixture))).await {
        Ok(Verdict::Passed) => {}
        Ok(Verdict::Skipped { missing }) => print_skip(name, missing),
        Err(_) => panic!("conformance case {name} did not finish within {CASE_TIMEOUT:?}"),
    }
}

fn print_skip(name: &str, missing: &str) {
    eprintln!("skipped {name}: adapter does not declare {missing}");
}

/// The outcome of [`run_suite`].
#[derive(Debug, Default, Clone)]
pub struct SuiteReport {
    /// Cases that passed.
    pub passed: Vec<&'static str>,
    /// Cases that failed, with the panic message.
    pub failed: Vec<(&'static str, String)>,
    /// Cases skipped, with the feature they need.
    pub skipped: Vec<(&'static str, &'static str)>,
    /// How long each case ran, in suite order (for a failed case, including any wait for an
    /// exclusive case).
    pub durations: Vec<(&'static str, Duration)>,
}

impl SuiteReport {
    /// Whether `case` failed.
    pub fn failed(&self, case: &str) -> bool {
        self.failed.iter().any(|(name, _)| *name == case)
    }

    /// Whether `case` was skipped.
    pub fn skipped(&self, case: &str) -> bool {
        self.skipped.iter().any(|(name, _)| *name == case)
    }

    /// The names of the failed cases.
    pub fn failed_names(&self) -> Vec<&'static str> {
        self.failed.iter().map(|(name, _)| *name).collect()
    }

    /// Whether no case failed.
    pub fn all_passed(&self) -> bool {
        self.failed.is_empty()
    }
}

impl std::fmt::Display for SuiteReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed.len(),
            self.failed.len(),
            self.skipped.len()
        )?;
        for (name, message) in &self.failed {
            writeln!(f, "  FAILED  {name}: {message}")?;
        }
        for (name, missing) in &self.skipped {
            writeln!(f, "  skipped {name}: adapter does not declare {missing}")?;
        }
        Ok(())
    }
}

/// How many cases [`run_suite`] runs at once.
pub const SUITE_CONCURRENCY: usize = 4;

/// Runs every case against `fixture` (up to [`SUITE_CONCURRENCY`] at once, each in its own
/// task, [`EXCLUSIVE_CASES`] alone) and reports instead of panicking: a failing case's panic is
/// caught (and still printed by the panic hook). Must be called inside a multi-threaded tokio
/// runtime.
pub async fn run_suite(fixture: impl PubSubFixture) -> SuiteReport {
    let fixture: Arc<dyn PubSubFixture> = Arc::new(fixture);
    let mut outcomes: Vec<_> = futures::stream::iter(all_cases().into_iter().enumerate())
        .map(|(index, (name, case))| {
            let fixture = fixture.clone();
            async move {
                let task = tokio::spawn(async move {
                    let _guard = broker_guard(name, &*fixture).await;
                    let started = std::time::Instant::now();
                    let verdict = tokio::time::timeout(CASE_TIMEOUT, case(fixture)).await;
                    (verdict, started.elapsed())
                });
                let started = std::time::Instant::now();
                (index, name, task.await, started.elapsed())
            }
        })
        .buffer_unordered(SUITE_CONCURRENCY)
        .collect()
        .await;
    outcomes.sort_by_key(|(index, ..)| *index);

    let mut report = SuiteReport::default();
    for (_, name, outcome, wall) in outcomes {
        match outcome {
            Ok((verdict, took)) => {
                report.durations.push((name, took));
                match verdict {
                    Ok(Verdict::Passed) => report.passed.push(name),
                    Ok(Verdict::Skipped { missing }) => {
                        print_skip(name, missing);
                        report.skipped.push((name, missing));
                    }
                    Err(_) => report
                        .failed
                        .push((name, format!("did not finish within {CASE_TIMEOUT:?}"))),
                }
            }
            Err(error) => {
                report.durations.push((name, wall));
                let message = if error.is_panic() {
                    let panic = error.into_panic();
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|| "panicked".to_owned())
                } else {
                    error.to_string()
                };
                report.failed.push((name, message));
            }
        }
    }
    report
}
