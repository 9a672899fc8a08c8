//! [`CircuitBreaker`]: stops calling a handler whose dependency keeps failing.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::handler::{
    BoxHandler, Handler, HandlerContext, HandlerError, HandlerErrorKind, HandlerResult, Middleware,
};
use crate::message::Message;

/// Settings of a [`CircuitBreaker`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open the breaker (at least 1).
    pub failure_threshold: u32,
    /// How long the breaker stays open before it lets a trial call through.
    pub open_duration: Duration,
    /// While half-open with the trial call still running, the redelivery delay of the calls
    /// it refuses.
    pub half_open_delay: Duration,
    /// Error kinds that are neither failures nor successes for the breaker: by default
    /// [`Permanent`](HandlerErrorKind::Permanent) (the message's fault, not the dependency's:
    /// a stream of undecodable messages must not cut off the good ones) and
    /// [`InProgressElsewhere`](HandlerErrorKind::InProgressElsewhere) (the handler did not run).
    pub kinds_ignored: Vec<HandlerErrorKind>,
}

impl Default for CircuitBreakerConfig {
    /// Opens after 5 consecutive failures for 30 s; refused calls while a trial runs come back
    /// after 1 s.
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_duration: Duration::from_secs(30),
            half_open_delay: Duration::from_secs(1),
            kinds_ignored: vec![
                HandlerErrorKind::Permanent,
                HandlerErrorKind::InProgressElsewhere,
            ],
        }
    }
}

impl CircuitBreakerConfig {
    /// Builder: see [`CircuitBreakerConfig::failure_threshold`] (at least 1).
    #[must_use]
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.failure_threshold = failures.max(1);
        self
    }

    /// Builder: see [`CircuitBreakerConfig::open_duration`].
    #[must_use]
    pub fn open_duration(mut self, duration: Duration) -> Self {
        self.open_duration = duration;
        self
    }

    /// Builder: see [`CircuitBreakerConfig::half_open_delay`].
    #[must_use]
    pub fn half_open_delay(mut self, delay: Duration) -> Self {
        self.half_open_delay = delay;
        self
    }

    /// Builder: see [`CircuitBreakerConfig::kinds_ignored`] (replaces the list).
    #[must_use]
    pub fn kinds_ignored(mut self, kinds: impl IntoIterator<Item = HandlerErrorKind>) -> Self {
        self.kinds_ignored = kinds.into_iter().collect();
        self
    }
}

/// The state of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CircuitState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// Calls are refused until the open duration has passed.
    Open,
    /// One trial call decides: success closes, failure opens again.
    HalfOpen,
}

/// Fails fast while the next handler's dependency is down.
///
/// Closed, it counts consecutive failures (a success resets the count; errors of the kinds in
/// [`CircuitBreakerConfig::kinds_ignored`] change nothing). At
/// [`CircuitBreakerConfig::failure_threshold`] it opens: every call fails at once with kind
/// [`HandlerErrorKind::CircuitOpen`] and a redelivery delay equal to the open time left, so the
/// message comes back when the breaker may let it through. After
/// [`CircuitBreakerConfig::open_duration`] it is half-open: the next call is the trial (others
/// are refused meanwhile, with [`CircuitBreakerConfig::half_open_delay`]); its success closes the
/// breaker, its failure opens it for another full period, an ignored error leaves the next call
/// to be the trial. Consecutive failures rather than a failure ratio: no window to tune, and
/// it reacts within a few messages at any traffic level.
///
/// Results of calls admitted before the state changed do not count (a slow success does not
/// close a breaker that opened meanwhile). The state is shared by every handler this instance
/// wraps — a breaker guards a dependency; give each handler its own instance otherwise.
///
/// Put it inside [`Retry`](super::Retry) (each attempt counts, and once open the retry stops,
/// since circuit-open errors are not retried by default) and outside
/// [`Timeout`](super::Timeout) and [`Recoverer`](super::Recoverer), so timeouts and panics
/// count as failures.
#[derive(Debug, Clone, Default)]
pub struct CircuitBreaker {
    breaker: Arc<Breaker>,
}

#[derive(Debug, Default)]
struct Breaker {
    config: CircuitBreakerConfig,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial_running: bool },
}

impl Default for State {
    fn default() -> Self {
        Self::Closed { failures: 0 }
    }
}

/// How a call was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Closed,
    Trial,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Success,
    Failure,
    Ignored,
}

impl CircuitBreaker {
    /// A closed breaker with `config`.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        Self {
            breaker: Arc::new(Breaker {
                config,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.breaker.config
    }

    /// The state now (an open breaker whose time is up reports half-open).
    pub fn state(&self) -> CircuitState {
        match *self.breaker.lock() {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { until } if Instant::now() < until => CircuitState::Open,
            State::Open { .. } | State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }
}

impl Breaker {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets the call through, or says how long until one may pass.
    fn admit(&self, handler_name: &str) -> Result<Admission, Duration> {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Ok(Admission::Closed),
            State::Open { until } => {
                let now = Instant::now();
                if now < until {
                    return Err(until - now);
                }
                tracing::info!(handler = %handler_name, "circuit half-open: letting a trial call through");
                *state = State::HalfOpen {
                    trial_running: true,
                };
                Ok(Admission::Trial)
            }
            State::HalfOpen {
                trial_running: false,
            } => {
                *state = State::HalfOpen {
                    trial_running: true,
                };
                Ok(Admission::Trial)
            }
            State::HalfOpen {
                trial_running: true,
            } => Err(self.config.half_open_delay),
        }
    }

    fn record(&self, admission: Admission, verdict: Verdict, handler_name: &str) {
        let mut state = self.lock();
        let next = match (admission, *state, verdict) {
            (Admission::Closed, State::Closed { .. }, Verdict::Success) => {
                State::Closed { failures: 0 }
            }
            (Admission::Closed, State::Closed { failures }, Verdict::Failure) => {
                let failures = failures.saturating_add(1);
                if failures < self.config.failure_threshold {
                    State::Closed { failures }
                } else {
                    tracing::warn!(
                        handler = %handler_name,
                        failures,
                        open_ms = duration_ms(self.config.open_duration),
                        "circuit open"
                    );
                    self.open()
                }
            }
            (Admission::Trial, State::HalfOpen { .. }, Verdict::Success) => {
                tracing::info!(handler = %handler_name, "circuit closed: the trial call succeeded");
                State::Closed { failures: 0 }
            }
            (Admission::Trial, State::HalfOpen { .. }, Verdict::Failure) => {
                tracing::warn!(
                    handler = %handler_name,
                    open_ms = duration_ms(self.config.open_duration),
                    "circuit open again: the trial call failed"
                );
                self.open()
            }
            // Neither: the next call is the trial.
            (Admission::Trial, State::HalfOpen { .. }, Verdict::Ignored) => State::HalfOpen {
                trial_running: false,
            },
            // Ignored while closed, or admitted under a state that has changed since.
            (_, unchanged, _) => unchanged,
        };
        *state = next;
    }

    fn open(&self) -> State {
        State::Open {
            until: Instant::now() + self.config.open_duration,
        }
    }
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Middleware for CircuitBreaker {
    fn name(&self) -> &'static str {
        "circuit_breaker"
    }

    fn wrap(&self, next: BoxHandler, context: &HandlerContext) -> BoxHandler {
        Arc::new(BreakerHandler {
            next,
            breaker: Arc::clone(&self.breaker),
            handler_name: Arc::clone(&context.handler_name),
        })
    }
}

/// The source of the error an open [`CircuitBreaker`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("calls refused for {retry_in:?} more")]
pub struct CircuitOpenError {
    retry_in: Duration,
}

impl CircuitOpenError {
    /// How long until the breaker lets a call through (also the error's redelivery delay).
    pub fn retry_in(&self) -> Duration {
        self.retry_in
    }
}

struct BreakerHandler {
    next: BoxHandler,
    breaker: Arc<Breaker>,
    handler_name: Arc<str>,
}

/// Frees the trial slot when a trial call is dropped before it returned.
struct TrialGuard<'a> {
    handler: &'a BreakerHandler,
    admission: Option<Admission>,
}

impl TrialGuard<'_> {
    fn finish(mut self, verdict: Verdict) {
        if let Some(admission) = self.admission.take() {
            self.handler
                .breaker
                .record(admission, verdict, &self.handler.handler_name);
        }
    }
}

impl Drop for TrialGuard<'_> {
    fn drop(&mut self) {
        if let Some(Admission::Trial) = self.admission.take() {
            self.handler.breaker.record(
                Admission::Trial,
                Verdict::Ignored,
                &self.handler.handler_name,
            );
        }
    }
}

#[async_trait]
impl Handler for BreakerHandler {
    async fn handle(&self, message: Message) -> HandlerResult {
        let admission = match self.breaker.admit(&self.handler_name) {
            Ok(admission) => admission,
            Err(retry_in) => {
                tracing::debug!(
                    handler = %self.handler_name,
                    message_id = %message.id,
                    "circuit open: call refused"
                );
                return Err(HandlerError::with_kind(
                    HandlerErrorKind::CircuitOpen,
                    CircuitOpenError { retry_in },
                )
                .redeliver_after(retry_in));
            }
        };
        let guard = TrialGuard {
            handler: self,
            admission: Some(admission),
        };
        let result = self.next.handle(message).await;
        let verdict = match &result {
            Ok(_) => Verdict::Success,
            Err(error) if self.breaker.config.kinds_ignored.contains(&error.kind()) => {
                Verdict::Ignored
            }
            Err(_) => Verdict::Failure,
        };
        guard.finish(verdict);
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::sync::Notify;

    use super::*;
    use crate::handler::handler_fn;
    use crate::middleware::test_support::wrap;

    /// A handler whose next results are switched by the test.
    #[derive(Clone, Default)]
    struct Switch {
        failing: Arc<AtomicBool>,
        calls: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Switch {
        fn fail(&self, failing: bool) {
            self.failing.store(failing, Ordering::SeqCst);
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
        fn handler(&self) -> impl Handler {
            let switch = self.clone();
            handler_fn(move |_message: Message| {
                let switch = switch.clone();
                async move {
                    switch.calls.fetch_add(1, Ordering::SeqCst);
                    if switch.failing.load(Ordering::SeqCst) {
                        Err(HandlerError::new("dependency down"))
                    } else {
                        Ok(vec![])
                    }
                }
            })
        }
    }

    fn config() -> CircuitBreakerConfig {
        CircuitBreakerConfig::default()
            .failure_threshold(3)
            .open_duration(Duration::from_secs(10))
    }

    async fn kind_of(handler: &BoxHandler) -> Option<HandlerErrorKind> {
        handler
            .handle(Message::new("x"))
            .await
            .err()
            .map(|e| e.kind())
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_fails_fast_with_the_time_left() {
        let switch = Switch::default();
        let breaker = CircuitBreaker::new(config());
        let handler = wrap(&breaker, switch.handler());
        switch.fail(true);
        for _ in 0..3 {
            assert_eq!(kind_of(&handler).await, Some(HandlerErrorKind::Transient));
        }
        assert_eq!(breaker.state(), CircuitState::Open);
        let error = handler.handle(Message::new("x")).await.err();
        assert_eq!(
            error.as_ref().map(HandlerError::kind),
            Some(HandlerErrorKind::CircuitOpen)
        );
        assert_eq!(
            error.and_then(|e| e.redelivery_delay()),
            Some(Duration::from_secs(10))
        );
        assert_eq!(switch.calls(), 3, "refused without calling");

        tokio::time::advance(Duration::from_secs(4)).await;
        let error = handler.handle(Message::new("x")).await.err();
        let retry_in = error.as_ref().and_then(|e| {
            e.source_error()
                .downcast_ref::<CircuitOpenError>()
                .map(CircuitOpenError::retry_in)
        });
        assert_eq!(retry_in, Some(Duration::from_secs(6)));
        assert_eq!(
            error.and_then(|e| e.redelivery_delay()),
            Some(Duration::from_secs(6))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let switch = Switch::default();
        let breaker = CircuitBreaker::new(config());
        let handler = wrap(&breaker, switch.handler());
        for _ in 0..5 {
            switch.fail(true);
            assert!(kind_of(&handler).await.is_some());
            assert!(kind_of(&handler).await.is_some());
            switch.fail(false);
            assert_eq!(kind_of(&handler).await, None);
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_success_closes_and_failure_reopens() {
        let switch = Switch::default();
        let breaker = CircuitBreaker::new(config());
        let handler = wrap(&breaker, switch.handler());
        switch.fail(true);
        for _ in 0..3 {
            assert!(kind_of(&handler).await.is_some());
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(breaker.state(), CircuitState::HalfOpen);

        // The trial fails: open again for a full period.
        assert_eq!(kind_of(&handler).await, Some(HandlerErrorKind::Transient));
        assert_eq!(breaker.state(), CircuitState::Open);
        let delay = handler
            .handle(Message::new("x"))
            .await
            .err()
            .and_then(|e| e.redelivery_delay());
        assert_eq!(delay, Some(Duration::from_secs(10)));
        assert_eq!(switch.calls(), 4);

        // The next trial succeeds: closed, calls flow again.
        tokio::time::advance(Duration::from_secs(10)).await;
        switch.fail(false);
        assert_eq!(kind_of(&handler).await, None);
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert_eq!(kind_of(&handler).await, None);
        assert_eq!(switch.calls(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn only_one_trial_runs_while_half_open() {
        let entered = Arc::new(Notify::new());
        let gate = Arc::new(Notify::new());
        let failing = Arc::new(AtomicBool::new(true));
        let slow = {
            let (entered, gate, failing) = (entered.clone(), gate.clone(), failing.clone());
            handler_fn(move |_message: Message| {
                let (entered, gate, failing) = (entered.clone(), gate.clone(), failing.clone());
                async move {
                    if failing.load(Ordering::SeqCst) {
                        return Err(HandlerError::new("down"));
                    }
                    entered.notify_one();
                    gate.notified().await;
                    Ok(vec![])
                }
            })
        };
        let breaker = CircuitBreaker::new(config().half_open_delay(Duration::from_millis(250)));
        let handler = wrap(&breaker, slow);
        for _ in 0..3 {
            assert!(kind_of(&handler).await.is_some());
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        failing.store(false, Ordering::SeqCst);
        let trial = tokio::spawn({
            let handler = handler.clone();
            async move { handler.handle(Message::new("trial")).await.is_ok() }
        });
        entered.notified().await;
        let refused = handler.handle(Message::new("x")).await.err();
        assert_eq!(
            refused.as_ref().map(HandlerError::kind),
            Some(HandlerErrorKind::CircuitOpen)
        );
        assert_eq!(
            refused.and_then(|e| e.redelivery_delay()),
            Some(Duration::from_millis(250))
        );
        gate.notify_one();
        assert_eq!(trial.await.ok(), Some(true));
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_trial_frees_the_slot() {
        let breaker = CircuitBreaker::new(config());
        let switch = Switch::default();
        let failing = wrap(&breaker, switch.handler());
        switch.fail(true);
        for _ in 0..3 {
            assert!(kind_of(&failing).await.is_some());
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let never = wrap(
            &breaker,
            handler_fn(|_message: Message| futures::future::pending()),
        );
        let dropped =
            tokio::time::timeout(Duration::from_secs(1), never.handle(Message::new("x"))).await;
        assert!(dropped.is_err());
        assert_eq!(breaker.state(), CircuitState::HalfOpen);
        switch.fail(false);
        assert_eq!(kind_of(&failing).await, None, "the next call is the trial");
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_do_not_count_as_breaker_failures() {
        let breaker = CircuitBreaker::new(config());
        let handler = wrap(
            &breaker,
            handler_fn(|_message: Message| async move { Err(HandlerError::permanent("bad")) }),
        );
        for _ in 0..20 {
            assert_eq!(kind_of(&handler).await, Some(HandlerErrorKind::Permanent));
        }
        assert_eq!(breaker.state(), CircuitState::Closed);

        // Counted once no longer ignored.
        let strict = CircuitBreaker::new(config().kinds_ignored([]));
        let handler = wrap(
            &strict,
            handler_fn(|_message: Message| async move { Err(HandlerError::permanent("bad")) }),
        );
        for _ in 0..3 {
            assert!(kind_of(&handler).await.is_some());
        }
        assert_eq!(strict.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_success_does_not_close_an_open_breaker() {
        let entered = Arc::new(Notify::new());
        let gate = Arc::new(Notify::new());
        let slow = {
            let (entered, gate) = (entered.clone(), gate.clone());
            handler_fn(move |_message: Message| {
                let (entered, gate) = (entered.clone(), gate.clone());
                async move {
                    entered.notify_one();
                    gate.notified().await;
                    Ok(vec![])
                }
            })
        };
        let breaker = CircuitBreaker::new(config());
        let slow = wrap(&breaker, slow);
        let switch = Switch::default();
        switch.fail(true);
        let failing = wrap(&breaker, switch.handler());
        let late = tokio::spawn(async move { slow.handle(Message::new("slow")).await.is_ok() });
        entered.notified().await;
        for _ in 0..3 {
            assert!(kind_of(&failing).await.is_some());
        }
        gate.notify_one();
        assert_eq!(late.await.ok(), Some(true));
        assert_eq!(breaker.state(), CircuitState::Open);
    }
}
