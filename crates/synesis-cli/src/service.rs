//! The tunnel service's local API: one Unix socket under the runtime directory (mode 0600),
//! one JSON request per line, one JSON reply per line.
//!
//! Requests: `{"op":"status"}` → `{"ok":true,"status":{…}}`; `{"op":"ping"}` →
//! `{"ok":true,"rtt_ms":0.4}`; failures → `{"ok":false,"error":"…"}`.

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
/// The longest request line accepted.
const REQUEST_BYTES_MAX: u64 = 4 * 1024;

pub(crate) fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("tunnel.sock")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    Status,
    Ping,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub(crate) ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rtt_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

impl Reply {
    fn error(e: impl ToString) -> Reply {
        Reply {
            ok: false,
            status: None,
            rtt_ms: None,
            error: Some(e.to_string()),
        }
    }
}

/// Binds the socket: refuses when another service answers on it, replaces a stale one.
pub(crate) async fn bind(runtime_dir: &Path) -> anyhow::Result<UnixListener> {
    std::fs::create_dir_all(runtime_dir)
        .with_context(|| format!("cannot create {}", runtime_dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(runtime_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let path = socket_path(runtime_dir);
    if UnixStream::connect(&path).await.is_ok() {
        anyhow::bail!(
            "a tunnel service is already running for this device ({})",
            path.display()
        );
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(listener)
}

/// Serves the local API until the listener fails; run it in a `select!` with shutdown.
pub(crate) async fn serve(listener: UnixListener, tunnel: Arc<TunnelHandle>) {
    let permits = Arc::new(Semaphore::new(CLIENTS_MAX));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            continue; // too many clients: drop this one, it sees the connection close
        };
        let tunnel = Arc::clone(&tunnel);
        tokio::spawn(async move {
            if let Err(e) = client(stream, &tunnel).await {
                tracing::debug!(error = %e, "local API client failed");
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
                ok: true,
                status: Some(serde_json::to_value(status)?),
                rtt_ms: None,
                error: None,
            }
        }
        Ok(Request::Ping) => match tunnel.ping().await {
            Ok(rtt) => Reply {
                ok: true,
                status: None,
                rtt_ms: Some(rtt.as_secs_f64() * 1_000.0),
                error: None,
            },
            Err(e) => Reply::error(e),
        },
        Err(e) => Reply::error(format!("bad request: {e}")),
    };
    let mut bytes = serde_json::to_vec(&reply)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    Ok(())
}

/// Asks the running service; `UserError::NotRunning` when nothing answers.
pub(crate) async fn ask(runtime_dir: &Path, request: &Request) -> anyhow::Result<Reply> {
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
