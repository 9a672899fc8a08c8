//! The `factline` binary, run as a user would.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::process::Command;

fn factline(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_factline"))
        .args(args)
        .output()
        .expect("the factline binary runs")
}

#[test]
fn help_lists_the_commands() {
    let out = factline(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("limits") && text.contains("check-stream-id"),
        "{text}"
    );
}

#[test]
fn no_arguments_prints_help_and_fails_as_a_usage_error() {
    let out = factline(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
}

#[test]
fn limits_prints_json() {
    let out = factline(&["limits", "--json"]);
    assert!(out.status.success());
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["event_size_bytes_max"], 1024 * 1024);
    assert_eq!(value["stream_id_bytes_max"], 255);
}

#[test]
fn check_stream_id_explains_a_bad_id() {
    let ok = factline(&["check-stream-id", "order-42"]);
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("\"order\""));
    let bad = factline(&["check-stream-id", "$all"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("reserved"));
}
