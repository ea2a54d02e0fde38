//! Which way a long-lived stream goes to the cloud, and how it is opened again after a break:
//! the shared ground of [`escalate`](crate::escalate) and [`upload`](crate::upload).
//!
//! A stream goes through the running tunnel service ([`Route::Service`], a stream of its
//! connection, ARCHITECTURE.md §5) or over a connection of this process's own
//! ([`Route::Direct`]); a service that is not running makes the route direct. The callers keep
//! one request going across broken streams (PROTOCOL.md §2): they give up on a cloud that was
//! never reached after [`FIRST_CONTACT_FOR`], and on one that stopped answering after
//! [`RECONNECT_FOR`] without progress.
//!
//! Nothing here goes in 0-RTT data: every connection completes its handshake first.

use std::time::Duration;

use bytes::Bytes;
use synesis_proto::{ErrorCode, FrameLimits, Message};
use synesis_wire::{FramedRecv, close_code};
use tokio::sync::mpsc;

use crate::connect::{classify, client_endpoint, dial, resolve};
use crate::identity::Identity;
use crate::local::{ClientError, FailureKind, LocalClient, StreamSender};
use crate::machine::CONNECT_TIMEOUT;
use crate::request::RequestError;
use crate::tls::device_client_config;

/// How long the device keeps trying to get back to a broken request before giving up.
pub const RECONNECT_FOR: Duration = Duration::from_secs(120);
/// How long a request that never reached the cloud keeps trying (a cloud that is down is said
/// so soon, so the caller can answer another way).
pub const FIRST_CONTACT_FOR: Duration = Duration::from_secs(15);
/// The wait between two attempts to reach the cloud again.
pub(crate) const RETRY_EVERY: Duration = Duration::from_millis(500);

/// Which way streams go to the cloud.
#[derive(Debug)]
pub enum Route {
    /// Through the tunnel service's connection (its local API).
    Service(LocalClient, Identity),
    /// A connection of this process's own (kept for the whole request).
    Direct(Identity, Option<Direct>),
}

/// A connection of one's own.
#[derive(Debug)]
pub struct Direct {
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) conn: quinn::Connection,
    /// The node it is connected to (dialled first the next time).
    pub(crate) server: String,
}

/// QUIC's liveness on a connection of one's own: keep-alive every 2 s, dead after 8 s of
/// silence, so a request whose node died goes on with another node in seconds (the service's
/// connection has its heartbeats for that).
const DIRECT_LIVENESS: Duration = Duration::from_secs(2);

/// A connection of one's own to the node at `server`.
async fn dial_node(
    server: &str,
    config: quinn::ClientConfig,
) -> Result<(quinn::Endpoint, quinn::Connection), RequestError> {
    let addr = resolve(server).await?;
    let endpoint = client_endpoint(addr).map_err(|e| RequestError::Transport(e.to_string()))?;
    let conn = dial(&endpoint, config, addr, CONNECT_TIMEOUT).await?;
    Ok((endpoint, conn))
}

impl Route {
    /// The service's route when it runs as this identity's device, else a direct one (a device
    /// in several accounts has a service for one of them at most).
    pub async fn choose(client: LocalClient, identity: Identity) -> Route {
        match client.status().await {
            Ok(s) if s.device_id == identity.info.device_id => Route::Service(client, identity),
            _ => Route::Direct(identity, None),
        }
    }

    pub fn is_service(&self) -> bool {
        matches!(self, Route::Service(..))
    }

    /// A new bidirectional stream to the cloud: its sending half, and what arrives on it.
    pub(crate) async fn open(&mut self) -> Result<Opened, RequestError> {
        if let Route::Service(client, identity) = self {
            match client.open_stream().await {
                Ok(stream) => {
                    let (tx, rx) = mpsc::channel(64);
                    let mut recv = stream.recv;
                    tokio::spawn(async move {
                        loop {
                            let item = match recv.next().await {
                                Ok(Some(m)) => Incoming::Message(m),
                                Ok(None) => Incoming::Ended,
                                Err(e) => Incoming::Broken(e.to_string()),
                            };
                            let last = !matches!(item, Incoming::Message(_));
                            if tx.send(item).await.is_err() || last {
                                return;
                            }
                        }
                    });
                    return Ok(Opened {
                        sink: Sink::Service(stream.send),
                        incoming: rx,
                    });
                }
                Err(ClientError::NotRunning) => {
                    tracing::info!(
                        "the tunnel service is gone; continuing on a connection of its own"
                    );
                    *self = Route::Direct(identity.clone(), None);
                }
                // The service waited for its tunnel to reconnect (`reconnect_wait`) in vain:
                // the cloud may still be reachable on a connection of this process's own.
                Err(ClientError::Refused(f)) if f.kind == FailureKind::NotConnected => {
                    tracing::info!(
                        why = %f.message,
                        "the tunnel service is not connected; continuing on a connection of its own"
                    );
                    *self = Route::Direct(identity.clone(), None);
                }
                Err(e) => return Err(RequestError::Transport(e.to_string())),
            }
        }
        let Route::Direct(identity, direct) = self else {
            return Err(RequestError::Stopped);
        };
        let alive = direct
            .as_ref()
            .is_some_and(|d| d.conn.close_reason().is_none());
        if !alive {
            if let Some(old) = &*direct {
                old.endpoint.close(0u32.into(), b"reconnecting");
            }
            let config = device_client_config(identity, DIRECT_LIVENESS)?;
            let mut nodes = identity.nodes();
            if let Some(old) = &*direct {
                nodes.go_to(&old.server);
            }
            let (endpoint, conn) = match dial_node(nodes.current(), config.clone()).await {
                Ok(dialled) => dialled,
                // The node it was on (or the token's) is gone: the others, each once.
                Err(first) if nodes.all().len() > 1 => {
                    let mut last = first;
                    let mut dialled = None;
                    for _ in 1..nodes.all().len() {
                        nodes.failed();
                        match dial_node(nodes.current(), config.clone()).await {
                            Ok(d) => {
                                dialled = Some(d);
                                break;
                            }
                            Err(e) => last = e,
                        }
                    }
                    dialled.ok_or(last)?
                }
                Err(first) => return Err(first),
            };
            *direct = Some(Direct {
                endpoint,
                conn,
                server: nodes.current().to_owned(),
            });
        }
        let Some(d) = direct.as_ref() else {
            return Err(RequestError::Stopped);
        };
        let (send, recv) = tokio::time::timeout(CONNECT_TIMEOUT, d.conn.open_bi())
            .await
            .map_err(|_| RequestError::TimedOut("no stream could be opened".into()))?
            .map_err(|e| RequestError::from(classify(&e)))?;
        let (tx, rx) = mpsc::channel(64);
        let conn = d.conn.clone();
        tokio::spawn(async move {
            let mut recv = FramedRecv::new(recv, FrameLimits::default());
            loop {
                let item = tokio::select! {
                    m = recv.next() => match m {
                        Ok(Some(m)) => Incoming::Message(m),
                        Ok(None) => Incoming::Ended,
                        Err(e) => Incoming::Broken(e.to_string()),
                    },
                    closed = conn.closed() => Incoming::Broken(closed.to_string()),
                };
                let last = !matches!(item, Incoming::Message(_));
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Opened {
            sink: Sink::Direct(send),
            incoming: rx,
        })
    }

    /// Closes a direct connection politely (the service's stays).
    pub async fn close(self) {
        if let Route::Direct(_, Some(d)) = self {
            d.conn.close(0u32.into(), b"done");
            let _ = tokio::time::timeout(Duration::from_secs(1), d.endpoint.wait_idle()).await;
        }
    }
}

/// One stream, opened.
pub(crate) struct Opened {
    pub(crate) sink: Sink,
    /// What the cloud sends, in order; the last item is `Ended` or `Broken`.
    pub(crate) incoming: mpsc::Receiver<Incoming>,
}

/// The sending half of a stream, whichever way it goes.
pub(crate) enum Sink {
    Service(StreamSender),
    Direct(quinn::SendStream),
}

impl Sink {
    pub(crate) async fn send(&mut self, message: &Message) -> Result<(), String> {
        match self {
            Sink::Service(s) => s.send(message).await.map_err(|e| e.to_string()),
            Sink::Direct(s) => synesis_wire::send(s, message, FrameLimits::default())
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Writes one whole frame encoded already (an upload chunk read into its frame), without
    /// copying it on a direct connection. Not cancel-safe: a write dropped halfway leaves part
    /// of the frame on the stream, which must then be [reset](Sink::reset).
    pub(crate) async fn send_frame(&mut self, frame: Bytes) -> Result<(), String> {
        match self {
            Sink::Service(s) => s.send_frame(&frame).await.map_err(|e| e.to_string()),
            Sink::Direct(s) => s.write_chunk(frame).await.map_err(|e| e.to_string()),
        }
    }

    /// Nothing more will be sent: the stream's sending half ends cleanly, after what was
    /// written (which is still delivered).
    pub(crate) async fn finish(self) -> Result<(), String> {
        match self {
            Sink::Service(s) => s.finish().await.map_err(|e| e.to_string()),
            Sink::Direct(mut s) => s.finish().map_err(|e| e.to_string()),
        }
    }

    /// Abandons the sending half: what is still in flight is discarded, and the cloud sees the
    /// stream reset with `CANCELLED` (through the service: the client going away does that).
    pub(crate) fn reset(self) {
        match self {
            Sink::Service(s) => drop(s),
            Sink::Direct(mut s) => {
                let _ = s.reset(close_code(ErrorCode::CANCELLED));
            }
        }
    }
}

/// What arrives on a stream.
pub(crate) enum Incoming {
    Message(Message),
    /// The cloud finished the stream.
    Ended,
    /// The stream or its connection failed.
    Broken(String),
}

/// Failures worth another try while the request may still be resumed.
pub(crate) fn retryable(e: &RequestError) -> bool {
    matches!(
        e,
        RequestError::NotConnected | RequestError::TimedOut(_) | RequestError::Transport(_)
    )
}
