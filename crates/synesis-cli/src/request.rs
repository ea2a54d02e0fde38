//! One request for an answer, whoever asks: `synesis ask` and `synesis cloud ask` build one from
//! their flags, each HTTP API (OpenAI's, Ollama's, Anthropic's) reads its own shape into one.
//! From an [`AnswerRequest`] come the local model's request ([`AnswerRequest::local_request`])
//! and the cloud's ([`AnswerRequest::escalation`]); nothing else builds either.

use std::path::PathBuf;

use synesis_infer::tools::{self, Tool, ToolChoice};
use synesis_proto::message::{
    AnswerFormat, AnswerShape, ChatRole, ChatTurn, EscalationRequest, Preferences,
    ToolChoice as WireChoice, ToolSpec,
};
use synesis_proto::{MicroUsd, RequestId, Secret};

use crate::api::ApiError;

/// When the request names none (OpenAI's own default is 1; this is gentler on small models).
pub(crate) const DEFAULT_TEMPERATURE: f32 = 0.8;
/// When the request names no length.
pub(crate) const DEFAULT_MAX_TOKENS: u32 = 512;
/// The most tokens a request may ask for.
pub(crate) const MAX_TOKENS_MAX: u32 = 16_384;

/// What the answer's text must be.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Format {
    Text,
    /// Any JSON object.
    Json,
    /// A JSON document this schema accepts.
    Schema(serde_json::Value),
}

#[derive(Debug, Clone)]
pub(crate) struct AnswerRequest {
    /// A local model's name, `cloud/NAME`, a cloud model's, or `auto`.
    pub(crate) model: String,
    /// The conversation before the last turn.
    pub(crate) context: Vec<ChatTurn>,
    /// The last turn: the user's, or a tool's result.
    pub(crate) prompt: String,
    /// The prompt as it is, without the model's chat template (a plain completion).
    pub(crate) raw: bool,
    pub(crate) max_tokens: u32,
    pub(crate) temperature: f32,
    pub(crate) top_p: Option<f32>,
    pub(crate) top_k: Option<i32>,
    pub(crate) seed: Option<u64>,
    pub(crate) stop: Vec<String>,
    pub(crate) presence_penalty: f32,
    pub(crate) frequency_penalty: f32,
    pub(crate) format: Format,
    pub(crate) tools: Vec<Tool>,
    /// `None` with tools: they are described, never called (OpenAI's `"none"`).
    pub(crate) tool_choice: Option<ToolChoice>,
    /// Each token's log-probability, with this many alternatives.
    pub(crate) logprobs: Option<u8>,
    /// An adapter by name, and its scale (the cloud serves it by name, at its own scale).
    pub(crate) lora: Option<(String, f32)>,
    /// Where a local model loads `lora` from when it has not loaded it yet.
    pub(crate) lora_file: Option<PathBuf>,
    /// The cloud refuses the request when it could cost more.
    pub(crate) max_cost: Option<MicroUsd>,
    /// The person's own provider key (bring your own key).
    pub(crate) byok_key: Option<Secret>,
}

impl AnswerRequest {
    /// A request of `model` for the answer to `conversation`, with every option at its default.
    pub(crate) fn new(
        model: String,
        conversation: Conversation,
    ) -> Result<AnswerRequest, ApiError> {
        let (context, prompt) = conversation.split()?;
        Ok(AnswerRequest {
            model,
            context,
            prompt,
            raw: false,
            max_tokens: DEFAULT_MAX_TOKENS,
            temperature: DEFAULT_TEMPERATURE,
            top_p: None,
            top_k: None,
            seed: None,
            stop: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            format: Format::Text,
            tools: Vec::new(),
            tool_choice: None,
            logprobs: None,
            lora: None,
            lora_file: None,
            max_cost: None,
            byok_key: None,
        })
    }

    /// Checks what every API shares: ranges, and tools that are named.
    pub(crate) fn check(&self) -> Result<(), ApiError> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(ApiError::invalid("temperature must be between 0 and 2"));
        }
        if let Some(p) = self.top_p
            && !(0.0..=1.0).contains(&p)
        {
            return Err(ApiError::invalid("top_p must be between 0 and 1"));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(ApiError::invalid(format!(
                    "{name} must be between -2 and 2"
                )));
            }
        }
        if self.max_tokens == 0 || self.max_tokens > MAX_TOKENS_MAX {
            return Err(ApiError::invalid(format!(
                "the answer's length must be 1 to {MAX_TOKENS_MAX} tokens"
            )));
        }
        if let Some(ToolChoice::Named(name)) = &self.tool_choice
            && !self.tools.iter().any(|t| &t.name == name)
        {
            return Err(ApiError::invalid(format!(
                "tool_choice names {name:?}, which is not among the tools"
            )));
        }
        if self.tool_choice.is_some() && self.tools.is_empty() {
            return Err(ApiError::invalid(
                "a tool must be called, but no tools were given",
            ));
        }
        if self.tool_choice.is_some() && self.format != Format::Text {
            return Err(ApiError::invalid(
                "tools and a response format cannot be asked for together",
            ));
        }
        Ok(())
    }

    /// What of this request only this device's models can do now (the cloud's protocol does not
    /// carry it yet), by name; `None` when the cloud can answer it as well.
    pub(crate) fn device_only(&self) -> Option<&'static str> {
        if self.raw {
            Some("a raw prompt (a completion without the chat template)")
        } else {
            None
        }
    }

    /// The request as this device's model takes it: the tools taught in a system turn and held
    /// by a grammar, a response format held by one.
    pub(crate) fn local_request(&self) -> Result<synesis_infer::Request, ApiError> {
        let context: Vec<synesis_infer::ChatMessage> = self
            .context
            .iter()
            .map(|t| synesis_infer::ChatMessage {
                role: role_name(t.role).into(),
                content: t.content.clone(),
            })
            .collect();
        let mut request = synesis_infer::Request {
            chat: !self.raw,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            // llama.cpp's seed is 32 bits: the low ones.
            seed: self
                .seed
                .map_or(0, |s| u32::try_from(s & u64::from(u32::MAX)).unwrap_or(0)),
            stop: self.stop.clone(),
            context,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logprobs: self.logprobs,
            lora: self.lora.clone(),
            lora_file: self.lora_file.clone(),
            ..synesis_infer::Request::new(self.prompt.clone())
        };
        let schema = match &self.format {
            Format::Text => None,
            Format::Json => Some(r#"{"type":"object"}"#.to_owned()),
            Format::Schema(schema) => Some(schema.to_string()),
        };
        tools::shape(
            &mut request,
            &self.tools,
            self.tool_choice.as_ref(),
            schema.as_deref(),
        )
        .map_err(|e| ApiError::invalid(e.to_string()))?;
        Ok(request)
    }

    /// What the answer must be beyond text, as the cloud is told it.
    fn shape(&self) -> AnswerShape {
        AnswerShape {
            tools: self
                .tools
                .iter()
                .map(|t| ToolSpec {
                    name: t.name.clone(),
                    description: t.description.clone(),
                    parameters: t
                        .parameters
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                })
                .collect(),
            tool_choice: match &self.tool_choice {
                None => WireChoice::None,
                Some(ToolChoice::Auto) => WireChoice::Auto,
                Some(ToolChoice::Required) => WireChoice::Required,
                Some(ToolChoice::Named(name)) => WireChoice::Named(name.clone()),
            },
            format: match &self.format {
                Format::Text => AnswerFormat::Text,
                Format::Json => AnswerFormat::Json,
                Format::Schema(schema) => AnswerFormat::Schema(schema.to_string()),
            },
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            top_k: self.top_k,
            logprobs: self.logprobs,
        }
    }

    /// The request as the cloud takes it, for `model`; refused when it asks for what the cloud
    /// cannot do yet ([`AnswerRequest::device_only`]).
    pub(crate) fn escalation(
        &self,
        request_id: RequestId,
        model: String,
    ) -> Result<EscalationRequest, ApiError> {
        if let Some(what) = self.device_only() {
            return Err(cloud_cannot(what));
        }
        let mut context = self.context.clone();
        context.push(ChatTurn {
            role: ChatRole::User,
            content: self.prompt.clone(),
        });
        Ok(EscalationRequest {
            request_id,
            model,
            adapter: self.lora.as_ref().map(|(name, _)| name.clone()),
            context,
            preferences: Preferences {
                max_tokens: self.max_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
                stop: self.stop.clone(),
                max_cost: self.max_cost,
            },
            byok_key: self.byok_key.clone(),
            shape: Box::new(self.shape()),
        })
    }
}

/// The refusal of a request for the cloud that asks for `what`.
pub(crate) fn cloud_cannot(what: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "unsupported_parameter",
        format!(
            "{what}: answered by this device's models only for now (the cloud does not take them yet); name a local model, or `auto` with one"
        ),
    )
}

fn role_name(role: ChatRole) -> &'static str {
    match role {
        ChatRole::System => "system",
        ChatRole::User => "user",
        ChatRole::Assistant => "assistant",
    }
}

/// A conversation as an API's messages give it, turn by turn: tool calls and results are
/// written in the format the model is taught ([`synesis_infer::tools`]).
#[derive(Debug, Default)]
pub(crate) struct Conversation {
    turns: Vec<(Turn, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    System,
    User,
    Assistant,
    ToolResult,
}

impl Conversation {
    pub(crate) fn system(&mut self, text: String) {
        self.turns.push((Turn::System, text));
    }

    pub(crate) fn user(&mut self, text: String) {
        self.turns.push((Turn::User, text));
    }

    /// An assistant's turn: its text, then its tool calls (`(name, arguments)`).
    pub(crate) fn assistant(&mut self, text: String, calls: &[(String, String)]) {
        let mut content = text;
        for (name, arguments) in calls {
            content.push_str(&tools::render_call(name, arguments));
        }
        self.turns.push((Turn::Assistant, content));
    }

    pub(crate) fn tool_result(&mut self, text: &str) {
        self.turns
            .push((Turn::ToolResult, tools::render_result(text)));
    }

    /// The turns before the last, and the last (the user's or a tool's result).
    fn split(mut self) -> Result<(Vec<ChatTurn>, String), ApiError> {
        let last = match self.turns.pop() {
            Some((Turn::User | Turn::ToolResult, text)) => text,
            Some(_) => {
                return Err(ApiError::invalid(
                    "the last message must be the user's or a tool's result",
                ));
            }
            None => return Err(ApiError::invalid("messages must not be empty")),
        };
        let context = self
            .turns
            .into_iter()
            .map(|(turn, content)| ChatTurn {
                role: match turn {
                    Turn::System => ChatRole::System,
                    // A tool's result is told to the model as the user's turn.
                    Turn::User | Turn::ToolResult => ChatRole::User,
                    Turn::Assistant => ChatRole::Assistant,
                },
                content,
            })
            .collect();
        Ok((context, last))
    }
}
