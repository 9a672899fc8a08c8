//! A small bank account aggregate and an instrumented store shared by the tests.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use factline_core::{
    AllSlice, AppendError, AppendRequest, AppendResult, DeleteError, DeleteMode, EventFilter,
    EventStore, ExpectedVersion, InMemoryStore, Limits, MetadataError, Position, ReadAllError,
    ReadAllOptions, ReadStreamError, ReadStreamOptions, Revision, StorageError, StreamId,
    StreamMetadata, StreamSlice, SubscribeError, SubscribeFrom, Subscription, async_trait,
};
use factline_domain::{Aggregate, DomainEvent, SnapshotState};
use serde::{Deserialize, Serialize};
use tokio::sync::Barrier;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
pub(crate) enum AccountEvent {
    AccountOpened { owner: String },
    MoneyDeposited { amount_cents: u64 },
    MoneyWithdrawn { amount_cents: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AccountCommand {
    /// Opening again for the same owner is accepted and decides nothing.
    Open {
        owner: String,
    },
    Deposit {
        amount_cents: u64,
    },
    Withdraw {
        amount_cents: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AccountError {
    #[error("the account is not open")]
    NotOpen,
    #[error("the account is already open for {owner}")]
    OpenForSomeoneElse { owner: String },
    #[error("an amount must be positive")]
    ZeroAmount,
    #[error("insufficient funds: balance {balance_cents}, requested {requested_cents}")]
    InsufficientFunds {
        balance_cents: u64,
        requested_cents: u64,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Account {
    pub(crate) owner: Option<String>,
    pub(crate) balance_cents: u64,
}

impl Aggregate for Account {
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;
    const CATEGORY: &'static str = "account";

    fn decide(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match (command, &self.owner) {
            (AccountCommand::Open { owner }, None) => Ok(vec![AccountEvent::AccountOpened {
                owner: owner.clone(),
            }]),
            (AccountCommand::Open { owner }, Some(current)) if owner == current => Ok(vec![]),
            (AccountCommand::Open { .. }, Some(current)) => Err(AccountError::OpenForSomeoneElse {
                owner: current.clone(),
            }),
            (_, None) => Err(AccountError::NotOpen),
            (
                AccountCommand::Deposit { amount_cents: 0 }
                | AccountCommand::Withdraw { amount_cents: 0 },
                _,
            ) => Err(AccountError::ZeroAmount),
            (AccountCommand::Deposit { amount_cents }, Some(_)) => {
                Ok(vec![AccountEvent::MoneyDeposited {
                    amount_cents: *amount_cents,
                }])
            }
            (AccountCommand::Withdraw { amount_cents }, Some(_)) => {
                if *amount_cents > self.balance_cents {
                    return Err(AccountError::InsufficientFunds {
                        balance_cents: self.balance_cents,
                        requested_cents: *amount_cents,
                    });
                }
                Ok(vec![AccountEvent::MoneyWithdrawn {
                    amount_cents: *amount_cents,
                }])
            }
        }
    }

    fn evolve(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::AccountOpened { owner } => self.owner = Some(owner.clone()),
            AccountEvent::MoneyDeposited { amount_cents } => self.balance_cents += amount_cents,
            AccountEvent::MoneyWithdrawn { amount_cents } => self.balance_cents -= amount_cents,
        }
    }
}

impl SnapshotState for Account {
    const SNAPSHOT_VERSION: u32 = 1;
}

pub(crate) fn open(owner: &str) -> AccountCommand {
    AccountCommand::Open {
        owner: owner.into(),
    }
}

pub(crate) fn deposit(amount_cents: u64) -> AccountCommand {
    AccountCommand::Deposit { amount_cents }
}

pub(crate) fn withdraw(amount_cents: u64) -> AccountCommand {
    AccountCommand::Withdraw { amount_cents }
}

/// An [`InMemoryStore`] that counts the events its stream reads return and can hold the first
/// appends at a barrier, so that concurrent commands all load before any of them appends.
pub(crate) struct InstrumentedStore {
    pub(crate) inner: InMemoryStore,
    events_read: AtomicU64,
    stream_reads: AtomicU64,
    held_appends: AtomicUsize,
    barrier: Option<Barrier>,
}

impl InstrumentedStore {
    pub(crate) fn new(inner: InMemoryStore) -> Self {
        Self {
            inner,
            events_read: AtomicU64::new(0),
            stream_reads: AtomicU64::new(0),
            held_appends: AtomicUsize::new(0),
            barrier: None,
        }
    }

    /// Holds the next `appends` appends until all of them have arrived.
    pub(crate) fn holding_first_appends(inner: InMemoryStore, appends: usize) -> Self {
        Self {
            held_appends: AtomicUsize::new(appends),
            barrier: Some(Barrier::new(appends)),
            ..Self::new(inner)
        }
    }

    /// Events returned by stream reads since the last reset.
    pub(crate) fn events_read(&self) -> u64 {
        self.events_read.load(Ordering::SeqCst)
    }

    /// Stream reads since the last reset.
    pub(crate) fn stream_reads(&self) -> u64 {
        self.stream_reads.load(Ordering::SeqCst)
    }

    pub(crate) fn reset_counters(&self) {
        self.events_read.store(0, Ordering::SeqCst);
        self.stream_reads.store(0, Ordering::SeqCst);
    }
}

#[async_trait]
impl EventStore for InstrumentedStore {
    fn limits(&self) -> &Limits {
        self.inner.limits()
    }

    async fn append_multi(
        &self,
        requests: Vec<AppendRequest>,
    ) -> Result<Vec<AppendResult>, AppendError> {
        let held = self
            .held_appends
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if let (true, Some(barrier)) = (held, &self.barrier) {
            barrier.wait().await;
        }
        self.inner.append_multi(requests).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadStreamOptions,
    ) -> Result<StreamSlice, ReadStreamError> {
        let slice = self.inner.read_stream(stream, options).await?;
        self.stream_reads.fetch_add(1, Ordering::SeqCst);
        self.events_read
            .fetch_add(slice.events.len() as u64, Ordering::SeqCst);
        Ok(slice)
    }

    async fn read_all(&self, options: ReadAllOptions) -> Result<AllSlice, ReadAllError> {
        self.inner.read_all(options).await
    }

    async fn head_position(&self) -> Result<Option<Position>, StorageError> {
        self.inner.head_position().await
    }

    async fn subscribe_to_stream(
        &self,
        stream: &StreamId,
        from: SubscribeFrom<Revision>,
    ) -> Result<Subscription, SubscribeError> {
        self.inner.subscribe_to_stream(stream, from).await
    }

    async fn subscribe_to_all(
        &self,
        from: SubscribeFrom<Position>,
        filter: EventFilter,
    ) -> Result<Subscription, SubscribeError> {
        self.inner.subscribe_to_all(from, filter).await
    }

    async fn stream_metadata(&self, stream: &StreamId) -> Result<StreamMetadata, MetadataError> {
        self.inner.stream_metadata(stream).await
    }

    async fn set_stream_metadata(
        &self,
        stream: &StreamId,
        metadata: StreamMetadata,
    ) -> Result<(), MetadataError> {
        self.inner.set_stream_metadata(stream, metadata).await
    }

    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<(), DeleteError> {
        self.inner.delete_stream(stream, expected, mode).await
    }
}

/// A store with `read_count_max` set to `read_count_max`.
pub(crate) fn store_with_read_count_max(read_count_max: usize) -> InMemoryStore {
    let mut limits = Limits::default();
    limits.read_count_max = read_count_max;
    InMemoryStore::with_limits(limits)
}
