//! A scripted OpenAI-compatible upstream on loopback (real HTTP over TCP, one connection per
//! request): each request gets the next reply of the script, then `Answer` for ever. The
//! requests' `Authorization` headers are kept, in order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug)]
pub struct Upstream {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<String>>>,
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
}

/// Starts the upstream on `127.0.0.1:0`, on the running tokio runtime.
pub async fn upstream(script: Vec<Script>) -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        for reply in script.into_iter().chain(std::iter::repeat(Script::Answer)) {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
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
            let delta = |t: &str| {
                format!(
                    "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}},\"finish_reason\":null}}]}}\n\n"
                )
            };
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
            let stop =
                "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
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
                    format!("{head}{}{}{stop}data: [DONE]\n\n", delta("Hi"), delta(" there"))
                }
                Script::Hang => format!("{head}{}", delta("Hi")),
                Script::Deltas(texts) => {
                    let deltas: String = texts.iter().map(|t| delta(t)).collect();
                    format!("{head}{deltas}{stop}data: [DONE]\n\n")
                }
                Script::Silent => head.to_owned(),
            };
            let _ = conn.write_all(body.as_bytes()).await;
            if matches!(reply, Script::Hang | Script::Silent) {
                // Keep the connection open (silent) until the cloud gives up on it.
                tokio::spawn(async move {
                    let mut sink = [0u8; 1024];
                    let _ = tokio::time::timeout(Duration::from_secs(120), async {
                        while conn.read(&mut sink).await.is_ok_and(|n| n > 0) {}
                    })
                    .await;
                });
            }
        }
    });
    Upstream { port, seen }
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
