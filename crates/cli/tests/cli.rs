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

#[test]
fn verify_checks_a_data_directory_and_names_corruption() {
    use factline_core::{EventData, EventStore, ExpectedVersion, StreamId};
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = factline_log::LogStore::open(dir.path()).await.unwrap();
        let stream = StreamId::new("order-1").unwrap();
        for i in 0..3 {
            let event = EventData::json("OrderPlaced", &serde_json::json!({ "i": i })).unwrap();
            store
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await
                .unwrap();
        }
        store.close().await;
    });
    let data = dir.path().to_str().unwrap();
    let ok = factline(&["verify", "--data", data, "--json"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(report["events"], 3);

    // Damage the first record: verify must fail and name the file and offset.
    let segment = dir.path().join("segments").join("0000000000.seg");
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[64 + 30] ^= 0xff;
    std::fs::write(&segment, bytes).unwrap();
    let bad = factline(&["verify", "--data", data]);
    assert_eq!(bad.status.code(), Some(1));
    let message = String::from_utf8_lossy(&bad.stderr);
    assert!(
        message.contains("0000000000.seg") && message.contains("offset 64"),
        "{message}"
    );

    let missing = factline(&["verify", "--data", "/nonexistent/factline"]);
    assert_eq!(missing.status.code(), Some(1));
}

#[test]
fn checkpoints_are_listed_with_their_lag_and_reset_for_a_rebuild() {
    use factline_core::{
        CheckpointStore, EventData, EventStore, ExpectedVersion, Position, StreamId,
    };
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = factline_log::LogStore::open(dir.path()).await.unwrap();
        let stream = StreamId::new("order-1").unwrap();
        let events = (0..10)
            .map(|i| EventData::json("OrderPlaced", &serde_json::json!({ "i": i })).unwrap())
            .collect();
        store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .unwrap();
        let checkpoints = store.checkpoints();
        checkpoints
            .save_checkpoint("orders-summary", Position(3))
            .await
            .unwrap();
        checkpoints
            .save_checkpoint("process:checkout", Position(9))
            .await
            .unwrap();
        store.close().await;
    });
    let data = dir.path().to_str().unwrap();
    let listed = factline(&["checkpoints", "list", "--data", data, "--json"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            serde_json::json!({"name": "orders-summary", "position": 3, "behind": 6}),
            serde_json::json!({"name": "process:checkout", "position": 9, "behind": 0}),
        ]
    );

    let reset = factline(&["checkpoints", "reset", "orders-summary", "--data", data]);
    assert!(
        reset.status.success(),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    assert!(String::from_utf8_lossy(&reset.stdout).contains("rebuilds from position 0"));
    let again = factline(&["checkpoints", "reset", "orders-summary", "--data", data]);
    assert_eq!(again.status.code(), Some(4), "not found");
    assert!(String::from_utf8_lossy(&again.stderr).contains("no checkpoint named"));
    let table = factline(&["checkpoints", "list", "--data", data]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains("process:checkout") && !table.contains("orders-summary"),
        "{table}"
    );
    let nowhere = factline(&["checkpoints", "list", "--data", "/nonexistent/factline"]);
    assert_eq!(nowhere.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nowhere.stderr).contains("no segments folder"));
}
