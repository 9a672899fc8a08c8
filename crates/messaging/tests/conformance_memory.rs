//! The in-memory pub/sub runs the whole pub/sub conformance suite, twice: without retention
//! (the default) and with it (`InMemoryConfig::persistent`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::testkit::{self, Features, PubSubFixture};
use factline_messaging::{InMemoryConfig, InMemoryPubSub, Publisher, Subscriber};

/// A fresh in-memory pub/sub and what it promises.
struct MemoryFixture {
    pubsub: InMemoryPubSub,
}

impl MemoryFixture {
    fn non_persistent() -> Self {
        Self {
            pubsub: InMemoryPubSub::new(InMemoryConfig::default()),
        }
    }

    fn persistent() -> Self {
        Self {
            pubsub: InMemoryPubSub::new(InMemoryConfig::default().persistent(true)),
        }
    }
}

#[async_trait]
impl PubSubFixture for MemoryFixture {
    fn features(&self) -> Features {
        let persistent = self.pubsub.config().persistent;
        Features::none()
            .ordering(true)
            .consumer_groups(true)
            .fan_out(true)
            .redelivery_on_nack(true)
            .close_while_in_flight(true)
            .concurrent_subscribe(true)
            // Within one process nothing can fail between an ack and its effect: an acked
            // message never reaches its group again.
            .exactly_once(true)
            // Retention, and named groups that keep their cursor while offline, come together.
            .persistent(persistent)
            .durable_groups(persistent)
        // Not `reconnect`: there is no broker to restart.
    }

    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.pubsub.publisher())
    }

    async fn subscriber(&self, group: Option<&str>) -> Arc<dyn Subscriber> {
        match group {
            Some(group) => Arc::new(self.pubsub.subscriber_in_group(group)),
            None => Arc::new(self.pubsub.subscriber()),
        }
    }

    fn delivery_timeout(&self) -> Duration {
        Duration::from_secs(2)
    }

    fn time_scale(&self) -> f64 {
        0.5
    }
}

mod non_persistent {
    use super::MemoryFixture;
    factline_messaging::pubsub_conformance!(async { MemoryFixture::non_persistent() });
}

mod persistent {
    use super::MemoryFixture;
    // (Also the macro's attribute form: the attribute goes on every generated test.)
    factline_messaging::pubsub_conformance!(
        #[cfg_attr(miri, ignore = "no tokio runtime under miri")]
        async {
            MemoryFixture::persistent()
        }
    );
}

/// `run_suite` over both configurations: nothing fails, and exactly the cases for undeclared
/// features are skipped (and reported as such).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suite_reports_every_case_passed_or_skipped_for_a_known_reason() {
    let (non_persistent, persistent) = tokio::join!(
        testkit::run_suite(MemoryFixture::non_persistent()),
        testkit::run_suite(MemoryFixture::persistent()),
    );
    for report in [&non_persistent, &persistent] {
        assert!(report.all_passed(), "{report}");
        assert_eq!(
            report.passed.len() + report.skipped.len(),
            testkit::all_cases().len(),
            "{report}"
        );
    }
    let skipped = |report: &testkit::SuiteReport| -> Vec<(&str, &str)> {
        let mut skipped = report.skipped.clone();
        skipped.sort_unstable();
        skipped
    };
    assert_eq!(
        skipped(&non_persistent),
        [
            ("group_resumes_where_it_left_off", "durable_groups"),
            ("late_subscriber_receives_retained_messages", "persistent"),
            ("reconnect_after_broker_restart_loses_nothing", "reconnect"),
        ],
        "{non_persistent}"
    );
    assert_eq!(
        skipped(&persistent),
        [("reconnect_after_broker_restart_loses_nothing", "reconnect")],
        "{persistent}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_in_memory_dedup_store_keeps_the_dedup_store_contract() {
    use factline_messaging::middleware::{InMemoryDedupConfig, InMemoryDedupStore};
    let mut config = InMemoryDedupConfig::default();
    config.claim_ttl = std::time::Duration::from_secs(1);
    config.ttl = std::time::Duration::from_secs(2);
    let store = InMemoryDedupStore::new(config.clone());
    factline_messaging::testkit::dedup::check_dedup_store(
        &store,
        &store,
        config.claim_ttl,
        config.ttl,
    )
    .await;
}
