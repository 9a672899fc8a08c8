//! Bearer tokens over real HTTP: 401 without a valid token, 403 outside a grant.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{TestServer, event, json_response};
use factline_core::InMemoryStore;
use factline_server::{AuthConfig, ServerOptions};
use serde_json::json;

const WRITER: &str = "orders-writer-token-0001";
const READER: &str = "customer-reader-token-01";
const ADMIN: &str = "admin-token-000000000001";

fn config() -> AuthConfig {
    AuthConfig::from_toml(&format!(
        r#"
        [[tokens]]
        name = "orders"
        token = "{WRITER}"
        write = ["order-"]

        [[tokens]]
        name = "customers"
        token = "{READER}"
        read = ["customer-"]

        [[tokens]]
        name = "ops"
        token = "{ADMIN}"
        admin = true
        "#
    ))
    .unwrap()
}

async fn server() -> TestServer {
    TestServer::start(
        Arc::new(InMemoryStore::new()),
        ServerOptions::default().auth(config()),
    )
    .await
}

async fn status_and_code(request: reqwest::RequestBuilder) -> (u16, String) {
    let (status, body) = json_response(request.send().await.unwrap()).await;
    (status, body["error"].as_str().unwrap_or("").to_owned())
}

#[tokio::test]
async fn requests_without_a_valid_token_are_unauthorized() {
    let server = server().await;
    let client = &server.client;
    let response = client
        .get(server.url("/streams/order-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(
        response.headers()["www-authenticate"].to_str().unwrap(),
        "Bearer realm=\"factline\""
    );
    assert_eq!(
        status_and_code(
            client
                .get(server.url("/all"))
                .bearer_auth("wrong-token-0000000000")
        )
        .await,
        (401, "unauthorized".to_owned())
    );
    assert_eq!(
        status_and_code(
            client
                .get(server.url("/all"))
                .header("Authorization", "Basic abc")
        )
        .await,
        (401, "unauthorized".to_owned())
    );
    // Health and the OpenAPI document stay public.
    assert_eq!(
        client
            .get(server.url("/health"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        client
            .get(server.url("/openapi.json"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    server.stop().await;
}

#[tokio::test]
async fn grants_follow_stream_prefixes() {
    let server = server().await;
    let client = &server.client;
    let append = |stream: &str, token: &str| {
        client
            .post(server.url(&format!("/streams/{stream}")))
            .bearer_auth(token)
            .json(&event("Happened", json!(1)))
    };
    assert_eq!(
        append("order-1", WRITER)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        201
    );
    assert_eq!(
        status_and_code(append("customer-1", WRITER)).await,
        (403, "forbidden".to_owned())
    );
    assert_eq!(
        status_and_code(append("customer-1", READER)).await,
        (403, "forbidden".to_owned())
    );
    assert_eq!(
        append("customer-1", ADMIN)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        201
    );

    let read = |path: &str, token: &str| client.get(server.url(path)).bearer_auth(token);
    // Write implies read; read covers its prefix only.
    assert_eq!(
        read("/streams/order-1", WRITER)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        read("/streams/customer-1", READER)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        status_and_code(read("/streams/order-1", READER)).await,
        (403, "forbidden".to_owned())
    );
    // $all needs a grant that covers the filter.
    assert_eq!(
        status_and_code(read("/all", READER)).await,
        (403, "forbidden".to_owned())
    );
    assert_eq!(
        read("/all?prefix=customer-", READER)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        status_and_code(read("/all/subscribe?prefix=order-", READER)).await,
        (403, "forbidden".to_owned())
    );
    assert_eq!(
        read("/all", ADMIN).send().await.unwrap().status().as_u16(),
        200
    );
    // Metadata follows read/write.
    assert_eq!(
        status_and_code(
            client
                .put(server.url("/streams/customer-1/metadata"))
                .bearer_auth(READER)
                .json(&json!({"max_count": 3}))
        )
        .await,
        (403, "forbidden".to_owned())
    );
    // Soft delete needs write; a tombstone needs admin.
    let delete = |path: &str, token: &str| client.delete(server.url(path)).bearer_auth(token);
    assert_eq!(
        status_and_code(delete("/streams/order-1?hard=true", WRITER)).await,
        (403, "forbidden".to_owned())
    );
    assert_eq!(
        delete("/streams/order-1", WRITER)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        204
    );
    assert_eq!(
        delete("/streams/order-1?hard=true", ADMIN)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        204
    );
    // Metrics are for admins.
    assert_eq!(
        status_and_code(read("/metrics", WRITER)).await,
        (403, "forbidden".to_owned())
    );
    assert_eq!(
        read("/metrics", ADMIN)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    server.stop().await;
}
