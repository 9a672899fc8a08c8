//! Tests that make the onion order visible: the first middleware added is the outermost.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::test_support::{Calls, chain};
use super::*;
use crate::handler::{Handler, HandlerErrorKind, HandlerResult, handler_fn};
use crate::message::{Message, Metadata};

/// Panics on its first `panics` calls, then returns one output.
fn panicking_first(panics: usize) -> (Arc<AtomicUsize>, impl Handler) {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        handler_fn(move |_message: Message| {
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if call <= panics {
                    panic!("panic on call {call}");
                }
                HandlerResult::Ok(vec![Message::new("out")])
            }
        })
    };
    (calls, handler)
}

fn quick_retry(retries: u32) -> Retry {
    Retry::new(
        RetryConfig::default()
            .jitter(0.0)
            .retries_max(retries)
            .initial_interval(Duration::from_millis(100)),
    )
}

#[tokio::test(start_paused = true)]
async fn retry_outside_recoverer_retries_a_panic() {
    let (calls, handler) = panicking_first(2);
    let handler = chain(&[&quick_retry(3), &Recoverer::new()], handler);
    let result = handler.handle(Message::new("x")).await;
    assert_eq!(result.map(|out| out.len()).ok(), Some(1));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn recoverer_outside_retry_catches_the_panic_but_nothing_retries_it() {
    let (calls, handler) = panicking_first(2);
    let handler = chain(&[&Recoverer::new(), &quick_retry(3)], handler);
    let error = handler.handle(Message::new("x")).await.err();
    assert_eq!(
        error.map(|e| e.kind()),
        Some(HandlerErrorKind::Panicked),
        "the panic unwound through Retry"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn timeout_inside_retry_bounds_each_attempt_outside_all_of_them() {
    // Each call fails after 50 ms; retries wait 100, 200, 400 ms.
    let slow_failure = || {
        let calls = Calls::failing_always(HandlerErrorKind::Transient);
        let handler = {
            let calls = calls.clone();
            handler_fn(move |message: Message| {
                let calls = calls.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    calls.handle(message).await
                }
            })
        };
        (calls, handler)
    };
    let timeout = Timeout::new(Duration::from_millis(300));

    let (calls, handler) = slow_failure();
    let inside = chain(&[&quick_retry(3), &timeout], handler);
    let started = Instant::now();
    let error = inside.handle(Message::new("x")).await.err();
    assert_eq!(error.map(|e| e.kind()), Some(HandlerErrorKind::Transient));
    assert_eq!(calls.count(), 4);
    assert_eq!(started.elapsed(), Duration::from_millis(4 * 50 + 700));

    let (calls, handler) = slow_failure();
    let outside = chain(&[&timeout, &quick_retry(3)], handler);
    let started = Instant::now();
    let error = outside.handle(Message::new("x")).await.err();
    assert_eq!(error.map(|e| e.kind()), Some(HandlerErrorKind::TimedOut));
    assert_eq!(
        calls.count(),
        2,
        "calls at 0 and 150 ms; the next would start at 400 ms"
    );
    assert_eq!(started.elapsed(), Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn a_breaker_inside_retry_stops_the_retries_and_delay_on_error_keeps_its_delay() {
    let calls = Calls::failing_always(HandlerErrorKind::Transient);
    let breaker = CircuitBreaker::new(
        CircuitBreakerConfig::default()
            .failure_threshold(2)
            .open_duration(Duration::from_secs(30)),
    );
    let handler = chain(
        &[
            &DelayOnError::fixed(Duration::from_secs(1)),
            &quick_retry(5),
            &breaker,
        ],
        calls.handler(),
    );
    let error = handler.handle(Message::new("x")).await.err();
    let Some(error) = error else {
        panic!("expected an error");
    };
    assert_eq!(
        calls.count(),
        2,
        "the third attempt was refused, then not retried"
    );
    assert_eq!(error.kind(), HandlerErrorKind::CircuitOpen);
    // Opened after the second call; the refused attempt came 200 ms later.
    assert_eq!(
        error.redelivery_delay(),
        Some(Duration::from_secs(30) - Duration::from_millis(200))
    );

    // A plain failure gets DelayOnError's delay after the retries.
    let calls = Calls::failing_always(HandlerErrorKind::Transient);
    let handler = chain(
        &[
            &DelayOnError::fixed(Duration::from_secs(1)),
            &quick_retry(2),
        ],
        calls.handler(),
    );
    let delay = handler
        .handle(Message::new("x"))
        .await
        .err()
        .and_then(|e| e.redelivery_delay());
    assert_eq!(delay, Some(Duration::from_secs(1)));
    assert_eq!(calls.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_recommended_chain_handles_a_panic_once_and_skips_the_duplicate() {
    let store = Arc::new(InMemoryDedupStore::default());
    let (calls, handler) = panicking_first(1);
    let handler = chain(
        &[
            &CorrelationId::new(),
            &DelayOnError::fixed(Duration::from_secs(1)),
            &Deduplicator::new(store.clone()),
            &quick_retry(3),
            &CircuitBreaker::default(),
            &Throttle::new(100, Duration::from_secs(1)),
            &Timeout::new(Duration::from_secs(5)),
            &Recoverer::new(),
        ],
        handler,
    );
    let input = Message::new("in").with_metadata(Metadata::CORRELATION_ID, "c-1");
    let output = handler.handle(input.clone()).await.unwrap_or_default();
    assert_eq!(output.len(), 1);
    assert_eq!(output[0].correlation_id(), Some("c-1"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "panicked once, retried once"
    );
    assert_eq!(store.len(), 1);

    let duplicate = Message::with_id(input.id.clone(), "in");
    let output = handler.handle(duplicate).await;
    assert_eq!(output.map(|out| out.len()).ok(), Some(0));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
