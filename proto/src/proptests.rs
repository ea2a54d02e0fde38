//! Property tests over the whole message set (types derive `Arbitrary` under `cfg(test)`).

use proptest::prelude::*;

use crate::frame::{Decoded, FrameBuffer, FrameLimits, decode_frame, encode_frame_vec};
use crate::message::{Message, MessageType};

fn limits() -> FrameLimits {
    FrameLimits::default()
}

fn any_type_byte() -> impl Strategy<Value = u8> {
    proptest::sample::select(MessageType::ALL).prop_map(MessageType::as_u8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// Encode, decode, encode again: the same bytes, the whole frame consumed, the same type.
    /// (Bytes, not `==`, so that NaN in an `f32` field does not fail the comparison.)
    #[test]
    fn every_message_round_trips(message in any::<Message>()) {
        let bytes = encode_frame_vec(&message, limits()).unwrap();
        let Decoded::Frame { message: decoded, consumed } = decode_frame(&bytes, limits()).unwrap()
        else {
            panic!("a whole frame decoded as NeedMore");
        };
        prop_assert_eq!(consumed, bytes.len());
        prop_assert_eq!(decoded.message_type(), message.message_type());
        prop_assert_eq!(encode_frame_vec(&decoded, limits()).unwrap(), bytes);
    }

    /// Any prefix of a frame is `NeedMore`, never an error or a wrong message.
    #[test]
    fn every_prefix_needs_more(message in any::<Message>(), cut in any::<prop::sample::Index>()) {
        let bytes = encode_frame_vec(&message, limits()).unwrap();
        let cut = cut.index(bytes.len());
        let decoded = decode_frame(&bytes[..cut], limits()).unwrap();
        let needs_more = matches!(decoded, Decoded::NeedMore { total } if total > cut);
        prop_assert!(needs_more, "{:?}", decoded);
    }

    /// A stream of frames fed in arbitrary pieces yields the same messages, then ends cleanly.
    #[test]
    fn frame_buffer_reassembles_any_split(
        messages in prop::collection::vec(any::<Message>(), 1..8),
        piece in 1usize..64,
    ) {
        let mut stream = Vec::new();
        for m in &messages {
            stream.extend(encode_frame_vec(m, limits()).unwrap());
        }
        let mut buffer = FrameBuffer::new(limits());
        let mut out = Vec::new();
        for chunk in stream.chunks(piece) {
            buffer.extend(chunk);
            while let Some(m) = buffer.next_message().unwrap() {
                out.push(encode_frame_vec(&m, limits()).unwrap());
            }
        }
        buffer.finish().unwrap();
        let expected: Vec<_> = messages.iter().map(|m| encode_frame_vec(m, limits()).unwrap()).collect();
        prop_assert_eq!(out, expected);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    /// Arbitrary bytes: an answer or a typed error, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(&bytes, limits());
    }

    /// A valid header over an arbitrary payload reaches the payload decoder of every type.
    #[test]
    fn arbitrary_payloads_never_panic(
        type_byte in any_type_byte(),
        payload in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut frame = vec![type_byte];
        frame.extend(u32::try_from(payload.len()).unwrap().to_be_bytes());
        frame.extend(&payload);
        if let Ok(Decoded::Frame { consumed, .. }) = decode_frame(&frame, limits()) {
            prop_assert_eq!(consumed, frame.len());
        }
    }

    /// A valid frame with one byte changed: an answer or a typed error, never a panic.
    #[test]
    fn mutated_frames_never_panic(
        message in any::<Message>(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..,
    ) {
        let mut bytes = encode_frame_vec(&message, limits()).unwrap();
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        let _ = decode_frame(&bytes, limits());
    }
}
