//! What every API of the service shares: the pieces an answer is handed over in (whatever API
//! asked for it, each renders them in its own shape), and the error every API renders in its
//! own shape (OpenAI's where a refusal comes before any API is known: a key, a host, a size).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use synesis_infer::TokenLogprob;

use super::json_body;

/// A refusal or failure: its HTTP status, a kind and a stable code (OpenAI's words), and what
/// to tell the person.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    code: &'static str,
    pub(crate) message: String,
    /// The request's field it is about, when one is.
    param: Option<String>,
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
            param: None,
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

    /// A field this server does not act on: refused by name, never silently ignored.
    pub(crate) fn unsupported(field: &str, why: &str) -> ApiError {
        ApiError {
            param: Some(field.to_owned()),
            ..ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "unsupported_parameter",
                format!("`{field}` is not supported by this server{why}"),
            )
        }
    }

    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }

    /// OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
    pub(crate) fn openai_json(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }})
    }

    /// This error with `body` in place of OpenAI's shape.
    pub(crate) fn response_with(&self, body: &serde_json::Value) -> Response {
        let mut response = Response::new(json_body(body));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.response_with(&self.openai_json())
    }
}

/// What the producer of an answer hands over, in order: where it went, text and tool calls,
/// the tokens' log-probabilities when asked for, then an end or a failure.
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
    /// A call of one of the request's tools; `arguments` is a JSON object as text.
    ToolCall {
        id: String,
        name: String,
        arguments: String,
    },
    /// The answer's tokens, each with its log-probability (just before the end).
    Logprobs(Vec<TokenLogprob>),
    End(Ending),
    Failed(ApiError),
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    Stop,
    Length,
    ToolCalls,
}

impl Finish {
    /// OpenAI's word for it (`finish_reason`), also the outcome `/metrics` counts.
    pub(crate) fn openai(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::ToolCalls => "tool_calls",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Ending {
    pub(crate) finish: Finish,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) cost_micro_usd: i64,
}

/// An answer gathered whole, for an API's non-streamed response.
#[derive(Debug, Default)]
pub(crate) struct Whole {
    pub(crate) text: String,
    /// `(id, name, arguments)`.
    pub(crate) calls: Vec<(String, String, String)>,
    pub(crate) logprobs: Option<Vec<TokenLogprob>>,
}

impl Whole {
    /// Gathers `first` and what follows it up to the end.
    pub(crate) async fn gather(
        first: Piece,
        rx: &mut super::metrics::Pieces,
    ) -> Result<(Whole, Ending), ApiError> {
        let mut whole = Whole::default();
        let mut next = Some(first);
        loop {
            let piece = match next.take() {
                Some(p) => Some(p),
                None => rx.recv().await,
            };
            match piece {
                Some(Piece::Text(t)) => whole.text.push_str(&t),
                Some(Piece::ToolCall {
                    id,
                    name,
                    arguments,
                }) => whole.calls.push((id, name, arguments)),
                Some(Piece::Logprobs(l)) => whole.logprobs = Some(l),
                Some(Piece::End(e)) => return Ok((whole, e)),
                Some(Piece::Failed(e)) => return Err(e),
                Some(Piece::Routed { .. }) => {}
                None => return Err(ApiError::internal("the answer ended without its end")),
            }
        }
    }
}

/// A token's text for an API: its bytes as UTF-8, a lone part of a character replaced.
pub(crate) fn token_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
