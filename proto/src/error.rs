//! What can go wrong on the wire, and the stable numeric codes that name it.
//!
//! [`ErrorCode`] values are part of the protocol: they never change meaning and are never
//! reused. A peer that receives a code it does not know treats it by its hundred
//! (1xx frame, 2xx session, 3xx request, 5xx server); see `proto/PROTOCOL.md`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::message::MessageType;

/// A stable numeric error code. A newtype over `u16` rather than an enum so that a peer can carry
/// a code that a newer peer invented without failing to decode it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ErrorCode(pub u16);

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)+) => {
        impl ErrorCode {
            $($(#[$doc])* pub const $name: ErrorCode = ErrorCode($value);)+

            /// Every code this build knows, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),+];

            /// The code's name as written in PROTOCOL.md, or `None` for a code from a newer peer.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some(stringify!($name)),)+
                    _ => None,
                }
            }
        }
    };
}

error_codes! {
    /// The frame's type byte names no message.
    FRAME_UNKNOWN_TYPE = 100,
    /// The frame's length is above the negotiated maximum.
    FRAME_OVERSIZE = 101,
    /// The stream ended inside a frame.
    FRAME_TRUNCATED = 102,
    /// The payload decoded but bytes were left over inside it.
    FRAME_TRAILING_BYTES = 103,
    /// The payload does not decode as the message its type names.
    FRAME_MALFORMED = 104,
    /// A well-formed message arrived on a stream or in a state where it has no meaning.
    UNEXPECTED_MESSAGE = 105,
    /// No protocol version is supported by both peers.
    UNSUPPORTED_VERSION = 200,
    /// The connection carries no valid device certificate.
    UNAUTHENTICATED = 201,
    /// The device was revoked; it must enroll again.
    DEVICE_REVOKED = 202,
    /// The setup token is unknown or its secret is wrong.
    TOKEN_INVALID = 203,
    /// The setup token has expired.
    TOKEN_EXPIRED = 204,
    /// The setup token was already used.
    TOKEN_USED = 205,
    /// The caller's role does not allow this operation on this account.
    FORBIDDEN = 206,
    /// The thing named does not exist (or the caller may not know it does).
    NOT_FOUND = 300,
    /// The request id was used before with a different body.
    IDEMPOTENCY_CONFLICT = 301,
    /// The account's available balance does not cover the hold.
    INSUFFICIENT_FUNDS = 302,
    /// The Free tier's monthly token quota would be exceeded.
    QUOTA_EXCEEDED = 303,
    /// A per-connection limit (streams, uploads, rate) was reached; retry later.
    LIMIT_EXCEEDED = 304,
    /// The request was cancelled by the device.
    CANCELLED = 305,
    /// The request is well-formed but its values are not acceptable.
    INVALID_REQUEST = 306,
    /// The model is not served here.
    UNKNOWN_MODEL = 307,
    /// The voucher is unknown or was already redeemed.
    VOUCHER_INVALID = 308,
    /// The hold for this request (its input and its maximum output) is above its `max_cost`.
    MAX_COST_EXCEEDED = 309,
    /// The model is served, but not to the account's tier (or not with a BYOK key).
    MODEL_NOT_ALLOWED = 310,
    /// The uploaded bytes do not hash to the declared SHA-256; the upload is discarded.
    HASH_MISMATCH = 311,
    /// The file is not a LoRA adapter (GGUF) for the base model it names.
    ADAPTER_INVALID = 312,
    /// The declared size is above the cloud's limit or the account's storage left.
    TOO_LARGE = 313,
    /// Another upload to the same adapter name is in progress.
    BUSY = 314,
    /// The cloud failed; the request may be retried with the same id.
    INTERNAL = 500,
    /// The cloud is draining or overloaded; reconnect or retry after the hint.
    UNAVAILABLE = 501,
}

impl ErrorCode {
    /// Whether the same request may succeed later unchanged (same id).
    pub const fn is_retryable(self) -> bool {
        matches!(self.0, 304 | 500 | 501)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{} ({name})", self.0),
            None => write!(f, "{} (unknown)", self.0),
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ErrorCode({self})")
    }
}

/// A frame that cannot be decoded. Each variant maps to one [`ErrorCode`]; after any of them the
/// stream is out of step and must be closed (with an error message when the peer can take one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown message type 0x{type_byte:02x}")]
    UnknownType { type_byte: u8 },
    #[error("frame of {length} bytes is above the maximum of {max} bytes")]
    Oversize { length: u32, max: u32 },
    #[error("stream ended inside a frame: {available} of {needed} bytes")]
    Truncated { needed: usize, available: usize },
    #[error("{message_type:?} payload has {trailing} bytes left over")]
    TrailingBytes {
        message_type: MessageType,
        trailing: usize,
    },
    #[error("{message_type:?} payload does not decode: {reason}")]
    Malformed {
        message_type: MessageType,
        reason: String,
    },
}

impl FrameError {
    pub const fn code(&self) -> ErrorCode {
        match self {
            FrameError::UnknownType { .. } => ErrorCode::FRAME_UNKNOWN_TYPE,
            FrameError::Oversize { .. } => ErrorCode::FRAME_OVERSIZE,
            FrameError::Truncated { .. } => ErrorCode::FRAME_TRUNCATED,
            FrameError::TrailingBytes { .. } => ErrorCode::FRAME_TRAILING_BYTES,
            FrameError::Malformed { .. } => ErrorCode::FRAME_MALFORMED,
        }
    }
}

/// A message that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{message_type:?} encodes to {length} bytes, above the maximum of {max} bytes")]
    Oversize {
        message_type: MessageType,
        length: usize,
        max: u32,
    },
    #[error("{message_type:?} does not encode: {reason}")]
    Serialize {
        message_type: MessageType,
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_sorted() {
        let all = ErrorCode::ALL;
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn unknown_codes_still_display() {
        assert_eq!(ErrorCode(999).to_string(), "999 (unknown)");
        assert_eq!(
            ErrorCode::FRAME_OVERSIZE.to_string(),
            "101 (FRAME_OVERSIZE)"
        );
    }
}
