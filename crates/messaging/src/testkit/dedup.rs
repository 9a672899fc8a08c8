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
    let scope = unique_name("handler");
    let other_scope = unique_name("other_handler");
    let begin = |store: &'static str, claim: Claim, expected: Claim, rule: &str| {
        assert_eq!(claim, expected, "{store}: {rule}");
    };
    begin(
        "first",
        first
            .begin(&scope, "k1")
            .await
            .unwrap_or_else(|e| panic!("begin: {e}")),
        Claim::New,
        "a key never seen is new",
    );
    begin(
        "second",
        second
            .begin(&scope, "k1")
            .await
            .unwrap_or_else(|e| panic!("begin: {e}")),
        Claim::InProgress,
        "a live claim is in progress for everyone else",
    );
    begin(
        "second",
        second
            .begin(&other_scope, "k1")
            .await
            .unwrap_or_else(|e| panic!("begin: {e}")),
        Claim::New,
        "scopes are separate",
    );
    first
        .release(&scope, "k1")
        .await
        .unwrap_or_else(|e| panic!("release: {e}"));
    begin(
        "second",
        second
            .begin(&scope, "k1")
            .await
            .unwrap_or_else(|e| panic!("begin: {e}")),
        Claim::New,
        "a released claim is free again",
    );
    second
        .complete(&scope, "k1")
        .await
        .unwrap_or_else(|e| panic!("complete: {e}"));
    begin(
        "first",
        first
            .begin(&scope, "k1")
            .await
            .unwrap_or_else(|e| panic!("begin: {e}")),
        Claim::AlreadyDone,
        "a completed key is done for everyone",
    );
    first
        .release(&scope, "k1")
        .await
        .unwrap_or_else(|e| panic!("release: {e}"));
    begin(
        "first",
        first
            .begin(&scope, "k1")
            .await
            .unwrap_or_else(|e| panic!("begin: {e}")),
        Claim::AlreadyDone,
        "release never forgets a done key",
    );
    // Keys of any length and content.
    let long = format!("{}/{}", "x".repeat(300), "\u{e9}\u{0}");
    begin(
        "first",
        first
            .begin(&scope, &long)
            .await
            .unwrap_or_else(|e| panic!("begin: {e}")),
        Claim::New,
        "a long key is new",
    );
    first
        .complete(&scope, &long)
        .await
        .unwrap_or_else(|e| panic!("complete: {e}"));
    begin(
        "second",
        second
            .begin(&scope, &long)
            .await
            .unwrap_or_else(|e| panic!("begin: {e}")),
        Claim::AlreadyDone,
        "a long key is remembered",
    );
    let longer = format!("{long}!");
    begin(
        "second",
        second
            .begin(&scope, &longer)
            .await
            .unwrap_or_else(|e| panic!("begin: {e}")),
        Claim::New,
        "long keys that differ are different",
    );

    // An abandoned claim is taken over after claim_ttl; a done key is forgotten after ttl.
    begin(
        "first",
        first
            .begin(&scope, "k2")
            .await
            .unwrap_or_else(|e| panic!("begin: {e}")),
        Claim::New,
        "a second key is new",
    );
    tokio::time::sleep(claim_ttl + claim_ttl / 5).await;
    begin(
        "second",
        second
            .begin(&scope, "k2")
            .await
            .unwrap_or_else(|e| panic!("begin: {e}")),
        Claim::New,
        "a claim older than claim_ttl is taken over",
    );
    begin(
        "first",
        first
            .begin(&scope, "k1")
            .await
            .unwrap_or_else(|e| panic!("begin: {e}")),
        Claim::AlreadyDone,
        "a done key is kept for ttl, beyond claim_ttl",
    );
    tokio::time::sleep(ttl - claim_ttl).await;
    begin(
        "first",
        first
            .begin(&scope, "k1")
            .await
            .unwrap_or_else(|e| panic!("begin: {e}")),
        Claim::New,
        "a done key older than ttl is forgotten",
    );
}
