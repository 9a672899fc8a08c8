//! The record and segment-header decoders must never panic, and whatever they accept must
//! re-encode to the same bytes. The input is decoded twice: as is (exercising framing and the
//! CRC), and as a body wrapped in a correct frame (so the fuzzer reaches the body parser past
//! the CRC check).
#![no_main]

use factline_log::format::{decode_record_shared, decode_segment_header, encode_record};
use libfuzzer_sys::fuzz_target;

fn check(bytes: &[u8]) {
    let source = bytes::Bytes::copy_from_slice(bytes);
    if let Ok(framed) = decode_record_shared(&source) {
        let mut again = Vec::new();
        encode_record(&mut again, &framed.record, framed.commit);
        assert_eq!(
            &again[..],
            &bytes[..framed.len_bytes],
            "decode → encode is the identity"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = decode_segment_header(data);
    check(data);
    let len = (data.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), data);
    let mut framed = Vec::with_capacity(data.len() + 8);
    framed.extend_from_slice(&len);
    framed.extend_from_slice(&crc.to_le_bytes());
    framed.extend_from_slice(data);
    check(&framed);
});
