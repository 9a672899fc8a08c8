//! [`Deduplicator`] and its [`DedupStore`]: handle a message once, and never skip one that was
//! not handled.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::handler::{
    BoxHandler, Handler, HandlerContext, HandlerError, HandlerErrorKind, HandlerResult, Middleware,
};
use crate::message::{Message, Outcome};
use crate::pubsub::BoxError;

/// What [`DedupStore::begin`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key is now claimed by the caller, who must later complete or release it.
    New,
    /// The key was handled before (and is still remembered).
    AlreadyDone,
    /// Someone else holds a live claim on the key.
    InProgress,
}

/// Where a [`Deduplicator`] keeps its claims and the keys it handled.
///
/// Keys live in a *scope*: the deduplicator passes its handler's name, so handlers that consume
/// the same message keep separate records. Every method must be atomic per `(scope, key)`.
///
/// A store must expire claims that are neither completed nor released within a lease, or a
/// crashed consumer blocks its messages forever; and it may forget done keys after a retention
/// period. A SQL store maps naturally: a table keyed by `(scope, key)` with a state
/// (`claimed`/`done`) and a timestamp; `begin` is one `INSERT … ON CONFLICT DO UPDATE` that takes
/// the row only when it is absent, an expired claim or an expired done record (the row count
/// says [`Claim::New`], else the stored state says which of the other two); `complete` sets the
/// state to `done`; `release` deletes the row if it is still `claimed`.
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    /// Claims `key` for processing, unless it is done or claimed by someone else.
    async fn begin(&self, scope: &str, key: &str) -> Result<Claim, BoxError>;

    /// Marks `key` done: later [`begin`](DedupStore::begin)s find [`Claim::AlreadyDone`].
    async fn complete(&self, scope: &str, key: &str) -> Result<(), BoxError>;

    /// Gives up a claim on `key` (the handler failed): the next `begin` finds it free. Does
    /// nothing to a key that is done.
    async fn release(&self, scope: &str, key: &str) -> Result<(), BoxError>;
}

type KeyFn = Arc<dyn Fn(&Message) -> Option<String> + Send + Sync>;

/// Handles each message at most once per key — without ever dropping a message that was not
/// handled.
///
/// The protocol is claim, then complete or release:
///
/// 1. [`DedupStore::begin`] claims the key. [`Claim::AlreadyDone`]: the message was handled
///    before; the deduplicator returns no output, so the router acks it. [`Claim::InProgress`]:
///    someone holds the claim right now (a concurrent redelivery, another consumer); the
///    deduplicator fails with [`HandlerErrorKind::InProgressElsewhere`] and a redelivery delay,
///    so the message comes back later and then finds the key done — or free again, if the
///    other attempt failed.
/// 2. [`Claim::New`]: the handler runs. On failure the claim is released
///    ([`DedupStore::release`]) so the redelivery is processed. On success the key is marked done
///    ([`DedupStore::complete`]) — by default only once the router has acked the message, see
///    [`Deduplicator::complete_on_ack`].
///
/// A claim is never left behind for good: a call dropped half-way (a timeout outside the
/// deduplicator, a shutdown) releases it from a spawned task, and a store lets a claim expire
/// after a lease ([`InMemoryDedupConfig::claim_ttl`]) in case even that did not happen (a
/// crash, for a shared store).
///
/// The key is the message id by default ([`Deduplicator::key_fn`] picks another, e.g. an
/// idempotency key from the metadata); it is scoped by the handler name. Errors of the store are
/// returned as transient handler errors (the message is nacked and comes back), except when
/// releasing, which is only logged (the claim then expires).
///
/// Put it outside [`Retry`](super::Retry), so one claim covers all attempts (the store's claim
/// lease must then outlast them), and outside a [`CircuitBreaker`](super::CircuitBreaker), so
/// duplicates are skipped even while the breaker is open.
#[derive(Clone)]
pub struct Deduplicator {
    store: Arc<dyn DedupStore>,
    key: KeyFn,
    in_progress_delay: Duration,
    complete_on_ack: bool,
    ack_wait_max: Duration,
}

impl fmt::Debug for Deduplicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deduplicator")
            .field("in_progress_delay", &self.in_progress_delay)
            .field("complete_on_ack", &self.complete_on_ack)
            .field("ack_wait_max", &self.ack_wait_max)
            .finish_non_exhaustive()
    }
}

impl Deduplicator {
    /// Deduplicates by message id in `store`; a message in progress elsewhere is redelivered
    /// after 1 s; keys are marked done once the message is acked, waiting at most 30 s for it.
    pub fn new(store: Arc<dyn DedupStore>) -> Self {
        Self {
            store,
            key: Arc::new(|message: &Message| Some(message.id.to_text())),
            in_progress_delay: Duration::from_secs(1),
            complete_on_ack: true,
            ack_wait_max: Duration::from_secs(30),
        }
    }

    /// Builder: the key of a message; `None` lets the message through without deduplication.
    #[must_use]
    pub fn key_fn(
        mut self,
        key: impl Fn(&Message) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.key = Arc::new(key);
        self
    }

    /// Builder: the redelivery delay of a message whose key is claimed elsewhere.
    #[must_use]
    pub fn in_progress_delay(mut self, delay: Duration) -> Self {
        self.in_progress_delay = delay;
        self
    }

    /// Builder: when to mark a key done after the handler succeeded.
    ///
    /// With `true` (the default) the key stays claimed until the router has published the
    /// output and acked the message, and is released if it nacks instead (publishing failed):
    /// a success whose output never went out is not remembered as done, so its redelivery is
    /// handled again instead of being skipped. A message without a delivery (called directly)
    /// is marked done at once. With `false` the key is marked done as soon as the handler
    /// returns; a publish failure after that loses the output, since the redelivery is skipped.
    #[must_use]
    pub fn complete_on_ack(mut self, on_ack: bool) -> Self {
        self.complete_on_ack = on_ack;
        self
    }

    /// Builder: with [`complete_on_ack`](Deduplicator::complete_on_ack), how long to wait for
    /// the router to settle the message. Past it the claim is released (a later redelivery is
    /// handled again: at-least-once, nothing lost). Keep it below the store's claim lease.
    ///
    /// The wait holds a clone of the message, so a delivery dropped unsettled is reported
    /// only once the wait ends.
    #[must_use]
    pub fn ack_wait_max(mut self, wait: Duration) -> Self {
        self.ack_wait_max = wait;
        self
    }
}

impl Middleware for Deduplicator {
    fn name(&self) -> &'static str {
        "deduplicator"
    }

    fn wrap(&self, next: BoxHandler, context: &HandlerContext) -> BoxHandler {
        Arc::new(DedupHandler {
            next,
            config: self.clone(),
            scope: Arc::clone(&context.handler_name),
        })
    }
}

/// The source of the error a [`Deduplicator`] returns for a key claimed elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message {key} is being handled elsewhere")]
pub struct DedupInProgress {
    key: String,
}

impl DedupInProgress {
    /// The deduplication key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// The source of the error a [`Deduplicator`] returns when its store failed.
#[derive(Debug, thiserror::Error)]
#[error("deduplication store failed to {operation}: {source}")]
pub struct DedupStoreError {
    operation: &'static str,
    #[source]
    source: BoxError,
}

impl DedupStoreError {
    /// The store method that failed (`begin`, `complete`).
    pub fn operation(&self) -> &'static str {
        self.operation
    }
}

fn store_error(operation: &'static str, source: BoxError) -> HandlerError {
    HandlerError::new(DedupStoreError { operation, source })
}

struct DedupHandler {
    next: BoxHandler,
    config: Deduplicator,
    scope: Arc<str>,
}

#[async_trait]
impl Handler for DedupHandler {
    async fn handle(&self, message: Message) -> HandlerResult {
        let Some(key) = (self.config.key)(&message) else {
            return self.next.handle(message).await;
        };
        let claim = self
            .config
            .store
            .begin(&self.scope, &key)
            .await
            .map_err(|source| store_error("begin", source))?;
        match claim {
            Claim::New => {}
            Claim::AlreadyDone => {
                tracing::info!(
                    handler = %self.scope,
                    message_id = %message.id,
                    key = %key,
                    "duplicate message skipped"
                );
                return Ok(Vec::new());
            }
            Claim::InProgress => {
                tracing::debug!(
                    handler = %self.scope,
                    message_id = %message.id,
                    key = %key,
                    "message in progress elsewhere; asking for redelivery"
                );
                return Err(HandlerError::with_kind(
                    HandlerErrorKind::InProgressElsewhere,
                    DedupInProgress { key },
                )
                .redeliver_after(self.config.in_progress_delay));
            }
        }
        let guard = ClaimGuard {
            claim: Some(Arc::new(ClaimKey {
                store: Arc::clone(&self.config.store),
                scope: Arc::clone(&self.scope),
                key,
            })),
        };
        let watched =
            (self.config.complete_on_ack && message.has_delivery()).then(|| message.clone());
        match self.next.handle(message).await {
            Err(error) => {
                guard.release().await;
                Err(error)
            }
            Ok(output) => match watched {
                Some(message) => {
                    tokio::spawn(complete_when_settled(
                        guard,
                        message,
                        self.config.ack_wait_max,
                    ));
                    Ok(output)
                }
                None => guard.complete().await.map(|()| output),
            },
        }
    }
}

/// Marks the key done once the router acked the message; releases it on a nack or when the
/// router takes too long.
async fn complete_when_settled(guard: ClaimGuard, message: Message, wait_max: Duration) {
    let outcome = tokio::time::timeout(wait_max, message.settled()).await;
    let id = message.id.clone();
    drop(message);
    match outcome {
        Ok(Some(Outcome::Acked) | None) => {
            if let Err(error) = guard.complete().await {
                tracing::warn!(message_id = %id, error = %error, "could not mark a message done");
            }
        }
        Ok(Some(_)) => guard.release().await,
        Err(_elapsed) => {
            tracing::warn!(
                message_id = %id,
                wait_ms = u64::try_from(wait_max.as_millis()).unwrap_or(u64::MAX),
                "message not settled in time; releasing its deduplication claim"
            );
            guard.release().await;
        }
    }
}

struct ClaimKey {
    store: Arc<dyn DedupStore>,
    scope: Arc<str>,
    key: String,
}

impl ClaimKey {
    async fn release(&self) {
        if let Err(error) = self.store.release(&self.scope, &self.key).await {
            tracing::warn!(
                handler = %self.scope,
                key = %self.key,
                error = %error,
                "could not release a deduplication claim; it will expire"
            );
        }
    }
}

/// A claim that is released when dropped before it was completed or released.
struct ClaimGuard {
    claim: Option<Arc<ClaimKey>>,
}

impl ClaimGuard {
    async fn release(mut self) {
        if let Some(claim) = self.claim.clone() {
            claim.release().await;
            self.claim = None;
        }
    }

    /// Marks the key done; on failure releases it, so the redelivery is processed.
    async fn complete(mut self) -> Result<(), HandlerError> {
        let Some(claim) = self.claim.clone() else {
            return Ok(());
        };
        let result = claim.store.complete(&claim.scope, &claim.key).await;
        if let Err(source) = result {
            claim.release().await;
            self.claim = None;
            return Err(store_error("complete", source));
        }
        self.claim = None;
        Ok(())
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let Some(claim) = self.claim.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { claim.release().await });
            }
            Err(_) => tracing::warn!(
                handler = %claim.scope,
                key = %claim.key,
                "deduplication claim abandoned without a runtime; it will expire"
            ),
        }
    }
}

/// Settings of an [`InMemoryDedupStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InMemoryDedupConfig {
    /// How long a done key is remembered; a redelivery after that is handled again.
    pub ttl: Duration,
    /// How long a claim holds without being completed or released; then it counts as
    /// abandoned and the next `begin` takes it over. Must outlast the handler (all its retries)
    /// and the wait for the ack, or a slow call and a redelivery run at the same time.
    pub claim_ttl: Duration,
    /// Keys (claimed or done) kept at most.
    pub entries_max: usize,
}

impl Default for InMemoryDedupConfig {
    /// Remember done keys for an hour, claims for 5 minutes, 100 000 keys at most.
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60 * 60),
            claim_ttl: Duration::from_secs(5 * 60),
            entries_max: 100_000,
        }
    }
}

impl InMemoryDedupConfig {
    /// Builder: see [`InMemoryDedupConfig::ttl`].
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Builder: see [`InMemoryDedupConfig::claim_ttl`].
    #[must_use]
    pub fn claim_ttl(mut self, ttl: Duration) -> Self {
        self.claim_ttl = ttl;
        self
    }

    /// Builder: see [`InMemoryDedupConfig::entries_max`] (at least 1).
    #[must_use]
    pub fn entries_max(mut self, entries: usize) -> Self {
        self.entries_max = entries.max(1);
        self
    }
}

/// A [`DedupStore`] in memory, for one process: bounded in time and in size.
///
/// Done keys are forgotten after [`InMemoryDedupConfig::ttl`]. When
/// [`InMemoryDedupConfig::entries_max`] keys are held, a new claim first drops expired entries,
/// then the oldest done keys; live claims are never evicted, so when every entry is a live claim
/// `begin` fails with [`DedupStoreFull`] (the message is nacked and comes back). **A key that
/// expired or was evicted is handled again if its message is redelivered**: size `entries_max`
/// and `ttl` for the redelivery window of the broker. Its contents are lost on restart.
///
/// Every operation is O(log n) under a short lock.
#[derive(Debug)]
pub struct InMemoryDedupStore {
    config: InMemoryDedupConfig,
    inner: Mutex<Entries>,
}

impl Default for InMemoryDedupStore {
    fn default() -> Self {
        Self::new(InMemoryDedupConfig::default())
    }
}

/// Why an [`InMemoryDedupStore`] refused a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deduplication store full: {entries_max} keys are claimed and in progress")]
pub struct DedupStoreFull {
    entries_max: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Claimed,
    Done,
}

#[derive(Debug)]
struct Entry {
    state: State,
    /// Position in `claims` or `done`, by state.
    seq: u64,
    /// When it was claimed, or done.
    at: Instant,
}

/// The entries, with an index per state in age order (the sequence grows with time).
#[derive(Debug, Default)]
struct Entries {
    entries: HashMap<Arc<str>, Entry>,
    claims: BTreeMap<u64, Arc<str>>,
    done: BTreeMap<u64, Arc<str>>,
    seq_next: u64,
}

impl Entries {
    fn index(&mut self, state: State) -> &mut BTreeMap<u64, Arc<str>> {
        match state {
            State::Claimed => &mut self.claims,
            State::Done => &mut self.done,
        }
    }

    fn insert(&mut self, key: Arc<str>, state: State, at: Instant) {
        self.remove(&key);
        let seq = self.seq_next;
        self.seq_next += 1;
        self.index(state).insert(seq, Arc::clone(&key));
        self.entries.insert(key, Entry { state, seq, at });
    }

    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key) {
            self.index(entry.state).remove(&entry.seq);
        }
    }

    /// Drops the oldest entry of `state` when it is older than `ttl`; whether it did.
    fn pop_expired(&mut self, state: State, ttl: Duration, now: Instant) -> bool {
        let oldest = match state {
            State::Claimed => self.claims.first_key_value(),
            State::Done => self.done.first_key_value(),
        };
        let Some((_, key)) = oldest else {
            return false;
        };
        let key = Arc::clone(key);
        let expired = self
            .entries
            .get(&key)
            .is_none_or(|entry| now.saturating_duration_since(entry.at) >= ttl);
        if expired {
            if state == State::Claimed {
                tracing::warn!(key = %key, "deduplication claim expired; taking it over");
            }
            self.remove(&key);
        }
        expired
    }

    fn purge_expired(&mut self, config: &InMemoryDedupConfig, now: Instant) {
        while self.pop_expired(State::Done, config.ttl, now) {}
        while self.pop_expired(State::Claimed, config.claim_ttl, now) {}
    }

    /// Evicts the oldest done keys until there is room for one more; false when only live
    /// claims are left.
    fn make_room(&mut self, entries_max: usize) -> bool {
        while self.entries.len() >= entries_max {
            let Some((_, key)) = self.done.first_key_value() else {
                return false;
            };
            let key = Arc::clone(key);
            self.remove(&key);
        }
        true
    }
}

impl InMemoryDedupStore {
    /// A store with `config`.
    pub fn new(config: InMemoryDedupConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Entries::default()),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &InMemoryDedupConfig {
        &self.config
    }

    /// Keys held, claimed or done (expired ones included until the next claim purges them).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn full_key(scope: &str, key: &str) -> String {
        // The length prefix keeps ("a:b", "c") and ("a", "b:c") apart.
        format!("{}:{scope}:{key}", scope.len())
    }
}

#[async_trait]
impl DedupStore for InMemoryDedupStore {
    async fn begin(&self, scope: &str, key: &str) -> Result<Claim, BoxError> {
        let key = Self::full_key(scope, key);
        let mut inner = self.lock();
        let now = Instant::now();
        inner.purge_expired(&self.config, now);
        match inner.entries.get(key.as_str()).map(|entry| entry.state) {
            Some(State::Done) => return Ok(Claim::AlreadyDone),
            Some(State::Claimed) => return Ok(Claim::InProgress),
            None => {}
        }
        if !inner.make_room(self.config.entries_max) {
            return Err(Box::new(DedupStoreFull {
                entries_max: self.config.entries_max,
            }));
        }
        inner.insert(Arc::from(key), State::Claimed, now);
        Ok(Claim::New)
    }

    async fn complete(&self, scope: &str, key: &str) -> Result<(), BoxError> {
        let key = Self::full_key(scope, key);
        let mut inner = self.lock();
        let now = Instant::now();
        match inner.entries.get(key.as_str()).map(|entry| entry.state) {
            Some(State::Done) => {}
            Some(State::Claimed) => inner.insert(Arc::from(key), State::Done, now),
            // The claim expired meanwhile: remember the key anyway, if there is room.
            None => {
                inner.purge_expired(&self.config, now);
                if inner.make_room(self.config.entries_max) {
                    inner.insert(Arc::from(key), State::Done, now);
                }
            }
        }
        Ok(())
    }

    async fn release(&self, scope: &str, key: &str) -> Result<(), BoxError> {
        let key = Self::full_key(scope, key);
        let mut inner = self.lock();
        if inner
            .entries
            .get(key.as_str())
            .is_some_and(|entry| entry.state == State::Claimed)
        {
            inner.remove(&key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::Notify;

    use super::*;
    use crate::handler::handler_fn;
    use crate::message::{MessageId, Metadata, NoopAcknowledger};
    use crate::middleware::test_support::{Calls, context, wrap};

    const SCOPE: &str = "test-handler";

    fn store(config: InMemoryDedupConfig) -> Arc<InMemoryDedupStore> {
        Arc::new(InMemoryDedupStore::new(config))
    }

    async fn claim_of(store: &InMemoryDedupStore, message: &Message) -> Option<Claim> {
        store.begin(SCOPE, &message.id.to_text()).await.ok()
    }

    /// Lets spawned tasks run (the clock is paused, so this takes no real time).
    async fn settle_tasks() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    #[tokio::test]
    async fn a_duplicate_is_skipped_and_acked() {
        let calls = Calls::succeeding();
        let store = store(InMemoryDedupConfig::default());
        let handler = wrap(&Deduplicator::new(store.clone()), calls.handler());
        let message = Message::new("x");
        let first = handler.handle(message.clone()).await;
        assert_eq!(first.map(|out| out.len()).ok(), Some(1));
        let again = Message::with_id(message.id.clone(), "x");
        let second = handler.handle(again).await;
        assert_eq!(second.map(|out| out.len()).ok(), Some(0), "no output");
        assert_eq!(calls.count(), 1);
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn a_failure_releases_the_claim_so_the_redelivery_is_handled() {
        let calls = Calls::failing_first(1, HandlerErrorKind::Transient);
        let store = store(InMemoryDedupConfig::default());
        let handler = wrap(&Deduplicator::new(store.clone()), calls.handler());
        let message = Message::new("x");
        assert!(handler.handle(message.clone()).await.is_err());
        assert!(store.is_empty(), "released");
        assert_eq!(
            handler.handle(message.clone()).await.map(|o| o.len()).ok(),
            Some(1)
        );
        assert_eq!(
            handler.handle(message.clone()).await.map(|o| o.len()).ok(),
            Some(0)
        );
        assert_eq!(calls.count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_concurrent_duplicate_is_in_progress_elsewhere() {
        let entered = Arc::new(Notify::new());
        let gate = Arc::new(Notify::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let slow = {
            let (entered, gate, runs) = (entered.clone(), gate.clone(), runs.clone());
            handler_fn(move |_message: Message| {
                let (entered, gate, runs) = (entered.clone(), gate.clone(), runs.clone());
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    entered.notify_one();
                    gate.notified().await;
                    Ok(vec![Message::new("out")])
                }
            })
        };
        let store = store(InMemoryDedupConfig::default());
        let dedup = Deduplicator::new(store.clone()).in_progress_delay(Duration::from_secs(3));
        let handler = wrap(&dedup, slow);
        let message = Message::new("x");
        let first = tokio::spawn({
            let handler = handler.clone();
            let message = message.clone();
            async move { handler.handle(message).await }
        });
        entered.notified().await;

        let error = handler.handle(message.clone()).await.err();
        let Some(error) = error else {
            panic!("expected an error");
        };
        assert_eq!(error.kind(), HandlerErrorKind::InProgressElsewhere);
        assert_eq!(error.redelivery_delay(), Some(Duration::from_secs(3)));
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        gate.notify_one();
        let first = first.await.ok().and_then(Result::ok);
        assert_eq!(first.map(|out| out.len()), Some(1));
        let third = handler.handle(message).await;
        assert_eq!(third.map(|out| out.len()).ok(), Some(0));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn done_keys_expire_after_the_ttl() {
        let calls = Calls::succeeding();
        let store = store(InMemoryDedupConfig::default().ttl(Duration::from_secs(10)));
        let handler = wrap(&Deduplicator::new(store.clone()), calls.handler());
        let message = Message::new("x");
        assert!(handler.handle(message.clone()).await.is_ok());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(handler.handle(message.clone()).await.is_ok());
        assert_eq!(calls.count(), 1, "still remembered");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(handler.handle(message).await.is_ok());
        assert_eq!(calls.count(), 2, "expired: handled again");
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_claims_expire_after_the_claim_ttl() {
        let store = store(InMemoryDedupConfig::default().claim_ttl(Duration::from_secs(60)));
        assert_eq!(store.begin("s", "k").await.ok(), Some(Claim::New));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(store.begin("s", "k").await.ok(), Some(Claim::InProgress));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(store.begin("s", "k").await.ok(), Some(Claim::New));
    }

    #[tokio::test]
    async fn the_bound_on_entries_holds_under_ten_times_as_many_keys() {
        let calls = Calls::succeeding();
        let store = store(InMemoryDedupConfig::default().entries_max(50));
        let handler = wrap(&Deduplicator::new(store.clone()), calls.handler());
        let messages: Vec<Message> = (0..500).map(|i| Message::new(format!("{i}"))).collect();
        for message in &messages {
            assert!(handler.handle(message.clone()).await.is_ok());
            assert!(store.len() <= 50, "{} entries", store.len());
        }
        assert_eq!(store.len(), 50);
        assert_eq!(calls.count(), 500);
        // The newest are remembered; the evicted oldest would be handled again.
        assert!(handler.handle(messages[499].clone()).await.is_ok());
        assert_eq!(calls.count(), 500);
        assert!(handler.handle(messages[0].clone()).await.is_ok());
        assert_eq!(calls.count(), 501);
    }

    #[tokio::test(start_paused = true)]
    async fn when_full_expired_go_first_then_the_oldest_done_and_claims_never() {
        let store = store(
            InMemoryDedupConfig::default()
                .entries_max(3)
                .ttl(Duration::from_secs(10)),
        );
        let begin = |key: &'static str| {
            let store = store.clone();
            async move { store.begin("s", key).await.map_err(|e| e.to_string()) }
        };
        assert_eq!(begin("a").await, Ok(Claim::New));
        assert!(store.complete("s", "a").await.is_ok());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(begin("b").await, Ok(Claim::New));
        assert!(store.complete("s", "b").await.is_ok());
        assert_eq!(begin("c").await, Ok(Claim::New));
        tokio::time::advance(Duration::from_secs(6)).await;
        // "a" expired: purged, room for "d" without evicting "b".
        assert_eq!(begin("d").await, Ok(Claim::New));
        assert_eq!(begin("b").await, Ok(Claim::AlreadyDone));
        // Full of b (done), c, d (claimed): "e" evicts "b".
        assert_eq!(begin("e").await, Ok(Claim::New));
        assert_eq!(store.len(), 3);
        // Only live claims left: refused, not evicted.
        assert_eq!(
            begin("f").await,
            Err("deduplication store full: 3 keys are claimed and in progress".to_owned())
        );
        assert_eq!(begin("c").await, Ok(Claim::InProgress));
        assert!(store.release("s", "c").await.is_ok());
        assert_eq!(begin("f").await, Ok(Claim::New));
    }

    #[tokio::test]
    async fn release_never_forgets_a_done_key_and_scopes_are_separate() {
        let store = store(InMemoryDedupConfig::default());
        assert_eq!(store.begin("s", "k").await.ok(), Some(Claim::New));
        assert!(store.complete("s", "k").await.is_ok());
        assert!(store.release("s", "k").await.is_ok());
        assert_eq!(store.begin("s", "k").await.ok(), Some(Claim::AlreadyDone));
        assert_eq!(store.begin("s:k", "").await.ok(), Some(Claim::New));
        assert_eq!(store.begin("other", "k").await.ok(), Some(Claim::New));
    }

    #[tokio::test]
    async fn handlers_with_different_names_deduplicate_separately() {
        let calls = Calls::succeeding();
        let store = store(InMemoryDedupConfig::default());
        let dedup = Deduplicator::new(store.clone());
        let mut other = context();
        other.handler_name = Arc::from("other-handler");
        let first = dedup.wrap(Arc::new(calls.handler()), &context());
        let second = dedup.wrap(Arc::new(calls.handler()), &other);
        let message = Message::new("x");
        assert!(first.handle(message.clone()).await.is_ok());
        assert!(second.handle(message.clone()).await.is_ok());
        assert!(first.handle(message).await.is_ok());
        assert_eq!(calls.count(), 2);
    }

    #[tokio::test]
    async fn the_key_function_decides_what_counts_as_a_duplicate() {
        let calls = Calls::succeeding();
        let store = store(InMemoryDedupConfig::default());
        let dedup = Deduplicator::new(store.clone())
            .key_fn(|message| message.metadata.get("idempotency_key").map(str::to_owned));
        let handler = wrap(&dedup, calls.handler());
        let keyed = || Message::new("x").with_metadata("idempotency_key", "order-7");
        assert!(handler.handle(keyed()).await.is_ok());
        assert!(handler.handle(keyed()).await.is_ok());
        assert_eq!(calls.count(), 1, "same key, different ids");
        let unkeyed = Message::new("x").with_metadata(Metadata::PARTITION_KEY, "p");
        assert!(handler.handle(unkeyed.clone()).await.is_ok());
        assert!(handler.handle(unkeyed).await.is_ok());
        assert_eq!(calls.count(), 3, "no key: not deduplicated");
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_delivery_the_key_is_done_only_once_acked() {
        let calls = Calls::succeeding();
        let store = store(InMemoryDedupConfig::default());
        let handler = wrap(&Deduplicator::new(store.clone()), calls.handler());

        let acked = Message::new("x").delivered(NoopAcknowledger);
        assert!(handler.handle(acked.clone()).await.is_ok());
        settle_tasks().await;
        assert_eq!(claim_of(&store, &acked).await, Some(Claim::InProgress));
        acked.ack();
        settle_tasks().await;
        assert_eq!(claim_of(&store, &acked).await, Some(Claim::AlreadyDone));

        // Publishing the output failed, the router nacked: the redelivery is handled.
        let nacked = Message::new("y").delivered(NoopAcknowledger);
        assert!(handler.handle(nacked.clone()).await.is_ok());
        nacked.nack();
        settle_tasks().await;
        let redelivered = Message::with_id(nacked.id.clone(), "y");
        assert!(handler.handle(redelivered).await.is_ok());
        assert_eq!(calls.count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_never_settled_releases_its_claim_after_the_wait() {
        let calls = Calls::succeeding();
        let store = store(InMemoryDedupConfig::default());
        let dedup = Deduplicator::new(store.clone()).ack_wait_max(Duration::from_secs(5));
        let handler = wrap(&dedup, calls.handler());
        let message = Message::new("x").delivered(NoopAcknowledger);
        assert!(handler.handle(message.clone()).await.is_ok());
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(store.len() == 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(store.is_empty(), "released");
        assert_eq!(message.outcome(), None);
    }

    #[tokio::test]
    async fn complete_on_handler_success_when_asked() {
        let calls = Calls::succeeding();
        let store = store(InMemoryDedupConfig::default());
        let dedup = Deduplicator::new(store.clone()).complete_on_ack(false);
        let handler = wrap(&dedup, calls.handler());
        let message = Message::new("x").delivered(NoopAcknowledger);
        assert!(handler.handle(message.clone()).await.is_ok());
        assert_eq!(claim_of(&store, &message).await, Some(Claim::AlreadyDone));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_dropped_half_way_releases_its_claim() {
        let store = store(InMemoryDedupConfig::default());
        let never = handler_fn(|_message: Message| futures::future::pending());
        let handler = wrap(&Deduplicator::new(store.clone()), never);
        let message = Message::new("x");
        let result =
            tokio::time::timeout(Duration::from_secs(1), handler.handle(message.clone())).await;
        assert!(result.is_err(), "still running when dropped");
        settle_tasks().await;
        assert_eq!(claim_of(&store, &message).await, Some(Claim::New));
    }

    /// A store that fails the operations it is told to.
    #[derive(Default)]
    struct FailingStore {
        inner: InMemoryDedupStore,
        fail_begin: bool,
        fail_complete: bool,
        releases: AtomicUsize,
    }

    #[async_trait]
    impl DedupStore for FailingStore {
        async fn begin(&self, scope: &str, key: &str) -> Result<Claim, BoxError> {
            if self.fail_begin {
                return Err("connection refused".into());
            }
            self.inner.begin(scope, key).await
        }
        async fn complete(&self, scope: &str, key: &str) -> Result<(), BoxError> {
            if self.fail_complete {
                return Err("connection reset".into());
            }
            self.inner.complete(scope, key).await
        }
        async fn release(&self, scope: &str, key: &str) -> Result<(), BoxError> {
            self.releases.fetch_add(1, Ordering::SeqCst);
            self.inner.release(scope, key).await
        }
    }

    #[tokio::test]
    async fn store_errors_are_transient_handler_errors() {
        let calls = Calls::succeeding();
        let failing_begin = Arc::new(FailingStore {
            fail_begin: true,
            ..FailingStore::default()
        });
        let handler = wrap(&Deduplicator::new(failing_begin), calls.handler());
        let error = handler.handle(Message::new("x")).await.err();
        assert_eq!(
            error.as_ref().map(HandlerError::kind),
            Some(HandlerErrorKind::Transient)
        );
        assert_eq!(
            error.map(|e| e.to_string()).as_deref(),
            Some("handler failed: deduplication store failed to begin: connection refused")
        );
        assert_eq!(calls.count(), 0, "not handled without a claim");

        let failing_complete = Arc::new(FailingStore {
            fail_complete: true,
            ..FailingStore::default()
        });
        let handler = wrap(
            &Deduplicator::new(failing_complete.clone()),
            calls.handler(),
        );
        let message = Message::with_id(MessageId::new_v7(), "x");
        let error = handler.handle(message.clone()).await.err();
        let operation = error.as_ref().and_then(|e| {
            e.source_error()
                .downcast_ref::<DedupStoreError>()
                .map(DedupStoreError::operation)
        });
        assert_eq!(operation, Some("complete"));
        assert_eq!(failing_complete.releases.load(Ordering::SeqCst), 1);
        assert!(
            failing_complete.inner.is_empty(),
            "released for the redelivery"
        );
    }
}
