//! The web UI: its pages over real HTTP (everything escaped, strict security headers, the
//! assets embedded), and — with Chromium — the pages rendered and the live tail running in a
//! real browser, with a screenshot check.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

mod common;

use std::process::{Command, Stdio};

use common::{TestServer, event};
use serde_json::json;

const HOSTILE: &str = "<script>alert('x')</script><img src=x onerror=alert(1)>";

async fn html(server: &TestServer, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let response = server.client.get(server.url(path)).send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

async fn seeded() -> TestServer {
    let server = TestServer::memory().await;
    for (stream, event_type, data) in [
        (
            "order-1",
            "OrderPlaced",
            json!({"total": 12, "note": HOSTILE}),
        ),
        ("order-1", "OrderShipped", json!({"carrier": "ups"})),
        ("invoice-7", "InvoiceIssued", json!({"amount": 99})),
        ("order-<b>2</b>", "Odd<i>Type</i>", json!(HOSTILE)),
    ] {
        let (status, _) = server
            .append(
                &stream
                    .replace('<', "%3C")
                    .replace('>', "%3E")
                    .replace('/', "%2F"),
                None,
                event(event_type, data),
            )
            .await;
        assert_eq!(status, 201, "{stream}");
    }
    server
}

#[tokio::test]
async fn pages_show_the_store_and_escape_everything() {
    let server = seeded().await;

    let (status, headers, home) = html(&server, "/").await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'")
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    for stream in ["order-1", "invoice-7"] {
        assert!(home.contains(&format!(">{stream}</a>")), "{home}");
    }
    assert!(
        home.contains("order-&lt;b&gt;2&lt;/b&gt;"),
        "stream ids are escaped: {home}"
    );
    assert!(!home.contains("<b>2</b>"));
    assert!(home.contains("head position: <strong>3</strong>"), "{home}");

    // Search by prefix.
    let (_, _, found) = html(&server, "/?q=invoice-").await;
    assert!(
        found.contains(">invoice-7</a>") && !found.contains(">order-1</a>"),
        "{found}"
    );
    let (_, _, none) = html(&server, "/?q=nothing-").await;
    assert!(none.contains("No streams"), "{none}");

    // A stream page: pretty JSON, escaped payloads, metadata, a link to its live tail.
    let (status, _, page) = html(&server, "/ui/streams/order-1").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("&quot;total&quot;: 12"),
        "pretty JSON: {page}"
    );
    assert!(page.contains("&lt;script&gt;alert"), "{page}");
    assert!(!page.contains("<script>alert") && !page.contains("<img src=x"));
    assert!(page.contains("OrderShipped") && page.contains("max_count"));
    assert!(page.contains("href=\"/ui/tail?stream=order-1\""), "{page}");
    let (status, _, odd) = html(&server, "/ui/streams/order-%3Cb%3E2%3C%2Fb%3E").await;
    assert_eq!(status, 200);
    assert!(
        odd.contains("Odd&lt;i&gt;Type&lt;/i&gt;") && !odd.contains("<i>Type"),
        "{odd}"
    );

    // $all, filtered.
    let (status, _, all) = html(&server, "/ui/all?category=invoice").await;
    assert_eq!(status, 200);
    assert!(
        all.contains("InvoiceIssued") && !all.contains("OrderShipped"),
        "{all}"
    );

    // The live tail page points its script at the API's SSE endpoint.
    let (_, _, tail) = html(&server, "/ui/tail?stream=order-1&from=start").await;
    assert!(
        tail.contains("data-source=\"/streams/order-1/subscribe?from=start\""),
        "{tail}"
    );
    assert!(tail.contains("<script src=\"/ui/app.js\">"));
    let (_, _, tail_all) = html(&server, "/ui/tail").await;
    assert!(
        tail_all.contains("data-source=\"/all/subscribe?from=end\""),
        "{tail_all}"
    );

    // Errors are pages too.
    let (status, _, missing) = html(&server, "/ui/streams/order-404").await;
    assert_eq!(status, 404);
    assert!(missing.contains("no visible events"));
    let (status, _, bad) = html(&server, "/ui/streams/%24system").await;
    assert_eq!(status, 400);
    assert!(bad.contains("reserved"), "{bad}");

    // The assets are embedded and typed.
    let (status, headers, css) = html(&server, "/ui/app.css").await;
    assert_eq!(
        (status, headers["content-type"].to_str().unwrap()),
        (200, "text/css")
    );
    assert!(css.contains("table"));
    let (status, headers, js) = html(&server, "/ui/app.js").await;
    assert_eq!(
        (status, headers["content-type"].to_str().unwrap()),
        (200, "text/javascript")
    );
    assert!(js.contains("EventSource") && !js.contains("innerHTML"));
    server.stop().await;
}

/// Chromium, headless, with the flags that keep it off this machine's closed network.
fn chromium(binary: &str, profile: &std::path::Path) -> Command {
    let mut command = Command::new(binary);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    command
}

// Multi-threaded: the server keeps serving while the test waits for the browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium: set FACTLINE_TEST_CHROMIUM=/usr/bin/chromium"]
async fn a_browser_renders_the_pages_and_the_tail_over_sse() {
    let binary = std::env::var("FACTLINE_TEST_CHROMIUM")
        .expect("FACTLINE_TEST_CHROMIUM names the chromium binary");
    let server = seeded().await;
    let profile = tempfile::tempdir().unwrap();

    // A screenshot of a stream page: the right size, and not blank.
    let shot = profile.path().join("stream.png");
    let mut screenshot = chromium(&binary, profile.path());
    screenshot
        .args([
            "--window-size=1280,800",
            "--hide-scrollbars",
            "--timeout=10000",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(server.url("/ui/streams/order-1"));
    let status = tokio::task::spawn_blocking(move || screenshot.status().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "chromium --screenshot failed");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((info.width, info.height), (1280, 800));
    let channels = info.color_type.samples();
    let colors: std::collections::HashSet<&[u8]> =
        pixels[..info.buffer_size()].chunks(channels).collect();
    assert!(
        colors.len() > 20,
        "the page rendered ({} colors)",
        colors.len()
    );
    // Dark text pixels make up a visible share of the page (not a blank or error screen).
    let dark = pixels[..info.buffer_size()]
        .chunks(channels)
        .filter(|p| p[..3].iter().all(|&c| c < 100))
        .count();
    assert!(dark > 2_000, "{dark} dark pixels");

    // The DOM after the script ran: the live tail page subscribes over SSE and writes each
    // event as a row, as text (the hostile payload is not markup). With `limit` the page
    // closes its EventSource after that many events, so the browser's virtual time can run
    // out and it dumps the DOM then (an open event stream would keep it waiting). It
    // subscribes from the start; that catch-up and live delivery are one SSE path is the
    // conformance suite's business (tests/conformance.rs).
    let (status, _) = server
        .append(
            "live-1",
            None,
            event("HappenedLive", json!({"note": HOSTILE})),
        )
        .await;
    assert_eq!(status, 201);
    let mut tail = chromium(&binary, profile.path());
    tail.args([
        "--virtual-time-budget=5000",
        "--timeout=30000",
        "--dump-dom",
    ])
    .arg(server.url("/ui/tail?from=start&limit=5"))
    .stdout(Stdio::piped());
    let output = tokio::task::spawn_blocking(move || tail.output().unwrap())
        .await
        .unwrap();
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        dom.contains("id=\"tail-status\">stopped after 5 events<"),
        "{dom}"
    );
    assert!(
        dom.contains("<td>live-1</td>"),
        "the event reached the page: {dom}"
    );
    assert!(dom.contains("<td>HappenedLive</td>"), "{dom}");
    assert!(dom.contains("<td>order-&lt;b&gt;2&lt;/b&gt;</td>"), "{dom}");
    assert!(dom.contains("&lt;script&gt;alert"), "{dom}");
    assert!(!dom.contains("<img src=\"x\""), "{dom}");
    assert!(
        dom.contains("id=\"tail-count\">5<"),
        "all five events: {dom}"
    );

    // The subscriptions page renders a group in the browser too.
    let created = server
        .client
        .put(server.url("/subscriptions/billing"))
        .json(&json!({"source": {"kind": "all", "category": "order"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let mut groups = chromium(&binary, profile.path());
    groups
        .args(["--timeout=10000", "--dump-dom"])
        .arg(server.url("/ui/subscriptions"))
        .stdout(Stdio::piped());
    let output = tokio::task::spawn_blocking(move || groups.output().unwrap())
        .await
        .unwrap();
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(dom.contains("<strong>billing</strong>"), "{dom}");
    assert!(dom.contains("$all category=order"), "{dom}");
    server.stop().await;
}

#[tokio::test]
async fn the_subscriptions_page_lists_groups_with_their_consumers_escaped() {
    let server = seeded().await;
    let (_, _, empty) = html(&server, "/ui/subscriptions").await;
    assert!(empty.contains("No groups."), "{empty}");

    for (group, body) in [
        (
            "billing",
            json!({"source": {"kind": "all", "category": "order"}, "strategy": "pinned"}),
        ),
        (
            "%3Ci%3Eodd%3C%2Fi%3E",
            json!({"source": {"kind": "stream", "stream": "invoice-7"}}),
        ),
    ] {
        let response = server
            .client
            .put(server.url(&format!("/subscriptions/{group}")))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{group}");
    }
    // A connected consumer, with a name that is not markup.
    let consumer = server
        .client
        .get(server.url("/subscriptions/billing/consume?name=worker-%3Cb%3E1"))
        .send()
        .await
        .unwrap();
    assert_eq!(consumer.status(), 200);

    let (status, _, page) = html(&server, "/ui/subscriptions").await;
    assert_eq!(status, 200);
    assert!(page.contains("groups: <strong>2</strong>"), "{page}");
    assert!(page.contains("<strong>billing</strong>"), "{page}");
    assert!(
        page.contains("$all category=order") && page.contains("pinned"),
        "{page}"
    );
    assert!(
        page.contains("stream invoice-7") && page.contains("roundrobin"),
        "{page}"
    );
    assert!(
        page.contains("&lt;i&gt;odd&lt;/i&gt;") && !page.contains("<i>odd"),
        "group names are escaped: {page}"
    );
    assert!(
        page.contains("worker-&lt;b&gt;1") && !page.contains("worker-<b>"),
        "consumer names are escaped: {page}"
    );
    assert!(
        page.contains("href=\"/ui/streams/factline.parked-billing\""),
        "the parked count links to the dead-letter stream: {page}"
    );
    let (_, _, home) = html(&server, "/").await;
    assert!(home.contains("href=\"/ui/subscriptions\""), "{home}");
    drop(consumer);
    server.stop().await;
}

#[tokio::test]
async fn the_subscriptions_page_lists_checkpoints_with_their_lag() {
    use std::sync::Arc;

    use factline_core::{CheckpointStore, InMemoryCheckpointStore, InMemoryStore, Position};
    use factline_server::ServerOptions;

    let unset = seeded().await;
    let (_, _, page) = html(&unset, "/ui/subscriptions").await;
    assert!(page.contains("not given a checkpoint store"), "{page}");
    unset.stop().await;

    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    checkpoints
        .save_checkpoint("orders-summary", Position(1))
        .await
        .unwrap();
    checkpoints
        .save_checkpoint("process:<checkout>", Position(4))
        .await
        .unwrap();
    let server = TestServer::start(
        Arc::new(InMemoryStore::new()),
        ServerOptions::default().checkpoints(checkpoints),
    )
    .await;
    for n in 0..5 {
        let (status, _) = server
            .append("order-1", None, event("OrderPlaced", json!({"n": n})))
            .await;
        assert_eq!(status, 201);
    }
    let (status, _, page) = html(&server, "/ui/subscriptions").await;
    assert_eq!(status, 200);
    let summary = page.find("<td>orders-summary</td>").expect("listed");
    let checkout = page
        .find("<td>process:&lt;checkout&gt;</td>")
        .expect("escaped");
    assert!(summary < checkout, "in name order: {page}");
    // Head 4: the summary is 3 behind, the checkout caught up.
    assert!(
        page[summary..]
            .starts_with("<td>orders-summary</td><td class=\"num\">1</td><td class=\"num\">3</td>"),
        "{page}"
    );
    assert!(
        page[checkout..].contains("<td class=\"num\">4</td><td class=\"num\">0</td>"),
        "{page}"
    );
    server.stop().await;
}
