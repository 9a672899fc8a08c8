//! The routes, their handlers and the OpenAPI document generated from them.
//!
//! Every handler validates all of its input before it touches the store and answers with the
//! JSON shapes of [`crate::json`]; failures are [`ApiError`]s. The OpenAPI document is built by
//! `utoipa` from the `#[utoipa::path]` attribute on each handler, and the router is built from
//! the same list (`utoipa_axum::routes!`), so a route cannot exist without its documentation.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, MatchedPath, Path, Query, Request, State,
        rejection::{BytesRejection, PathRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use factline_core::{
    AppendRequest, DeleteMode, Direction, EventData, EventFilter, ExpectedVersion, Metadata,
    Position, ReadAllOptions, ReadStreamOptions, Revision, StreamId, SubscribeFrom,
};
use futures::FutureExt as _;
use serde::Deserialize;
use tracing::Instrument as _;
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::Caller,
    error::{ApiError, ErrorBody, ErrorCode},
    json::{
        AllPage, AppendResponse, EventJson, Health, Info, MetadataJson, MultiAppend,
        MultiAppendResponse, NewEvent, SnapshotJson, SnapshotSaved, StreamAppendResult, StreamPage,
        parse_events, parse_json,
    },
    metrics, sse,
};

/// The header that carries an expected version.
const EXPECTED_VERSION: &str = "expected-version";
/// The header that carries a correlation id into the events of an append.
const CORRELATION_ID: &str = "x-correlation-id";
/// The header an SSE client sends when it reconnects.
const LAST_EVENT_ID: &str = "last-event-id";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "factline",
        description = "factline event store HTTP/JSON API. Errors are JSON \
            {\"error\": code, \"message\": text, ...} with a 4xx status (503 store_unavailable \
            when the store refuses writes). See docs/design/http-api.md."
    ),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody, ErrorCode, NewEvent, EventJson, crate::persistent::DeliveryJson)),
    tags(
        (name = "streams", description = "Append to and read streams"),
        (name = "all", description = "The global log ($all)"),
        (name = "subscriptions", description = "Live subscriptions over Server-Sent Events"),
        (name = "persistent", description = "Persistent subscriptions: competing consumers with ack, nack, retries, parking and replay"),
        (name = "snapshots", description = "One snapshot per stream, kept apart from the events"),
        (name = "operations", description = "Health, metrics and this document"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

fn documented_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(append_events, read_stream, delete_stream))
        .routes(routes!(append_multi))
        .routes(routes!(read_all))
        .routes(routes!(subscribe_stream))
        .routes(routes!(subscribe_all))
        .routes(routes!(get_metadata, put_metadata))
        .routes(routes!(get_snapshot, put_snapshot, delete_snapshot))
        .routes(routes!(
            crate::persistent::create_group,
            crate::persistent::get_group,
            crate::persistent::delete_group
        ))
        .routes(routes!(crate::persistent::list_groups))
        .routes(routes!(crate::persistent::consume))
        .routes(routes!(crate::persistent::ack))
        .routes(routes!(crate::persistent::nack))
        .routes(routes!(crate::persistent::replay_parked))
        .routes(routes!(info))
        .routes(routes!(health))
        .routes(routes!(metrics_text))
        .routes(routes!(openapi_json))
}

/// The OpenAPI document.
pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = documented_routes().into_openapi();
    document_rules(&mut doc);
    doc
}

/// Adds to the generated document the rules the handlers check that the derives cannot say, so
/// that a client (or a fuzzer) generating from the document sends what the server takes: the
/// `{stream}` path parameter and the `Expected-Version` header of every operation (in one place,
/// not in each handler's attribute), which of `data` and `data_base64` an event takes, and that
/// `POST /streams/{stream}` takes one event or a non-empty array, and what each Server-Sent
/// Event of a `text/event-stream` answer holds.
fn document_rules(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ObjectBuilder, Type, path::ParameterIn};
    if let Some(schemas) = doc
        .components
        .as_mut()
        .map(|components| &mut components.schemas)
        && let Some(derived) = schemas.remove("NewEvent")
    {
        schemas.insert(
            "NewEvent".to_owned(),
            crate::json::new_event_schema(derived).into(),
        );
    }
    if let Some(body) = doc
        .paths
        .paths
        .get_mut("/streams/{stream}")
        .and_then(|item| item.post.as_mut())
        .and_then(|operation| operation.request_body.as_mut())
        .and_then(|body| body.content.get_mut("application/json"))
    {
        body.schema = Some(crate::json::events_body_schema().into());
    }
    for (path, item) in &mut doc.paths.paths {
        let event_stream = item
            .get
            .as_mut()
            .and_then(|operation| operation.responses.responses.get_mut("200"))
            .and_then(|response| match response {
                utoipa::openapi::RefOr::T(response) => response.content.get_mut(SSE_CONTENT_TYPE),
                utoipa::openapi::RefOr::Ref(_) => None,
            });
        if let Some(content) = event_stream {
            content.schema = Some(sse_event_schema(path).into());
        }
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ];
        for operation in operations.into_iter().flatten() {
            for parameter in operation.parameters.iter_mut().flatten() {
                match (&parameter.parameter_in, parameter.name.as_str()) {
                    (ParameterIn::Path, "stream") => {
                        parameter.schema = Some(crate::json::stream_id_schema().into());
                    }
                    (ParameterIn::Path, "group") => {
                        parameter.schema = Some(crate::json::group_name_schema().into());
                    }
                    (ParameterIn::Header, "Expected-Version") => {
                        let schema = ObjectBuilder::new()
                            .schema_type(Type::String)
                            .pattern(Some("^(any|no-stream|exists|[0-9]+)$"));
                        parameter.schema = Some(schema.build().into());
                    }
                    _ => {}
                }
            }
        }
    }
}

const SSE_CONTENT_TYPE: &str = "text/event-stream";

/// One Server-Sent Event of the stream at `path`, the way OpenAPI 3.1 describes an event
/// stream (`schema` is one event: `{event, id, data, retry}`): `data` is a JSON document of the
/// payload. A subscription sends unnamed messages with `id:` = position and `data:` = an
/// `EventJson`, and at most one final `event: error` with an `ErrorBody`; a persistent
/// consumer sends unnamed messages with a `DeliveryJson`.
fn sse_event_schema(path: &str) -> utoipa::openapi::Schema {
    use utoipa::openapi::{ObjectBuilder, OneOfBuilder, Schema, Type};
    let message = |event_name: &str, payload: &str, with_id: bool| {
        let mut data = ObjectBuilder::new()
            .schema_type(Type::String)
            .content_media_type("application/json")
            .build();
        // utoipa has no `contentSchema`; an extension map is written out flat, as it is.
        data.extensions.get_or_insert_with(Default::default).insert(
            "contentSchema".to_owned(),
            serde_json::json!({ "$ref": format!("#/components/schemas/{payload}") }),
        );
        let mut event = ObjectBuilder::new()
            .property(
                "event",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some([event_name])),
            )
            .property("data", data)
            .required("data");
        if event_name != "message" {
            // Unnamed events are `message`s; a named one must say its name.
            event = event.required("event");
        }
        if with_id {
            event = event
                .property(
                    "id",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some("^[0-9]+$")),
                )
                .required("id");
        }
        Schema::Object(event.build())
    };
    if path.ends_with("/consume") {
        message("message", "DeliveryJson", false)
    } else {
        Schema::OneOf(
            OneOfBuilder::new()
                .item(message("message", "EventJson", true))
                .item(message("error", "ErrorBody", false))
                .build(),
        )
    }
}

pub(crate) fn routes(state: AppState) -> Router {
    let body_bytes_max = state.options.body_bytes_max;
    let (router, _) = documented_routes().split_for_parts();
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_bytes_max))
        .layer(middleware::from_fn(track))
        .with_state(state)
}

/// Records metrics and a tracing span for every request.
async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let correlation_id = request
        .headers()
        .get(CORRELATION_ID)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let span = tracing::info_span!(
        "http",
        method = %method,
        route = %route,
        correlation_id = correlation_id.as_deref(),
    );
    // A panicking handler would otherwise drop the connection without an answer; it is a bug,
    // so it answers `500 internal` like any other (the panic itself is logged by the hook).
    let response = AssertUnwindSafe(next.run(request).instrument(span.clone()))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            ApiError::new(ErrorCode::Internal, "the request handler panicked (a bug)")
                .into_response()
        });
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    metrics::http_request(&method, &route, status, elapsed);
    span.in_scope(|| {
        tracing::debug!(
            status,
            elapsed_us = elapsed.as_micros() as u64,
            "request done"
        );
    });
    response
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route; see /openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this route does not take this method; see /openapi.json",
    )
}

// ---- input helpers ------------------------------------------------------------------------

fn stream_id(path: Result<Path<String>, PathRejection>) -> Result<StreamId, ApiError> {
    let Path(raw) =
        path.map_err(|rejection| ApiError::new(ErrorCode::InvalidStreamId, rejection.body_text()))?;
    StreamId::new(&raw).map_err(|error| ApiError::invalid_stream_id(&error))
}

pub(crate) fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(value)| value)
        .map_err(|rejection| ApiError::new(ErrorCode::InvalidQuery, rejection.body_text()))
}

fn expected_version(headers: &HeaderMap) -> Result<ExpectedVersion, ApiError> {
    let Some(value) = headers.get(EXPECTED_VERSION) else {
        return Ok(ExpectedVersion::Any);
    };
    let text = value.to_str().map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidExpectedVersion,
            "Expected-Version is not visible ASCII",
        )
    })?;
    text.trim()
        .parse()
        .map_err(|error: factline_core::ParseExpectedVersionError| {
            ApiError::new(ErrorCode::InvalidExpectedVersion, error.to_string())
        })
}

pub(crate) fn json_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    body_bytes_max: usize,
) -> Result<Bytes, ApiError> {
    if let Some(value) = headers.get(header::CONTENT_TYPE) {
        let mime = value
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if mime != "application/json" && !mime.ends_with("+json") {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!("the body must be application/json, not {mime:?}"),
            ));
        }
    }
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::BodyTooLarge,
                format!("the request body is larger than body_bytes_max ({body_bytes_max} bytes)"),
            )
            .with("limit", "body_bytes_max")
            .with("max", body_bytes_max)
        } else {
            ApiError::new(ErrorCode::InvalidJson, rejection.body_text())
        }
    })
}

fn events_from(
    events: Vec<NewEvent>,
    correlation_id: Option<&str>,
    first_index: usize,
) -> Result<Vec<EventData>, ApiError> {
    events
        .into_iter()
        .enumerate()
        .map(|(offset, event)| {
            let mut data = event.into_event_data(first_index + offset)?;
            if let Some(correlation_id) = correlation_id
                && data.metadata.correlation_id().is_none()
            {
                data.metadata
                    .insert(Metadata::CORRELATION_ID, correlation_id);
            }
            Ok(data)
        })
        .collect()
}

fn correlation_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(CORRELATION_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty() && value.len() <= 255)
}

fn size_bytes(events: &[EventData]) -> usize {
    events.iter().map(EventData::size_bytes).sum()
}

/// Read direction in a query string.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum DirectionParam {
    /// Oldest first.
    #[default]
    Forwards,
    /// Newest first.
    Backwards,
}

impl From<DirectionParam> for Direction {
    fn from(direction: DirectionParam) -> Self {
        match direction {
            DirectionParam::Forwards => Self::Forwards,
            DirectionParam::Backwards => Self::Backwards,
        }
    }
}

/// The page size of a read: `limit=0` would page forever without moving on, so it is refused.
fn page_limit(limit: Option<usize>, state: &AppState) -> Result<usize, ApiError> {
    match limit {
        Some(0) => Err(ApiError::new(
            ErrorCode::InvalidQuery,
            "limit=0: a page holds at least 1 event",
        )),
        Some(limit) => Ok(limit),
        None => Ok(state.options.read_limit_default),
    }
}

/// Where a read starts. `from` is inclusive, and no event can be at `u64::MAX` (the one after
/// it would have no number), so a backwards read from there is a read from the end: the store
/// is not asked for the event after `u64::MAX`, which overflows.
fn read_from(from: Option<u64>, direction: Direction) -> Option<u64> {
    match direction {
        Direction::Backwards => from.filter(|&from| from != u64::MAX),
        Direction::Forwards => from,
    }
}

// ---- streams ------------------------------------------------------------------------------

/// Appends events to a stream atomically.
///
/// The body is one event or an array of events. With `Expected-Version` the append happens only
/// if the stream is at that version. Re-sending the same event ids at the same place returns
/// the original result (idempotent retry). An `X-Correlation-Id` header becomes the
/// `correlation_id` metadata of events that have none.
#[utoipa::path(
    post,
    path = "/streams/{stream}",
    tag = "streams",
    params(
        ("stream" = String, Path, description = "Stream id, e.g. order-42 (1..=255 bytes, no control characters, not starting with $)"),
        ("Expected-Version" = Option<String>, Header, description = "any (default), no-stream, exists, or the revision of the stream's last event"),
        ("X-Correlation-Id" = Option<String>, Header, description = "Correlation id for events that carry none"),
    ),
    request_body(content = Vec<NewEvent>, content_type = "application/json", description = "One event or an array of events"),
    responses(
        (status = 201, description = "Written (or an exact retry of an earlier append)", body = AppendResponse),
        (status = 400, description = "Invalid stream id, header, JSON or event", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token may not write this stream", body = ErrorBody),
        (status = 409, description = "Wrong expected version or idempotency conflict", body = ErrorBody),
        (status = 410, description = "The stream is tombstoned", body = ErrorBody),
        (status = 413, description = "Body, event or append over a limit", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 503, description = "The store refuses writes", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn append_events(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<AppendResponse>), ApiError> {
    let stream = stream_id(path)?;
    caller.require_write(stream.as_str())?;
    let expected = expected_version(&headers)?;
    let body = json_body(&headers, body, state.options.body_bytes_max)?;
    let events = events_from(parse_events(&body)?, correlation_id(&headers), 0)?;
    let (count, bytes) = (events.len(), size_bytes(&events));
    let result = state.store.append(&stream, expected, events).await?;
    metrics::events_appended(count, bytes);
    tracing::debug!(stream = %stream, events = count, position = result.position.value(), caller = caller.name(), "appended");
    Ok((StatusCode::CREATED, Json(result.into())))
}

/// Appends to several streams atomically: every expected version holds and everything is
/// written, or nothing is.
#[utoipa::path(
    post,
    path = "/append",
    tag = "streams",
    params(
        ("X-Correlation-Id" = Option<String>, Header, description = "Correlation id for events that carry none"),
    ),
    request_body(content = MultiAppend, content_type = "application/json"),
    responses(
        (status = 201, description = "Written; one result per stream in request order", body = MultiAppendResponse),
        (status = 400, description = "Invalid stream id, expected version, JSON or event; a stream given twice", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token may not write one of the streams", body = ErrorBody),
        (status = 409, description = "Wrong expected version or idempotency conflict", body = ErrorBody),
        (status = 410, description = "A stream is tombstoned", body = ErrorBody),
        (status = 413, description = "Body, event or append over a limit", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 503, description = "The store refuses writes", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn append_multi(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<MultiAppendResponse>), ApiError> {
    let body = json_body(&headers, body, state.options.body_bytes_max)?;
    let request: MultiAppend = parse_json(&body)?;
    let correlation = correlation_id(&headers);
    let mut requests = Vec::with_capacity(request.streams.len());
    let mut first_index = 0;
    let (mut count, mut bytes) = (0, 0);
    for part in request.streams {
        let stream = StreamId::new(&part.stream).map_err(|error| {
            ApiError::new(ErrorCode::InvalidStreamId, error.to_string())
                .with("stream", part.stream.clone())
        })?;
        caller.require_write(stream.as_str())?;
        let expected = match part.expected_version {
            None => ExpectedVersion::Any,
            Some(serde_json::Value::Number(number)) => number
                .as_u64()
                .map(|revision| ExpectedVersion::Exact(Revision(revision)))
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidExpectedVersion,
                        format!("expected_version {number} is not a revision"),
                    )
                })?,
            Some(serde_json::Value::String(text)) => {
                text.parse()
                    .map_err(|error: factline_core::ParseExpectedVersionError| {
                        ApiError::new(ErrorCode::InvalidExpectedVersion, error.to_string())
                    })?
            }
            Some(other) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidExpectedVersion,
                    format!("expected_version {other} is not a string or a number"),
                ));
            }
        };
        let part_events = part.events.len();
        let events = events_from(part.events, correlation, first_index)?;
        first_index += part_events;
        count += events.len();
        bytes += size_bytes(&events);
        requests.push(AppendRequest::new(stream, expected, events));
    }
    let streams: Vec<String> = requests
        .iter()
        .map(|request| request.stream.as_str().to_owned())
        .collect();
    let results = state.store.append_multi(requests).await?;
    metrics::events_appended(count, bytes);
    Ok((
        StatusCode::CREATED,
        Json(MultiAppendResponse {
            results: streams
                .into_iter()
                .zip(results)
                .map(|(stream, result)| StreamAppendResult {
                    stream,
                    next_expected_version: result.next_expected_version.value(),
                    position: result.position.value(),
                    recorded_at: result.recorded_at.to_rfc3339(),
                })
                .collect(),
        }),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ReadStreamQuery {
    /// First revision to return (inclusive); default the start (forwards) or end (backwards).
    from: Option<u64>,
    /// Most events to return: 1 up to the store's read_count_max; default 100.
    #[param(minimum = 1)]
    limit: Option<usize>,
    /// forwards (default) or backwards.
    #[param(inline)]
    direction: Option<DirectionParam>,
}

/// Reads a page of one stream.
#[utoipa::path(
    get,
    path = "/streams/{stream}",
    tag = "streams",
    params(
        ("stream" = String, Path, description = "Stream id"),
        ReadStreamQuery,
    ),
    responses(
        (status = 200, description = "A page of events", body = StreamPage),
        (status = 400, description = "Invalid stream id or query; limit over read_count_max", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token may not read this stream", body = ErrorBody),
        (status = 404, description = "The stream has no visible events", body = ErrorBody),
        (status = 410, description = "The stream is tombstoned", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn read_stream(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<ReadStreamQuery>, QueryRejection>,
) -> Result<Json<StreamPage>, ApiError> {
    let stream = stream_id(path)?;
    caller.require_read(stream.as_str())?;
    let params = query(params)?;
    let direction = params.direction.unwrap_or_default().into();
    let options = ReadStreamOptions {
        direction,
        from: read_from(params.from, direction).map(Revision),
        limit: page_limit(params.limit, &state)?,
    };
    let slice = state.store.read_stream(&stream, options).await?;
    Ok(Json(StreamPage {
        stream: stream.as_str().to_owned(),
        events: slice.events.iter().map(EventJson::from).collect(),
        last_revision: slice.last_revision.value(),
        next_revision: slice.next_revision.value(),
        is_end: slice.is_end,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeleteQuery {
    /// true: tombstone (the stream can never be written again; admin only). Default false: soft
    /// delete (old events hidden, the stream can continue).
    hard: Option<bool>,
}

/// Deletes a stream: soft by default, a tombstone with `hard=true`.
#[utoipa::path(
    delete,
    path = "/streams/{stream}",
    tag = "streams",
    params(
        ("stream" = String, Path, description = "Stream id"),
        ("Expected-Version" = Option<String>, Header, description = "any (default), no-stream, exists, or a revision"),
        DeleteQuery,
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid stream id, header or query", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token may not delete this stream (tombstones need admin)", body = ErrorBody),
        (status = 404, description = "A soft delete of a stream that was never written", body = ErrorBody),
        (status = 409, description = "Wrong expected version", body = ErrorBody),
        (status = 410, description = "The stream is already tombstoned", body = ErrorBody),
        (status = 503, description = "The store refuses writes", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn delete_stream(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<DeleteQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let stream = stream_id(path)?;
    let hard = query(params)?.hard.unwrap_or(false);
    if hard {
        caller.require_admin("tombstone a stream (admin only)")?;
    } else {
        caller.require_write(stream.as_str())?;
    }
    let expected = expected_version(&headers)?;
    let mode = if hard {
        DeleteMode::Tombstone
    } else {
        DeleteMode::Soft
    };
    state.store.delete_stream(&stream, expected, mode).await?;
    tracing::info!(stream = %stream, hard, caller = caller.name(), "stream deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// A stream's metadata (retention settings); defaults when never set.
#[utoipa::path(
    get,
    path = "/streams/{stream}/metadata",
    tag = "streams",
    params(("stream" = String, Path, description = "Stream id")),
    responses(
        (status = 200, description = "The metadata", body = MetadataJson),
        (status = 400, description = "Invalid stream id", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token may not read this stream", body = ErrorBody),
        (status = 410, description = "The stream is tombstoned", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn get_metadata(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<MetadataJson>, ApiError> {
    let stream = stream_id(path)?;
    caller.require_read(stream.as_str())?;
    let metadata = state.store.stream_metadata(&stream).await?;
    Ok(Json(metadata.into()))
}

/// Replaces a stream's metadata (allowed before its first event).
#[utoipa::path(
    put,
    path = "/streams/{stream}/metadata",
    tag = "streams",
    params(("stream" = String, Path, description = "Stream id")),
    request_body(content = MetadataJson, content_type = "application/json"),
    responses(
        (status = 200, description = "Stored; the stored metadata", body = MetadataJson),
        (status = 400, description = "Invalid stream id, JSON or metadata value", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token may not write this stream", body = ErrorBody),
        (status = 410, description = "The stream is tombstoned", body = ErrorBody),
        (status = 413, description = "Body over body_bytes_max", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 503, description = "The store refuses writes", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn put_metadata(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<MetadataJson>, ApiError> {
    let stream = stream_id(path)?;
    caller.require_write(stream.as_str())?;
    let body = json_body(&headers, body, state.options.body_bytes_max)?;
    let metadata: MetadataJson = parse_json(&body)?;
    let metadata: factline_core::StreamMetadata = metadata.into();
    state
        .store
        .set_stream_metadata(&stream, metadata.clone())
        .await?;
    Ok(Json(metadata.into()))
}

// ---- snapshots ----------------------------------------------------------------------------

/// The stream's snapshot: the state of its aggregate as of a revision, kept apart from the
/// events.
#[utoipa::path(
    get,
    path = "/streams/{stream}/snapshot",
    tag = "snapshots",
    params(("stream" = String, Path, description = "Stream id")),
    responses(
        (status = 200, description = "The snapshot", body = SnapshotJson),
        (status = 400, description = "Invalid stream id", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token may not read this stream", body = ErrorBody),
        (status = 404, description = "The stream has no snapshot (a deleted or tombstoned stream has none)", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn get_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<SnapshotJson>, ApiError> {
    let stream = stream_id(path)?;
    caller.require_read(stream.as_str())?;
    match state.store.load_snapshot(&stream).await? {
        Some(snapshot) => Ok(Json(SnapshotJson::from(&snapshot))),
        None => Err(ApiError::new(
            ErrorCode::SnapshotNotFound,
            format!("stream {stream} has no snapshot"),
        )
        .with("stream", stream.as_str())),
    }
}

/// Stores the stream's snapshot unless one of a higher revision is stored already.
#[utoipa::path(
    put,
    path = "/streams/{stream}/snapshot",
    tag = "snapshots",
    params(("stream" = String, Path, description = "Stream id")),
    request_body(content = SnapshotJson, content_type = "application/json"),
    responses(
        (status = 200, description = "Whether it was stored", body = SnapshotSaved),
        (status = 400, description = "Invalid stream id or JSON", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token may not write this stream", body = ErrorBody),
        (status = 410, description = "The stream is tombstoned", body = ErrorBody),
        (status = 413, description = "Body or state over a limit", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 503, description = "The store refuses writes", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn put_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SnapshotSaved>, ApiError> {
    let stream = stream_id(path)?;
    caller.require_write(stream.as_str())?;
    let body = json_body(&headers, body, state.options.body_bytes_max)?;
    let snapshot = parse_json::<SnapshotJson>(&body)?.into_snapshot()?;
    let stored = state.store.save_snapshot(&stream, snapshot).await?;
    Ok(Json(SnapshotSaved { stored }))
}

/// Removes the stream's snapshot, if any.
#[utoipa::path(
    delete,
    path = "/streams/{stream}/snapshot",
    tag = "snapshots",
    params(("stream" = String, Path, description = "Stream id")),
    responses(
        (status = 204, description = "Removed (or there was none)"),
        (status = 400, description = "Invalid stream id", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token may not write this stream", body = ErrorBody),
        (status = 503, description = "The store refuses writes", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn delete_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let stream = stream_id(path)?;
    caller.require_write(stream.as_str())?;
    state.store.delete_snapshot(&stream).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- $all ---------------------------------------------------------------------------------

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ReadAllQuery {
    /// First position to consider (inclusive); default the start (forwards) or end (backwards).
    from: Option<u64>,
    /// Most events to return: 1 up to the store's read_count_max; default 100.
    #[param(minimum = 1)]
    limit: Option<usize>,
    /// forwards (default) or backwards.
    #[param(inline)]
    direction: Option<DirectionParam>,
    /// Keep only streams whose id starts with this.
    prefix: Option<String>,
    /// Keep only streams of this category (the part of the id before the first -).
    category: Option<String>,
    /// Keep only event types that start with this.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    event_type: Option<String>,
}

fn filter_of(
    prefix: Option<String>,
    category: Option<String>,
    event_type: Option<String>,
) -> EventFilter {
    let mut filter = EventFilter::all();
    filter.stream_prefix = prefix.filter(|prefix| !prefix.is_empty());
    filter.category = category.filter(|category| !category.is_empty());
    filter.event_type_prefix = event_type.filter(|event_type| !event_type.is_empty());
    filter
}

/// Reads a page of `$all`, the global log in commit order, optionally filtered.
#[utoipa::path(
    get,
    path = "/all",
    tag = "all",
    params(ReadAllQuery),
    responses(
        (status = 200, description = "A page of events", body = AllPage),
        (status = 400, description = "Invalid query; limit over read_count_max", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "No read grant covers the filter", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn read_all(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<ReadAllQuery>, QueryRejection>,
) -> Result<Json<AllPage>, ApiError> {
    let params = query(params)?;
    let filter = filter_of(params.prefix, params.category, params.event_type);
    caller.require_read_all(&filter)?;
    let direction = params.direction.unwrap_or_default().into();
    let options = ReadAllOptions {
        direction,
        from: read_from(params.from, direction).map(Position),
        limit: page_limit(params.limit, &state)?,
        filter,
    };
    let slice = state.store.read_all(options).await?;
    Ok(Json(AllPage {
        events: slice.events.iter().map(EventJson::from).collect(),
        next_position: slice.next_position.value(),
        is_end: slice.is_end,
    }))
}

// ---- subscriptions ------------------------------------------------------------------------

/// Where a subscription starts, as `from=start|end|N`.
fn subscribe_from(from: Option<&str>) -> Result<SubscribeFrom<u64>, ApiError> {
    let text = from.unwrap_or("start");
    SubscribeFrom::parse_first(text).map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidQuery,
            format!("from={text:?}: give start, end or a number"),
        )
    })
}

fn last_event_id(headers: &HeaderMap) -> Result<Option<Position>, ApiError> {
    let Some(value) = headers.get(LAST_EVENT_ID) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    // No event is at u64::MAX (the one after it would have no number), and resuming after it
    // would overflow.
    match text.parse::<u64>() {
        Ok(position) if position < u64::MAX => Ok(Some(Position(position))),
        _ => Err(ApiError::new(
            ErrorCode::InvalidLastEventId,
            format!("Last-Event-ID {text:?} is not a position (the id: of an event sent)"),
        )),
    }
}

pub(crate) fn subscriber_permit(
    state: &AppState,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    Arc::clone(&state.subscribers)
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::new(
                ErrorCode::TooManySubscribers,
                format!(
                    "{} subscriptions are open, the limit subscribers_max",
                    state.options.subscribers_max
                ),
            )
            .with("limit", "subscribers_max")
            .with("max", state.options.subscribers_max)
        })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SubscribeStreamQuery {
    /// start (default), end (only new events) or the first revision to deliver.
    #[param(pattern = "^(start|end|[0-9]+)$")]
    from: Option<String>,
}

/// Subscribes to one stream: its events from `from` (or after `Last-Event-ID`), then live, as
/// Server-Sent Events. Each message's `id:` is the event's position and its `data:` the event
/// as JSON; a failure ends the stream with one `event: error` message.
#[utoipa::path(
    get,
    path = "/streams/{stream}/subscribe",
    tag = "subscriptions",
    params(
        ("stream" = String, Path, description = "Stream id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this position (sent by EventSource on reconnect)"),
        SubscribeStreamQuery,
    ),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid stream id, query or Last-Event-ID", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token may not read this stream", body = ErrorBody),
        (status = 410, description = "The stream is tombstoned", body = ErrorBody),
        (status = 429, description = "subscribers_max subscriptions are open", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn subscribe_stream(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<SubscribeStreamQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let stream = stream_id(path)?;
    caller.require_read(stream.as_str())?;
    let params = query(params)?;
    let from = match last_event_id(&headers)? {
        Some(position) => {
            // Resume after the event at `position`, which must be one of this stream's.
            let page = state
                .store
                .read_all(ReadAllOptions::forwards().from(position).limit(1))
                .await?;
            match page.events.first() {
                Some(event) if event.position == position && event.stream == stream => {
                    SubscribeFrom::After(event.revision)
                }
                _ => {
                    return Err(ApiError::new(
                        ErrorCode::InvalidLastEventId,
                        format!(
                            "Last-Event-ID {position} is not the position of an event of stream {stream}"
                        ),
                    ));
                }
            }
        }
        None => subscribe_from(params.from.as_deref())?.map(Revision),
    };
    let permit = subscriber_permit(&state)?;
    let subscription = state.store.subscribe_to_stream(&stream, from).await?;
    tracing::debug!(stream = %stream, caller = caller.name(), "stream subscription opened");
    Ok(sse::respond(&state, subscription, permit).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SubscribeAllQuery {
    /// start (default), end (only new events) or the first position to deliver.
    #[param(pattern = "^(start|end|[0-9]+)$")]
    from: Option<String>,
    /// Keep only streams whose id starts with this.
    prefix: Option<String>,
    /// Keep only streams of this category.
    category: Option<String>,
    /// Keep only event types that start with this.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    event_type: Option<String>,
}

/// Subscribes to `$all` (optionally filtered): from `from` (or after `Last-Event-ID`), then
/// live, as Server-Sent Events with `id:` = position.
#[utoipa::path(
    get,
    path = "/all/subscribe",
    tag = "subscriptions",
    params(
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this position"),
        SubscribeAllQuery,
    ),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid query or Last-Event-ID", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "No read grant covers the filter", body = ErrorBody),
        (status = 429, description = "subscribers_max subscriptions are open", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn subscribe_all(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<SubscribeAllQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params = query(params)?;
    let filter = filter_of(params.prefix, params.category, params.event_type);
    caller.require_read_all(&filter)?;
    let from = match last_event_id(&headers)? {
        Some(position) => SubscribeFrom::After(position),
        None => subscribe_from(params.from.as_deref())?.map(Position),
    };
    let permit = subscriber_permit(&state)?;
    let subscription = state.store.subscribe_to_all(from, filter).await?;
    tracing::debug!(caller = caller.name(), "$all subscription opened");
    Ok(sse::respond(&state, subscription, permit).into_response())
}

// ---- operations ---------------------------------------------------------------------------

/// Liveness and the head of the log.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "The store answers", body = Health),
        (status = 503, description = "The store does not answer", body = ErrorBody),
    )
)]
async fn health(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    let head = state
        .store
        .head_position()
        .await
        .map_err(|error| ApiError::new(ErrorCode::StoreUnavailable, error.to_string()))?;
    Ok(Json(Health {
        status: "ok".to_owned(),
        head_position: head.map(Position::value),
    }))
}

/// The server's version and the limits of its store (what a client checks before it sends).
#[utoipa::path(
    get,
    path = "/info",
    tag = "operations",
    responses((status = 200, description = "Version and limits", body = Info))
)]
async fn info(State(state): State<AppState>) -> Json<Info> {
    Json(Info {
        server: "factline".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        limits: state.store.limits().into(),
        body_bytes_max: state.options.body_bytes_max,
    })
}

/// Prometheus metrics (text exposition format). Admin only when auth is on.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Metrics", content_type = "text/plain", body = String),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token is not admin", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn metrics_text(caller: Caller) -> Result<Response, ApiError> {
    caller.require_admin("read /metrics (admin only)")?;
    let mut response = metrics::render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(response)
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3 document", content_type = "application/json", body = Object))
)]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}
