//! A scripted OpenAI-compatible upstream on loopback (real HTTP over TCP, one connection per
//! request): each request gets the next reply of the script, then `Answer` for ever. The
//! requests' `Authorization` headers are kept, in order, and their bodies.
//!
//! [`Script::Paced`] replies write their chunks only as the test releases them
//! ([`Upstream::release`]): a test that must act in the middle of an answer holds the answer
//! there, on any machine, however fast it generates.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

#[derive(Debug)]
pub struct Upstream {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<String>>>,
    /// The requests' bodies, in order.
    pub bodies: Arc<Mutex<Vec<String>>>,
    pace: Arc<Pace>,
}

/// What the test has released to paced replies, and what they did with it.
#[derive(Debug)]
struct Pace {
    /// Chunks each paced reply may have written (the same count for all of them).
    released: watch::Sender<u32>,
    /// Chunks written, all paced replies together.
    written: AtomicU32,
    /// Paced replies whose client closed the connection before their end.
    dropped: AtomicU32,
}

#[derive(Debug, Clone, Copy)]
pub enum Script {
    /// `500 Internal Server Error`, no body.
    Fail500,
    /// "Hi", " there", then `stop` and the usage (7 in, 2 out).
    Answer,
    /// The same two chunks and `stop`, without any usage: the cloud counts.
    AnswerUncounted,
    /// One delta, then silence with the connection open.
    Hang,
    /// The response head, then silence: no chunk ever comes.
    Silent,
    /// These deltas (each may be several tokens, as Anthropic's often are), then `stop`,
    /// without any usage: the cloud counts.
    Deltas(&'static [&'static str]),
    /// `n` chunks ([`paced_text`]), chunk `i` written once the test has released more than
    /// `i`, then `stop` without any usage (the cloud counts, one token per chunk).
    Paced(u32),
    /// A call of the tool named, its arguments (JSON text) in two pieces, as OpenAI streams
    /// one, then `tool_calls` and the usage (7 in, 9 out).
    ToolCall(&'static str, &'static str),
}

/// The whole text of a `Script::Paced(n)` reply: "w0 w1 … w{n-1} ".
pub fn paced_text(n: u32) -> String {
    (0..n).map(|i| format!("w{i} ")).collect()
}

impl Upstream {
    /// Lets every paced reply write `n` more chunks.
    pub fn release(&self, n: u32) {
        self.pace.released.send_modify(|r| *r = r.saturating_add(n));
    }

    /// Chunks the paced replies have written so far, all together.
    pub fn written(&self) -> u32 {
        self.pace.written.load(Ordering::SeqCst)
    }

    /// Paced replies whose client (the cloud) closed the connection before their end.
    pub fn dropped(&self) -> u32 {
        self.pace.dropped.load(Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// Starts the upstream on `127.0.0.1:0`, on the running tokio runtime.
pub async fn upstream(script: Vec<Script>) -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let pace = Arc::new(Pace {
        released: watch::channel(0).0,
        written: AtomicU32::new(0),
        dropped: AtomicU32::new(0),
    });
    let (log, paces, kept) = (Arc::clone(&seen), Arc::clone(&pace), Arc::clone(&bodies));
    tokio::spawn(async move {
        for reply in script.into_iter().chain(std::iter::repeat(Script::Answer)) {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            // Each request on its own task: paced replies run side by side.
            let (log, pace, kept) = (Arc::clone(&log), Arc::clone(&paces), Arc::clone(&kept));
            tokio::spawn(serve(conn, reply, (log, kept), pace));
        }
    });
    Upstream {
        port,
        seen,
        bodies,
        pace,
    }
}

/// What the upstream keeps of its requests, in order.
type Kept = Arc<Mutex<Vec<String>>>;

async fn serve(
    mut conn: tokio::net::TcpStream,
    reply: Script,
    (log, bodies): (Kept, Kept),
    pace: Arc<Pace>,
) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request).to_lowercase();
    let auth = text
        .lines()
        .find_map(|l| l.strip_prefix("authorization: "))
        .unwrap_or("")
        .to_owned();
    log.lock().unwrap().push(auth);
    // The body, as long as the request says.
    let length: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    let head_end = request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(request.len(), |at| at + 4);
    let mut body = request.split_off(head_end.min(request.len()));
    while body.len() < length {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    bodies
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&body).into_owned());
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
    let stop = "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    let body = match reply {
        Script::Fail500 => {
            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                .to_owned()
        }
        Script::Answer => format!(
            "{head}{}{}{stop}data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":2}}}}\n\ndata: [DONE]\n\n",
            delta("Hi"),
            delta(" there")
        ),
        Script::AnswerUncounted => {
            format!(
                "{head}{}{}{stop}data: [DONE]\n\n",
                delta("Hi"),
                delta(" there")
            )
        }
        Script::Hang => format!("{head}{}", delta("Hi")),
        Script::Deltas(texts) => {
            let deltas: String = texts.iter().map(|t| delta(t)).collect();
            format!("{head}{deltas}{stop}data: [DONE]\n\n")
        }
        Script::Silent | Script::Paced(_) => head.to_owned(),
        Script::ToolCall(name, arguments) => {
            let (first, rest) = arguments.split_at(arguments.len() / 2);
            let piece = |json: serde_json::Value| {
                let chunk = serde_json::json!({"choices": [{"index": 0, "delta": {"tool_calls": [json]}, "finish_reason": null}]});
                format!("data: {chunk}\n\n")
            };
            format!(
                "{head}{}{}data: {{\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"tool_calls\"}}]}}\n\ndata: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":9}}}}\n\ndata: [DONE]\n\n",
                piece(
                    serde_json::json!({"index": 0, "id": "call_1", "type": "function", "function": {"name": name, "arguments": first}})
                ),
                piece(serde_json::json!({"index": 0, "function": {"arguments": rest}})),
            )
        }
    };
    if conn.write_all(body.as_bytes()).await.is_err() {
        return;
    }
    match reply {
        Script::Hang | Script::Silent => {
            // Keep the connection open (silent) until the cloud gives up on it.
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(120), async {
                while conn.read(&mut sink).await.is_ok_and(|n| n > 0) {}
            })
            .await;
        }
        Script::Paced(n) => paced(conn, n, &pace, stop).await,
        _ => {}
    }
}

/// Writes the `n` chunks of a paced reply as they are released, then its end; stops when the
/// client closes the connection (counted in `dropped`) or the upstream is dropped.
async fn paced(mut conn: tokio::net::TcpStream, n: u32, pace: &Pace, stop: &str) {
    let mut released = pace.released.subscribe();
    let mut sink = [0u8; 1024];
    for i in 0..n {
        loop {
            if *released.borrow_and_update() > i {
                break;
            }
            tokio::select! {
                changed = released.changed() => if changed.is_err() { return },
                read = conn.read(&mut sink) => if !read.is_ok_and(|n| n > 0) {
                    pace.dropped.fetch_add(1, Ordering::SeqCst);
                    return;
                },
            }
        }
        if conn
            .write_all(delta(&format!("w{i} ")).as_bytes())
            .await
            .is_err()
        {
            pace.dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        pace.written.fetch_add(1, Ordering::SeqCst);
    }
    let _ = conn
        .write_all(format!("{stop}data: [DONE]\n\n").as_bytes())
        .await;
}

fn delta(t: &str) -> String {
    format!(
        "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}},\"finish_reason\":null}}]}}\n\n"
    )
}

/// `cloud.toml` lines serving the upstream at `port` as the model `up` ($1 in, $2 out per
/// million tokens) to the tiers `tiers` (a TOML array).
pub fn upstream_model(port: u16, tiers: &str) -> String {
    format!(
        "[prices.up]\ninput_usd_per_mtok = \"1.00\"\noutput_usd_per_mtok = \"2.00\"\n\
         [models.up]\nprovider = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\n\
         api_key_env = \"SYNESIS_TEST_OPERATOR_KEY\"\ntiers = {tiers}\n"
    )
}
