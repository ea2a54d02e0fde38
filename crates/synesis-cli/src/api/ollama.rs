//! Ollama's API, on the same port as OpenAI's: `/api/chat` and `/api/generate` (streamed as
//! NDJSON by default, as Ollama streams them), `/api/embed`, `/api/tags`, `/api/show`, `/api/ps`
//! and `/api/version`, with Ollama's field names and its error shape (`{"error": "…"}`). A
//! request is answered down the same path as every API's ([`super::start`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;
use synesis_infer::tools::ToolChoice;

use super::metrics::Pieces;
use super::openai::{FunctionSpec, Posted};
use super::pieces::{ApiError, Ending, Finish, Piece, Whole};
use super::{Api, checked_body, json_response, local_model, start};
use crate::request::{AnswerRequest, Conversation, Format};

/// What `/api/version` says: Ollama's clients check it is there; the version is Synesis's.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Ollama's error shape, with the status an OpenAI-shaped error would have.
fn failure(e: &ApiError) -> Response {
    e.response_with(&serde_json::json!({"error": e.message}))
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(|e| failure(&e))
}

/// `format`: `"json"`, a JSON schema, or nothing.
fn format(value: Option<&serde_json::Value>) -> Result<Format, ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(Format::Text),
        Some(serde_json::Value::String(s)) if s.is_empty() => Ok(Format::Text),
        Some(serde_json::Value::String(s)) if s == "json" => Ok(Format::Json),
        Some(schema @ serde_json::Value::Object(_)) => Ok(Format::Schema(schema.clone())),
        Some(other) => Err(ApiError::invalid(format!(
            "format must be \"json\" or a JSON schema, not {other}"
        ))),
    }
}

/// The `options` this server acts on; any other is refused by name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    seed: Option<i64>,
    num_predict: Option<i64>,
    #[serde(default)]
    stop: Vec<String>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// Accepted, not applied: the context is the model's own (or `synesis serve`'s setting).
    #[allow(dead_code)]
    num_ctx: Option<u32>,
}

impl Options {
    fn read(value: Option<serde_json::Value>) -> Result<Options, ApiError> {
        match value {
            None | Some(serde_json::Value::Null) => Ok(Options::default()),
            Some(v) => serde_json::from_value(v).map_err(|e| {
                let said = e.to_string();
                match said.split('`').nth(1) {
                    Some(field) if said.starts_with("unknown field") => {
                        ApiError::unsupported(&format!("options.{field}"), "")
                    }
                    _ => ApiError::invalid(format!("options: {said}")),
                }
            }),
        }
    }

    fn apply(&self, r: &mut AnswerRequest) {
        if let Some(t) = self.temperature {
            r.temperature = t;
        }
        r.top_p = self.top_p;
        r.top_k = self.top_k;
        r.seed = self.seed.and_then(|s| u64::try_from(s).ok());
        // Ollama's -1 is "until the model stops" (bounded here by the most any answer takes).
        if let Some(n) = self.num_predict {
            r.max_tokens = u32::try_from(n)
                .ok()
                .filter(|&n| n > 0)
                .unwrap_or(crate::request::MAX_TOKENS_MAX);
        }
        r.stop = self.stop.clone();
        r.presence_penalty = self.presence_penalty.unwrap_or(0.0);
        r.frequency_penalty = self.frequency_penalty.unwrap_or(0.0);
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    model: String,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default = "yes")]
    stream: bool,
    format: Option<serde_json::Value>,
    options: Option<serde_json::Value>,
    /// Accepted; the service keeps models loaded for its own `--keep-alive`.
    #[allow(dead_code)]
    keep_alive: Option<serde_json::Value>,
    #[serde(default)]
    tools: Vec<ToolSpec>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    tool_calls: Vec<Call>,
}

#[derive(Debug, Deserialize)]
struct Call {
    function: CallFunction,
}

#[derive(Debug, Deserialize)]
struct CallFunction {
    name: String,
    #[serde(default)]
    arguments: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct ToolSpec {
    function: FunctionSpec,
}

#[derive(Debug, Deserialize)]
struct GenerateBody {
    model: String,
    #[serde(default)]
    prompt: String,
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    #[serde(default = "yes")]
    stream: bool,
    format: Option<serde_json::Value>,
    options: Option<serde_json::Value>,
    #[allow(dead_code)]
    keep_alive: Option<serde_json::Value>,
}

impl Posted for ChatBody {
    const FIELDS: &'static [&'static str] = &[
        "model",
        "messages",
        "stream",
        "format",
        "options",
        "keep_alive",
        "tools",
    ];
    const WHAT: &'static str = "a chat request";
}

impl Posted for GenerateBody {
    const FIELDS: &'static [&'static str] = &[
        "model",
        "prompt",
        "system",
        "raw",
        "stream",
        "format",
        "options",
        "keep_alive",
    ];
    const WHAT: &'static str = "a generate request";
}

/// Which of Ollama's objects an answer is rendered as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `/api/chat`: the text in `message.content`.
    Chat,
    /// `/api/generate`: the text in `response`.
    Generate,
}

pub(crate) async fn chat(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(
        async {
            let arrived = Instant::now();
            let body = checked_body(&api, &headers, body)?;
            let chat = ChatBody::read(&body)?;
            let mut conversation = Conversation::default();
            for (i, m) in chat.messages.iter().enumerate() {
                if !m.images.is_empty() {
                    return Err(ApiError::unsupported(&format!("messages[{i}].images"), " (text only)"));
                }
                match m.role.as_str() {
                    "system" => conversation.system(m.content.clone()),
                    "user" => conversation.user(m.content.clone()),
                    "assistant" => {
                        let calls: Vec<(String, String)> = m
                            .tool_calls
                            .iter()
                            .map(|c| (c.function.name.clone(), c.function.arguments.to_string()))
                            .collect();
                        conversation.assistant(m.content.clone(), &calls);
                    }
                    "tool" => conversation.tool_result(&m.content),
                    other => {
                        return Err(ApiError::invalid(format!(
                            "messages[{i}]: the role {other:?} is not supported (system, user, assistant, tool)"
                        )));
                    }
                }
            }
            let mut ask = AnswerRequest::new(chat.model.clone(), conversation)?;
            Options::read(chat.options)?.apply(&mut ask);
            ask.format = format(chat.format.as_ref())?;
            ask.tools = chat.tools.iter().map(|t| t.function.tool()).collect();
            if !ask.tools.is_empty() {
                ask.tool_choice = Some(ToolChoice::Auto);
            }
            ask.check()?;
            answer(&api, &headers, ask, Shape::Chat, chat.stream, arrived).await
        }
        .await,
    )
}

pub(crate) async fn generate(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(
        async {
            let arrived = Instant::now();
            let body = checked_body(&api, &headers, body)?;
            let g = GenerateBody::read(&body)?;
            if g.prompt.is_empty() {
                // Ollama's way to load a model: answered once it is loaded.
                let (name, _) = local_model(&api, &g.model).await?;
                return Ok(json_response(&serde_json::json!({
                    "model": name, "created_at": now(), "response": "", "done": true,
                    "done_reason": "load",
                })));
            }
            let mut conversation = Conversation::default();
            if let Some(system) = &g.system {
                conversation.system(system.clone());
            }
            conversation.user(g.prompt.clone());
            let mut ask = AnswerRequest::new(g.model.clone(), conversation)?;
            ask.raw = g.raw;
            Options::read(g.options)?.apply(&mut ask);
            ask.format = format(g.format.as_ref())?;
            ask.check()?;
            answer(&api, &headers, ask, Shape::Generate, g.stream, arrived).await
        }
        .await,
    )
}

async fn answer(
    api: &Arc<Api>,
    headers: &HeaderMap,
    ask: AnswerRequest,
    shape: Shape,
    stream: bool,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let started = start(api, headers, ask).await?;
    let (info, first, mut rx) = started.parts();
    let model = info.model.clone();
    let response = if stream {
        streamed(model, shape, first, rx, arrived)
    } else {
        let (whole, ending) = Whole::gather(first, &mut rx).await?;
        let mut body = record(&model, shape, &whole.text, &whole.calls);
        finish(&mut body, &ending, arrived);
        json_response(&body)
    };
    Ok(info.label(response))
}

/// One NDJSON record of an answer: its text and calls so far.
fn record(
    model: &str,
    shape: Shape,
    text: &str,
    calls: &[(String, String, String)],
) -> serde_json::Value {
    let mut r = serde_json::json!({"model": model, "created_at": now(), "done": false});
    match shape {
        Shape::Chat => {
            let mut message = serde_json::json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                message["tool_calls"] = calls
                    .iter()
                    .map(|(_, name, arguments)| {
                        let arguments: serde_json::Value =
                            serde_json::from_str(arguments).unwrap_or_default();
                        serde_json::json!({"function": {"name": name, "arguments": arguments}})
                    })
                    .collect();
            }
            r["message"] = message;
        }
        Shape::Generate => r["response"] = text.into(),
    }
    r
}

/// The last record's fields: why it ended, its counts and durations (in nanoseconds).
fn finish(r: &mut serde_json::Value, e: &Ending, arrived: Instant) {
    r["done"] = true.into();
    r["done_reason"] = match e.finish {
        Finish::Length => "length",
        Finish::Stop | Finish::ToolCalls => "stop",
    }
    .into();
    let total = u64::try_from(arrived.elapsed().as_nanos()).unwrap_or(u64::MAX);
    r["total_duration"] = total.into();
    r["prompt_eval_count"] = e.prompt_tokens.into();
    r["eval_count"] = e.completion_tokens.into();
}

fn streamed(model: String, shape: Shape, first: Piece, rx: Pieces, arrived: Instant) -> Response {
    let lines =
        futures_util::stream::unfold((rx, Some(first), false), move |(mut rx, next, done)| {
            let model = model.clone();
            async move {
                if done {
                    return None;
                }
                let piece = match next {
                    Some(p) => Some(p),
                    None => rx.recv().await,
                };
                let (value, done) = match piece {
                    Some(Piece::Text(t)) => (record(&model, shape, &t, &[]), false),
                    Some(Piece::ToolCall {
                        id,
                        name,
                        arguments,
                    }) => (record(&model, shape, "", &[(id, name, arguments)]), false),
                    Some(Piece::Routed { .. } | Piece::Logprobs(_)) => {
                        return Some((Ok::<_, Infallible>(String::new()), (rx, None, false)));
                    }
                    Some(Piece::End(e)) => {
                        let mut last = record(&model, shape, "", &[]);
                        finish(&mut last, &e, arrived);
                        (last, true)
                    }
                    Some(Piece::Failed(e)) => (serde_json::json!({"error": e.message}), true),
                    None => (
                        serde_json::json!({"error": "the answer ended without its end"}),
                        true,
                    ),
                };
                Some((Ok(format!("{value}\n")), (rx, None, done)))
            }
        });
    let mut response = Response::new(Body::from_stream(lines));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

#[derive(Debug, Deserialize)]
struct EmbedBody {
    model: String,
    input: Input,
    /// Ollama truncates by default; a text longer than the context is refused here instead.
    #[serde(default)]
    truncate: Option<bool>,
    /// Refused unless empty: nothing here shapes an embedding.
    options: Option<serde_json::Value>,
    #[allow(dead_code)]
    keep_alive: Option<serde_json::Value>,
}

impl Posted for EmbedBody {
    const FIELDS: &'static [&'static str] =
        &["model", "input", "truncate", "options", "keep_alive"];
    const WHAT: &'static str = "an embed request";
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

pub(crate) async fn embed(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(
        async {
            let arrived = Instant::now();
            let body = checked_body(&api, &headers, body)?;
            let e = EmbedBody::read(&body)?;
            if e.options
                .as_ref()
                .is_some_and(|o| o.as_object().is_some_and(|o| !o.is_empty()))
            {
                return Err(ApiError::unsupported("options", " for embeddings"));
            }
            if e.truncate == Some(true) {
                return Err(ApiError::unsupported(
                    "truncate",
                    " as true (a text longer than the model's context is refused)",
                ));
            }
            let texts = match e.input {
                Input::One(t) => vec![t],
                Input::Many(v) => v,
            };
            let (name, made) = super::embed(&api, &e.model, texts).await?;
            Ok(json_response(&serde_json::json!({
                "model": name,
                "embeddings": made.vectors,
                "total_duration": u64::try_from(arrived.elapsed().as_nanos()).unwrap_or(u64::MAX),
                "prompt_eval_count": made.prompt_tokens,
            })))
        }
        .await,
    )
}

pub(crate) async fn version() -> Response {
    json_response(&serde_json::json!({"version": VERSION}))
}

/// A local model as Ollama lists one.
fn listed(name: &str, entry: &crate::registry::ModelEntry) -> serde_json::Value {
    let modified = std::fs::metadata(&entry.path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| synesis_tunnel::clock::system_time(synesis_proto::UnixMillis(0)));
    serde_json::json!({
        "name": name,
        "model": name,
        "modified_at": humantime::format_rfc3339_seconds(modified).to_string(),
        "size": entry.size_bytes,
        "digest": entry.sha256,
        "details": details(entry),
    })
}

fn details(entry: &crate::registry::ModelEntry) -> serde_json::Value {
    serde_json::json!({
        "format": "gguf",
        "family": entry.architecture,
        "families": [entry.architecture],
        "parameter_size": "",
        "quantization_level": "",
    })
}

pub(crate) async fn tags(State(api): State<Arc<Api>>) -> Response {
    let config = api.config.borrow().clone();
    let models: Vec<serde_json::Value> = config
        .models
        .iter()
        .map(|(name, entry)| listed(name, entry))
        .collect();
    json_response(&serde_json::json!({"models": models}))
}

/// The models loaded now, as `/api/ps` lists them.
pub(crate) async fn ps(State(api): State<Arc<Api>>) -> Response {
    let config = api.config.borrow().clone();
    let loaded = api.host.names().await;
    let models: Vec<serde_json::Value> = loaded
        .iter()
        .filter_map(|name| {
            let entry = config.models.get(name)?;
            let mut m = listed(name, entry);
            m["size_vram"] = 0.into();
            Some(m)
        })
        .collect();
    json_response(&serde_json::json!({"models": models}))
}

#[derive(Debug, Deserialize)]
struct ShowBody {
    #[serde(alias = "name")]
    model: String,
}

impl Posted for ShowBody {
    const FIELDS: &'static [&'static str] = &["model", "name", "verbose"];
    const WHAT: &'static str = "a show request";
}

pub(crate) async fn show(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(
        async {
            let body = checked_body(&api, &headers, body)?;
            let show = ShowBody::read(&body)?;
            let config = api.config.borrow().clone();
            let Some(entry) = config.models.get(&show.model) else {
                return Err(not_found(&show.model));
            };
            let meta = synesis_infer::GgufMetadata::read(&entry.path).ok();
            let template = meta
                .as_ref()
                .and_then(|m| m.str("tokenizer.chat_template"))
                .unwrap_or_default()
                .to_owned();
            Ok(json_response(&serde_json::json!({
                "modelfile": format!("FROM {}\n", entry.path.display()),
                "parameters": "",
                "template": template,
                "details": details(entry),
                "model_info": {
                    "general.architecture": entry.architecture,
                    format!("{}.context_length", entry.architecture): entry.context_length,
                },
                "capabilities": ["completion", "tools", "embedding"],
                "modified_at": listed(&show.model, entry)["modified_at"],
            })))
        }
        .await,
    )
}

#[derive(Debug, Deserialize)]
struct PullBody {
    #[serde(alias = "name")]
    model: String,
    #[serde(default = "yes")]
    stream: bool,
    /// Accepted: the Hub is always reached over TLS, its certificates checked.
    #[allow(dead_code)]
    #[serde(default)]
    insecure: bool,
}

impl Posted for PullBody {
    const FIELDS: &'static [&'static str] = &["model", "name", "stream", "insecure"];
    const WHAT: &'static str = "a pull request";
}

/// Progress lines a pull may have waiting for a slow client; more are dropped (the next says
/// where it is).
const PULL_LINES_MAX: usize = 64;

/// `/api/pull`: `synesis model pull` (a short name from `synesis model pull --list`, or
/// `hf:OWNER/REPO/FILE.gguf`), with Ollama's progress lines; the model is registered and
/// served at once. One pull at a time; a client that leaves does not stop it (what it fetched
/// stays, and a later pull resumes it).
pub(crate) async fn pull(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(
        async {
            let body = checked_body(&api, &headers, body)?;
            let p = PullBody::read(&body)?;
            let reference = crate::pull::Reference::parse(&p.model)
                .map_err(|e| ApiError::invalid(format!("{e:#}")))?;
            // The Hub only (`HF_ENDPOINT`): a request may not make the service fetch from any
            // host it names (`synesis model pull URL` does that, for the person at the shell).
            if matches!(reference, crate::pull::Reference::Url(_)) {
                return Err(ApiError::invalid(
                    "/api/pull takes a model name or a Hub reference, not a URL (`synesis model pull URL` pulls one)",
                ));
            }
            let (tx, rx) = tokio::sync::mpsc::channel::<serde_json::Value>(PULL_LINES_MAX);
            let work = {
                let api = Arc::clone(&api);
                let tx = tx.clone();
                async move {
                    let _one = api.pulling.lock().await;
                    let _ = tx
                        .send(serde_json::json!({"status": "pulling manifest"}))
                        .await;
                    // A line per percent at most (and each change of step).
                    let last = std::sync::Mutex::new((String::new(), u64::MAX));
                    let told = tx.clone();
                    let progress = crate::pull::Progress::To(Arc::new(move |step, done, total| {
                        let percent = total.map_or(done >> 20, |t| done * 100 / t.max(1));
                        let mut last = last
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        if last.0 == step && last.1 == percent {
                            return;
                        }
                        *last = (step.to_owned(), percent);
                        let status = if step == "verifying" {
                            "verifying sha256 digest"
                        } else {
                            "downloading"
                        };
                        let _ = told.try_send(serde_json::json!({
                            "status": status, "completed": done, "total": total,
                        }));
                    }));
                    let pulled = crate::commands::model::pull_and_register(
                        &api.paths, &reference, None, progress,
                    )
                    .await;
                    match pulled.and_then(|p| {
                        api.config
                            .send_replace(crate::registry::Config::load(&api.paths.config_file())?);
                        Ok(p)
                    }) {
                        Ok(p) => {
                            let _ = tx
                                .send(serde_json::json!({"status": "writing manifest"}))
                                .await;
                            let _ = tx
                                .send(serde_json::json!({
                                    "status": "success", "model": p.name,
                                    "digest": format!("sha256:{}", p.entry.sha256),
                                }))
                                .await;
                        }
                        Err(e) => {
                            let _ = tx
                                .send(serde_json::json!({"error": format!("{e:#}")}))
                                .await;
                        }
                    }
                }
            };
            tokio::spawn(work);
            drop(tx);
            if p.stream {
                let lines = futures_util::stream::unfold(rx, |mut rx| async move {
                    let line = rx.recv().await?;
                    Some((Ok::<_, Infallible>(format!("{line}\n")), rx))
                });
                let mut response = Response::new(Body::from_stream(lines));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-ndjson"),
                );
                return Ok(response);
            }
            // Whole: the last line, once the pull ends.
            let mut rx = rx;
            let mut last = serde_json::Value::Null;
            while let Some(line) = rx.recv().await {
                last = line;
            }
            match last.get("error").and_then(|e| e.as_str()) {
                Some(e) => Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "pull_failed",
                    e,
                )),
                None => Ok(json_response(&last)),
            }
        }
        .await,
    )
}

fn not_found(model: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "model_not_found",
        format!("model {model:?} not found"),
    )
}

fn now() -> String {
    let now = synesis_tunnel::clock::system_time(synesis_tunnel::clock::unix_now());
    humantime::format_rfc3339_millis(now).to_string()
}
