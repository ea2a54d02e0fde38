//! `synesis-wire` — the protocol of `synesis-proto` carried on QUIC streams.
//!
//! Both ends use it, so both frame, close and verify the same way:
//! - [`FramedRecv`] / [`send`]: messages over any tokio byte stream (quinn's streams in
//!   production, in-memory pipes in tests), with the frame limits enforced before buffering;
//! - [`tls`]: the one crypto provider (ring), the ALPN and the server name both sides use;
//! - [`close_code`] / [`error_code_of`]: an [`ErrorCode`] as a QUIC application close code.
//!
//! It must not hold protocol logic (that is the tunnel's and the cloud's) nor any clock.

pub mod files;
pub mod tls;

use std::io;

use synesis_proto::{
    EncodeError, ErrorCode, FrameBuffer, FrameError, FrameLimits, Message, MessageType,
    encode_frame,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The most bytes asked of the transport per read (a large frame, an upload's chunk, comes in
/// several reads).
const READ_MAX_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream read failed: {0}")]
    Io(#[from] io::Error),
    /// A frame whose type the receiver does not accept here, refused from its type byte.
    #[error("{} does not belong on this stream", .0.name())]
    NotAllowed(MessageType),
}

impl RecvError {
    /// The code to tell the peer, when the fault is in what it sent.
    pub fn peer_fault(&self) -> Option<ErrorCode> {
        match self {
            RecvError::Frame(e) => Some(e.code()),
            RecvError::NotAllowed(_) => Some(ErrorCode::UNEXPECTED_MESSAGE),
            RecvError::Io(_) => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("stream write failed: {0}")]
    Io(#[from] io::Error),
}

/// The receiving half of a stream, yielding whole messages.
#[derive(Debug)]
pub struct FramedRecv<R> {
    inner: R,
    buffer: FrameBuffer,
}

impl<R: AsyncRead + Unpin> FramedRecv<R> {
    pub fn new(inner: R, limits: FrameLimits) -> FramedRecv<R> {
        FramedRecv {
            inner,
            buffer: FrameBuffer::new(limits),
        }
    }

    /// The next message; `Ok(None)` when the peer finished the stream between frames.
    pub async fn next(&mut self) -> Result<Option<Message>, RecvError> {
        self.next_if(|_| true).await
    }

    /// The next message if `allowed` accepts its type: a frame of another type is refused
    /// ([`RecvError::NotAllowed`]) as soon as its type byte is in, before its payload is read
    /// or decoded. Cancel-safe, as [`next`](Self::next).
    pub async fn next_if(
        &mut self,
        allowed: impl Fn(MessageType) -> bool,
    ) -> Result<Option<Message>, RecvError> {
        loop {
            if let Some(t) = self.buffer.front_type()?
                && !allowed(t)
            {
                return Err(RecvError::NotAllowed(t));
            }
            if let Some(message) = self.buffer.next_message()? {
                return Ok(Some(message));
            }
            // Never read more than the frame at the front still needs, so an oversize header
            // is refused before its payload is read. The read fills the buffer in place: a
            // receiver waiting for its next frame holds no scratch buffer (a device's control
            // stream waits so between heartbeats, on every connection of a node).
            let want = self.buffer.wanted()?.clamp(1, READ_MAX_BYTES);
            let mut room = self.buffer.room(want);
            let n = self.inner.read(room.as_mut_slice()).await?;
            room.filled(n);
            if n == 0 {
                self.buffer.finish()?;
                return Ok(None);
            }
        }
    }

    pub fn set_limits(&mut self, limits: FrameLimits) {
        self.buffer.set_limits(limits);
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// Writes `message` as one frame.
pub async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    message: &Message,
    limits: FrameLimits,
) -> Result<(), SendError> {
    let mut frame = Vec::new();
    encode_frame(message, limits, &mut frame)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// An error code as a QUIC application close (or stream reset) code.
pub fn close_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from(code.0)
}

/// The error code a peer closed the connection with, if it closed it as the protocol does.
pub fn error_code_of(err: &quinn::ConnectionError) -> Option<ErrorCode> {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            u16::try_from(close.error_code.into_inner())
                .ok()
                .map(ErrorCode)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use synesis_proto::message::{Drain, UploadDone};
    use synesis_proto::{MessageType, RequestId};

    use super::*;

    #[tokio::test]
    async fn messages_cross_a_pipe_and_a_clean_end_is_none() {
        let (mut a, b) = tokio::io::duplex(64);
        let sent: Vec<Message> = (0..50)
            .map(|i| {
                Drain {
                    reconnect_after_ms: i,
                    reason: "x".repeat(i as usize),
                    to: None,
                }
                .into()
            })
            .collect();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            for m in &to_send {
                send(&mut a, m, FrameLimits::default()).await.unwrap();
            }
        });
        let mut recv = FramedRecv::new(b, FrameLimits::default());
        let mut got = Vec::new();
        while let Some(m) = recv.next().await.unwrap() {
            got.push(m);
        }
        writer.await.unwrap();
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn an_oversize_header_is_refused_without_reading_the_payload() {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&[MessageType::UploadChunk.as_u8(), 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        let mut recv = FramedRecv::new(b, FrameLimits::default());
        let err = recv.next().await.unwrap_err();
        assert_eq!(err.peer_fault(), Some(ErrorCode::FRAME_OVERSIZE));
    }

    #[tokio::test]
    async fn a_type_not_allowed_is_refused_before_its_payload_arrives() {
        let (mut a, b) = tokio::io::duplex(1024);
        // A header announcing 1 MiB that never comes.
        a.write_all(&[MessageType::UsageRequest.as_u8(), 0, 0x10, 0, 0])
            .await
            .unwrap();
        let mut recv = FramedRecv::new(b, FrameLimits::default());
        let err = recv
            .next_if(|t| t == MessageType::EnrollRequest)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RecvError::NotAllowed(MessageType::UsageRequest)),
            "{err}"
        );
        assert_eq!(err.peer_fault(), Some(ErrorCode::UNEXPECTED_MESSAGE));
    }

    #[tokio::test]
    async fn a_cut_frame_is_truncated_not_a_clean_end() {
        let (mut a, b) = tokio::io::duplex(1024);
        let m: Message = UploadDone {
            upload_id: RequestId::from_parts(1, [1; 10]),
        }
        .into();
        let frame = synesis_proto::encode_frame_vec(&m, FrameLimits::default()).unwrap();
        a.write_all(&frame[..frame.len() - 2]).await.unwrap();
        drop(a);
        let mut recv = FramedRecv::new(b, FrameLimits::default());
        let err = recv.next().await.unwrap_err();
        assert_eq!(err.peer_fault(), Some(ErrorCode::FRAME_TRUNCATED));
    }
}
