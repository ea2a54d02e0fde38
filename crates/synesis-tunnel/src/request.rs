//! One request and its reply on a stream of its own: on the tunnel's connection when a tunnel
//! runs ([`TunnelHandle::request`](crate::TunnelHandle::request)), else on a fresh mutual-TLS
//! connection ([`request`]).

use std::time::Duration;

use synesis_proto::message::ErrorMsg;
use synesis_proto::{ErrorCode, FrameLimits, Message};
use synesis_wire::{FramedRecv, send};

use crate::connect::{classify, client_endpoint, closed_or, dial, resolve};
use crate::identity::Identity;
use crate::machine::{CONNECT_TIMEOUT, Failure, Fatal, HEARTBEAT_INTERVAL_DEFAULT};
use crate::tls::{TlsError, device_client_config};

/// Why a request did not get the answer asked for. Callers branch on the variant: the first
/// four do not heal by retrying; `NotConnected` and `Stopped` (from
/// [`TunnelHandle::request`](crate::TunnelHandle::request)) mean "use a connection of your
/// own"; `TimedOut` and `Transport` may heal; `Refused` is the cloud's answer, made from an
/// `ErrorMsg` by [`answer`] (the request functions return replies as they came).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The cloud revoked this device: at the handshake, on the connection, or in a reply
    /// (`DEVICE_REVOKED` arrives all three ways and means the same).
    #[error(
        "this device was revoked by the cloud; enroll it again with `synesis cloud login TOKEN`"
    )]
    Revoked,
    /// The cloud does not accept this device's certificate.
    #[error("the cloud refused this device's identity: {0}")]
    BadIdentity(String),
    #[error("incompatible protocol version: {0}")]
    IncompatibleVersion(String),
    /// This device's own files do not make a TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the tunnel is not connected")]
    NotConnected,
    #[error("the tunnel has stopped")]
    Stopped,
    /// No connection, stream or answer within [`CONNECT_TIMEOUT`].
    #[error("{0}")]
    TimedOut(String),
    /// The cloud answered with an error.
    #[error("the cloud refused: {message} ({code})")]
    Refused { code: ErrorCode, message: String },
    /// The connection or the stream failed otherwise (unreachable, reset, closed, bad frame).
    #[error("{0}")]
    Transport(String),
}

impl From<Failure> for RequestError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Fatal(Fatal::Revoked) => RequestError::Revoked,
            Failure::Fatal(Fatal::BadIdentity(why)) => RequestError::BadIdentity(why),
            Failure::Fatal(Fatal::IncompatibleVersion(why)) => {
                RequestError::IncompatibleVersion(why)
            }
            Failure::TimedOut(why) => RequestError::TimedOut(why),
            Failure::Transient(why) => RequestError::Transport(why),
        }
    }
}

/// The reply as an answer: an `ErrorMsg` becomes [`RequestError::Refused`] (or
/// [`RequestError::Revoked`]), anything else is returned. Use it on every reply whose meaning
/// matters to you; only a proxy passes an `ErrorMsg` on as it is.
pub fn answer(reply: Message) -> Result<Message, RequestError> {
    match reply {
        Message::ErrorMsg(ErrorMsg {
            code: ErrorCode::DEVICE_REVOKED,
            ..
        }) => Err(RequestError::Revoked),
        Message::ErrorMsg(ErrorMsg { code, message, .. }) => {
            Err(RequestError::Refused { code, message })
        }
        reply => Ok(reply),
    }
}

/// Sends `message` on a new stream of a fresh connection and returns the first message that
/// comes back, an `ErrorMsg` too ([`answer`] interprets it). A node that cannot be reached is
/// passed over for the next the device knows ([`Nodes`](crate::nodes::Nodes)): the request
/// id makes a repeat harmless.
pub async fn request(identity: &Identity, message: Message) -> Result<Message, RequestError> {
    let config = device_client_config(identity, HEARTBEAT_INTERVAL_DEFAULT)?;
    let mut nodes = identity.nodes();
    let mut tries = nodes.all().len();
    loop {
        match exchange(config.clone(), nodes.current(), &message).await {
            Err(e @ (Failure::TimedOut(_) | Failure::Transient(_))) if tries > 1 => {
                tracing::info!(server = %nodes.current(), error = ?e, "trying the cloud's next node");
                nodes.failed();
                tries -= 1;
            }
            result => return Ok(result?),
        }
    }
}

/// One request and its reply on a fresh connection made with `config` to `server`; the
/// connection is closed after. A reply of any kind (an `ErrorMsg` too) is `Ok`: interpreting it
/// is the caller's business; failing to get one is a [`Failure`].
pub(crate) async fn exchange(
    config: quinn::ClientConfig,
    server: &str,
    message: &Message,
) -> Result<Message, Failure> {
    let addr = resolve(server).await?;
    let endpoint = client_endpoint(addr).map_err(|e| Failure::Transient(e.to_string()))?;
    let conn = dial(&endpoint, config, addr, CONNECT_TIMEOUT).await?;
    let result = exchange_on(&conn, message).await;
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result
}

/// One request and its reply on a new stream of `conn` (which stays open), within
/// [`CONNECT_TIMEOUT`] in all: opening (which waits while the connection's stream limit is
/// reached), sending (which waits for the cloud's flow control) and the answer.
pub(crate) async fn exchange_on(
    conn: &quinn::Connection,
    message: &Message,
) -> Result<Message, Failure> {
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let (mut tx, rx) = tokio::time::timeout_at(deadline, conn.open_bi())
        .await
        .map_err(|_| Failure::TimedOut("no stream could be opened within the timeout".into()))?
        .map_err(|e| classify(&e))?;
    tokio::time::timeout_at(deadline, send(&mut tx, message, FrameLimits::default()))
        .await
        .map_err(|_| Failure::TimedOut("the request could not be sent within the timeout".into()))?
        .map_err(|e| {
            conn.close_reason()
                .map_or(Failure::Transient(e.to_string()), |r| classify(&r))
        })?;
    let _ = tx.finish();
    let mut rx = FramedRecv::new(rx, FrameLimits::default());
    let reply = tokio::select! {
        reply = tokio::time::timeout_at(deadline, rx.next()) => reply,
        closed = conn.closed() => return Err(classify(&closed)),
    };
    match reply {
        Ok(Ok(Some(reply))) => Ok(reply),
        Ok(Ok(None)) => Err(closed_or(
            conn,
            "the cloud closed the stream without answering".into(),
        )),
        Ok(Err(e)) => Err(closed_or(conn, e.to_string())),
        Err(_) => Err(Failure::TimedOut("no answer within the timeout".into())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use synesis_proto::RequestId;
    use synesis_proto::message::DeviceLeft;

    use super::*;

    fn error_msg(code: ErrorCode) -> Message {
        ErrorMsg {
            code,
            message: "no".into(),
            request_id: None,
            retry_after_ms: None,
        }
        .into()
    }

    #[test]
    fn an_error_reply_is_a_refusal_with_its_code_and_revocation_is_its_own_variant() {
        assert!(matches!(
            answer(error_msg(ErrorCode::TOKEN_USED)),
            Err(RequestError::Refused { code: ErrorCode::TOKEN_USED, message }) if message == "no"
        ));
        assert!(matches!(
            answer(error_msg(ErrorCode::DEVICE_REVOKED)),
            Err(RequestError::Revoked)
        ));
        let left: Message = DeviceLeft {
            request_id: RequestId::from_parts(1, [1; 10]),
            device_id: "0190f3a2-7c1e-7b3d-9f00-00000000d001".parse().unwrap(),
        }
        .into();
        assert!(matches!(answer(left), Ok(Message::DeviceLeft(_))));
    }

    #[test]
    fn the_tunnels_failures_keep_their_kind() {
        let kind = |f: Failure| RequestError::from(f);
        assert!(matches!(
            kind(Failure::Fatal(Fatal::Revoked)),
            RequestError::Revoked
        ));
        assert!(matches!(
            kind(Failure::Fatal(Fatal::BadIdentity("x".into()))),
            RequestError::BadIdentity(_)
        ));
        assert!(matches!(
            kind(Failure::Fatal(Fatal::IncompatibleVersion("x".into()))),
            RequestError::IncompatibleVersion(_)
        ));
        assert!(matches!(
            kind(Failure::TimedOut("x".into())),
            RequestError::TimedOut(_)
        ));
        assert!(matches!(
            kind(Failure::Transient("x".into())),
            RequestError::Transport(_)
        ));
    }
}
