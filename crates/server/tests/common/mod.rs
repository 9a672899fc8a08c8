//! A server on a loopback port, a client, and an SSE reader for the API tests.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use factline_core::InMemoryStore;
use factline_server::{Server, ServerOptions, Store};
use futures::StreamExt as _;
use serde_json::Value;
use tokio::sync::oneshot;

pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(store: Arc<dyn Store>, options: ServerOptions) -> Self {
        Self::start_on(store, options, "127.0.0.1:0".parse().unwrap()).await
    }

    /// A server on `listen` (port 0: any free port).
    pub async fn start_on(
        store: Arc<dyn Store>,
        options: ServerOptions,
        listen: std::net::SocketAddr,
    ) -> Self {
        let server = Server::bind(store, options.listen(listen)).await.unwrap();
        let addr = server.local_addr();
        let base = format!("http://{addr}");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            base,
            client: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn memory() -> Self {
        Self::start(Arc::new(InMemoryStore::new()), ServerOptions::default()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `body` to `/streams/{stream}` with an optional expected version.
    pub async fn append(&self, stream: &str, expected: Option<&str>, body: Value) -> (u16, Value) {
        let mut request = self
            .client
            .post(self.url(&format!("/streams/{stream}")))
            .json(&body);
        if let Some(expected) = expected {
            request = request.header("Expected-Version", expected);
        }
        json_response(request.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        json_response(self.client.get(self.url(path)).send().await.unwrap()).await
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the server stops within 10 s")
                .unwrap();
        }
    }
}

pub async fn json_response(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("not JSON ({error}): {text}"))
    };
    (status, value)
}

pub fn event(event_type: &str, data: Value) -> Value {
    serde_json::json!({"type": event_type, "data": data})
}

/// One SSE message.
#[derive(Debug, Clone, Default)]
pub struct SseMessage {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseMessage {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

/// Reads SSE messages from a response, skipping comments (keep-alives).
pub struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status().as_u16(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Self {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next message, or `None` when the stream ended; panics after `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<SseMessage> {
        tokio::time::timeout(timeout, self.next())
            .await
            .expect("an SSE message arrives in time")
    }

    pub async fn next(&mut self) -> Option<SseMessage> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut message = SseMessage::default();
                let mut has_field = false;
                for line in block.lines() {
                    if line.starts_with(':') || line.is_empty() {
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    has_field = true;
                    match field {
                        "id" => message.id = Some(value.to_owned()),
                        "event" => message.event = Some(value.to_owned()),
                        "data" => {
                            if !message.data.is_empty() {
                                message.data.push('\n');
                            }
                            message.data.push_str(value);
                        }
                        _ => {}
                    }
                }
                if has_field {
                    return Some(message);
                }
                continue;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Some(Err(error)) => panic!("SSE body failed: {error}"),
                None => return None,
            }
        }
    }
}
