//! [`Retry`]: calls the next handler again after a failure, with exponential backoff and jitter.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::handler::{
    BoxHandler, Handler, HandlerContext, HandlerError, HandlerErrorKind, HandlerResult, Middleware,
};
use crate::message::Message;

/// Settings of a [`Retry`].
///
/// The `n`-th retry (1-based) waits `initial_interval * multiplier^(n-1)`, capped at
/// `max_interval`, then spread by `jitter`: the wait is drawn uniformly from
/// `[base * (1 - jitter), base * (1 + jitter)]`, so with jitter a wait may exceed
/// `max_interval` by that fraction.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Calls after the first one, at most; 0 never retries. The handler runs at most
    /// `retries_max + 1` times per message.
    pub retries_max: u32,
    /// The wait before the first retry (before jitter).
    pub initial_interval: Duration,
    /// Growth factor of the wait from one retry to the next (at least 1).
    pub multiplier: f64,
    /// The longest wait between two calls (before jitter).
    pub max_interval: Duration,
    /// Give up once the next wait would end later than this after the first call started;
    /// `None` bounds retries by count only.
    pub max_elapsed_time: Option<Duration>,
    /// Randomisation of each wait as a fraction in `[0, 1]`: 0.2 varies waits by ±20 %, which
    /// keeps many consumers that failed together from retrying in lockstep.
    pub jitter: f64,
    /// Error kinds returned at once instead of retried. [`HandlerErrorKind::Permanent`] is never
    /// retried whether listed or not.
    pub kinds_not_retried: Vec<HandlerErrorKind>,
    /// Wrap the error returned after the last call in a [`RetryGaveUp`] that records how many
    /// calls were made (the kind and redelivery delay are kept). Off by default, so the error's
    /// source stays the handler's own error; the count is always logged.
    pub attempts_in_error: bool,
}

impl Default for RetryConfig {
    /// 3 retries, 100 ms first wait, doubling, at most 10 s apart, ±20 % jitter, no elapsed-time
    /// bound; circuit-open and in-progress-elsewhere errors are not retried (both ask for a
    /// delayed redelivery instead).
    fn default() -> Self {
        Self {
            retries_max: 3,
            initial_interval: Duration::from_millis(100),
            multiplier: 2.0,
            max_interval: Duration::from_secs(10),
            max_elapsed_time: None,
            jitter: 0.2,
            kinds_not_retried: vec![
                HandlerErrorKind::CircuitOpen,
                HandlerErrorKind::InProgressElsewhere,
            ],
            attempts_in_error: false,
        }
    }
}

impl RetryConfig {
    /// Builder: see [`RetryConfig::retries_max`].
    #[must_use]
    pub fn retries_max(mut self, retries: u32) -> Self {
        self.retries_max = retries;
        self
    }

    /// Builder: see [`RetryConfig::initial_interval`].
    #[must_use]
    pub fn initial_interval(mut self, interval: Duration) -> Self {
        self.initial_interval = interval;
        self
    }

    /// Builder: see [`RetryConfig::multiplier`] (values below 1, and NaN, become 1).
    #[must_use]
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = if multiplier >= 1.0 { multiplier } else { 1.0 };
        self
    }

    /// Builder: see [`RetryConfig::max_interval`].
    #[must_use]
    pub fn max_interval(mut self, interval: Duration) -> Self {
        self.max_interval = interval;
        self
    }

    /// Builder: see [`RetryConfig::max_elapsed_time`].
    #[must_use]
    pub fn max_elapsed_time(mut self, elapsed: Option<Duration>) -> Self {
        self.max_elapsed_time = elapsed;
        self
    }

    /// Builder: see [`RetryConfig::jitter`] (clamped to `[0, 1]`; NaN becomes 0).
    #[must_use]
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        self
    }

    /// Builder: see [`RetryConfig::kinds_not_retried`] (replaces the list).
    #[must_use]
    pub fn kinds_not_retried(mut self, kinds: impl IntoIterator<Item = HandlerErrorKind>) -> Self {
        self.kinds_not_retried = kinds.into_iter().collect();
        self
    }

    /// Builder: see [`RetryConfig::attempts_in_error`].
    #[must_use]
    pub fn attempts_in_error(mut self, record: bool) -> Self {
        self.attempts_in_error = record;
        self
    }

    /// Whether an error of this kind is retried.
    pub fn retries_kind(&self, kind: HandlerErrorKind) -> bool {
        kind != HandlerErrorKind::Permanent && !self.kinds_not_retried.contains(&kind)
    }

    /// The wait before retry number `retry` (1-based) without jitter: grows by `multiplier`
    /// from `initial_interval`, capped at `max_interval`.
    pub fn base_interval(&self, retry: u32) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let multiplier = if self.multiplier >= 1.0 {
            self.multiplier
        } else {
            1.0
        };
        let seconds = self.initial_interval.as_secs_f64() * multiplier.powi(exponent);
        Duration::try_from_secs_f64(seconds)
            .unwrap_or(self.max_interval)
            .min(self.max_interval)
    }

    /// `base` spread by the jitter fraction: uniform in `[base * (1 - j), base * (1 + j)]`.
    pub fn jittered(&self, base: Duration) -> Duration {
        let jitter = if self.jitter.is_nan() {
            0.0
        } else {
            self.jitter.clamp(0.0, 1.0)
        };
        if jitter == 0.0 || base.is_zero() {
            return base;
        }
        let factor = 1.0 + rand::random_range(-jitter..=jitter);
        Duration::try_from_secs_f64(base.as_secs_f64() * factor).unwrap_or(base)
    }
}

/// Retries failed calls of the next handler with exponential backoff.
///
/// Each call gets a clone of the message (clones share the delivery, which only the router
/// settles). [`Permanent`](HandlerErrorKind::Permanent) errors are returned at once, as are the
/// kinds in [`RetryConfig::kinds_not_retried`]; every other error is retried until
/// [`RetryConfig::retries_max`] or [`RetryConfig::max_elapsed_time`] is reached, and then the last
/// error is returned as it is (or wrapped in [`RetryGaveUp`] with
/// [`RetryConfig::attempts_in_error`]) for the router to nack. Retries ignore an error's
/// redelivery delay: that is for the nack after the last call. Each retry is logged at `warn`
/// with its attempt number.
///
/// Panics are not errors: put a [`Recoverer`](super::Recoverer) inside `Retry` to retry them.
#[derive(Debug, Clone, Default)]
pub struct Retry {
    config: Arc<RetryConfig>,
}

impl Retry {
    /// Retry with `config`.
    pub fn new(config: RetryConfig) -> Self {
        Self {
            config: Arc::new(config),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &RetryConfig {
        &self.config
    }
}

impl Middleware for Retry {
    fn name(&self) -> &'static str {
        "retry"
    }

    fn wrap(&self, next: BoxHandler, context: &HandlerContext) -> BoxHandler {
        Arc::new(RetryHandler {
            next,
            config: Arc::clone(&self.config),
            handler_name: Arc::clone(&context.handler_name),
        })
    }
}

/// The error a [`Retry`] returns, with [`RetryConfig::attempts_in_error`], after its last call:
/// the number of calls made and the last call's error.
#[derive(Debug, thiserror::Error)]
#[error("gave up after {attempts} attempt(s): {}", .error.source_error())]
pub struct RetryGaveUp {
    attempts: u32,
    #[source]
    error: HandlerError,
}

impl RetryGaveUp {
    /// How many times the handler was called.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The last call's error.
    pub fn last_error(&self) -> &HandlerError {
        &self.error
    }
}

struct RetryHandler {
    next: BoxHandler,
    config: Arc<RetryConfig>,
    handler_name: Arc<str>,
}

impl RetryHandler {
    fn give_up(&self, message: &Message, error: HandlerError, attempts: u32) -> HandlerError {
        if attempts > 1 {
            tracing::warn!(
                handler = %self.handler_name,
                message_id = %message.id,
                attempts,
                error = %error,
                "handler failed; giving up retrying"
            );
        } else {
            tracing::debug!(
                handler = %self.handler_name,
                message_id = %message.id,
                attempts,
                error = %error,
                "handler failed; not retried"
            );
        }
        if !self.config.attempts_in_error {
            return error;
        }
        let kind = error.kind();
        let delay = error.redelivery_delay();
        let wrapped = HandlerError::with_kind(kind, RetryGaveUp { attempts, error });
        match delay {
            Some(delay) => wrapped.redeliver_after(delay),
            None => wrapped,
        }
    }
}

#[async_trait]
impl Handler for RetryHandler {
    async fn handle(&self, message: Message) -> HandlerResult {
        let started = Instant::now();
        let mut attempt: u32 = 1;
        loop {
            let error = match self.next.handle(message.clone()).await {
                Ok(output) => {
                    if attempt > 1 {
                        tracing::info!(
                            handler = %self.handler_name,
                            message_id = %message.id,
                            attempts = attempt,
                            "handler succeeded after retrying"
                        );
                    }
                    return Ok(output);
                }
                Err(error) => error,
            };
            if !self.config.retries_kind(error.kind()) || attempt > self.config.retries_max {
                return Err(self.give_up(&message, error, attempt));
            }
            let delay = self.config.jittered(self.config.base_interval(attempt));
            if let Some(elapsed_max) = self.config.max_elapsed_time
                && started.elapsed().saturating_add(delay) > elapsed_max
            {
                return Err(self.give_up(&message, error, attempt));
            }
            tracing::warn!(
                handler = %self.handler_name,
                message_id = %message.id,
                attempt,
                retries_max = self.config.retries_max,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                error = %error,
                "handler failed; retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::middleware::test_support::{Calls, wrap};

    fn no_jitter() -> RetryConfig {
        RetryConfig::default().jitter(0.0)
    }

    #[tokio::test(start_paused = true)]
    async fn retries_exactly_retries_max_times_then_returns_the_last_error() {
        let calls = Calls::failing_always(HandlerErrorKind::Transient);
        let handler = wrap(&Retry::new(no_jitter().retries_max(4)), calls.handler());
        let result = handler.handle(Message::new("x")).await;
        assert_eq!(calls.count(), 5);
        let error = result.err();
        assert_eq!(
            error.as_ref().map(HandlerError::kind),
            Some(HandlerErrorKind::Transient)
        );
        assert_eq!(
            error.map(|e| e.to_string()).as_deref(),
            Some("handler failed: call 5 failed")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stops_retrying_once_the_handler_succeeds() {
        let calls = Calls::failing_first(2, HandlerErrorKind::Transient);
        let handler = wrap(&Retry::new(no_jitter()), calls.handler());
        let result = handler.handle(Message::new("x")).await;
        assert!(result.is_ok());
        assert_eq!(calls.count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_retries_calls_once() {
        let calls = Calls::failing_always(HandlerErrorKind::Transient);
        let handler = wrap(&Retry::new(no_jitter().retries_max(0)), calls.handler());
        assert!(handler.handle(Message::new("x")).await.is_err());
        assert_eq!(calls.count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_never_retried() {
        let calls = Calls::failing_always(HandlerErrorKind::Permanent);
        // Even with an empty not-retried list.
        let config = no_jitter().kinds_not_retried([]);
        let handler = wrap(&Retry::new(config), calls.handler());
        let error = handler.handle(Message::new("x")).await.err();
        assert!(error.as_ref().is_some_and(HandlerError::is_permanent));
        assert_eq!(calls.count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn configured_kinds_are_not_retried_and_keep_their_delay() {
        let calls =
            Calls::failing_always(HandlerErrorKind::CircuitOpen).with_delay(Duration::from_secs(7));
        let handler = wrap(&Retry::new(no_jitter()), calls.handler());
        let error = handler.handle(Message::new("x")).await.err();
        assert_eq!(calls.count(), 1);
        assert_eq!(
            error.and_then(|e| e.redelivery_delay()),
            Some(Duration::from_secs(7))
        );

        // Retried once removed from the list.
        let calls = Calls::failing_always(HandlerErrorKind::CircuitOpen);
        let config = no_jitter().retries_max(2).kinds_not_retried([]);
        let handler = wrap(&Retry::new(config), calls.handler());
        assert!(handler.handle(Message::new("x")).await.is_err());
        assert_eq!(calls.count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_by_the_multiplier_and_is_capped() {
        let calls = Calls::failing_always(HandlerErrorKind::TimedOut);
        let config = no_jitter()
            .retries_max(6)
            .initial_interval(Duration::from_millis(100))
            .multiplier(3.0)
            .max_interval(Duration::from_secs(2));
        let handler = wrap(&Retry::new(config), calls.handler());
        assert!(handler.handle(Message::new("x")).await.is_err());
        let gaps_ms: Vec<u128> = calls.gaps().iter().map(Duration::as_millis).collect();
        assert_eq!(gaps_ms, vec![100, 300, 900, 2000, 2000, 2000]);
    }

    #[test]
    fn base_interval_saturates_instead_of_overflowing() {
        let config = no_jitter()
            .multiplier(10.0)
            .max_interval(Duration::from_secs(60));
        assert_eq!(config.base_interval(1), Duration::from_millis(100));
        assert_eq!(config.base_interval(u32::MAX), Duration::from_secs(60));
        assert_eq!(RetryConfig::default().multiplier(0.5).multiplier, 1.0);
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let config = RetryConfig::default().jitter(0.2);
        let base = Duration::from_millis(1000);
        let mut seen_low = false;
        let mut seen_high = false;
        for _ in 0..2_000 {
            let delay = config.jittered(base);
            assert!(delay >= Duration::from_millis(800), "{delay:?}");
            assert!(delay <= Duration::from_millis(1200), "{delay:?}");
            seen_low |= delay < Duration::from_millis(950);
            seen_high |= delay > Duration::from_millis(1050);
        }
        assert!(seen_low && seen_high, "jitter spreads both ways");
        assert_eq!(RetryConfig::default().jitter(5.0).jitter, 1.0);
        assert_eq!(RetryConfig::default().jitter(f64::NAN).jitter, 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn jittered_waits_stay_within_bounds_end_to_end() {
        let calls = Calls::failing_always(HandlerErrorKind::Transient);
        let config = RetryConfig::default()
            .retries_max(3)
            .jitter(0.5)
            .initial_interval(Duration::from_millis(400))
            .multiplier(1.0);
        let handler = wrap(&Retry::new(config), calls.handler());
        assert!(handler.handle(Message::new("x")).await.is_err());
        for gap in calls.gaps() {
            assert!(gap >= Duration::from_millis(200) && gap <= Duration::from_millis(600));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn max_elapsed_time_bounds_the_retries() {
        let calls = Calls::failing_always(HandlerErrorKind::Transient);
        let config = no_jitter()
            .retries_max(100)
            .initial_interval(Duration::from_secs(1))
            .multiplier(1.0)
            .max_elapsed_time(Some(Duration::from_millis(3500)));
        let handler = wrap(&Retry::new(config), calls.handler());
        let started = Instant::now();
        assert!(handler.handle(Message::new("x")).await.is_err());
        // Calls at 0, 1, 2, 3 s; the next would start at 4 s > 3.5 s.
        assert_eq!(calls.count(), 4);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn each_attempt_gets_a_clone_of_the_same_message() {
        let calls = Calls::failing_first(2, HandlerErrorKind::Transient);
        let handler = wrap(&Retry::new(no_jitter()), calls.handler());
        let message = Message::new("payload").with_metadata("k", "v");
        assert!(handler.handle(message.clone()).await.is_ok());
        let seen = calls.messages();
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|m| m.same_content(&message)));
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_can_be_recorded_in_the_error() {
        let calls =
            Calls::failing_always(HandlerErrorKind::TimedOut).with_delay(Duration::from_secs(1));
        let config = no_jitter().retries_max(2).attempts_in_error(true);
        let handler = wrap(&Retry::new(config), calls.handler());
        let error = handler.handle(Message::new("x")).await.err();
        let Some(error) = error else {
            panic!("expected an error");
        };
        assert_eq!(error.kind(), HandlerErrorKind::TimedOut);
        assert_eq!(error.redelivery_delay(), Some(Duration::from_secs(1)));
        let gave_up = error.source_error().downcast_ref::<RetryGaveUp>();
        assert_eq!(gave_up.map(RetryGaveUp::attempts), Some(3));
        assert_eq!(
            error.to_string(),
            "handler timed out: gave up after 3 attempt(s): call 3 failed"
        );
    }
}
