//! The HTTP API over real HTTP: every endpoint and every error code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{sync::Arc, time::Duration};

use common::{SseReader, TestServer, event, json_response};
use factline_core::{InMemoryStore, Limits};
use factline_server::ServerOptions;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn append_then_read_returns_the_events_as_sent() {
    let server = TestServer::memory().await;
    let id = "0194f3a0-0000-7000-8000-000000000001";
    let (status, body) = server
        .append(
            "order-1",
            Some("no-stream"),
            json!([
                {"id": id, "type": "OrderPlaced", "data": {"total_cents": 1250, "lines": [1, 2]},
                 "metadata": {"correlation_id": "c-1"}},
                {"type": "OrderPaid", "data": {"amount": 12.5}}
            ]),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["next_expected_version"], 1);
    assert_eq!(body["position"], 1);
    assert!(body["recorded_at"].as_str().unwrap().ends_with('Z'));

    let (status, page) = server.get("/streams/order-1").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["stream"], "order-1");
    assert_eq!(page["last_revision"], 1);
    assert_eq!(page["is_end"], true);
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["id"], id);
    assert_eq!(events[0]["type"], "OrderPlaced");
    assert_eq!(events[0]["revision"], 0);
    assert_eq!(events[0]["position"], 0);
    assert_eq!(events[0]["stream"], "order-1");
    assert_eq!(events[0]["content_type"], "application/json");
    assert_eq!(
        events[0]["data"],
        json!({"total_cents": 1250, "lines": [1, 2]})
    );
    assert_eq!(events[0]["metadata"], json!({"correlation_id": "c-1"}));
    assert_eq!(events[1]["data"], json!({"amount": 12.5}));
    assert_eq!(events[1]["id"].as_str().unwrap().len(), 36);

    // One object (not an array) is one event; the next expected version chains.
    let (status, body) = server
        .append("order-1", Some("1"), event("OrderShipped", json!(null)))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["next_expected_version"], 2);
    server.stop().await;
}

#[tokio::test]
async fn binary_payloads_round_trip_as_base64() {
    let server = TestServer::memory().await;
    let (status, body) = server
        .append(
            "blob-1",
            None,
            json!({"type": "BlobStored", "data_base64": "AAEC/w=="}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (_, page) = server.get("/streams/blob-1").await;
    let stored = &page["events"][0];
    assert_eq!(stored["content_type"], "application/octet-stream");
    assert_eq!(stored["data"], Value::Null);
    assert_eq!(stored["data_base64"], "AAEC/w==");
    server.stop().await;
}

#[tokio::test]
async fn expected_versions_are_checked_and_conflicts_say_expected_and_actual() {
    let server = TestServer::memory().await;
    let (status, body) = server
        .append("order-2", Some("exists"), event("OrderPlaced", json!({})))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "wrong_expected_version");
    assert_eq!(body["expected"], "exists");
    assert_eq!(body["actual"], "no-stream");
    assert_eq!(body["stream"], "order-2");

    server
        .append(
            "order-2",
            Some("no-stream"),
            event("OrderPlaced", json!({})),
        )
        .await;
    let (status, body) = server
        .append(
            "order-2",
            Some("no-stream"),
            event("OrderPlaced", json!({})),
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(body["actual"], 0);
    let (status, body) = server
        .append("order-2", Some("5"), event("OrderPaid", json!({})))
        .await;
    assert_eq!(status, 409);
    assert_eq!(body["expected"], 5);
    assert_eq!(body["actual"], 0);
    assert!(body["message"].as_str().unwrap().contains("expected 5"));
    let (status, _) = server
        .append("order-2", Some("any"), event("OrderPaid", json!({})))
        .await;
    assert_eq!(status, 201);
    server.stop().await;
}

#[tokio::test]
async fn retries_with_the_same_ids_are_idempotent_and_partial_overlaps_conflict() {
    let server = TestServer::memory().await;
    let batch = json!([
        {"id": "0194f3a0-0000-7000-8000-00000000000a", "type": "A", "data": 1},
        {"id": "0194f3a0-0000-7000-8000-00000000000b", "type": "B", "data": 2}
    ]);
    let (first_status, first) = server
        .append("retry-1", Some("no-stream"), batch.clone())
        .await;
    let (again_status, again) = server.append("retry-1", Some("no-stream"), batch).await;
    assert_eq!((first_status, again_status), (201, 201));
    assert_eq!(first, again);
    let overlap = json!([
        {"id": "0194f3a0-0000-7000-8000-00000000000b", "type": "B", "data": 2},
        {"id": "0194f3a0-0000-7000-8000-00000000000c", "type": "C", "data": 3}
    ]);
    let (status, body) = server.append("retry-1", Some("0"), overlap).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "idempotency_conflict");
    let (_, page) = server.get("/streams/retry-1").await;
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    server.stop().await;
}

async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    let (actual, body) = json_response(response).await;
    assert_eq!(actual, status, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(!body["message"].as_str().unwrap().is_empty());
    body
}

#[tokio::test]
async fn bad_input_gets_a_json_error_with_the_right_status() {
    let mut limits = Limits::default();
    limits.event_size_bytes_max = 1_000;
    let store = Arc::new(InMemoryStore::with_limits(limits));
    let server = TestServer::start(store, ServerOptions::default().body_bytes_max(64 * 1024)).await;
    let client = &server.client;
    let post = |path: &str| client.post(server.url(path));

    // Stream ids.
    let body = expect_error(
        post("/streams/$all")
            .json(&event("A", json!(1)))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_stream_id",
    )
    .await;
    assert!(body["message"].as_str().unwrap().contains("reserved"));
    expect_error(
        post("/streams/a%01b")
            .json(&event("A", json!(1)))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_stream_id",
    )
    .await;
    let long = "s".repeat(256);
    expect_error(
        post(&format!("/streams/{long}"))
            .json(&event("A", json!(1)))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_stream_id",
    )
    .await;
    // Headers.
    expect_error(
        post("/streams/x-1")
            .header("Expected-Version", "latest")
            .json(&event("A", json!(1)))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_expected_version",
    )
    .await;
    // Bodies.
    let body = expect_error(
        post("/streams/x-1")
            .header("content-type", "application/json")
            .body("[{\"type\": \"A\", \"data\": }]")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_json",
    )
    .await;
    assert_eq!(body["line"], 1);
    expect_error(
        post("/streams/x-1")
            .json(&json!([{"type": "A", "data": 1, "extra": 2}]))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_json",
    )
    .await;
    expect_error(
        post("/streams/x-1")
            .json(&json!([{"type": "A"}]))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_event",
    )
    .await;
    expect_error(
        post("/streams/x-1").json(&json!([])).send().await.unwrap(),
        400,
        "invalid_event",
    )
    .await;
    expect_error(
        post("/streams/x-1")
            .json(&json!([{"type": "", "data": 1}]))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_event",
    )
    .await;
    expect_error(
        post("/streams/x-1")
            .json(&json!([{"id": "00000000-0000-0000-0000-000000000000", "type": "A", "data": 1}]))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_event",
    )
    .await;
    expect_error(
        post("/streams/x-1")
            .json(&json!([{"type": "A", "data_base64": "!!"}]))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_event",
    )
    .await;
    expect_error(
        post("/streams/x-1")
            .header("content-type", "text/plain")
            .body("[]")
            .send()
            .await
            .unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    // Limits: the body, then one event.
    let huge = "x".repeat(70 * 1024);
    let body = expect_error(
        post("/streams/x-1")
            .json(&event("A", json!(huge)))
            .send()
            .await
            .unwrap(),
        413,
        "body_too_large",
    )
    .await;
    assert_eq!(body["max"], 64 * 1024);
    let big = "x".repeat(2_000);
    let body = expect_error(
        post("/streams/x-1")
            .json(&event("A", json!(big)))
            .send()
            .await
            .unwrap(),
        413,
        "limit_exceeded",
    )
    .await;
    assert_eq!(body["limit"], "event_size_bytes_max");
    assert_eq!(body["max"], 1_000);
    let body = expect_error(
        client
            .get(server.url("/all?limit=1000000"))
            .send()
            .await
            .unwrap(),
        400,
        "limit_exceeded",
    )
    .await;
    assert_eq!(body["limit"], "read_count_max");
    // Queries.
    expect_error(
        client.get(server.url("/all?from=-1")).send().await.unwrap(),
        400,
        "invalid_query",
    )
    .await;
    expect_error(
        client
            .get(server.url("/streams/x-1?direction=sideways"))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_query",
    )
    .await;
    // Routes and methods.
    expect_error(
        client.get(server.url("/nope")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    expect_error(
        client
            .patch(server.url("/streams/x-1"))
            .send()
            .await
            .unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    // Nothing was written by any of it.
    let (_, page) = server.get("/all").await;
    assert_eq!(page["events"], json!([]));
    server.stop().await;
}

#[tokio::test]
async fn reads_page_in_both_directions_and_all_filters() {
    let server = TestServer::memory().await;
    for i in 0..5 {
        server
            .append("order-9", None, event("OrderNoted", json!({"i": i})))
            .await;
        server
            .append(
                &format!("customer-{i}"),
                None,
                event("CustomerSeen", json!(i)),
            )
            .await;
    }
    let (_, page) = server.get("/streams/order-9?from=1&limit=2").await;
    let revisions: Vec<_> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revisions, [1, 2]);
    assert_eq!(page["next_revision"], 3);
    assert_eq!(page["is_end"], false);
    let (_, page) = server
        .get("/streams/order-9?direction=backwards&limit=2")
        .await;
    let revisions: Vec<_> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revisions, [4, 3]);

    let (_, page) = server.get("/all?prefix=customer-&limit=3").await;
    let streams: Vec<_> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["stream"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(streams, ["customer-0", "customer-1", "customer-2"]);
    let next = page["next_position"].as_u64().unwrap();
    let (_, page) = server
        .get(&format!("/all?prefix=customer-&from={next}"))
        .await;
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    assert_eq!(page["is_end"], true);
    let (_, page) = server.get("/all?type=OrderN&category=order").await;
    assert_eq!(page["events"].as_array().unwrap().len(), 5);
    let (_, page) = server.get("/all?direction=backwards&limit=1").await;
    assert_eq!(page["events"][0]["position"], 9);

    let (status, body) = server.get("/streams/order-404").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("stream_not_found"))
    );
    server.stop().await;
}

#[tokio::test]
async fn multi_stream_appends_are_atomic() {
    let server = TestServer::memory().await;
    let request = json!({"streams": [
        {"stream": "account-a", "expected_version": "no-stream", "events": [event("Debited", json!(5))]},
        {"stream": "account-b", "expected_version": "no-stream", "events": [event("Credited", json!(5))]},
    ]});
    let (status, body) = json_response(
        server
            .client
            .post(server.url("/append"))
            .json(&request)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["results"][0]["stream"], "account-a");
    assert_eq!(body["results"][1]["position"], 1);
    // One failing check writes nothing.
    let request = json!({"streams": [
        {"stream": "account-a", "expected_version": 0, "events": [event("Debited", json!(1))]},
        {"stream": "account-b", "expected_version": 7, "events": [event("Credited", json!(1))]},
    ]});
    let (status, body) = json_response(
        server
            .client
            .post(server.url("/append"))
            .json(&request)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["stream"], "account-b");
    let (_, page) = server.get("/all").await;
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    let twice = json!({"streams": [
        {"stream": "account-a", "events": [event("A", json!(1))]},
        {"stream": "account-a", "events": [event("B", json!(1))]},
    ]});
    let (status, body) = json_response(
        server
            .client
            .post(server.url("/append"))
            .json(&twice)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("duplicate_stream"))
    );
    server.stop().await;
}

#[tokio::test]
async fn deletes_soft_and_hard_and_metadata() {
    let server = TestServer::memory().await;
    let client = &server.client;
    server
        .append("cart-1", None, event("ItemAdded", json!(1)))
        .await;
    server
        .append("cart-1", None, event("ItemAdded", json!(2)))
        .await;

    // Metadata: defaults, set, validation.
    let (status, body) = server.get("/streams/cart-1/metadata").await;
    assert_eq!((status, body), (200, json!({})));
    let (status, body) = json_response(
        client
            .put(server.url("/streams/cart-1/metadata"))
            .json(&json!({"max_count": 1}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body.clone()),
        (200, json!({"max_count": 1})),
        "{body}"
    );
    let (_, page) = server.get("/streams/cart-1").await;
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    let (status, body) = json_response(
        client
            .put(server.url("/streams/cart-1/metadata"))
            .json(&json!({"max_count": 0}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str(), body["field"].as_str()),
        (400, Some("invalid_metadata"), Some("max_count"))
    );

    // Soft delete: hidden, then the stream continues.
    let delete = client
        .delete(server.url("/streams/cart-1"))
        .header("Expected-Version", "0")
        .send()
        .await
        .unwrap();
    let (status, body) = json_response(delete).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("wrong_expected_version"))
    );
    let delete = client
        .delete(server.url("/streams/cart-1"))
        .header("Expected-Version", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status().as_u16(), 204);
    let (status, _) = server.get("/streams/cart-1").await;
    assert_eq!(status, 404);
    let (status, body) = server
        .append("cart-1", None, event("ItemAdded", json!(3)))
        .await;
    assert_eq!(
        (status, body["next_expected_version"].as_u64()),
        (201, Some(2))
    );

    // Hard delete: gone for good.
    let delete = client
        .delete(server.url("/streams/cart-1?hard=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status().as_u16(), 204);
    let (status, body) = server.get("/streams/cart-1").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (410, Some("stream_deleted"))
    );
    let (status, body) = server
        .append("cart-1", None, event("ItemAdded", json!(4)))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (410, Some("stream_deleted"))
    );
    let (status, _) = server.get("/streams/cart-1/metadata").await;
    assert_eq!(status, 410);
    let delete = client
        .delete(server.url("/streams/never-1"))
        .send()
        .await
        .unwrap();
    let (status, body) = json_response(delete).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("stream_not_found"))
    );
    server.stop().await;
}

#[tokio::test]
async fn health_metrics_and_openapi() {
    let server = TestServer::memory().await;
    let (status, body) = server.get("/health").await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    server
        .append("m-1", None, event("Measured", json!(1)))
        .await;
    let (_, body) = server.get("/health").await;
    assert_eq!(body["head_position"], 0);

    let metrics = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status().as_u16(), 200);
    let text = metrics.text().await.unwrap();
    assert!(text.contains("factline_http_requests_total"), "{text}");
    assert!(
        text.contains("factline_http_appended_events_total"),
        "{text}"
    );
    assert!(
        text.contains("factline_http_request_duration_seconds_bucket"),
        "{text}"
    );

    let (status, doc) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let documented: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| (path.clone(), method.clone()))
        })
        .collect();
    for (path, method) in [
        ("/streams/{stream}", "post"),
        ("/streams/{stream}", "get"),
        ("/streams/{stream}", "delete"),
        ("/streams/{stream}/metadata", "get"),
        ("/streams/{stream}/metadata", "put"),
        ("/streams/{stream}/subscribe", "get"),
        ("/all", "get"),
        ("/all/subscribe", "get"),
        ("/append", "post"),
        ("/streams/{stream}/snapshot", "get"),
        ("/streams/{stream}/snapshot", "put"),
        ("/streams/{stream}/snapshot", "delete"),
        ("/info", "get"),
        ("/health", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
    ] {
        assert!(
            documented.contains(&(path.to_owned(), method.to_owned())),
            "{method} {path} is not documented"
        );
    }
    // Every documented operation is routed (a 405 or the fallback 404 would mean it is not).
    for (path, method) in &documented {
        if path.ends_with("/subscribe") {
            continue; // an event stream never ends; covered by the SSE tests
        }
        let url = server.url(&path.replace("{stream}", "doc-1"));
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let response = server
            .client
            .request(method.clone(), url)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let (status, body) = json_response_lenient(response).await;
        assert!(
            status != 405 && !(status == 404 && body["error"] == "not_found"),
            "{method} {path} is documented but not routed: {status} {body}"
        );
    }
    server.stop().await;
}

async fn json_response_lenient(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn stream_subscriptions_catch_up_go_live_and_resume_after_last_event_id() {
    let server = TestServer::memory().await;
    for i in 0..3 {
        server
            .append("order-7", None, event("Noted", json!(i)))
            .await;
        server
            .append("other-7", None, event("Noise", json!(i)))
            .await;
    }
    let response = server
        .client
        .get(server.url("/streams/order-7/subscribe"))
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(response);
    let mut ids = Vec::new();
    for revision in 0..3 {
        let message = sse.next_within(WAIT).await.unwrap();
        assert_eq!(message.json()["revision"], revision);
        assert_eq!(
            message.id.clone().unwrap(),
            message.json()["position"].to_string()
        );
        ids.push(message.id.unwrap());
    }
    // Live.
    server
        .append("order-7", None, event("Noted", json!(3)))
        .await;
    let live = sse.next_within(WAIT).await.unwrap();
    assert_eq!(live.json()["revision"], 3);
    assert_eq!(live.json()["data"], 3);
    drop(sse);

    // Resume after the second event: the third and the live one follow, nothing else.
    let response = server
        .client
        .get(server.url("/streams/order-7/subscribe"))
        .header("Last-Event-ID", &ids[1])
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(response);
    assert_eq!(sse.next_within(WAIT).await.unwrap().json()["revision"], 2);
    assert_eq!(sse.next_within(WAIT).await.unwrap().json()["revision"], 3);
    drop(sse);

    // from=end: only new events.
    let response = server
        .client
        .get(server.url("/streams/order-7/subscribe?from=end"))
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(response);
    server
        .append("order-7", None, event("Noted", json!(4)))
        .await;
    assert_eq!(sse.next_within(WAIT).await.unwrap().json()["revision"], 4);

    // A Last-Event-ID of another stream's event is refused.
    let response = server
        .client
        .get(server.url("/streams/order-7/subscribe"))
        .header("Last-Event-ID", "1")
        .send()
        .await
        .unwrap();
    let (status, body) = json_response(response).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_last_event_id"))
    );

    // A tombstone ends the subscription with an error message.
    server
        .client
        .delete(server.url("/streams/order-7?hard=true"))
        .send()
        .await
        .unwrap();
    let error = sse.next_within(WAIT).await.unwrap();
    assert_eq!(error.event.as_deref(), Some("error"));
    assert_eq!(error.json()["error"], "stream_deleted");
    assert!(sse.next_within(WAIT).await.is_none());
    server.stop().await;
}

#[tokio::test]
async fn all_subscriptions_filter_and_resume() {
    let server = TestServer::memory().await;
    for i in 0..4 {
        server
            .append(&format!("order-{i}"), None, event("OrderPlaced", json!(i)))
            .await;
        server
            .append(&format!("user-{i}"), None, event("UserSeen", json!(i)))
            .await;
    }
    let response = server
        .client
        .get(server.url("/all/subscribe?category=order&from=2"))
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(response);
    let first = sse.next_within(WAIT).await.unwrap();
    assert_eq!(first.json()["stream"], "order-1");
    assert_eq!(first.id.as_deref(), Some("2"));
    let response = server
        .client
        .get(server.url("/all/subscribe?type=User"))
        .header("Last-Event-ID", "5")
        .send()
        .await
        .unwrap();
    let mut users = SseReader::new(response);
    assert_eq!(
        users.next_within(WAIT).await.unwrap().json()["stream"],
        "user-3"
    );
    server
        .append("user-9", None, event("UserSeen", json!(9)))
        .await;
    assert_eq!(
        users.next_within(WAIT).await.unwrap().json()["stream"],
        "user-9"
    );
    server.stop().await;
}

#[tokio::test]
async fn subscribers_are_limited_and_released_when_clients_leave() {
    let store = Arc::new(InMemoryStore::new());
    let server = TestServer::start(store, ServerOptions::default().subscribers_max(2)).await;
    let open = |_: ()| server.client.get(server.url("/all/subscribe")).send();
    let first = SseReader::new(open(()).await.unwrap());
    let _second = SseReader::new(open(()).await.unwrap());
    let (status, body) = json_response(open(()).await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_subscribers"))
    );
    drop(first);
    // The permit returns once the server notices the closed connection.
    let mut reopened = false;
    for _ in 0..100 {
        let response = open(()).await.unwrap();
        if response.status().as_u16() == 200 {
            reopened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reopened, "a closed subscription frees its slot");
    server.stop().await;
}

#[tokio::test]
async fn keep_alives_flow_and_shutdown_ends_open_subscriptions() {
    let store = Arc::new(InMemoryStore::new());
    let server = TestServer::start(store, ServerOptions::default().sse_keep_alive_ms(50)).await;
    let response = server
        .client
        .get(server.url("/all/subscribe"))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    use futures::StreamExt as _;
    let chunk = tokio::time::timeout(WAIT, body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&chunk).contains(": keep-alive"),
        "{chunk:?}"
    );
    // Graceful shutdown must not hang on the open subscription.
    server.stop().await;
}

#[tokio::test]
async fn a_non_loopback_address_needs_auth_or_insecure() {
    let store = Arc::new(InMemoryStore::new());
    let options = ServerOptions::default().listen("0.0.0.0:0".parse().unwrap());
    let error = factline_server::Server::bind(store.clone(), options.clone())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("--insecure"), "{error}");
    assert!(
        factline_server::Server::bind(store, options.insecure(true))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn snapshots_round_trip_and_bad_ones_are_refused() {
    let server = TestServer::memory().await;
    let (status, body) = server.get("/streams/order-9/snapshot").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "snapshot_not_found");

    let put = |body: Value| {
        server
            .client
            .put(server.url("/streams/order-9/snapshot"))
            .json(&body)
            .send()
    };
    let (status, body) = json_response(
        put(json!({"revision": 5, "state_version": 2, "state_base64": "c3RhdGU="}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body), (200, json!({"stored": true})));
    let (status, body) = json_response(
        put(json!({"revision": 3, "state_base64": "b2xk"}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body),
        (200, json!({"stored": false})),
        "older is dropped"
    );
    let (status, body) = server.get("/streams/order-9/snapshot").await;
    assert_eq!(status, 200);
    assert_eq!(body["revision"], 5);
    assert_eq!(body["state_version"], 2);
    assert_eq!(body["state_base64"], "c3RhdGU=");
    assert!(body["taken_at"].as_str().unwrap().ends_with('Z'));

    for bad in [
        json!({"revision": 1, "state_base64": "not base64!"}),
        json!({"revision": 1, "state_base64": "eA==", "taken_at": "yesterday"}),
        json!({"revision": -1, "state_base64": "eA=="}),
        json!({"state_base64": "eA=="}),
        json!({"revision": 1, "state_base64": "eA==", "surprise": true}),
    ] {
        let response = put(bad.clone()).await.unwrap();
        let body = expect_error(response, 400, "invalid_json").await;
        assert!(body["message"].as_str().is_some(), "{bad}: {body}");
    }

    let deleted = server
        .client
        .delete(server.url("/streams/order-9/snapshot"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    let (status, _) = server.get("/streams/order-9/snapshot").await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test]
async fn info_names_the_server_and_its_limits() {
    let server = TestServer::memory().await;
    let (status, body) = server.get("/info").await;
    assert_eq!(status, 200);
    assert_eq!(body["server"], "factline");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(body["limits"]["event_size_bytes_max"], 1024 * 1024);
    assert_eq!(body["limits"]["read_count_max"], 10_000);
    assert_eq!(body["body_bytes_max"], 16 * 1024 * 1024);
    server.stop().await;
}

#[tokio::test]
async fn json_labelled_bytes_keep_their_label_through_base64() {
    let server = TestServer::memory().await;
    let (status, _) = server
        .append(
            "raw-1",
            None,
            json!([
                {"type": "Labelled", "data_base64": "IHt9IA==", "content_type": "application/json"},
                {"type": "Plain", "data_base64": "AAE="}
            ]),
        )
        .await;
    assert_eq!(status, 201);
    let (_, page) = server.get("/streams/raw-1").await;
    assert_eq!(page["events"][0]["content_type"], "application/json");
    assert_eq!(
        page["events"][1]["content_type"],
        "application/octet-stream"
    );
    let (status, body) = server
        .append(
            "raw-1",
            None,
            json!({"type": "Odd", "data_base64": "AA==", "content_type": "text/plain"}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_event"))
    );
    let (status, body) = server
        .append(
            "raw-1",
            None,
            json!({"type": "Odd", "data": 1, "content_type": "application/json"}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_event"))
    );
    server.stop().await;
}

/// The stores the server runs on in `factline serve` (the embedded log) and in most tests.
async fn memory_and_log_stores() -> Vec<(&'static str, Arc<dyn factline_server::Store>)> {
    let (log, _) = factline_log::LogStore::open_with(
        Arc::new(factline_log::faulty::FaultyStorage::new()),
        std::path::Path::new("/data"),
        factline_log::LogOptions::default(),
    )
    .await
    .unwrap();
    vec![
        ("memory", Arc::new(InMemoryStore::new())),
        ("log", Arc::new(log)),
    ]
}

/// `from=18446744073709551615` (u64::MAX, a value the documented parameters take) on a backwards
/// read, and `Last-Event-ID: 18446744073709551615`, reached the store as "the position after
/// u64::MAX": the handler panicked on the overflow and the connection closed without an answer.
#[tokio::test]
async fn the_largest_from_and_last_event_id_are_answered_not_overflowed() {
    let max = u64::MAX;
    for (name, store) in memory_and_log_stores().await {
        let server = TestServer::start(store, ServerOptions::default()).await;
        let (status, _) = server
            .append(
                "edge-1",
                None,
                json!([event("Noted", json!(0)), event("Noted", json!(1))]),
            )
            .await;
        assert_eq!(status, 201, "{name}");

        // Backwards from the largest number is backwards from the end.
        let (status, page) = server
            .get(&format!("/all?from={max}&direction=backwards"))
            .await;
        assert_eq!(status, 200, "{name}: {page}");
        let positions: Vec<&Value> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|event| &event["position"])
            .collect();
        assert_eq!(positions, [&json!(1), &json!(0)], "{name}: {page}");
        assert_eq!(page["is_end"], true, "{name}: {page}");
        let (status, page) = server
            .get(&format!("/streams/edge-1?from={max}&direction=backwards"))
            .await;
        assert_eq!(status, 200, "{name}: {page}");
        assert_eq!(
            page["events"].as_array().unwrap().len(),
            2,
            "{name}: {page}"
        );
        assert_eq!(page["events"][0]["revision"], 1, "{name}: {page}");
        // Forwards from it is past the end.
        let (status, page) = server.get(&format!("/all?from={max}")).await;
        assert_eq!(status, 200, "{name}: {page}");
        assert_eq!(page["events"], json!([]), "{name}: {page}");
        assert_eq!(page["is_end"], true, "{name}: {page}");

        // No event is at u64::MAX, so no subscription can resume after it.
        for path in ["/all/subscribe", "/streams/edge-1/subscribe"] {
            let response = server
                .client
                .get(server.url(path))
                .header("Last-Event-ID", max.to_string())
                .send()
                .await
                .unwrap();
            expect_error(response, 400, "invalid_last_event_id").await;
        }
        server.stop().await;
    }
}

/// The document states the rules the handlers check (so that clients, and schemathesis in
/// `scripts/schemathesis`, send what the server takes): the stream id and `Expected-Version` of
/// every operation, `data` xor `data_base64` in an event, and non-empty appends.
#[test]
fn the_document_states_the_input_rules_the_handlers_check() {
    let doc = serde_json::to_value(factline_server::openapi()).unwrap();
    let mut streams = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                let schema = &parameter["schema"];
                match (parameter["in"].as_str(), parameter["name"].as_str()) {
                    (Some("path"), Some("stream")) => {
                        streams += 1;
                        assert_eq!(schema["minLength"], 1, "{method} {path}");
                        assert_eq!(schema["maxLength"], 255, "{method} {path}");
                        assert!(
                            schema["pattern"].as_str().unwrap().starts_with("^[^$"),
                            "{method} {path}: {schema}"
                        );
                    }
                    (Some("header"), Some("Expected-Version")) => assert_eq!(
                        schema["pattern"], "^(any|no-stream|exists|[0-9]+)$",
                        "{method} {path}"
                    ),
                    _ => {}
                }
            }
        }
    }
    assert_eq!(streams, 9, "every operation on /streams/{{stream}}…");
    let schemas = &doc["components"]["schemas"];
    let payloads = &schemas["NewEvent"]["allOf"][1]["oneOf"];
    assert_eq!(payloads[0]["required"], json!(["data"]), "{payloads}");
    assert_eq!(
        payloads[1]["required"],
        json!(["data_base64"]),
        "{payloads}"
    );
    let body = &doc["paths"]["/streams/{stream}"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"];
    assert_eq!(body["oneOf"][1]["minItems"], 1, "{body}");
    assert_eq!(
        schemas["MultiAppend"]["properties"]["streams"]["minItems"],
        1
    );
    assert_eq!(
        schemas["StreamAppend"]["properties"]["events"]["minItems"],
        1
    );
}

#[tokio::test]
async fn a_read_with_limit_zero_is_refused_rather_than_paging_forever() {
    let server = TestServer::memory().await;
    server
        .append("zero-1", None, event("Happened", json!(1)))
        .await;
    for path in ["/streams/zero-1?limit=0", "/all?limit=0"] {
        let (status, body) = server.get(path).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_query")),
            "{path}"
        );
    }
    server.stop().await;
}
