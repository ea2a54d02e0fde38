//! Anthropic's Messages API: `POST {base_url}/v1/messages` with `stream: true`, read as named
//! server-sent events.
//!
//! This module owns the request body (system turns joined into `system`) and the meaning of
//! the events (`MessageEvents`, IO-free): `message_start` (the input count),
//! `content_block_delta` with a `text_delta` (text), `message_delta` (the stop reason and the
//! output count, cumulative), `message_stop` (the end), `ping` (nothing), `error` (a failure
//! after the stream started: `overloaded_error`, `api_error`... ). Event types it does not
//! know are ignored: the API says new ones may appear. The HTTP side (timeouts, statuses,
//! stopping) is [`super::http`]'s.

use serde::{Deserialize, Serialize};
use synesis_proto::message::{AnswerFormat, ChatRole, FinishReason, ToolChoice};

use super::http::{Decoder, HttpSettings, SetupError, Upstream, key_header, one_line};
use super::{Ask, Event, Generation, Provider, ProviderError, ProviderUsage, ask_bound};

/// The API version sent with every request.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Anthropic's Messages API.
#[derive(Debug)]
pub struct Anthropic {
    upstream: Upstream,
}

impl Anthropic {
    /// A provider for the API at `settings.base_url` (the origin, such as
    /// `https://api.anthropic.com`). Builds its one HTTP client.
    pub fn new(settings: HttpSettings) -> Result<Anthropic, SetupError> {
        Ok(Anthropic {
            upstream: Upstream::new(settings, "/v1/messages")?,
        })
    }

    fn request(&self, ask: &Ask) -> Result<reqwest::RequestBuilder, ProviderError> {
        // What the Messages API has no word for is refused, never dropped.
        let shape = &ask.shape;
        if shape.format != AnswerFormat::Text {
            return Err(ProviderError::Refused(
                "this model's provider (Anthropic's Messages API) has no JSON mode or schema"
                    .into(),
            ));
        }
        if shape.logprobs.is_some() {
            return Err(ProviderError::Refused(
                "this model's provider (Anthropic's Messages API) gives no logprobs".into(),
            ));
        }
        if shape.presence_penalty != 0.0 || shape.frequency_penalty != 0.0 {
            return Err(ProviderError::Refused(
                "this model's provider (Anthropic's Messages API) has no presence or frequency penalty"
                    .into(),
            ));
        }
        let mut request = self
            .upstream
            .post()
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&MessagesRequest::new(ask));
        if let Some(key) = self.upstream.key_for(ask.key.as_ref()) {
            request = request.header("x-api-key", key_header("", key)?);
        }
        Ok(request)
    }
}

impl Provider for Anthropic {
    fn input_tokens_bound(&self, ask: &Ask) -> Result<u64, ProviderError> {
        Ok(ask_bound(ask, 8))
    }

    fn start(&self, ask: Ask) -> Generation {
        let request = self.request(&ask);
        self.upstream
            .start(request, ask.key, MessageEvents::default())
    }

    fn takes_user_keys(&self) -> bool {
        true
    }
}

/// The request body.
#[derive(Debug, Serialize)]
struct MessagesRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    stream: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<i32>,
}

#[derive(Debug, Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

impl<'a> MessagesRequest<'a> {
    fn new(ask: &'a Ask) -> MessagesRequest<'a> {
        let system: Vec<&str> = ask
            .turns
            .iter()
            .filter(|t| t.role == ChatRole::System)
            .map(|t| t.content.as_str())
            .collect();
        MessagesRequest {
            model: &ask.model,
            max_tokens: ask.max_tokens,
            messages: ask
                .turns
                .iter()
                .filter_map(|turn| {
                    let role = match turn.role {
                        ChatRole::System => return None,
                        ChatRole::User => "user",
                        ChatRole::Assistant => "assistant",
                    };
                    Some(Message {
                        role,
                        content: &turn.content,
                    })
                })
                .collect(),
            system: (!system.is_empty()).then(|| system.join("\n\n")),
            temperature: ask.temperature,
            top_p: ask.top_p,
            stop_sequences: &ask.stop,
            stream: true,
            tools: ask
                .shape
                .tools
                .iter()
                .map(|t| {
                    let schema = serde_json::from_str(&t.parameters)
                        .unwrap_or_else(|_| serde_json::json!({"type": "object"}));
                    serde_json::json!({
                        "name": t.name, "description": t.description, "input_schema": schema,
                    })
                })
                .collect(),
            tool_choice: (!ask.shape.tools.is_empty()).then(|| match &ask.shape.tool_choice {
                ToolChoice::None => serde_json::json!({"type": "none"}),
                ToolChoice::Auto => serde_json::json!({"type": "auto"}),
                ToolChoice::Required => serde_json::json!({"type": "any"}),
                ToolChoice::Named(name) => serde_json::json!({"type": "tool", "name": name}),
            }),
            top_k: ask.shape.top_k,
        }
    }
}

#[derive(Debug, Deserialize)]
struct MessageStart {
    message: StartedMessage,
}

#[derive(Debug, Deserialize)]
struct StartedMessage {
    usage: Option<Usage>,
}

/// Counts as sent; in `message_delta` they are cumulative, and any may be missing.
#[derive(Debug, Deserialize)]
struct Usage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl Usage {
    /// All input the upstream read: uncached, written to its cache, read from its cache.
    fn input(&self) -> Option<u64> {
        let base = self.input_tokens?;
        Some(
            base.saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
                .saturating_add(self.cache_read_input_tokens.unwrap_or(0)),
        )
    }
}

#[derive(Debug, Deserialize)]
struct BlockStart {
    index: Option<u32>,
    content_block: Block,
}

#[derive(Debug, Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    /// A `tool_use` block's tool.
    name: Option<String>,
    /// An `input_json_delta`'s piece of the tool's input.
    partial_json: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BlockDelta {
    index: Option<u32>,
    delta: Block,
}

#[derive(Debug, Deserialize)]
struct BlockStop {
    index: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct MessageDelta {
    delta: StopDelta,
    usage: Option<Usage>,
}

#[derive(Debug, Deserialize)]
struct StopDelta {
    stop_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorEvent {
    error: ErrorBody,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(rename = "type")]
    kind: String,
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Typed {
    #[serde(rename = "type")]
    kind: String,
}

/// The meaning of a Messages stream, fed one SSE event at a time.
#[derive(Debug, Default)]
pub(crate) struct MessageEvents {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    finish: Option<FinishReason>,
    /// The `tool_use` block being streamed: its index, tool and input so far. Handed on whole,
    /// as text in the one format every model's calls travel in
    /// ([`synesis_infer::tools::render_call`]), when the block stops.
    call: Option<(u32, String, String)>,
}

/// The most one tool call's input may hold.
const CALL_MAX_BYTES: usize = 1 << 20;

/// `"max_tokens"` (and a full context window) is the token limit; `"end_turn"`,
/// `"stop_sequence"` and every other reason (`"refusal"`, and `"tool_use"`, which these asks do
/// not invite) is the model's own end.
fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

/// An `error` event: the overloaded and internal errors (and rate limits, timeouts) may work
/// later; request errors will not; anything else is a failure.
fn stream_error(error: ErrorBody) -> ProviderError {
    let why = match &error.message {
        Some(message) => format!("{}: {}", error.kind, one_line(message)),
        None => error.kind.clone(),
    };
    match error.kind.as_str() {
        "overloaded_error" | "api_error" | "rate_limit_error" | "timeout_error" => {
            ProviderError::Unavailable {
                why,
                retry_after_ms: None,
            }
        }
        "invalid_request_error"
        | "authentication_error"
        | "permission_error"
        | "not_found_error"
        | "request_too_large"
        | "billing_error" => ProviderError::Refused(why),
        _ => ProviderError::Failed(why),
    }
}

fn parse<'a, T: Deserialize<'a>>(event: &str, data: &'a str) -> Result<T, ProviderError> {
    serde_json::from_str(data)
        .map_err(|e| ProviderError::Failed(format!("a malformed {event} event ({e})")))
}

impl Decoder for MessageEvents {
    fn on_event(&mut self, event: &str, data: &str) -> Result<Vec<Event>, ProviderError> {
        // The event's name, or the `type` in its data when a relay dropped the names.
        let typed;
        let kind = if event == "message" {
            typed = parse::<Typed>(event, data)?;
            typed.kind.as_str()
        } else {
            event
        };
        match kind {
            "message_start" => {
                let start: MessageStart = parse(kind, data)?;
                if let Some(usage) = start.message.usage {
                    self.input_tokens = usage.input().or(self.input_tokens);
                    self.output_tokens = usage.output_tokens.or(self.output_tokens);
                }
                Ok(Vec::new())
            }
            "content_block_start" => {
                let start: BlockStart = parse(kind, data)?;
                if start.content_block.kind == "tool_use" {
                    let name = start.content_block.name.clone().unwrap_or_default();
                    self.call = Some((start.index.unwrap_or(0), name, String::new()));
                }
                Ok(text_of(start.content_block))
            }
            "content_block_delta" => {
                let delta: BlockDelta = parse(kind, data)?;
                if let (Some((index, _, input)), Some(piece)) =
                    (&mut self.call, &delta.delta.partial_json)
                    && delta.index.unwrap_or(0) == *index
                {
                    input.push_str(piece);
                    if input.len() > CALL_MAX_BYTES {
                        return Err(ProviderError::Failed(format!(
                            "the upstream's tool call passed {CALL_MAX_BYTES} bytes"
                        )));
                    }
                }
                Ok(text_of(delta.delta))
            }
            "content_block_stop" => {
                let stop: BlockStop = parse(kind, data)?;
                match self.call.take() {
                    Some((index, name, input)) if stop.index.unwrap_or(0) == index => {
                        let input = if input.trim().is_empty() {
                            "{}".to_owned()
                        } else {
                            input
                        };
                        Ok(vec![Event::Text(synesis_infer::tools::render_call(
                            &name, &input,
                        ))])
                    }
                    other => {
                        self.call = other;
                        Ok(Vec::new())
                    }
                }
            }
            "message_delta" => {
                let delta: MessageDelta = parse(kind, data)?;
                if let Some(reason) = delta.delta.stop_reason {
                    self.finish = Some(finish_reason(&reason));
                }
                if let Some(usage) = delta.usage {
                    self.input_tokens = usage.input().or(self.input_tokens);
                    self.output_tokens = usage.output_tokens.or(self.output_tokens);
                }
                Ok(Vec::new())
            }
            "message_stop" => {
                let usage = match (self.input_tokens, self.output_tokens) {
                    (Some(input_tokens), Some(output_tokens)) => Some(ProviderUsage {
                        input_tokens,
                        output_tokens,
                    }),
                    _ => None,
                };
                Ok(vec![Event::Done {
                    finish_reason: self.finish.unwrap_or(FinishReason::Stop),
                    usage,
                }])
            }
            "error" => {
                let error: ErrorEvent = parse(kind, data)?;
                Err(stream_error(error.error))
            }
            // `ping`, and whatever new types appear.
            _ => Ok(Vec::new()),
        }
    }

    fn on_end(&mut self) -> Event {
        Event::Failed(ProviderError::Failed(
            "the stream ended before message_stop".to_owned(),
        ))
    }
}

/// A text block's (or text delta's) text; other blocks (thinking, tool input) are not the
/// answer.
fn text_of(block: Block) -> Vec<Event> {
    match block.text {
        Some(text) if !text.is_empty() && matches!(block.kind.as_str(), "text" | "text_delta") => {
            vec![Event::Text(text)]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use synesis_proto::message::ChatTurn;

    use super::super::ApiKey;
    use super::super::http::testing::{
        End, Script, collect, decode_all, next, quick, settings, upstream,
    };
    use super::*;

    /// The documented basic stream, as (event, data) pairs.
    const DOCUMENTED: &[(&str, &str)] = &[
        (
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-x","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"output_tokens":1}}}"#,
        ),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        ("ping", r#"{"type":"ping"}"#),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"!"}}"#,
        ),
        (
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#,
        ),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ];

    /// Feeds `events` to a fresh decoder, stopping at the first `Done` or error as the HTTP
    /// task does, else ending the stream.
    fn decode(events: &[(&str, &str)]) -> Vec<Event> {
        decode_all(MessageEvents::default(), events.iter().copied())
    }

    fn text(s: &str) -> Event {
        Event::Text(s.to_owned())
    }

    fn done(finish_reason: FinishReason, input: u64, output: u64) -> Event {
        Event::Done {
            finish_reason,
            usage: Some(ProviderUsage {
                input_tokens: input,
                output_tokens: output,
            }),
        }
    }

    #[test]
    fn the_documented_sequence() {
        assert_eq!(
            decode(DOCUMENTED),
            vec![text("Hello"), text("!"), done(FinishReason::Stop, 25, 15)]
        );
    }

    #[test]
    fn max_tokens_and_cumulative_usage() {
        let mut events = DOCUMENTED.to_vec();
        events[6] = (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens","stop_sequence":null},"usage":{"output_tokens":2}}"#,
        );
        events.insert(
            7,
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":9}}"#,
            ),
        );
        assert_eq!(
            decode(&events),
            vec![text("Hello"), text("!"), done(FinishReason::Length, 25, 9)]
        );
    }

    #[test]
    fn unknown_events_and_other_blocks_are_ignored() {
        let mut events = DOCUMENTED.to_vec();
        events.insert(
            1,
            ("some_future_event", r#"{"type":"some_future_event","x":1}"#),
        );
        events.insert(
            2,
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hmm"}}"#,
            ),
        );
        assert_eq!(
            decode(&events),
            vec![text("Hello"), text("!"), done(FinishReason::Stop, 25, 15)]
        );
    }

    #[test]
    fn events_named_only_in_their_data() {
        let events: Vec<(&str, &str)> = DOCUMENTED.iter().map(|(_, d)| ("message", *d)).collect();
        assert_eq!(
            decode(&events),
            vec![text("Hello"), text("!"), done(FinishReason::Stop, 25, 15)]
        );
    }

    #[test]
    fn an_error_event_mid_stream() {
        let mut events = DOCUMENTED[..4].to_vec();
        events.push((
            "error",
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        ));
        assert_eq!(
            decode(&events),
            vec![
                text("Hello"),
                Event::Failed(ProviderError::Unavailable {
                    why: "overloaded_error: Overloaded".to_owned(),
                    retry_after_ms: None
                })
            ]
        );
        for (kind, refused) in [
            ("api_error", false),
            ("invalid_request_error", true),
            ("something_new", false),
        ] {
            let data = format!(r#"{{"type":"error","error":{{"type":"{kind}","message":"m"}}}}"#);
            let out = decode(&[("error", &data)]);
            match (kind, &out[..]) {
                ("api_error", [Event::Failed(ProviderError::Unavailable { .. })]) => {}
                (_, [Event::Failed(ProviderError::Refused(_))]) if refused => {}
                ("something_new", [Event::Failed(ProviderError::Failed(_))]) => {}
                _ => panic!("{kind}: {out:?}"),
            }
        }
    }

    #[test]
    fn a_stream_missing_message_stop_fails() {
        let events = decode(&DOCUMENTED[..7]);
        assert_eq!(events[..2], [text("Hello"), text("!")]);
        assert_eq!(
            events[2],
            Event::Failed(ProviderError::Failed(
                "the stream ended before message_stop".to_owned()
            ))
        );
        assert_eq!(events.len(), 3);
    }

    #[test]
    fn a_malformed_event_fails() {
        assert!(matches!(
            decode(&[("content_block_delta", "{nope")])[..],
            [Event::Failed(ProviderError::Failed(_))]
        ));
    }

    fn ask(key: Option<&str>) -> Ask {
        Ask {
            model: "claude-x".to_owned(),
            turns: vec![
                ChatTurn {
                    role: ChatRole::System,
                    content: "Be brief.".to_owned(),
                },
                ChatTurn {
                    role: ChatRole::User,
                    content: "Hi".to_owned(),
                },
                ChatTurn {
                    role: ChatRole::Assistant,
                    content: "Hello.".to_owned(),
                },
                ChatTurn {
                    role: ChatRole::System,
                    content: "Answer in French.".to_owned(),
                },
                ChatTurn {
                    role: ChatRole::User,
                    content: "Again".to_owned(),
                },
            ],
            max_tokens: 100,
            temperature: 0.0,
            top_p: Some(0.9),
            seed: Some(1),
            stop: vec![],
            adapter: None,
            adapter_file: None,
            key: key.map(ApiKey::new),
            shape: Default::default(),
        }
    }

    fn wire(events: &[(&str, &str)]) -> Vec<String> {
        events
            .iter()
            .map(|(event, data)| format!("event: {event}\r\ndata: {data}\r\n\r\n"))
            .collect()
    }

    fn provider(url: &str, key: Option<&str>) -> Anthropic {
        let mut settings = settings(url.to_owned());
        settings.api_key = key.map(ApiKey::new);
        Anthropic::new(settings).unwrap()
    }

    #[tokio::test]
    async fn streams_an_answer_from_a_real_server() {
        let server = upstream(Script::Stream {
            pieces: wire(DOCUMENTED),
            end: End::Finish,
        })
        .await;
        let events = collect(provider(&server.url, Some("sk-ant-conf")).start(ask(None))).await;
        assert_eq!(
            events,
            vec![text("Hello"), text("!"), done(FinishReason::Stop, 25, 15)]
        );
        let request = server.request.await.unwrap();
        assert!(request.head.starts_with("POST /v1/messages HTTP/1.1\r\n"));
        assert_eq!(request.header("x-api-key").unwrap(), "sk-ant-conf");
        assert_eq!(request.header("anthropic-version").unwrap(), "2023-06-01");
        assert_eq!(request.header("content-type").unwrap(), "application/json");
        assert_eq!(request.header("authorization"), None);
        assert_eq!(
            request.json(),
            serde_json::json!({
                "model": "claude-x",
                "max_tokens": 100,
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Again"},
                ],
                "system": "Be brief.\n\nAnswer in French.",
                "temperature": 0.0,
                "top_p": 0.9,
                "stream": true,
            })
        );
    }

    #[tokio::test]
    async fn no_system_turn_sends_no_system_and_the_users_key_wins() {
        let server = upstream(Script::Stream {
            pieces: wire(DOCUMENTED),
            end: End::Finish,
        })
        .await;
        let mut ask = ask(Some("sk-ant-user"));
        ask.turns.retain(|t| t.role != ChatRole::System);
        ask.stop = vec!["END".to_owned()];
        collect(provider(&server.url, Some("sk-ant-conf")).start(ask)).await;
        let request = server.request.await.unwrap();
        assert_eq!(request.header("x-api-key").unwrap(), "sk-ant-user");
        let json = request.json();
        assert_eq!(json.get("system"), None);
        assert_eq!(json["stop_sequences"], serde_json::json!(["END"]));
    }

    #[tokio::test]
    async fn http_errors() {
        let server = upstream(Script::Status {
            code: 529,
            headers: vec![("retry-after", "3".to_owned())],
            body: r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
                .to_owned(),
        })
        .await;
        let events = collect(provider(&server.url, None).start(ask(None))).await;
        assert_eq!(
            events,
            vec![Event::Failed(ProviderError::Unavailable {
                why: "HTTP 529 <unknown status code>: overloaded_error: Overloaded".to_owned(),
                retry_after_ms: Some(3000),
            })]
        );

        let server = upstream(Script::Status {
            code: 401,
            headers: vec![],
            body: r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key sk-ant-secret"}}"#
                .to_owned(),
        })
        .await;
        let events = collect(provider(&server.url, Some("sk-ant-secret")).start(ask(None))).await;
        let [Event::Failed(ProviderError::Refused(why))] = &events[..] else {
            panic!("{events:?}");
        };
        assert_eq!(
            why,
            "HTTP 401 Unauthorized: authentication_error: invalid x-api-key [redacted]"
        );
    }

    #[tokio::test]
    async fn closed_mid_stream_and_error_event_over_http() {
        let server = upstream(Script::Stream {
            pieces: wire(&DOCUMENTED[..4]),
            end: End::Abort,
        })
        .await;
        let events = collect(provider(&server.url, None).start(ask(None))).await;
        assert_eq!(events[0], text("Hello"));
        assert!(
            matches!(events[1], Event::Failed(ProviderError::Failed(_))),
            "{events:?}"
        );

        let mut pieces = wire(&DOCUMENTED[..4]);
        pieces.extend(wire(&[(
            "error",
            r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#,
        )]));
        let server = upstream(Script::Stream {
            pieces,
            end: End::Hold,
        })
        .await;
        let events = collect(provider(&server.url, None).start(ask(None))).await;
        assert_eq!(
            events,
            vec![
                text("Hello"),
                Event::Failed(ProviderError::Unavailable {
                    why: "api_error: Internal server error".to_owned(),
                    retry_after_ms: None
                })
            ]
        );
    }

    #[tokio::test]
    async fn timeouts_and_stop() {
        let server = upstream(Script::Hang).await;
        let anthropic = Anthropic::new(quick(server.url.clone())).unwrap();
        let events = collect(anthropic.start(ask(None))).await;
        assert!(
            matches!(events[..], [Event::Failed(ProviderError::TimedOut(_))]),
            "{events:?}"
        );

        let server = upstream(Script::Stream {
            pieces: wire(&DOCUMENTED[..4]),
            end: End::Hold,
        })
        .await;
        let mut settings = settings(server.url.clone());
        settings.idle_timeout = Duration::from_secs(30);
        let mut generation = Anthropic::new(settings).unwrap().start(ask(None));
        assert_eq!(next(&mut generation).await, Some(text("Hello")));
        drop(generation);
        tokio::time::timeout(Duration::from_secs(10), server.closed)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_tool_use_block_becomes_a_call_in_the_text_and_tools_are_sent_in_anthropics_shape() {
        let events = decode(&[
            (
                "message_start",
                r#"{"type":"message_start","message":{"usage":{"input_tokens":9,"output_tokens":1}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_1","name":"weather","input":{}}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"city\": "}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"\"Oslo\"}"}}"#,
            ),
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":0}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":12}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ]);
        assert_eq!(
            events,
            vec![
                text(r#"<tool_call>{"arguments":{"city":"Oslo"},"name":"weather"}</tool_call>"#),
                done(FinishReason::Stop, 9, 12),
            ]
        );
        let with = Ask {
            shape: synesis_proto::message::AnswerShape {
                tools: vec![synesis_proto::message::ToolSpec {
                    name: "weather".into(),
                    description: "The weather.".into(),
                    parameters: r#"{"type":"object","properties":{"city":{"type":"string"}}}"#
                        .into(),
                }],
                tool_choice: ToolChoice::Required,
                top_k: Some(5),
                ..Default::default()
            },
            ..ask(None)
        };
        let body = serde_json::to_value(MessagesRequest::new(&with)).unwrap();
        assert_eq!(
            body["tools"][0]["input_schema"]["properties"]["city"]["type"],
            "string"
        );
        assert_eq!(body["tool_choice"], serde_json::json!({"type": "any"}));
        assert_eq!(body["top_k"], 5);
        let plain = serde_json::to_value(MessagesRequest::new(&ask(None))).unwrap();
        assert!(plain.get("tools").is_none() && plain.get("tool_choice").is_none());
        // No JSON mode in the Messages API: refused, never dropped.
        let json = Ask {
            shape: synesis_proto::message::AnswerShape {
                format: AnswerFormat::Json,
                ..Default::default()
            },
            ..ask(None)
        };
        let anthropic = Anthropic::new(HttpSettings::new("http://127.0.0.1:1")).unwrap();
        assert!(matches!(
            anthropic.request(&json),
            Err(ProviderError::Refused(_))
        ));
    }
}
