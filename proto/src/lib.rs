//! `synesis-proto` — the wire that a Synesis device and the Synesis cloud speak.
//!
//! What this crate owns:
//! - [`frame`]: `[type: u8][length: u32 BE][payload]` framing, decoded check → parse → advance,
//!   with a size limit enforced from the 5-byte header, before the payload is buffered.
//! - [`message`]: every message of the product, grouped by the stream that carries it
//!   ([`StreamKind`]), each with a stable one-byte [`MessageType`].
//! - [`codec`]: the only module that calls bincode; one documented configuration.
//! - [`error`]: [`FrameError`] (what can go wrong decoding) and [`ErrorCode`] (the stable numeric
//!   codes that travel in [`message::ErrorMsg`]).
//! - [`ids`]: newtypes for identifiers, time and money ([`RequestId`] is a UUID v7 and the
//!   idempotency key of every request).
//! - [`vitals`]: the device vitals snapshot that heartbeats carry.
//!
//! What it must not do: IO, async, clocks, randomness. Callers pass time and random bytes in.
//! `proto/PROTOCOL.md` is the normative spec; `tests/vectors.rs` holds the crate to it byte for byte.

pub mod codec;
pub mod error;
pub mod frame;
pub mod ids;
pub mod message;
pub mod token;
pub mod vitals;

#[cfg(test)]
mod proptests;

pub use error::{EncodeError, ErrorCode, FrameError};
pub use frame::{
    Decoded, FRAME_HEADER_BYTES, FRAME_PAYLOAD_MAX_BYTES, FrameBuffer, FrameLimits, Room,
    decode_frame, encode_frame, encode_frame_vec,
};
pub use ids::{
    AccountId, Blob, DeviceId, IdError, MicroUsd, RequestId, Secret, Sha256, UnixMillis,
};
pub use message::{Message, MessageType, StreamKind};
pub use token::{SetupToken, TokenError};
pub use vitals::Vitals;

/// The ALPN protocol identifier both peers set on their TLS configuration.
pub const ALPN: &[u8] = b"synesis/1";

/// The protocol version this build speaks. Peers exchange the versions they support in
/// [`message::Hello`] and the cloud picks one in [`message::Welcome`].
pub const PROTOCOL_VERSION: u16 = 2;

/// The oldest protocol version this build can still speak.
pub const PROTOCOL_VERSION_MIN: u16 = 2;

const _: () = assert!(PROTOCOL_VERSION_MIN <= PROTOCOL_VERSION);
