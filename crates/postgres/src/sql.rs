//! Every statement the store runs, with the schema filled in once at open. Statements are
//! prepared and cached per connection by sqlx, keyed by their text.

use std::sync::Arc;

use crate::schema::SchemaName;

/// Columns of a recorded event, in the order [`crate::rows::decode_event`] reads them.
pub(crate) const EVENT_COLUMNS: &str =
    "position, stream, revision, id, event_type, content_type, data, metadata, recorded_at";

#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) schema: SchemaName,
    pub(crate) channel: String,
    pub(crate) lock_head: Arc<str>,
    pub(crate) head: Arc<str>,
    pub(crate) select_streams: Arc<str>,
    pub(crate) select_known_ids: Arc<str>,
    pub(crate) write: Arc<str>,
    pub(crate) stream_row: Arc<str>,
    pub(crate) first_unexpired: Arc<str>,
    pub(crate) read_stream_forwards: Arc<str>,
    pub(crate) read_stream_backwards: Arc<str>,
    pub(crate) read_all_forwards: Arc<str>,
    pub(crate) read_all_backwards: Arc<str>,
    pub(crate) set_metadata: Arc<str>,
    pub(crate) soft_delete: Arc<str>,
    pub(crate) tombstone: Arc<str>,
    pub(crate) delete_snapshot: Arc<str>,
    pub(crate) notify: Arc<str>,
    pub(crate) generation: Arc<str>,
    pub(crate) write_fast: Arc<str>,
    pub(crate) save_snapshot: Arc<str>,
    pub(crate) load_snapshot: Arc<str>,
    pub(crate) lock_stream_row: Arc<str>,
    pub(crate) load_checkpoint: Arc<str>,
    pub(crate) save_checkpoint: Arc<str>,
    pub(crate) delete_checkpoint: Arc<str>,
    pub(crate) list_checkpoints: Arc<str>,
}

/// The data-modifying CTE both write statements share: insert the events from the column arrays
/// `$1..$8`, with `recorded_at` as the recorded time and `from` prefixed to the `FROM` (to join a
/// CTE that must have produced a row). A stream's head is its highest stored revision, so
/// nothing else is written per stream.
fn insert_events_cte(s: &str, recorded_at: &str, from: &str) -> String {
    format!(
        "appended AS (
             INSERT INTO {s}.events
                 (position, stream, revision, id, event_type, content_type,
                  data, metadata, recorded_at)
             SELECT e.position, e.stream, e.revision, e.id, e.event_type,
                    e.content_type, e.data, e.metadata, {recorded_at}
             FROM {from}
                  unnest($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::text[],
                         $6::smallint[], $7::bytea[], $8::bytea[])
                  AS e(position, stream, revision, id, event_type,
                       content_type, data, metadata)
         )"
    )
}

/// The head of the stream named by `key` (a column or parameter): its last revision and that
/// event's recorded time from the `(stream, revision)` index, then its `streams` row (metadata,
/// tombstone), as the columns `last_revision, last_recorded_at, max_count, max_age_us,
/// truncate_before, tombstoned` that [`crate::rows::StreamRow::decode`] reads; no row when the
/// stream has neither events nor a `streams` row.
fn stream_head_from(s: &str, key: &str) -> String {
    format!(
        "e.revision, e.recorded_at, m.max_count, m.max_age_us, m.truncate_before, \
         coalesce(m.tombstoned, false) \
         FROM (SELECT {key}::text AS stream) AS k \
         LEFT JOIN LATERAL (SELECT revision, recorded_at FROM {s}.events \
                            WHERE stream = k.stream ORDER BY revision DESC LIMIT 1) AS e ON true \
         LEFT JOIN LATERAL (SELECT max_count, max_age_us, truncate_before, tombstoned \
                            FROM {s}.streams WHERE stream = k.stream OFFSET 0) AS m ON true \
         WHERE e.revision IS NOT NULL OR m.tombstoned IS NOT NULL"
    )
}

impl Sql {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let s = schema.quoted();
        // Lookups by a list of keys probe the index once per key. `OFFSET 0` keeps the planner
        // from turning the probe into a join it may plan as a scan of the whole table when its
        // statistics lag behind a fresh or fast-growing log (which made every append scan the
        // log before this form).
        let probe_id = format!(
            "SELECT stream, id, revision, position, recorded_at FROM {s}.events \
             WHERE id = k.id OFFSET 0"
        );
        let arc = |text: String| -> Arc<str> { text.into() };
        Self {
            schema: schema.clone(),
            channel: schema.channel(),
            lock_head: arc(format!(
                "SELECT next_position, last_recorded_at, clock_timestamp(), generation \
                 FROM {s}.log_head FOR UPDATE"
            )),
            head: arc(format!("SELECT next_position FROM {s}.log_head")),
            select_streams: arc(format!(
                "SELECT h.* FROM unnest($1::text[]) AS q(stream) \
                 CROSS JOIN LATERAL (SELECT k.stream, {}) AS h",
                stream_head_from(&s, "q.stream")
            )),
            select_known_ids: arc(format!(
                "SELECT e.stream, e.id, e.revision, e.position, e.recorded_at \
                 FROM unnest($1::uuid[]) AS k(id) CROSS JOIN LATERAL ({probe_id}) AS e"
            )),
            // $9: the recorded time.
            write: arc(format!(
                "WITH {}
                 UPDATE {s}.log_head
                 SET next_position = $10, last_recorded_at = $9, generation = generation + 1
                 RETURNING pg_notify($11, next_position::text)",
                insert_events_cte(&s, "$9", "")
            )),
            stream_row: arc(format!("SELECT {}", stream_head_from(&s, "$1"))),
            first_unexpired: arc(format!(
                "SELECT min(revision) FROM {s}.events \
                 WHERE stream = $1 AND revision >= $2 AND revision <= $3 AND recorded_at >= $4"
            )),
            read_stream_forwards: arc(format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events \
                 WHERE stream = $1 AND revision >= $2 AND revision <= $3 \
                 ORDER BY revision LIMIT $4"
            )),
            read_stream_backwards: arc(format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events \
                 WHERE stream = $1 AND revision >= $2 AND revision <= $3 \
                 ORDER BY revision DESC LIMIT $4"
            )),
            read_all_forwards: arc(format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events \
                 WHERE position >= $1 ORDER BY position LIMIT $2"
            )),
            read_all_backwards: arc(format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events \
                 WHERE position <= $1 ORDER BY position DESC LIMIT $2"
            )),
            set_metadata: arc(format!(
                "INSERT INTO {s}.streams (stream, max_count, max_age_us, truncate_before) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (stream) DO UPDATE SET max_count = EXCLUDED.max_count, \
                     max_age_us = EXCLUDED.max_age_us, \
                     truncate_before = EXCLUDED.truncate_before"
            )),
            soft_delete: arc(format!(
                "INSERT INTO {s}.streams (stream, truncate_before) VALUES ($1, $2) \
                 ON CONFLICT (stream) DO UPDATE SET truncate_before = EXCLUDED.truncate_before"
            )),
            tombstone: arc(format!(
                "INSERT INTO {s}.streams (stream, tombstoned) VALUES ($1, true) \
                 ON CONFLICT (stream) DO UPDATE SET tombstoned = true"
            )),
            delete_snapshot: arc(format!("DELETE FROM {s}.snapshots WHERE stream = $1")),
            notify: arc(format!(
                "UPDATE {s}.log_head SET generation = generation + 1 \
                 RETURNING pg_notify($1, next_position::text)"
            )),
            generation: arc(format!(
                "SELECT generation, EXISTS ( \
                     SELECT 1 FROM unnest($1::uuid[]) AS k(id) CROSS JOIN LATERAL ({probe_id}) AS e \
                 ) FROM {s}.log_head"
            )),
            write_fast: arc(format!(
                "WITH head AS (
                     UPDATE {s}.log_head
                     SET next_position = $9, generation = generation + 1,
                         last_recorded_at = greatest(clock_timestamp(), last_recorded_at)
                     WHERE generation = $11
                       AND NOT EXISTS (
                           SELECT 1 FROM unnest($12::uuid[]) AS k(id) CROSS JOIN LATERAL ({probe_id}) AS e
                       )
                     RETURNING last_recorded_at, pg_notify($10, next_position::text)
                 ),
                 {}
                 SELECT last_recorded_at FROM head",
                insert_events_cte(&s, "head.last_recorded_at", "head, ")
            )),
            save_snapshot: arc(format!(
                "INSERT INTO {s}.snapshots (stream, revision, state_version, state, taken_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (stream) DO UPDATE SET revision = EXCLUDED.revision, \
                     state_version = EXCLUDED.state_version, state = EXCLUDED.state, \
                     taken_at = EXCLUDED.taken_at \
                 WHERE {s}.snapshots.revision <= EXCLUDED.revision"
            )),
            load_snapshot: arc(format!(
                "SELECT revision, state_version, state, taken_at FROM {s}.snapshots \
                 WHERE stream = $1"
            )),
            // Creates the stream's row if needed and locks it, so a tombstone (which writes the
            // same row) waits for the caller's commit; returns whether it is tombstoned.
            lock_stream_row: arc(format!(
                "INSERT INTO {s}.streams (stream) VALUES ($1) \
                 ON CONFLICT (stream) DO UPDATE SET tombstoned = {s}.streams.tombstoned \
                 RETURNING tombstoned"
            )),
            load_checkpoint: arc(format!(
                "SELECT position FROM {s}.checkpoints WHERE name = $1"
            )),
            list_checkpoints: arc(format!(
                "SELECT name, position FROM {s}.checkpoints ORDER BY name COLLATE \"C\" LIMIT $1"
            )),
            save_checkpoint: arc(format!(
                "INSERT INTO {s}.checkpoints (name, position, updated_at) VALUES ($1, $2, now()) \
                 ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, \
                     updated_at = EXCLUDED.updated_at"
            )),
            delete_checkpoint: arc(format!("DELETE FROM {s}.checkpoints WHERE name = $1")),
        }
    }

    /// A `$all` read with a filter, within `position >= $1 AND position < $2` (forwards) or
    /// `position <= $1 AND position >= $2` (backwards), at most `$3` rows. The filter's values
    /// are bound from `$4` on, in the order category, stream prefix, event-type prefix (only
    /// those present).
    pub(crate) fn read_all_filtered(
        &self,
        forwards: bool,
        category: bool,
        stream_prefix: bool,
        type_prefix: bool,
    ) -> String {
        let s = self.schema.quoted();
        let mut predicates = vec![if forwards {
            "position >= $1 AND position < $2".to_owned()
        } else {
            "position <= $1 AND position >= $2".to_owned()
        }];
        let mut next = 4;
        if category {
            // The expression of the `events_category_position` index (migration 3).
            predicates.push(format!("split_part(stream, '-', 1) = ${next}"));
            next += 1;
        }
        if stream_prefix {
            predicates.push(format!("starts_with(stream, ${next})"));
            next += 1;
        }
        if type_prefix {
            predicates.push(format!("starts_with(event_type, ${next})"));
        }
        let order = if forwards { "" } else { " DESC" };
        format!(
            "SELECT {EVENT_COLUMNS} FROM {s}.events WHERE {} ORDER BY position{order} LIMIT $3",
            predicates.join(" AND ")
        )
    }
}
