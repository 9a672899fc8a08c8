//! One active outbox forwarder at a time: every backend takes a lock its own way (PostgreSQL a
//! session advisory lock, MariaDB a named lock, SQLite a lease row), and the forwarder runs only
//! while it holds it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use factline_messaging::{
    BoxError, ForwardError, Forwarder, ForwarderConfig, Publisher, Subscriber,
};
use tokio_util::sync::CancellationToken;

/// How often a running forwarder checks that it still holds its lock, and how often a standby
/// tries to take it.
pub(crate) const LOCK_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A standby's wait before its next try at the lock: false when `shutdown` came first.
pub(crate) async fn wait_for_next_try(shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(LOCK_CHECK_INTERVAL) => true,
    }
}

/// Why a backend's `run_forwarder` stopped other than by its shutdown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunForwarderError {
    /// Taking the forwarder's lock failed.
    #[error("taking the outbox forwarder's lock failed: {0}")]
    Lock(#[source] BoxError),
    /// The lock was lost while forwarding (its connection broke, or its lease was taken over):
    /// the forwarder stopped, so that the new holder is the only one. Run it again to wait
    /// for the lock as a standby.
    #[error("the outbox forwarder lost its lock and stopped: {0}")]
    LockLost(#[source] BoxError),
    /// The forwarder stopped.
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// Runs a [`Forwarder`] from `outbox_topic` (read through `subscriber`) to `target` until
/// `shutdown` or until `lock_lost` completes (the backend's watch on its lock, which resolves
/// with the reason once the lock is gone); then stops the forwarder and closes the subscriber.
pub(crate) async fn forward_while_locked(
    outbox_topic: &str,
    group: &str,
    mut config: ForwarderConfig,
    subscriber: Arc<dyn Subscriber>,
    target: Arc<dyn Publisher>,
    shutdown: CancellationToken,
    lock_lost: impl Future<Output = BoxError>,
) -> Result<(), RunForwarderError> {
    tracing::info!(outbox = %outbox_topic, group, "outbox forwarder is the active one");
    config.outbox_topic = outbox_topic.to_owned();
    let forwarder = Forwarder::new(config, Arc::clone(&subscriber), target);
    let stop = shutdown.child_token();
    let run = forwarder.run(stop.clone());
    tokio::pin!(run);
    tokio::pin!(lock_lost);
    let result = tokio::select! {
        result = &mut run => result.map_err(RunForwarderError::Forward),
        reason = &mut lock_lost => {
            tracing::error!(outbox = %outbox_topic, group, error = %reason,
                "outbox forwarder lost its lock; stopping");
            stop.cancel();
            let _ = run.await;
            Err(RunForwarderError::LockLost(reason))
        }
    };
    let _ = subscriber.close().await;
    result
}
