//! factline's own stores, through the [`EventStore`] trait: `factline-log` and `factline-memory`.

use std::{path::Path, sync::Arc};

use anyhow::{Context as _, Result, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use factline_core::{
    AppendError, ContentType, EventData, EventFilter, EventStore, EventType, ExpectedVersion,
    Metadata, ReadAllOptions, ReadStreamError, ReadStreamOptions, Revision, StreamId, StreamState,
    SubscribeFrom, Subscription, Uuid,
};

use super::{EVENT_TYPE, Expected, Feed, Outcome, System, json_payload};
use crate::config::{SystemKind, WorkloadKind};

/// Opens the embedded engine on `dir` (an empty directory the harness created for it).
pub async fn open_factline_log(dir: &Path) -> Result<Arc<factline_log::LogStore>> {
    Ok(Arc::new(factline_log::LogStore::open(dir).await?))
}

/// Serves `log` over HTTP on a free loopback port (on the current runtime, for as long as it
/// runs) and connects the API's client to it.
pub(crate) async fn serve_over_http(
    log: Arc<factline_log::LogStore>,
) -> Result<Arc<dyn EventStore>> {
    let options = factline_server::ServerOptions::default().listen(([127, 0, 0, 1], 0).into());
    let server = factline_server::Server::bind(log, options).await?;
    let url = format!("http://{}", server.local_addr());
    tokio::spawn(server.run(std::future::pending()));
    Ok(Arc::new(
        factline_server::client::HttpStore::connect(&url).await?,
    ))
}

/// A factline [`EventStore`] under test.
pub(crate) struct StoreSystem {
    kind: SystemKind,
    store: Arc<dyn EventStore>,
    payload: Bytes,
    event_type: EventType,
    description: String,
}

impl StoreSystem {
    pub(crate) fn new(kind: SystemKind, store: Arc<dyn EventStore>, description: String) -> Self {
        Self {
            kind,
            store,
            payload: json_payload(),
            event_type: EventType::from(EVENT_TYPE),
            description,
        }
    }

    fn events(&self, count: usize) -> Vec<EventData> {
        (0..count)
            .map(|_| EventData {
                id: Uuid::now_v7(),
                event_type: self.event_type.clone(),
                content_type: ContentType::Json,
                data: self.payload.clone(),
                metadata: Metadata::new(),
            })
            .collect()
    }
}

fn stream_id(stream: &str) -> Result<StreamId> {
    StreamId::new(stream).map_err(|error| anyhow!("bad stream id {stream:?}: {error}"))
}

fn from_state(state: StreamState) -> Expected {
    match state {
        StreamState::NoStream => Expected::NoStream,
        StreamState::At(revision) => Expected::Exact(revision.value()),
    }
}

#[async_trait]
impl System for StoreSystem {
    fn kind(&self) -> SystemKind {
        self.kind
    }

    fn not_applicable(&self, _workload: WorkloadKind) -> Option<&'static str> {
        None
    }

    async fn append(&self, stream: &str, expected: Expected, count: usize) -> Result<Outcome> {
        let stream = stream_id(stream)?;
        let expected = match expected {
            Expected::NoStream => ExpectedVersion::NoStream,
            Expected::Exact(revision) => ExpectedVersion::Exact(Revision(revision)),
        };
        match self
            .store
            .append(&stream, expected, self.events(count))
            .await
        {
            Ok(_) => Ok(Outcome::Written),
            Err(AppendError::WrongExpectedVersion { actual, .. }) => Ok(Outcome::Conflict {
                actual: Some(from_state(actual)),
            }),
            Err(error) => Err(error.into()),
        }
    }

    async fn stream_version(&self, stream: &str) -> Result<Expected> {
        let stream = stream_id(stream)?;
        match self
            .store
            .read_stream(&stream, ReadStreamOptions::backwards().limit(1))
            .await
        {
            Ok(slice) => Ok(Expected::Exact(slice.last_revision.value())),
            Err(ReadStreamError::NotFound { .. }) => Ok(Expected::NoStream),
            Err(error) => Err(error.into()),
        }
    }

    async fn read_stream(&self, stream: &str) -> Result<u64> {
        let stream = stream_id(stream)?;
        let page = self.store.limits().read_count_max;
        let mut options = ReadStreamOptions::forwards().limit(page);
        let mut count = 0;
        loop {
            let slice = self.store.read_stream(&stream, options).await?;
            count += slice.events.len() as u64;
            if slice.is_end || slice.events.is_empty() {
                return Ok(count);
            }
            options = options.from(slice.next_revision);
        }
    }

    async fn scan_all(&self, max_events: u64) -> Result<u64> {
        let page = self.store.limits().read_count_max as u64;
        let mut from = None;
        let mut count = 0;
        while count < max_events {
            let mut options =
                ReadAllOptions::forwards().limit(page.min(max_events - count) as usize);
            if let Some(position) = from {
                options = options.from(position);
            }
            let slice = self.store.read_all(options).await?;
            count += slice.events.len() as u64;
            if slice.is_end || slice.events.is_empty() {
                break;
            }
            from = Some(slice.next_position);
        }
        Ok(count)
    }

    async fn subscribe(&self) -> Result<Box<dyn Feed>> {
        let subscription = self
            .store
            .subscribe_to_all(SubscribeFrom::End, EventFilter::all())
            .await
            .context("subscribe_to_all")?;
        Ok(Box::new(StoreFeed { subscription }))
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

struct StoreFeed {
    subscription: Subscription,
}

#[async_trait]
impl Feed for StoreFeed {
    async fn next_batch(&mut self) -> Result<usize> {
        match self.subscription.next().await {
            Some(Ok(_event)) => Ok(1),
            Some(Err(error)) => Err(error.into()),
            None => bail!("the subscription ended"),
        }
    }
}
