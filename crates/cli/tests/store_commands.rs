//! The store commands (append, read, read-all, tail, delete, metadata, export, import) run as a
//! user runs them: against a real `factline serve` over HTTP, and on a data directory directly.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{
    io::Write as _,
    net::TcpListener,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_factline");

/// A `factline serve` child on a free loopback port, killed when dropped.
struct Served {
    child: Child,
    url: String,
}

impl Served {
    fn start(data: &std::path::Path) -> Self {
        Self::start_with(data, &[], "http")
    }

    /// `serve` with `extra` arguments, answering on `scheme`.
    fn start_with(data: &std::path::Path, extra: &[&std::ffi::OsStr], scheme: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(BIN)
            .args(["serve", "--data"])
            .arg(data)
            .args(["--listen", &listen])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let served = Self {
            child,
            url: format!("{scheme}://{listen}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&listen).is_err() {
            assert!(Instant::now() < deadline, "factline serve did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        served
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("FACTLINE_SERVER", &self.url)
            .env_remove("FACTLINE_DATA")
            .output()
            .unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn store_commands_work_over_http_and_on_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(&dir.path().join("served"));

    // Append one event, then a file of three, with expected versions.
    let out = ok(&server.run(&[
        "append",
        "order-1",
        "--type",
        "OrderPlaced",
        "--payload",
        r#"{"total":12}"#,
        "--metadata",
        "correlation_id=c-1",
        "-e",
        "no-stream",
        "--json",
    ]));
    let result: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(result["next_expected_version"], 0);
    let file = dir.path().join("events.ndjson");
    let mut f = std::fs::File::create(&file).unwrap();
    writeln!(f, r#"{{"type":"LineAdded","data":{{"sku":"a"}}}}"#).unwrap();
    writeln!(f, r#"{{"type":"LineAdded","data":{{"sku":"b"}}}}"#).unwrap();
    writeln!(f, r#"{{"type":"Blob","data_base64":"AAH/"}}"#).unwrap();
    drop(f);
    ok(&server.run(&[
        "append",
        "order-1",
        "--file",
        file.to_str().unwrap(),
        "-e",
        "0",
    ]));
    ok(&server.run(&[
        "append",
        "invoice-1",
        "--type",
        "Invoiced",
        "--payload",
        "1",
    ]));

    // A wrong expected version exits 3; a missing stream exits 4.
    let conflict = server.run(&[
        "append",
        "order-1",
        "--type",
        "X",
        "--payload",
        "1",
        "-e",
        "0",
    ]);
    assert_eq!(conflict.status.code(), Some(3), "{conflict:?}");
    assert!(String::from_utf8_lossy(&conflict.stderr).contains("expected 0, actual 3"));
    let missing = server.run(&["read", "order-404"]);
    assert_eq!(missing.status.code(), Some(4), "{missing:?}");

    // Read a stream (JSON lines and text), backwards and limited, and $all filtered.
    let events = json_lines(&ok(&server.run(&["read", "order-1", "--json"])));
    assert_eq!(events.len(), 4);
    assert_eq!(events[0]["metadata"]["correlation_id"], "c-1");
    assert_eq!(events[3]["data_base64"], "AAH/");
    let text = ok(&server.run(&["read", "order-1", "--backwards", "--limit", "1"]));
    assert!(
        text.contains("order-1@3") && text.contains("Blob"),
        "{text}"
    );
    let all = json_lines(&ok(&server.run(&["read-all", "--json"])));
    assert_eq!(all.len(), 5);
    let positions: Vec<u64> = all
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, vec![0, 1, 2, 3, 4]);
    let invoices = json_lines(&ok(&server.run(&[
        "read-all",
        "--category",
        "invoice",
        "--json",
    ])));
    assert_eq!(invoices.len(), 1);

    // Tail from the start stops after --count events.
    let tailed = json_lines(&ok(
        &server.run(&["tail", "--from", "start", "--count", "5", "--json"])
    ));
    assert_eq!(tailed.len(), 5);
    let tailed =
        json_lines(&ok(&server.run(&[
            "tail", "order-1", "--from", "2", "--count", "2", "--json",
        ])));
    assert_eq!(tailed[0]["revision"], 2);

    // Metadata set and get.
    ok(&server.run(&["metadata", "set", "invoice-1", "--max-count", "5"]));
    let metadata: Value =
        serde_json::from_str(ok(&server.run(&["metadata", "get", "invoice-1", "--json"])).trim())
            .unwrap();
    assert_eq!(metadata["max_count"], 5);

    // Export (both formats), then import into a data directory opened directly.
    let export = dir.path().join("export.ndjson");
    ok(&server.run(&["export", "--out", export.to_str().unwrap()]));
    let cloud = dir.path().join("export.cloudevents.ndjson");
    ok(&server.run(&["export", "--cloudevents", "--out", cloud.to_str().unwrap()]));
    let first_cloud: Value = serde_json::from_str(
        std::fs::read_to_string(&cloud)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first_cloud["specversion"], "1.0");
    assert_eq!(first_cloud["subject"], "order-1");

    for (name, file, cloudevents) in [("copy", &export, false), ("cloud", &cloud, true)] {
        let data = dir.path().join(name);
        let data_arg = data.to_str().unwrap();
        let mut args = vec!["import", file.to_str().unwrap(), "--data", data_arg];
        if cloudevents {
            args.push("--cloudevents");
        }
        ok(&server.run(&args));
        // A second import is an idempotent retry: nothing is written twice.
        ok(&server.run(&args));
        let copied = json_lines(&ok(&server.run(&["read-all", "--json", "--data", data_arg])));
        assert_eq!(copied.len(), 5, "{name}");
        for (copy, original) in copied.iter().zip(&all) {
            for field in [
                "id",
                "stream",
                "type",
                "revision",
                "data",
                "metadata",
                "content_type",
            ] {
                assert_eq!(copy[field], original[field], "{name}: {field}");
            }
        }
    }

    // Delete: soft, then a tombstone; the tombstoned stream refuses appends.
    ok(&server.run(&["delete", "invoice-1"]));
    assert_eq!(server.run(&["read", "invoice-1"]).status.code(), Some(4));
    ok(&server.run(&["delete", "order-1", "--hard"]));
    let refused = server.run(&["append", "order-1", "--type", "X", "--payload", "1"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("tombstoned"));

    // No server: a clear error naming the address.
    let nothing = Command::new(BIN)
        .args(["read", "order-1", "--server", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(nothing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("connecting to http://127.0.0.1:9"));
}

#[test]
fn commands_talk_to_an_https_server_given_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key_pair.serialize_pem()).unwrap();
    let server = Served::start_with(
        &dir.path().join("served"),
        &[
            "--tls-cert".as_ref(),
            cert_path.as_os_str(),
            "--tls-key".as_ref(),
            key_path.as_os_str(),
        ],
        "https",
    );
    let ca = cert_path.to_str().unwrap();
    ok(&server.run(&[
        "append",
        "secure-1",
        "--type",
        "Sealed",
        "--payload",
        "{}",
        "--ca-cert",
        ca,
    ]));
    let read = ok(&server.run(&["read", "secure-1", "--json", "--ca-cert", ca]));
    assert!(read.contains("Sealed"), "{read}");
    // Without the certificate the server is not trusted: a failure that says where it went.
    let refused = server.run(&["read", "secure-1"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("connecting to https://"), "{stderr}");
}

#[test]
fn bench_measures_appends_on_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .args([
            "bench",
            "--seconds",
            "1",
            "--writers",
            "4",
            "--batch",
            "2",
            "--json",
            "--data",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let summary: Value = serde_json::from_str(ok(&output).trim()).unwrap();
    let events = summary["events"].as_u64().unwrap();
    assert!(events >= 8 && events.is_multiple_of(2), "{summary}");
    assert!(
        summary["events_per_sec"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
    assert!(summary["p99_us"].as_u64().unwrap() >= summary["p50_us"].as_u64().unwrap());
    // What it wrote is there, and verify agrees.
    let verified = Command::new(BIN)
        .args(["verify", "--json", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    let report: Value = serde_json::from_str(&ok(&verified)).unwrap();
    assert_eq!(report["events"].as_u64().unwrap(), events);
}
