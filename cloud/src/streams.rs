//! What every stream handler shares: a stream's two halves, reading its first frame (with a
//! deadline, and refusing a type that does not belong from its type byte), error replies, and
//! a stream's last message.

use std::time::Duration;

use synesis_proto::message::ErrorMsg;
use synesis_proto::{ErrorCode, FrameLimits, Message, MessageType, RequestId};
use synesis_wire::{FramedRecv, RecvError, close_code, send};
use tokio::time::timeout;

/// A stream must say what it is (its first frame) within this time.
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long sending one reply may wait for the peer's flow control.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a last message (before a stream or connection is closed) may take to arrive.
const LAST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(1);

/// One bidirectional stream: each handler owns both halves.
#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) tx: quinn::SendStream,
    pub(crate) rx: FramedRecv<quinn::RecvStream>,
    /// The frames the peer takes: the protocol's maximum, or the lower one its `Hello`
    /// announced (PROTOCOL.md §3: both then use the lower).
    pub(crate) sends: FrameLimits,
}

/// How a stream's first frame went.
// Once per stream, moved straight into its handler: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum First {
    Message(Message),
    /// The peer finished the stream without a frame.
    Empty,
    /// Answered with an error already; the stream is done.
    Refused,
}

impl Stream {
    pub(crate) fn new(tx: quinn::SendStream, rx: quinn::RecvStream, limits: FrameLimits) -> Self {
        Stream {
            tx,
            rx: FramedRecv::new(rx, limits),
            sends: FrameLimits::default(),
        }
    }

    /// The first frame, if `allowed` accepts its type and it arrives in time. Anything else is
    /// answered here: a type that is not allowed with `refusal` (before its payload is read),
    /// a framing error with its code, silence with `UNEXPECTED_MESSAGE`.
    pub(crate) async fn first(
        &mut self,
        allowed: impl Fn(MessageType) -> bool,
        refusal: ErrorCode,
    ) -> First {
        match timeout(FIRST_FRAME_TIMEOUT, self.rx.next_if(allowed)).await {
            Ok(Ok(Some(m))) => First::Message(m),
            Ok(Ok(None)) => First::Empty,
            Ok(Err(RecvError::NotAllowed(t))) => {
                self.reject(refusal, format!("{} cannot open this stream", t.name()))
                    .await;
                First::Refused
            }
            Ok(Err(e)) => {
                let code = e.peer_fault().unwrap_or(ErrorCode::INTERNAL);
                self.reject(code, e.to_string()).await;
                First::Refused
            }
            Err(_) => {
                self.reject(
                    ErrorCode::UNEXPECTED_MESSAGE,
                    format!("no frame within {} s", FIRST_FRAME_TIMEOUT.as_secs()),
                )
                .await;
                First::Refused
            }
        }
    }

    /// Answers a bad stream with an error and stops reading it; the connection lives on.
    pub(crate) async fn reject(&mut self, code: ErrorCode, why: String) {
        let _ = self.rx.get_mut().stop(close_code(code));
        self.send_last(&error_msg(code, why, None)).await;
    }

    /// Ends a stream on a frame that does not belong: stops reading, sends `reply`.
    pub(crate) async fn reject_with(&mut self, reply: Message) {
        let code = match &reply {
            Message::ErrorMsg(e) => e.code,
            _ => ErrorCode::UNEXPECTED_MESSAGE,
        };
        let _ = self.rx.get_mut().stop(close_code(code));
        self.send_last(&reply).await;
    }

    /// Sends a stream's last message and waits (briefly) until the peer has it, so that
    /// closing the connection next does not discard it.
    ///
    /// A message too large for the frames the peer takes is not sent: the peer gets `INTERNAL`
    /// saying so (a reply that can be cut to fit, like a usage page, is cut before it comes
    /// here).
    pub(crate) async fn send_last(&mut self, message: &Message) {
        let tx = &mut self.tx;
        // A peer that gives no flow-control credit holds this task for `SEND_TIMEOUT` at most.
        let sent = match timeout(SEND_TIMEOUT, send(tx, message, self.sends)).await {
            Ok(Err(synesis_wire::SendError::Encode(e))) => {
                tracing::error!(error = %e, kind = message.message_type().name(), "a reply does not fit the peer's frames");
                let reply = error_msg(
                    ErrorCode::INTERNAL,
                    format!("the reply does not fit the largest frame this connection takes: {e}"),
                    None,
                );
                timeout(SEND_TIMEOUT, send(tx, &reply, self.sends)).await
            }
            sent => sent,
        };
        if matches!(sent, Ok(Ok(()))) && tx.finish().is_ok() {
            let _ = timeout(LAST_MESSAGE_TIMEOUT, tx.stopped()).await;
        }
    }
}

pub(crate) fn error_msg(
    code: ErrorCode,
    message: impl Into<String>,
    request_id: Option<RequestId>,
) -> Message {
    ErrorMsg {
        code,
        message: message.into(),
        request_id,
        retry_after_ms: None,
    }
    .into()
}
