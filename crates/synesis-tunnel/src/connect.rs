//! Dialing the cloud, and telling apart failures that retrying can heal from those it cannot.

use std::net::SocketAddr;
use std::time::Duration;

use synesis_proto::ErrorCode;
use synesis_proto::message::ErrorMsg;
use synesis_wire::error_code_of;
use synesis_wire::tls::SERVER_NAME;

use crate::machine::{Failure, Fatal};

/// Resolves `host:port` (a name may resolve differently after a move, so every attempt asks).
pub async fn resolve(server: &str) -> Result<SocketAddr, Failure> {
    let mut addrs = tokio::net::lookup_host(server)
        .await
        .map_err(|e| Failure::Transient(format!("cannot resolve {server}: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| Failure::Transient(format!("{server} resolves to no address")))
}

/// A client endpoint on an OS-chosen port, of the server's address family.
pub fn client_endpoint(server: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .map_err(std::io::Error::other)?;
    quinn::Endpoint::client(bind)
}

/// Connects and completes the QUIC and TLS handshakes within `limit`.
pub async fn dial(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    limit: Duration,
) -> Result<quinn::Connection, Failure> {
    let connecting = endpoint
        .connect_with(config, addr, SERVER_NAME)
        .map_err(|e| Failure::Transient(format!("cannot connect to {addr}: {e}")))?;
    match tokio::time::timeout(limit, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(classify(&e)),
        Err(_) => Err(Failure::TimedOut(format!(
            "no answer from {addr} within {}s",
            limit.as_secs()
        ))),
    }
}

/// What a connection error means for the tunnel.
pub fn classify(err: &quinn::ConnectionError) -> Failure {
    if let Some(code) = error_code_of(err) {
        return classify_code(code, &err.to_string());
    }
    match err {
        quinn::ConnectionError::VersionMismatch => Failure::Fatal(Fatal::IncompatibleVersion(
            "no QUIC version in common".into(),
        )),
        // TLS alerts travel as QUIC crypto errors (0x100 + alert). A certificate the other side
        // does not accept will not become acceptable by retrying.
        quinn::ConnectionError::TransportError(e) if is_crypto(u64::from(e.code)) => {
            Failure::Fatal(Fatal::BadIdentity(e.to_string()))
        }
        quinn::ConnectionError::ConnectionClosed(c) if is_crypto(u64::from(c.error_code)) => {
            Failure::Fatal(Fatal::BadIdentity(c.to_string()))
        }
        quinn::ConnectionError::TimedOut => Failure::TimedOut(err.to_string()),
        other => Failure::Transient(other.to_string()),
    }
}

fn is_crypto(code: u64) -> bool {
    (0x100..0x200).contains(&code)
}

/// What an error code from the cloud means for the tunnel. A code this build does not know is
/// taken by its hundred (PROTOCOL.md §6): a 2xx refuses the session or identity, so retrying
/// unchanged cannot help; the rest (a broken stream, a refused request, the cloud failing) end
/// this connection only.
pub fn classify_code(code: ErrorCode, message: &str) -> Failure {
    match code {
        ErrorCode::DEVICE_REVOKED => Failure::Fatal(Fatal::Revoked),
        ErrorCode::UNAUTHENTICATED => Failure::Fatal(Fatal::BadIdentity(message.to_owned())),
        ErrorCode::UNSUPPORTED_VERSION => {
            Failure::Fatal(Fatal::IncompatibleVersion(message.to_owned()))
        }
        code if code.0 / 100 == 2 => {
            Failure::Fatal(Fatal::BadIdentity(format!("{code}: {message}")))
        }
        _ => Failure::Transient(format!(
            "the cloud closed the connection: {code}: {message}"
        )),
    }
}

pub fn classify_error_msg(e: &ErrorMsg) -> Failure {
    classify_code(e.code, &e.message)
}

/// Why a stream operation failed: the connection's close reason when it was closed (so a revoked
/// device learns it is revoked, whichever future noticed the close first), else `why`.
pub fn closed_or(conn: &quinn::Connection, why: String) -> Failure {
    conn.close_reason()
        .map_or(Failure::Transient(why), |reason| classify(&reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_is_final_or_retried_by_its_hundred_known_or_not() {
        let fatal = |code: u16| matches!(classify_code(ErrorCode(code), "x"), Failure::Fatal(_));
        assert_eq!(
            classify_code(ErrorCode::DEVICE_REVOKED, "x"),
            Failure::Fatal(Fatal::Revoked)
        );
        assert!(matches!(
            classify_code(ErrorCode::UNSUPPORTED_VERSION, "x"),
            Failure::Fatal(Fatal::IncompatibleVersion(_))
        ));
        // Known and unknown 2xx: the session or identity is refused, never retried unchanged.
        for code in [201, 203, 206, 250, 299] {
            assert!(fatal(code), "{code}");
        }
        // 1xx, 3xx and 5xx, known or not: this connection ends, the tunnel dials again.
        for code in [100, 105, 199, 304, 399, 500, 501, 599, 600] {
            assert!(!fatal(code), "{code}");
        }
    }
}
