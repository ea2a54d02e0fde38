//! One escalation from the device's side: the request, its chunks in order, its end — across
//! broken connections (PROTOCOL.md §2, *Escalation*).
//!
//! The stream goes through the running tunnel service ([`Route::Service`], a stream of its
//! connection) or over a connection of this process's own ([`Route::Direct`]); a service that
//! is not running makes the route direct. When the stream breaks mid-answer, the same request
//! continues on a new stream with `EscalationResume { next_seq }`: chunks already shown are
//! never shown again, and none is missed (a chunk out of order is a broken stream, resumed). A
//! cloud that no longer holds the answer (it restarted) says `NOT_FOUND`; the request is then
//! sent again with the same id and the answer starts over from chunk 0, which the caller is
//! told ([`Progress::StartedOver`]) — the cloud charges it once either way. Cancelling sends
//! `EscalationCancel` and waits for the cloud's `EscalationDone` (what was produced is charged).
//!
//! Nothing here goes in 0-RTT data: every connection completes its handshake first.

use std::time::Duration;

use synesis_proto::message::{
    EscalationCancel, EscalationDone, EscalationRequest, EscalationResume,
};
use synesis_proto::{ErrorCode, FrameLimits, Message};
use synesis_wire::FramedRecv;
use tokio::sync::{mpsc, watch};

use crate::connect::{classify, client_endpoint, dial, resolve};
use crate::identity::Identity;
use crate::local::{ClientError, LocalClient, StreamSender};
use crate::machine::{CONNECT_TIMEOUT, HEARTBEAT_INTERVAL_DEFAULT};
use crate::request::{RequestError, answer};
use crate::tls::device_client_config;

/// How long the device keeps trying to get back to a broken answer before giving up.
pub const RECONNECT_FOR: Duration = Duration::from_secs(120);
/// How long a request that never reached the cloud keeps trying (a cloud that is down is said
/// so soon, so the caller can answer another way).
pub const FIRST_CONTACT_FOR: Duration = Duration::from_secs(15);
/// The wait between two attempts to reach the cloud again.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// Which way streams go to the cloud.
#[derive(Debug)]
pub enum Route {
    /// Through the tunnel service's connection (its local API).
    Service(LocalClient, Identity),
    /// A connection of this process's own (kept for the whole escalation).
    Direct(Identity, Option<Direct>),
}

/// A connection of one's own.
#[derive(Debug)]
pub struct Direct {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl Route {
    /// The service's route when it runs, else a direct one.
    pub async fn choose(client: LocalClient, identity: Identity) -> Route {
        match client.status().await {
            Ok(_) => Route::Service(client, identity),
            Err(_) => Route::Direct(identity, None),
        }
    }

    pub fn is_service(&self) -> bool {
        matches!(self, Route::Service(..))
    }

    async fn open(&mut self) -> Result<Opened, RequestError> {
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
                Err(e @ (ClientError::Refused(_) | ClientError::Timeout(_))) => {
                    return Err(RequestError::Transport(e.to_string()));
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
            if let Some(old) = direct.take() {
                old.endpoint.close(0u32.into(), b"reconnecting");
            }
            let config = device_client_config(identity, HEARTBEAT_INTERVAL_DEFAULT)?;
            let addr = resolve(&identity.info.server).await?;
            let endpoint =
                client_endpoint(addr).map_err(|e| RequestError::Transport(e.to_string()))?;
            let conn = dial(&endpoint, config, addr, CONNECT_TIMEOUT).await?;
            *direct = Some(Direct { endpoint, conn });
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

struct Opened {
    sink: Sink,
    incoming: mpsc::Receiver<Incoming>,
}

enum Sink {
    Service(StreamSender),
    Direct(quinn::SendStream),
}

impl Sink {
    async fn send(&mut self, message: &Message) -> Result<(), String> {
        match self {
            Sink::Service(s) => s.send(message).await.map_err(|e| e.to_string()),
            Sink::Direct(s) => synesis_wire::send(s, message, FrameLimits::default())
                .await
                .map_err(|e| e.to_string()),
        }
    }
}

enum Incoming {
    Message(Message),
    Ended,
    Broken(String),
}

/// What the caller is told while the answer comes.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress<'a> {
    /// The next piece of the answer, in order, once.
    Text(&'a str),
    /// The connection broke; the device is getting back to the answer.
    Interrupted(&'a str),
    /// Back on the answer where it was left.
    Resumed { next_seq: u32 },
    /// The cloud no longer held the answer: it starts again from its beginning.
    StartedOver,
}

/// A finished escalation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escalated {
    pub done: EscalationDone,
    /// The answer's text, every chunk once.
    pub text: String,
    /// How many times the answer was resumed after a break.
    pub resumed: u32,
    /// How many times it started over (the cloud had lost it).
    pub started_over: u32,
}

/// Runs `request` to its end; `cancel` turning true cancels it (the cloud's `EscalationDone`
/// for what was produced still comes back).
pub async fn escalate(
    route: &mut Route,
    request: &EscalationRequest,
    mut cancel: watch::Receiver<bool>,
    on: &mut (dyn FnMut(Progress<'_>) + Send),
) -> Result<Escalated, RequestError> {
    let id = request.request_id;
    let mut text = String::new();
    let mut next_seq: u32 = 0;
    let (mut resumed, mut started_over) = (0, 0);
    let mut fresh = true; // send the request itself (not a resume)
    let mut cancelled = *cancel.borrow();
    let mut giving_up_at = tokio::time::Instant::now() + FIRST_CONTACT_FOR;
    loop {
        let mut opened = match route.open().await {
            Ok(o) => o,
            Err(e) if retryable(&e) && tokio::time::Instant::now() < giving_up_at => {
                tracing::debug!(error = %e, "the cloud is not reachable yet");
                tokio::time::sleep(RETRY_EVERY).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let opening: Message = if fresh {
            request.clone().into()
        } else {
            EscalationResume {
                request_id: id,
                next_seq,
            }
            .into()
        };
        if let Err(why) = opened.sink.send(&opening).await {
            if tokio::time::Instant::now() >= giving_up_at {
                return Err(RequestError::Transport(why));
            }
            on(Progress::Interrupted(&why));
            tokio::time::sleep(RETRY_EVERY).await;
            continue;
        }
        if !fresh {
            on(Progress::Resumed { next_seq });
        }
        if next_seq == 0 {
            // The cloud has the request: from now on a break is worth waiting out.
            giving_up_at = tokio::time::Instant::now() + RECONNECT_FOR;
        }
        if cancelled {
            let _ = opened
                .sink
                .send(&EscalationCancel { request_id: id }.into())
                .await;
        }
        let broke = loop {
            let item = tokio::select! {
                changed = cancel.changed(), if !cancelled => {
                    if changed.is_ok() && *cancel.borrow() {
                        cancelled = true;
                        let _ = opened.sink.send(&EscalationCancel { request_id: id }.into()).await;
                    }
                    continue;
                }
                item = opened.incoming.recv() => item,
            };
            match item {
                Some(Incoming::Message(Message::EscalationChunk(c))) if c.request_id == id => {
                    if c.seq < next_seq {
                        continue; // a repeat after a resume: shown already
                    }
                    if c.seq > next_seq {
                        break format!("chunk {} came before chunk {next_seq}", c.seq);
                    }
                    next_seq += 1;
                    giving_up_at = tokio::time::Instant::now() + RECONNECT_FOR;
                    text.push_str(&c.text);
                    on(Progress::Text(&c.text));
                }
                Some(Incoming::Message(Message::EscalationDone(done))) if done.request_id == id => {
                    if done.chunks != next_seq {
                        break format!("the answer has {} chunks; {next_seq} arrived", done.chunks);
                    }
                    return Ok(Escalated {
                        done,
                        text,
                        resumed,
                        started_over,
                    });
                }
                Some(Incoming::Message(Message::ErrorMsg(e)))
                    if e.code == ErrorCode::NOT_FOUND && !fresh =>
                {
                    // The cloud restarted (or the request never reached it): the same request
                    // again, from the start. Only an answer already begun starts *over*.
                    if next_seq > 0 {
                        on(Progress::StartedOver);
                        started_over += 1;
                    }
                    text.clear();
                    next_seq = 0;
                    fresh = true;
                    break String::new();
                }
                Some(Incoming::Message(m @ Message::ErrorMsg(_))) => {
                    // Retryable failures of the cloud (it is draining): the same id later.
                    if let Message::ErrorMsg(e) = &m
                        && e.code == ErrorCode::UNAVAILABLE
                        && next_seq > 0
                        && tokio::time::Instant::now() < giving_up_at
                    {
                        break e.message.clone();
                    }
                    return Err(answer(m)
                        .err()
                        .unwrap_or(RequestError::Transport("the cloud refused".into())));
                }
                Some(Incoming::Message(other)) => {
                    return Err(RequestError::Transport(format!(
                        "the cloud sent {} on an escalation",
                        other.message_type().name()
                    )));
                }
                Some(Incoming::Ended) => {
                    break "the cloud ended the stream before the answer's end".into();
                }
                Some(Incoming::Broken(why)) => break why,
                None => break "the stream's reader stopped".into(),
            }
        };
        if !broke.is_empty() {
            if tokio::time::Instant::now() >= giving_up_at {
                return Err(RequestError::TimedOut(format!(
                    "the answer broke off ({broke}) and could not be resumed within {} s",
                    RECONNECT_FOR.as_secs()
                )));
            }
            on(Progress::Interrupted(&broke));
            resumed += 1;
            fresh = false;
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }
}

/// Failures worth another try while the answer may still be resumed.
fn retryable(e: &RequestError) -> bool {
    matches!(
        e,
        RequestError::NotConnected | RequestError::TimedOut(_) | RequestError::Transport(_)
    )
}
