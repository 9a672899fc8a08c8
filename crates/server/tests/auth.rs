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

#[tokio::test]
async fn a_browser_signs_in_with_a_cookie_that_reads_but_never_writes() {
    let server = server().await;
    let (status, _) = server
        .append("order-1", None, event("OrderPlaced", json!({})))
        .await;
    assert_eq!(status, 401, "the plain client sends no token");
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let written = server
        .client
        .post(server.url("/streams/order-1"))
        .bearer_auth(WRITER)
        .json(&event("OrderPlaced", json!({"total": 1})))
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), 201);

    // A page without a token sends the browser to the sign-in form.
    let home = browser.get(server.url("/")).send().await.unwrap();
    assert_eq!(home.status(), 303);
    assert_eq!(home.headers()["location"], "/ui/login");
    let form = browser.get(server.url("/ui/login")).send().await.unwrap();
    assert_eq!(form.status(), 200);
    assert!(form.text().await.unwrap().contains(r#"name="token""#));

    // A wrong token is refused on the form; the right one sets the cookie.
    let wrong = browser
        .post(server.url("/ui/login"))
        .form(&[("token", "not-a-token-of-this-server")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    let signed_in = browser
        .post(server.url("/ui/login"))
        .form(&[("token", ADMIN)])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303);
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    for attribute in ["factline_token=", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(
        !cookie.contains(ADMIN),
        "the cookie holds the token encoded: {cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();

    // The cookie reads: pages, the API's GETs, and the SSE the live tail opens.
    let home = browser
        .get(server.url("/"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(home.status(), 200);
    assert!(home.text().await.unwrap().contains("order-1"));
    let read = browser
        .get(server.url("/streams/order-1"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let tail = browser
        .get(server.url("/all/subscribe?from=start"))
        .header("cookie", format!("theme=dark; {pair}"))
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), 200);
    drop(tail);
    // The persistent-subscriptions page reads group state: an admin's cookie may.
    let groups = browser
        .get(server.url("/ui/subscriptions"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(groups.status(), 200);
    let forbidden = browser
        .get(server.url("/ui/subscriptions"))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403, "a reader may not list groups");

    // It never writes, even for an admin token: a write needs the Authorization header.
    let (status, code) = status_and_code(
        browser
            .post(server.url("/streams/order-1"))
            .header("cookie", &pair)
            .json(&event("OrderShipped", json!({}))),
    )
    .await;
    assert_eq!((status, code.as_str()), (401, "unauthorized"));
    let (status, _) = status_and_code(
        browser
            .delete(server.url("/streams/order-1"))
            .header("cookie", &pair),
    )
    .await;
    assert_eq!(status, 401);

    // A cookie whose token is not configured (any more) is refused, and pages send the
    // browser back to the form.
    let stale = browser
        .get(server.url("/"))
        .header(
            "cookie",
            "factline_token=bm90LWEtdG9rZW4tb2YtdGhpcy1zZXJ2ZXI",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 303);

    // Signing out clears the cookie.
    let out = browser
        .post(server.url("/ui/logout"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 303);
    let cleared = out.headers()["set-cookie"].to_str().unwrap();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
}
