//! A client of the HTTP API that is itself an [`EventStore`] and [`SnapshotStore`]: code written
//! against the traits runs unchanged against a remote `factline serve`, and the shared
//! conformance suite runs through HTTP against the server (`tests/conformance.rs`).
//!
//! Every error the server answers is turned back into the typed error of the operation
//! (`409 wrong_expected_version` into [`AppendError::WrongExpectedVersion`] with its expected
//! and actual versions, `413 limit_exceeded` into the [`LimitExceeded`] it names, …). Transport
//! failures and answers the client cannot read are [`StorageError::Backend`] holding an
//! [`HttpError`]. Subscriptions read Server-Sent Events; when the connection drops (the server
//! restarted, a proxy timed out) the subscription reconnects after the last event it delivered,
//! with backoff, so the caller sees no gap and no duplicate; it ends with the error only after
//! [`ClientOptions::subscription_reconnects_max`] failed attempts in a row. `https://` URLs use
//! rustls with the system's trusted roots, plus any [`ClientOptions::root_certificate_pem`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use factline_core::{EventData, EventStore, ExpectedVersion, StreamId};
//! use factline_server::client::HttpStore;
//!
//! let store = HttpStore::connect("http://127.0.0.1:7610").await?;
//! let stream = StreamId::new("order-42")?;
//! let event = EventData::json("OrderPlaced", &serde_json::json!({"total": 12}))?;
//! store.append(&stream, ExpectedVersion::NoStream, vec![event]).await?;
//! # Ok(()) }
//! ```

use std::{collections::VecDeque, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use factline_core::{
    AllSlice, AppendError, AppendRequest, AppendResult, DeleteError, DeleteMode, Direction,
    EventData, EventFilter, EventStore, EventsRejected, ExpectedVersion, InvalidEvent, Limit,
    LimitExceeded, Limits, MetadataError, Position, ReadAllError, ReadAllOptions, ReadStreamError,
    ReadStreamOptions, RecordedEvent, Revision, Snapshot, SnapshotError, SnapshotStore,
    StorageError, StreamId, StreamMetadata, StreamSlice, StreamState, SubscribeError,
    SubscribeFrom, Subscription, SubscriptionError, Timestamp,
};
use futures::{Stream, StreamExt as _};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde_json::{Map, Value};

use crate::{
    error::{ErrorBody, ErrorCode},
    json::{
        AllPage, AppendResponse, EventJson, Info, MetadataJson, MultiAppend, MultiAppendResponse,
        NewEvent, SnapshotJson, SnapshotSaved, StreamAppend, StreamPage,
    },
};

/// How an [`HttpStore`] talks to its server.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Sent as `Authorization: Bearer <token>` when set.
    pub token: Option<String>,
    /// Longest wait for a connection to the server. Default 10 s.
    pub connect_timeout_ms: Option<u64>,
    /// Longest wait for any read from the server, the body of a subscription included: keep
    /// it above the server's SSE keep-alive interval (15 s by default), or idle subscriptions
    /// end with a timeout (and reconnect). Default 60 s.
    pub request_timeout_ms: Option<u64>,
    /// A PEM certificate (or several) to trust for `https://` besides the system's roots, e.g.
    /// a server's self-signed certificate or a private CA.
    pub root_certificate_pem: Option<Vec<u8>>,
    /// Failed reconnects in a row after which a dropped subscription ends with its error.
    /// `Some(0)` never reconnects. Default 8 (with backoff from 100 ms doubling to 5 s: about
    /// 20 s of outage).
    pub subscription_reconnects_max: Option<u32>,
}

/// Failed reconnects in a row before a subscription gives up, unless set.
const SUBSCRIPTION_RECONNECTS_MAX: u32 = 8;
/// Wait before the first reconnect; doubles with each failure up to
/// [`RECONNECT_BACKOFF_MAX_MS`].
const RECONNECT_BACKOFF_FIRST_MS: u64 = 100;
const RECONNECT_BACKOFF_MAX_MS: u64 = 5_000;

impl ClientOptions {
    /// Sends `token` as a bearer token.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Trusts the PEM certificate(s) `pem` for `https://`, besides the system's roots.
    #[must_use]
    pub fn root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate_pem = Some(pem.into());
        self
    }

    /// Sets [`ClientOptions::subscription_reconnects_max`].
    #[must_use]
    pub fn subscription_reconnects_max(mut self, reconnects: u32) -> Self {
        self.subscription_reconnects_max = Some(reconnects);
        self
    }
}

/// Why [`HttpStore::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL is not an `http` URL.
    #[error("{url:?} is not a server URL (give e.g. http://127.0.0.1:7610): {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// [`ClientOptions::root_certificate_pem`] holds no certificate rustls can read.
    #[error("the root certificate given cannot be used: {reason}")]
    InvalidRootCertificate {
        /// What is wrong with it.
        reason: String,
    },
    /// The server did not answer `GET /info` as a factline server does.
    #[error("cannot use the factline server at {url}: {source}")]
    Server {
        /// The URL given.
        url: String,
        /// What went wrong.
        #[source]
        source: HttpError,
    },
}

/// A failure talking to the server that is not one of the operation's own errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The request did not get an answer (connection refused, timeout, …).
    #[error("{method} {url}: {source}")]
    Transport {
        /// The method.
        method: Method,
        /// The URL.
        url: Url,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error this operation does not expect.
    #[error("{method} {url}: HTTP {status} {code}: {message}")]
    Status {
        /// The method.
        method: Method,
        /// The URL.
        url: Url,
        /// The status.
        status: StatusCode,
        /// The `error` code of the body, or `-` when the body was not a factline error.
        code: String,
        /// The `message` of the body, or the body itself.
        message: String,
    },
    /// The server answered with a body this client cannot read.
    #[error("{method} {url}: unexpected answer: {reason}")]
    Malformed {
        /// The method.
        method: Method,
        /// The URL.
        url: Url,
        /// What was wrong.
        reason: String,
    },
}

/// An [`EventStore`] on a remote factline server, over its HTTP/JSON API.
#[derive(Debug, Clone)]
pub struct HttpStore {
    client: reqwest::Client,
    base: Url,
    token: Option<String>,
    limits: Limits,
    version: String,
    subscription_reconnects_max: u32,
}

/// An error answer of the server, with what the request was.
struct Failure {
    method: Method,
    url: Url,
    status: StatusCode,
    body: Option<ErrorBody>,
    text: String,
}

impl Failure {
    fn code(&self) -> Option<ErrorCode> {
        self.body.as_ref().map(|body| body.error)
    }

    fn details(&self) -> Option<&Map<String, Value>> {
        self.body.as_ref().map(|body| &body.details)
    }

    fn message(&self) -> String {
        self.body
            .as_ref()
            .map_or_else(|| self.text.clone(), |body| body.message.clone())
    }

    fn detail_u64(&self, key: &str) -> Option<u64> {
        self.details()?.get(key)?.as_u64()
    }

    fn detail_str(&self, key: &str) -> Option<&str> {
        self.details()?.get(key)?.as_str()
    }

    /// The stream the error names, else `fallback`.
    fn stream(&self, fallback: &StreamId) -> StreamId {
        self.detail_str("stream")
            .and_then(|name| StreamId::new(name).ok())
            .unwrap_or_else(|| fallback.clone())
    }

    /// The storage error this failure stands for when it is none of the operation's own.
    fn storage(self) -> StorageError {
        match self.code() {
            Some(ErrorCode::StoreUnavailable) if self.detail_str("state") == Some("closed") => {
                StorageError::Closed
            }
            Some(ErrorCode::StoreUnavailable) => StorageError::Failed {
                reason: self.message(),
            },
            _ => StorageError::backend(HttpError::Status {
                code: self
                    .code()
                    .map_or_else(|| "-".to_owned(), |c| c.as_str().to_owned()),
                message: self.message(),
                method: self.method,
                url: self.url,
                status: self.status,
            }),
        }
    }

    fn limit(&self) -> Option<LimitExceeded> {
        if self.code() != Some(ErrorCode::LimitExceeded) {
            return None;
        }
        let limit = match self.detail_str("limit")? {
            "event_size_bytes_max" => Limit::EventSizeBytes,
            "events_per_append_max" => Limit::EventsPerAppend,
            "append_size_bytes_max" => Limit::AppendSizeBytes,
            "streams_per_append_max" => Limit::StreamsPerAppend,
            "metadata_entries_max" => Limit::MetadataEntries,
            "read_count_max" => Limit::ReadCount,
            "event_type_bytes_max" => Limit::EventTypeBytes,
            _ => return None,
        };
        Some(LimitExceeded {
            limit,
            max: self.detail_u64("max")?,
            actual: self.detail_u64("actual")?,
        })
    }

    fn wrong_expected_version(&self) -> Option<(ExpectedVersion, StreamState)> {
        if self.code() != Some(ErrorCode::WrongExpectedVersion) {
            return None;
        }
        let details = self.details()?;
        let expected = match details.get("expected")? {
            Value::Number(n) => ExpectedVersion::Exact(Revision(n.as_u64()?)),
            Value::String(text) => text.parse().ok()?,
            _ => return None,
        };
        let actual = match details.get("actual")? {
            Value::Number(n) => StreamState::At(Revision(n.as_u64()?)),
            Value::String(text) if text == "no-stream" => StreamState::NoStream,
            _ => return None,
        };
        Some((expected, actual))
    }

    fn invalid_event(&self) -> Option<EventsRejected> {
        if self.code() != Some(ErrorCode::InvalidEvent) {
            return None;
        }
        let index = || self.detail_u64("index").map(|i| i as usize);
        Some(match self.detail_str("reason")? {
            "empty" => EventsRejected::Empty,
            "empty_type" => InvalidEvent::EmptyType { index: index()? }.into(),
            "control_character_in_type" => InvalidEvent::ControlCharacterInType {
                index: index()?,
                byte_offset: self.detail_u64("byte_offset")? as usize,
            }
            .into(),
            "duplicate_id" => InvalidEvent::DuplicateId {
                index: index()?,
                id: self.detail_str("id")?.parse().ok()?,
            }
            .into(),
            "nil_id" => InvalidEvent::NilId { index: index()? }.into(),
            _ => return None,
        })
    }

    fn append_error(self, stream: &StreamId) -> AppendError {
        if let Some((expected, actual)) = self.wrong_expected_version() {
            return AppendError::WrongExpectedVersion {
                stream: self.stream(stream),
                expected,
                actual,
            };
        }
        if let Some(limit) = self.limit() {
            return limit.into();
        }
        if let Some(rejected) = self.invalid_event() {
            return AppendError::Rejected(rejected);
        }
        match self.code() {
            Some(ErrorCode::IdempotencyConflict) => {
                if let Some(event_id) = self.detail_str("event_id").and_then(|id| id.parse().ok()) {
                    return AppendError::IdempotencyConflict {
                        stream: self.stream(stream),
                        event_id,
                    };
                }
            }
            Some(ErrorCode::StreamDeleted) => {
                return AppendError::StreamDeleted {
                    stream: self.stream(stream),
                };
            }
            Some(ErrorCode::DuplicateStream) => {
                return AppendError::DuplicateStream {
                    stream: self.stream(stream),
                };
            }
            _ => {}
        }
        AppendError::Storage(self.storage())
    }
}

impl HttpStore {
    /// Connects to the server at `url` (e.g. `http://127.0.0.1:7610`) and reads its limits.
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        Self::connect_with(url, ClientOptions::default()).await
    }

    /// Connects with `options` (a bearer token, timeouts).
    pub async fn connect_with(url: &str, options: ClientOptions) -> Result<Self, ConnectError> {
        let invalid = |reason: String| ConnectError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let mut base = Url::parse(url).map_err(|error| invalid(error.to_string()))?;
        if base.scheme() != "http" && base.scheme() != "https" {
            return Err(invalid(format!(
                "the scheme is {:?}; give http:// or https://",
                base.scheme()
            )));
        }
        if base.cannot_be_a_base() {
            return Err(invalid("it cannot have a path".to_owned()));
        }
        // The API's paths are appended to the URL's path.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(
                options.connect_timeout_ms.unwrap_or(10_000),
            ))
            .read_timeout(Duration::from_millis(
                options.request_timeout_ms.unwrap_or(60_000),
            ));
        if let Some(pem) = &options.root_certificate_pem {
            let certificates = reqwest::Certificate::from_pem_bundle(pem).map_err(|error| {
                ConnectError::InvalidRootCertificate {
                    reason: error.to_string(),
                }
            })?;
            if certificates.is_empty() {
                return Err(ConnectError::InvalidRootCertificate {
                    reason: "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned(),
                });
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder
            .build()
            .map_err(|error| invalid(error.to_string()))?;
        let mut store = Self {
            client,
            base,
            token: options.token,
            limits: Limits::default(),
            version: String::new(),
            subscription_reconnects_max: options
                .subscription_reconnects_max
                .unwrap_or(SUBSCRIPTION_RECONNECTS_MAX),
        };
        let info: Info = store
            .send_json(store.request(Method::GET, store.url(&["info"])))
            .await
            .map_err(|failure| ConnectError::Server {
                url: url.to_owned(),
                source: failure,
            })?;
        if info.server != "factline" {
            return Err(ConnectError::Server {
                url: url.to_owned(),
                source: HttpError::Malformed {
                    method: Method::GET,
                    url: store.url(&["info"]),
                    reason: format!("the server says it is {:?}", info.server),
                },
            });
        }
        store.limits = info.limits.to_limits();
        store.version = info.version;
        Ok(store)
    }

    /// The server's version, as it reported it at connect.
    pub fn server_version(&self) -> &str {
        &self.version
    }

    /// `base` + the path segments, each percent-encoded (stream ids may hold `/`, `?`, …).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn stream_url(&self, stream: &StreamId, rest: &[&str]) -> Url {
        let mut segments = vec!["streams", stream.as_str()];
        segments.extend_from_slice(rest);
        self.url(&segments)
    }

    fn request(&self, method: Method, url: Url) -> RequestBuilder {
        let builder = self.client.request(method, url);
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Sends `builder`; an answer outside 2xx is a [`Failure`], no answer an [`HttpError`].
    async fn send(&self, builder: RequestBuilder) -> Result<Result<Response, Failure>, HttpError> {
        let request = builder.build().map_err(|source| HttpError::Transport {
            method: Method::GET,
            url: self.base.clone(),
            source,
        })?;
        let (method, url) = (request.method().clone(), request.url().clone());
        let response =
            self.client
                .execute(request)
                .await
                .map_err(|source| HttpError::Transport {
                    method: method.clone(),
                    url: url.clone(),
                    source,
                })?;
        let status = response.status();
        if status.is_success() {
            return Ok(Ok(response));
        }
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str::<ErrorBody>(&text).ok();
        Ok(Err(Failure {
            method,
            url,
            status,
            body,
            text,
        }))
    }

    /// Reads a 2xx answer's JSON body.
    async fn body<T: serde::de::DeserializeOwned>(response: Response) -> Result<T, HttpError> {
        let (method, url) = (Method::GET, response.url().clone());
        let bytes = response
            .bytes()
            .await
            .map_err(|source| HttpError::Transport {
                method: method.clone(),
                url: url.clone(),
                source,
            })?;
        serde_json::from_slice(&bytes).map_err(|error| HttpError::Malformed {
            method,
            url,
            reason: error.to_string(),
        })
    }

    /// Sends `builder` and reads its JSON answer; any error answer is an [`HttpError`].
    async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        builder: RequestBuilder,
    ) -> Result<T, HttpError> {
        match self.send(builder).await? {
            Ok(response) => Self::body(response).await,
            Err(failure) => Err(HttpError::Status {
                code: failure
                    .code()
                    .map_or_else(|| "-".to_owned(), |c| c.as_str().to_owned()),
                message: failure.message(),
                method: failure.method,
                url: failure.url,
                status: failure.status,
            }),
        }
    }

    /// The URL of a subscription to `target` from `from`.
    fn subscription_url(&self, target: &Target, from: SubscribeFrom<u64>) -> Url {
        match target {
            Target::Stream(stream) => {
                let mut url = self.stream_url(stream, &["subscribe"]);
                url.query_pairs_mut().append_pair("from", &from_query(from));
                url
            }
            Target::All(filter) => {
                let mut url = self.url(&["all", "subscribe"]);
                let mut pairs = url.query_pairs_mut();
                pairs.append_pair("from", &from_query(from));
                for (key, value) in filter_query(filter) {
                    pairs.append_pair(key, &value);
                }
                drop(pairs);
                url
            }
        }
    }

    /// Opens the event stream of `target` from `from`. `Err((error, resumable))`: resumable
    /// when the server could not be reached or answered 5xx (a restart, a proxy between).
    async fn open_events(
        &self,
        target: &Target,
        from: SubscribeFrom<u64>,
    ) -> Result<SseEvents, (SubscribeError, bool)> {
        let url = self.subscription_url(target, from);
        let sent = self
            .send(
                self.request(Method::GET, url)
                    .header(reqwest::header::ACCEPT, "text/event-stream"),
            )
            .await;
        let response = match sent {
            Ok(Ok(response)) => response,
            Ok(Err(failure)) => {
                if failure.code() == Some(ErrorCode::StreamDeleted)
                    && let Target::Stream(stream) = target
                {
                    let stream = failure.stream(stream);
                    return Err((SubscribeError::Deleted { stream }, false));
                }
                let resumable = failure.status.is_server_error();
                return Err((failure.storage().into(), resumable));
            }
            Err(error) => return Err((StorageError::backend(error).into(), true)),
        };
        let stream = match target {
            Target::Stream(stream) => Some(stream.clone()),
            Target::All(_) => None,
        };
        Ok(Box::pin(sse_events(
            response.url().clone(),
            response.bytes_stream(),
            stream,
        )))
    }

    /// A subscription to `target` that reconnects after the last event it delivered (see the
    /// module docs). `End` is resolved to the current head first, so that events appended
    /// while a connection is down are not skipped as "before the end".
    async fn subscribe(
        &self,
        target: Target,
        from: SubscribeFrom<u64>,
    ) -> Result<Subscription, SubscribeError> {
        let from = match from {
            SubscribeFrom::End => self.end_of(&target).await?,
            other => other,
        };
        let events = self.open_events(&target, from).await.map_err(|(e, _)| e)?;
        let follow = Follow {
            store: self.clone(),
            target,
            from,
            events: Some(events),
            failures: 0,
            done: false,
        };
        Ok(Subscription::new(futures::stream::unfold(
            follow,
            Follow::next,
        )))
    }

    /// `SubscribeFrom::End` of `target` as a checkpoint: after its last event, or its start.
    async fn end_of(&self, target: &Target) -> Result<SubscribeFrom<u64>, SubscribeError> {
        match target {
            Target::All(_) => Ok(match self.head_position().await? {
                Some(head) => SubscribeFrom::After(head.value()),
                None => SubscribeFrom::Start,
            }),
            Target::Stream(stream) => {
                let last = self
                    .read_stream(stream, ReadStreamOptions::backwards().limit(1))
                    .await;
                match last {
                    Ok(slice) => Ok(SubscribeFrom::After(slice.last_revision.value())),
                    Err(ReadStreamError::NotFound { .. }) => Ok(SubscribeFrom::Start),
                    Err(ReadStreamError::Deleted { stream }) => {
                        Err(SubscribeError::Deleted { stream })
                    }
                    Err(ReadStreamError::Storage(error)) => Err(error.into()),
                    Err(other) => Err(StorageError::backend(HttpError::Malformed {
                        method: Method::GET,
                        url: self.stream_url(stream, &[]),
                        reason: format!("reading the stream's end: {other}"),
                    })
                    .into()),
                }
            }
        }
    }
}

/// What a subscription follows, to reconnect to it.
enum Target {
    Stream(StreamId),
    All(EventFilter),
}

/// The events of one SSE connection; `Err` ends it, resumable or not.
type SseEvents = std::pin::Pin<Box<dyn Stream<Item = Result<RecordedEvent, SseEnd>> + Send>>;

/// How one SSE connection ended.
struct SseEnd {
    error: SubscriptionError,
    /// The connection dropped or the server ended it (a reconnect may continue); false for a
    /// tombstone, a failure the server reported, or an answer the client cannot read.
    resumable: bool,
}

/// A subscription across reconnects.
struct Follow {
    store: HttpStore,
    target: Target,
    /// Where a reconnect starts: after the last event delivered.
    from: SubscribeFrom<u64>,
    events: Option<SseEvents>,
    /// Failed connections in a row.
    failures: u32,
    done: bool,
}

impl Follow {
    async fn next(mut self) -> Option<(Result<RecordedEvent, SubscriptionError>, Self)> {
        if self.done {
            return None;
        }
        loop {
            let Some(events) = self.events.as_mut() else {
                let backoff = RECONNECT_BACKOFF_FIRST_MS
                    .saturating_mul(1 << self.failures.saturating_sub(1).min(16))
                    .min(RECONNECT_BACKOFF_MAX_MS);
                tokio::time::sleep(Duration::from_millis(backoff)).await;
                match self.store.open_events(&self.target, self.from).await {
                    Ok(events) => {
                        tracing::info!(attempt = self.failures, "subscription reconnected");
                        self.events = Some(events);
                    }
                    Err((error, resumable)) => {
                        let error = match error {
                            SubscribeError::Deleted { stream } => {
                                SubscriptionError::Deleted { stream }
                            }
                            SubscribeError::Storage(error) => error.into(),
                            // SubscribeError is non-exhaustive.
                            other => StorageError::backend(other).into(),
                        };
                        if let Some(ended) = self.failed(resumable, error) {
                            return Some((Err(ended), self));
                        }
                    }
                }
                continue;
            };
            match events.next().await {
                Some(Ok(event)) => {
                    self.from = SubscribeFrom::After(match self.target {
                        Target::Stream(_) => event.revision.value(),
                        Target::All(_) => event.position.value(),
                    });
                    self.failures = 0;
                    return Some((Ok(event), self));
                }
                Some(Err(end)) => {
                    self.events = None;
                    if let Some(ended) = self.failed(end.resumable, end.error) {
                        return Some((Err(ended), self));
                    }
                }
                None => self.events = None,
            }
        }
    }

    /// Counts a failure; `Some(error)` when the subscription ends with it.
    fn failed(&mut self, resumable: bool, error: SubscriptionError) -> Option<SubscriptionError> {
        self.failures += 1;
        if resumable && self.failures <= self.store.subscription_reconnects_max {
            tracing::warn!(
                attempt = self.failures,
                attempts_max = self.store.subscription_reconnects_max,
                %error,
                "subscription dropped; reconnecting"
            );
            return None;
        }
        self.done = true;
        Some(error)
    }
}

/// The events of a Server-Sent Events body. The connection ending is an error: a factline
/// subscription only ends when the server shuts down, the stream is tombstoned, or it fails.
fn sse_events(
    url: Url,
    body: impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
    stream: Option<StreamId>,
) -> impl Stream<Item = Result<RecordedEvent, SseEnd>> + Send + 'static {
    struct State<B> {
        body: std::pin::Pin<Box<B>>,
        parser: SseParser,
        ready: VecDeque<SseMessage>,
        url: Url,
        stream: Option<StreamId>,
        done: bool,
    }
    let state = State {
        body: Box::pin(body),
        parser: SseParser::default(),
        ready: VecDeque::new(),
        url,
        stream,
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        loop {
            if let Some(message) = state.ready.pop_front() {
                let item =
                    message_to_event(&state.url, state.stream.as_ref(), message).map_err(|error| {
                        SseEnd {
                            error,
                            resumable: false,
                        }
                    });
                if item.is_err() {
                    state.done = true;
                }
                return Some((item, state));
            }
            let (error, resumable) = match state.body.next().await {
                Some(Ok(chunk)) => match state.parser.feed(&chunk, &mut state.ready) {
                    Ok(()) => continue,
                    Err(reason) => (
                        HttpError::Malformed {
                            method: Method::GET,
                            url: state.url.clone(),
                            reason,
                        },
                        false,
                    ),
                },
                Some(Err(source)) => (
                    HttpError::Transport {
                        method: Method::GET,
                        url: state.url.clone(),
                        source,
                    },
                    true,
                ),
                None => (
                    HttpError::Malformed {
                        method: Method::GET,
                        url: state.url.clone(),
                        reason: "the server ended the subscription".to_owned(),
                    },
                    true,
                ),
            };
            state.done = true;
            let error = StorageError::backend(error).into();
            return Some((Err(SseEnd { error, resumable }), state));
        }
    })
}

fn message_to_event(
    url: &Url,
    stream: Option<&StreamId>,
    message: SseMessage,
) -> Result<RecordedEvent, SubscriptionError> {
    let malformed = |reason: String| {
        SubscriptionError::from(StorageError::backend(HttpError::Malformed {
            method: Method::GET,
            url: url.clone(),
            reason,
        }))
    };
    if message.event.as_deref() == Some("error") {
        let body: ErrorBody = serde_json::from_str(&message.data)
            .map_err(|error| malformed(format!("an error message that is not JSON: {error}")))?;
        if body.error == ErrorCode::StreamDeleted
            && let Some(stream) = stream
        {
            return Err(SubscriptionError::Deleted {
                stream: body
                    .details
                    .get("stream")
                    .and_then(Value::as_str)
                    .and_then(|name| StreamId::new(name).ok())
                    .unwrap_or_else(|| stream.clone()),
            });
        }
        return Err(malformed(format!(
            "the subscription failed: {}: {}",
            body.error.as_str(),
            body.message
        )));
    }
    let json: EventJson = serde_json::from_str(&message.data)
        .map_err(|error| malformed(format!("an event that is not JSON: {error}")))?;
    json.into_recorded().map_err(malformed)
}

/// Most bytes one SSE message (or one line) may take before the stream counts as malformed.
const SSE_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// One dispatched Server-Sent Events message.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SseMessage {
    pub(crate) event: Option<String>,
    pub(crate) id: Option<String>,
    pub(crate) data: String,
}

/// An incremental parser of `text/event-stream` (the WHATWG rules: lines end in LF, CRLF or
/// CR; `field: value` with one optional space; comments start with `:`; a blank line
/// dispatches; `data` lines join with LF).
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    last_was_cr: bool,
    message: SseMessage,
    has_data: bool,
    message_bytes: usize,
}

impl SseParser {
    /// Feeds `chunk`, pushing each completed message to `out`.
    pub(crate) fn feed(
        &mut self,
        chunk: &[u8],
        out: &mut VecDeque<SseMessage>,
    ) -> Result<(), String> {
        for &byte in chunk {
            match byte {
                b'\n' if self.last_was_cr => self.last_was_cr = false,
                b'\n' | b'\r' => {
                    self.last_was_cr = byte == b'\r';
                    self.end_line(out)?;
                }
                _ => {
                    self.last_was_cr = false;
                    self.line.push(byte);
                    self.message_bytes += 1;
                    if self.message_bytes > SSE_MESSAGE_BYTES_MAX {
                        return Err(format!("an SSE message over {SSE_MESSAGE_BYTES_MAX} bytes"));
                    }
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self, out: &mut VecDeque<SseMessage>) -> Result<(), String> {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            let message = std::mem::take(&mut self.message);
            if self.has_data || message.event.is_some() {
                out.push_back(message);
            }
            self.has_data = false;
            self.message_bytes = 0;
            return Ok(());
        }
        let line =
            String::from_utf8(line).map_err(|_| "an SSE line that is not UTF-8".to_owned())?;
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.message.data.push('\n');
                }
                self.message.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.message.event = Some(value.to_owned()),
            "id" => self.message.id = Some(value.to_owned()),
            _ => {}
        }
        Ok(())
    }
}

fn from_query(from: SubscribeFrom<u64>) -> String {
    match from {
        SubscribeFrom::Start => "start".to_owned(),
        SubscribeFrom::End => "end".to_owned(),
        SubscribeFrom::After(last) => (last + 1).to_string(),
    }
}

/// The query of a page read: `limit`, `direction` and, when given, `from`.
fn page_query(
    limit: usize,
    direction: Direction,
    from: Option<u64>,
) -> Vec<(&'static str, String)> {
    let direction = match direction {
        Direction::Backwards => "backwards",
        _ => "forwards",
    };
    let mut query = vec![
        ("limit", limit.to_string()),
        ("direction", direction.to_owned()),
    ];
    if let Some(from) = from {
        query.push(("from", from.to_string()));
    }
    query
}

fn filter_query(filter: &EventFilter) -> Vec<(&'static str, String)> {
    let mut query = Vec::new();
    if let Some(prefix) = &filter.stream_prefix {
        query.push(("prefix", prefix.clone()));
    }
    if let Some(category) = &filter.category {
        query.push(("category", category.clone()));
    }
    if let Some(event_type) = &filter.event_type_prefix {
        query.push(("type", event_type.clone()));
    }
    query
}

fn malformed(method: Method, url: &Url, reason: impl Into<String>) -> StorageError {
    StorageError::backend(HttpError::Malformed {
        method,
        url: url.clone(),
        reason: reason.into(),
    })
}

fn recorded(events: Vec<EventJson>, url: &Url) -> Result<Vec<RecordedEvent>, StorageError> {
    events
        .into_iter()
        .map(|event| {
            event
                .into_recorded()
                .map_err(|reason| malformed(Method::GET, url, reason))
        })
        .collect()
}

fn timestamp(text: &str, url: &Url) -> Result<Timestamp, StorageError> {
    Timestamp::parse_rfc3339(text)
        .map_err(|error| malformed(Method::POST, url, format!("recorded_at {text:?}: {error}")))
}

#[async_trait]
impl EventStore for HttpStore {
    fn limits(&self) -> &Limits {
        &self.limits
    }

    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, AppendError> {
        let url = self.stream_url(stream, &[]);
        let body: Vec<NewEvent> = events.iter().map(NewEvent::from_event_data).collect();
        let builder = self
            .request(Method::POST, url.clone())
            .header("Expected-Version", expected.to_string())
            .json(&body);
        match self.send(builder).await.map_err(StorageError::backend)? {
            Ok(response) => {
                let answer: AppendResponse =
                    Self::body(response).await.map_err(StorageError::backend)?;
                Ok(AppendResult {
                    next_expected_version: Revision(answer.next_expected_version),
                    position: Position(answer.position),
                    recorded_at: timestamp(&answer.recorded_at, &url)?,
                })
            }
            Err(failure) => Err(failure.append_error(stream)),
        }
    }

    async fn append_multi(
        &self,
        requests: Vec<AppendRequest>,
    ) -> Result<Vec<AppendResult>, AppendError> {
        let url = self.url(&["append"]);
        let Some(first) = requests.first().map(|request| request.stream.clone()) else {
            return Err(AppendError::Rejected(EventsRejected::Empty));
        };
        let body = MultiAppend {
            streams: requests
                .iter()
                .map(|request| StreamAppend {
                    stream: request.stream.as_str().to_owned(),
                    expected_version: Some(Value::String(request.expected.to_string())),
                    events: request
                        .events
                        .iter()
                        .map(NewEvent::from_event_data)
                        .collect(),
                })
                .collect(),
        };
        let builder = self.request(Method::POST, url.clone()).json(&body);
        match self.send(builder).await.map_err(StorageError::backend)? {
            Ok(response) => {
                let answer: MultiAppendResponse =
                    Self::body(response).await.map_err(StorageError::backend)?;
                answer
                    .results
                    .into_iter()
                    .map(|result| {
                        Ok(AppendResult {
                            next_expected_version: Revision(result.next_expected_version),
                            position: Position(result.position),
                            recorded_at: timestamp(&result.recorded_at, &url)?,
                        })
                    })
                    .collect()
            }
            Err(failure) => Err(failure.append_error(&first)),
        }
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadStreamOptions,
    ) -> Result<StreamSlice, ReadStreamError> {
        let url = self.stream_url(stream, &[]);
        let query = page_query(
            options.limit,
            options.direction,
            options.from.map(Revision::value),
        );
        let builder = self.request(Method::GET, url.clone()).query(&query);
        match self.send(builder).await.map_err(StorageError::backend)? {
            Ok(response) => {
                let page: StreamPage = Self::body(response).await.map_err(StorageError::backend)?;
                Ok(StreamSlice {
                    events: recorded(page.events, &url)?,
                    last_revision: Revision(page.last_revision),
                    next_revision: Revision(page.next_revision),
                    is_end: page.is_end,
                })
            }
            Err(failure) => Err(match failure.code() {
                Some(ErrorCode::StreamNotFound) => ReadStreamError::NotFound {
                    stream: failure.stream(stream),
                },
                Some(ErrorCode::StreamDeleted) => ReadStreamError::Deleted {
                    stream: failure.stream(stream),
                },
                _ => match failure.limit() {
                    Some(limit) => limit.into(),
                    None => failure.storage().into(),
                },
            }),
        }
    }

    async fn read_all(&self, options: ReadAllOptions) -> Result<AllSlice, ReadAllError> {
        let url = self.url(&["all"]);
        let mut query = page_query(
            options.limit,
            options.direction,
            options.from.map(Position::value),
        );
        query.extend(filter_query(&options.filter));
        let builder = self.request(Method::GET, url.clone()).query(&query);
        match self.send(builder).await.map_err(StorageError::backend)? {
            Ok(response) => {
                let page: AllPage = Self::body(response).await.map_err(StorageError::backend)?;
                Ok(AllSlice {
                    events: recorded(page.events, &url)?,
                    next_position: Position(page.next_position),
                    is_end: page.is_end,
                })
            }
            Err(failure) => Err(match failure.limit() {
                Some(limit) => limit.into(),
                None => failure.storage().into(),
            }),
        }
    }

    async fn head_position(&self) -> Result<Option<Position>, StorageError> {
        let health: crate::json::Health = self
            .send_json(self.request(Method::GET, self.url(&["health"])))
            .await
            .map_err(StorageError::backend)?;
        Ok(health.head_position.map(Position))
    }

    async fn subscribe_to_stream(
        &self,
        stream: &StreamId,
        from: SubscribeFrom<Revision>,
    ) -> Result<Subscription, SubscribeError> {
        self.subscribe(Target::Stream(stream.clone()), from.map(Revision::value))
            .await
    }

    async fn subscribe_to_all(
        &self,
        from: SubscribeFrom<Position>,
        filter: EventFilter,
    ) -> Result<Subscription, SubscribeError> {
        self.subscribe(Target::All(filter), from.map(Position::value))
            .await
    }

    async fn stream_metadata(&self, stream: &StreamId) -> Result<StreamMetadata, MetadataError> {
        let url = self.stream_url(stream, &["metadata"]);
        match self
            .send(self.request(Method::GET, url))
            .await
            .map_err(StorageError::backend)?
        {
            Ok(response) => {
                let json: MetadataJson =
                    Self::body(response).await.map_err(StorageError::backend)?;
                Ok(json.into())
            }
            Err(failure) => Err(metadata_error(failure, stream)),
        }
    }

    async fn set_stream_metadata(
        &self,
        stream: &StreamId,
        metadata: StreamMetadata,
    ) -> Result<(), MetadataError> {
        let url = self.stream_url(stream, &["metadata"]);
        let json = MetadataJson {
            max_count: metadata.max_count,
            // The API counts whole seconds; a fraction rounds up so nothing expires early.
            max_age_seconds: metadata
                .max_age
                .map(|age| age.as_secs() + u64::from(age.subsec_nanos() > 0)),
            truncate_before: metadata.truncate_before.map(Revision::value),
        };
        match self
            .send(self.request(Method::PUT, url).json(&json))
            .await
            .map_err(StorageError::backend)?
        {
            Ok(_) => Ok(()),
            Err(failure) => Err(metadata_error(failure, stream)),
        }
    }

    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<(), DeleteError> {
        let mut url = self.stream_url(stream, &[]);
        if mode == DeleteMode::Tombstone {
            url.query_pairs_mut().append_pair("hard", "true");
        }
        let builder = self
            .request(Method::DELETE, url)
            .header("Expected-Version", expected.to_string());
        match self.send(builder).await.map_err(StorageError::backend)? {
            Ok(_) => Ok(()),
            Err(failure) => Err(
                if let Some((expected, actual)) = failure.wrong_expected_version() {
                    DeleteError::WrongExpectedVersion {
                        stream: failure.stream(stream),
                        expected,
                        actual,
                    }
                } else {
                    match failure.code() {
                        Some(ErrorCode::StreamNotFound) => DeleteError::NotFound {
                            stream: failure.stream(stream),
                        },
                        Some(ErrorCode::StreamDeleted) => DeleteError::Deleted {
                            stream: failure.stream(stream),
                        },
                        _ => failure.storage().into(),
                    }
                },
            ),
        }
    }
}

fn metadata_error(failure: Failure, stream: &StreamId) -> MetadataError {
    match failure.code() {
        Some(ErrorCode::StreamDeleted) => MetadataError::Deleted {
            stream: failure.stream(stream),
        },
        Some(ErrorCode::InvalidMetadata) => {
            let field = match failure.detail_str("field") {
                Some("max_count") => "max_count",
                Some("max_age") => "max_age",
                Some("truncate_before") => "truncate_before",
                _ => "metadata",
            };
            MetadataError::Invalid {
                field,
                reason: "refused by the server",
            }
        }
        _ => failure.storage().into(),
    }
}

#[async_trait]
impl SnapshotStore for HttpStore {
    async fn save_snapshot(
        &self,
        stream: &StreamId,
        snapshot: Snapshot,
    ) -> Result<bool, SnapshotError> {
        let url = self.stream_url(stream, &["snapshot"]);
        let json = SnapshotJson::from(&snapshot);
        match self
            .send(self.request(Method::PUT, url).json(&json))
            .await
            .map_err(StorageError::backend)?
        {
            Ok(response) => {
                let saved: SnapshotSaved =
                    Self::body(response).await.map_err(StorageError::backend)?;
                Ok(saved.stored)
            }
            Err(failure) => Err(snapshot_error(failure, stream)),
        }
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        let url = self.stream_url(stream, &["snapshot"]);
        match self
            .send(self.request(Method::GET, url.clone()))
            .await
            .map_err(StorageError::backend)?
        {
            Ok(response) => {
                let json: SnapshotJson =
                    Self::body(response).await.map_err(StorageError::backend)?;
                json.into_snapshot()
                    .map(Some)
                    .map_err(|error| malformed(Method::GET, &url, error.body().message).into())
            }
            Err(failure) if failure.code() == Some(ErrorCode::SnapshotNotFound) => Ok(None),
            Err(failure) => Err(snapshot_error(failure, stream)),
        }
    }

    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), SnapshotError> {
        let url = self.stream_url(stream, &["snapshot"]);
        match self
            .send(self.request(Method::DELETE, url))
            .await
            .map_err(StorageError::backend)?
        {
            Ok(_) => Ok(()),
            Err(failure) => Err(snapshot_error(failure, stream)),
        }
    }
}

fn snapshot_error(failure: Failure, stream: &StreamId) -> SnapshotError {
    if let Some(limit) = failure.limit() {
        return limit.into();
    }
    match failure.code() {
        Some(ErrorCode::StreamDeleted) => SnapshotError::Deleted {
            stream: failure.stream(stream),
        },
        _ => failure.storage().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&[u8]]) -> Vec<SseMessage> {
        let mut parser = SseParser::default();
        let mut out = VecDeque::new();
        for chunk in chunks {
            parser.feed(chunk, &mut out).unwrap();
        }
        out.into_iter().collect()
    }

    #[test]
    fn sse_messages_are_split_at_blank_lines_whatever_the_chunks() {
        let text =
            b": keep-alive\n\nid: 7\ndata: {\"a\":1}\n\nevent: error\ndata: x\r\ndata: y\r\n\r\n";
        let whole = parse(&[text]);
        assert_eq!(
            whole,
            vec![
                SseMessage {
                    event: None,
                    id: Some("7".into()),
                    data: "{\"a\":1}".into()
                },
                SseMessage {
                    event: Some("error".into()),
                    id: None,
                    data: "x\ny".into()
                },
            ]
        );
        // Byte by byte, with the CRLF split between chunks, gives the same messages.
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(parse(&bytes), whole);
    }

    #[test]
    fn an_sse_line_that_is_not_utf8_is_an_error() {
        let mut parser = SseParser::default();
        let mut out = VecDeque::new();
        assert!(parser.feed(b"data: \xff\n", &mut out).is_err());
    }
}
