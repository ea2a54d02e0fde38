//! Size limits are enforced before allocation. A counting global allocator records the largest
//! single allocation made while decoding, so these tests show what was (not) allocated.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)] // test code
#![allow(unsafe_code)] // the counting allocator below

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use synesis_proto::message::UploadChunk;
use synesis_proto::*;

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as for `realloc` on `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Tests in this file measure one process-wide number: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The largest single allocation made while running `f`.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::SeqCst);
    let out = f();
    (out, LARGEST.load(Ordering::SeqCst))
}

const KIB: usize = 1024;

#[test]
fn a_frame_announcing_4_gib_is_refused_from_its_header_without_allocating() {
    let _serial = SERIAL.lock().unwrap();
    // An upload chunk announcing u32::MAX bytes (4 GiB - 1), followed by a little data.
    let mut bytes = vec![MessageType::UploadChunk.as_u8()];
    bytes.extend(u32::MAX.to_be_bytes());
    bytes.extend([0u8; 64]);

    let (result, largest) = largest_allocation(|| decode_frame(&bytes, FrameLimits::default()));
    let err = result.unwrap_err();
    assert_eq!(
        err,
        FrameError::Oversize {
            length: u32::MAX,
            max: FRAME_PAYLOAD_MAX_BYTES
        }
    );
    assert_eq!(err.code(), ErrorCode::FRAME_OVERSIZE);
    assert_eq!(err.code().0, 101);
    assert!(
        largest < 4 * KIB,
        "decoding allocated {largest} bytes at once"
    );

    // The same through the stream buffer, fed only the 5-byte header.
    let mut buffer = FrameBuffer::new(FrameLimits::default());
    let (result, largest) = largest_allocation(|| {
        buffer.extend(&bytes[..FRAME_HEADER_BYTES]);
        buffer.next_message()
    });
    assert_eq!(result.unwrap_err().code(), ErrorCode::FRAME_OVERSIZE);
    assert!(
        largest < 4 * KIB,
        "buffering allocated {largest} bytes at once"
    );
}

#[test]
fn a_lower_negotiated_limit_is_enforced_on_both_sides() {
    let _serial = SERIAL.lock().unwrap();
    let limits = FrameLimits::default().negotiate(64 * KIB as u32);
    assert_eq!(limits.max_payload_bytes(), 64 * KIB as u32);
    let chunk: Message = UploadChunk {
        upload_id: RequestId::from_parts(1, [1; 10]),
        index: 0,
        data: Blob(vec![0; 64 * KIB]),
    }
    .into();
    let err = encode_frame_vec(&chunk, limits).unwrap_err();
    assert!(matches!(err, EncodeError::Oversize { .. }), "{err:?}");
    let frame = encode_frame_vec(&chunk, FrameLimits::default()).unwrap();
    assert_eq!(
        decode_frame(&frame, limits).unwrap_err().code(),
        ErrorCode::FRAME_OVERSIZE
    );
}

#[test]
fn a_length_prefix_inside_a_payload_cannot_claim_more_than_the_decode_limit() {
    let _serial = SERIAL.lock().unwrap();
    // An ErrorMsg whose `message` string announces 2^60 bytes (varint 0xfd + u64 LE).
    let mut payload = vec![0xfb, 0xca, 0x00]; // code 202 as a varint u16
    payload.push(0xfd);
    payload.extend((1u64 << 60).to_le_bytes());
    let mut frame = vec![MessageType::ErrorMsg.as_u8()];
    frame.extend((payload.len() as u32).to_be_bytes());
    frame.extend(&payload);

    let (result, largest) = largest_allocation(|| decode_frame(&frame, FrameLimits::default()));
    let err = result.unwrap_err();
    assert_eq!(err.code(), ErrorCode::FRAME_MALFORMED, "{err}");
    assert!(
        largest <= codec::DECODE_LIMIT_BYTES,
        "allocated {largest} bytes at once"
    );
    assert!(largest < 4 * KIB, "allocated {largest} bytes at once");
}

#[test]
fn a_truncated_stream_differs_from_a_clean_end() {
    let _serial = SERIAL.lock().unwrap();
    let msg: Message = message::UploadDone {
        upload_id: RequestId::from_parts(9, [9; 10]),
    }
    .into();
    let frame = encode_frame_vec(&msg, FrameLimits::default()).unwrap();

    let mut clean = FrameBuffer::new(FrameLimits::default());
    clean.extend(&frame);
    assert_eq!(clean.next_message().unwrap(), Some(msg));
    clean.finish().unwrap();

    let mut cut = FrameBuffer::new(FrameLimits::default());
    cut.extend(&frame[..frame.len() - 1]);
    assert_eq!(cut.next_message().unwrap(), None);
    assert_eq!(cut.wanted().unwrap(), 1);
    let err = cut.finish().unwrap_err();
    assert_eq!(
        err,
        FrameError::Truncated {
            needed: frame.len(),
            available: frame.len() - 1
        }
    );
    assert_eq!(err.code(), ErrorCode::FRAME_TRUNCATED);
}

#[test]
fn unknown_types_and_trailing_bytes_have_their_codes() {
    let _serial = SERIAL.lock().unwrap();
    let err = decode_frame(&[0xee], FrameLimits::default()).unwrap_err();
    assert_eq!(err, FrameError::UnknownType { type_byte: 0xee });
    assert_eq!(err.code(), ErrorCode::FRAME_UNKNOWN_TYPE);

    let msg: Message = message::UploadDone {
        upload_id: RequestId::from_parts(9, [9; 10]),
    }
    .into();
    let mut frame = encode_frame_vec(&msg, FrameLimits::default()).unwrap();
    frame.push(0);
    let len = (frame.len() - FRAME_HEADER_BYTES) as u32;
    frame[1..5].copy_from_slice(&len.to_be_bytes());
    let err = decode_frame(&frame, FrameLimits::default()).unwrap_err();
    assert_eq!(err.code(), ErrorCode::FRAME_TRAILING_BYTES, "{err}");
}

/// A billing request whose id is empty, or 10 MB instead of 16 bytes, is a typed frame error
/// before anything reaches the ledger (which only ever sees a 16-byte `RequestId`).
#[test]
fn a_billing_request_id_that_is_empty_or_10_mb_is_refused() {
    let _serial = SERIAL.lock().unwrap();
    let frame_of = |payload: &[u8]| {
        let mut frame = vec![MessageType::TopupRequest.as_u8()];
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend(payload);
        frame
    };
    // Empty: no id at all, then the voucher string ("VCH-1").
    let empty = frame_of(&[5, b'V', b'C', b'H', b'-', b'1']);
    assert_eq!(
        decode_frame(&empty, FrameLimits::default())
            .unwrap_err()
            .code(),
        ErrorCode::FRAME_MALFORMED
    );
    // 10 MiB where the id goes (exactly the frame limit): the first 16 bytes are taken as
    // the id and the rest does not parse; nothing large is allocated.
    let huge = frame_of(&vec![0x42; 10 * 1024 * KIB]);
    let (result, largest) = largest_allocation(|| decode_frame(&huge, FrameLimits::default()));
    assert_eq!(result.unwrap_err().code(), ErrorCode::FRAME_MALFORMED);
    assert!(largest < 4 * KIB, "allocated {largest} bytes at once");
}
