//! A local server that behaves as the Hugging Face Hub does for downloads (real HTTP/1.1 over
//! TCP on loopback, reached through `HF_ENDPOINT`):
//! - `GET /api/models/{owner}/{repo}` lists the files (`siblings[].rfilename`);
//! - `GET /{owner}/{repo}/resolve/{revision}/{file}` answers `302` to the CDN: this server under
//!   another origin (`http://localhost:PORT`, where the endpoint is `http://127.0.0.1:PORT`), with
//!   `X-Linked-Etag` (the file's SHA-256, quoted), `X-Linked-Size` and `ETag`;
//! - `GET /cdn/{sha256}?sig=…` serves the bytes, honouring `Range: bytes=N-` with `206`;
//! - a gated repository answers `401` without `Authorization: Bearer {token}`.
//!
//! A test can cut the next CDN response after some bytes ([`Hub::cut_next_after`]), serve a
//! file with one byte changed while publishing the true digest ([`Hub::corrupt`]), and read what
//! was sent ([`Hub::body_bytes`]) and asked ([`Hub::requests`]).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::Digest;

#[derive(Debug)]
pub struct Hub {
    /// `http://127.0.0.1:PORT`: the value for `HF_ENDPOINT`.
    pub endpoint: String,
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    /// repo → file → content.
    repos: Mutex<BTreeMap<String, Repo>>,
    /// sha256 → the bytes the CDN serves for it.
    blobs: Mutex<BTreeMap<String, Arc<Vec<u8>>>>,
    /// The next CDN response stops after this many body bytes (then the connection closes).
    cut: Mutex<Option<u64>>,
    body_bytes: AtomicU64,
    port: u16,
    requests: Mutex<Vec<Request>>,
}

#[derive(Debug, Default)]
struct Repo {
    files: BTreeMap<String, (String, u64)>,
    token: Option<String>,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

impl Hub {
    pub fn start() -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let state = Arc::new(State {
            port,
            ..State::default()
        });
        let serving = Arc::clone(&state);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let state = Arc::clone(&serving);
                std::thread::spawn(move || {
                    let _ = serve(conn, &state);
                });
            }
        });
        Hub { endpoint, state }
    }

    /// Publishes `bytes` as `repo`'s `file`.
    pub fn add(&self, repo: &str, file: &str, bytes: Vec<u8>) {
        let sha = hex(&sha2::Sha256::digest(&bytes));
        let size = bytes.len() as u64;
        self.state
            .blobs
            .lock()
            .unwrap()
            .insert(sha.clone(), Arc::new(bytes));
        self.state
            .repos
            .lock()
            .unwrap()
            .entry(repo.to_owned())
            .or_default()
            .files
            .insert(file.to_owned(), (sha, size));
    }

    /// `repo` answers only with `Authorization: Bearer {token}`.
    pub fn gate(&self, repo: &str, token: &str) {
        self.state
            .repos
            .lock()
            .unwrap()
            .entry(repo.to_owned())
            .or_default()
            .token = Some(token.to_owned());
    }

    /// The CDN serves `repo`'s `file` with the byte at `at` changed; the Hub still publishes
    /// the true digest.
    pub fn corrupt(&self, repo: &str, file: &str, at: usize) {
        let sha = self.state.repos.lock().unwrap()[repo].files[file].0.clone();
        let mut blobs = self.state.blobs.lock().unwrap();
        let mut bytes = blobs[&sha].as_ref().clone();
        bytes[at] ^= 0x55;
        blobs.insert(sha, Arc::new(bytes));
    }

    /// The next CDN response sends `n` body bytes, then closes the connection.
    pub fn cut_next_after(&self, n: u64) {
        *self.state.cut.lock().unwrap() = Some(n);
    }

    /// Body bytes the CDN sent so far, all responses together.
    pub fn body_bytes(&self) -> u64 {
        self.state.body_bytes.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn serve(conn: TcpStream, state: &State) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let (mut range, mut authorization) = (None, None);
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "range" => range = Some(value.trim().to_owned()),
                    "authorization" => authorization = Some(value.trim().to_owned()),
                    _ => {}
                }
            }
        }
        state.requests.lock().unwrap().push(Request {
            path: path.clone(),
            range: range.clone(),
            authorization: authorization.clone(),
        });
        if !respond(
            &mut out,
            state,
            &path,
            range.as_deref(),
            authorization.as_deref(),
        )? {
            return Ok(());
        }
    }
}

/// Answers one request; false when the connection must close.
fn respond(
    out: &mut TcpStream,
    state: &State,
    path: &str,
    range: Option<&str>,
    authorization: Option<&str>,
) -> std::io::Result<bool> {
    let plain = |out: &mut TcpStream, status: &str, body: &str| {
        write!(
            out,
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let allowed = |repo: &Repo| match &repo.token {
        None => true,
        Some(t) => authorization == Some(format!("Bearer {t}").as_str()),
    };
    if let Some(repo_name) = path.strip_prefix("/api/models/") {
        let repos = state.repos.lock().unwrap();
        match repos.get(repo_name) {
            Some(repo) if allowed(repo) => {
                let siblings: Vec<serde_json::Value> = repo
                    .files
                    .keys()
                    .map(|f| serde_json::json!({ "rfilename": f }))
                    .collect();
                let body = serde_json::json!({ "id": repo_name, "siblings": siblings });
                plain(out, "200 OK", &body.to_string())?;
            }
            Some(_) => plain(out, "401 Unauthorized", r#"{"error":"gated"}"#)?,
            None => plain(out, "404 Not Found", r#"{"error":"not found"}"#)?,
        }
        return Ok(true);
    }
    if let Some(rest) = path.strip_prefix("/cdn/") {
        let sha = rest.split('?').next().unwrap_or(rest);
        let Some(bytes) = state.blobs.lock().unwrap().get(sha).cloned() else {
            plain(out, "404 Not Found", "{}")?;
            return Ok(true);
        };
        let total = bytes.len() as u64;
        let from = range
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<u64>().ok());
        let start = from.unwrap_or(0);
        if start >= total && from.is_some() {
            write!(
                out,
                "HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */{total}\r\ncontent-length: 0\r\n\r\n"
            )?;
            return Ok(true);
        }
        let status = if from.is_some() {
            format!(
                "206 Partial Content\r\ncontent-range: bytes {start}-{}/{total}",
                total - 1
            )
        } else {
            "200 OK".to_owned()
        };
        write!(
            out,
            "HTTP/1.1 {status}\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\naccept-ranges: bytes\r\n\r\n",
            total - start
        )?;
        let body = &bytes[usize::try_from(start).unwrap()..];
        let cut = state.cut.lock().unwrap().take();
        let send = match cut {
            Some(n) => &body[..usize::try_from(n).unwrap().min(body.len())],
            None => body,
        };
        for piece in send.chunks(64 * 1024) {
            out.write_all(piece)?;
            state
                .body_bytes
                .fetch_add(piece.len() as u64, Ordering::SeqCst);
        }
        out.flush()?;
        return Ok(cut.is_none());
    }
    // /{owner}/{repo}/resolve/{revision}/{file}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if let [owner, name, "resolve", _revision, file] = parts[..] {
        let repos = state.repos.lock().unwrap();
        let repo = repos.get(&format!("{owner}/{name}"));
        match repo.map(|r| (allowed(r), r.files.get(file))) {
            Some((false, _)) => plain(out, "401 Unauthorized", r#"{"error":"gated"}"#)?,
            Some((true, Some((sha, size)))) => write!(
                out,
                "HTTP/1.1 302 Found\r\nlocation: http://localhost:{}/cdn/{sha}?sig=signed\r\nx-linked-etag: \"{sha}\"\r\n\
                 x-linked-size: {size}\r\netag: \"{sha}\"\r\ncontent-length: 0\r\n\r\n",
                state.port
            )?,
            _ => plain(out, "404 Not Found", r#"{"error":"entry not found"}"#)?,
        }
        return Ok(true);
    }
    plain(out, "404 Not Found", "{}")?;
    Ok(true)
}
