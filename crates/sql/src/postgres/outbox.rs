//! The outbox on PostgreSQL: messages staged in the application's transaction, written to an
//! outbox topic with their destination, and forwarded by a
//! [`Forwarder`](factline_messaging::Forwarder).

use std::sync::Arc;

use factline_messaging::{
    DESTINATION_KEY, ForwarderConfig, Message, PublishError, Publisher, Subscriber,
};
use sqlx::postgres::PgConnection;
use tokio_util::sync::CancellationToken;

use super::{PgPublisher, boxed};
pub use crate::forwarding::RunForwarderError;
use crate::forwarding::{LOCK_CHECK_INTERVAL, forward_while_locked, wait_for_next_try};

/// The metadata key that carries a staged message's destination topic.
pub const OUTBOX_DESTINATION_KEY: &str = DESTINATION_KEY;

/// Stages messages for other topics inside the application's transactions; see
/// [`super::PgPubSub::outbox`].
///
/// ```no_run
/// # async fn example(pubsub: factline_sql::postgres::PgPubSub) -> Result<(), Box<dyn std::error::Error>> {
/// use factline_messaging::Message;
/// let outbox = pubsub.outbox("outbox");
/// let mut tx = pubsub.pool().begin().await?;
/// sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1").execute(&mut *tx).await?;
/// outbox.stage(&mut tx, "accounts.debited", vec![Message::new(r#"{"id":1,"amount":10}"#)]).await?;
/// tx.commit().await?; // the state change and the message, or neither
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PgOutbox {
    publisher: PgPublisher,
    topic: String,
}

impl PgOutbox {
    pub(crate) fn new(publisher: PgPublisher, topic: String) -> Self {
        Self { publisher, topic }
    }

    /// The outbox topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Stages `messages` for `destination` in the caller's transaction (pass `&mut *tx`):
    /// they are forwarded after it commits, and never if it rolls back. Each keeps its id, so
    /// consumers can deduplicate the redelivery that at-least-once forwarding may bring.
    pub async fn stage(
        &self,
        conn: &mut PgConnection,
        destination: &str,
        messages: Vec<Message>,
    ) -> Result<(), PublishError> {
        let messages = crate::engine::staged(destination, messages)?;
        self.publisher.publish_in(conn, &self.topic, messages).await
    }

    /// Runs a [`Forwarder`](factline_messaging::Forwarder) from this outbox to `target` until
    /// `shutdown`, as the only one among all processes: it first takes a session advisory lock
    /// named after the schema and topic (others wait, as standbys, trying every second, and
    /// take over when its session ends), so that order per key holds. While forwarding it checks its session every second;
    /// if the session broke (the lock is then free for a standby) it stops with
    /// [`RunForwarderError::LockLost`]. The forwarder reads the outbox as the consumer group
    /// `group`; `config.outbox_topic` is replaced by this outbox's topic.
    pub async fn run_forwarder(
        &self,
        pubsub: &super::PgPubSub,
        group: &str,
        config: ForwarderConfig,
        target: Arc<dyn Publisher>,
        shutdown: CancellationToken,
    ) -> Result<(), RunForwarderError> {
        let subscriber: Arc<dyn Subscriber> = Arc::new(
            pubsub
                .subscriber_in_group(group)
                .map_err(|error| RunForwarderError::Lock(boxed(error)))?,
        );
        let lock_name = format!(
            "factline_outbox:{}:{}:{group}",
            pubsub.shared.schema(),
            self.topic
        );
        let mut conn = pubsub
            .shared
            .pool
            .acquire()
            .await
            .map_err(|error| RunForwarderError::Lock(boxed(error)))?
            .detach();
        // Wait for the lock, a try at a time, so that shutdown is heard.
        loop {
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
                .bind(&lock_name)
                .fetch_one(&mut conn)
                .await
                .map_err(|error| RunForwarderError::Lock(boxed(error)))?;
            if locked {
                break;
            }
            if !wait_for_next_try(&shutdown).await {
                return Ok(());
            }
        }
        let lock_lost = async {
            loop {
                tokio::time::sleep(LOCK_CHECK_INTERVAL).await;
                if let Err(error) = sqlx::query("SELECT 1").execute(&mut conn).await {
                    return boxed(error);
                }
            }
        };
        let result = forward_while_locked(
            &self.topic,
            group,
            config,
            subscriber,
            target,
            shutdown,
            lock_lost,
        )
        .await;
        // Closing the session releases the lock.
        let _ = sqlx::Connection::close(conn).await;
        result
    }
}
