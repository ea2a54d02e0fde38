//! The client side of the local API, for `synesis` commands (the protocol is described in
//! [`super`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use synesis_proto::{Decoded, FRAME_HEADER_BYTES, FrameLimits, Message, decode_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::events::Event;
use super::server::CLIENT_TIMEOUT;
use super::{
    FrameFault, Header, LOCAL_REPLY, LOCAL_REQUEST, LocalFailure, LocalReply, LocalRequest,
    read_header, read_payload, socket_path, write_local,
};
use crate::TunnelStatus;

/// How long a question to the service may take (a status, a ping, a stream opened, an account
/// request answered): the service's own bound on a client is below it, so it gives up first.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(30);
const _: () = assert!(ASK_TIMEOUT.as_millis() > CLIENT_TIMEOUT.as_millis());

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("the tunnel service is not running")]
    NotRunning,
    #[error("the tunnel service did not answer within {0:?}")]
    Timeout(Duration),
    /// The service answered with a refusal (not connected, busy, …).
    #[error("the tunnel service refused: {0}")]
    Refused(LocalFailure),
    /// An open cloud stream failed.
    #[error("the cloud stream failed: {0}")]
    Stream(LocalFailure),
    #[error("the tunnel service closed the connection {0}")]
    Closed(&'static str),
    #[error("the tunnel service broke the local protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Send(#[from] synesis_wire::SendError),
    #[error("local API: {0}")]
    Io(#[from] std::io::Error),
}

impl From<FrameFault> for ClientError {
    fn from(e: FrameFault) -> ClientError {
        match e {
            FrameFault::Truncated => ClientError::Closed("inside a frame"),
            FrameFault::Io(e) => ClientError::Io(e),
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

/// Asks the tunnel service whose runtime directory it is given.
#[derive(Debug, Clone)]
pub struct LocalClient {
    socket: PathBuf,
}

impl LocalClient {
    pub fn new(runtime_dir: &Path) -> LocalClient {
        LocalClient {
            socket: socket_path(runtime_dir),
        }
    }

    pub async fn status(&self) -> Result<TunnelStatus, ClientError> {
        match self.ask(&LocalRequest::Status).await? {
            LocalReply::Status { status } => Ok(status),
            other => Err(unexpected(&other)),
        }
    }

    /// The round trip of one heartbeat the service sends now.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        match self.ask(&LocalRequest::Ping).await? {
            LocalReply::Pong { rtt_nanos } => Ok(Duration::from_nanos(rtt_nanos)),
            other => Err(unexpected(&other)),
        }
    }

    /// A new stream on the tunnel's connection, for the caller alone, opened within
    /// [`ASK_TIMEOUT`]; once open it has no time limit.
    pub async fn open_stream(&self) -> Result<LocalStream, ClientError> {
        bounded(self.open_stream_unbounded()).await
    }

    /// One request and its reply (an account request) on a stream of its own, within
    /// [`ASK_TIMEOUT`]. The reply may be an `ErrorMsg`: interpreting it is the caller's business.
    pub async fn request(&self, message: &Message) -> Result<Message, ClientError> {
        bounded(async {
            let LocalStream { mut send, mut recv } = self.open_stream_unbounded().await?;
            send.send(message).await?;
            send.finish().await?;
            recv.next()
                .await?
                .ok_or(ClientError::Closed("without an answer from the cloud"))
        })
        .await
    }

    /// The service's events from now on ([`super::events`]), until the service stops.
    pub async fn events(&self) -> Result<EventFeed, ClientError> {
        bounded(async {
            let (read, mut write) = self.connect().await?;
            write_local(&mut write, LOCAL_REQUEST, &LocalRequest::Events).await?;
            let mut recv = StreamReceiver { read, ended: false };
            match recv.local_reply().await? {
                LocalReply::Subscribed => Ok(EventFeed {
                    recv,
                    _write: write,
                }),
                other => Err(unexpected(&other)),
            }
        })
        .await
    }

    /// Work the service does itself (a generation with a model it keeps loaded): each piece of
    /// text to `on_piece` as it comes, then the result. Dropping the future stops the work.
    pub async fn work(
        &self,
        work: &serde_json::Value,
        on_piece: &mut (dyn FnMut(&str) + Send),
    ) -> Result<serde_json::Value, ClientError> {
        let (read, mut write) = bounded(self.connect()).await?;
        write_local(
            &mut write,
            LOCAL_REQUEST,
            &LocalRequest::Work { work: work.clone() },
        )
        .await?;
        let mut recv = StreamReceiver { read, ended: false };
        // `write` stays open until the end: closing it tells the service this client left.
        loop {
            match recv.local_reply().await? {
                LocalReply::Piece { text } => on_piece(&text),
                LocalReply::Worked { result } => return Ok(result),
                other => return Err(unexpected(&other)),
            }
        }
    }

    async fn open_stream_unbounded(&self) -> Result<LocalStream, ClientError> {
        let (read, mut write) = self.connect().await?;
        write_local(&mut write, LOCAL_REQUEST, &LocalRequest::Open).await?;
        let mut recv = StreamReceiver { read, ended: false };
        match recv.local_reply().await? {
            LocalReply::Opened => Ok(LocalStream {
                send: StreamSender { write },
                recv,
            }),
            other => Err(unexpected(&other)),
        }
    }

    async fn ask(&self, request: &LocalRequest) -> Result<LocalReply, ClientError> {
        bounded(async {
            let (read, mut write) = self.connect().await?;
            write_local(&mut write, LOCAL_REQUEST, request).await?;
            StreamReceiver { read, ended: false }.local_reply().await
        })
        .await
    }

    async fn connect(&self) -> Result<(OwnedReadHalf, OwnedWriteHalf), ClientError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning
                }
                _ => ClientError::Io(e),
            })?;
        Ok(stream.into_split())
    }
}

async fn bounded<T>(work: impl Future<Output = Result<T, ClientError>>) -> Result<T, ClientError> {
    tokio::time::timeout(ASK_TIMEOUT, work)
        .await
        .map_err(|_| ClientError::Timeout(ASK_TIMEOUT))?
}

fn unexpected(reply: &LocalReply) -> ClientError {
    match reply {
        LocalReply::Refused { failure } => ClientError::Refused(failure.clone()),
        other => ClientError::Protocol(format!("unexpected reply {other:?}")),
    }
}

/// The service's events, as they happen.
#[derive(Debug)]
pub struct EventFeed {
    recv: StreamReceiver,
    /// Held: closing it tells the service this subscriber left.
    _write: OwnedWriteHalf,
}

impl EventFeed {
    /// The next event; `None` once the service stopped.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        match self.recv.local_reply().await {
            Ok(LocalReply::Event { event }) => Ok(Some(event)),
            Ok(LocalReply::End { .. }) | Err(ClientError::Closed(_)) => Ok(None),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(e),
        }
    }
}

/// A cloud stream through the service: cloud protocol frames both ways.
#[derive(Debug)]
pub struct LocalStream {
    pub send: StreamSender,
    pub recv: StreamReceiver,
}

/// The sending half. [`finish`](StreamSender::finish) ends it; dropping it unfinished cancels
/// the whole stream (the service resets it on the cloud).
#[derive(Debug)]
pub struct StreamSender {
    write: OwnedWriteHalf,
}

impl StreamSender {
    pub async fn send(&mut self, message: &Message) -> Result<(), ClientError> {
        synesis_wire::send(&mut self.write, message, FrameLimits::default()).await?;
        Ok(())
    }

    /// Writes one cloud frame encoded already (an upload chunk built in place). The caller
    /// vouches that it is one whole, valid frame: the service checks its type byte and length
    /// and passes the payload through unread.
    pub(crate) async fn send_frame(&mut self, frame: &[u8]) -> Result<(), ClientError> {
        self.write.write_all(frame).await?;
        Ok(())
    }

    /// Nothing more to send; the answer keeps coming.
    pub async fn finish(mut self) -> Result<(), ClientError> {
        write_local(&mut self.write, LOCAL_REQUEST, &LocalRequest::Finish).await?;
        Ok(())
    }
}

/// The receiving half.
#[derive(Debug)]
pub struct StreamReceiver {
    read: OwnedReadHalf,
    ended: bool,
}

impl StreamReceiver {
    /// The cloud's next message; `None` once the cloud finished the stream. A failed stream is
    /// [`ClientError::Stream`]. Not cancel-safe: a call dropped halfway loses the stream's place.
    pub async fn next(&mut self) -> Result<Option<Message>, ClientError> {
        if self.ended {
            return Ok(None);
        }
        let header = read_header(&mut self.read, true)
            .await?
            .ok_or(ClientError::Closed("before the end of the stream"))?;
        match header {
            Header::Local {
                ty: LOCAL_REPLY,
                len,
            } => {
                let reply = serde_json::from_slice(&read_payload(&mut self.read, len).await?)
                    .map_err(FrameFault::from)?;
                self.ended = true;
                match reply {
                    LocalReply::End { failure: None } => Ok(None),
                    LocalReply::End {
                        failure: Some(failure),
                    } => Err(ClientError::Stream(failure)),
                    other => Err(unexpected(&other)),
                }
            }
            Header::Local { ty, .. } => Err(ClientError::Protocol(format!(
                "frame type {ty:#04x} from the service"
            ))),
            Header::Cloud { len, .. } => {
                let mut frame = vec![0u8; FRAME_HEADER_BYTES + len as usize];
                frame[..FRAME_HEADER_BYTES].copy_from_slice(&header.bytes());
                self.read
                    .read_exact(&mut frame[FRAME_HEADER_BYTES..])
                    .await
                    .map_err(|_| ClientError::Closed("inside a frame"))?;
                match decode_frame(&frame, FrameLimits::default()) {
                    Ok(Decoded::Frame { message, .. }) => Ok(Some(message)),
                    Ok(Decoded::NeedMore { .. }) => Err(ClientError::Protocol(
                        "a frame shorter than its header".into(),
                    )),
                    Err(e) => Err(ClientError::Protocol(e.to_string())),
                }
            }
        }
    }

    async fn local_reply(&mut self) -> Result<LocalReply, ClientError> {
        match read_header(&mut self.read, true).await? {
            Some(Header::Local {
                ty: LOCAL_REPLY,
                len,
            }) => Ok(
                serde_json::from_slice(&read_payload(&mut self.read, len).await?)
                    .map_err(FrameFault::from)?,
            ),
            Some(_) => Err(ClientError::Protocol(
                "a cloud frame before the service's reply".into(),
            )),
            None => Err(ClientError::Closed("without answering")),
        }
    }
}
