//! What the two HTTP providers ([`super::openai`], [`super::anthropic`]) share: their settings
//! ([`HttpSettings`]), the one `reqwest::Client` each builds (rustls with the ring provider and
//! the webpki roots, passed in explicitly: no process-wide crypto provider is needed or used),
//! and the task that runs one streamed request: timeouts, HTTP status → [`ProviderError`],
//! SSE framing ([`super::sse`]), stopping when the receiver goes, and keeping keys out of every
//! error text.
//!
//! The per-API meaning of the stream is a `Decoder`, pure and IO-free, so tests feed it
//! recorded sequences.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use tokio::sync::mpsc::Sender;
use tokio::time::{Instant, timeout, timeout_at};

use super::sse::{MAX_EVENT_BYTES, SseEvent, SseParser};
use super::{ApiKey, Event, Generation, ProviderError};

/// The most bytes of an error response's body read (to quote it in the error).
const ERROR_BODY_BYTES: usize = 4096;
/// The most characters of an upstream's text quoted in an error.
const EXCERPT_CHARS: usize = 300;
/// What replaces a key wherever an upstream's text repeats it.
const REDACTED: &str = "[redacted]";

/// How to reach one HTTP upstream.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// `http(s)://host[:port][/prefix]`, without the API's own path: for an OpenAI-compatible
    /// server the prefix that holds `/chat/completions` (`http://127.0.0.1:8080/v1`), for
    /// Anthropic the origin (`https://api.anthropic.com`). A trailing `/` is ignored.
    pub base_url: String,
    /// The operator's key, used when an ask brings none (BYOK). `None` for local servers that
    /// take none. See [`api_key_from_env`].
    pub api_key: Option<ApiKey>,
    /// Limit on opening the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Limit from sending the request to the response's headers.
    pub first_byte_timeout: Duration,
    /// Limit between two reads of the response's body once it streams.
    pub idle_timeout: Duration,
}

impl HttpSettings {
    /// Settings for `base_url` with no key and the default limits: 10 s to connect, 60 s to
    /// the headers, 60 s between reads.
    pub fn new(base_url: impl Into<String>) -> HttpSettings {
        HttpSettings {
            base_url: base_url.into(),
            api_key: None,
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a provider could not be built from its settings (a configuration error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    #[error("the base URL {url:?} is not usable: {why}")]
    BaseUrl { url: String, why: String },
    /// The key has characters an HTTP header cannot carry (the key is not shown).
    #[error("the API key is not a valid HTTP header value")]
    KeyNotHeader,
    #[error("the environment variable {var} is not valid Unicode")]
    KeyNotUnicode { var: String },
    #[error("the HTTP client could not be built: {0}")]
    Client(String),
}

/// The key in environment variable `var`: `None` when it is unset or empty (a local server
/// taking no key).
pub fn api_key_from_env(var: &str) -> Result<Option<ApiKey>, SetupError> {
    match std::env::var(var) {
        Ok(key) if key.is_empty() => Ok(None),
        Ok(key) => Ok(Some(ApiKey::new(key))),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(SetupError::KeyNotUnicode {
            var: var.to_owned(),
        }),
    }
}

/// What a provider keeps from its [`HttpSettings`]: the client, the endpoint, the key, the
/// limits.
#[derive(Debug)]
pub(crate) struct Upstream {
    client: reqwest::Client,
    endpoint: Url,
    key: Option<ApiKey>,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
}

impl Upstream {
    /// An upstream answering at `settings.base_url` + `path` (`path` starts with `/`).
    pub(crate) fn new(settings: HttpSettings, path: &str) -> Result<Upstream, SetupError> {
        let endpoint = endpoint(&settings.base_url, path)?;
        if let Some(key) = &settings.api_key {
            HeaderValue::from_str(key.expose()).map_err(|_| SetupError::KeyNotHeader)?;
        }
        Ok(Upstream {
            client: client(settings.connect_timeout)?,
            endpoint,
            key: settings.api_key,
            first_byte_timeout: settings.first_byte_timeout,
            idle_timeout: settings.idle_timeout,
        })
    }

    /// The key for one ask: the user's (BYOK) when it brings one, else the configured one.
    pub(crate) fn key_for<'a>(&'a self, ask_key: Option<&'a ApiKey>) -> Option<&'a ApiKey> {
        ask_key.or(self.key.as_ref())
    }

    /// A POST to the endpoint, asking for an event stream.
    pub(crate) fn post(&self) -> RequestBuilder {
        self.client
            .post(self.endpoint.clone())
            .header(reqwest::header::ACCEPT, "text/event-stream")
    }

    /// Runs `request` on a task of its own, decoding its stream with `decoder`. `request` is
    /// an error when the ask could not be made into one (it is then the only event). Every
    /// error text has both keys (the ask's, `ask_key`, and the configured one) removed.
    pub(crate) fn start<D: Decoder>(
        &self,
        request: Result<RequestBuilder, ProviderError>,
        ask_key: Option<ApiKey>,
        decoder: D,
    ) -> Generation {
        let secrets: Vec<ApiKey> = ask_key.into_iter().chain(self.key.clone()).collect();
        let (tx, generation) = Generation::channel();
        match request {
            Err(error) => {
                // The channel is new and empty: this cannot fail for want of room.
                let _ = tx.try_send(Event::Failed(scrub(error, &secrets)));
            }
            Ok(request) => {
                let limits = Limits {
                    first_byte: self.first_byte_timeout,
                    idle: self.idle_timeout,
                };
                tokio::spawn(run(tx, request, limits, secrets, decoder));
            }
        }
        generation
    }
}

/// A header value carrying a key (`prefix` then the key), marked sensitive.
pub(crate) fn key_header(prefix: &str, key: &ApiKey) -> Result<HeaderValue, ProviderError> {
    let mut value = HeaderValue::from_str(&format!("{prefix}{}", key.expose())).map_err(|_| {
        ProviderError::Refused("the API key is not a valid HTTP header value".to_owned())
    })?;
    value.set_sensitive(true);
    Ok(value)
}

fn endpoint(base_url: &str, path: &str) -> Result<Url, SetupError> {
    let bad = |why: &str| SetupError::BaseUrl {
        url: base_url.to_owned(),
        why: why.to_owned(),
    };
    let url = Url::parse(&format!("{}{path}", base_url.trim_end_matches('/')))
        .map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("credentials belong in the API key, not in the URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("a query or a fragment is not allowed"));
    }
    Ok(url)
}

/// The client: HTTP/1.1, rustls with ring and the webpki roots, no redirects (a redirect
/// would be a misconfigured base URL, and must not carry a key elsewhere).
fn client(connect_timeout: Duration) -> Result<reqwest::Client, SetupError> {
    let tls =
        synesis_wire::tls::web_client_config().map_err(|e| SetupError::Client(e.to_string()))?;
    let builder = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .http1_only()
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("synesis-cloud/", env!("CARGO_PKG_VERSION")));
    // Tests talk to 127.0.0.1 whatever proxy the environment names.
    #[cfg(test)]
    let builder = builder.no_proxy();
    builder
        .build()
        .map_err(|e| SetupError::Client(error_chain(&e)))
}

/// The meaning of one API's event stream, apart from any IO.
pub(crate) trait Decoder: Send + 'static {
    /// One event (`event` is `"message"` when the stream names none). Returns the events to
    /// send, in order: `Text`s, and at the end one `Done` after which nothing more is read.
    /// An error ends the generation (sent as `Failed`).
    fn on_event(&mut self, event: &str, data: &str) -> Result<Vec<Event>, ProviderError>;

    /// The body ended before a `Done`: the last event (a `Done` when the decoder had seen
    /// enough of the end, else `Failed`).
    fn on_end(&mut self) -> Event;
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    first_byte: Duration,
    idle: Duration,
}

/// The task of one generation: stops as soon as the receiver is closed or dropped, dropping
/// the response (and with it the connection).
async fn run<D: Decoder>(
    tx: Sender<Event>,
    request: RequestBuilder,
    limits: Limits,
    secrets: Vec<ApiKey>,
    decoder: D,
) {
    let result = tokio::select! {
        biased;
        () = tx.closed() => return,
        result = stream(&tx, request, limits, decoder) => result,
    };
    if let Err(error) = result {
        let error = scrub(error, &secrets);
        tracing::debug!(%error, "an HTTP provider's generation failed");
        let _ = tx.send(Event::Failed(error)).await;
    }
}

/// Sends the request and the decoded events; `Err` is the failure still to send.
async fn stream<D: Decoder>(
    tx: &Sender<Event>,
    request: RequestBuilder,
    limits: Limits,
    mut decoder: D,
) -> Result<(), ProviderError> {
    let mut response = match timeout(limits.first_byte, request.send()).await {
        Err(_) => {
            return Err(ProviderError::TimedOut(format!(
                "no response within {} ms",
                limits.first_byte.as_millis()
            )));
        }
        Ok(Err(error)) => return Err(send_error(&error)),
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if !status.is_success() {
        return Err(status_error(response, limits.idle).await);
    }
    if is_json(response.headers()) {
        let excerpt = read_excerpt(response, limits.idle).await;
        return Err(ProviderError::Failed(format!(
            "the upstream answered with JSON, not an event stream: {excerpt}"
        )));
    }

    let mut parser = SseParser::new(MAX_EVENT_BYTES);
    let mut events: Vec<SseEvent> = Vec::new();
    loop {
        let chunk = match timeout(limits.idle, response.chunk()).await {
            Err(_) => {
                return Err(ProviderError::TimedOut(format!(
                    "nothing streamed for {} ms",
                    limits.idle.as_millis()
                )));
            }
            Ok(Err(error)) => {
                return Err(ProviderError::Failed(format!(
                    "the stream broke: {}",
                    error_chain(&error)
                )));
            }
            Ok(Ok(None)) => {
                let _ = tx.send(decoder.on_end()).await;
                return Ok(());
            }
            Ok(Ok(Some(chunk))) => chunk,
        };
        parser
            .push(&chunk, &mut events)
            .map_err(|e| ProviderError::Failed(e.to_string()))?;
        for sse in events.drain(..) {
            for event in decoder.on_event(&sse.event, &sse.data)? {
                let last = !matches!(event, Event::Text(_));
                if tx.send(event).await.is_err() || last {
                    return Ok(());
                }
            }
        }
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
}

/// A request that got no response.
fn send_error(error: &reqwest::Error) -> ProviderError {
    let why = error_chain(error);
    if error.is_timeout() {
        ProviderError::TimedOut(format!("connecting: {why}"))
    } else {
        ProviderError::Unavailable {
            why,
            retry_after_ms: None,
        }
    }
}

/// A response other than 2xx: 429 and 5xx may work later, other 4xx will not.
async fn status_error(response: Response, idle: Duration) -> ProviderError {
    let status = response.status();
    let retry_after_ms = retry_after_ms(response.headers());
    let excerpt = read_excerpt(response, idle).await;
    let why = if excerpt.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {excerpt}")
    };
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        ProviderError::Unavailable {
            why,
            retry_after_ms,
        }
    } else if status.is_client_error() {
        ProviderError::Refused(why)
    } else {
        ProviderError::Failed(format!("unexpected {why}"))
    }
}

/// `retry-after-ms` (OpenAI's) or `retry-after` in seconds. The HTTP-date form of
/// `retry-after` is not read (no upstream here sends it).
fn retry_after_ms(headers: &HeaderMap) -> Option<u64> {
    let number = |name: &str| -> Option<u64> {
        let text = headers.get(name)?.to_str().ok()?.trim();
        // A fraction (`retry-after-ms: 1500.5`) is cut to its whole part.
        let whole = text.split('.').next()?;
        whole.parse().ok()
    };
    number("retry-after-ms").or_else(|| number("retry-after").map(|s| s.saturating_mul(1000)))
}

/// A short, single-line quote of an error body: the API's error message when it has the
/// usual JSON shape, else the start of the text. Keys are removed later, by [`scrub`], on the
/// whole error text.
async fn read_excerpt(mut response: Response, idle: Duration) -> String {
    let deadline = Instant::now() + idle;
    let mut body: Vec<u8> = Vec::new();
    while body.len() < ERROR_BODY_BYTES {
        match timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                let room = ERROR_BODY_BYTES - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    excerpt(&body)
}

fn excerpt(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(json) => json_message(&json).unwrap_or_else(|| String::from_utf8_lossy(body).into()),
        Err(_) => String::from_utf8_lossy(body).into(),
    };
    one_line(&text)
}

/// `{"error":{"type":..,"message":..}}` (OpenAI, Anthropic), `{"error":".."}`,
/// `{"message":".."}`.
fn json_message(json: &serde_json::Value) -> Option<String> {
    let error = json.get("error").unwrap_or(json);
    if let Some(text) = error.as_str() {
        return Some(text.to_owned());
    }
    let message = error.get("message")?.as_str()?;
    Some(match error.get("type").and_then(|t| t.as_str()) {
        Some(kind) => format!("{kind}: {message}"),
        None => message.to_owned(),
    })
}

/// Whitespace and control characters collapsed to single spaces, at most [`EXCERPT_CHARS`].
pub(crate) fn one_line(text: &str) -> String {
    let mut out = String::new();
    let mut chars = 0;
    for word in text.split(|c: char| c.is_whitespace() || c.is_control()) {
        if word.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
            chars += 1;
        }
        for c in word.chars() {
            if chars == EXCERPT_CHARS {
                out.push('…');
                return out;
            }
            out.push(c);
            chars += 1;
        }
    }
    out
}

/// An error's text with its sources (reqwest's own text is only the outermost).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// `error` with every occurrence of every key replaced.
pub(crate) fn scrub(error: ProviderError, secrets: &[ApiKey]) -> ProviderError {
    let clean = |text: String| {
        secrets
            .iter()
            .map(ApiKey::expose)
            .filter(|key| !key.is_empty())
            .fold(text, |text, key| text.replace(key, REDACTED))
    };
    match error {
        ProviderError::Unavailable {
            why,
            retry_after_ms,
        } => ProviderError::Unavailable {
            why: clean(why),
            retry_after_ms,
        },
        ProviderError::Refused(why) => ProviderError::Refused(clean(why)),
        ProviderError::TimedOut(why) => ProviderError::TimedOut(clean(why)),
        ProviderError::Failed(why) => ProviderError::Failed(clean(why)),
    }
}

/// A scripted HTTP/1.1 upstream on 127.0.0.1 for the providers' tests: one connection, one
/// request, one scripted answer.
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;

    use crate::provider::{Event, Generation};

    use super::HttpSettings;

    /// What the upstream does once it has read the request.
    #[derive(Debug, Clone)]
    pub(crate) enum Script {
        /// A whole response with this status, extra headers and body.
        Status {
            code: u16,
            headers: Vec<(&'static str, String)>,
            body: String,
        },
        /// Never answers.
        Hang,
        /// A 200 event stream, one HTTP chunk per piece, then `end`.
        Stream { pieces: Vec<String>, end: End },
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum End {
        /// The last chunk, as a body should end.
        Finish,
        /// The connection closed in the middle of the body.
        Abort,
        /// Nothing more is sent; the connection stays open.
        Hold,
    }

    /// The request as received: the head (request line and headers) and the body.
    #[derive(Debug)]
    pub(crate) struct Received {
        pub(crate) head: String,
        pub(crate) body: Vec<u8>,
    }

    impl Received {
        /// A header's value (names compared without case).
        pub(crate) fn header(&self, name: &str) -> Option<String> {
            self.head.lines().skip(1).find_map(|line| {
                let (n, v) = line.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        }

        pub(crate) fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap()
        }
    }

    #[derive(Debug)]
    pub(crate) struct Upstream {
        /// `http://127.0.0.1:PORT`.
        pub(crate) url: String,
        pub(crate) request: oneshot::Receiver<Received>,
        /// Fires when the client closed the connection (for `Hang` and `Hold`).
        pub(crate) closed: oneshot::Receiver<()>,
    }

    /// Settings for `base_url` with limits long enough for a loaded machine (well under the
    /// 10 s [`collect`] and [`next`] wait).
    pub(crate) fn settings(base_url: String) -> HttpSettings {
        HttpSettings {
            base_url,
            api_key: None,
            connect_timeout: Duration::from_secs(1),
            first_byte_timeout: Duration::from_millis(1500),
            idle_timeout: Duration::from_millis(1500),
        }
    }

    /// Settings for tests of the timeouts themselves: 300 ms to the headers and between reads.
    pub(crate) fn quick(base_url: String) -> HttpSettings {
        HttpSettings {
            first_byte_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(300),
            ..settings(base_url)
        }
    }

    pub(crate) async fn upstream(script: Script) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (request_tx, request) = oneshot::channel();
        let (closed_tx, closed) = oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let received = read_request(&mut socket).await;
            let _ = request_tx.send(received);
            match script {
                Script::Status {
                    code,
                    headers,
                    body,
                } => {
                    let mut head = format!(
                        "HTTP/1.1 {code} Whatever\r\ncontent-length: {}\r\n\
                         content-type: application/json\r\n",
                        body.len()
                    );
                    for (name, value) in headers {
                        head.push_str(&format!("{name}: {value}\r\n"));
                    }
                    head.push_str("\r\n");
                    socket.write_all(head.as_bytes()).await.unwrap();
                    socket.write_all(body.as_bytes()).await.unwrap();
                    socket.flush().await.unwrap();
                    wait_closed(socket).await;
                }
                Script::Hang => {
                    wait_closed(socket).await;
                    let _ = closed_tx.send(());
                }
                Script::Stream { pieces, end } => {
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                transfer-encoding: chunked\r\n\r\n";
                    socket.write_all(head.as_bytes()).await.unwrap();
                    for piece in pieces {
                        let frame = format!("{:x}\r\n{piece}\r\n", piece.len());
                        if socket.write_all(frame.as_bytes()).await.is_err() {
                            return;
                        }
                        let _ = socket.flush().await;
                    }
                    match end {
                        End::Finish => {
                            let _ = socket.write_all(b"0\r\n\r\n").await;
                            wait_closed(socket).await;
                        }
                        End::Abort => {
                            let _ = socket.shutdown().await;
                        }
                        End::Hold => {
                            wait_closed(socket).await;
                            let _ = closed_tx.send(());
                        }
                    }
                }
            }
        });
        Upstream {
            url,
            request,
            closed,
        }
    }

    async fn read_request(socket: &mut TcpStream) -> Received {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            let n = socket.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the client closed before a whole request");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = buf[head_end..].to_vec();
        while body.len() < length {
            let n = socket.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the client closed before the whole body");
            body.extend_from_slice(&chunk[..n]);
        }
        Received { head, body }
    }

    /// Waits until the peer closes (a read of 0 bytes, or an error).
    async fn wait_closed(mut socket: TcpStream) {
        let mut chunk = [0u8; 1024];
        loop {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Every event of `generation` until its sender goes (within 10 s: far past any timeout
    /// of [`settings`], so a test fails here only when nothing ends the generation).
    pub(crate) async fn collect(mut generation: Generation) -> Vec<Event> {
        let mut events = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(event) = generation.events.recv().await {
                events.push(event);
            }
        })
        .await
        .unwrap();
        events
    }

    /// Feeds `(event, data)` pairs to `decoder`, stopping at the first `Done` or error as the
    /// HTTP task does, else ending the stream.
    pub(crate) fn decode_all<'a, D: super::Decoder>(
        mut decoder: D,
        events: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        for (event, data) in events {
            match decoder.on_event(event, data) {
                Ok(events) => {
                    let done = events.iter().any(|e| matches!(e, Event::Done { .. }));
                    out.extend(events);
                    if done {
                        return out;
                    }
                }
                Err(error) => {
                    out.push(Event::Failed(error));
                    return out;
                }
            }
        }
        out.push(decoder.on_end());
        out
    }

    /// The next event within 10 s.
    pub(crate) async fn next(generation: &mut Generation) -> Option<Event> {
        tokio::time::timeout(Duration::from_secs(10), generation.events.recv())
            .await
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn endpoints_join_and_refuse_bad_urls() {
        assert_eq!(
            endpoint("http://127.0.0.1:8080/v1/", "/chat/completions")
                .unwrap()
                .as_str(),
            "http://127.0.0.1:8080/v1/chat/completions"
        );
        assert_eq!(
            endpoint("https://api.anthropic.com", "/v1/messages")
                .unwrap()
                .as_str(),
            "https://api.anthropic.com/v1/messages"
        );
        for bad in [
            "ftp://host/v1",
            "http://user:pw@host/v1",
            "http://host/v1?x=1",
            "not a url",
        ] {
            assert!(
                matches!(endpoint(bad, "/x"), Err(SetupError::BaseUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn retry_after_headers() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after_ms(&headers), None);
        headers.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after_ms(&headers), Some(7000));
        headers.insert("retry-after-ms", HeaderValue::from_static("1500.5"));
        assert_eq!(retry_after_ms(&headers), Some(1500));
        let mut dated = HeaderMap::new();
        dated.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after_ms(&dated), None);
    }

    #[test]
    fn excerpts_are_one_bounded_line() {
        assert_eq!(
            excerpt(br#"{"error":{"message":"bad key","type":"invalid_request_error"}}"#),
            "invalid_request_error: bad key"
        );
        assert_eq!(
            excerpt(
                br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            ),
            "overloaded_error: Overloaded"
        );
        assert_eq!(
            excerpt(br#"{"error":"model not found"}"#),
            "model not found"
        );
        assert_eq!(
            excerpt(b"<html>\n  Bad\tGateway\r\n</html>"),
            "<html> Bad Gateway </html>"
        );
        let long = "x".repeat(10_000);
        assert_eq!(excerpt(long.as_bytes()).chars().count(), EXCERPT_CHARS + 1);
    }

    #[test]
    fn scrub_removes_every_key_and_ignores_empty_ones() {
        let secrets = vec![
            ApiKey::new("sk-one"),
            ApiKey::new(""),
            ApiKey::new("sk-two"),
        ];
        let error = ProviderError::Refused("got sk-one and sk-two, sk-one again".to_owned());
        assert_eq!(
            scrub(error, &secrets),
            ProviderError::Refused(format!("got {REDACTED} and {REDACTED}, {REDACTED} again"))
        );
    }

    #[test]
    fn keys_from_the_environment() {
        // A name no one sets.
        assert_eq!(
            api_key_from_env("SYNESIS_TEST_NO_SUCH_KEY_VAR_7f3a").unwrap(),
            None
        );
    }

    /// An `https` upstream gets a TLS ClientHello from the ring provider passed in (no
    /// process-wide provider is installed in these tests), and a peer that is not TLS is
    /// `Unavailable`, not a panic.
    #[tokio::test]
    async fn https_speaks_tls_without_a_process_default_provider() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        assert!(
            rustls::crypto::CryptoProvider::get_default().is_none(),
            "nothing in this crate installs a process-wide rustls provider"
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut hello = [0u8; 3];
            socket.read_exact(&mut hello).await.unwrap();
            socket
                .write_all(b"HTTP/1.1 400 Not TLS\r\n\r\n")
                .await
                .unwrap();
            hello
        });
        let mut settings = testing::settings(format!("https://localhost:{port}/v1"));
        settings.api_key = Some(ApiKey::new("sk-tls"));
        let upstream = Upstream::new(settings, "/chat/completions").unwrap();
        let generation = upstream.start(Ok(upstream.post().body("{}")), None, NoDecoder);
        let events = testing::collect(generation).await;
        // A TLS handshake record (0x16), TLS 1.x (0x03 0x01 in a ClientHello's record header).
        assert_eq!(server.await.unwrap(), [0x16, 0x03, 0x01]);
        assert!(
            matches!(
                events[..],
                [Event::Failed(ProviderError::Unavailable { .. })]
            ),
            "{events:?}"
        );
    }

    struct NoDecoder;

    impl Decoder for NoDecoder {
        fn on_event(&mut self, _: &str, _: &str) -> Result<Vec<Event>, ProviderError> {
            Ok(Vec::new())
        }

        fn on_end(&mut self) -> Event {
            Event::Failed(ProviderError::Failed("end".to_owned()))
        }
    }

    #[test]
    fn a_key_that_cannot_be_a_header_is_refused_at_setup() {
        let mut settings = HttpSettings::new("http://127.0.0.1:1/v1");
        settings.api_key = Some(ApiKey::new("bad\nkey"));
        assert_eq!(
            Upstream::new(settings, "/chat/completions").unwrap_err(),
            SetupError::KeyNotHeader
        );
        let error = key_header("Bearer ", &ApiKey::new("bad\nkey")).unwrap_err();
        assert!(!error.to_string().contains("bad\nkey"));
    }
}
