//! The web UI: server-rendered HTML pages over the same store, with the assets embedded in the
//! binary (no CDN, nothing fetched at run time).
//!
//! - `/` — recently active streams (from the newest events of `$all`), a search by stream-id
//!   prefix, the head position and the open subscriptions;
//! - `/ui/streams/{stream}` — a stream's events, newest first, with pretty-printed JSON, its
//!   metadata and paging;
//! - `/ui/all` — a page of `$all`, filtered like the API;
//! - `/ui/tail` — a live tail of `$all` or one stream over the API's SSE endpoints
//!   (`?stream=`, `?from=start|end`, `?limit=N` to stop after N events);
//! - `/ui/subscriptions` — the persistent-subscription groups (admin): source, strategy,
//!   checkpoint and lag, connected consumers, in-flight and parked events, counters; and the
//!   checkpoints of the backend's checkpoint store (projections, process managers), each
//!   with how far it is behind the head.
//!
//! Every value from the store goes through `maud`'s escaping; the one script (`/ui/app.js`)
//! writes events into the page with `textContent` only. Pages answer with a strict
//! Content-Security-Policy (`default-src 'self'`), so nothing but our own assets can load.
//! With auth on, pages take the same bearer token as the API (`Authorization` header), or a
//! browser signs in at `/ui/login`: the token goes into an HttpOnly, SameSite=Strict cookie
//! that authorizes reads only (pages, and the SSE the live tail opens), never a write. A page
//! asked for without a token redirects to the sign-in form.

use std::collections::BTreeSet;

use axum::{
    Form, Router,
    extract::{FromRequestParts, Path, Query, State},
    http::{HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use factline_core::{
    ContentType, EventFilter, EventStore, Position, ReadAllOptions, ReadStreamError,
    ReadStreamOptions, RecordedEvent, Revision, StreamId,
    persistent::{GroupInfo, PersistentSource},
};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use crate::{
    AppState,
    auth::{self, Caller},
    error::ErrorCode,
};

/// Events of `$all` the stream list looks through.
const RECENT_EVENTS_SCANNED: usize = 10_000;
/// Streams the list shows at most.
const STREAMS_LISTED_MAX: usize = 200;
/// Events per page of the stream and `$all` pages.
const PAGE_EVENTS: usize = 50;
/// Checkpoints the subscriptions page lists at most.
const CHECKPOINTS_LISTED_MAX: usize = 500;
/// Payloads longer than this are cut in the page (the API serves them whole).
const PAYLOAD_SHOWN_BYTES_MAX: usize = 16 * 1024;

const STYLE: &str = include_str!("ui/app.css");
const SCRIPT: &str = include_str!("ui/app.js");

pub(crate) fn routes(state: AppState) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/ui/streams/{stream}", get(stream_page))
        .route("/ui/all", get(all_page))
        .route("/ui/tail", get(tail_page))
        .route("/ui/subscriptions", get(subscriptions_page))
        .route("/ui/login", get(login_page).post(sign_in))
        .route("/ui/logout", post(sign_out))
        .route("/ui/app.css", get(|| async { asset(STYLE, "text/css") }))
        .route(
            "/ui/app.js",
            get(|| async { asset(SCRIPT, "text/javascript") }),
        )
        .with_state(state)
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// A full page with the security headers.
fn page(title: &str, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · factline" }
                link rel="stylesheet" href="/ui/app.css";
            }
            body {
                header {
                    a.brand href="/" { "factline" }
                    nav {
                        a href="/" { "Streams" }
                        a href="/ui/all" { "$all" }
                        a href="/ui/tail" { "Live tail" }
                        a href="/ui/subscriptions" { "Subscriptions" }
                        a href="/openapi.json" { "API" }
                        a href="/ui/login" { "Sign in" }
                    }
                }
                main { (body) }
            }
        }
    };
    let mut response = markup.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; object-src 'none'; base-uri 'none'"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// The caller of a page: as for the API, except that a page asked for without a token (or with
/// one no longer accepted) redirects to the sign-in form instead of answering JSON.
struct UiCaller(Caller);

impl FromRequestParts<AppState> for UiCaller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        match Caller::from_request_parts(parts, state).await {
            Ok(caller) => Ok(Self(caller)),
            Err(error) if error.code() == ErrorCode::Unauthorized => {
                Err(Redirect::to("/ui/login").into_response())
            }
            Err(error) => Err(error.into_response()),
        }
    }
}

#[derive(Debug, Deserialize)]
struct SignIn {
    token: String,
}

fn login_form(state: &AppState, status: StatusCode, message: Option<&str>) -> Response {
    let auth_on = state.auth.is_some();
    let mut response = page(
        "sign in",
        html! {
            h1 { "Sign in" }
            @if !auth_on {
                p.note { "This server runs without auth: every page is open, no token needed." }
                p { a href="/" { "Streams" } }
            } @else {
                @if let Some(message) = message { p.error { (message) } }
                p.note {
                    "Give a bearer token of this server. The browser keeps it in an HttpOnly cookie "
                    "for this session; it lets pages and the live tail read, and never writes."
                }
                form.login method="post" action="/ui/login" {
                    label { "token " input type="password" name="token" autocomplete="current-password" required; }
                    button type="submit" { "Sign in" }
                }
                form.logout method="post" action="/ui/logout" {
                    button type="submit" { "Sign out" }
                }
            }
        },
    );
    *response.status_mut() = status;
    response
}

async fn login_page(State(state): State<AppState>) -> Response {
    login_form(&state, StatusCode::OK, None)
}

async fn sign_in(State(state): State<AppState>, Form(form): Form<SignIn>) -> Response {
    let Some(config) = &state.auth else {
        return Redirect::to("/").into_response();
    };
    let token = form.token.trim();
    if config.grant(token).is_none() {
        return login_form(&state, StatusCode::UNAUTHORIZED, Some("Unknown token."));
    }
    let cookie = auth::sign_in_cookie(token, state.options.tls.is_some());
    match HeaderValue::from_str(&cookie) {
        Ok(cookie) => {
            let mut response = Redirect::to("/").into_response();
            response.headers_mut().insert(header::SET_COOKIE, cookie);
            response
        }
        // base64url and fixed attributes: always a valid header value.
        Err(_) => error_page(StatusCode::INTERNAL_SERVER_ERROR, "cannot set the cookie"),
    }
}

async fn sign_out(State(state): State<AppState>) -> Response {
    let mut response = Redirect::to("/ui/login").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&auth::sign_out_cookie(state.options.tls.is_some())) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

fn error_page(status: StatusCode, message: &str) -> Response {
    let mut response = page("error", html! { h1 { "Error" } p.error { (message) } });
    *response.status_mut() = status;
    response
}

fn stream_link(stream: &StreamId) -> String {
    format!("/ui/streams/{}", percent(stream.as_str()))
}

/// The payload as shown: pretty JSON, or a note for binary data.
fn payload(event: &RecordedEvent) -> String {
    let shown = &event.data[..event.data.len().min(PAYLOAD_SHOWN_BYTES_MAX)];
    let cut = event.data.len() > shown.len();
    let text = match event.content_type {
        ContentType::Json if !cut => serde_json::from_slice::<serde_json::Value>(shown)
            .ok()
            .and_then(|value| serde_json::to_string_pretty(&value).ok()),
        _ => None,
    };
    match text {
        Some(text) => text,
        None if event.content_type == ContentType::Json => {
            let text = String::from_utf8_lossy(shown).into_owned();
            if cut {
                format!("{text}… ({} bytes in all)", event.data.len())
            } else {
                text
            }
        }
        None => format!("<{} bytes of binary data>", event.data.len()),
    }
}

fn events_table(events: &[RecordedEvent], show_stream: bool) -> Markup {
    html! {
        table.events {
            thead {
                tr {
                    th { "position" }
                    @if show_stream { th { "stream" } }
                    th { "revision" }
                    th { "type" }
                    th { "recorded" }
                    th { "data" }
                }
            }
            tbody {
                @for event in events {
                    tr {
                        td.num { (event.position.value()) }
                        @if show_stream {
                            td { a href=(stream_link(&event.stream)) { (event.stream.as_str()) } }
                        }
                        td.num { (event.revision.value()) }
                        td { (event.event_type.as_str()) }
                        td.time { (event.recorded_at.to_rfc3339()) }
                        td {
                            pre { (payload(event)) }
                            @if !event.metadata.is_empty() {
                                details {
                                    summary { "metadata" }
                                    dl {
                                        @for (key, value) in event.metadata.iter() {
                                            dt { (key) } dd { (value) }
                                        }
                                    }
                                }
                            }
                            small.id { (event.id.to_string()) }
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct HomeQuery {
    /// Stream-id prefix to search for.
    q: Option<String>,
}

/// The distinct streams of the newest `$all` events (matching `prefix`), newest first.
async fn recent_streams(
    store: &dyn EventStore,
    prefix: Option<&str>,
) -> Result<Vec<(StreamId, Position)>, String> {
    let mut filter = EventFilter::all();
    filter.stream_prefix = prefix.map(str::to_owned);
    let mut options = ReadAllOptions::backwards().limit(1_000).filter(filter);
    let mut seen = BTreeSet::new();
    let mut streams = Vec::new();
    let mut scanned = 0;
    while scanned < RECENT_EVENTS_SCANNED && streams.len() < STREAMS_LISTED_MAX {
        let page = store
            .read_all(options.clone())
            .await
            .map_err(|error| error.to_string())?;
        scanned += page.events.len();
        for event in &page.events {
            if seen.insert(event.stream.clone()) && streams.len() < STREAMS_LISTED_MAX {
                streams.push((event.stream.clone(), event.position));
            }
        }
        if page.is_end || page.events.is_empty() {
            break;
        }
        options = options.from(page.next_position);
    }
    Ok(streams)
}

async fn home(
    State(state): State<AppState>,
    UiCaller(caller): UiCaller,
    Query(query): Query<HomeQuery>,
) -> Response {
    let prefix = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let mut filter = EventFilter::all();
    filter.stream_prefix = prefix.map(str::to_owned);
    if caller.require_read_all(&filter).is_err() {
        return error_page(StatusCode::FORBIDDEN, "this token may not read $all");
    }
    let head = state.store.head_position().await.ok().flatten();
    let streams = match recent_streams(&*state.store, prefix).await {
        Ok(streams) => streams,
        Err(error) => return error_page(StatusCode::SERVICE_UNAVAILABLE, &error),
    };
    let subscribers = state.options.subscribers_max - state.subscribers.available_permits();
    page(
        "streams",
        html! {
            h1 { "Streams" }
            p.facts {
                "head position: " strong { (head.map_or_else(|| "none (empty log)".to_owned(), |p| p.value().to_string())) }
                " · open SSE subscriptions and consumers: " strong #subscribers { (subscribers) }
                " · " a href="/ui/subscriptions" { "persistent subscriptions" }
            }
            form.search method="get" action="/" {
                input type="search" name="q" placeholder="stream id prefix, e.g. order-" value=(prefix.unwrap_or(""));
                button type="submit" { "Search" }
            }
            @if streams.is_empty() {
                p.empty { "No streams" @if let Some(prefix) = prefix { " starting with " code { (prefix) } } "." }
            } @else {
                p.note { "Streams with events among the newest " (RECENT_EVENTS_SCANNED) " of $all, most recent first." }
                table.streams {
                    thead { tr { th { "stream" } th { "category" } th { "last position" } } }
                    tbody {
                        @for (stream, position) in &streams {
                            tr {
                                td { a href=(stream_link(stream)) { (stream.as_str()) } }
                                td { (stream.category()) }
                                td.num { (position.value()) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// What a group reads, in words.
fn source_text(source: &PersistentSource) -> String {
    match source {
        PersistentSource::Stream { stream } => format!("stream {stream}"),
        PersistentSource::All { filter } => {
            let mut text = String::from("$all");
            for (label, part) in [
                ("prefix", &filter.stream_prefix),
                ("category", &filter.category),
                ("type", &filter.event_type_prefix),
            ] {
                if let Some(part) = part {
                    text.push_str(&format!(" {label}={part}"));
                }
            }
            text
        }
    }
}

async fn subscriptions_page(State(state): State<AppState>, UiCaller(caller): UiCaller) -> Response {
    if caller
        .require_admin("list persistent subscription groups")
        .is_err()
    {
        return error_page(
            StatusCode::FORBIDDEN,
            "listing persistent subscription groups takes an admin token",
        );
    }
    let groups = match crate::persistent::subscriptions(&state).await {
        Ok(subscriptions) => subscriptions.list().await.map_err(|e| e.to_string()),
        Err(error) => Err(error.body().message),
    };
    let groups: Vec<GroupInfo> = match groups {
        Ok(groups) => groups,
        Err(error) => return error_page(StatusCode::SERVICE_UNAVAILABLE, &error),
    };
    let head = state.store.head_position().await.ok().flatten();
    let checkpoints = match &state.options.checkpoints {
        None => None,
        Some(store) => Some(
            store
                .0
                .list_checkpoints(CHECKPOINTS_LISTED_MAX)
                .await
                .map_err(|error| error.to_string()),
        ),
    };
    page(
        "subscriptions",
        html! {
            h1 { "Persistent subscriptions" }
            p.facts {
                "groups: " strong { (groups.len()) }
                " · head position: " strong { (head.map_or_else(|| "none".to_owned(), |p| p.value().to_string())) }
                " · managed over the API: " code { "PUT /subscriptions/{group}" }
            }
            @if groups.is_empty() {
                p.empty { "No groups." }
            } @else {
                table.groups {
                    thead {
                        tr {
                            th { "group" } th { "source" } th { "strategy" } th { "checkpoint" }
                            th { "behind" } th { "consumers" } th { "in flight" } th { "parked" }
                            th { "delivered" } th { "acked" } th { "retried" } th { "timed out" }
                            th { "last error" }
                        }
                    }
                    tbody {
                        @for group in &groups {
                            @let parked = format!("factline.parked-{}", group.group);
                            @let behind = match (&group.settings.source, head, group.checkpoint) {
                                (PersistentSource::All { .. }, Some(head), Some(at)) => head.value().saturating_sub(at).to_string(),
                                (PersistentSource::All { .. }, Some(head), None) => (head.value() + 1).to_string(),
                                _ => "—".to_owned(),
                            };
                            tr {
                                td { strong { (group.group) } }
                                td { (source_text(&group.settings.source)) }
                                td { (format!("{:?}", group.settings.strategy).to_lowercase()) }
                                td.num { (group.checkpoint.map_or("—".to_owned(), |c| c.to_string())) }
                                td.num { (behind) }
                                td {
                                    @if group.consumers.is_empty() { span.empty { "none" } }
                                    @for consumer in &group.consumers {
                                        div { (consumer.name) " " small.id { "#" (consumer.id.0) } " · " (consumer.in_flight) " in flight" }
                                    }
                                }
                                td.num { (group.in_flight) }
                                td.num {
                                    @match StreamId::new(parked.as_str()) {
                                        Ok(stream) => a href=(stream_link(&stream)) { (group.parked_waiting) },
                                        Err(_) => (group.parked_waiting),
                                    }
                                }
                                td.num { (group.delivered_total) }
                                td.num { (group.acked_total) }
                                td.num { (group.retried_total) }
                                td.num { (group.timed_out_total) }
                                td { @if let Some(error) = &group.last_error { span.error { (error) } } @else { "—" } }
                            }
                        }
                    }
                }
                p.note { "Counters are since the server started. A parked count links to the group's dead-letter stream." }
            }
            h2 { "Checkpoints" }
            p.note { "Projections, process managers (" code { "process:{category}" } ") and subscribers that save their place in this store's checkpoint store." }
            @match checkpoints {
                None => p.empty { "This server was not given a checkpoint store." },
                Some(Err(error)) => p.error { "Listing the checkpoints failed: " (error) },
                Some(Ok(list)) if list.is_empty() => p.empty { "No checkpoints saved." },
                Some(Ok(list)) => {
                    table.checkpoints {
                        thead { tr { th { "name" } th { "position" } th { "behind the head" } } }
                        tbody {
                            @for (name, position) in &list {
                                tr {
                                    td { (name) }
                                    td.num { (position.value()) }
                                    td.num { (head.map_or_else(|| "—".to_owned(), |h| h.value().saturating_sub(position.value()).to_string())) }
                                }
                            }
                        }
                    }
                    @if list.len() == CHECKPOINTS_LISTED_MAX {
                        p.note { "The first " (CHECKPOINTS_LISTED_MAX) " by name." }
                    }
                }
            }
        },
    )
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    /// Where the page starts (a revision or a position).
    from: Option<u64>,
    prefix: Option<String>,
    category: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
}

async fn stream_page(
    State(state): State<AppState>,
    UiCaller(caller): UiCaller,
    Path(stream): Path<String>,
    Query(query): Query<PageQuery>,
) -> Response {
    let stream = match StreamId::new(&stream) {
        Ok(stream) => stream,
        Err(error) => return error_page(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    if caller.require_read(stream.as_str()).is_err() {
        return error_page(StatusCode::FORBIDDEN, "this token may not read this stream");
    }
    let mut options = ReadStreamOptions::backwards().limit(PAGE_EVENTS);
    if let Some(from) = query.from {
        options = options.from(Revision(from));
    }
    let slice = match state.store.read_stream(&stream, options).await {
        Ok(slice) => slice,
        Err(ReadStreamError::NotFound { .. }) => {
            return error_page(
                StatusCode::NOT_FOUND,
                &format!("stream {stream} has no visible events"),
            );
        }
        Err(error) => return error_page(StatusCode::GONE, &error.to_string()),
    };
    let metadata = state.store.stream_metadata(&stream).await.ok();
    let tail_link = format!(
        "/ui/tail?stream={}",
        &stream_link(&stream)["/ui/streams/".len()..]
    );
    page(
        stream.as_str(),
        html! {
            h1 { "Stream " code { (stream.as_str()) } }
            p.facts {
                "category " code { (stream.category()) }
                " · last revision " strong { (slice.last_revision.value()) }
                " · " a href=(tail_link) { "live tail" }
            }
            @if let Some(metadata) = metadata {
                table.metadata {
                    tr { th { "max_count" } td { (metadata.max_count.map_or("—".to_owned(), |n| n.to_string())) } }
                    tr { th { "max_age" } td { (metadata.max_age.map_or("—".to_owned(), |age| format!("{} s", age.as_secs()))) } }
                    tr { th { "truncate_before" } td { (metadata.truncate_before.map_or("—".to_owned(), |r| r.value().to_string())) } }
                }
            }
            (events_table(&slice.events, false))
            @if !slice.is_end {
                p.paging { a href=(format!("{}?from={}", stream_link(&stream), slice.next_revision.value())) { "older events →" } }
            }
        },
    )
}

async fn all_page(
    State(state): State<AppState>,
    UiCaller(caller): UiCaller,
    Query(query): Query<PageQuery>,
) -> Response {
    let mut filter = EventFilter::all();
    filter.stream_prefix = query.prefix.clone().filter(|s| !s.is_empty());
    filter.category = query.category.clone().filter(|s| !s.is_empty());
    filter.event_type_prefix = query.event_type.clone().filter(|s| !s.is_empty());
    if caller.require_read_all(&filter).is_err() {
        return error_page(
            StatusCode::FORBIDDEN,
            "this token may not read $all with this filter",
        );
    }
    let mut options = ReadAllOptions::backwards()
        .limit(PAGE_EVENTS)
        .filter(filter.clone());
    if let Some(from) = query.from {
        options = options.from(Position(from));
    }
    let slice = match state.store.read_all(options).await {
        Ok(slice) => slice,
        Err(error) => return error_page(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    let mut next = format!("/ui/all?from={}", slice.next_position.value());
    for (key, value) in [
        ("prefix", &filter.stream_prefix),
        ("category", &filter.category),
        ("type", &filter.event_type_prefix),
    ] {
        if let Some(value) = value {
            next.push_str(&format!("&{key}={}", percent(value)));
        }
    }
    page(
        "$all",
        html! {
            h1 { "$all" }
            form.search method="get" action="/ui/all" {
                input type="search" name="prefix" placeholder="stream prefix" value=(filter.stream_prefix.as_deref().unwrap_or(""));
                input type="search" name="category" placeholder="category" value=(filter.category.as_deref().unwrap_or(""));
                input type="search" name="type" placeholder="event type prefix" value=(filter.event_type_prefix.as_deref().unwrap_or(""));
                button type="submit" { "Filter" }
            }
            (events_table(&slice.events, true))
            @if !slice.is_end {
                p.paging { a href=(next) { "older events →" } }
            }
        },
    )
}

/// `text` percent-encoded for a URL path segment or query value (unreserved bytes kept).
fn percent(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[derive(Debug, Deserialize)]
struct TailQuery {
    stream: Option<String>,
    from: Option<String>,
    /// Stop after this many events (default: follow until the page is closed).
    limit: Option<u32>,
}

async fn tail_page(UiCaller(caller): UiCaller, Query(query): Query<TailQuery>) -> Response {
    let stream = match query.stream.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(text) => match StreamId::new(text) {
            Ok(stream) => Some(stream),
            Err(error) => return error_page(StatusCode::BAD_REQUEST, &error.to_string()),
        },
    };
    let allowed = match &stream {
        Some(stream) => caller.require_read(stream.as_str()).is_ok(),
        None => caller.require_read_all(&EventFilter::all()).is_ok(),
    };
    if !allowed {
        return error_page(StatusCode::FORBIDDEN, "this token may not read this");
    }
    let from = match query.from.as_deref() {
        Some("start") => "start",
        _ => "end",
    };
    let source = match &stream {
        Some(stream) => format!(
            "/streams/{}/subscribe?from={from}",
            percent(stream.as_str())
        ),
        None => format!("/all/subscribe?from={from}"),
    };
    page(
        "live tail",
        html! {
            h1 {
                "Live tail of "
                @match &stream { Some(stream) => code { (stream.as_str()) }, None => "$all" }
            }
            p.facts {
                "status: " strong #tail-status { "connecting…" }
                " · events: " strong #tail-count { "0" }
                " · " a href=(format!("/ui/tail?from=start{}", stream.as_ref().map_or(String::new(), |s| format!("&stream={}", percent(s.as_str()))))) { "from the start" }
            }
            table.events #tail data-source=(source) data-limit=(query.limit.unwrap_or(0)) {
                thead { tr { th { "position" } th { "stream" } th { "revision" } th { "type" } th { "recorded" } th { "data" } } }
                tbody {}
            }
            script src="/ui/app.js" {}
        },
    )
}
