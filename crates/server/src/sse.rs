//! Server-Sent Events from a store subscription.
//!
//! Backpressure: the response body is a stream that hyper polls only when the connection can
//! take more bytes, and the subscription reads the store one page at a time only when polled.
//! A slow client therefore holds at most one page of events in the server, never a growing
//! buffer; it falls behind and catches up with reads (the store's subscription contract).

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use factline_core::Subscription;
use futures::{Stream, StreamExt as _, stream};
use tokio::sync::OwnedSemaphorePermit;

use crate::{AppState, error::ApiError, json::EventJson, metrics};

/// What one SSE connection holds while open.
struct Open {
    subscription: Subscription,
    _permit: OwnedSemaphorePermit,
    _gauge: metrics::SubscriberGauge,
    ended: bool,
}

/// The SSE response for `subscription`: one `data:` message per event with `id:` = position,
/// and one final `event: error` message if the subscription fails.
pub(crate) fn respond(
    state: &AppState,
    subscription: Subscription,
    permit: OwnedSemaphorePermit,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
    let open = Open {
        subscription,
        _permit: permit,
        _gauge: metrics::SubscriberGauge::open(),
        ended: false,
    };
    let events = stream::unfold(open, |mut open| async move {
        if open.ended {
            return None;
        }
        let frame = match open.subscription.next().await? {
            Ok(event) => {
                metrics::event_sent(event.recorded_at);
                let json = serde_json::to_string(&EventJson::from(&event))
                    .unwrap_or_else(|error| error_json(&ApiError::from_serde(&error)));
                Event::default()
                    .id(event.position.value().to_string())
                    .data(json)
            }
            Err(error) => {
                open.ended = true;
                let error = ApiError::from(error);
                Event::default().event("error").data(error_json(&error))
            }
        };
        Some((Ok(frame), open))
    });
    let mut shutdown = state.shutdown.subscribe();
    let stop = async move {
        let _ = shutdown.wait_for(|down| *down).await;
    };
    Sse::new(events.take_until(stop)).keep_alive(
        KeepAlive::new()
            .interval(crate::keep_alive(&state.options))
            .text("keep-alive"),
    )
}

fn error_json(error: &ApiError) -> String {
    serde_json::to_string(&error.body()).unwrap_or_else(|_| {
        String::from(r#"{"error":"internal","message":"cannot encode the error"}"#)
    })
}
