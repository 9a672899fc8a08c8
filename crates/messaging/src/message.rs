//! The message: an id, string metadata and a payload, plus the delivery it arrived with.
//!
//! A [`Message`] that came from a [`Subscriber`](crate::Subscriber) carries a *delivery*: the
//! handle through which it is acknowledged ([`Message::ack`]) or refused ([`Message::nack`]).
//! Settling is idempotent and the first call wins; the subscriber that produced the message
//! learns the outcome through its [`Acknowledger`], and anyone holding the message can wait for
//! it ([`Message::settled`]). A delivery dropped unsettled (the message and all its clones
//! dropped without ack or nack) is reported to the subscriber as [`Outcome::Dropped`], which
//! every backend treats like a nack: nothing received is ever silently considered handled.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use uuid::Uuid;

/// A message id: a UUID (the default, v7) or any other non-empty text a broker uses.
///
/// Ids compare by their text form, so an id parsed from a canonical UUID string equals the
/// UUID it spells.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(IdRepr);

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum IdRepr {
    /// Canonical lower-case hyphenated UUID text; kept as the UUID to avoid an allocation.
    Uuid(Uuid),
    /// Anything else.
    Text(Arc<str>),
}

impl MessageId {
    /// A new time-ordered id (UUID v7).
    pub fn new_v7() -> Self {
        Self(IdRepr::Uuid(Uuid::now_v7()))
    }

    /// The id for a UUID.
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(IdRepr::Uuid(uuid))
    }

    /// The id spelled by `text`; an empty text is refused.
    pub fn parse(text: &str) -> Result<Self, InvalidMessageId> {
        if text.is_empty() {
            return Err(InvalidMessageId::Empty);
        }
        if text.len() > MESSAGE_ID_BYTES_MAX {
            return Err(InvalidMessageId::TooLong {
                size_bytes: text.len(),
                size_bytes_max: MESSAGE_ID_BYTES_MAX,
            });
        }
        // Only the canonical spelling maps to the UUID form, so that equality by text holds.
        if text.len() == 36
            && let Ok(uuid) = Uuid::try_parse(text)
            && uuid.hyphenated().encode_lower(&mut Uuid::encode_buffer()) == text
        {
            return Ok(Self(IdRepr::Uuid(uuid)));
        }
        Ok(Self(IdRepr::Text(Arc::from(text))))
    }

    /// The UUID, when the id is one.
    pub fn as_uuid(&self) -> Option<Uuid> {
        match &self.0 {
            IdRepr::Uuid(uuid) => Some(*uuid),
            IdRepr::Text(_) => None,
        }
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        self.to_string()
    }
}

/// Longest message id accepted, in bytes.
pub const MESSAGE_ID_BYTES_MAX: usize = 255;

/// Why a text is not a message id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessageId {
    /// The id was empty.
    #[error("a message id must not be empty")]
    Empty,
    /// The id was longer than [`MESSAGE_ID_BYTES_MAX`].
    #[error("a message id of {size_bytes} bytes exceeds the limit of {size_bytes_max} bytes")]
    TooLong {
        /// The id's length.
        size_bytes: usize,
        /// The limit.
        size_bytes_max: usize,
    },
}

impl FromStr for MessageId {
    type Err = InvalidMessageId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<Uuid> for MessageId {
    fn from(uuid: Uuid) -> Self {
        Self::from_uuid(uuid)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            IdRepr::Uuid(uuid) => fmt::Display::fmt(&uuid.hyphenated(), f),
            IdRepr::Text(text) => f.write_str(text),
        }
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl serde::Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// String metadata of a message. Cloning is cheap (shared until written).
#[derive(Clone, Default)]
pub struct Metadata(Option<Arc<BTreeMap<String, String>>>);

/// Equal when the entries are, however the metadata was built.
impl PartialEq for Metadata {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Metadata {}

impl Metadata {
    /// The id tying together everything caused by one original request.
    pub const CORRELATION_ID: &'static str = "correlation_id";
    /// The id of the message that directly caused this one.
    pub const CAUSATION_ID: &'static str = "causation_id";
    /// The ordering key: messages with the same key are handled in order (a stream id, an
    /// aggregate id). Adapters map it to the broker's key (Kafka message key, …).
    pub const PARTITION_KEY: &'static str = "partition_key";
    /// The type name of the payload (CQRS buses: the command or event type).
    pub const MESSAGE_TYPE: &'static str = "message_type";
    /// The payload's content type, e.g. `application/json`.
    pub const CONTENT_TYPE: &'static str = "content_type";

    /// Empty metadata (allocates nothing).
    pub fn new() -> Self {
        Self(None)
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.as_ref()?.get(key).map(String::as_str)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `value`, returning the previous value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String> {
        Arc::make_mut(self.0.get_or_insert_with(Default::default)).insert(key.into(), value.into())
    }

    /// Builder form of [`Metadata::insert`].
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.insert(key, value);
        self
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let map = self.0.as_mut()?;
        if !map.contains_key(key) {
            return None;
        }
        let removed = Arc::make_mut(map).remove(key);
        if map.is_empty() {
            self.0 = None;
        }
        removed
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |map| map.len())
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .flat_map(|map| map.iter())
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The sum of the byte lengths of all keys and values.
    pub fn size_bytes(&self) -> usize {
        self.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let map: BTreeMap<String, String> = iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        if map.is_empty() {
            Self(None)
        } else {
            Self(Some(Arc::new(map)))
        }
    }
}

impl serde::Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for Metadata {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(deserializer)?;
        Ok(map.into_iter().collect())
    }
}

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Handled: the broker may forget it (commit the offset, XACK, …).
    Acked,
    /// Refused: deliver it again, after `delay` when one is given.
    Nacked {
        /// Wait at least this long before redelivering.
        delay: Option<Duration>,
    },
    /// Dropped without ack or nack (a handler task aborted, a subscriber closed with the
    /// message in flight). Backends treat it as a nack without delay.
    Dropped,
}

impl Outcome {
    /// Whether the message must be delivered again.
    pub fn redelivers(self) -> bool {
        !matches!(self, Self::Acked)
    }
}

/// The subscriber's side of a delivery: told once, when the delivery is settled.
///
/// Implementations keep whatever they need to settle on the broker (a delivery tag, an offset,
/// the broker's own message handle). `settled` runs on the thread that acked, so it must not
/// block: hand slow work (network acks) to a task.
pub trait Acknowledger: Send + Sync + 'static {
    /// The delivery was settled with `outcome`. Called exactly once per delivery.
    fn settled(&self, outcome: Outcome);
}

const PENDING: u8 = 0;
const ACKED: u8 = 1;
const NACKED: u8 = 2;
const DROPPED: u8 = 3;
/// Set while somebody waits in [`Message::settled`].
const WAITING: u8 = 0b1000_0000;
/// `nack_delay_ms` before the winning nack wrote it.
const NACK_DELAY_UNWRITTEN: u64 = u64::MAX;
/// `nack_delay_ms` of a nack without delay.
const NACK_NO_DELAY: u64 = u64::MAX - 1;
/// Longest nack delay kept, in ms (longer ones are clamped).
const NACK_DELAY_MS_MAX: u64 = u64::MAX - 2;

struct Delivery<A: ?Sized + Acknowledger> {
    state: AtomicU8,
    /// Only read when `state` is `NACKED`; written once before that.
    nack_delay_ms: std::sync::atomic::AtomicU64,
    settled: Notify,
    acknowledger: A,
}

impl<A: ?Sized + Acknowledger> Delivery<A> {
    /// Moves from pending to `to`; true when this call did it.
    fn settle(&self, to: u8, delay: Option<Duration>) -> bool {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            if current & !WAITING != PENDING {
                return false;
            }
            match self.state.compare_exchange_weak(
                current,
                to | (current & WAITING),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        // Only the winner writes the delay, right after winning; readers that see NACKED
        // before the write wait for it (`outcome_of`).
        let outcome = match to {
            ACKED => Outcome::Acked,
            NACKED => {
                let delay_ms = delay.map_or(NACK_NO_DELAY, |d| {
                    u64::try_from(d.as_millis())
                        .map_or(NACK_DELAY_MS_MAX, |ms| ms.min(NACK_DELAY_MS_MAX))
                });
                self.nack_delay_ms.store(delay_ms, Ordering::Release);
                Outcome::Nacked { delay }
            }
            _ => Outcome::Dropped,
        };
        self.acknowledger.settled(outcome);
        if current & WAITING != 0 {
            self.settled.notify_waiters();
        }
        true
    }

    fn outcome_of(&self, state: u8) -> Outcome {
        match state & !WAITING {
            ACKED => Outcome::Acked,
            NACKED => {
                let mut delay_ms = self.nack_delay_ms.load(Ordering::Acquire);
                while delay_ms == NACK_DELAY_UNWRITTEN {
                    // The winner is between its state change and this write: a few instructions.
                    std::hint::spin_loop();
                    delay_ms = self.nack_delay_ms.load(Ordering::Acquire);
                }
                Outcome::Nacked {
                    delay: (delay_ms != NACK_NO_DELAY).then(|| Duration::from_millis(delay_ms)),
                }
            }
            _ => Outcome::Dropped,
        }
    }

    fn outcome(&self) -> Option<Outcome> {
        let state = self.state.load(Ordering::Acquire);
        (state & !WAITING != PENDING).then(|| self.outcome_of(state))
    }
}

impl<A: ?Sized + Acknowledger> Drop for Delivery<A> {
    fn drop(&mut self) {
        if *self.state.get_mut() & !WAITING == PENDING {
            *self.state.get_mut() = DROPPED;
            self.acknowledger.settled(Outcome::Dropped);
        }
    }
}

/// An acknowledger that does nothing: for messages whose outcome only the holder observes.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopAcknowledger;

impl Acknowledger for NoopAcknowledger {
    fn settled(&self, _outcome: Outcome) {}
}

/// A message: id, metadata, payload, and (when received) the delivery to settle.
///
/// Clones share the delivery: acking any clone settles them all. A message built with
/// [`Message::new`] has no delivery; [`Message::ack`] on it returns `false`. Publishers read only
/// the id, metadata and payload.
#[derive(Clone)]
pub struct Message {
    /// Unique per message; consumers deduplicate by it.
    pub id: MessageId,
    /// String metadata (correlation ids, the partition key, the type name…).
    pub metadata: Metadata,
    /// The body.
    pub payload: Bytes,
    delivery: Option<Arc<Delivery<dyn Acknowledger>>>,
}

impl Message {
    /// A message with a new v7 id and no metadata.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self::with_id(MessageId::new_v7(), payload)
    }

    /// A message with the given id and no metadata.
    pub fn with_id(id: MessageId, payload: impl Into<Bytes>) -> Self {
        Self {
            id,
            metadata: Metadata::new(),
            payload: payload.into(),
            delivery: None,
        }
    }

    /// Builder: sets a metadata entry.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// The same id, metadata and payload, attached to a new delivery that reports to
    /// `acknowledger`. Backends call this for every message they hand out.
    pub fn delivered<A: Acknowledger>(self, acknowledger: A) -> Self {
        let delivery: Arc<Delivery<dyn Acknowledger>> = Arc::new(Delivery {
            state: AtomicU8::new(PENDING),
            nack_delay_ms: std::sync::atomic::AtomicU64::new(NACK_DELAY_UNWRITTEN),
            settled: Notify::new(),
            acknowledger,
        });
        Self {
            delivery: Some(delivery),
            ..self
        }
    }

    /// A copy without the delivery: for republishing (poison queue, forwarding) or keeping.
    pub fn detached(&self) -> Self {
        Self {
            id: self.id.clone(),
            metadata: self.metadata.clone(),
            payload: self.payload.clone(),
            delivery: None,
        }
    }

    /// Whether the message has a delivery to settle.
    pub fn has_delivery(&self) -> bool {
        self.delivery.is_some()
    }

    /// Acknowledges: handled, the broker may forget it. Returns whether this call settled the
    /// delivery (false when it was already settled, or when there is no delivery).
    pub fn ack(&self) -> bool {
        self.delivery
            .as_ref()
            .is_some_and(|delivery| delivery.settle(ACKED, None))
    }

    /// Refuses: deliver again. Returns whether this call settled the delivery.
    pub fn nack(&self) -> bool {
        self.delivery
            .as_ref()
            .is_some_and(|delivery| delivery.settle(NACKED, None))
    }

    /// Refuses and asks for redelivery no sooner than `delay` from now.
    pub fn nack_with_delay(&self, delay: Duration) -> bool {
        self.delivery
            .as_ref()
            .is_some_and(|delivery| delivery.settle(NACKED, Some(delay)))
    }

    /// The outcome, once settled; `None` while pending or without a delivery.
    pub fn outcome(&self) -> Option<Outcome> {
        self.delivery
            .as_ref()
            .and_then(|delivery| delivery.outcome())
    }

    /// Waits until the delivery is settled (returns at once when it is, or when there is no
    /// delivery: `None`).
    pub async fn settled(&self) -> Option<Outcome> {
        let delivery = self.delivery.as_ref()?;
        loop {
            let notified = delivery.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let state = delivery.state.fetch_or(WAITING, Ordering::AcqRel);
            if state & !WAITING != PENDING {
                return Some(delivery.outcome_of(state));
            }
            notified.await;
            if let Some(outcome) = delivery.outcome() {
                return Some(outcome);
            }
        }
    }

    /// The correlation id, when set.
    pub fn correlation_id(&self) -> Option<&str> {
        self.metadata.get(Metadata::CORRELATION_ID)
    }

    /// The partition key, when set.
    pub fn partition_key(&self) -> Option<&str> {
        self.metadata.get(Metadata::PARTITION_KEY)
    }

    /// Bytes this message occupies on the wire, roughly: payload, id and metadata.
    pub fn size_bytes(&self) -> usize {
        self.payload.len() + 36 + self.metadata.size_bytes()
    }

    /// Whether two messages have the same id, metadata and payload (deliveries ignored).
    pub fn same_content(&self, other: &Message) -> bool {
        self.id == other.id && self.metadata == other.metadata && self.payload == other.payload
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("metadata", &self.metadata)
            .field("payload_bytes", &self.payload.len())
            .field("outcome", &self.outcome())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<Outcome>>>);
    impl Acknowledger for Recorder {
        fn settled(&self, outcome: Outcome) {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(outcome);
        }
    }
    impl Recorder {
        fn seen(&self) -> Vec<Outcome> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
    }

    #[test]
    fn first_settlement_wins_and_reaches_the_acknowledger_once() {
        let recorder = Recorder::default();
        let message = Message::new("x").delivered(recorder.clone());
        let copy = message.clone();
        assert!(message.ack());
        assert!(!copy.nack());
        assert!(!message.ack());
        assert_eq!(copy.outcome(), Some(Outcome::Acked));
        assert_eq!(recorder.seen(), vec![Outcome::Acked]);
    }

    #[test]
    fn nack_delay_is_reported() {
        let recorder = Recorder::default();
        let message = Message::new("x").delivered(recorder.clone());
        assert!(message.nack_with_delay(Duration::from_millis(250)));
        assert!(!message.ack());
        assert_eq!(
            recorder.seen(),
            vec![Outcome::Nacked {
                delay: Some(Duration::from_millis(250))
            }]
        );
    }

    #[test]
    fn dropping_unsettled_reports_dropped_and_settled_drops_report_nothing_more() {
        let recorder = Recorder::default();
        let message = Message::new("x").delivered(recorder.clone());
        let copy = message.clone();
        drop(message);
        assert!(
            recorder.seen().is_empty(),
            "a clone still holds the delivery"
        );
        drop(copy);
        assert_eq!(recorder.seen(), vec![Outcome::Dropped]);

        let acked = Message::new("y").delivered(recorder.clone());
        acked.ack();
        drop(acked);
        assert_eq!(recorder.seen(), vec![Outcome::Dropped, Outcome::Acked]);
    }

    #[test]
    fn a_message_without_delivery_cannot_be_settled() {
        let message = Message::new("x");
        assert!(!message.ack());
        assert!(!message.nack());
        assert_eq!(message.outcome(), None);
    }

    #[tokio::test]
    async fn settled_wakes_a_waiter() {
        let message = Message::new("x").delivered(NoopAcknowledger);
        let waiter = {
            let message = message.clone();
            tokio::spawn(async move { message.settled().await })
        };
        tokio::task::yield_now().await;
        message.nack();
        let outcome = waiter.await.ok().flatten();
        assert_eq!(outcome, Some(Outcome::Nacked { delay: None }));
        // Already settled: returns at once.
        assert_eq!(
            message.settled().await,
            Some(Outcome::Nacked { delay: None })
        );
    }

    #[test]
    fn ids_compare_by_text() {
        let uuid = Uuid::now_v7();
        let parsed = MessageId::parse(&uuid.to_string()).unwrap_or_else(|_| MessageId::new_v7());
        assert_eq!(parsed, MessageId::from_uuid(uuid));
        let upper = MessageId::parse(&uuid.to_string().to_uppercase());
        assert!(matches!(upper, Ok(ref id) if id.as_uuid().is_none()));
        assert_eq!(MessageId::parse(""), Err(InvalidMessageId::Empty));
        assert!(matches!(
            MessageId::parse(&"x".repeat(256)),
            Err(InvalidMessageId::TooLong {
                size_bytes: 256,
                ..
            })
        ));
        assert_eq!(
            MessageId::parse("offset-7")
                .map(|id| id.to_string())
                .ok()
                .as_deref(),
            Some("offset-7")
        );
    }

    #[test]
    fn metadata_is_shared_until_written() {
        let original = Metadata::new().with("a", "1");
        let mut copy = original.clone();
        copy.insert("b", "2");
        assert_eq!(original.len(), 1);
        assert_eq!(copy.get("b"), Some("2"));
        assert_eq!(copy.remove("a").as_deref(), Some("1"));
        assert_eq!(original.get("a"), Some("1"));
        assert!(Metadata::new().is_empty());
    }

    #[test]
    fn metadata_equality_ignores_how_it_was_built() {
        let mut emptied = Metadata::new().with("a", "1");
        emptied.remove("a");
        assert_eq!(emptied, Metadata::new());
        assert!(emptied.is_empty());
        let built: Metadata = [("a", "1")].into_iter().collect();
        assert_eq!(built, Metadata::new().with("a", "1"));
    }

    #[test]
    fn concurrent_nacks_report_the_winners_delay() {
        for _ in 0..200 {
            let recorder = Recorder::default();
            let message = Message::new("x").delivered(recorder.clone());
            let other = message.clone();
            let racer = std::thread::spawn(move || other.nack());
            let won = message.nack_with_delay(Duration::from_secs(5));
            let racer_won = racer.join().unwrap_or(false);
            assert!(won != racer_won, "exactly one nack wins");
            let expected = if won {
                Some(Duration::from_secs(5))
            } else {
                None
            };
            assert_eq!(recorder.seen(), vec![Outcome::Nacked { delay: expected }]);
            assert_eq!(message.outcome(), Some(Outcome::Nacked { delay: expected }));
        }
    }
}
