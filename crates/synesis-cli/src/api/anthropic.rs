//! Anthropic's Messages API (`POST /v1/messages`): text and `tool_use` content blocks, whole or
//! as Anthropic's server-sent events (`message_start`, `content_block_start`,
//! `content_block_delta`, `content_block_stop`, `message_delta`, `message_stop`), and its error
//! shape. Programs written for Claude can point at the device. A request is answered down the
//! same path as every API's ([`super::start`]).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use synesis_infer::tools::{Tool, ToolChoice};

use super::metrics::Pieces;
use super::openai::{Posted, sse_response};
use super::pieces::{ApiError, Ending, Finish, Piece, Whole};
use super::{Api, checked_body, json_response, start};
use crate::request::{AnswerRequest, Conversation};

/// Anthropic's error shape: `{"type": "error", "error": {"type", "message"}}`.
fn error_json(e: &ApiError) -> serde_json::Value {
    let kind = match e.status {
        StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE => "invalid_request_error",
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
        _ => "api_error",
    };
    serde_json::json!({"type": "error", "error": {"type": kind, "message": e.message}})
}

#[derive(Debug, Deserialize)]
struct MessagesBody {
    model: String,
    max_tokens: u32,
    messages: Vec<InMessage>,
    #[serde(default)]
    system: Option<Content>,
    #[serde(default)]
    stop_sequences: Vec<String>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    tools: Vec<ToolSpec>,
    tool_choice: Option<ToolChoiceSpec>,
    /// Accepted and not used (`user_id`, for Anthropic's abuse monitoring).
    #[allow(dead_code)]
    metadata: Option<serde_json::Value>,
}

impl Posted for MessagesBody {
    const FIELDS: &'static [&'static str] = &[
        "model",
        "max_tokens",
        "messages",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "stream",
        "tools",
        "tool_choice",
        "metadata",
    ];
    const WHAT: &'static str = "a messages request";
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    content: Content,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<serde_json::Value>),
}

#[derive(Debug, Deserialize)]
struct ToolSpec {
    name: String,
    #[serde(default)]
    description: String,
    input_schema: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ToolChoiceSpec {
    Auto {},
    Any {},
    Tool { name: String },
    None {},
}

/// A block's text (`text` blocks; a tool result's content, a string or text blocks).
fn text_of(block: &serde_json::Value) -> Option<String> {
    match block {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                .collect(),
        ),
        serde_json::Value::Null => Some(String::new()),
        _ => None,
    }
}

impl MessagesBody {
    fn answer_request(&self) -> Result<AnswerRequest, ApiError> {
        let mut conversation = Conversation::default();
        if let Some(system) = &self.system {
            conversation.system(match system {
                Content::Text(t) => t.clone(),
                Content::Blocks(blocks) => {
                    text_of(&serde_json::Value::Array(blocks.clone())).unwrap_or_default()
                }
            });
        }
        for (i, m) in self.messages.iter().enumerate() {
            let blocks = match &m.content {
                Content::Text(t) => vec![serde_json::json!({"type": "text", "text": t})],
                Content::Blocks(b) => b.clone(),
            };
            let mut text = String::new();
            let mut calls = Vec::new();
            for (j, block) in blocks.iter().enumerate() {
                let kind = block.get("type").and_then(|t| t.as_str()).unwrap_or("");
                match kind {
                    "text" => {
                        text.push_str(block.get("text").and_then(|t| t.as_str()).unwrap_or(""))
                    }
                    "tool_use" => calls.push((
                        block
                            .get("name")
                            .and_then(|n| n.as_str())
                            .unwrap_or("")
                            .to_owned(),
                        block.get("input").cloned().unwrap_or_default().to_string(),
                    )),
                    "tool_result" => {
                        let content = block.get("content").cloned().unwrap_or_default();
                        let result = text_of(&content).ok_or_else(|| {
                            ApiError::invalid(format!(
                                "messages[{i}].content[{j}]: a tool result is text"
                            ))
                        })?;
                        conversation.tool_result(&result);
                    }
                    other => {
                        return Err(ApiError::unsupported(
                            &format!("messages[{i}].content[{j}] of type {other:?}"),
                            " (text, tool_use and tool_result only)",
                        ));
                    }
                }
            }
            match m.role.as_str() {
                "user" if !text.is_empty() => conversation.user(text),
                "user" => {}
                "assistant" => conversation.assistant(text, &calls),
                other => {
                    return Err(ApiError::invalid(format!(
                        "messages[{i}]: the role {other:?} is not user or assistant"
                    )));
                }
            }
        }
        let mut r = AnswerRequest::new(self.model.clone(), conversation)?;
        r.max_tokens = self.max_tokens;
        if let Some(t) = self.temperature {
            if !(0.0..=1.0).contains(&t) {
                return Err(ApiError::invalid("temperature must be between 0 and 1"));
            }
            r.temperature = t;
        }
        r.top_p = self.top_p;
        r.top_k = self.top_k;
        r.stop = self.stop_sequences.clone();
        r.tools = self
            .tools
            .iter()
            .map(|t| Tool {
                name: t.name.clone(),
                description: t.description.clone(),
                parameters: t.input_schema.clone(),
            })
            .collect();
        r.tool_choice = match &self.tool_choice {
            _ if r.tools.is_empty() => None,
            None | Some(ToolChoiceSpec::Auto {}) => Some(ToolChoice::Auto),
            Some(ToolChoiceSpec::Any {}) => Some(ToolChoice::Required),
            Some(ToolChoiceSpec::Tool { name }) => Some(ToolChoice::Named(name.clone())),
            Some(ToolChoiceSpec::None {}) => None,
        };
        r.check()?;
        Ok(r)
    }
}

fn stop_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Stop => "end_turn",
        Finish::Length => "max_tokens",
        Finish::ToolCalls => "tool_use",
    }
}

fn usage(e: &Ending) -> serde_json::Value {
    serde_json::json!({"input_tokens": e.prompt_tokens, "output_tokens": e.completion_tokens})
}

fn tool_use(id: &str, name: &str, arguments: &str) -> serde_json::Value {
    let input: serde_json::Value = serde_json::from_str(arguments).unwrap_or_default();
    serde_json::json!({"type": "tool_use", "id": id, "name": name, "input": input})
}

pub(crate) async fn messages(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body = checked_body(&api, &headers, body)?;
        let m = MessagesBody::read(&body)?;
        let started = start(&api, &headers, m.answer_request()?).await?;
        let (info, first, mut rx) = started.parts();
        let id = format!("msg_{}", info.request_id);
        let response = if m.stream {
            streamed(id, info.model.clone(), first, rx)
        } else {
            let (whole, ending) = Whole::gather(first, &mut rx).await?;
            let mut content = Vec::new();
            if !whole.text.is_empty() || whole.calls.is_empty() {
                content.push(serde_json::json!({"type": "text", "text": whole.text}));
            }
            for (id, name, arguments) in &whole.calls {
                content.push(tool_use(id, name, arguments));
            }
            json_response(&serde_json::json!({
                "id": id, "type": "message", "role": "assistant", "model": info.model,
                "content": content,
                "stop_reason": stop_reason(ending.finish), "stop_sequence": null,
                "usage": usage(&ending),
            }))
        };
        Ok(info.label(response))
    }
    .await;
    result.unwrap_or_else(|e: ApiError| e.response_with(&error_json(&e)))
}

/// Where a stream of Anthropic's events is.
struct Stream {
    rx: Pieces,
    next: Option<Piece>,
    /// The index of the content block being written, or to be written next.
    block: usize,
    text_open: bool,
    started: bool,
    done: bool,
}

fn event(name: &str, data: &serde_json::Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

fn streamed(id: String, model: String, first: Piece, rx: Pieces) -> Response {
    let state = Stream {
        rx,
        next: Some(first),
        block: 0,
        text_open: false,
        started: false,
        done: false,
    };
    let events =
        futures_util::stream::unfold(state, move |mut s| {
            let (id, model) = (id.clone(), model.clone());
            async move {
                if s.done {
                    return None;
                }
                let mut out = String::new();
                if !s.started {
                    s.started = true;
                    out.push_str(&event(
                        "message_start",
                        &serde_json::json!({"type": "message_start", "message": {
                            "id": id, "type": "message", "role": "assistant", "model": model,
                            "content": [], "stop_reason": null, "stop_sequence": null,
                            "usage": {"input_tokens": 0, "output_tokens": 0},
                        }}),
                    ));
                }
                let piece = match s.next.take() {
                    Some(p) => Some(p),
                    None => s.rx.recv().await,
                };
                let close_text = |s: &mut Stream, out: &mut String| {
                    if s.text_open {
                        s.text_open = false;
                        out.push_str(&event(
                            "content_block_stop",
                            &serde_json::json!({"type": "content_block_stop", "index": s.block}),
                        ));
                        s.block += 1;
                    }
                };
                match piece {
                    Some(Piece::Text(t)) => {
                        if !s.text_open {
                            s.text_open = true;
                            out.push_str(&event(
                                "content_block_start",
                                &serde_json::json!({
                                    "type": "content_block_start", "index": s.block,
                                    "content_block": {"type": "text", "text": ""},
                                }),
                            ));
                        }
                        out.push_str(&event(
                            "content_block_delta",
                            &serde_json::json!({
                                "type": "content_block_delta", "index": s.block,
                                "delta": {"type": "text_delta", "text": t},
                            }),
                        ));
                    }
                    Some(Piece::ToolCall {
                        id,
                        name,
                        arguments,
                    }) => {
                        close_text(&mut s, &mut out);
                        let mut block = tool_use(&id, &name, "{}");
                        block["input"] = serde_json::json!({});
                        out.push_str(&event("content_block_start", &serde_json::json!({
                        "type": "content_block_start", "index": s.block, "content_block": block,
                    })));
                        out.push_str(&event(
                            "content_block_delta",
                            &serde_json::json!({
                                "type": "content_block_delta", "index": s.block,
                                "delta": {"type": "input_json_delta", "partial_json": arguments},
                            }),
                        ));
                        out.push_str(&event(
                            "content_block_stop",
                            &serde_json::json!({"type": "content_block_stop", "index": s.block}),
                        ));
                        s.block += 1;
                    }
                    Some(Piece::Routed { .. } | Piece::Logprobs(_)) => {}
                    Some(Piece::End(e)) => {
                        close_text(&mut s, &mut out);
                        out.push_str(&event("message_delta", &serde_json::json!({
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason(e.finish), "stop_sequence": null},
                        "usage": usage(&e),
                    })));
                        out.push_str(&event(
                            "message_stop",
                            &serde_json::json!({"type": "message_stop"}),
                        ));
                        s.done = true;
                    }
                    Some(Piece::Failed(e)) => {
                        out.push_str(&event("error", &error_json(&e)));
                        s.done = true;
                    }
                    None => {
                        let e = ApiError::internal("the answer ended without its end");
                        out.push_str(&event("error", &error_json(&e)));
                        s.done = true;
                    }
                }
                Some((Ok::<_, Infallible>(out), s))
            }
        });
    sse_response(Body::from_stream(events))
}
