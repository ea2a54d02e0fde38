//! The payload codec: the only module in Synesis that calls bincode.
//!
//! Configuration (normative, see PROTOCOL.md "Payload encoding"):
//! - little-endian;
//! - variable-length integers (bincode "varint": `< 251` is one byte, then `0xfb` + u16 LE,
//!   `0xfc` + u32 LE, `0xfd` + u64 LE; signed integers are zigzag-encoded first);
//! - enum variants as a varint of their index, `Option` as one byte `0`/`1` then the value,
//!   sequences, strings and byte strings as a varint length then the elements;
//! - `f32` as 4 bytes IEEE-754 little-endian;
//! - a decode limit of [`DECODE_LIMIT_BYTES`]: no length prefix inside a payload can make the
//!   decoder claim more memory than that, whatever it announces.
//!
//! This is bincode 2's `standard()` configuration, which is byte-compatible with bincode 1 using
//! varint encoding, so a bincode-compatible crate (wincode, say) could replace this one without
//! changing a byte on the wire. Keep it that way: nothing outside this module names bincode.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::frame::FRAME_PAYLOAD_MAX_BYTES;

/// The most bytes a decoder may claim while decoding one payload.
pub const DECODE_LIMIT_BYTES: usize = FRAME_PAYLOAD_MAX_BYTES as usize;

type Config = Configuration<LittleEndian, Varint, Limit<DECODE_LIMIT_BYTES>>;

const CONFIG: Config = bincode::config::standard()
    .with_little_endian()
    .with_variable_int_encoding()
    .with_limit::<DECODE_LIMIT_BYTES>();

/// Appends the encoding of `value` to `out`.
pub(crate) fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
    bincode::serde::encode_into_std_write(value, out, CONFIG)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Decodes one `T` from the start of `payload`; returns it and the bytes it used.
pub(crate) fn decode_prefix<T: DeserializeOwned>(payload: &[u8]) -> Result<(T, usize), String> {
    bincode::serde::decode_from_slice(payload, CONFIG).map_err(|e| e.to_string())
}
