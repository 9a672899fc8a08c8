//! Persistent subscriptions over real HTTP: create, consume over SSE, ack, nack to parking,
//! replay, group state, errors, auth, and a restart of the server on the same store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{sync::Arc, time::Duration};

use common::{SseReader, TestServer, event, json_response};
use factline_core::InMemoryStore;
use factline_server::{AuthConfig, ServerOptions, Store};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

async fn put_group(server: &TestServer, group: &str, body: Value) -> (u16, Value) {
    json_response(
        server
            .client
            .put(server.url(&format!("/subscriptions/{group}")))
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn post(server: &TestServer, path: &str, body: Value) -> (u16, Value) {
    json_response(
        server
            .client
            .post(server.url(path))
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Connects a consumer; returns the reader and the consumer id of its response header.
async fn consume(server: &TestServer, group: &str) -> (SseReader, u64) {
    let response = server
        .client
        .get(server.url(&format!("/subscriptions/{group}/consume?name=test")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let consumer = response.headers()["factline-consumer-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (SseReader::new(response), consumer)
}

/// The next delivery of `consumer`'s stream.
async fn delivery(reader: &mut SseReader, consumer: u64) -> Value {
    let message = reader.next_within(WAIT).await.expect("a delivery");
    assert_eq!(message.event, None, "deliveries are unnamed messages");
    let json = message.json();
    assert_eq!(
        json["consumer"], consumer,
        "every delivery names its consumer"
    );
    json
}

#[tokio::test]
async fn a_group_delivers_parks_replays_and_resumes_over_http() {
    let store: Arc<dyn Store> = Arc::new(InMemoryStore::new());
    let server = TestServer::start(Arc::clone(&store), ServerOptions::default()).await;
    let (status, created) = put_group(
        &server,
        "billing",
        json!({"source": {"kind": "stream", "stream": "order-1"}, "retries_max": 1}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["group"], "billing");
    assert_eq!(created["from"], "start");
    assert_eq!(created["strategy"], "round_robin");
    assert_eq!(created["retries_max"], 1);
    let (status, again) = put_group(
        &server,
        "billing",
        json!({"source": {"kind": "stream", "stream": "order-1"}}),
    )
    .await;
    assert_eq!(
        (status, again["error"].as_str()),
        (409, Some("group_exists"))
    );

    let (mut reader, consumer) = consume(&server, "billing").await;
    for n in 0..3 {
        let (status, _) = server
            .append("order-1", None, event("OrderPlaced", json!({"n": n})))
            .await;
        assert_eq!(status, 201);
    }
    // Revision 0: ack. Revision 1: nack retry twice, which parks it. Revision 2: ack.
    let first = delivery(&mut reader, consumer).await;
    assert_eq!(first["event"]["revision"], 0);
    assert_eq!(first["retry_count"], 0);
    assert_eq!(first["replayed"], false);
    let (status, settled) = post(
        &server,
        "/subscriptions/billing/ack",
        json!({"consumer": consumer, "ids": [first["delivery_id"], 999_999]}),
    )
    .await;
    assert_eq!(status, 200, "{settled}");
    assert_eq!(settled, json!({"settled": 1, "unknown": [999_999]}));
    let mut parked_id = None;
    let mut acked_last = false;
    while parked_id.is_none() || !acked_last {
        let next = delivery(&mut reader, consumer).await;
        if next["event"]["revision"] == 1 {
            let (status, settled) = post(
                &server,
                "/subscriptions/billing/nack",
                json!({"consumer": consumer, "ids": [next["delivery_id"]], "action": "retry", "reason": "card declined"}),
            )
            .await;
            assert_eq!((status, settled["settled"].as_u64()), (200, Some(1)));
            if next["retry_count"] == 1 {
                parked_id = Some(next["event"]["id"].clone());
            }
        } else {
            assert_eq!(next["event"]["revision"], 2);
            post(
                &server,
                "/subscriptions/billing/ack",
                json!({"consumer": consumer, "ids": [next["delivery_id"]]}),
            )
            .await;
            acked_last = true;
        }
    }
    let (status, state) = server.get("/subscriptions/billing").await;
    assert_eq!(status, 200);
    assert_eq!(state["parked_total"], 1);
    assert_eq!(state["parked_waiting"], 1);
    assert_eq!(state["acked_total"], 2);
    assert_eq!(state["checkpoint"], 2);
    assert_eq!(state["consumers"].as_array().unwrap().len(), 1);
    assert_eq!(state["consumers"][0]["name"], "test");
    let (_, parked) = server.get("/streams/factline.parked-billing").await;
    let record = &parked["events"][0];
    assert_eq!(record["type"], "EventParked");
    assert_eq!(record["data"]["event_id"], parked_id.clone().unwrap());
    assert!(
        record["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("card declined")
    );

    // Replay: the parked event comes again, marked replayed.
    let (status, replay) = post(&server, "/subscriptions/billing/replay-parked", json!(null)).await;
    assert_eq!((status, replay), (200, json!({"replaying": 1})));
    let replayed = delivery(&mut reader, consumer).await;
    assert_eq!(replayed["replayed"], true);
    assert_eq!(replayed["event"]["id"], parked_id.unwrap());
    post(
        &server,
        "/subscriptions/billing/ack",
        json!({"consumer": consumer, "ids": [replayed["delivery_id"]]}),
    )
    .await;

    // A restart on the same store keeps the group and its checkpoint.
    drop(reader);
    server.stop().await;
    let server = TestServer::start(Arc::clone(&store), ServerOptions::default()).await;
    let (status, list) = server.get("/subscriptions").await;
    assert_eq!(status, 200);
    assert_eq!(list["groups"][0]["group"], "billing");
    assert_eq!(list["groups"][0]["checkpoint"], 2);
    assert_eq!(list["groups"][0]["parked_waiting"], 0);
    let (mut reader, consumer) = consume(&server, "billing").await;
    server
        .append("order-1", None, event("OrderPlaced", json!({"n": 3})))
        .await;
    let fresh = delivery(&mut reader, consumer).await;
    assert_eq!(fresh["event"]["revision"], 3, "nothing settled comes again");
    post(
        &server,
        "/subscriptions/billing/ack",
        json!({"consumer": consumer, "ids": [fresh["delivery_id"]]}),
    )
    .await;

    let response = server
        .client
        .delete(server.url("/subscriptions/billing"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 204);
    assert!(
        reader.next_within(WAIT).await.is_none(),
        "a delete ends the stream"
    );
    let (status, missing) = server.get("/subscriptions/billing").await;
    assert_eq!(
        (status, missing["error"].as_str()),
        (404, Some("group_not_found"))
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_group_requests_are_clear_errors() {
    let server = TestServer::memory().await;
    let cases = [
        (
            "bad%01name",
            json!({"source": {"kind": "all"}}),
            400,
            "invalid_group_name",
        ),
        (
            "g",
            json!({"source": {"kind": "stream", "stream": "$all"}}),
            400,
            "invalid_stream_id",
        ),
        (
            "g",
            json!({"source": {"kind": "all"}, "message_timeout_ms": 1}),
            400,
            "invalid_group_settings",
        ),
        (
            "g",
            json!({"source": {"kind": "all"}, "from": "later"}),
            400,
            "invalid_group_settings",
        ),
        (
            "g",
            json!({"source": {"kind": "stream", "stream": "factline.parked-x"}}),
            400,
            "invalid_group_settings",
        ),
        ("g", json!({"nope": 1}), 400, "invalid_json"),
    ];
    for (group, body, status, code) in cases {
        let (got, error) = put_group(&server, group, body.clone()).await;
        assert_eq!(
            (got, error["error"].as_str()),
            (status, Some(code)),
            "{group} {body}: {error}"
        );
    }
    let (status, error) = put_group(
        &server,
        "g",
        json!({"source": {"kind": "all"}, "buffer_events_max": 0}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(error["field"], "buffer_events_max");
    assert!(error["message"].as_str().unwrap().contains("1..=100000"));

    let (status, error) = post(
        &server,
        "/subscriptions/missing/ack",
        json!({"consumer": 1, "ids": [1]}),
    )
    .await;
    assert_eq!(
        (status, error["error"].as_str()),
        (404, Some("group_not_found"))
    );
    let response = server
        .client
        .get(server.url("/subscriptions/missing/consume"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);

    let (status, _) = put_group(&server, "g", json!({"source": {"kind": "all"}})).await;
    assert_eq!(status, 201);
    let too_many: Vec<u64> = (0..10_001).collect();
    let (status, error) = post(
        &server,
        "/subscriptions/g/ack",
        json!({"consumer": 1, "ids": too_many}),
    )
    .await;
    assert_eq!(
        (status, error["error"].as_str()),
        (400, Some("limit_exceeded"))
    );
    assert_eq!(error["max"], 10_000);
    let (status, error) = post(
        &server,
        "/subscriptions/g/nack",
        json!({"consumer": 1, "ids": [1], "action": "explode"}),
    )
    .await;
    assert_eq!(
        (status, error["error"].as_str()),
        (400, Some("invalid_json"))
    );
    server.stop().await;
}

#[tokio::test]
async fn managing_groups_takes_an_admin_and_consuming_a_read_grant() {
    let config = AuthConfig::from_toml(
        r#"
        [[tokens]]
        name = "orders"
        token = "orders-reader-token-0001"
        read = ["order"]

        [[tokens]]
        name = "ops"
        token = "admin-token-000000000001"
        admin = true
        "#,
    )
    .unwrap();
    let server = TestServer::start(
        Arc::new(InMemoryStore::new()),
        ServerOptions::default().auth(config),
    )
    .await;
    let put = |token: &'static str, group: &'static str, body: Value| {
        server
            .client
            .put(server.url(&format!("/subscriptions/{group}")))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let source = json!({"source": {"kind": "all", "category": "order"}});
    let (status, _) = json_response(
        put("orders-reader-token-0001", "o", source.clone())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403, "creating a group is an admin's job");
    let (status, _) =
        json_response(put("admin-token-000000000001", "o", source).await.unwrap()).await;
    assert_eq!(status, 201);
    let (status, _) = json_response(
        put(
            "admin-token-000000000001",
            "c",
            json!({"source": {"kind": "stream", "stream": "customer-1"}}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 201);

    let consume = |group: &str| {
        server
            .client
            .get(server.url(&format!("/subscriptions/{group}/consume")))
            .bearer_auth("orders-reader-token-0001")
            .send()
    };
    let response = consume("o").await.unwrap();
    assert_eq!(
        response.status().as_u16(),
        200,
        "a read grant on order covers category order"
    );
    drop(response);
    let response = consume("c").await.unwrap();
    assert_eq!(
        response.status().as_u16(),
        403,
        "no grant covers customer-1"
    );
    let response = server
        .client
        .get(server.url("/subscriptions"))
        .bearer_auth("orders-reader-token-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    // Only the caller that connected a consumer may settle its deliveries.
    let admins = server
        .client
        .get(server.url("/subscriptions/o/consume"))
        .bearer_auth("admin-token-000000000001")
        .send()
        .await
        .unwrap();
    assert_eq!(admins.status().as_u16(), 200);
    let admins_id: u64 = admins.headers()["factline-consumer-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let settle = |token: &'static str| {
        server
            .client
            .post(server.url("/subscriptions/o/nack"))
            .bearer_auth(token)
            .json(&json!({"consumer": admins_id, "ids": [1], "action": "skip"}))
            .send()
    };
    let (status, body) = json_response(settle("orders-reader-token-0001").await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "another caller's consumer: {body}"
    );
    let (status, _) = json_response(settle("admin-token-000000000001").await.unwrap()).await;
    assert_eq!(status, 200, "its own");
    drop(admins);

    // Without a token: 401, on every endpoint.
    for (method, path) in [
        (reqwest::Method::GET, "/subscriptions"),
        (reqwest::Method::GET, "/subscriptions/o"),
        (reqwest::Method::DELETE, "/subscriptions/o"),
        (reqwest::Method::GET, "/subscriptions/o/consume"),
        (reqwest::Method::POST, "/subscriptions/o/ack"),
        (reqwest::Method::POST, "/subscriptions/o/nack"),
        (reqwest::Method::POST, "/subscriptions/o/replay-parked"),
    ] {
        let (status, body) = json_response(
            server
                .client
                .request(method.clone(), server.url(path))
                .json(&json!({"consumer": 1, "ids": [], "action": "skip"}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthorized")),
            "{method} {path}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn consumers_count_against_the_subscriber_limit_and_bodies_must_be_json() {
    let server = TestServer::start(
        Arc::new(InMemoryStore::new()),
        ServerOptions::default().subscribers_max(1),
    )
    .await;
    let (status, _) = put_group(&server, "g", json!({"source": {"kind": "all"}})).await;
    assert_eq!(status, 201);
    let (_first, _) = consume(&server, "g").await;
    let (status, body) = json_response(
        server
            .client
            .get(server.url("/subscriptions/g/consume"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_subscribers")),
        "{body}"
    );
    let (status, body) = json_response(
        server
            .client
            .post(server.url("/subscriptions/g/ack"))
            .header("content-type", "text/plain")
            .body(r#"{"consumer": 1, "ids": [1]}"#)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    let (status, body) = json_response(
        server
            .client
            .post(server.url("/subscriptions/g/nack"))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_json"))
    );
    server.stop().await;
}
