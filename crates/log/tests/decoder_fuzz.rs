//! The in-CI part of fuzzing (the coverage-guided targets are in `fuzz/`, run by
//! `scripts/fuzz`): valid logs mutated at random — flipped bytes, cuts, inserted garbage,
//! repeated ranges — must never make the decoder or `open` panic, and whatever the decoder
//! accepts must re-encode to the same bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{path::Path, sync::Arc};

use factline_core::{
    Bytes, ContentType, Metadata, Position, RecordedEvent, Revision, StreamId, StreamMetadata,
    Timestamp, Uuid,
};
use factline_log::{
    LogOptions, LogStore,
    faulty::FaultyStorage,
    format::{Record, SegmentHeader, decode_record_shared, encode_record, encode_segment_header},
};
use proptest::prelude::*;

fn valid_log(events: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    let stream = StreamId::new("fuzz-1").unwrap();
    for i in 0..events {
        let event = RecordedEvent {
            stream: stream.clone(),
            revision: Revision(i as u64),
            position: Position(i as u64),
            recorded_at: Timestamp::from_unix_micros(1_700_000_000_000_000 + i as i64),
            id: Uuid::from_u128(i as u128 + 1),
            event_type: "Fuzzed".into(),
            content_type: ContentType::Json,
            data: Bytes::from(format!("{{\"i\":{i}}}")),
            metadata: Metadata::new().with("correlation_id", "c"),
        };
        encode_record(&mut bytes, &Record::Event(event), i % 2 == 1);
    }
    encode_record(
        &mut bytes,
        &Record::Metadata {
            stream,
            metadata: StreamMetadata {
                max_count: Some(3),
                ..Default::default()
            },
        },
        true,
    );
    bytes
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Cut { at: usize },
    Insert { at: usize, garbage: Vec<u8> },
    Repeat { from: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        any::<usize>().prop_map(|at| Mutation::Cut { at }),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..40)
        )
            .prop_map(|(at, garbage)| Mutation::Insert { at, garbage }),
        (any::<usize>(), 1usize..80).prop_map(|(from, len)| Mutation::Repeat { from, len }),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match mutation {
        Mutation::Flip { at, mask } => {
            let i = at % bytes.len();
            bytes[i] ^= mask;
        }
        Mutation::Cut { at } => bytes.truncate(at % bytes.len()),
        Mutation::Insert { at, garbage } => {
            let i = at % bytes.len();
            bytes.splice(i..i, garbage.iter().copied());
        }
        Mutation::Repeat { from, len } => {
            let i = from % bytes.len();
            let end = (i + len).min(bytes.len());
            let copy = bytes[i..end].to_vec();
            bytes.splice(end..end, copy);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_logs_never_panic_the_decoder_or_open(
        events in 1usize..8,
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut body = valid_log(events);
        for m in &mutations {
            apply(&mut body, m);
        }
        // Decoding at every offset: no panic; accepted records re-encode identically.
        let source = Bytes::from(body.clone()); // decoded as shared slices of one buffer
        for offset in 0..body.len() {
            if let Ok(framed) = decode_record_shared(&source.slice(offset..)) {
                let mut again = Vec::new();
                encode_record(&mut again, &framed.record, framed.commit);
                prop_assert_eq!(&again[..], &body[offset..offset + framed.len_bytes]);
            }
        }
        // Opening a log made of it: success or a typed error, never a panic.
        let storage = FaultyStorage::new();
        let mut segment = encode_segment_header(&SegmentHeader { segment_no: 0, first_position: 0 }).to_vec();
        segment.extend_from_slice(&body);
        storage.corrupt(Path::new("/f/segments/0000000000.seg"), 0, &segment).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            if let Ok((store, _)) =
                LogStore::open_with(Arc::new(storage), Path::new("/f"), LogOptions::default()).await
            {
                store.close().await;
            }
        });
    }
}
