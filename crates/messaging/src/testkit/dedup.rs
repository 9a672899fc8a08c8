//! The contract of a [`DedupStore`], for every store: claim, complete, release, scopes, and the
//! two expiries. A persistent store runs it with two instances on the same storage (what one
//! claims or completes, the other sees); an in-process one with the same instance twice.

use std::time::Duration;

use crate::middleware::{Claim, DedupStore};
use crate::testkit::support::unique_name;

/// Checks `first` and `second` (two handles on one store) against the [`DedupStore`] contract.
/// Both must have been made with `claim_ttl` and `ttl`, short (about 1 s and 2 s: the check
/// waits for each to pass) and `ttl` longer than `claim_ttl`. Panics naming the broken rule.
pub async fn check_dedup_store(
    first: &dyn DedupStore,
    second: &dyn DedupStore,
    claim_ttl: Duration,
    ttl: Duration,
) {
    assert!(ttl > claim_ttl, "check_dedup_store wants ttl > claim_ttl");
    let first = Handle {
        name: "first",
        store: first,
    };
    let second = Handle {
        name: "second",
        store: second,
    };
    let scope = unique_name("handler");
    let other_scope = unique_name("other_handler");
    use Claim::{AlreadyDone, InProgress, New};

    first
        .begin(&scope, "k1", New, "a key never seen is new")
        .await;
    second
        .begin(
            &scope,
            "k1",
            InProgress,
            "a live claim is in progress for everyone else",
        )
        .await;
    second
        .begin(&other_scope, "k1", New, "scopes are separate")
        .await;
    first.release(&scope, "k1").await;
    second
        .begin(&scope, "k1", New, "a released claim is free again")
        .await;
    second.complete(&scope, "k1").await;
    first
        .begin(
            &scope,
            "k1",
            AlreadyDone,
            "a completed key is done for everyone",
        )
        .await;
    first.release(&scope, "k1").await;
    first
        .begin(
            &scope,
            "k1",
            AlreadyDone,
            "release never forgets a done key",
        )
        .await;
    // Keys of any length and content.
    let long = format!("{}/{}", "x".repeat(300), "\u{e9}\u{0}");
    first.begin(&scope, &long, New, "a long key is new").await;
    first.complete(&scope, &long).await;
    second
        .begin(&scope, &long, AlreadyDone, "a long key is remembered")
        .await;
    let longer = format!("{long}!");
    second
        .begin(&scope, &longer, New, "long keys that differ are different")
        .await;

    // An abandoned claim is taken over after claim_ttl; a done key is forgotten after ttl.
    first.begin(&scope, "k2", New, "a second key is new").await;
    tokio::time::sleep(claim_ttl + claim_ttl / 5).await;
    second
        .begin(
            &scope,
            "k2",
            New,
            "a claim older than claim_ttl is taken over",
        )
        .await;
    first
        .begin(
            &scope,
            "k1",
            AlreadyDone,
            "a done key is kept for ttl, beyond claim_ttl",
        )
        .await;
    tokio::time::sleep(ttl - claim_ttl).await;
    first
        .begin(&scope, "k1", New, "a done key older than ttl is forgotten")
        .await;
}

/// One of the two stores under check, named in its failures.
struct Handle<'a> {
    name: &'static str,
    store: &'a dyn DedupStore,
}

impl Handle<'_> {
    async fn begin(&self, scope: &str, key: &str, expected: Claim, rule: &str) {
        let claim = self
            .store
            .begin(scope, key)
            .await
            .unwrap_or_else(|e| panic!("{}: begin: {e}", self.name));
        assert_eq!(claim, expected, "{}: {rule}", self.name);
    }

    async fn complete(&self, scope: &str, key: &str) {
        self.store
            .complete(scope, key)
            .await
            .unwrap_or_else(|e| panic!("{}: complete: {e}", self.name));
    }

    async fn release(&self, scope: &str, key: &str) {
        self.store
            .release(scope, key)
            .await
            .unwrap_or_else(|e| panic!("{}: release: {e}", self.name));
    }
}
