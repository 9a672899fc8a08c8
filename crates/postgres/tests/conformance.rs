//! The PostgreSQL store under the shared conformance suite and the reference model, each test on
//! its own schema.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use factline_core::testkit::model::check_against_model;

factline_core::event_store_conformance!(
    #[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
    common::fresh_store()
);

#[test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
fn agrees_with_the_model() {
    check_against_model(common::fresh_store, 48);
}

/// Two stores on one schema, standing for two processes: calls alternate between them, so each
/// writer keeps finding the log moved by the other (its cache of stream heads no longer exact)
/// and subscriptions on one hear of the other's commits only through NOTIFY.
mod two_processes {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use factline_core::{
        AllSlice, AppendError, AppendRequest, AppendResult, DeleteError, DeleteMode, EventFilter,
        EventStore, ExpectedVersion, Limits, MetadataError, Position, ReadAllError, ReadAllOptions,
        ReadStreamError, ReadStreamOptions, Revision, Snapshot, SnapshotError, SnapshotStore,
        StorageError, StreamId, StreamMetadata, StreamSlice, SubscribeError, SubscribeFrom,
        Subscription, async_trait, testkit::model::check_against_model,
    };
    use factline_postgres::PostgresStore;

    use super::common;

    pub(crate) struct Alternating {
        stores: [PostgresStore; 2],
        turn: Arc<AtomicUsize>,
    }

    impl Alternating {
        fn next(&self) -> &PostgresStore {
            &self.stores[self.turn.fetch_add(1, Ordering::Relaxed) % 2]
        }
    }

    pub(crate) async fn fresh() -> Alternating {
        let schema = common::fresh_schema();
        let a = PostgresStore::open(common::options(schema.clone()))
            .await
            .unwrap();
        let b = PostgresStore::open(common::options(schema)).await.unwrap();
        Alternating {
            stores: [a, b],
            turn: Arc::new(AtomicUsize::new(0)),
        }
    }

    #[async_trait]
    impl EventStore for Alternating {
        fn limits(&self) -> &Limits {
            self.stores[0].limits()
        }
        async fn append_multi(
            &self,
            requests: Vec<AppendRequest>,
        ) -> Result<Vec<AppendResult>, AppendError> {
            self.next().append_multi(requests).await
        }
        async fn read_stream(
            &self,
            stream: &StreamId,
            options: ReadStreamOptions,
        ) -> Result<StreamSlice, ReadStreamError> {
            self.next().read_stream(stream, options).await
        }
        async fn read_all(&self, options: ReadAllOptions) -> Result<AllSlice, ReadAllError> {
            self.next().read_all(options).await
        }
        async fn head_position(&self) -> Result<Option<Position>, StorageError> {
            self.next().head_position().await
        }
        async fn subscribe_to_stream(
            &self,
            stream: &StreamId,
            from: SubscribeFrom<Revision>,
        ) -> Result<Subscription, SubscribeError> {
            self.next().subscribe_to_stream(stream, from).await
        }
        async fn subscribe_to_all(
            &self,
            from: SubscribeFrom<Position>,
            filter: EventFilter,
        ) -> Result<Subscription, SubscribeError> {
            self.next().subscribe_to_all(from, filter).await
        }
        async fn stream_metadata(
            &self,
            stream: &StreamId,
        ) -> Result<StreamMetadata, MetadataError> {
            self.next().stream_metadata(stream).await
        }
        async fn set_stream_metadata(
            &self,
            stream: &StreamId,
            metadata: StreamMetadata,
        ) -> Result<(), MetadataError> {
            self.next().set_stream_metadata(stream, metadata).await
        }
        async fn delete_stream(
            &self,
            stream: &StreamId,
            expected: ExpectedVersion,
            mode: DeleteMode,
        ) -> Result<(), DeleteError> {
            self.next().delete_stream(stream, expected, mode).await
        }
    }

    #[async_trait]
    impl SnapshotStore for Alternating {
        async fn save_snapshot(
            &self,
            stream: &StreamId,
            snapshot: Snapshot,
        ) -> Result<bool, SnapshotError> {
            self.next().save_snapshot(stream, snapshot).await
        }
        async fn load_snapshot(
            &self,
            stream: &StreamId,
        ) -> Result<Option<Snapshot>, SnapshotError> {
            self.next().load_snapshot(stream).await
        }
        async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), SnapshotError> {
            self.next().delete_snapshot(stream).await
        }
    }

    factline_core::event_store_conformance!(
        #[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
        fresh()
    );

    #[test]
    #[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
    fn two_processes_agree_with_the_model() {
        check_against_model(fresh, 48);
    }
}
