//! Appends inside the caller's transaction, inline projections, checkpoints, several stores on
//! one schema, migrations, and input that must not reach PostgreSQL as an SQL error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{sync::Arc, time::Duration};

use factline_core::{
    AppendError, AppendRequest, EventData, EventFilter, EventStore, ExpectedVersion, MetadataError,
    Position, ReadAllOptions, ReadStreamError, ReadStreamOptions, RecordedEvent, Revision,
    StorageError, StreamMetadata, SubscribeFrom,
    testkit::{self, all_events, next_event},
};
use factline_postgres::{
    CheckpointError, InlineProjection, InlineProjectionError, MigrateError, OpenError,
    PostgresStore, schema, sqlx,
};
use sqlx::{AssertSqlSafe, PgConnection};

const IGNORE: &str = "needs postgres: set FACTLINE_TEST_POSTGRES_URL";

async fn exec(store: &PostgresStore, sql: String) {
    sqlx::query(AssertSqlSafe(sql))
        .execute(store.pool())
        .await
        .unwrap();
}

fn table(store: &PostgresStore, name: &str) -> String {
    format!("{}.{name}", store.schema().quoted())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn state_events_and_outbox_rows_commit_or_roll_back_together() {
    let _ = IGNORE;
    let store = common::fresh_store().await;
    let orders = table(&store, "orders");
    let outbox = table(&store, "outbox");
    exec(
        &store,
        format!("CREATE TABLE {orders} (id bigint PRIMARY KEY, status text NOT NULL)"),
    )
    .await;
    exec(
        &store,
        format!("CREATE TABLE {outbox} (id uuid PRIMARY KEY, body text NOT NULL)"),
    )
    .await;
    let mut subscription = store
        .subscribe_to_all(SubscribeFrom::Start, EventFilter::all())
        .await
        .unwrap();

    let placed = testkit::event("OrderPlaced");
    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {orders} VALUES (1, 'placed')"
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {outbox} VALUES ($1, 'placed')"
    )))
    .bind(placed.id)
    .execute(&mut *tx)
    .await
    .unwrap();
    let written = store
        .append_in(
            &mut tx,
            vec![AppendRequest::new(
                testkit::stream("order-1"),
                ExpectedVersion::NoStream,
                vec![placed.clone()],
            )],
        )
        .await
        .unwrap();
    assert_eq!(written[0].position, Position(0));
    // Not visible before the commit, to readers or subscribers.
    assert!(all_events(&store).await.is_empty());
    testkit::assert_quiet(&mut subscription, Duration::from_millis(200)).await;
    tx.commit().await.unwrap();
    assert_eq!(next_event(&mut subscription).await.id, placed.id);

    // A rolled-back transaction leaves no event, no row, and no gap.
    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {orders} VALUES (2, 'placed')"
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    store
        .append_in(
            &mut tx,
            vec![AppendRequest::new(
                testkit::stream("order-2"),
                ExpectedVersion::NoStream,
                testkit::events(2),
            )],
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let count: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {orders}")))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(count, 1);
    assert_eq!(all_events(&store).await.len(), 1);
    let next = store
        .append(
            &testkit::stream("order-3"),
            ExpectedVersion::NoStream,
            testkit::events(1),
        )
        .await
        .unwrap();
    assert_eq!(next.position, Position(1));

    // The caller's transaction gets the same checks as any append.
    let mut tx = store.pool().begin().await.unwrap();
    let refused = store
        .append_in(
            &mut tx,
            vec![AppendRequest::new(
                testkit::stream("order-1"),
                ExpectedVersion::NoStream,
                testkit::events(1),
            )],
        )
        .await;
    assert!(
        matches!(refused, Err(AppendError::WrongExpectedVersion { .. })),
        "{refused:?}"
    );
    let retried = store
        .append_in(
            &mut tx,
            vec![AppendRequest::new(
                testkit::stream("order-1"),
                ExpectedVersion::NoStream,
                vec![placed],
            )],
        )
        .await
        .unwrap();
    assert_eq!(
        retried[0].position,
        Position(0),
        "an idempotent retry inside a transaction"
    );
    tx.commit().await.unwrap();
}

/// Counts events per type in a table, in the append's transaction; refuses `PoisonRecorded`.
struct CountByType {
    table: String,
}

#[async_trait::async_trait]
impl InlineProjection for CountByType {
    fn name(&self) -> &str {
        "count-by-type"
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), InlineProjectionError> {
        for event in events {
            if event.event_type.as_str() == "PoisonRecorded" {
                return Err(InlineProjectionError::new(self.name(), "poison refused"));
            }
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {} (event_type, count, last_position) VALUES ($1, 1, $2)
                 ON CONFLICT (event_type) DO UPDATE
                 SET count = {}.count + 1, last_position = EXCLUDED.last_position",
                self.table, self.table
            )))
            .bind(event.event_type.as_str())
            .bind(event.position.0 as i64)
            .execute(&mut *conn)
            .await
            .map_err(|e| InlineProjectionError::new(self.name(), e))?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn inline_projections_commit_with_the_append_and_refuse_only_their_own() {
    let schema = common::fresh_schema();
    // Create the read model before the store runs appends that need it.
    let setup = PostgresStore::open(common::options(schema.clone()))
        .await
        .unwrap();
    let counts = table(&setup, "counts");
    exec(
        &setup,
        format!("CREATE TABLE {counts} (event_type text PRIMARY KEY, count bigint NOT NULL, last_position bigint NOT NULL)"),
    )
    .await;
    setup.close().await;
    let store = PostgresStore::open(common::options(schema).inline_projection(Arc::new(
        CountByType {
            table: counts.clone(),
        },
    )))
    .await
    .unwrap();

    // Many concurrent appends, so the writer batches them; every seventh is poison.
    let mut tasks = Vec::new();
    for i in 0..70 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let event_type = if i % 7 == 0 {
                "PoisonRecorded"
            } else {
                "GoodRecorded"
            };
            store
                .append(
                    &testkit::stream(&format!("p-{i}")),
                    ExpectedVersion::NoStream,
                    vec![testkit::event(event_type)],
                )
                .await
        }));
    }
    let mut good = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(_) => {
                assert_ne!(i % 7, 0, "a poison append succeeded");
                good += 1;
            }
            Err(AppendError::Storage(StorageError::Backend(source))) => {
                assert_eq!(i % 7, 0, "a good append failed: {source}");
                assert!(source.to_string().contains("poison refused"), "{source}");
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(good, 60);
    let log = all_events(&store).await;
    assert_eq!(log.len(), 60, "refused appends wrote nothing");
    assert!(log.iter().all(|e| e.event_type.as_str() == "GoodRecorded"));
    let (count, last): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count, last_position FROM {counts} WHERE event_type = 'GoodRecorded'"
    )))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        count, 60,
        "the read model counted exactly the committed events"
    );
    assert_eq!(last, 59);
    let poison: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count FROM {counts} WHERE event_type = 'PoisonRecorded'"
    )))
    .fetch_optional(store.pool())
    .await
    .unwrap();
    assert_eq!(poison, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn checkpoints_commit_with_the_read_model() {
    let store = common::fresh_store().await;
    let checkpoints = store.checkpoints();
    let model = table(&store, "model");
    exec(
        &store,
        format!("CREATE TABLE {model} (id bigint PRIMARY KEY)"),
    )
    .await;
    assert_eq!(checkpoints.load("orders-view").await.unwrap(), None);

    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!("INSERT INTO {model} VALUES (1)")))
        .execute(&mut *tx)
        .await
        .unwrap();
    checkpoints
        .save_in(&mut tx, "orders-view", Position(7))
        .await
        .unwrap();
    assert_eq!(
        checkpoints.load_in(&mut tx, "orders-view").await.unwrap(),
        Some(Position(7))
    );
    tx.rollback().await.unwrap();
    assert_eq!(
        checkpoints.load("orders-view").await.unwrap(),
        None,
        "rolled back with the model"
    );

    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!("INSERT INTO {model} VALUES (1)")))
        .execute(&mut *tx)
        .await
        .unwrap();
    checkpoints
        .save_in(&mut tx, "orders-view", Position(7))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        checkpoints.load("orders-view").await.unwrap(),
        Some(Position(7))
    );
    checkpoints.save("orders-view", Position(9)).await.unwrap();
    assert_eq!(
        checkpoints.load("orders-view").await.unwrap(),
        Some(Position(9))
    );
    checkpoints.delete("orders-view").await.unwrap();
    assert_eq!(checkpoints.load("orders-view").await.unwrap(), None);

    for bad in ["", "a\0b", "tab\there", &"x".repeat(256)] {
        assert!(
            matches!(
                checkpoints.load(bad).await,
                Err(CheckpointError::InvalidName { max: 255, .. })
            ),
            "{bad:?}"
        );
        assert!(matches!(
            checkpoints.save(bad, Position(1)).await,
            Err(CheckpointError::InvalidName { .. })
        ));
    }
    // And the contract every checkpoint store keeps, through the core trait.
    factline_core::testkit::checkpoint_store_conformance(&checkpoints).await;
}

/// Two stores on one schema stand for two processes: each sees the other's commits live
/// (through NOTIFY, since their in-process wake-ups are separate), and positions stay gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn two_stores_on_one_schema_share_order_and_wake_each_other() {
    let schema = common::fresh_schema();
    let a = PostgresStore::open(common::options(schema.clone()))
        .await
        .unwrap();
    let b = PostgresStore::open(common::options(schema)).await.unwrap();
    let mut on_a = a
        .subscribe_to_all(SubscribeFrom::End, EventFilter::all())
        .await
        .unwrap();
    let mut stream_on_a = a
        .subscribe_to_stream(&testkit::stream("shared-1"), SubscribeFrom::Start)
        .await
        .unwrap();
    b.append(
        &testkit::stream("shared-1"),
        ExpectedVersion::NoStream,
        testkit::events(1),
    )
    .await
    .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), on_a.next())
        .await
        .expect("store A heard of B's commit")
        .unwrap()
        .unwrap();
    assert_eq!(seen.position, Position(0));
    assert_eq!(next_event(&mut stream_on_a).await.revision, Revision(0));

    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            store
                .append(
                    &testkit::stream("shared-1"),
                    ExpectedVersion::Any,
                    testkit::events(2),
                )
                .await
                .unwrap()
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let log = all_events(&a).await;
    assert_eq!(log.len(), 81);
    for (i, event) in log.iter().enumerate() {
        assert_eq!(event.position, Position(i as u64));
        assert_eq!(event.revision, Revision(i as u64));
    }
    for i in 1..81 {
        assert_eq!(next_event(&mut on_a).await.position, Position(i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn migrations_apply_once_and_refuse_what_they_do_not_know() {
    let schema = common::fresh_schema();
    // Not migrated and told not to: a clear error.
    let refused = PostgresStore::open(common::options(schema.clone()).migrate_on_open(false)).await;
    assert!(
        matches!(
            refused,
            Err(OpenError::NotMigrated {
                current: 0,
                required,
                ..
            }) if required == schema::latest_version()
        ),
        "{refused:?}"
    );
    // Four processes migrating at once: each migration is applied exactly once.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let options = common::options(schema.clone());
        tasks.push(tokio::spawn(async move {
            factline_postgres::migrate(&options).await.unwrap()
        }));
    }
    let mut applied_now = 0;
    for task in tasks {
        let applied = task.await.unwrap();
        assert_eq!(applied.len(), schema::MIGRATIONS.len());
        applied_now += applied.iter().filter(|m| m.applied_now).count();
    }
    assert_eq!(applied_now, schema::MIGRATIONS.len());
    let store = PostgresStore::open(common::options(schema.clone()).migrate_on_open(false))
        .await
        .unwrap();

    // A database migrated by a newer build, or with edited migration text, is refused.
    let migrations = table(&store, "migrations");
    exec(
        &store,
        format!("UPDATE {migrations} SET checksum = checksum + 1 WHERE version = 1"),
    )
    .await;
    let edited = factline_postgres::migrate(&common::options(schema.clone())).await;
    assert!(
        matches!(
            edited,
            Err(OpenError::Migrate(MigrateError::ChecksumMismatch {
                version: 1,
                ..
            }))
        ),
        "{edited:?}"
    );
    exec(
        &store,
        format!("UPDATE {migrations} SET checksum = checksum - 1 WHERE version = 1"),
    )
    .await;
    exec(
        &store,
        format!(
            "INSERT INTO {migrations} (version, description, checksum) VALUES (999, 'future', 0)"
        ),
    )
    .await;
    let newer = PostgresStore::open(common::options(schema)).await;
    assert!(
        matches!(
            newer,
            Err(OpenError::Migrate(MigrateError::UnknownVersion {
                version: 999,
                latest_known,
                ..
            })) if latest_known == schema::latest_version()
        ),
        "{newer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn a_log_written_at_schema_version_1_reads_and_appends_after_the_later_migrations() {
    // Build version 1 itself (its tables, as its migration created them) and write data the
    // way version 1 wrote it: every append kept the stream's head in `streams`, and every
    // event row carried its category.
    use sqlx::Connection as _;
    let schema = common::fresh_schema();
    let mut conn = PgConnection::connect(&common::url()).await.unwrap();
    let applied = schema::migrate_up_to(&mut conn, &schema, 1).await.unwrap();
    assert_eq!(applied.len(), 1);
    let quoted = schema.quoted();
    let (streams, events, log_head) = (
        format!("{quoted}.streams"),
        format!("{quoted}.events"),
        format!("{quoted}.log_head"),
    );
    for sql in [
        // order-1: three events (the last with metadata); order-2: one event, soft-deleted
        // before revision 1 (so its row carries truncate_before); order-3: tombstoned after
        // one event; a category of its own, `invoice`, for one event.
        format!(
            "INSERT INTO {events} (position, stream, revision, id, event_type, category, \
                 content_type, data, metadata, recorded_at) \
             SELECT p, s, r, gen_random_uuid(), 'OrderPlaced', split_part(s, '-', 1), 0, \
                    '{{}}'::bytea, m::bytea, \
                    '2026-01-01T00:00:00Z'::timestamptz + p * interval '1 second' \
             FROM (VALUES (0, 'order-1', 0, NULL), (1, 'order-2', 0, NULL), \
                          (2, 'order-1', 1, NULL), (3, 'order-1', 2, '{{\"k\":\"v\"}}'), \
                          (4, 'order-3', 0, NULL), (5, 'invoice-1', 0, NULL)) AS v(p, s, r, m)"
        ),
        format!(
            "INSERT INTO {streams} (stream, last_revision, last_recorded_at, truncate_before, \
                 tombstoned) VALUES \
             ('order-1', 2, '2026-01-01T00:00:03Z', NULL, false), \
             ('order-2', 0, '2026-01-01T00:00:01Z', 1, false), \
             ('order-3', 0, '2026-01-01T00:00:04Z', NULL, true), \
             ('invoice-1', 0, '2026-01-01T00:00:05Z', NULL, false)"
        ),
        format!("UPDATE {log_head} SET next_position = 6, generation = generation + 6"),
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    conn.close().await.unwrap();

    let store = PostgresStore::open(common::options(schema.clone()))
        .await
        .unwrap();
    let versions = factline_postgres::applied_migrations(&common::options(schema))
        .await
        .unwrap();
    assert_eq!(versions, [1, 2, 3]);
    let order_1 = testkit::stream("order-1");
    let slice = store
        .read_stream(&order_1, ReadStreamOptions::forwards())
        .await
        .unwrap();
    assert_eq!(slice.last_revision, Revision(2));
    assert_eq!(slice.events.len(), 3);
    assert_eq!(slice.events[2].metadata.get("k"), Some("v"));
    assert!(slice.events[0].metadata.is_empty());
    // Category reads use the index on the derived category (migration 3).
    let orders = store
        .read_all(ReadAllOptions::forwards().filter(EventFilter::all().category("order")))
        .await
        .unwrap();
    let positions: Vec<u64> = orders.events.iter().map(|e| e.position.0).collect();
    assert_eq!(positions, [0, 1, 2, 3, 4]);
    let invoices = store
        .read_all(ReadAllOptions::forwards().filter(EventFilter::all().category("invoice")))
        .await
        .unwrap();
    assert_eq!(invoices.events.len(), 1);
    // The head the old columns held is the one the index gives: expected versions hold.
    let refused = store
        .append(
            &order_1,
            ExpectedVersion::Exact(Revision(1)),
            testkit::events(1),
        )
        .await;
    assert!(
        matches!(refused, Err(AppendError::WrongExpectedVersion { .. })),
        "{refused:?}"
    );
    let appended = store
        .append(
            &order_1,
            ExpectedVersion::Exact(Revision(2)),
            testkit::events(1),
        )
        .await
        .unwrap();
    assert_eq!(appended.next_expected_version, Revision(3));
    assert_eq!(appended.position, Position(6));
    // The soft delete and the tombstone survive.
    let truncated = store
        .read_stream(&testkit::stream("order-2"), ReadStreamOptions::forwards())
        .await;
    assert!(
        matches!(truncated, Err(ReadStreamError::NotFound { .. })),
        "{truncated:?}"
    );
    let appended = store
        .append(
            &testkit::stream("order-2"),
            ExpectedVersion::Exact(Revision(0)),
            testkit::events(1),
        )
        .await
        .unwrap();
    assert_eq!(appended.next_expected_version, Revision(1));
    let deleted = store
        .read_stream(&testkit::stream("order-3"), ReadStreamOptions::forwards())
        .await;
    assert!(
        matches!(deleted, Err(ReadStreamError::Deleted { .. })),
        "{deleted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn extreme_input_gets_typed_answers_not_sql_errors() {
    let store = common::fresh_store().await;
    let s = testkit::stream("edge-1");
    store
        .append(&s, ExpectedVersion::NoStream, testkit::events(3))
        .await
        .unwrap();

    // Far positions and revisions, both directions.
    let slice = store
        .read_stream(&s, ReadStreamOptions::forwards().from(Revision(u64::MAX)))
        .await
        .unwrap();
    assert!(slice.events.is_empty() && slice.is_end);
    let slice = store
        .read_stream(&s, ReadStreamOptions::backwards().from(Revision(u64::MAX)))
        .await
        .unwrap();
    assert_eq!(slice.events.len(), 3);
    for direction in [ReadAllOptions::forwards(), ReadAllOptions::backwards()] {
        for filter in [EventFilter::all(), EventFilter::all().stream_prefix("edge")] {
            let slice = store
                .read_all(direction.clone().from(Position(u64::MAX)).filter(filter))
                .await
                .unwrap();
            assert!(slice.is_end);
        }
    }
    // Filters no stored value can match, including a NUL PostgreSQL cannot take as text.
    for filter in [
        EventFilter::all().stream_prefix("a\0b"),
        EventFilter::all().category("\0"),
        EventFilter::all().event_type_prefix("x\u{7}"),
    ] {
        let slice = store
            .read_all(ReadAllOptions::forwards().filter(filter.clone()))
            .await
            .unwrap();
        assert!(slice.events.is_empty() && slice.is_end, "{filter:?}");
        let mut subscription = store
            .subscribe_to_all(SubscribeFrom::Start, filter)
            .await
            .unwrap();
        testkit::assert_quiet(&mut subscription, Duration::from_millis(100)).await;
    }
    // An impossible expected version is a conflict, not an overflow.
    let refused = store
        .append(
            &s,
            ExpectedVersion::Exact(Revision(u64::MAX)),
            testkit::events(1),
        )
        .await;
    assert!(matches!(
        refused,
        Err(AppendError::WrongExpectedVersion { .. })
    ));
    // Metadata PostgreSQL cannot hold is refused naming the field; nothing changes.
    for (metadata, field) in [
        (
            StreamMetadata {
                max_count: Some(u64::MAX),
                ..Default::default()
            },
            "max_count",
        ),
        (
            StreamMetadata {
                truncate_before: Some(Revision(u64::MAX)),
                ..Default::default()
            },
            "truncate_before",
        ),
        (
            StreamMetadata {
                max_age: Some(Duration::MAX),
                ..Default::default()
            },
            "max_age",
        ),
    ] {
        let result = store.set_stream_metadata(&s, metadata).await;
        assert!(
            matches!(result, Err(MetadataError::Invalid { field: f, .. }) if f == field),
            "{result:?}"
        );
    }
    assert_eq!(
        store.stream_metadata(&s).await.unwrap(),
        StreamMetadata::default()
    );
    // Sub-second ages keep their value to the microsecond.
    let short = StreamMetadata {
        max_age: Some(Duration::from_millis(1_500)),
        ..Default::default()
    };
    store.set_stream_metadata(&s, short.clone()).await.unwrap();
    assert_eq!(store.stream_metadata(&s).await.unwrap(), short);
    // Metadata values with NUL and other control characters are stored byte for byte.
    let odd = EventData::json("OddRecorded", &serde_json::json!({"a": "\u{0}"}))
        .unwrap()
        .with_metadata("key\u{0}", "value\u{0}\u{1b}");
    store
        .append(
            &testkit::stream("odd-1"),
            ExpectedVersion::NoStream,
            vec![odd.clone()],
        )
        .await
        .unwrap();
    let read = store
        .read_stream(&testkit::stream("odd-1"), ReadStreamOptions::forwards())
        .await
        .unwrap();
    assert_eq!(read.events[0].to_event_data(), odd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn a_closed_store_refuses_and_ends_subscriptions() {
    let store = common::fresh_store().await;
    let mut subscription = store
        .subscribe_to_all(SubscribeFrom::Start, EventFilter::all())
        .await
        .unwrap();
    store.close().await;
    let refused = store
        .append(
            &testkit::stream("closed-1"),
            ExpectedVersion::Any,
            testkit::events(1),
        )
        .await;
    assert!(
        matches!(refused, Err(AppendError::Storage(StorageError::Closed))),
        "{refused:?}"
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .expect("the subscription ends");
    assert!(matches!(ended, Some(Err(_)) | None), "{ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
async fn steady_appends_take_the_one_statement_path_and_retries_the_locked_one() {
    use std::sync::atomic::Ordering::Relaxed;
    let store = common::fresh_store().await;
    let s = testkit::stream("steady-1");
    let first = testkit::events(1);
    store
        .append(&s, ExpectedVersion::NoStream, first.clone())
        .await
        .unwrap();
    for i in 0..20u64 {
        store
            .append(&s, ExpectedVersion::Exact(Revision(i)), testkit::events(1))
            .await
            .unwrap();
    }
    let stats = store.writer_stats();
    let (fast, locked, misses) = (
        stats.fast_batches.load(Relaxed),
        stats.locked_batches.load(Relaxed),
        stats.fast_misses.load(Relaxed),
    );
    assert_eq!(
        (fast, locked, misses),
        (20, 1, 0),
        "only the first append takes the lock path"
    );
    // A retry of stored ids is decided under the lock, with the stored events loaded.
    let replayed = store
        .append(&s, ExpectedVersion::NoStream, first)
        .await
        .unwrap();
    assert_eq!(replayed.next_expected_version, Revision(0));
    assert_eq!(stats.fast_misses.load(Relaxed), 1);
    assert_eq!(stats.locked_batches.load(Relaxed), 2);
    // Another writer moves the log: the cache is no longer exact, and the next append notices.
    let mut tx = store.pool().begin().await.unwrap();
    store
        .append_in(
            &mut tx,
            vec![AppendRequest::new(
                s.clone(),
                ExpectedVersion::Exact(Revision(20)),
                testkit::events(1),
            )],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let stale = store
        .append(&s, ExpectedVersion::Exact(Revision(20)), testkit::events(1))
        .await;
    assert!(
        matches!(stale, Err(AppendError::WrongExpectedVersion { .. })),
        "decided on the stored head, not the cached one: {stale:?}"
    );
    let next = store
        .append(&s, ExpectedVersion::Exact(Revision(21)), testkit::events(1))
        .await
        .unwrap();
    assert_eq!(next.next_expected_version, Revision(22));
}
