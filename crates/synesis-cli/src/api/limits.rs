//! The HTTP API's connections, bounded before any request on them is read (and so before any
//! key is checked): a client that connects and sends nothing, or stops halfway through its
//! headers, or keeps an idle connection open, is cut after [`HTTP_HEADER_READ_TIMEOUT`]; at most
//! [`HTTP_CONNECTIONS_MAX`] connections are open at once (fewer where the process may open
//! fewer files), and one more is answered `503` and closed at once rather than left waiting.
//! Without these, `axum::serve` (no timer, so hyper's header timeout never fires) kept every
//! silent connection forever, and 1,100 of them under the usual 1,024-file limit left no file
//! for the next `accept`: `/health` went unanswered, and so did everything else.
//!
//! Each connection is hyper's HTTP/1.1 with tokio's timer, serving the axum router; stopping
//! stops accepting at once and lets the requests being answered finish.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// How long a client has to send a request's headers, from its connection or from the end of
/// the previous response on a kept-alive one (hyper restarts the clock after each): so it also
/// bounds how long an idle connection stays open.
pub(crate) const HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once, at most.
pub(crate) const HTTP_CONNECTIONS_MAX: usize = 256;
/// Files the process keeps for everything but the API's connections (the tunnel's socket and
/// connection, the local ledger, models and adapters being read, the log): the connection cap
/// is lowered to leave them free where the file limit is low.
const FILES_RESERVED: u64 = 64;
/// The fewest connections the API takes, however low the file limit.
const HTTP_CONNECTIONS_MIN: usize = 8;
/// How long accepting pauses after an error that is not one connection's (out of files, say).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

const _: () = assert!(HTTP_CONNECTIONS_MIN <= HTTP_CONNECTIONS_MAX);

/// The answer to a connection over the cap: written without waiting (it fits any socket
/// buffer), then the connection is closed.
const TOO_MANY_CONNECTIONS: &str = concat!(
    "HTTP/1.1 503 Service Unavailable\r\n",
    "Content-Type: application/json\r\n",
    "Retry-After: 1\r\n",
    "Connection: close\r\n",
    "Content-Length: 160\r\n",
    "\r\n",
    r#"{"error":{"message":"this server has as many connections open as it takes; try again shortly","type":"server_error","param":null,"code":"too_many_connections"}}"#,
);

/// The connection cap for a process that may open `files` files (`None`: no limit).
fn connections_max(files: Option<u64>) -> usize {
    let Some(files) = files else {
        return HTTP_CONNECTIONS_MAX;
    };
    let room = usize::try_from(files.saturating_sub(FILES_RESERVED)).unwrap_or(usize::MAX);
    room.clamp(HTTP_CONNECTIONS_MIN, HTTP_CONNECTIONS_MAX)
}

/// Raises this process's file limit to the most it may have (as Go's runtime does), and says
/// how many connections that leaves room for.
fn connections_allowed() -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = getrlimit(Resource::Nofile);
        }
    }
    connections_max(limit.current)
}

/// Serves `router` on `listener` until `stop` completes; then stops accepting and waits for
/// the connections to finish what they are answering (their idle ones close at once).
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cap = connections_allowed();
    if cap < HTTP_CONNECTIONS_MAX {
        tracing::info!(
            connections = cap,
            "the file limit leaves room for fewer HTTP connections"
        );
    }
    let permits = Arc::new(Semaphore::new(cap));
    // Dropped (the service cut after its grace period), it aborts every connection.
    let mut connections = JoinSet::new();
    let (closing_tx, closing) = watch::channel(false);
    let mut refusing = false;
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if one_connections(&e) => continue,
            Err(e) => {
                tracing::warn!("cannot accept HTTP connections: {e}");
                tokio::select! {
                    () = &mut stop => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            if !refusing {
                tracing::warn!(
                    "{cap} HTTP connections are open; more are refused until some close"
                );
                refusing = true;
            }
            // Written at once by the kernel (a new socket's buffer is empty), not awaited:
            // tokio's `try_write` would wait for readiness it has not polled yet.
            if let Ok(mut socket) = stream.into_std() {
                let _ = std::io::Write::write(&mut socket, TOO_MANY_CONNECTIONS.as_bytes());
            }
            continue;
        };
        refusing = false;
        let service = TowerToHyperService::new(router.clone());
        let mut closing = closing.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HTTP_HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let closed = tokio::select! {
                closed = connection.as_mut() => closed,
                () = async { let _ = closing.wait_for(|c| *c).await; } => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = closed {
                tracing::debug!("HTTP connection closed: {e}");
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// An error of the one connection being accepted (it went away first), not of the listener.
fn one_connections(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_files_for_the_rest_of_the_service() {
        assert_eq!(connections_max(None), HTTP_CONNECTIONS_MAX);
        assert_eq!(connections_max(Some(1_024)), HTTP_CONNECTIONS_MAX);
        assert_eq!(connections_max(Some(200)), 136);
        assert_eq!(connections_max(Some(10)), HTTP_CONNECTIONS_MIN);
    }

    #[test]
    fn the_refusal_says_its_own_length() {
        let (head, body) = TOO_MANY_CONNECTIONS
            .split_once("\r\n\r\n")
            .unwrap_or_default();
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        assert_eq!(json["error"]["code"], "too_many_connections");
    }
}
