//! Opening a log whose only segment holds arbitrary bytes after a valid header must either
//! succeed (after truncating a torn tail) or refuse with a typed error; it must never panic.
#![no_main]

use std::{path::Path, sync::Arc};

use factline_log::{
    LogOptions, LogStore,
    faulty::FaultyStorage,
    format::{SegmentHeader, encode_segment_header},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let storage = FaultyStorage::new();
    let mut segment = encode_segment_header(&SegmentHeader {
        segment_no: 0,
        first_position: 0,
    })
    .to_vec();
    segment.extend_from_slice(data);
    let path = Path::new("/fuzz/segments/0000000000.seg");
    storage.corrupt(path, 0, &segment).expect("in-memory write");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if let Ok((store, _)) =
            LogStore::open_with(Arc::new(storage), Path::new("/fuzz"), LogOptions::default()).await
        {
            store.close().await;
        }
    });
});
