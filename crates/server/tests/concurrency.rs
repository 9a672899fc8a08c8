//! 100 HTTP clients appending with expected versions on the embedded log: nothing lost, nothing
//! duplicated, revisions gapless, and every acknowledged event readable after a reopen.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::HashSet, sync::Arc};

use common::{TestServer, json_response};
use factline_log::LogStore;
use factline_server::ServerOptions;
use serde_json::{Value, json};

const CLIENTS: usize = 100;
const EVENTS_PER_CLIENT: usize = 5;

/// Appends `EVENTS_PER_CLIENT` events to `stream`, each with the expected version it believes
/// current, retrying a 409 with the `actual` it reports. Returns the ids it got acknowledged.
async fn client_appends(server: &TestServer, client: usize, stream: &str) -> Vec<String> {
    let mut acknowledged = Vec::new();
    let mut expected = Value::from("no-stream");
    let mut conflicts = 0_usize;
    while acknowledged.len() < EVENTS_PER_CLIENT {
        let id = uuid_for(client, acknowledged.len());
        let expected_header = match &expected {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let response = server
            .client
            .post(server.url(&format!("/streams/{stream}")))
            .header("Expected-Version", expected_header)
            .json(&json!({"id": id, "type": "Counted", "data": {"client": client}}))
            .send()
            .await
            .unwrap();
        let (status, body) = json_response(response).await;
        match status {
            201 => {
                acknowledged.push(id);
                expected = body["next_expected_version"].clone();
            }
            409 => {
                assert_eq!(body["error"], "wrong_expected_version", "{body}");
                expected = body["actual"].clone();
                conflicts += 1;
                assert!(conflicts < 100_000, "client {client} never gets a turn");
            }
            other => panic!("client {client}: unexpected {other}: {body}"),
        }
    }
    acknowledged
}

fn uuid_for(client: usize, n: usize) -> String {
    format!("0194f3a0-0000-7000-8000-{:06x}{:06x}", client, n)
}

async fn read_stream(server: &TestServer, stream: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut from = 0;
    loop {
        let (status, page) = server
            .get(&format!("/streams/{stream}?from={from}&limit=1000"))
            .await;
        assert_eq!(status, 200, "{page}");
        events.extend(page["events"].as_array().unwrap().iter().cloned());
        if page["is_end"] == true {
            return events;
        }
        from = page["next_revision"].as_u64().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_clients_with_expected_versions_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).await.unwrap();
    let server =
        Arc::new(TestServer::start(Arc::new(store.clone()), ServerOptions::default()).await);

    // All clients on one stream (every append contends), then each on its own.
    for shared in [true, false] {
        let mut tasks = Vec::new();
        for client in 0..CLIENTS {
            let server = Arc::clone(&server);
            let stream = if shared {
                "counter-shared".to_owned()
            } else {
                format!("counter-{client}")
            };
            tasks.push(tokio::spawn(async move {
                let ids =
                    client_appends(&server, client + if shared { 0 } else { CLIENTS }, &stream)
                        .await;
                (stream, ids)
            }));
        }
        let mut acknowledged: Vec<(String, Vec<String>)> = Vec::new();
        for task in tasks {
            acknowledged.push(task.await.unwrap());
        }
        let streams: HashSet<&String> = acknowledged.iter().map(|(stream, _)| stream).collect();
        let mut stored_ids = HashSet::new();
        let mut stored = 0;
        for stream in streams {
            let events = read_stream(&server, stream).await;
            for (revision, event) in events.iter().enumerate() {
                assert_eq!(
                    event["revision"], revision as u64,
                    "gapless revisions in {stream}"
                );
                assert!(
                    stored_ids.insert(event["id"].as_str().unwrap().to_owned()),
                    "duplicate {event}"
                );
            }
            stored += events.len();
        }
        let acknowledged_ids: HashSet<String> =
            acknowledged.into_iter().flat_map(|(_, ids)| ids).collect();
        assert_eq!(acknowledged_ids.len(), CLIENTS * EVENTS_PER_CLIENT);
        assert_eq!(stored, CLIENTS * EVENTS_PER_CLIENT, "shared={shared}");
        assert_eq!(stored_ids, acknowledged_ids, "shared={shared}");
    }

    // $all holds every event once, in gapless positions.
    let (_, page) = server.get("/all?limit=10000").await;
    let positions: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["position"].as_u64().unwrap())
        .collect();
    assert_eq!(
        positions,
        (0..(2 * CLIENTS * EVENTS_PER_CLIENT) as u64).collect::<Vec<_>>()
    );

    let server = Arc::into_inner(server).unwrap();
    server.stop().await;
    store.close().await;
    drop(store);
    let reopened = LogStore::open(dir.path()).await.unwrap();
    let server = TestServer::start(Arc::new(reopened), ServerOptions::default()).await;
    assert_eq!(
        read_stream(&server, "counter-shared").await.len(),
        CLIENTS * EVENTS_PER_CLIENT
    );
    server.stop().await;
}
