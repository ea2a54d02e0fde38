//! An OpenAI-compatible upstream: `POST {base_url}/chat/completions` with `stream: true`, read
//! as server-sent chunks (vLLM, llama.cpp's server, llama-cpp-python, Ollama, OpenAI).
//!
//! This module owns the request body and the meaning of the chunks (`ChatChunks`, IO-free):
//! `choices[0].delta.content` is text, `choices[0].finish_reason` the end's reason, a `usage`
//! object (`stream_options.include_usage`; OpenAI sends it in a last chunk with no choices)
//! the count, `data: [DONE]` the end. Servers that send no usage even when asked
//! (llama-cpp-python) end with `usage: None` and the handler counts. The HTTP side (timeouts,
//! statuses, stopping) is [`super::http`]'s.

use serde::{Deserialize, Serialize};
use synesis_proto::Blob;
use synesis_proto::message::{
    AnswerFormat, ChatRole, FinishReason, TokenLogprob, ToolChoice, TopLogprob,
};

use super::http::{Decoder, HttpSettings, SetupError, Upstream, key_header, one_line};
use super::{Ask, Event, Generation, Provider, ProviderError, ProviderUsage, ask_bound};

/// An OpenAI-compatible chat completions upstream.
#[derive(Debug)]
pub struct OpenAi {
    upstream: Upstream,
    /// LoRA adapters the server serves by name (vLLM's `--lora-modules NAME=PATH`): a request
    /// with one asks the server for that name as its model.
    adapters: Vec<String>,
}

impl OpenAi {
    /// A provider for the server at `settings.base_url` (the prefix holding
    /// `/chat/completions`, such as `http://127.0.0.1:8080/v1`). Builds its one HTTP client.
    pub fn new(settings: HttpSettings) -> Result<OpenAi, SetupError> {
        Ok(OpenAi {
            upstream: Upstream::new(settings, "/chat/completions")?,
            adapters: Vec::new(),
        })
    }

    /// The same, for a server that also serves these LoRA adapters by name.
    pub fn with_adapters(mut self, adapters: Vec<String>) -> OpenAi {
        self.adapters = adapters;
        self
    }

    fn request(&self, ask: &Ask) -> Result<reqwest::RequestBuilder, ProviderError> {
        let mut request = self.upstream.post().json(&ChatRequest::new(ask));
        if let Some(key) = self.upstream.key_for(ask.key.as_ref()) {
            request = request.header(reqwest::header::AUTHORIZATION, key_header("Bearer ", key)?);
        }
        Ok(request)
    }
}

impl Provider for OpenAi {
    fn input_tokens_bound(&self, ask: &Ask) -> Result<u64, ProviderError> {
        Ok(ask_bound(ask, 8))
    }

    fn start(&self, ask: Ask) -> Generation {
        let request = self.request(&ask);
        self.upstream.start(request, ask.key, ChatChunks::default())
    }

    fn takes_user_keys(&self) -> bool {
        true
    }

    fn has_adapter(&self, name: &str) -> bool {
        self.adapters.iter().any(|a| a == name)
    }
}

/// The request body.
#[derive(Debug, Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<Message<'a>>,
    max_tokens: u32,
    temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f32>,
    /// Not OpenAI's own (llama.cpp's server, vLLM and Ollama take it); sent only when asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<i32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    logprobs: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<u8>,
}

#[derive(Debug, Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Debug, Serialize)]
struct StreamOptions {
    include_usage: bool,
}

impl<'a> ChatRequest<'a> {
    fn new(ask: &'a Ask) -> ChatRequest<'a> {
        ChatRequest {
            // An adapter the server serves by name is asked for as the model (vLLM's way).
            model: ask.adapter.as_deref().unwrap_or(&ask.model),
            messages: ask
                .turns
                .iter()
                .map(|turn| Message {
                    role: match turn.role {
                        ChatRole::System => "system",
                        ChatRole::User => "user",
                        ChatRole::Assistant => "assistant",
                    },
                    content: &turn.content,
                })
                .collect(),
            max_tokens: ask.max_tokens,
            temperature: ask.temperature,
            top_p: ask.top_p,
            seed: ask.seed,
            stop: &ask.stop,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            tools: ask
                .shape
                .tools
                .iter()
                .map(|t| {
                    serde_json::json!({"type": "function", "function": {
                        "name": t.name, "description": t.description,
                        "parameters": json_or_object(&t.parameters),
                    }})
                })
                .collect(),
            tool_choice: (!ask.shape.tools.is_empty()).then(|| match &ask.shape.tool_choice {
                ToolChoice::None => "none".into(),
                ToolChoice::Auto => "auto".into(),
                ToolChoice::Required => "required".into(),
                ToolChoice::Named(name) => {
                    serde_json::json!({"type": "function", "function": {"name": name}})
                }
            }),
            response_format: match &ask.shape.format {
                AnswerFormat::Text => None,
                AnswerFormat::Json => Some(serde_json::json!({"type": "json_object"})),
                AnswerFormat::Schema(schema) => Some(serde_json::json!({
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": json_or_object(schema)},
                })),
            },
            presence_penalty: (ask.shape.presence_penalty != 0.0)
                .then_some(ask.shape.presence_penalty),
            frequency_penalty: (ask.shape.frequency_penalty != 0.0)
                .then_some(ask.shape.frequency_penalty),
            top_k: ask.shape.top_k,
            logprobs: ask.shape.logprobs.is_some(),
            top_logprobs: ask.shape.logprobs.filter(|&n| n > 0),
        }
    }
}

/// JSON text as a value (a schema); empty or not JSON, any object.
fn json_or_object(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::json!({"type": "object"}))
}

/// One streamed chunk, only the fields read. Everything may be missing or null: servers
/// differ (vLLM's usage chunk may have `"choices": null`).
#[derive(Debug, Deserialize)]
struct Chunk {
    choices: Option<Vec<Choice>>,
    usage: Option<Usage>,
    error: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    index: Option<u32>,
    delta: Option<Delta>,
    finish_reason: Option<String>,
    logprobs: Option<ChoiceLogprobs>,
}

/// `choices[0].logprobs`: this chunk's tokens.
#[derive(Debug, Deserialize)]
struct ChoiceLogprobs {
    content: Option<Vec<ChunkToken>>,
}

#[derive(Debug, Deserialize)]
struct ChunkToken {
    token: String,
    logprob: f32,
    /// The token's UTF-8 bytes (a token may be part of a character); else its text's.
    bytes: Option<Vec<u8>>,
    #[serde(default)]
    top_logprobs: Vec<ChunkAlternative>,
}

#[derive(Debug, Deserialize)]
struct ChunkAlternative {
    token: String,
    logprob: f32,
    bytes: Option<Vec<u8>>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    content: Option<String>,
    tool_calls: Option<Vec<DeltaCall>>,
}

/// A piece of a tool call: the first names it, the rest add to its arguments.
#[derive(Debug, Deserialize)]
struct DeltaCall {
    index: Option<u32>,
    function: Option<DeltaFunction>,
}

#[derive(Debug, Deserialize)]
struct DeltaFunction {
    name: Option<String>,
    arguments: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

/// The most tokens a stream's logprobs may cover (the most any answer is long).
const LOGPROBS_MAX_TOKENS: usize = 100_000;

/// The most a stream's tool calls may hold, names and arguments together.
const CALLS_MAX_BYTES: usize = 1 << 20;

/// The meaning of a chat completions stream, fed one SSE event at a time.
#[derive(Debug, Default)]
pub(crate) struct ChatChunks {
    finish: Option<FinishReason>,
    usage: Option<ProviderUsage>,
    /// Tool calls being streamed, by index: name and arguments so far. Handed on whole, as
    /// text in the one format every model's calls travel in
    /// ([`synesis_infer::tools::render_call`]), when the choice finishes.
    calls: std::collections::BTreeMap<u32, (String, String)>,
    /// The tokens' log-probabilities so far, when the ask asked; handed on at the end.
    logprobs: Vec<TokenLogprob>,
}

impl ChatChunks {
    /// The calls streamed so far, as text, then the log-probabilities; none are kept.
    fn calls(&mut self) -> Vec<Event> {
        let mut events: Vec<Event> = std::mem::take(&mut self.calls)
            .into_values()
            .map(|(name, arguments)| {
                Event::Text(synesis_infer::tools::render_call(&name, &arguments))
            })
            .collect();
        if !self.logprobs.is_empty() {
            events.push(Event::Logprobs(std::mem::take(&mut self.logprobs)));
        }
        events
    }

    fn done(&self) -> Event {
        Event::Done {
            finish_reason: self.finish.unwrap_or(FinishReason::Stop),
            usage: self.usage,
        }
    }
}

/// `"length"` is the token limit; every other reason (`"stop"`, and `"content_filter"` or
/// `"tool_calls"`, which these asks do not invite) is the model's own end.
fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "length" => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

impl Decoder for ChatChunks {
    fn on_event(&mut self, event: &str, data: &str) -> Result<Vec<Event>, ProviderError> {
        let data = data.trim();
        if data == "[DONE]" {
            // `[DONE]` without a finish reason: the server says the answer is whole.
            let mut events = self.calls();
            events.push(self.done());
            return Ok(events);
        }
        let chunk: Chunk = serde_json::from_str(data)
            .map_err(|e| ProviderError::Failed(format!("a malformed chunk in the stream ({e})")))?;
        if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
            let message = error
                .get("message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| error.to_string());
            return Err(ProviderError::Failed(format!(
                "the upstream reported an error: {}",
                one_line(&message)
            )));
        }
        if event == "error" {
            return Err(ProviderError::Failed(format!(
                "the upstream reported an error: {}",
                one_line(data)
            )));
        }
        if let Some(usage) = chunk.usage
            && let (Some(input_tokens), Some(output_tokens)) =
                (usage.prompt_tokens, usage.completion_tokens)
        {
            self.usage = Some(ProviderUsage {
                input_tokens,
                output_tokens,
            });
        }
        let mut events = Vec::new();
        let choice = chunk
            .choices
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.index.unwrap_or(0) == 0);
        if let Some(choice) = choice {
            let delta = choice.delta.unwrap_or(Delta {
                content: None,
                tool_calls: None,
            });
            if let Some(text) = delta.content
                && !text.is_empty()
            {
                events.push(Event::Text(text));
            }
            for t in choice.logprobs.and_then(|l| l.content).unwrap_or_default() {
                if self.logprobs.len() >= LOGPROBS_MAX_TOKENS {
                    return Err(ProviderError::Failed(format!(
                        "the upstream sent logprobs for more than {LOGPROBS_MAX_TOKENS} tokens"
                    )));
                }
                self.logprobs.push(TokenLogprob {
                    bytes: Blob(t.bytes.unwrap_or_else(|| t.token.into_bytes())),
                    logprob: t.logprob,
                    top: t
                        .top_logprobs
                        .into_iter()
                        .take(usize::from(synesis_infer::TOP_LOGPROBS_MAX))
                        .map(|a| TopLogprob {
                            bytes: Blob(a.bytes.unwrap_or_else(|| a.token.into_bytes())),
                            logprob: a.logprob,
                        })
                        .collect(),
                });
            }
            for call in delta.tool_calls.unwrap_or_default() {
                let (name, arguments) = self.calls.entry(call.index.unwrap_or(0)).or_default();
                if let Some(f) = call.function {
                    name.push_str(f.name.as_deref().unwrap_or_default());
                    arguments.push_str(f.arguments.as_deref().unwrap_or_default());
                }
                let held: usize = self.calls.values().map(|(n, a)| n.len() + a.len()).sum();
                if held > CALLS_MAX_BYTES {
                    return Err(ProviderError::Failed(format!(
                        "the upstream's tool calls passed {CALLS_MAX_BYTES} bytes"
                    )));
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.finish = Some(finish_reason(&reason));
                events.extend(self.calls());
            }
        }
        Ok(events)
    }

    fn on_end(&mut self) -> Event {
        if self.finish.is_some() {
            // A finish reason came but not `[DONE]`: the answer is whole all the same.
            self.done()
        } else {
            Event::Failed(ProviderError::Failed(
                "the stream ended before the answer did (no finish reason, no [DONE])".to_owned(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, Instant};

    use synesis_proto::message::ChatTurn;

    use super::super::ApiKey;
    use super::super::http::testing::{
        End, Script, collect, decode_all, next, quick, settings, upstream,
    };
    use super::*;

    /// Feeds `events` (SSE `data` payloads of unnamed events) to a fresh decoder; stops at the
    /// first `Done` or error like the HTTP task does, else ends the stream.
    fn decode(datas: &[&str]) -> Vec<Event> {
        decode_all(ChatChunks::default(), datas.iter().map(|d| ("message", *d)))
    }

    const ROLE: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":null}"#;
    const HELLO: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null}"#;
    const WORLD: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" world"},"logprobs":null,"finish_reason":null}],"usage":null}"#;
    const STOP: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#;
    const LENGTH: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#;
    const USAGE: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;

    fn text(s: &str) -> Event {
        Event::Text(s.to_owned())
    }

    #[test]
    fn openai_sequence_with_usage() {
        assert_eq!(
            decode(&[ROLE, HELLO, WORLD, STOP, USAGE, "[DONE]"]),
            vec![
                text("Hello"),
                text(" world"),
                Event::Done {
                    finish_reason: FinishReason::Stop,
                    usage: Some(ProviderUsage {
                        input_tokens: 12,
                        output_tokens: 3
                    }),
                },
            ]
        );
    }

    #[test]
    fn llama_cpp_python_sequence_without_usage() {
        // llama-cpp-python: no usage chunk even when asked, no `usage` key at all.
        let role = r#"{"id":"x","model":"m","created":1,"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant"},"logprobs":null,"finish_reason":null}]}"#;
        let hi = r#"{"id":"x","model":"m","created":1,"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}"#;
        let end = r#"{"id":"x","model":"m","created":1,"object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}]}"#;
        assert_eq!(
            decode(&[role, hi, end, "[DONE]"]),
            vec![
                text("Hi"),
                Event::Done {
                    finish_reason: FinishReason::Length,
                    usage: None
                }
            ]
        );
    }

    #[test]
    fn usage_chunk_with_null_choices_and_finish_without_done() {
        let usage = r#"{"choices":null,"usage":{"prompt_tokens":5,"completion_tokens":1}}"#;
        assert_eq!(
            decode(&[HELLO, LENGTH, usage]),
            vec![
                text("Hello"),
                Event::Done {
                    finish_reason: FinishReason::Length,
                    usage: Some(ProviderUsage {
                        input_tokens: 5,
                        output_tokens: 1
                    })
                }
            ]
        );
    }

    #[test]
    fn a_stream_without_its_end_fails() {
        let events = decode(&[ROLE, HELLO]);
        assert_eq!(events[0], text("Hello"));
        assert!(matches!(events[1], Event::Failed(ProviderError::Failed(_))));
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn malformed_chunks_and_error_chunks_fail() {
        assert!(matches!(
            decode(&["{not json"])[..],
            [Event::Failed(ProviderError::Failed(_))]
        ));
        let events = decode(&[
            HELLO,
            r#"{"error":{"message":"out of memory","type":"server_error"}}"#,
        ]);
        assert_eq!(events[0], text("Hello"));
        assert_eq!(
            events[1],
            Event::Failed(ProviderError::Failed(
                "the upstream reported an error: out of memory".to_owned()
            ))
        );
    }

    #[test]
    fn done_without_finish_is_a_stop() {
        assert_eq!(
            decode(&[HELLO, "[DONE]"]),
            vec![
                text("Hello"),
                Event::Done {
                    finish_reason: FinishReason::Stop,
                    usage: None
                }
            ]
        );
    }

    fn ask(key: Option<&str>) -> Ask {
        Ask {
            model: "qwen2.5-7b".to_owned(),
            turns: vec![
                ChatTurn {
                    role: ChatRole::System,
                    content: "Be brief.".to_owned(),
                },
                ChatTurn {
                    role: ChatRole::User,
                    content: "Hi".to_owned(),
                },
            ],
            max_tokens: 64,
            temperature: 0.5,
            top_p: None,
            seed: Some(42),
            stop: vec!["\n\n".to_owned()],
            adapter: None,
            adapter_file: None,
            key: key.map(ApiKey::new),
            shape: Default::default(),
        }
    }

    fn sse(data: &str) -> String {
        format!("data: {data}\n\n")
    }

    fn provider(url: &str, key: Option<&str>) -> OpenAi {
        let mut settings = settings(format!("{url}/v1"));
        settings.api_key = key.map(ApiKey::new);
        OpenAi::new(settings).unwrap()
    }

    #[tokio::test]
    async fn streams_an_answer_from_a_real_server() {
        let server = upstream(Script::Stream {
            pieces: vec![
                sse(ROLE),
                // One event split across two HTTP chunks, CRLF line ends.
                format!("data: {}", &HELLO[..20]),
                format!("{}\r\n\r\n", &HELLO[20..]),
                sse(WORLD) + &sse(STOP),
                ": keepalive\n\n".to_owned(),
                sse(USAGE),
                sse("[DONE]"),
            ],
            end: End::Finish,
        })
        .await;
        let openai = provider(&server.url, Some("sk-configured"));
        let events = collect(openai.start(ask(None))).await;
        assert_eq!(
            events,
            vec![
                text("Hello"),
                text(" world"),
                Event::Done {
                    finish_reason: FinishReason::Stop,
                    usage: Some(ProviderUsage {
                        input_tokens: 12,
                        output_tokens: 3
                    })
                }
            ]
        );
        let request = server.request.await.unwrap();
        assert!(
            request
                .head
                .starts_with("POST /v1/chat/completions HTTP/1.1\r\n")
        );
        assert_eq!(
            request.header("authorization").unwrap(),
            "Bearer sk-configured"
        );
        assert_eq!(
            request.json(),
            serde_json::json!({
                "model": "qwen2.5-7b",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ],
                "max_tokens": 64,
                "temperature": 0.5,
                "seed": 42,
                "stop": ["\n\n"],
                "stream": true,
                "stream_options": {"include_usage": true},
            })
        );
    }

    #[tokio::test]
    async fn the_users_key_wins_and_no_key_sends_no_header() {
        let server = upstream(Script::Stream {
            pieces: vec![sse(STOP), sse("[DONE]")],
            end: End::Finish,
        })
        .await;
        let openai = provider(&server.url, Some("sk-configured"));
        collect(openai.start(ask(Some("sk-user")))).await;
        let request = server.request.await.unwrap();
        assert_eq!(request.header("authorization").unwrap(), "Bearer sk-user");

        let server = upstream(Script::Stream {
            pieces: vec![sse(STOP), sse("[DONE]")],
            end: End::Finish,
        })
        .await;
        let openai = provider(&server.url, None);
        collect(openai.start(ask(None))).await;
        let request = server.request.await.unwrap();
        assert_eq!(request.header("authorization"), None);
    }

    #[tokio::test]
    async fn a_500_is_unavailable_with_its_retry_after() {
        let server = upstream(Script::Status {
            code: 503,
            headers: vec![("retry-after", "2".to_owned())],
            body: r#"{"error":{"message":"loading model","type":"unavailable"}}"#.to_owned(),
        })
        .await;
        let events = collect(provider(&server.url, None).start(ask(None))).await;
        assert_eq!(
            events,
            vec![Event::Failed(ProviderError::Unavailable {
                why: "HTTP 503 Service Unavailable: unavailable: loading model".to_owned(),
                retry_after_ms: Some(2000),
            })]
        );

        let server = upstream(Script::Status {
            code: 500,
            headers: vec![],
            body: "oops".to_owned(),
        })
        .await;
        let events = collect(provider(&server.url, None).start(ask(None))).await;
        assert!(matches!(
            events[..],
            [Event::Failed(ProviderError::Unavailable {
                retry_after_ms: None,
                ..
            })]
        ));
    }

    #[tokio::test]
    async fn a_429_is_unavailable() {
        let server = upstream(Script::Status {
            code: 429,
            headers: vec![("retry-after-ms", "250".to_owned())],
            body: String::new(),
        })
        .await;
        let events = collect(provider(&server.url, None).start(ask(None))).await;
        assert_eq!(
            events,
            vec![Event::Failed(ProviderError::Unavailable {
                why: "HTTP 429 Too Many Requests".to_owned(),
                retry_after_ms: Some(250),
            })]
        );
    }

    #[tokio::test]
    async fn a_401_is_refused_without_the_key() {
        for (configured, user) in [(Some("sk-secret-123"), None), (None, Some("sk-secret-123"))] {
            let server = upstream(Script::Status {
                code: 401,
                headers: vec![],
                body: r#"{"error":{"message":"Incorrect API key provided: sk-secret-123.","type":"invalid_request_error"}}"#.to_owned(),
            })
            .await;
            let events = collect(provider(&server.url, configured).start(ask(user))).await;
            let [Event::Failed(ProviderError::Refused(why))] = &events[..] else {
                panic!("{events:?}");
            };
            assert!(why.starts_with("HTTP 401 Unauthorized: "), "{why}");
            assert!(!why.contains("sk-secret-123"), "{why}");
            assert!(why.contains("[redacted]"), "{why}");
            assert!(!format!("{events:?}").contains("sk-secret-123"));
        }
    }

    #[tokio::test]
    async fn no_headers_in_time_is_a_timeout_and_the_connection_is_dropped() {
        let server = upstream(Script::Hang).await;
        let openai = OpenAi::new(quick(format!("{}/v1", server.url))).unwrap();
        let started = Instant::now();
        let events = collect(openai.start(ask(None))).await;
        assert!(
            matches!(events[..], [Event::Failed(ProviderError::TimedOut(_))]),
            "{events:?}"
        );
        // The configured first-byte timeout (300 ms) ended it, not some longer default or the
        // 10 s `collect` waits; the bound leaves a loaded machine a generous margin.
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::timeout(Duration::from_secs(10), server.closed)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_silent_stream_times_out() {
        let server = upstream(Script::Stream {
            pieces: vec![sse(HELLO)],
            end: End::Hold,
        })
        .await;
        let openai = OpenAi::new(quick(format!("{}/v1", server.url))).unwrap();
        let events = collect(openai.start(ask(None))).await;
        assert_eq!(events[0], text("Hello"));
        assert!(
            matches!(events[1], Event::Failed(ProviderError::TimedOut(_))),
            "{events:?}"
        );
        assert_eq!(events.len(), 2);
    }

    #[tokio::test]
    async fn a_connection_closed_mid_stream_fails_after_the_text() {
        let server = upstream(Script::Stream {
            pieces: vec![sse(ROLE), sse(HELLO)],
            end: End::Abort,
        })
        .await;
        let events = collect(provider(&server.url, None).start(ask(None))).await;
        assert_eq!(events[0], text("Hello"));
        assert!(
            matches!(events[1], Event::Failed(ProviderError::Failed(_))),
            "{events:?}"
        );
        assert_eq!(events.len(), 2);
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let events = collect(provider(&url, None).start(ask(None))).await;
        assert!(
            matches!(
                events[..],
                [Event::Failed(ProviderError::Unavailable { .. })]
            ),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn dropping_the_generation_closes_the_connection() {
        let server = upstream(Script::Stream {
            pieces: vec![sse(ROLE), sse(HELLO)],
            end: End::Hold,
        })
        .await;
        let mut settings = settings(format!("{}/v1", server.url));
        settings.idle_timeout = Duration::from_secs(30);
        let openai = OpenAi::new(settings).unwrap();
        let mut generation = openai.start(ask(None));
        assert_eq!(next(&mut generation).await, Some(text("Hello")));
        drop(generation);
        tokio::time::timeout(Duration::from_secs(10), server.closed)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn stopping_before_the_headers_closes_the_connection() {
        let server = upstream(Script::Hang).await;
        let mut settings = settings(format!("{}/v1", server.url));
        settings.first_byte_timeout = Duration::from_secs(30);
        let openai = OpenAi::new(settings).unwrap();
        let mut generation = openai.start(ask(None));
        server.request.await.unwrap();
        generation.stop();
        tokio::time::timeout(Duration::from_secs(10), server.closed)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next(&mut generation).await, None);
    }

    #[test]
    fn bound_and_byok() {
        let openai = OpenAi::new(HttpSettings::new("http://127.0.0.1:1/v1")).unwrap();
        let ask = ask(None);
        assert_eq!(
            openai.input_tokens_bound(&ask).unwrap(),
            super::super::bytes_bound(&ask.turns, 8)
        );
        assert!(openai.takes_user_keys());
        // Tools count in the hold: their schemas, and the instructions an upstream adds.
        let parameters = r#"{"type":"object","properties":{"city":{"type":"string"}}}"#;
        let with = Ask {
            shape: synesis_proto::message::AnswerShape {
                tools: vec![synesis_proto::message::ToolSpec {
                    name: "weather".into(),
                    description: String::new(),
                    parameters: parameters.into(),
                }],
                tool_choice: ToolChoice::Auto,
                ..Default::default()
            },
            ..ask.clone()
        };
        assert!(
            openai.input_tokens_bound(&with).unwrap()
                >= openai.input_tokens_bound(&ask).unwrap()
                    + parameters.len() as u64
                    + super::super::TOOLS_OVERHEAD_TOKENS
        );
    }

    #[test]
    fn an_adapter_the_server_serves_is_asked_for_by_name() {
        let openai = OpenAi::new(HttpSettings::new("http://127.0.0.1:1/v1"))
            .unwrap()
            .with_adapters(vec!["legal".into()]);
        assert!(openai.has_adapter("legal") && !openai.has_adapter("other"));
        let plain = serde_json::to_value(ChatRequest::new(&ask(None))).unwrap();
        assert_eq!(plain["model"], "qwen2.5-7b");
        let with = Ask {
            adapter: Some("legal".into()),
            ..ask(None)
        };
        let body = serde_json::to_value(ChatRequest::new(&with)).unwrap();
        assert_eq!(body["model"], "legal", "vLLM serves a LoRA as a model name");
    }

    #[test]
    fn a_streamed_tool_call_becomes_a_call_in_the_text_and_tools_are_sent_in_openais_shape() {
        let first = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"weather","arguments":"{\"city\":"}}]},"finish_reason":null}]}"#;
        let rest = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Oslo\"}"}}]},"finish_reason":null}]}"#;
        let end = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#;
        let events = decode(&[ROLE, first, rest, end, "[DONE]"]);
        assert_eq!(
            events,
            vec![
                Event::Text(
                    r#"<tool_call>{"arguments":{"city":"Oslo"},"name":"weather"}</tool_call>"#
                        .into()
                ),
                Event::Done {
                    finish_reason: FinishReason::Stop,
                    usage: None
                },
            ]
        );
        let with = Ask {
            shape: synesis_proto::message::AnswerShape {
                tools: vec![synesis_proto::message::ToolSpec {
                    name: "weather".into(),
                    description: "The weather.".into(),
                    parameters: String::new(),
                }],
                tool_choice: ToolChoice::Named("weather".into()),
                format: AnswerFormat::Text,
                presence_penalty: 0.5,
                ..Default::default()
            },
            ..ask(None)
        };
        let body = serde_json::to_value(ChatRequest::new(&with)).unwrap();
        assert_eq!(
            body["tools"][0]["function"]["parameters"],
            serde_json::json!({"type": "object"})
        );
        assert_eq!(body["tool_choice"]["function"]["name"], "weather");
        assert_eq!(body["presence_penalty"], 0.5);
        assert!(body.get("frequency_penalty").is_none() && body.get("top_k").is_none());
        let schema = Ask {
            shape: synesis_proto::message::AnswerShape {
                format: AnswerFormat::Schema(r#"{"type":"object","required":["ok"]}"#.into()),
                ..Default::default()
            },
            ..ask(None)
        };
        let body = serde_json::to_value(ChatRequest::new(&schema)).unwrap();
        assert_eq!(
            body["response_format"]["json_schema"]["schema"]["required"][0],
            "ok"
        );
        assert!(body.get("tools").is_none());
    }

    #[test]
    fn logprobs_are_asked_for_and_handed_on_before_the_end() {
        let with = Ask {
            shape: synesis_proto::message::AnswerShape {
                logprobs: Some(2),
                ..Default::default()
            },
            ..ask(None)
        };
        let body = serde_json::to_value(ChatRequest::new(&with)).unwrap();
        assert_eq!(
            (body["logprobs"].clone(), body["top_logprobs"].clone()),
            (true.into(), 2.into())
        );
        let plain = serde_json::to_value(ChatRequest::new(&ask(None))).unwrap();
        assert!(plain.get("logprobs").is_none());
        let hi = r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":{"content":[{"token":"Hi","logprob":-0.5,"bytes":[72,105],"top_logprobs":[{"token":"Hi","logprob":-0.5,"bytes":[72,105]},{"token":"Yo","logprob":-1.5,"bytes":null}]}]},"finish_reason":null}]}"#;
        let events = decode(&[hi, STOP, "[DONE]"]);
        assert_eq!(events[0], Event::Text("Hi".into()));
        let Event::Logprobs(tokens) = &events[1] else {
            panic!("{events:?}");
        };
        assert_eq!(tokens[0].bytes.0, b"Hi");
        assert_eq!(
            tokens[0].top[1].bytes.0, b"Yo",
            "the token's text when no bytes"
        );
        assert!(matches!(events[2], Event::Done { .. }));
    }
}
