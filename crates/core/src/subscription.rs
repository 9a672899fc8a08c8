//! Subscriptions: catch-up, then live, with no gap, duplicate or reordering across the switch.
//!
//! The backends in this workspace share one mechanism, [`follow_all`] and [`follow_stream`]:
//! a subscription is a cursor that reads pages from the store and, once a read reaches the end,
//! sleeps until the store's [`ChangeNotifier`] signals a commit. Because every event reaches the
//! subscriber through an ordinary read at the cursor, the catch-up → live switch cannot drop,
//! repeat or reorder events, and a slow subscriber costs one page of memory, never a growing
//! buffer: it simply falls behind and catches up with reads.

use std::{
    collections::VecDeque,
    fmt,
    pin::Pin,
    task::{Context, Poll},
};

use futures::{Stream, StreamExt, stream::BoxStream};
use tokio::sync::watch;

use crate::{
    EventFilter, EventStore, Position, ReadAllError, ReadAllOptions, ReadStreamError,
    ReadStreamOptions, RecordedEvent, Revision, StorageError, StreamId, SubscriptionError,
};

/// Events of one page a following subscription reads at a time.
pub const SUBSCRIPTION_PAGE_EVENTS: usize = 512;

/// A live stream of recorded events. Yields at most one error, then ends.
pub struct Subscription {
    inner: BoxStream<'static, Result<RecordedEvent, SubscriptionError>>,
}

impl Subscription {
    /// Wraps any stream of events (for backends with their own mechanism).
    pub fn new(
        inner: impl Stream<Item = Result<RecordedEvent, SubscriptionError>> + Send + 'static,
    ) -> Self {
        Self {
            inner: inner.boxed(),
        }
    }

    /// The next event; `None` once the subscription has ended.
    pub async fn next(&mut self) -> Option<Result<RecordedEvent, SubscriptionError>> {
        self.inner.next().await
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Stream for Subscription {
    type Item = Result<RecordedEvent, SubscriptionError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// Wakes following subscriptions after every commit (and after deletes and metadata changes).
#[derive(Debug)]
pub struct ChangeNotifier {
    sender: watch::Sender<u64>,
}

impl Default for ChangeNotifier {
    fn default() -> Self {
        Self {
            sender: watch::Sender::new(0),
        }
    }
}

impl ChangeNotifier {
    /// A notifier with no listeners.
    pub fn new() -> Self {
        Self::default()
    }

    /// Signals a change to every listener.
    pub fn notify(&self) {
        self.sender
            .send_modify(|sequence| *sequence = sequence.wrapping_add(1));
    }

    /// A new listener.
    pub fn listen(&self) -> ChangeListener {
        ChangeListener {
            receiver: self.sender.subscribe(),
        }
    }
}

/// Receives the signals of a [`ChangeNotifier`].
#[derive(Debug, Clone)]
pub struct ChangeListener {
    receiver: watch::Receiver<u64>,
}

impl ChangeListener {
    /// Marks every signal so far as seen. Call before reading, so that a commit racing the read
    /// makes the next [`ChangeListener::changed`] return at once.
    pub fn mark_seen(&mut self) {
        self.receiver.borrow_and_update();
    }

    /// Waits for a signal not yet seen. `Err` when the notifier is gone (the store closed).
    pub async fn changed(&mut self) -> Result<(), StorageError> {
        self.receiver
            .changed()
            .await
            .map_err(|_| StorageError::Closed)
    }
}

struct Follower<S, C> {
    store: S,
    changes: ChangeListener,
    cursor: C,
    page: VecDeque<RecordedEvent>,
    finished: bool,
}

/// A subscription to `$all` that starts at `next_position` (inclusive), reading pages from
/// `store` and waiting on `changes` when it has caught up.
pub fn follow_all<S>(
    store: S,
    changes: ChangeListener,
    next_position: Position,
    filter: EventFilter,
) -> Subscription
where
    S: EventStore + 'static,
{
    let state = Follower {
        store,
        changes,
        cursor: next_position,
        page: VecDeque::new(),
        finished: false,
    };
    Subscription::new(futures::stream::unfold(state, move |mut st| {
        let filter = filter.clone();
        async move {
            loop {
                if let Some(event) = st.page.pop_front() {
                    return Some((Ok(event), st));
                }
                if st.finished {
                    return None;
                }
                st.changes.mark_seen();
                let options = ReadAllOptions::forwards()
                    .from(st.cursor)
                    .limit(SUBSCRIPTION_PAGE_EVENTS)
                    .filter(filter.clone());
                let failure = match st.store.read_all(options).await {
                    Ok(slice) => {
                        st.cursor = slice.next_position;
                        let caught_up = slice.events.is_empty() && slice.is_end;
                        st.page.extend(slice.events);
                        if !caught_up {
                            continue;
                        }
                        match st.changes.changed().await {
                            Ok(()) => continue,
                            Err(error) => SubscriptionError::Storage(error),
                        }
                    }
                    Err(ReadAllError::Storage(error)) => SubscriptionError::Storage(error),
                    Err(other) => SubscriptionError::Storage(StorageError::backend(other)),
                };
                st.finished = true;
                return Some((Err(failure), st));
            }
        }
    }))
}

/// A subscription to one stream that starts at `next_revision` (inclusive). A stream that does
/// not exist yet is waited for; a tombstone ends the subscription with
/// [`SubscriptionError::Deleted`].
pub fn follow_stream<S>(
    store: S,
    changes: ChangeListener,
    stream: StreamId,
    next_revision: Revision,
) -> Subscription
where
    S: EventStore + 'static,
{
    let state = Follower {
        store,
        changes,
        cursor: next_revision,
        page: VecDeque::new(),
        finished: false,
    };
    Subscription::new(futures::stream::unfold(state, move |mut st| {
        let stream = stream.clone();
        async move {
            loop {
                if let Some(event) = st.page.pop_front() {
                    return Some((Ok(event), st));
                }
                if st.finished {
                    return None;
                }
                st.changes.mark_seen();
                let options = ReadStreamOptions::forwards()
                    .from(st.cursor)
                    .limit(SUBSCRIPTION_PAGE_EVENTS);
                let caught_up = match st.store.read_stream(&stream, options).await {
                    Ok(slice) => {
                        st.cursor = slice.next_revision;
                        let caught_up = slice.events.is_empty() && slice.is_end;
                        st.page.extend(slice.events);
                        Ok(caught_up)
                    }
                    Err(ReadStreamError::NotFound { .. }) => Ok(true),
                    Err(ReadStreamError::Deleted { stream }) => {
                        Err(SubscriptionError::Deleted { stream })
                    }
                    Err(ReadStreamError::Storage(error)) => Err(SubscriptionError::Storage(error)),
                    Err(other) => Err(SubscriptionError::Storage(StorageError::backend(other))),
                };
                let failure = match caught_up {
                    Ok(false) => continue,
                    Ok(true) => match st.changes.changed().await {
                        Ok(()) => continue,
                        Err(error) => SubscriptionError::Storage(error),
                    },
                    Err(failure) => failure,
                };
                st.finished = true;
                return Some((Err(failure), st));
            }
        }
    }))
}
