//! Connections: the options every connection shares, the first connect (typed errors within
//! the connect timeout), and the publishing connection, which matches every QoS 1 publish to
//! its PUBACK.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use factline_messaging::{BoxError, PublishError};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnAck, Packet, PubAckReason, PublishProperties};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{NetworkOptions, Outgoing};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::{ConnectError, Endpoint, MqttConfig, millis};

/// What differs between connections.
pub(crate) struct ConnectionKind {
    pub(crate) client_id: String,
    /// Start with a fresh session (the first connect only; reconnects resume it).
    pub(crate) clean_start: bool,
    /// Manual acks and a receive maximum: a subscription's connection.
    pub(crate) receive_max: Option<u16>,
    /// Outgoing publishes in flight (the broker's receive maximum lowers it).
    pub(crate) outgoing_in_flight_max: u16,
}

pub(crate) fn options(
    config: &MqttConfig,
    endpoint: &Endpoint,
    kind: &ConnectionKind,
) -> MqttOptions {
    let mut options =
        MqttOptions::new(kind.client_id.clone(), endpoint.host.clone(), endpoint.port);
    options
        .set_keep_alive(config.keep_alive)
        .set_clean_start(kind.clean_start)
        // Whole seconds, rounded up: the connect timeout proper is ours (`first_connect`).
        .set_connection_timeout(config.connect_timeout.as_secs_f64().ceil().max(1.0) as u64)
        .set_session_expiry_interval(Some(
            u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX - 1),
        ))
        .set_max_packet_size(Some(
            u32::try_from(config.packet_bytes_max()).unwrap_or(u32::MAX),
        ))
        .set_outgoing_inflight_upper_limit(kind.outgoing_in_flight_max.max(1));
    if let Some(receive_max) = kind.receive_max {
        options
            .set_manual_acks(true)
            .set_receive_maximum(Some(receive_max));
    }
    if let Some((user, password)) = &endpoint.credentials {
        options.set_credentials(user.clone(), password.clone());
    }
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    options
}

/// Polls `eventloop` until the broker's CONNACK, within the connect timeout.
pub(crate) async fn first_connect(
    eventloop: &mut EventLoop,
    config: &MqttConfig,
    endpoint: &Endpoint,
) -> Result<ConnAck, ConnectError> {
    let connect = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(connack))) => return Ok(connack),
                Ok(_) => {}
                Err(ConnectionError::Timeout(_)) => {
                    return Err(ConnectError::TimedOut {
                        url: endpoint.shown.clone(),
                        timeout_ms: millis(config.connect_timeout),
                    });
                }
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Err(ConnectError::Refused {
                        url: endpoint.shown.clone(),
                        reason: format!("{code:?}"),
                    });
                }
                Err(error) => {
                    return Err(ConnectError::Connect {
                        url: endpoint.shown.clone(),
                        source: Box::new(error),
                    });
                }
            }
        }
    };
    let connack = tokio::time::timeout(config.connect_timeout, connect)
        .await
        .map_err(|_| ConnectError::TimedOut {
            url: endpoint.shown.clone(),
            timeout_ms: millis(config.connect_timeout),
        })??;
    // Reconnects resume the session this connect made or found.
    eventloop.options.set_clean_start(false);
    Ok(connack)
}

/// A transport failure with a message of ours.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Failure(pub(crate) String);

pub(crate) fn failure(text: impl Into<String>) -> BoxError {
    Box::new(Failure(text.into()))
}

/// The messages of one publish call: done when the last PUBACK came, failed at the first
/// refusal.
struct Batch {
    remaining: AtomicUsize,
    done: Mutex<Option<oneshot::Sender<Result<(), String>>>>,
}

impl Batch {
    fn finish(&self, result: Result<(), String>) {
        if let Ok(mut done) = self.done.lock()
            && let Some(done) = done.take()
        {
            let _ = done.send(result);
        }
    }

    fn confirmed(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish(Ok(()));
        }
    }
}

/// A publish handed to the client, until its PUBACK.
struct Slot {
    batch: Arc<Batch>,
    _permit: OwnedSemaphorePermit,
}

struct PublishState {
    client: AsyncClient,
    /// Handed to the client, in order, not yet written (no packet id yet).
    queued: VecDeque<Slot>,
    /// Written, by packet id, awaiting the PUBACK.
    in_flight: HashMap<u16, Slot>,
}

impl PublishState {
    fn fail_all(&mut self, reason: &str) {
        for slot in self
            .queued
            .drain(..)
            .chain(self.in_flight.drain().map(|(_, s)| s))
        {
            slot.batch.finish(Err(reason.to_owned()));
        }
    }
}

struct PublishShared {
    state: Mutex<PublishState>,
    permits: Arc<Semaphore>,
    /// The largest packet to send: ours, lowered by the broker's maximum packet size.
    packet_bytes_max: AtomicUsize,
    timeout: Duration,
}

/// The publishing connection of an [`MqttPubSub`](crate::MqttPubSub).
pub(crate) struct PublishConnection {
    shared: Arc<PublishShared>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for PublishConnection {
    fn drop(&mut self) {
        if let Ok(state) = self.shared.state.lock() {
            let _ = state.client.try_disconnect();
        }
        // The driver ends when the disconnect is written; abort it in case it cannot be.
        let driver = self.driver.abort_handle();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                driver.abort();
            });
        } else {
            driver.abort();
        }
    }
}

impl PublishConnection {
    pub(crate) async fn open(
        config: &MqttConfig,
        endpoint: &Endpoint,
    ) -> Result<Self, ConnectError> {
        let window = config.publish_in_flight_max;
        let kind = ConnectionKind {
            client_id: format!(
                "{}p-{}",
                config.client_id_prefix,
                uuid::Uuid::new_v4().simple()
            ),
            clean_start: true,
            receive_max: None,
            outgoing_in_flight_max: u16::try_from(window).unwrap_or(u16::MAX),
        };
        let options = options(config, endpoint, &kind);
        // Room for every permitted publish and a disconnect: `try_publish` never finds it full.
        let capacity = window + 8;
        let (client, mut eventloop) = AsyncClient::new(options, capacity);
        let connack = first_connect(&mut eventloop, config, endpoint).await?;
        let shared = Arc::new(PublishShared {
            state: Mutex::new(PublishState {
                client,
                queued: VecDeque::new(),
                in_flight: HashMap::new(),
            }),
            permits: Arc::new(Semaphore::new(window)),
            packet_bytes_max: AtomicUsize::new(config.packet_bytes_max()),
            timeout: config.publish_timeout,
        });
        limit_packets(&shared, &connack);
        let driver = tokio::spawn(drive(
            Arc::clone(&shared),
            eventloop,
            capacity,
            config.reconnect_delay,
        ));
        tracing::debug!(url = %endpoint.shown, client_id = %kind.client_id, "MQTT publishing connection open");
        Ok(Self { shared, driver })
    }

    pub(crate) fn packet_bytes_max(&self) -> usize {
        self.shared.packet_bytes_max.load(Ordering::Relaxed)
    }

    /// Publishes `packets` to `topic` with QoS 1, in order; returns once every one has its
    /// PUBACK.
    pub(crate) async fn publish(
        &self,
        topic: &str,
        packets: Vec<(Bytes, PublishProperties)>,
    ) -> Result<(), PublishError> {
        let timeout = self.shared.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || PublishError::TimedOut {
            timeout_ms: millis(timeout),
        };
        let (done, confirmed) = oneshot::channel();
        let batch = Arc::new(Batch {
            remaining: AtomicUsize::new(packets.len()),
            done: Mutex::new(Some(done)),
        });
        for (payload, properties) in packets {
            let permit =
                tokio::time::timeout_at(deadline, Arc::clone(&self.shared.permits).acquire_owned())
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|_| {
                        PublishError::Transport(failure("the publishing connection is gone"))
                    })?;
            let mut state = self.shared.state.lock().map_err(|_| {
                PublishError::Transport(failure("the publishing state is poisoned"))
            })?;
            state
                .client
                .try_publish_with_properties(
                    topic.to_owned(),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                    properties,
                )
                .map_err(|error| PublishError::Transport(Box::new(error)))?;
            state.queued.push_back(Slot {
                batch: Arc::clone(&batch),
                _permit: permit,
            });
        }
        drop(batch);
        match tokio::time::timeout_at(deadline, confirmed).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(reason))) => Err(PublishError::Transport(failure(reason))),
            Ok(Err(_)) => Err(PublishError::Transport(failure(
                "the publishing connection closed before the broker confirmed",
            ))),
            Err(_) => Err(timed_out()),
        }
    }
}

fn limit_packets(shared: &PublishShared, connack: &ConnAck) {
    if let Some(max) = connack
        .properties
        .as_ref()
        .and_then(|p| p.max_packet_size)
        .and_then(|max| usize::try_from(max).ok())
    {
        shared.packet_bytes_max.fetch_min(max, Ordering::Relaxed);
    }
}

/// Runs the publishing connection: matches every written publish to its packet id and every
/// PUBACK to its publish; reconnects (resuming the session, so that rumqttc sends what was in
/// flight again).
async fn drive(
    shared: Arc<PublishShared>,
    mut eventloop: EventLoop,
    capacity: usize,
    reconnect_delay: Duration,
) {
    let mut outage = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Ok(mut state) = shared.state.lock()
                    && !state.in_flight.contains_key(&pkid)
                    && let Some(slot) = state.queued.pop_front()
                {
                    // Not a publish sent again after a reconnect: the next one handed over.
                    state.in_flight.insert(pkid, slot);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(puback))) => {
                let slot = shared
                    .state
                    .lock()
                    .ok()
                    .and_then(|mut state| state.in_flight.remove(&puback.pkid));
                if let Some(slot) = slot {
                    match puback.reason {
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                            slot.batch.confirmed();
                        }
                        reason => {
                            tracing::warn!(?reason, "the MQTT broker refused a publish");
                            slot.batch
                                .finish(Err(format!("the broker refused the publish: {reason:?}")));
                        }
                    }
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                limit_packets(&shared, &connack);
                tracing::info!(
                    session_present = connack.session_present,
                    "MQTT publishing connection reconnected"
                );
                outage = false;
                if !connack.session_present {
                    // The broker lost the session: rumqttc dropped what it was to send again.
                    // Fail every publish not yet confirmed (callers retry with the same ids),
                    // and start over with a fresh client, so that nothing handed to the old
                    // one can be matched to the wrong publish.
                    let Ok(mut state) = shared.state.lock() else {
                        return;
                    };
                    if !state.queued.is_empty() || !state.in_flight.is_empty() {
                        state.fail_all("the broker lost the publishing session; publish again");
                        let (client, fresh) = AsyncClient::new(eventloop.options.clone(), capacity);
                        state.client = client;
                        drop(state);
                        eventloop = fresh;
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(Event::Incoming(Packet::Disconnect(disconnect))) => {
                tracing::warn!(reason = ?disconnect.reason_code, "the MQTT broker disconnected the publishing connection");
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(error) => {
                if !outage {
                    tracing::warn!(%error, "MQTT publishing connection lost; reconnecting");
                }
                outage = true;
                tokio::time::sleep(reconnect_delay).await;
            }
        }
    }
}
