//! Subscriptions: one MQTT connection (client id, session) each, manual PUBACKs, nacks
//! redelivered locally.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use factline_messaging::{
    Acknowledger, CloseError, Message, MessageStream, Outcome, ReceiveError, SubscribeError,
    Subscriber,
};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::connection::{ConnectionKind, failure, first_connect, options};
use crate::{ConnectError, Shared, codec, millis};

/// Subscribes to topics; see [`MqttPubSub::subscriber`](crate::MqttPubSub::subscriber) and
/// [`MqttPubSub::subscriber_with_session`](crate::MqttPubSub::subscriber_with_session).
pub struct MqttSubscriber {
    shared: Arc<Shared>,
    session: Option<String>,
    closed: CancellationToken,
    subscriptions: Mutex<Vec<(Arc<SubscriptionShared>, tokio::task::JoinHandle<()>)>>,
}

impl std::fmt::Debug for MqttSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSubscriber")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl MqttSubscriber {
    pub(crate) fn new(shared: Arc<Shared>, session: Option<String>) -> Self {
        Self {
            shared,
            session,
            closed: CancellationToken::new(),
            subscriptions: Mutex::new(Vec::new()),
        }
    }

    fn client_id(&self, topic_name: &str) -> String {
        let prefix = &self.shared.config.client_id_prefix;
        match &self.session {
            Some(name) => format!("{prefix}{name}-{:016x}", fnv1a(topic_name.as_bytes())),
            None => format!("{prefix}s-{}", uuid::Uuid::new_v4().simple()),
        }
    }
}

/// FNV-1a, 64 bits: a stable hash of a topic name for a lasting session's client id.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

type Item = Result<Message, ReceiveError>;

/// What a subscription's driver, its stream and its deliveries share.
struct SubscriptionShared {
    client: AsyncClient,
    topic_name: String,
    /// A lasting session: kept (not unsubscribed) when the subscription ends.
    lasting: bool,
    /// Which delivery holds each packet id the broker has not had a PUBACK for. The broker
    /// uses a packet id again only after its PUBACK, and sends an unacknowledged message
    /// again (same id) after a reconnect: a delivery that no longer holds its packet id must
    /// not send a PUBACK for it.
    holders: Mutex<HashMap<u16, u64>>,
    next_delivery: AtomicU64,
    items: mpsc::UnboundedSender<Item>,
    /// The subscription ended (closed, or its stream dropped).
    ended: CancellationToken,
    /// The unsubscribe and disconnect were handed to the client.
    disconnecting: AtomicBool,
}

impl SubscriptionShared {
    /// Ends the subscription: the stream ends, the connection unsubscribes (unless the session
    /// lasts) and disconnects after the acks already handed to it.
    fn end(&self) {
        self.ended.cancel();
        if self.disconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        if !self.lasting {
            let _ = self.client.try_unsubscribe(self.topic_name.clone());
        }
        let _ = self.client.try_disconnect();
    }

    fn deliver(self: &Arc<Self>, message: Message, pkid: Option<u16>, delivery: u64) {
        let acker = MqttAcker {
            subscription: Arc::clone(self),
            message: message.clone(),
            pkid,
            delivery,
        };
        // A closed stream drops the message: unsettled, it stays with the broker's session.
        let _ = self.items.send(Ok(message.delivered(acker)));
    }
}

/// The delivery of one received PUBLISH.
struct MqttAcker {
    subscription: Arc<SubscriptionShared>,
    /// The message, for a redelivery.
    message: Message,
    /// The packet id to acknowledge (`None` for a QoS 0 publish: nothing to acknowledge).
    pkid: Option<u16>,
    delivery: u64,
}

impl MqttAcker {
    fn holds(&self) -> bool {
        match self.pkid {
            None => true,
            Some(pkid) => self
                .subscription
                .holders
                .lock()
                .map(|holders| holders.get(&pkid) == Some(&self.delivery))
                .unwrap_or(false),
        }
    }
}

impl Acknowledger for MqttAcker {
    fn settled(&self, outcome: Outcome) {
        let subscription = &self.subscription;
        match outcome {
            Outcome::Acked => {
                let Some(pkid) = self.pkid else { return };
                let held = subscription
                    .holders
                    .lock()
                    .map(|mut holders| {
                        if holders.get(&pkid) == Some(&self.delivery) {
                            holders.remove(&pkid);
                            true
                        } else {
                            false
                        }
                    })
                    .unwrap_or(false);
                if !held {
                    // The broker sent this message again: the newer delivery acknowledges.
                    return;
                }
                // `try_ack` reads only the QoS and the packet id.
                let puback = Publish {
                    qos: QoS::AtLeastOnce,
                    pkid,
                    ..Publish::default()
                };
                if let Err(error) = subscription.client.try_ack(&puback) {
                    // Only when the request channel is full or gone; the broker then sends
                    // the message again (after a reconnect).
                    tracing::warn!(%error, pkid, "an MQTT acknowledgement could not be queued");
                }
            }
            Outcome::Nacked { delay } => self.redeliver(delay),
            Outcome::Dropped => self.redeliver(None),
            _ => self.redeliver(None),
        }
    }
}

impl MqttAcker {
    /// MQTT has no nack: the message stays unacknowledged at the broker (it counts against the
    /// receive maximum, and comes again after a reconnect), and is handed to the same
    /// subscription again once `delay` has passed.
    fn redeliver(&self, delay: Option<Duration>) {
        let subscription = Arc::clone(&self.subscription);
        if subscription.ended.is_cancelled() || !self.holds() {
            return;
        }
        let (message, pkid, delivery) = (self.message.clone(), self.pkid, self.delivery);
        match delay.filter(|delay| !delay.is_zero()) {
            None => subscription.deliver(message, pkid, delivery),
            Some(delay) => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    subscription.deliver(message, pkid, delivery);
                    return;
                };
                runtime.spawn(async move {
                    tokio::select! {
                        () = subscription.ended.cancelled() => {}
                        () = tokio::time::sleep(delay) => {
                            let holds = pkid.is_none_or(|pkid| {
                                subscription.holders.lock()
                                    .map(|holders| holders.get(&pkid) == Some(&delivery))
                                    .unwrap_or(false)
                            });
                            if holds {
                                subscription.deliver(message, pkid, delivery);
                            }
                        }
                    }
                });
            }
        }
    }
}

/// Ends its subscription when the stream is dropped.
struct EndOnDrop(Arc<SubscriptionShared>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end();
    }
}

#[async_trait]
impl Subscriber for MqttSubscriber {
    async fn subscribe(&self, topic: &str) -> Result<MessageStream, SubscribeError> {
        if self.closed.is_cancelled() {
            return Err(SubscribeError::Closed);
        }
        let config = &self.shared.config;
        let topic_name = codec::topic_name(&config.topic_prefix, topic)?;
        let client_id = self.client_id(&topic_name);
        let kind = ConnectionKind {
            client_id: client_id.clone(),
            clean_start: self.session.is_none(),
            receive_max: Some(u16::try_from(config.in_flight_max).unwrap_or(u16::MAX)),
            outgoing_in_flight_max: 8,
        };
        let options = options(config, &self.shared.endpoint, &kind);
        // Room for an ack per message in flight, a subscribe, an unsubscribe and a disconnect.
        let (client, mut eventloop) = AsyncClient::new(options, config.in_flight_max + 16);
        let subscribing = async {
            let connack = first_connect(&mut eventloop, config, &self.shared.endpoint)
                .await
                .map_err(|error| match error {
                    ConnectError::TimedOut { timeout_ms, .. } => failure(format!(
                        "no CONNACK from the MQTT broker within {timeout_ms} ms"
                    )),
                    other => Box::new(other),
                })?;
            client
                .try_subscribe(topic_name.clone(), QoS::AtLeastOnce)
                .map_err(|error| -> factline_messaging::BoxError { Box::new(error) })?;
            Ok::<_, factline_messaging::BoxError>(connack)
        };
        let connack = subscribing.await.map_err(SubscribeError::Transport)?;
        let (items, received) = mpsc::unbounded_channel();
        let subscription = Arc::new(SubscriptionShared {
            client,
            topic_name: topic_name.clone(),
            lasting: self.session.is_some(),
            holders: Mutex::new(HashMap::new()),
            next_delivery: AtomicU64::new(0),
            items,
            ended: self.closed.child_token(),
            disconnecting: AtomicBool::new(false),
        });
        let (ready, subscribed) = oneshot::channel();
        let driver = tokio::spawn(drive(
            Arc::clone(&subscription),
            eventloop,
            Some(ready),
            config.reconnect_delay,
        ));
        tracing::debug!(topic = %topic_name, %client_id, session_present = connack.session_present, "MQTT subscription connecting");
        let outcome = tokio::time::timeout(config.connect_timeout, subscribed).await;
        let failed = match outcome {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(reason))) => Some(reason),
            Ok(Err(_)) => Some("the subscription's connection ended before its SUBACK".to_owned()),
            Err(_) => Some(format!(
                "no SUBACK from the MQTT broker within {} ms",
                millis(config.connect_timeout)
            )),
        };
        if let Some(reason) = failed {
            subscription.end();
            driver.abort();
            return Err(SubscribeError::Transport(failure(reason)));
        }
        if let Ok(mut subscriptions) = self.subscriptions.lock() {
            subscriptions.retain(|(_, driver)| !driver.is_finished());
            subscriptions.push((Arc::clone(&subscription), driver));
        }
        if self.closed.is_cancelled() {
            subscription.end();
        }
        let guard = EndOnDrop(subscription);
        Ok(MessageStream::new(futures::stream::unfold(
            (guard, received),
            |(guard, mut received)| async move {
                if guard.0.ended.is_cancelled() {
                    return None;
                }
                let item = match received.try_recv() {
                    Ok(item) => item,
                    Err(mpsc::error::TryRecvError::Disconnected) => return None,
                    Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                        biased;
                        () = guard.0.ended.cancelled() => None,
                        item = received.recv() => item,
                    }?,
                };
                Some((item, (guard, received)))
            },
        )))
    }

    async fn close(&self) -> Result<(), CloseError> {
        self.closed.cancel();
        let subscriptions: Vec<_> = self
            .subscriptions
            .lock()
            .map(|mut subscriptions| subscriptions.drain(..).collect())
            .unwrap_or_default();
        let timeout = self.shared.config.close_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending = 0usize;
        for (subscription, driver) in subscriptions {
            subscription.end();
            let abort = driver.abort_handle();
            if tokio::time::timeout_at(deadline, driver).await.is_err() {
                abort.abort();
                pending += 1;
            }
        }
        if pending > 0 {
            return Err(CloseError::TimedOut {
                timeout_ms: millis(timeout),
                pending,
            });
        }
        Ok(())
    }
}

/// Runs a subscription's connection: hands every PUBLISH to the stream with a delivery,
/// resubscribes when a reconnect finds the session gone, ends after the disconnect.
async fn drive(
    subscription: Arc<SubscriptionShared>,
    mut eventloop: EventLoop,
    mut ready: Option<oneshot::Sender<Result<(), String>>>,
    reconnect_delay: Duration,
) {
    let mut outage = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let message = codec::to_message(&publish);
                let delivery = subscription.next_delivery.fetch_add(1, Ordering::Relaxed);
                let pkid = (publish.qos != QoS::AtMostOnce).then_some(publish.pkid);
                if let Some(pkid) = pkid
                    && let Ok(mut holders) = subscription.holders.lock()
                {
                    holders.insert(pkid, delivery);
                }
                subscription.deliver(message, pkid, delivery);
            }
            Ok(Event::Incoming(Packet::SubAck(suback))) => {
                let refused = suback
                    .return_codes
                    .iter()
                    .find(|code| !matches!(code, SubscribeReasonCode::Success(_)));
                let result = match refused {
                    None => Ok(()),
                    Some(code) => Err(format!("the broker refused the subscription: {code:?}")),
                };
                match ready.take() {
                    Some(ready) => {
                        let _ = ready.send(result);
                    }
                    None => {
                        if let Err(reason) = result {
                            tracing::warn!(topic = %subscription.topic_name, %reason, "MQTT resubscribe refused");
                            let _ = subscription
                                .items
                                .send(Err(ReceiveError::Transport(failure(reason))));
                        }
                    }
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                outage = false;
                tracing::info!(topic = %subscription.topic_name, session_present = connack.session_present, "MQTT subscription reconnected");
                if !connack.session_present && !subscription.ended.is_cancelled() {
                    // The broker lost the session (and what was queued in it): subscribe again.
                    if let Ok(mut holders) = subscription.holders.lock() {
                        holders.clear();
                    }
                    if let Err(error) = subscription
                        .client
                        .try_subscribe(subscription.topic_name.clone(), QoS::AtLeastOnce)
                    {
                        tracing::warn!(%error, "MQTT resubscribe could not be queued");
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(Event::Incoming(Packet::Disconnect(disconnect))) => {
                tracing::warn!(topic = %subscription.topic_name, reason = ?disconnect.reason_code, "the MQTT broker disconnected a subscription");
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(error) => {
                if subscription.ended.is_cancelled() {
                    return;
                }
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(format!(
                        "the subscription's connection failed: {error}"
                    )));
                    return;
                }
                if !outage {
                    tracing::warn!(topic = %subscription.topic_name, %error, "MQTT subscription connection lost; reconnecting");
                    let _ = subscription
                        .items
                        .send(Err(ReceiveError::Transport(Box::new(error))));
                }
                outage = true;
                tokio::time::sleep(reconnect_delay).await;
            }
        }
    }
}
