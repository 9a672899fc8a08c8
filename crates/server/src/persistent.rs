//! Persistent subscriptions over HTTP (`factline_core::persistent`): groups are managed with
//! `PUT|GET|DELETE /subscriptions/{group}`, consumed over Server-Sent Events
//! (`GET /subscriptions/{group}/consume`: the connection is the consumer; closing it hands its
//! unsettled deliveries back), and settled with `POST /subscriptions/{group}/ack|nack` naming
//! the consumer id the stream carries (header `factline-consumer-id` and every delivery).
//! Managing groups and replaying parked events takes an admin token; consuming and settling
//! take a read grant covering the group's source, and settling is for the caller that
//! connected the consumer.

use std::{collections::HashMap, convert::Infallible, sync::Arc};

use axum::{
    Json,
    body::Bytes,
    extract::{
        Path, Query, State,
        rejection::{BytesRejection, PathRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use factline_core::{
    EventFilter, EventStore, StreamId, SubscribeFrom,
    persistent::{
        ConnectOptions, ConsumerId, ConsumerStrategy, DeliveryId, GroupError, GroupInfo,
        GroupSettings, GroupStart, NackAction, PersistentSource, PersistentSubscriptions,
        SettleError, Settled, check_group_name,
    },
};
use futures::{StreamExt as _, stream};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::{
    AppState,
    auth::Caller,
    error::{ApiError, ErrorBody, ErrorCode},
    json::{EventJson, parse_json},
    metrics,
};

/// The caller that connected each consumer, by group and consumer id.
pub(crate) type ConsumerOwners = Arc<std::sync::Mutex<HashMap<(String, u64), String>>>;

/// Removes a consumer's owner when its SSE response ends.
struct OwnerGuard {
    owners: ConsumerOwners,
    key: (String, u64),
}

impl Drop for OwnerGuard {
    fn drop(&mut self) {
        lock_owners(&self.owners).remove(&self.key);
    }
}

fn lock_owners(
    owners: &ConsumerOwners,
) -> std::sync::MutexGuard<'_, HashMap<(String, u64), String>> {
    // Every change is one insert or remove: a poisoned lock is still consistent.
    owners
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The groups of the server's store, opened on first use.
pub(crate) async fn subscriptions(state: &AppState) -> Result<&PersistentSubscriptions, ApiError> {
    state
        .persistent
        .get_or_try_init(|| {
            let store: Arc<dyn EventStore> = state.store.clone();
            PersistentSubscriptions::open(store)
        })
        .await
        .map_err(|error| ApiError::from(&error))
}

impl From<&GroupError> for ApiError {
    fn from(error: &GroupError) -> Self {
        let message = error.to_string();
        match error {
            GroupError::InvalidGroupName { max, .. } => {
                ApiError::new(ErrorCode::InvalidGroupName, message).with("max", *max)
            }
            GroupError::InvalidSettings { field, .. } => {
                ApiError::new(ErrorCode::InvalidGroupSettings, message).with("field", *field)
            }
            GroupError::GroupExists { .. } => ApiError::new(ErrorCode::GroupExists, message),
            GroupError::GroupNotFound { .. } => ApiError::new(ErrorCode::GroupNotFound, message),
            GroupError::TooManyGroups { max } => {
                ApiError::new(ErrorCode::TooManyGroupMembers, message)
                    .with("limit", "groups_max")
                    .with("max", *max)
            }
            GroupError::TooManyConsumers { max, .. } => {
                ApiError::new(ErrorCode::TooManyGroupMembers, message)
                    .with("limit", "consumers_per_group_max")
                    .with("max", *max)
            }
            GroupError::ShutDown => {
                ApiError::new(ErrorCode::StoreUnavailable, message).with("state", "closed")
            }
            GroupError::Storage(storage) => ApiError::storage(storage),
            _ => {
                tracing::error!(error = %message, "persistent subscriptions");
                ApiError::new(ErrorCode::Internal, message)
            }
        }
    }
}

impl From<GroupError> for ApiError {
    fn from(error: GroupError) -> Self {
        Self::from(&error)
    }
}

impl From<SettleError> for ApiError {
    fn from(error: SettleError) -> Self {
        let message = error.to_string();
        match error {
            SettleError::GroupNotFound { .. } => ApiError::new(ErrorCode::GroupNotFound, message),
            SettleError::TooManyIds { max, given } => {
                ApiError::new(ErrorCode::LimitExceeded, message)
                    .with("limit", "settle_ids_max")
                    .with("max", max)
                    .with("actual", given)
                    .with_status(StatusCode::BAD_REQUEST)
            }
            // The group stopped (deleted, updated, shut down) between the lookup and the settle.
            _ => ApiError::new(ErrorCode::GroupNotFound, message),
        }
    }
}

// ---- JSON -----------------------------------------------------------------------------------

/// What a group reads.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum SourceJson {
    /// `$all`, optionally filtered.
    All {
        /// Only streams whose id starts with this.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
        /// Only streams of this category.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        category: Option<String>,
        /// Only event types starting with this.
        #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
        event_type: Option<String>,
    },
    /// One stream.
    Stream {
        /// The stream id.
        stream: String,
    },
}

/// How consumers share the events.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StrategyJson {
    /// Each event to the next consumer with room.
    #[default]
    RoundRobin,
    /// Streams partitioned among consumers; one stream in order, one event at a time.
    Pinned,
}

/// A group to create. Numbers left out take their defaults.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct NewGroup {
    source: SourceJson,
    /// start (default), end (only events appended after creation) or the first position
    /// (source all) or revision (source stream) to deliver.
    #[schema(pattern = "^(start|end|[0-9]+)$")]
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    strategy: StrategyJson,
    /// Retries before an event is parked (default 10, at most 1000).
    #[serde(default)]
    #[schema(maximum = 1000)]
    retries_max: Option<u32>,
    /// How long a consumer may hold a delivery (default 30000, 10..=86400000).
    #[serde(default)]
    #[schema(minimum = 10, maximum = 86_400_000)]
    message_timeout_ms: Option<u64>,
    /// Unsettled deliveries per consumer (default 10, 1..=10000).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10_000)]
    in_flight_per_consumer_max: Option<u32>,
    /// Events held in memory (default 500, 1..=100000).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100_000)]
    buffer_events_max: Option<u32>,
    /// Settled events between checkpoint saves (default 100, 1..=100000).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100_000)]
    checkpoint_after_events: Option<u32>,
}

impl NewGroup {
    fn into_settings(self) -> Result<GroupSettings, ApiError> {
        let source = match self.source {
            SourceJson::All {
                prefix,
                category,
                event_type,
            } => PersistentSource::All {
                filter: EventFilter {
                    stream_prefix: prefix.filter(|p| !p.is_empty()),
                    category: category.filter(|c| !c.is_empty()),
                    event_type_prefix: event_type.filter(|t| !t.is_empty()),
                },
            },
            SourceJson::Stream { stream } => PersistentSource::Stream {
                stream: StreamId::new(&stream)
                    .map_err(|error| ApiError::invalid_stream_id(&error))?,
            },
        };
        let start = match self.from.as_deref() {
            None => GroupStart::Start,
            Some(text) => match SubscribeFrom::parse_first(text).map_err(|error| {
                ApiError::new(ErrorCode::InvalidGroupSettings, error.to_string())
                    .with("field", "from")
            })? {
                SubscribeFrom::Start => GroupStart::Start,
                SubscribeFrom::End => GroupStart::End,
                SubscribeFrom::After(last) => GroupStart::After(last),
            },
        };
        let strategy = match self.strategy {
            StrategyJson::RoundRobin => ConsumerStrategy::RoundRobin,
            StrategyJson::Pinned => ConsumerStrategy::Pinned,
        };
        let mut settings = GroupSettings::new(source, start).strategy(strategy);
        if let Some(value) = self.retries_max {
            settings = settings.retries_max(value);
        }
        if let Some(value) = self.message_timeout_ms {
            settings = settings.message_timeout_ms(value);
        }
        if let Some(value) = self.in_flight_per_consumer_max {
            settings = settings.in_flight_per_consumer_max(value);
        }
        if let Some(value) = self.buffer_events_max {
            settings = settings.buffer_events_max(value);
        }
        if let Some(value) = self.checkpoint_after_events {
            settings = settings.checkpoint_after_events(value);
        }
        Ok(settings)
    }
}

/// A connected consumer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConsumerJson {
    id: u64,
    name: String,
    in_flight: usize,
    delivered: u64,
}

/// A group's settings, state and counters (counters since the server started).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GroupJson {
    group: String,
    source: SourceJson,
    /// Where it started: start, or the last position/revision skipped.
    from: String,
    strategy: StrategyJson,
    retries_max: u32,
    message_timeout_ms: u64,
    in_flight_per_consumer_max: u32,
    buffer_events_max: u32,
    checkpoint_after_events: u32,
    /// Every event of the source up to this position/revision is settled.
    checkpoint: Option<u64>,
    checkpoint_saved: Option<u64>,
    last_read: Option<u64>,
    ready: usize,
    in_flight: usize,
    buffered: usize,
    consumers: Vec<ConsumerJson>,
    parked_waiting: u64,
    replay_remaining: u64,
    delivered_total: u64,
    acked_total: u64,
    retried_total: u64,
    timed_out_total: u64,
    parked_total: u64,
    skipped_total: u64,
    last_error: Option<String>,
}

impl From<GroupInfo> for GroupJson {
    fn from(info: GroupInfo) -> Self {
        let settings = info.settings;
        let source = match settings.source {
            PersistentSource::All { filter } => SourceJson::All {
                prefix: filter.stream_prefix,
                category: filter.category,
                event_type: filter.event_type_prefix,
            },
            PersistentSource::Stream { stream } => SourceJson::Stream {
                stream: stream.as_str().to_owned(),
            },
        };
        let from = match settings.start {
            GroupStart::Start => "start".to_owned(),
            GroupStart::End => "end".to_owned(),
            GroupStart::After(last) => (last + 1).to_string(),
        };
        let strategy = match settings.strategy {
            ConsumerStrategy::Pinned => StrategyJson::Pinned,
            ConsumerStrategy::RoundRobin => StrategyJson::RoundRobin,
        };
        Self {
            group: info.group,
            source,
            from,
            strategy,
            retries_max: settings.retries_max,
            message_timeout_ms: settings.message_timeout_ms,
            in_flight_per_consumer_max: settings.in_flight_per_consumer_max,
            buffer_events_max: settings.buffer_events_max,
            checkpoint_after_events: settings.checkpoint_after_events,
            checkpoint: info.checkpoint,
            checkpoint_saved: info.checkpoint_saved,
            last_read: info.last_read,
            ready: info.ready,
            in_flight: info.in_flight,
            buffered: info.buffered,
            consumers: info
                .consumers
                .into_iter()
                .map(|consumer| ConsumerJson {
                    id: consumer.id.0,
                    name: consumer.name,
                    in_flight: consumer.in_flight,
                    delivered: consumer.delivered,
                })
                .collect(),
            parked_waiting: info.parked_waiting,
            replay_remaining: info.replay_remaining,
            delivered_total: info.delivered_total,
            acked_total: info.acked_total,
            retried_total: info.retried_total,
            timed_out_total: info.timed_out_total,
            parked_total: info.parked_total,
            skipped_total: info.skipped_total,
            last_error: info.last_error,
        }
    }
}

/// The groups.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GroupList {
    groups: Vec<GroupJson>,
}

/// Deliveries to ack.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct AckRequest {
    /// The consumer id of the `consume` stream (its `factline-consumer-id` header).
    consumer: u64,
    /// Delivery ids (at most 10000).
    #[schema(max_items = 10000)]
    ids: Vec<u64>,
}

/// What a nack asks for.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum NackActionJson {
    /// Deliver again (a retry; past the limit the event is parked).
    Retry,
    /// Park in the dead-letter stream now.
    Park,
    /// Done without handling.
    Skip,
}

/// Deliveries to refuse.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct NackRequest {
    /// The consumer id of the `consume` stream (its `factline-consumer-id` header).
    consumer: u64,
    /// Delivery ids (at most 10000).
    #[schema(max_items = 10000)]
    ids: Vec<u64>,
    action: NackActionJson,
    /// Why (logged, and kept in the parked record).
    #[serde(default)]
    #[schema(max_length = 1000)]
    reason: Option<String>,
}

/// What a settle did.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SettledJson {
    /// Deliveries settled.
    settled: usize,
    /// Ids that were not this consumer's open deliveries (nothing happened to them).
    unknown: Vec<u64>,
}

impl From<Settled> for SettledJson {
    fn from(settled: Settled) -> Self {
        Self {
            settled: settled.settled,
            unknown: settled.unknown.into_iter().map(|id| id.0).collect(),
        }
    }
}

/// A replay started.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReplayStarted {
    /// Parked events to be delivered again.
    replaying: u64,
}

/// One delivery, the `data:` of an unnamed SSE message of `consume`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeliveryJson {
    /// The consumer this connection is; name it when settling.
    consumer: u64,
    /// Ack or nack with this.
    delivery_id: u64,
    /// Earlier failed deliveries of this event.
    retry_count: u32,
    /// True when it comes from a replay of parked events.
    replayed: bool,
    event: EventJson,
}

/// Longest nack reason, in bytes.
const REASON_BYTES_MAX: usize = 1_000;

// ---- helpers --------------------------------------------------------------------------------

fn group_name(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(group) = path
        .map_err(|rejection| ApiError::new(ErrorCode::InvalidGroupName, rejection.body_text()))?;
    check_group_name(&group).map_err(ApiError::from)?;
    Ok(group)
}

/// A read grant covering the group's source.
async fn require_consume(
    caller: &Caller,
    subscriptions: &PersistentSubscriptions,
    group: &str,
) -> Result<(), ApiError> {
    let info = subscriptions.info(group).await?;
    match &info.settings.source {
        PersistentSource::All { filter } => caller.require_read_all(filter),
        PersistentSource::Stream { stream } => caller.require_read(stream.as_str()),
    }
}

// ---- handlers -------------------------------------------------------------------------------

/// Lists the persistent subscription groups with their state. Admin only when auth is on.
#[utoipa::path(
    get,
    path = "/subscriptions",
    tag = "persistent",
    responses(
        (status = 200, description = "The groups", body = GroupList),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn list_groups(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<GroupList>, ApiError> {
    caller.require_admin("list persistent subscription groups")?;
    let groups = subscriptions(&state).await?.list().await?;
    Ok(Json(GroupList {
        groups: groups.into_iter().map(GroupJson::from).collect(),
    }))
}

/// Creates a group (admin). `from: "end"` is resolved now, to the source's last event.
#[utoipa::path(
    put,
    path = "/subscriptions/{group}",
    tag = "persistent",
    params(("group" = String, Path, description = "Group name, 1..=100 bytes, no control characters")),
    request_body(content = NewGroup, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = GroupJson),
        (status = 400, description = "Invalid name, JSON or setting", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 409, description = "The group exists", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 429, description = "The store hosts the most groups it may", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn create_group(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<GroupJson>), ApiError> {
    let group = group_name(path)?;
    caller.require_admin("create persistent subscription groups")?;
    let body = crate::api::json_body(&headers, body, state.options.body_bytes_max)?;
    let settings = parse_json::<NewGroup>(&body)?.into_settings()?;
    let subscriptions = subscriptions(&state).await?;
    subscriptions.create(&group, settings).await?;
    tracing::info!(group = %group, caller = caller.name(), "persistent subscription group created");
    let info = subscriptions.info(&group).await?;
    Ok((StatusCode::CREATED, Json(info.into())))
}

/// One group's settings, state and counters (admin).
#[utoipa::path(
    get,
    path = "/subscriptions/{group}",
    tag = "persistent",
    params(("group" = String, Path, description = "Group name")),
    responses(
        (status = 200, description = "The group", body = GroupJson),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such group", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn get_group(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<GroupJson>, ApiError> {
    let group = group_name(path)?;
    caller.require_admin("read persistent subscription groups")?;
    let info = subscriptions(&state).await?.info(&group).await?;
    Ok(Json(info.into()))
}

/// Deletes a group (admin): its consumers' streams end, its checkpoint and parked records go.
#[utoipa::path(
    delete,
    path = "/subscriptions/{group}",
    tag = "persistent",
    params(("group" = String, Path, description = "Group name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such group", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn delete_group(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let group = group_name(path)?;
    caller.require_admin("delete persistent subscription groups")?;
    subscriptions(&state).await?.delete(&group).await?;
    tracing::info!(group = %group, caller = caller.name(), "persistent subscription group deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ConsumeQuery {
    /// A name shown in the group's state (e.g. host and process).
    #[param(max_length = 100)]
    name: Option<String>,
    /// Fewer unsettled deliveries than the group allows per consumer.
    #[param(minimum = 1)]
    in_flight_max: Option<u32>,
}

/// Connects a consumer: Server-Sent Events, one message per delivery (`DeliveryJson`). The
/// consumer id is in the `factline-consumer-id` response header and in every delivery; settle
/// each delivery with `ack`/`nack` naming it. Closing the stream hands unsettled deliveries to
/// other consumers.
#[utoipa::path(
    get,
    path = "/subscriptions/{group}/consume",
    tag = "persistent",
    params(("group" = String, Path, description = "Group name"), ConsumeQuery),
    responses(
        (status = 200, description = "A stream of deliveries", content_type = "text/event-stream", body = String,
            headers(("factline-consumer-id" = u64, description = "The consumer id to settle deliveries with"))),
        (status = 400, description = "Invalid name or query", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "No read grant covers the group's source", body = ErrorBody),
        (status = 404, description = "No such group", body = ErrorBody),
        (status = 429, description = "subscribers_max subscriptions or the group's consumers are at their limit", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn consume(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<ConsumeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let group = group_name(path)?;
    let params = crate::api::query(params)?;
    let name = params.name.unwrap_or_else(|| caller.name().to_owned());
    if name.len() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::new(
            ErrorCode::InvalidQuery,
            "name must have at most 100 bytes and no control characters",
        ));
    }
    if params.in_flight_max == Some(0) {
        return Err(ApiError::new(
            ErrorCode::InvalidQuery,
            "in_flight_max=0: a consumer holds at least 1 delivery",
        ));
    }
    let subscriptions = subscriptions(&state).await?;
    require_consume(&caller, subscriptions, &group).await?;
    let permit = crate::api::subscriber_permit(&state)?;
    let mut options = ConnectOptions::named(name);
    if let Some(max) = params.in_flight_max {
        options = options.in_flight_max(max);
    }
    let consumer = subscriptions.connect(&group, options).await?;
    tracing::debug!(group = %group, consumer = consumer.id().0, caller = caller.name(), "persistent consumer connected over SSE");
    let consumer_id = consumer.id().0;
    let key = (group.clone(), consumer_id);
    lock_owners(&state.consumer_owners).insert(key.clone(), caller.name().to_owned());
    let owner = OwnerGuard {
        owners: Arc::clone(&state.consumer_owners),
        key,
    };
    let gauge = metrics::SubscriberGauge::open();
    let deliveries = stream::unfold(
        (consumer, permit, gauge, owner),
        |(mut consumer, permit, gauge, owner)| async move {
            let delivery = consumer.next().await?;
            metrics::event_sent(delivery.event.recorded_at);
            let json = DeliveryJson {
                consumer: consumer.id().0,
                delivery_id: delivery.id.0,
                retry_count: delivery.retry_count,
                replayed: delivery.replayed,
                event: EventJson::from(&delivery.event),
            };
            let data = serde_json::to_string(&json).unwrap_or_else(|error| {
                serde_json::to_string(&ApiError::from_serde(&error).body()).unwrap_or_default()
            });
            Some((
                Ok::<_, Infallible>(Event::default().data(data)),
                (consumer, permit, gauge, owner),
            ))
        },
    );
    let mut shutdown = state.shutdown.subscribe();
    let stop = async move {
        let _ = shutdown.wait_for(|down| *down).await;
    };
    let sse = Sse::new(deliveries.take_until(stop)).keep_alive(
        KeepAlive::new()
            .interval(crate::keep_alive(&state.options))
            .text("keep-alive"),
    );
    Ok((
        [(
            HeaderName::from_static(CONSUMER_ID_HEADER),
            HeaderValue::from(consumer_id),
        )],
        sse,
    )
        .into_response())
}

/// The response header of `consume` that carries the consumer id.
pub(crate) const CONSUMER_ID_HEADER: &str = "factline-consumer-id";

/// Acknowledges deliveries of a consumer: their events are done.
#[utoipa::path(
    post,
    path = "/subscriptions/{group}/ack",
    tag = "persistent",
    params(("group" = String, Path, description = "Group name")),
    request_body(content = AckRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Settled (unknown ids listed)", body = SettledJson),
        (status = 400, description = "Invalid name, JSON or too many ids", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "No read grant covers the group's source", body = ErrorBody),
        (status = 404, description = "No such group", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn ack(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SettledJson>, ApiError> {
    let group = group_name(path)?;
    let request: AckRequest = settle_body(&state, &headers, body)?;
    settle(&state, &caller, &group, request.consumer, request.ids, None).await
}

/// Refuses deliveries of a consumer: retry, park now, or skip.
#[utoipa::path(
    post,
    path = "/subscriptions/{group}/nack",
    tag = "persistent",
    params(("group" = String, Path, description = "Group name")),
    request_body(content = NackRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Settled (unknown ids listed)", body = SettledJson),
        (status = 400, description = "Invalid name, JSON, reason or too many ids", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "No read grant covers the group's source", body = ErrorBody),
        (status = 404, description = "No such group", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn nack(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SettledJson>, ApiError> {
    let group = group_name(path)?;
    let request: NackRequest = settle_body(&state, &headers, body)?;
    let reason = request.reason.unwrap_or_default();
    if reason.len() > REASON_BYTES_MAX {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            format!(
                "reason has {} bytes; at most {REASON_BYTES_MAX}",
                reason.len()
            ),
        )
        .with("max", REASON_BYTES_MAX));
    }
    let action = match request.action {
        NackActionJson::Retry => NackAction::Retry,
        NackActionJson::Park => NackAction::Park,
        NackActionJson::Skip => NackAction::Skip,
    };
    let nack = Some((action, reason.as_str()));
    settle(&state, &caller, &group, request.consumer, request.ids, nack).await
}

/// The JSON body of an ack or a nack.
fn settle_body<R: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<R, ApiError> {
    let body = crate::api::json_body(headers, body, state.options.body_bytes_max)?;
    parse_json(&body)
}

/// Settles `ids` of `consumer` once the caller may consume the group: an ack without `nack`.
async fn settle(
    state: &AppState,
    caller: &Caller,
    group: &str,
    consumer: u64,
    ids: Vec<u64>,
    nack: Option<(NackAction, &str)>,
) -> Result<Json<SettledJson>, ApiError> {
    let subscriptions = subscriptions(state).await?;
    require_consume(caller, subscriptions, group).await?;
    let owner = lock_owners(&state.consumer_owners)
        .get(&(group.to_owned(), consumer))
        .cloned();
    if owner.is_some_and(|owner| owner != caller.name()) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "consumer {consumer} of group {group} was connected by another caller; only it may settle its deliveries"
            ),
        ));
    }
    let ids: Vec<DeliveryId> = ids.into_iter().map(DeliveryId).collect();
    let settled = subscriptions
        .settle(group, ConsumerId(consumer), &ids, nack)
        .await?;
    Ok(Json(settled.into()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ReplayQuery {
    /// Replay only the first this many parked events.
    max_events: Option<u64>,
}

/// Replays the group's parked events as new deliveries (admin); they leave the parked stream
/// once settled.
#[utoipa::path(
    post,
    path = "/subscriptions/{group}/replay-parked",
    tag = "persistent",
    params(("group" = String, Path, description = "Group name"), ReplayQuery),
    responses(
        (status = 200, description = "Replay started", body = ReplayStarted),
        (status = 400, description = "Invalid name or query", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such group", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn replay_parked(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<ReplayQuery>, QueryRejection>,
) -> Result<Json<ReplayStarted>, ApiError> {
    let group = group_name(path)?;
    let params = crate::api::query(params)?;
    caller.require_admin("replay parked events")?;
    let replaying = subscriptions(&state)
        .await?
        .replay_parked(&group, params.max_events)
        .await?;
    tracing::info!(group = %group, replaying, caller = caller.name(), "replaying parked events");
    Ok(Json(ReplayStarted { replaying }))
}
