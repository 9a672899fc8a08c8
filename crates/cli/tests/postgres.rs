//! `factline serve --store postgres://…` and `factline migrate` against the real PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::TcpListener,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_factline");

fn url() -> String {
    std::env::var("FACTLINE_TEST_POSTGRES_URL")
        .expect("FACTLINE_TEST_POSTGRES_URL must name a PostgreSQL database (see scripts/test-all)")
}

fn fresh_schema() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!("ft_{secs}_{}_cli", std::process::id())
}

struct Served {
    child: Child,
    url: String,
}

impl Served {
    fn start(schema: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(BIN)
            .args([
                "serve",
                "--store",
                &url(),
                "--pg-schema",
                schema,
                "--listen",
                &listen,
            ])
            .env_remove("FACTLINE_DATA")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&listen).is_err() {
            assert!(Instant::now() < deadline, "factline serve did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            url: format!("http://{listen}"),
        }
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

/// The body of a plain HTTP/1.1 GET.
fn http_get(base: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let address = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn migrate(schema: &str, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(["migrate", "--store", &url(), "--pg-schema", schema])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
fn serve_on_postgres_keeps_events_across_restarts_and_migrate_reports() {
    let schema = fresh_schema();
    let pending = ok(&migrate(&schema, &["--dry-run"]));
    assert!(pending.contains("pending"), "{pending}");
    let first = ok(&migrate(&schema, &[]));
    assert!(first.contains("applied now"), "{first}");
    let again = ok(&migrate(&schema, &[]));
    assert!(
        again.contains("already applied") && again.contains("(0 applied now)"),
        "{again}"
    );

    let server = Served::start(&schema);
    ok(&server.run(&[
        "append",
        "order-1",
        "--type",
        "OrderPlaced",
        "--payload",
        r#"{"total":12}"#,
        "-e",
        "no-stream",
    ]));
    // The writer's metrics reach the server's Prometheus endpoint.
    let metrics = http_get(&server.url, "/metrics");
    assert!(
        metrics.contains("factline_postgres_batches_total"),
        "{metrics}"
    );
    drop(server);
    // A second server on the same schema sees what the first stored.
    let server = Served::start(&schema);
    let read = ok(&server.run(&["read", "order-1", "--json"]));
    let event: serde_json::Value = serde_json::from_str(read.lines().next().unwrap()).unwrap();
    assert_eq!(event["type"], "OrderPlaced");
    assert_eq!(event["revision"], 0);
    assert_eq!(event["data"]["total"], 12);
    drop(server);

    // Errors name what is wrong.
    let bad = Command::new(BIN)
        .args(["serve", "--store", "mysql://x", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown store"));
    let bad_schema = migrate("Not-Valid", &[]);
    assert!(!bad_schema.status.success());
    assert!(String::from_utf8_lossy(&bad_schema.stderr).contains("schema name"));

    let cleanup = Command::new("psql")
        .args([
            &url(),
            "-q",
            "-c",
            &format!("DROP SCHEMA \"{schema}\" CASCADE"),
        ])
        .output();
    drop(cleanup);
}
