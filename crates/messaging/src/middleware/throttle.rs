//! [`Throttle`]: limits how many messages per period reach the handler.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::handler::{BoxHandler, Handler, HandlerContext, HandlerResult, Middleware};
use crate::message::Message;

/// Lets at most `messages` calls per `period` through to the next handler, evenly spaced
/// (`period / messages` apart); callers over the rate wait (asleep, in arrival order) for
/// their slot.
///
/// With the default burst of 1 no window of length `period` ever sees more than `messages`
/// calls start. [`Throttle::burst`] lets up to that many calls through at once after an idle
/// time (a token bucket of that size): the long-run rate stays the same, but a window may then
/// see up to `burst - 1` calls more.
///
/// The limit is shared by every handler this instance wraps; give each handler its own
/// `Throttle` for separate limits. A call whose wait is cancelled (the caller dropped it)
/// still uses its slot. Inside [`Retry`](super::Retry) it limits every attempt, which is what
/// protects a rate-limited dependency; outside, whole messages.
#[derive(Debug, Clone)]
pub struct Throttle {
    limiter: Arc<Limiter>,
}

#[derive(Debug)]
struct Limiter {
    interval: Duration,
    burst: u32,
    /// The earliest start of the next call (the theoretical arrival time); `None` before any.
    next_start: Mutex<Option<Instant>>,
}

impl Throttle {
    /// At most `messages` (at least 1) calls per `period`.
    pub fn new(messages: u32, period: Duration) -> Self {
        Self::from_interval(period / messages.max(1), 1)
    }

    fn from_interval(interval: Duration, burst: u32) -> Self {
        Self {
            limiter: Arc::new(Limiter {
                interval,
                burst: burst.max(1),
                next_start: Mutex::new(None),
            }),
        }
    }

    /// Builder: how many calls may start at once after an idle time (at least 1).
    #[must_use]
    pub fn burst(self, messages: u32) -> Self {
        Self::from_interval(self.limiter.interval, messages)
    }

    /// The time between two calls at the full rate.
    pub fn interval(&self) -> Duration {
        self.limiter.interval
    }
}

impl Limiter {
    /// Reserves the next slot and returns when it starts.
    fn reserve(&self) -> Instant {
        let mut next_start = self.next_start.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let credit = self.interval.saturating_mul(self.burst - 1);
        let earliest = now.checked_sub(credit).unwrap_or(now);
        let start = next_start.map_or(earliest, |next| next.max(earliest));
        *next_start = Some(start + self.interval);
        start
    }

    async fn acquire(&self) {
        let start = self.reserve();
        if start > Instant::now() {
            tokio::time::sleep_until(start).await;
        }
    }
}

impl Middleware for Throttle {
    fn name(&self) -> &'static str {
        "throttle"
    }

    fn wrap(&self, next: BoxHandler, _context: &HandlerContext) -> BoxHandler {
        Arc::new(ThrottleHandler {
            next,
            limiter: Arc::clone(&self.limiter),
        })
    }
}

struct ThrottleHandler {
    next: BoxHandler,
    limiter: Arc<Limiter>,
}

#[async_trait]
impl Handler for ThrottleHandler {
    async fn handle(&self, message: Message) -> HandlerResult {
        self.limiter.acquire().await;
        self.next.handle(message).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::middleware::test_support::{Calls, context, wrap};

    #[tokio::test(start_paused = true)]
    async fn spaces_sequential_calls_evenly() {
        let calls = Calls::succeeding();
        let handler = wrap(&Throttle::new(5, Duration::from_secs(1)), calls.handler());
        let started = Instant::now();
        for _ in 0..6 {
            assert!(handler.handle(Message::new("x")).await.is_ok());
        }
        assert_eq!(calls.gaps(), vec![Duration::from_millis(200); 5]);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_wait_for_their_slots() {
        let calls = Calls::succeeding();
        let throttle = Throttle::new(10, Duration::from_secs(1));
        let handler = wrap(&throttle, calls.handler());
        let started = Instant::now();
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let handler = handler.clone();
                tokio::spawn(async move { handler.handle(Message::new("x")).await.is_ok() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.ok(), Some(true));
        }
        assert_eq!(calls.count(), 20);
        assert!(
            calls
                .gaps()
                .iter()
                .all(|gap| *gap == Duration::from_millis(100))
        );
        assert_eq!(started.elapsed(), Duration::from_millis(1900));
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_limit_in_any_period() {
        let calls = Calls::succeeding();
        let handler = wrap(&Throttle::new(4, Duration::from_secs(1)), calls.handler());
        for round in 0..3 {
            for _ in 0..6 {
                assert!(handler.handle(Message::new("x")).await.is_ok());
            }
            // Idle time does not let a burst through.
            tokio::time::sleep(Duration::from_secs(round + 1)).await;
        }
        let times: Vec<Duration> = calls
            .gaps()
            .iter()
            .scan(Duration::ZERO, |at, gap| {
                *at += *gap;
                Some(*at)
            })
            .collect();
        let mut starts = vec![Duration::ZERO];
        starts.extend(times);
        for (i, start) in starts.iter().enumerate() {
            let in_window = starts[i..]
                .iter()
                .take_while(|t| **t < *start + Duration::from_secs(1))
                .count();
            assert!(in_window <= 4, "{in_window} calls in one period");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_at_once_after_idling_then_the_rate_holds() {
        let calls = Calls::succeeding();
        let throttle = Throttle::new(2, Duration::from_secs(1)).burst(3);
        let handler = throttle.wrap(Arc::new(calls.handler()), &context());
        tokio::time::sleep(Duration::from_secs(10)).await;
        for _ in 0..5 {
            assert!(handler.handle(Message::new("x")).await.is_ok());
        }
        let gaps_ms: Vec<u128> = calls.gaps().iter().map(Duration::as_millis).collect();
        assert_eq!(gaps_ms, vec![0, 0, 500, 500]);
        assert_eq!(throttle.interval(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn handlers_wrapped_by_one_instance_share_the_limit() {
        let calls = Calls::succeeding();
        let throttle = Throttle::new(1, Duration::from_secs(1));
        let first = wrap(&throttle, calls.handler());
        let second = wrap(&throttle, calls.handler());
        let started = Instant::now();
        assert!(first.handle(Message::new("x")).await.is_ok());
        assert!(second.handle(Message::new("x")).await.is_ok());
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }
}
