//! The tunnel service's local API: one Unix socket under the runtime directory (mode 0600),
//! one JSON request per line, one JSON reply per line. One service per runtime directory: it
//! holds [`ServiceLock`] for as long as it runs.
//!
//! Requests: `{"op":"status"}` → `{"ok":true,"status":{…}}`; `{"op":"ping"}` →
//! `{"ok":true,"rtt_ms":0.4}`; `{"op":"cloud","frame":"<base64>"}` (one protocol frame: an
//! account request) → `{"ok":true,"frame":"<base64>"}` (the cloud's reply, sent and received on
//! a stream of the tunnel's connection); failures → `{"ok":false,"error":"…"}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use synesis_tunnel::{TunnelHandle, TunnelStatus};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::exit::UserError;

/// Clients served at once.
const CLIENTS_MAX: usize = 16;
/// How long one client may take, request line and answer together: a client that connects and
/// says nothing frees its place after this. Above a request to the cloud's own bound (the
/// tunnel's connect timeout), below the patience of `ask` ([`ASK_TIMEOUT`]).
const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// After a failed accept (out of file descriptors, say), the pause before the next; doubled
/// while failures follow one another, up to `ACCEPT_RETRY_MAX`.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(250);
const ACCEPT_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(8);
/// The longest request line accepted (an account request's frame, base64, fits many times).
const REQUEST_BYTES_MAX: u64 = 64 * 1024;

pub(crate) fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("tunnel.sock")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    Status,
    Ping,
    /// One request to the cloud over the tunnel: a protocol frame, base64.
    Cloud {
        frame: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub(crate) ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rtt_ms: Option<f64>,
    /// The cloud's reply to a `cloud` request: a protocol frame, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) frame: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

impl Reply {
    fn error(e: impl ToString) -> Reply {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            ..Reply::ok()
        }
    }

    fn ok() -> Reply {
        Reply {
            ok: true,
            status: None,
            rtt_ms: None,
            frame: None,
            error: None,
        }
    }
}

/// The running service's claim on a runtime directory: an advisory lock (`flock`) on
/// [`lock_path`] held for as long as this value lives, the file holding the service's pid. The
/// kernel releases the lock when the process ends however it ends (`kill -9` too), so a lock file
/// left behind never blocks the next start; the file itself is kept (removing it would let two
/// starts lock two different files).
#[derive(Debug)]
pub(crate) struct ServiceLock {
    _file: std::fs::File,
}

pub(crate) fn lock_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("tunnel.lock")
}

/// Claims the runtime directory and binds the socket. One service per directory: a second is
/// refused with the first one's pid. Once the lock is held, a socket left behind is stale (its
/// service died without removing it) and is replaced.
pub(crate) async fn bind(runtime_dir: &Path) -> anyhow::Result<(UnixListener, ServiceLock)> {
    std::fs::create_dir_all(runtime_dir)
        .with_context(|| format!("cannot create {}", runtime_dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(runtime_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let lock = lock(&lock_path(runtime_dir))?;
    let path = socket_path(runtime_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::info!(socket = %path.display(), "replaced the socket of a service that did not stop cleanly")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok((listener, lock))
}

fn lock(path: &Path) -> anyhow::Result<ServiceLock> {
    use std::io::{Read, Seek, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        // Not before the lock is ours: the pid in it is the running service's.
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            // Empty while the holder is between taking the lock and writing its pid.
            let pid = text
                .trim()
                .parse::<u32>()
                .map_or_else(|_| "pid not written yet".to_owned(), |p| format!("pid {p}"));
            anyhow::bail!(
                "a tunnel service is already running for this device ({pid}; lock {})",
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    file.sync_all()?;
    Ok(ServiceLock { _file: file })
}

/// Serves the local API for as long as it is polled; run it in a `select!` with shutdown.
pub(crate) async fn serve(listener: UnixListener, tunnel: Arc<TunnelHandle>) {
    let permits = Arc::new(Semaphore::new(CLIENTS_MAX));
    let mut pause = ACCEPT_RETRY;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                pause = ACCEPT_RETRY;
                stream
            }
            Err(e) => {
                // Usually passing (no file descriptor left): the API must outlive it.
                tracing::warn!(error = %e, retry_in = ?pause, "the local API cannot accept a client");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(ACCEPT_RETRY_MAX);
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            continue; // too many clients: drop this one, it sees the connection close
        };
        let tunnel = Arc::clone(&tunnel);
        tokio::spawn(async move {
            match tokio::time::timeout(CLIENT_TIMEOUT, client(stream, &tunnel)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "local API client failed"),
                Err(_) => tracing::debug!("local API client dropped after {CLIENT_TIMEOUT:?}"),
            }
            drop(permit);
        });
    }
}

async fn client(stream: UnixStream, tunnel: &TunnelHandle) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(REQUEST_BYTES_MAX))
        .read_line(&mut line)
        .await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Status) => {
            let status: TunnelStatus = tunnel.status().borrow().clone();
            Reply {
                status: Some(serde_json::to_value(status)?),
                ..Reply::ok()
            }
        }
        Ok(Request::Ping) => match tunnel.ping().await {
            Ok(rtt) => Reply {
                rtt_ms: Some(rtt.as_secs_f64() * 1_000.0),
                ..Reply::ok()
            },
            Err(e) => Reply::error(e),
        },
        Ok(Request::Cloud { frame }) => match cloud(tunnel, &frame).await {
            Ok(frame) => Reply {
                frame: Some(frame),
                ..Reply::ok()
            },
            Err(e) => Reply::error(format!("{e:#}")),
        },
        Err(e) => Reply::error(format!("bad request: {e}")),
    };
    let mut bytes = serde_json::to_vec(&reply)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    Ok(())
}

/// Only account requests pass: the control stream is the tunnel's own.
async fn cloud(tunnel: &TunnelHandle, frame: &str) -> anyhow::Result<String> {
    let reply = tunnel.request(account_message(frame)?).await?;
    encode_frame_base64(&reply)
}

fn account_message(frame: &str) -> anyhow::Result<synesis_proto::Message> {
    let message = decode_frame_base64(frame)?;
    if message.message_type().stream() != synesis_proto::StreamKind::Account {
        anyhow::bail!(
            "only account requests go through the local API, not {:?}",
            message.message_type()
        );
    }
    Ok(message)
}

pub(crate) fn encode_frame_base64(message: &synesis_proto::Message) -> anyhow::Result<String> {
    use base64::Engine;
    let bytes = synesis_proto::encode_frame_vec(message, synesis_proto::FrameLimits::default())?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

pub(crate) fn decode_frame_base64(text: &str) -> anyhow::Result<synesis_proto::Message> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("the frame is not base64")?;
    match synesis_proto::decode_frame(&bytes, synesis_proto::FrameLimits::default())? {
        synesis_proto::Decoded::Frame { message, consumed } if consumed == bytes.len() => {
            Ok(message)
        }
        _ => anyhow::bail!("not exactly one whole frame"),
    }
}

/// How long a question to the service may take: its own work is bounded below this (a client
/// is served within `CLIENT_TIMEOUT`; a request to the cloud is opened, sent and answered within
/// the tunnel's connect timeout in all).
const ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Asks the running service; `UserError::NotRunning` when nothing answers.
pub(crate) async fn ask(runtime_dir: &Path, request: &Request) -> anyhow::Result<Reply> {
    tokio::time::timeout(ASK_TIMEOUT, ask_unbounded(runtime_dir, request))
        .await
        .map_err(|_| anyhow::anyhow!("the tunnel service did not answer within {ASK_TIMEOUT:?}"))?
}

async fn ask_unbounded(runtime_dir: &Path, request: &Request) -> anyhow::Result<Reply> {
    let stream = UnixStream::connect(socket_path(runtime_dir))
        .await
        .map_err(|_| UserError::NotRunning)?;
    let (read, mut write) = stream.into_split();
    let mut bytes = serde_json::to_vec(request)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    if line.is_empty() {
        anyhow::bail!("the tunnel service closed the connection without answering");
    }
    Ok(serde_json::from_str(&line)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use synesis_proto::RequestId;
    use synesis_proto::message::{UploadDone, UsageRequest};

    use super::*;

    #[test]
    fn an_error_reply_says_so() {
        let reply = serde_json::to_value(Reply::error("no tunnel")).unwrap();
        assert_eq!(
            reply,
            serde_json::json!({"ok": false, "error": "no tunnel"})
        );
        let ok = serde_json::to_value(Reply::ok()).unwrap();
        assert_eq!(ok, serde_json::json!({"ok": true}));
    }

    #[test]
    fn only_whole_account_frames_pass() {
        let usage: synesis_proto::Message = UsageRequest {
            request_id: RequestId::from_parts(1, [1; 10]),
            since: None,
            group_by: None,
            after: None,
        }
        .into();
        let frame = encode_frame_base64(&usage).unwrap();
        assert_eq!(account_message(&frame).unwrap(), usage);

        let upload: synesis_proto::Message = UploadDone {
            upload_id: RequestId::from_parts(1, [2; 10]),
        }
        .into();
        let err = account_message(&encode_frame_base64(&upload).unwrap()).unwrap_err();
        assert!(err.to_string().contains("only account requests"), "{err}");

        assert!(account_message("not base64!").is_err());
        let mut two = frame.clone();
        two.push_str(&frame);
        assert!(account_message(&two).is_err(), "two frames glued together");
        assert!(account_message(&frame[..frame.len() - 8]).is_err());
    }
}
