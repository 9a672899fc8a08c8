//! The demo binary: the walk-through, and a rebuild of the order summaries.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::process::Command;

fn demo(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_factline-example-orders"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn the_walk_through_ends_shipped_and_the_rebuild_summarizes_every_order() {
    let (ok, out, err) = demo(&[]);
    assert!(ok, "{err}");
    assert!(out.contains("final state: Shipped"), "{out}");

    let (ok, out, err) = demo(&["rebuild", "500"]);
    assert!(ok, "{err}");
    assert!(out.contains("over 500 orders (1000 events)"), "{out}");
    assert!(
        out.contains("done at position 999: 500 orders summarized"),
        "{out}"
    );

    let (ok, _, err) = demo(&["rebuild", "many"]);
    assert!(!ok);
    assert!(err.contains("rebuild takes a number of orders"), "{err}");
}
