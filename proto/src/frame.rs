//! Framing: `[type: u8][length: u32 big-endian][payload: length bytes]`.
//!
//! Decoding is check → parse → advance (mini-redis style): [`decode_frame`] looks at a buffer
//! and either says how many bytes it still needs ([`Decoded::NeedMore`], a value, not an error),
//! or returns one message and how many bytes it used, or a [`FrameError`]. The type byte and the
//! length are checked from the 5-byte header alone, so an oversize frame is refused before its
//! payload is read, let alone allocated. [`FrameBuffer`] does the buffering for a byte stream.

use crate::error::{EncodeError, FrameError};
use crate::message::{Message, MessageType};

/// Bytes in a frame header: the type byte and the big-endian `u32` length.
pub const FRAME_HEADER_BYTES: usize = 5;

/// The default, and the highest allowed, maximum payload size: 10 MiB.
pub const FRAME_PAYLOAD_MAX_BYTES: u32 = 10 * 1024 * 1024;

/// The lowest maximum a peer may configure; every message of the protocol except upload
/// chunks and long contexts fits in it.
pub const FRAME_PAYLOAD_MAX_BYTES_FLOOR: u32 = 64 * 1024;

const _: () = assert!(FRAME_PAYLOAD_MAX_BYTES_FLOOR <= FRAME_PAYLOAD_MAX_BYTES);
const _: () = assert!((FRAME_PAYLOAD_MAX_BYTES as u64) < u32::MAX as u64);

/// The limits one side of a stream enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    max_payload_bytes: u32,
}

impl FrameLimits {
    /// A maximum payload size, clamped into
    /// `FRAME_PAYLOAD_MAX_BYTES_FLOOR..=FRAME_PAYLOAD_MAX_BYTES`.
    pub const fn new(max_payload_bytes: u32) -> FrameLimits {
        let max = if max_payload_bytes < FRAME_PAYLOAD_MAX_BYTES_FLOOR {
            FRAME_PAYLOAD_MAX_BYTES_FLOOR
        } else if max_payload_bytes > FRAME_PAYLOAD_MAX_BYTES {
            FRAME_PAYLOAD_MAX_BYTES
        } else {
            max_payload_bytes
        };
        FrameLimits {
            max_payload_bytes: max,
        }
    }

    /// The limits both peers accept: the lower of the two maxima.
    pub const fn negotiate(self, peer_max_payload_bytes: u32) -> FrameLimits {
        if peer_max_payload_bytes < self.max_payload_bytes {
            FrameLimits::new(peer_max_payload_bytes)
        } else {
            self
        }
    }

    pub const fn max_payload_bytes(self) -> u32 {
        self.max_payload_bytes
    }
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits::new(FRAME_PAYLOAD_MAX_BYTES)
    }
}

/// What [`decode_frame`] found at the start of a buffer.
#[derive(Debug, Clone, PartialEq)]
// `Frame` is the common case; boxing it would add an allocation per frame to save stack bytes.
#[allow(clippy::large_enum_variant)]
pub enum Decoded {
    /// A whole frame: the message, and the bytes of the buffer it used (header included).
    Frame { message: Message, consumed: usize },
    /// Not a whole frame yet: the frame needs `total` bytes in all. Read more and call again.
    NeedMore { total: usize },
}

/// Decodes the frame at the start of `buf`, if it is all there.
pub fn decode_frame(buf: &[u8], limits: FrameLimits) -> Result<Decoded, FrameError> {
    // Check: everything the header alone can refuse, before waiting for the payload.
    let Some(Header {
        message_type,
        total,
    }) = check_header(buf, limits)?
    else {
        return Ok(Decoded::NeedMore {
            total: FRAME_HEADER_BYTES,
        });
    };
    let Some(payload) = buf.get(FRAME_HEADER_BYTES..total) else {
        return Ok(Decoded::NeedMore { total });
    };

    // Parse.
    let (message, used) =
        Message::decode_payload(message_type, payload).map_err(|reason| FrameError::Malformed {
            message_type,
            reason,
        })?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes {
            message_type,
            trailing: payload.len() - used,
        });
    }

    // The caller advances by `consumed`.
    Ok(Decoded::Frame {
        message,
        consumed: total,
    })
}

/// Appends `message` as one frame to `out`. On error `out` is left as it was.
pub fn encode_frame(
    message: &Message,
    limits: FrameLimits,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let message_type = message.message_type();
    let start = out.len();
    out.push(message_type.as_u8());
    out.extend_from_slice(&[0; 4]);
    if let Err(reason) = message.encode_payload(out) {
        out.truncate(start);
        return Err(EncodeError::Serialize {
            message_type,
            reason,
        });
    }
    let length = out.len() - start - FRAME_HEADER_BYTES;
    let max = limits.max_payload_bytes;
    match u32::try_from(length) {
        Ok(len) if len <= max => {
            out[start + 1..start + FRAME_HEADER_BYTES].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        _ => {
            out.truncate(start);
            Err(EncodeError::Oversize {
                message_type,
                length,
                max,
            })
        }
    }
}

/// Encodes `message` as a frame in a new buffer.
pub fn encode_frame_vec(message: &Message, limits: FrameLimits) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_frame(message, limits, &mut out)?;
    Ok(out)
}

/// A receive buffer for one byte stream: push what the transport read, pop whole messages.
///
/// It holds at most one frame (header plus the negotiated maximum payload) beyond what was
/// popped, because an oversize header is refused as soon as its 5 bytes are in.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    limits: FrameLimits,
}

impl FrameBuffer {
    pub fn new(limits: FrameLimits) -> FrameBuffer {
        FrameBuffer {
            buf: Vec::new(),
            limits,
        }
    }

    /// Changes the limits, e.g. after the peers negotiated a lower maximum.
    pub fn set_limits(&mut self, limits: FrameLimits) {
        self.limits = limits;
    }

    /// Adds bytes read from the transport.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// How many more bytes the frame at the front needs before it can be decoded (0 when a
    /// whole frame is buffered), so a reader can size its next read.
    pub fn wanted(&self) -> Result<usize, FrameError> {
        let total = check_header(&self.buf, self.limits)?.map_or(FRAME_HEADER_BYTES, |h| h.total);
        Ok(total.saturating_sub(self.buf.len()))
    }

    /// The next whole message, if one is buffered. After an error the stream is out of step.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        match decode_frame(&self.buf, self.limits)? {
            Decoded::NeedMore { .. } => Ok(None),
            Decoded::Frame { message, consumed } => {
                self.buf.drain(..consumed);
                Ok(Some(message))
            }
        }
    }

    /// Call at the end of the stream: a clean end leaves nothing buffered; anything else is a
    /// frame cut short.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let needed = check_header(&self.buf, self.limits)?.map_or(FRAME_HEADER_BYTES, |h| h.total);
        Err(FrameError::Truncated {
            needed,
            available: self.buf.len(),
        })
    }

    /// Bytes buffered and not yet returned as messages.
    /// The type of the frame at the front, as soon as its first byte is in: a receiver can
    /// refuse a type that does not belong on its stream before the payload arrives.
    pub fn front_type(&self) -> Result<Option<MessageType>, FrameError> {
        match self.buf.first() {
            None => Ok(None),
            Some(&type_byte) => MessageType::from_u8(type_byte)
                .map(Some)
                .ok_or(FrameError::UnknownType { type_byte }),
        }
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Room for `len` more bytes at the end of the buffer, for a read to fill in place (no
    /// scratch buffer between the transport and this one). Only what [`Room::filled`] says is
    /// kept: a read that fails, or is cancelled halfway, leaves the buffer as it was.
    pub fn room(&mut self, len: usize) -> Room<'_> {
        let start = self.buf.len();
        self.buf.resize(start + len, 0);
        Room {
            buf: &mut self.buf,
            start,
            kept: 0,
        }
    }
}

/// Bytes at the end of a [`FrameBuffer`] that a read is filling.
#[derive(Debug)]
pub struct Room<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
    kept: usize,
}

impl Room<'_> {
    /// Where the read writes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..]
    }

    /// Keeps the first `n` bytes the read wrote.
    pub fn filled(mut self, n: usize) {
        self.kept = n.min(self.buf.len() - self.start);
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        self.buf.truncate(self.start + self.kept);
    }
}

struct Header {
    message_type: MessageType,
    /// Header plus payload, in bytes.
    total: usize,
}

/// Checks the header at the front of `buf`: `None` until all 5 bytes are in, but an unknown
/// type byte is refused as soon as it arrives.
fn check_header(buf: &[u8], limits: FrameLimits) -> Result<Option<Header>, FrameError> {
    let Some(&type_byte) = buf.first() else {
        return Ok(None);
    };
    let message_type =
        MessageType::from_u8(type_byte).ok_or(FrameError::UnknownType { type_byte })?;
    let Some(&[_, a, b, c, d]) = buf.get(..FRAME_HEADER_BYTES) else {
        return Ok(None);
    };
    let length = u32::from_be_bytes([a, b, c, d]);
    if length > limits.max_payload_bytes {
        return Err(FrameError::Oversize {
            length,
            max: limits.max_payload_bytes,
        });
    }
    Ok(Some(Header {
        message_type,
        total: FRAME_HEADER_BYTES + length as usize,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read into the buffer's room keeps what it filled; one that never finishes (its future
    /// dropped) or fails leaves the buffer as it was.
    #[test]
    fn room_keeps_only_what_was_filled() {
        let mut b = FrameBuffer::new(FrameLimits::default());
        b.extend(&[1, 2]);
        let mut room = b.room(8);
        room.as_mut_slice()[..3].copy_from_slice(&[3, 4, 5]);
        room.filled(3);
        assert_eq!(b.buf, [1, 2, 3, 4, 5]);
        let mut cancelled = b.room(16);
        cancelled.as_mut_slice()[0] = 9;
        drop(cancelled);
        assert_eq!(b.buf, [1, 2, 3, 4, 5]);
        b.room(4).filled(10);
        assert_eq!(b.buf.len(), 9, "never more than the room");
    }
}
