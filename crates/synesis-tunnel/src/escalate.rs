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

use synesis_proto::message::{
    EscalationCancel, EscalationDone, EscalationRequest, EscalationResume,
};
use synesis_proto::{ErrorCode, Message};
use tokio::sync::watch;

use crate::request::{RequestError, answer};
pub use crate::route::{Direct, FIRST_CONTACT_FOR, RECONNECT_FOR, Route};
use crate::route::{Incoming, RETRY_EVERY, retryable};

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
#[derive(Debug, Clone, PartialEq)]
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
    // The last break the caller was told of: the same one again (each retry while waiting
    // for another node) is not repeated.
    let mut told = String::new();
    loop {
        // Cancelled before the cloud has the request (still looking for it, or it lost it):
        // nothing to stop there, and nothing to send that would be charged.
        if fresh && *cancel.borrow() {
            return Err(RequestError::Refused {
                code: ErrorCode::CANCELLED,
                message: "cancelled before the request reached the cloud".into(),
            });
        }
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
                    told.clear();
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
                    // Retryable failures of the cloud once it had the request (it is draining;
                    // the request still runs on a node this device lost, not yet known dead):
                    // the same id later.
                    if let Message::ErrorMsg(e) = &m
                        && e.code == ErrorCode::UNAVAILABLE
                        && (next_seq > 0 || resumed > 0)
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
            if broke != told {
                on(Progress::Interrupted(&broke));
                told = broke;
            }
            resumed += 1;
            fresh = false;
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }
}
