//! OpenAI's shapes: chat completions (whole, or `chat.completion.chunk` server-sent events
//! ending with `data: [DONE]`), with tools, response formats and logprobs; legacy completions;
//! embeddings; the model list. A field this server does not act on is refused by name
//! ([`Posted`]), never silently ignored.

use std::convert::Infallible;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde::Deserialize;
use synesis_infer::tools::{Tool, ToolChoice};
use synesis_infer::{TOP_LOGPROBS_MAX, TokenLogprob};
use synesis_proto::RequestId;

use super::json_body;
use super::metrics::Pieces;
use super::pieces::{ApiError, Ending, Piece, Whole, token_text};
use crate::request::{AnswerRequest, Conversation, DEFAULT_MAX_TOKENS, Format};

/// A request body an endpoint takes: its fields, every one it acts on (any other is refused
/// by name, never silently ignored), and what it is called in errors.
pub(crate) trait Posted: serde::de::DeserializeOwned {
    const FIELDS: &'static [&'static str];
    const WHAT: &'static str;

    /// Reads a body: a JSON object of known fields, in this shape.
    fn read(body: &[u8]) -> Result<Self, ApiError> {
        read_with(body, Self::FIELDS, Self::WHAT)
    }
}

/// Reads a body that must be a JSON object of the fields `fields`, in `T`'s shape; `what` names
/// the request in errors.
pub(crate) fn read_with<T: serde::de::DeserializeOwned>(
    body: &[u8],
    fields: &[&str],
    what: &str,
) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(ApiError::invalid(format!(
            "the body must be {what} (a JSON object)"
        )));
    };
    if let Some(field) = object.keys().find(|k| !fields.contains(&k.as_str())) {
        return Err(ApiError::unsupported(
            field,
            " (README.md lists what each API takes)",
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::invalid(format!("the body is not {what}: {e}")))
}

/// What chat and completion requests share: sampling, length aside, and streaming.
#[derive(Debug, Deserialize)]
pub(crate) struct Sampling {
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    n: Option<u32>,
    #[serde(default)]
    presence_penalty: f32,
    #[serde(default)]
    frequency_penalty: f32,
    /// Accepted and not used (OpenAI's end-user identifier, for its abuse monitoring).
    #[allow(dead_code)]
    user: Option<String>,
}

/// The fields of [`Sampling`].
const SAMPLING_FIELDS: &[&str] = &[
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "user",
];

impl Sampling {
    fn apply(&self, r: &mut AnswerRequest) -> Result<(), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("only n = 1 is supported"));
        }
        if let Some(t) = self.temperature {
            r.temperature = t;
        }
        r.top_p = self.top_p;
        r.top_k = self.top_k;
        r.seed = self.seed;
        r.stop = Stop::list(self.stop.as_ref());
        r.presence_penalty = self.presence_penalty;
        r.frequency_penalty = self.frequency_penalty;
        Ok(())
    }

    /// Whether the answer streams, and whether its usage comes last when it does.
    pub(crate) fn streaming(&self) -> (bool, bool) {
        let usage = self
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        (self.stream, usage)
    }
}

/// The fields of a chat completion request this server acts on, besides [`SAMPLING_FIELDS`].
const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    model: String,
    messages: Vec<InMessage>,
    #[serde(flatten)]
    pub(crate) sampling: Sampling,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u8>,
    response_format: Option<ResponseFormat>,
    #[serde(default)]
    tools: Vec<ToolSpec>,
    tool_choice: Option<ToolChoiceSpec>,
    /// Accepted either way: an answer makes at most one call.
    #[allow(dead_code)]
    parallel_tool_calls: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn list(stop: Option<&Stop>) -> Vec<String> {
        match stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Vec<OutCall>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// A call an earlier assistant turn made.
#[derive(Debug, Deserialize)]
struct OutCall {
    function: CallFunction,
}

#[derive(Debug, Deserialize)]
struct CallFunction {
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaSpec },
}

#[derive(Debug, Deserialize)]
struct JsonSchemaSpec {
    #[serde(default)]
    schema: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct ToolSpec {
    #[serde(rename = "type")]
    kind: String,
    function: FunctionSpec,
}

#[derive(Debug, Deserialize)]
pub(crate) struct FunctionSpec {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    parameters: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ToolChoiceSpec {
    Word(String),
    Function { function: NamedFunction },
}

#[derive(Debug, Deserialize)]
struct NamedFunction {
    name: String,
}

/// A message's text: a string, or its text parts one after another.
fn content_text(i: usize, content: Option<&Content>) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(format!(
                            "messages[{i}]: content of type {kind:?} is not supported (text only)"
                        )));
                    }
                }
            }
            Ok(text)
        }
    }
}

/// Every field a body of `T` may have: its own and the sampling ones.
fn with_sampling(own: &'static [&'static str]) -> Vec<&'static str> {
    own.iter().chain(SAMPLING_FIELDS).copied().collect()
}

impl ChatRequest {
    pub(crate) fn read(body: &[u8]) -> Result<ChatRequest, ApiError> {
        read_with(
            body,
            &with_sampling(CHAT_FIELDS),
            "a chat completion request",
        )
    }

    /// The request, as every API's is answered.
    pub(crate) fn answer_request(&self) -> Result<AnswerRequest, ApiError> {
        let mut conversation = Conversation::default();
        for (i, m) in self.messages.iter().enumerate() {
            let text = content_text(i, m.content.as_ref())?;
            match m.role.as_str() {
                "system" | "developer" => conversation.system(text),
                "user" => conversation.user(text),
                "assistant" => {
                    let calls: Vec<(String, String)> = m
                        .tool_calls
                        .iter()
                        .map(|c| (c.function.name.clone(), c.function.arguments.clone()))
                        .collect();
                    conversation.assistant(text, &calls);
                }
                "tool" => conversation.tool_result(&text),
                other => {
                    return Err(ApiError::invalid(format!(
                        "messages[{i}]: the role {other:?} is not supported (system, developer, user, assistant, tool)"
                    )));
                }
            }
        }
        let mut r = AnswerRequest::new(self.model.clone(), conversation)?;
        r.max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS);
        self.sampling.apply(&mut r)?;
        r.logprobs = match (self.logprobs, self.top_logprobs) {
            (_, Some(n)) if n > TOP_LOGPROBS_MAX => {
                return Err(ApiError::invalid(format!(
                    "top_logprobs must be 0 to {TOP_LOGPROBS_MAX}"
                )));
            }
            (true, n) => Some(n.unwrap_or(0)),
            (false, Some(_)) => {
                return Err(ApiError::invalid("top_logprobs needs logprobs: true"));
            }
            (false, None) => None,
        };
        r.format = match &self.response_format {
            None | Some(ResponseFormat::Text) => Format::Text,
            Some(ResponseFormat::JsonObject) => Format::Json,
            Some(ResponseFormat::JsonSchema { json_schema }) => match &json_schema.schema {
                Some(schema) => Format::Schema(schema.clone()),
                None => Format::Json,
            },
        };
        for t in &self.tools {
            if t.kind != "function" {
                return Err(ApiError::invalid(format!(
                    "tools of type {:?} are not supported (function only)",
                    t.kind
                )));
            }
        }
        r.tools = self.tools.iter().map(|t| t.function.tool()).collect();
        r.tool_choice = match &self.tool_choice {
            _ if self.tools.is_empty() => None,
            None => Some(ToolChoice::Auto),
            Some(ToolChoiceSpec::Word(w)) => match w.as_str() {
                "auto" => Some(ToolChoice::Auto),
                "required" => Some(ToolChoice::Required),
                "none" => None,
                other => {
                    return Err(ApiError::invalid(format!(
                        "tool_choice {other:?} is not one of none, auto, required, or a function"
                    )));
                }
            },
            Some(ToolChoiceSpec::Function { function }) => {
                Some(ToolChoice::Named(function.name.clone()))
            }
        };
        r.check()?;
        Ok(r)
    }
}

impl FunctionSpec {
    pub(crate) fn tool(&self) -> Tool {
        Tool {
            name: self.name.clone(),
            description: self.description.clone(),
            parameters: self.parameters.clone(),
        }
    }
}

/// The fields of a (legacy) completion request this server acts on, besides
/// [`SAMPLING_FIELDS`].
const COMPLETION_FIELDS: &[&str] = &["model", "prompt", "max_tokens", "logprobs", "echo"];

#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    model: String,
    prompt: PromptSpec,
    #[serde(flatten)]
    pub(crate) sampling: Sampling,
    max_tokens: Option<u32>,
    logprobs: Option<u8>,
    #[serde(default)]
    echo: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptSpec {
    One(String),
    Many(Vec<String>),
}

impl CompletionRequest {
    pub(crate) fn read(body: &[u8]) -> Result<CompletionRequest, ApiError> {
        read_with(
            body,
            &with_sampling(COMPLETION_FIELDS),
            "a completion request",
        )
    }

    pub(crate) fn answer_request(&self) -> Result<AnswerRequest, ApiError> {
        if self.echo {
            return Err(ApiError::unsupported("echo", ""));
        }
        let prompt = match &self.prompt {
            PromptSpec::One(p) => p.clone(),
            PromptSpec::Many(v) if v.len() == 1 => v[0].clone(),
            PromptSpec::Many(_) => {
                return Err(ApiError::invalid("prompt: one prompt per request"));
            }
        };
        let mut conversation = Conversation::default();
        conversation.user(prompt);
        let mut r = AnswerRequest::new(self.model.clone(), conversation)?;
        r.raw = true;
        // OpenAI's default for a completion.
        r.max_tokens = self.max_tokens.unwrap_or(16);
        self.sampling.apply(&mut r)?;
        r.logprobs = match self.logprobs {
            Some(n) if n > 5 => return Err(ApiError::invalid("logprobs must be 0 to 5")),
            n => n,
        };
        r.check()?;
        Ok(r)
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct EmbeddingRequest {
    pub(crate) model: String,
    input: PromptSpec,
    encoding_format: Option<String>,
    dimensions: Option<usize>,
    #[allow(dead_code)]
    user: Option<String>,
}

impl Posted for EmbeddingRequest {
    const FIELDS: &'static [&'static str] =
        &["model", "input", "encoding_format", "dimensions", "user"];
    const WHAT: &'static str = "an embeddings request (input: a string or strings)";
}

impl EmbeddingRequest {
    /// The texts, once checked.
    pub(crate) fn checked(self) -> Result<EmbeddingRequest, ApiError> {
        let r = self;
        if r.encoding_format
            .as_deref()
            .is_some_and(|f| f != "float" && f != "base64")
        {
            return Err(ApiError::unsupported(
                "encoding_format",
                " other than float or base64",
            ));
        }
        Ok(r)
    }

    pub(crate) fn texts(&self) -> Vec<String> {
        match &self.input {
            PromptSpec::One(t) => vec![t.clone()],
            PromptSpec::Many(v) => v.clone(),
        }
    }

    /// The response, once the vectors are made (a `dimensions` other than the model's is
    /// refused: this server does not shorten vectors).
    pub(crate) fn response(
        &self,
        model: &str,
        e: &synesis_infer::Embeddings,
    ) -> Result<serde_json::Value, ApiError> {
        let width = e.vectors.first().map_or(0, Vec::len);
        if let Some(d) = self.dimensions
            && d != width
        {
            return Err(ApiError::unsupported(
                "dimensions",
                &format!(" other than the model's ({width})"),
            ));
        }
        let data: Vec<serde_json::Value> = e
            .vectors
            .iter()
            .enumerate()
            .map(|(i, v)| {
                // base64: the little-endian f32s, as OpenAI's own clients ask by default.
                let embedding = if self.encoding_format.as_deref() == Some("base64") {
                    use base64::Engine;
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    base64::engine::general_purpose::STANDARD
                        .encode(bytes)
                        .into()
                } else {
                    serde_json::json!(v)
                };
                serde_json::json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        Ok(serde_json::json!({
            "object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": e.prompt_tokens, "total_tokens": e.prompt_tokens},
        }))
    }
}

/// What every response about one answer repeats.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub(crate) id: String,
    pub(crate) created: i64,
    pub(crate) model: String,
    pub(crate) route: &'static str,
    pub(crate) request_id: RequestId,
}

impl Meta {
    fn synesis(&self, cost_micro_usd: Option<i64>) -> serde_json::Value {
        serde_json::json!({
            "route": self.route,
            "request_id": self.request_id,
            "cost_micro_usd": cost_micro_usd,
        })
    }

    fn chunk(&self, delta: serde_json::Value, finish_reason: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    }

    fn completion_chunk(&self, text: &str, finish_reason: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "object": "text_completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}],
        })
    }
}

fn usage(e: &Ending) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": e.prompt_tokens,
        "completion_tokens": e.completion_tokens,
        "total_tokens": e.prompt_tokens + e.completion_tokens,
    })
}

/// Chat logprobs: `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`.
fn chat_logprobs(tokens: &[TokenLogprob]) -> serde_json::Value {
    let one = |bytes: &[u8], logprob: f64| serde_json::json!({"token": token_text(bytes), "logprob": logprob, "bytes": bytes});
    let content: Vec<serde_json::Value> = tokens
        .iter()
        .map(|t| {
            let mut entry = one(&t.bytes, t.logprob);
            entry["top_logprobs"] = t.top.iter().map(|(b, l)| one(b, *l)).collect();
            entry
        })
        .collect();
    serde_json::json!({"content": content})
}

/// Legacy completion logprobs: `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`.
fn completion_logprobs(tokens: &[TokenLogprob]) -> serde_json::Value {
    let mut offset = 0;
    let mut offsets = Vec::with_capacity(tokens.len());
    for t in tokens {
        offsets.push(offset);
        offset += token_text(&t.bytes).len();
    }
    serde_json::json!({
        "tokens": tokens.iter().map(|t| token_text(&t.bytes)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| {
            t.top.iter().map(|(b, l)| (token_text(b), serde_json::json!(l))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn tool_calls_json(calls: &[(String, String, String)]) -> serde_json::Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, (id, name, arguments))| {
            serde_json::json!({
                "index": i, "id": id, "type": "function",
                "function": {"name": name, "arguments": arguments},
            })
        })
        .collect()
}

/// Which OpenAI object an answer is rendered as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Chat,
    Completion,
}

/// The whole answer, once made, with the cost in its header.
pub(crate) async fn collected(
    meta: Meta,
    shape: Shape,
    first: Piece,
    mut rx: Pieces,
) -> Result<Response, ApiError> {
    let (whole, ending) = Whole::gather(first, &mut rx).await?;
    let choice = match shape {
        Shape::Chat => {
            let mut message = serde_json::json!({"role": "assistant", "content": whole.text});
            if !whole.calls.is_empty() {
                message["tool_calls"] = tool_calls_json(&whole.calls);
                if whole.text.is_empty() {
                    message["content"] = serde_json::Value::Null;
                }
            }
            serde_json::json!({
                "index": 0, "message": message,
                "logprobs": whole.logprobs.as_deref().map(chat_logprobs),
                "finish_reason": ending.finish.openai(),
            })
        }
        Shape::Completion => serde_json::json!({
            "index": 0, "text": whole.text,
            "logprobs": whole.logprobs.as_deref().map(completion_logprobs),
            "finish_reason": ending.finish.openai(),
        }),
    };
    let object = match shape {
        Shape::Chat => "chat.completion",
        Shape::Completion => "text_completion",
    };
    let body = serde_json::json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": [choice],
        "usage": usage(&ending),
        "x_synesis": meta.synesis(Some(ending.cost_micro_usd)),
    });
    let mut response = Response::new(json_body(&body));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        "x-synesis-cost-micro-usd",
        HeaderValue::from(ending.cost_micro_usd),
    );
    Ok(response)
}

/// The answer as it is made: server-sent chunks, the usage last when asked for (with the
/// cost), then `data: [DONE]`. A failure after the first byte can only be told in the stream:
/// an `error` object, then the end.
pub(crate) fn streamed(
    meta: Meta,
    shape: Shape,
    first: Piece,
    rx: Pieces,
    include_usage: bool,
) -> Response {
    let state = (rx, Step::First(first), 0usize);
    let events = futures_util::stream::unfold(state, move |(mut rx, step, calls)| {
        let meta = meta.clone();
        async move {
            let mut out = String::new();
            let piece = match step {
                Step::Done => return None,
                Step::First(piece) => {
                    if shape == Shape::Chat {
                        out = sse(&meta.chunk(
                            serde_json::json!({"role": "assistant", "content": ""}),
                            None,
                        ));
                    }
                    Some(piece)
                }
                Step::Next => rx.recv().await,
            };
            let mut calls = calls;
            let (text, next) = event(&meta, shape, piece, include_usage, &mut calls);
            out.push_str(&text);
            Some((Ok::<_, Infallible>(out), (rx, next, calls)))
        }
    });
    sse_response(Body::from_stream(events))
}

/// A `text/event-stream` response of `body`.
pub(crate) fn sse_response(body: Body) -> Response {
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Where a stream of events is.
pub(crate) enum Step {
    First(Piece),
    Next,
    Done,
}

/// One piece as server-sent events, and what comes after; `calls` counts the tool calls sent.
fn event(
    meta: &Meta,
    shape: Shape,
    piece: Option<Piece>,
    include_usage: bool,
    calls: &mut usize,
) -> (String, Step) {
    let text = match piece {
        Some(Piece::Text(t)) => {
            let chunk = match shape {
                Shape::Chat => meta.chunk(serde_json::json!({"content": t}), None),
                Shape::Completion => meta.completion_chunk(&t, None),
            };
            return (sse(&chunk), Step::Next);
        }
        Some(Piece::ToolCall {
            id,
            name,
            arguments,
        }) => {
            let call = tool_calls_json(&[(id, name, arguments)]);
            let mut call = call[0].clone();
            call["index"] = (*calls).into();
            *calls += 1;
            let chunk = meta.chunk(serde_json::json!({"tool_calls": [call]}), None);
            return (sse(&chunk), Step::Next);
        }
        Some(Piece::Logprobs(tokens)) => {
            let chunk = match shape {
                Shape::Chat => {
                    let mut chunk = meta.chunk(serde_json::json!({}), None);
                    chunk["choices"][0]["logprobs"] = chat_logprobs(&tokens);
                    chunk
                }
                Shape::Completion => {
                    let mut chunk = meta.completion_chunk("", None);
                    chunk["choices"][0]["logprobs"] = completion_logprobs(&tokens);
                    chunk
                }
            };
            return (sse(&chunk), Step::Next);
        }
        Some(Piece::Routed { .. }) => return (String::new(), Step::Next),
        Some(Piece::End(e)) => {
            let finish = Some(e.finish.openai());
            let last = match shape {
                Shape::Chat => meta.chunk(serde_json::json!({}), finish),
                Shape::Completion => meta.completion_chunk("", finish),
            };
            let mut text = sse(&last);
            if include_usage {
                let mut usage_chunk = last;
                usage_chunk["choices"] = serde_json::json!([]);
                usage_chunk["usage"] = usage(&e);
                usage_chunk["x_synesis"] = meta.synesis(Some(e.cost_micro_usd));
                text.push_str(&sse(&usage_chunk));
            }
            text.push_str("data: [DONE]\n\n");
            text
        }
        Some(Piece::Failed(e)) => sse(&e.openai_json()),
        None => sse(&ApiError::internal("the answer ended without its end").openai_json()),
    };
    (text, Step::Done)
}

fn sse(value: &serde_json::Value) -> String {
    format!("data: {value}\n\n")
}

/// One entry of `/v1/models`.
pub(crate) fn model_entry(id: &str, owned_by: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": owned_by})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Result<AnswerRequest, ApiError> {
        ChatRequest::read(json.as_bytes())?.answer_request()
    }

    #[test]
    fn a_conversation_becomes_earlier_turns_and_the_last_one() {
        let r = request(
            r#"{"model":"auto","messages":[
                {"role":"developer","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}]},
                {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}}]},
                {"role":"tool","tool_call_id":"c1","content":"42"}],
              "max_completion_tokens":9,"stop":"\n","stream":true,
              "stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, "<tool_response>42</tool_response>");
        assert_eq!(r.context.len(), 3);
        assert_eq!(r.context[1].content, "hi there");
        assert!(
            r.context[2].content.contains(r#""name":"f""#),
            "{}",
            r.context[2].content
        );
        assert_eq!((r.max_tokens, r.stop.clone()), (9, vec!["\n".to_owned()]));
    }

    #[test]
    fn tools_formats_and_logprobs_are_read() {
        let r = request(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],
              "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],
              "tool_choice":{"type":"function","function":{"name":"f"}},
              "logprobs":true,"top_logprobs":2,"presence_penalty":0.5}"#,
        )
        .unwrap();
        assert_eq!(r.tool_choice, Some(ToolChoice::Named("f".into())));
        assert_eq!(r.logprobs, Some(2));
        // All of it travels to the cloud too (protocol version 2).
        assert_eq!(r.device_only(), None);
        let raw = CompletionRequest::read(br#"{"model":"m","prompt":"x"}"#)
            .unwrap()
            .answer_request()
            .unwrap();
        assert!(
            raw.device_only()
                .is_some_and(|what| what.contains("raw prompt"))
        );
        let r = request(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],
              "response_format":{"type":"json_schema","json_schema":{"name":"s","schema":{"type":"object"}}}}"#,
        )
        .unwrap();
        assert_eq!(
            r.format,
            Format::Schema(serde_json::json!({"type": "object"}))
        );
    }

    #[test]
    fn what_cannot_be_answered_is_refused_with_a_reason() {
        for (json, says) in [
            (r#"{"model":"m","messages":[]}"#, "must not be empty"),
            (
                r#"{"model":"m","messages":[{"role":"assistant","content":"x"}]}"#,
                "the user's",
            ),
            (
                r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#,
                "not supported",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "text only",
            ),
            (
                r#"{"model":"m","n":2,"messages":[{"role":"user","content":"x"}]}"#,
                "n = 1",
            ),
            (
                r#"{"model":"m","temperature":3,"messages":[{"role":"user","content":"x"}]}"#,
                "between 0 and 2",
            ),
            (
                r#"{"model":"m","logit_bias":{"1":2},"messages":[{"role":"user","content":"x"}]}"#,
                "`logit_bias` is not supported",
            ),
            (
                r#"{"model":"m","tool_choice":"required","tools":[{"type":"function","function":{"name":"f"}}],"response_format":{"type":"json_object"},"messages":[{"role":"user","content":"x"}]}"#,
                "cannot be asked for together",
            ),
            (
                r#"{"model":"m","tool_choice":{"type":"function","function":{"name":"g"}},"tools":[{"type":"function","function":{"name":"f"}}],"messages":[{"role":"user","content":"x"}]}"#,
                "not among the tools",
            ),
            (
                r#"{"model":"m","top_logprobs":3,"messages":[{"role":"user","content":"x"}]}"#,
                "needs logprobs",
            ),
        ] {
            let e = request(json).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            assert!(e.message.contains(says), "{json}: {}", e.message);
        }
    }
}
