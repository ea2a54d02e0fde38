//! OpenAI's chat completion shapes, as far as this server speaks them: the request, the answer
//! (whole, or as `chat.completion.chunk` server-sent events ending with `data: [DONE]`), the
//! error object, the model list.

use std::convert::Infallible;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use synesis_proto::RequestId;
use synesis_proto::message::{ChatRole, ChatTurn};

use super::json_body;
use super::metrics::Pieces;

/// When the request names none (OpenAI's own default is 1; this is gentler on small models).
pub(crate) const DEFAULT_TEMPERATURE: f32 = 0.8;
/// When the request names no `max_tokens`.
pub(crate) const DEFAULT_MAX_TOKENS: u32 = 512;
/// The most `max_tokens` may ask for.
pub(crate) const MAX_TOKENS_MAX: u32 = 16_384;
/// Pieces of an answer waiting for their client: a local generation waits when they are
/// this many; a cloud answer (a piece per token at most) fills them only for a client that
/// reads nothing, and is then cancelled.
pub(crate) const PIECES_MAX: usize = MAX_TOKENS_MAX as usize + 4;

/// The fields of a chat completion request this server reads; others are ignored, as OpenAI's
/// own server ignores what it does not know of a newer client.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub(crate) model: String,
    pub(crate) messages: Vec<InMessage>,
    #[serde(default)]
    pub(crate) stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    pub(crate) temperature: Option<f32>,
    pub(crate) top_p: Option<f32>,
    pub(crate) seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    n: Option<u32>,
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

#[derive(Debug, Deserialize)]
pub(crate) struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
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

impl ChatRequest {
    pub(crate) fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    pub(crate) fn max_tokens(&self) -> u32 {
        self.max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS)
            .clamp(1, MAX_TOKENS_MAX)
    }

    pub(crate) fn stop_list(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    /// The conversation before the last turn, and the last turn (the user's).
    pub(crate) fn turns(&self) -> Result<(Vec<ChatTurn>, String), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("only n = 1 is supported"));
        }
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(ApiError::invalid("temperature must be between 0 and 2"));
        }
        let mut turns = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => ChatRole::System,
                "user" => ChatRole::User,
                "assistant" => ChatRole::Assistant,
                other => {
                    return Err(ApiError::invalid(format!(
                        "messages[{i}]: the role {other:?} is not supported (system, developer, user, assistant)"
                    )));
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
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
                    text
                }
            };
            turns.push(ChatTurn { role, content });
        }
        match turns.pop() {
            Some(ChatTurn {
                role: ChatRole::User,
                content,
            }) => Ok((turns, content)),
            Some(_) => Err(ApiError::invalid("the last message must be the user's")),
            None => Err(ApiError::invalid("messages must not be empty")),
        }
    }
}

/// An error, as OpenAI's API shapes it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// Its stable code (`rate_limit_exceeded`, …).
    pub(crate) fn code(&self) -> &'static str {
        self.code
    }

    pub(crate) fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        )
    }

    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message, "type": self.kind, "param": null, "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = Response::new(json_body(&self.json()));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// What the producer of an answer hands over, in order: text, then an end or a failure.
#[derive(Debug)]
pub(crate) enum Piece {
    /// Where the request went (always first, unless it failed before).
    Routed {
        route: &'static str,
        model: String,
        /// The policy's reason (its stable code).
        reason: String,
        /// Why the cloud, chosen first, did not answer, when this device answers instead.
        fallback: Option<String>,
    },
    Text(String),
    End(Ending),
    Failed(ApiError),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Ending {
    pub(crate) finish_reason: &'static str,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) cost_micro_usd: i64,
}

impl Ending {
    fn usage(&self) -> serde_json::Value {
        serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
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
}

/// The whole answer, once made: `chat.completion`, with the cost in its header.
pub(crate) async fn collected(
    meta: Meta,
    first: Piece,
    mut rx: Pieces,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut next = Some(first);
    let ending = loop {
        let piece = match next.take() {
            Some(p) => Some(p),
            None => rx.recv().await,
        };
        match piece {
            Some(Piece::Text(t)) => text.push_str(&t),
            Some(Piece::End(e)) => break e,
            Some(Piece::Failed(e)) => return Err(e),
            Some(Piece::Routed { .. }) => {}
            None => return Err(ApiError::internal("the answer ended without its end")),
        }
    };
    let body = serde_json::json!({
        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": ending.finish_reason,
        }],
        "usage": ending.usage(),
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

/// The answer as it is made: server-sent `chat.completion.chunk`s, the usage last when asked
/// for (with the cost), then `data: [DONE]`. A failure after the first byte can only be told in
/// the stream: an `error` object, then the end.
pub(crate) fn streamed(meta: Meta, first: Piece, rx: Pieces, include_usage: bool) -> Response {
    let state = (rx, Step::First(first));
    let events = futures_util::stream::unfold(state, move |(mut rx, step)| {
        let meta = meta.clone();
        async move {
            let piece = match step {
                Step::Done => return None,
                Step::First(piece) => {
                    let mut role = sse(&meta.chunk(
                        serde_json::json!({"role": "assistant", "content": ""}),
                        None,
                    ));
                    // The first piece in the same write: a text, or already the end.
                    let (text, next) = event(&meta, Some(piece), include_usage);
                    role.push_str(&text);
                    return Some((Ok::<_, Infallible>(role), (rx, next)));
                }
                Step::Next => rx.recv().await,
            };
            let (text, next) = event(&meta, piece, include_usage);
            Some((Ok(text), (rx, next)))
        }
    });
    let mut response = Response::new(Body::from_stream(events));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Where a stream of server-sent events is.
enum Step {
    First(Piece),
    Next,
    Done,
}

/// One piece as server-sent events, and what comes after.
fn event(meta: &Meta, piece: Option<Piece>, include_usage: bool) -> (String, Step) {
    let text = match piece {
        Some(Piece::Text(t)) => {
            let chunk = meta.chunk(serde_json::json!({"content": t}), None);
            return (sse(&chunk), Step::Next);
        }
        Some(Piece::Routed { .. }) => return (String::new(), Step::Next),
        Some(Piece::End(e)) => {
            let mut text = sse(&meta.chunk(serde_json::json!({}), Some(e.finish_reason)));
            if include_usage {
                let mut usage = meta.chunk(serde_json::json!({}), None);
                usage["choices"] = serde_json::json!([]);
                usage["usage"] = e.usage();
                usage["x_synesis"] = meta.synesis(Some(e.cost_micro_usd));
                text.push_str(&sse(&usage));
            }
            text.push_str("data: [DONE]\n\n");
            text
        }
        Some(Piece::Failed(e)) => sse(&e.json()),
        None => sse(&ApiError::internal("the answer ended without its end").json()),
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

    fn parse(json: &str) -> ChatRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_conversation_becomes_earlier_turns_and_the_users_last_one() {
        let r = parse(
            r#"{"model":"auto","messages":[
                {"role":"developer","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}]},
                {"role":"assistant","content":"hello"},
                {"role":"user","content":"again"}],
              "max_completion_tokens":9,"stop":"\n","stream":true,
              "stream_options":{"include_usage":true},"unknown_field":1}"#,
        );
        let (context, prompt) = r.turns().unwrap();
        assert_eq!(prompt, "again");
        assert_eq!(context.len(), 3);
        assert_eq!(context[0].role, ChatRole::System);
        assert_eq!(context[1].content, "hi there");
        assert_eq!((r.max_tokens(), r.stop_list()), (9, vec!["\n".to_owned()]));
        assert!(r.include_usage());
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
                r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#,
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
        ] {
            let e = parse(json).turns().unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(says), "{json}: {}", e.message);
        }
    }
}
