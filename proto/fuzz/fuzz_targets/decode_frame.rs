//! Arbitrary bytes into the frame decoder: no panic, and every message that decodes has one
//! canonical encoding: encoding it, decoding that and encoding again gives the same bytes.
//! (A receiver accepts a longer-than-needed varint, PROTOCOL.md §4, so the input bytes
//! themselves need not be canonical.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use synesis_proto::{Decoded, FrameBuffer, FrameLimits, decode_frame, encode_frame_vec};

fuzz_target!(|data: &[u8]| {
    // The lowest limit, so that lengths near it are reachable from small inputs.
    let limits = FrameLimits::new(0);

    // One frame at a time from a slice.
    let mut rest = data;
    while let Ok(Decoded::Frame { message, consumed }) = decode_frame(rest, limits) {
        let canonical = encode_frame_vec(&message, limits).expect("a decoded message re-encodes");
        assert!(canonical.len() <= consumed, "the canonical form is longer than the input");
        let Ok(Decoded::Frame { message: again, .. }) = decode_frame(&canonical, limits) else {
            panic!("the canonical encoding does not decode");
        };
        let twice = encode_frame_vec(&again, limits).expect("re-encodes");
        assert_eq!(canonical, twice, "encoding is not stable");
        rest = &rest[consumed..];
    }

    // The same bytes through the stream buffer, split in two at a point the input picks.
    let split = data.first().map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let mut buffer = FrameBuffer::new(limits);
    for piece in [&data[..split], &data[split..]] {
        buffer.extend(piece);
        loop {
            match buffer.next_message() {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = buffer.finish();
});
