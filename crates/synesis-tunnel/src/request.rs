//! One request and its reply on a stream of its own: on the tunnel's connection when a tunnel
//! runs ([`TunnelHandle::request`](crate::TunnelHandle::request)), else on a fresh mutual-TLS
//! connection ([`request`]).

use std::time::Duration;

use synesis_proto::{FrameLimits, Message};
use synesis_wire::{FramedRecv, send};

use crate::connect::{classify, client_endpoint, closed_or, dial, resolve};
use crate::identity::Identity;
use crate::machine::{CONNECT_TIMEOUT, Failure, HEARTBEAT_INTERVAL_DEFAULT};
use crate::tls::device_client_config;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    Failed(String),
}

impl From<Failure> for RequestError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Transient(s) => RequestError::Failed(s),
            Failure::Fatal(f) => RequestError::Failed(f.to_string()),
        }
    }
}

/// Sends `message` on a new stream and returns the first message that comes back.
pub async fn request(identity: &Identity, message: Message) -> Result<Message, RequestError> {
    let config = device_client_config(identity, HEARTBEAT_INTERVAL_DEFAULT)
        .map_err(|e| RequestError::Failed(e.to_string()))?;
    Ok(exchange(config, &identity.info.server, &message).await?)
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
        .map_err(|_| Failure::Transient("no stream could be opened within the timeout".into()))?
        .map_err(|e| classify(&e))?;
    tokio::time::timeout_at(deadline, send(&mut tx, message, FrameLimits::default()))
        .await
        .map_err(|_| Failure::Transient("the request could not be sent within the timeout".into()))?
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
        Err(_) => Err(Failure::Transient("no answer within the timeout".into())),
    }
}
