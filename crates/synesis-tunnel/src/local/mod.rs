//! The tunnel service's local API: how `synesis` commands on this machine use the running
//! service's one QUIC connection, over a Unix socket in the runtime directory (mode 0600).
//!
//! - [`server`]: [`bind`] claims the runtime directory (one service per directory, an advisory
//!   lock holding the service's pid) and listens; [`serve`] answers clients for as long as it is
//!   polled, over any [`Backend`] (the [`TunnelHandle`](crate::TunnelHandle) in production).
//! - [`client`]: [`LocalClient`] for commands: [`status`](LocalClient::status),
//!   [`ping`](LocalClient::ping), [`request`](LocalClient::request) (an account request and its
//!   reply) and [`open_stream`](LocalClient::open_stream) (a framed duplex to the cloud).
//!
//! # The local protocol
//!
//! Every frame has the cloud protocol's layout, `[type u8][length u32 BE][payload]`
//! (proto/PROTOCOL.md §3). Two type bytes are the local API's own, [`LOCAL_REQUEST`] (client →
//! service) and [`LOCAL_REPLY`] (service → client), with a JSON payload of at most
//! [`LOCAL_PAYLOAD_MAX_BYTES`]; the cloud protocol leaves them unassigned, so a local frame is never
//! taken for a cloud message (checked at compile time), and no local frame ever reaches the
//! cloud. Every other frame is a cloud protocol frame, passed through unchanged.
//!
//! A client connection carries one exchange:
//! - `{"op":"work","work":{…}}` → `{"reply":"piece","text":…}`* then `{"reply":"worked",
//!   "result":{…}}` (or a refusal): work the service does itself, with the models it keeps
//!   loaded ([`LocalWork`]); a client that leaves stops it.
//! - `{"op":"events"}` → `{"reply":"subscribed"}`, then `{"reply":"event","event":{…}}` for each
//!   thing the service does ([`events`]), until the client leaves or the service stops.
//! - `{"op":"status"}` → `{"reply":"status","status":{…}}`; `{"op":"ping"}` →
//!   `{"reply":"pong","rtt_nanos":…}`; a failure → `{"reply":"refused","failure":{…}}`.
//! - `{"op":"open"}` → `{"reply":"opened"}`: the service opened a bidirectional stream on the
//!   tunnel's connection for this client alone. From then on cloud frames flow both ways until
//!   either side ends: the client ends its half with `{"op":"finish"}` (the service finishes the
//!   QUIC stream's send half); the service ends the exchange with `{"reply":"end"}` when the cloud
//!   finished its half, or `{"reply":"end","failure":{…}}` when the stream failed, and closes.
//!   A client that goes away without `finish` cancels the stream: it is reset (`CANCELLED`).
//!
//! The first cloud frame must open an escalation, upload or account stream (never a control or
//! enrollment stream: the control stream is the tunnel's own), and every later one must belong to
//! that stream (or be an `ErrorMsg`). Cloud frames are copied, not buffered: a long escalation or a
//! large upload flows through in constant memory.

pub mod client;
pub mod events;
pub mod server;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use synesis_proto::{FRAME_HEADER_BYTES, FrameLimits, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use client::{
    ASK_TIMEOUT, ClientError, EventFeed, LocalClient, LocalStream, StreamReceiver, StreamSender,
};
pub use server::{
    Backend, BindError, CLIENT_TIMEOUT, CLIENTS_MAX, CLOUD_STREAMS_MAX,
    CLOUD_STREAMS_PER_CONNECTION, LocalListener, LocalWork, RECONNECT_WAIT_DEFAULT,
    RECONNECT_WAIT_MAX, ServeOptions, ServiceLock, WorkFuture, bind, running_service, serve,
};

use crate::TunnelStatus;

/// The type byte of a local request (client → service).
pub const LOCAL_REQUEST: u8 = 0xf0;
/// The type byte of a local reply (service → client).
pub const LOCAL_REPLY: u8 = 0xf1;
// The cloud protocol leaves both unassigned: a local frame is never a cloud message.
const _: () = assert!(
    MessageType::from_u8(LOCAL_REQUEST).is_none() && MessageType::from_u8(LOCAL_REPLY).is_none()
);
/// The largest local frame's payload: a status is a few hundred bytes; a local generation's
/// request carries its prompt, and its result the whole answer.
pub const LOCAL_PAYLOAD_MAX_BYTES: u32 = 4 * 1024 * 1024;

/// The socket in `runtime_dir`.
pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("tunnel.sock")
}

/// The lock file in `runtime_dir` (see [`ServiceLock`]).
pub fn lock_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("tunnel.lock")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum LocalRequest {
    Status,
    Ping,
    /// Open a cloud stream for this client.
    Open,
    /// Inside a cloud stream: the client sends nothing more.
    Finish,
    /// The service's events, from now on, until the client leaves.
    Events,
    /// Work the service does itself ([`LocalWork`]: a generation with a model it keeps
    /// loaded), described in the worker's own JSON.
    Work {
        work: serde_json::Value,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub(crate) enum LocalReply {
    Status {
        status: TunnelStatus,
    },
    Pong {
        rtt_nanos: u64,
    },
    Opened,
    /// Events follow, one `Event` reply each.
    Subscribed,
    Event {
        event: events::Event,
    },
    /// A piece of text the work produced, in order.
    Piece {
        text: String,
    },
    /// The work's result; the exchange ends.
    Worked {
        result: serde_json::Value,
    },
    /// The last frame of a cloud stream.
    End {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failure: Option<LocalFailure>,
    },
    Refused {
        failure: LocalFailure,
    },
}

/// What went wrong, as the service tells a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct LocalFailure {
    pub kind: FailureKind,
    pub message: String,
}

impl LocalFailure {
    pub(crate) fn new(kind: FailureKind, message: impl Into<String>) -> LocalFailure {
        LocalFailure {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The tunnel has no live connection (or has stopped); try again later, or on a connection
    /// of your own.
    NotConnected,
    /// [`CLOUD_STREAMS_MAX`] streams are in flight.
    Busy,
    /// The client broke the local protocol (or sent a frame that may not travel on its stream).
    BadRequest,
    /// The stream could not be opened, or failed once open (reset by the cloud, connection lost,
    /// a bad frame from the cloud).
    StreamFailed,
    /// Local work failed (its message says why), or this service does none.
    WorkFailed,
}

/// A frame header, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Header {
    Local { ty: u8, len: u32 },
    Cloud { ty: MessageType, len: u32 },
}

impl Header {
    pub(crate) fn len(self) -> u32 {
        match self {
            Header::Local { len, .. } | Header::Cloud { len, .. } => len,
        }
    }

    pub(crate) fn bytes(self) -> [u8; FRAME_HEADER_BYTES] {
        let (ty, len) = match self {
            Header::Local { ty, len } => (ty, len),
            Header::Cloud { ty, len } => (ty.as_u8(), len),
        };
        let mut out = [0u8; FRAME_HEADER_BYTES];
        out[0] = ty;
        out[1..].copy_from_slice(&len.to_be_bytes());
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameFault {
    #[error("the connection ended inside a frame")]
    Truncated,
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("a frame of type {ty:#04x} and {len} bytes is over the limit")]
    Oversize { ty: u8, len: u32 },
    #[error("{0}")]
    Unexpected(&'static str),
    #[error("local frame: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads and checks the next header; `None` at a clean end (between frames). Local types are
/// accepted only when `local` is true (never from the cloud). Refuses an unknown type or a
/// length over its limit before any payload is read. Not cancel-safe: a future dropped halfway
/// leaves the reader inside a frame (the proxy drops one only when it abandons the exchange).
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    local: bool,
) -> Result<Option<Header>, FrameFault> {
    let mut buf = [0u8; FRAME_HEADER_BYTES];
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameFault::Truncated)
            };
        }
        got += n;
    }
    let ty = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let (header, max) = match MessageType::from_u8(ty) {
        Some(t) => (
            Header::Cloud { ty: t, len },
            FrameLimits::default().max_payload_bytes(),
        ),
        None if local && (ty == LOCAL_REQUEST || ty == LOCAL_REPLY) => {
            (Header::Local { ty, len }, LOCAL_PAYLOAD_MAX_BYTES)
        }
        None => return Err(FrameFault::UnknownType(ty)),
    };
    if len > max {
        return Err(FrameFault::Oversize { ty, len });
    }
    Ok(Some(header))
}

/// Reads `len` payload bytes whole (a local frame, or a cloud frame a client decodes).
pub(crate) async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u32,
) -> Result<Vec<u8>, FrameFault> {
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameFault::Truncated
        } else {
            FrameFault::Io(e)
        }
    })?;
    Ok(payload)
}

/// Writes one local frame.
pub(crate) async fn write_local<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    ty: u8,
    message: &T,
) -> Result<(), FrameFault> {
    let payload = serde_json::to_vec(message)?;
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    if len > LOCAL_PAYLOAD_MAX_BYTES {
        return Err(FrameFault::Oversize { ty, len });
    }
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    frame.extend_from_slice(&Header::Local { ty, len }.bytes());
    frame.extend_from_slice(&payload);
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests;
