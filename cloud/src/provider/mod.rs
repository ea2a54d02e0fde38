//! Providers: what actually answers an escalation. One trait ([`Provider`]), chosen per model in
//! `cloud.toml` (`[models.NAME]`, see [`crate::config`]):
//!
//! - [`local`]: llama.cpp in this process (`synesis-infer`), one shared model load serving a
//!   bounded number of sequences, with a bounded queue before it.
//! - [`openai`]: an OpenAI-compatible HTTP upstream (`/v1/chat/completions`, SSE): vLLM,
//!   llama.cpp's server, Ollama, OpenAI.
//! - [`anthropic`]: Anthropic's Messages API (`/v1/messages`, SSE).
//!
//! A provider streams [`Event`]s on a channel. The escalation handler owns everything else
//! (holds, settlement, sequence numbers, resume): a provider knows nothing of money or of the
//! device. Closing the receiver (or dropping it) stops a generation: the in-process provider
//! checks before every token, an HTTP provider drops its response. The in-process provider can
//! also be halted through [`Generation::halt`], and then reports its exact count.

use std::fmt;

use synesis_proto::message::AnswerShape;
use synesis_proto::message::{ChatTurn, FinishReason};

pub mod anthropic;
pub mod http;
pub mod local;
pub mod openai;
pub mod sse;

pub use http::{HttpSettings, SetupError, api_key_from_env};

/// Events a generation may queue before the provider waits for the handler (a handler reads
/// them as they come; this only smooths bursts).
pub const EVENTS_BUFFER: usize = 64;

/// One request as a provider sees it.
#[derive(Debug, Clone)]
pub struct Ask {
    /// The provider's own name for the model (after the config's mapping).
    pub model: String,
    pub turns: Vec<ChatTurn>,
    pub max_tokens: u32,
    /// 0 is greedy.
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// An adapter the provider serves, by name.
    pub adapter: Option<String>,
    /// Where to load `adapter` from when the provider has not loaded it (an account's upload;
    /// the name is then its content digest, so each version is its own).
    pub adapter_file: Option<std::path::PathBuf>,
    /// BYOK: the user's key for this one call. Never stored, never logged.
    pub key: Option<ApiKey>,
    /// Tools, a response format, penalties, `top_k` (the default asks for none).
    pub shape: AnswerShape,
}

/// A provider key. Its `Debug` never shows it, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(key.into())
    }

    /// The key itself, for the one header that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(…)")
    }
}

/// What a generation sends, in order: `Text`* then exactly one of `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next piece of the answer (never empty).
    Text(String),
    /// The answer's tokens with their log-probabilities (at most once, before `Done`; only
    /// when the ask's shape asked for them).
    Logprobs(Vec<synesis_proto::message::TokenLogprob>),
    /// The end. `usage` is the provider's own count (its tokenizer, or the upstream's `usage`);
    /// `None` when the upstream gave none, and the handler counts instead.
    Done {
        finish_reason: FinishReason,
        usage: Option<ProviderUsage>,
    },
    /// The generation failed; whatever `Text` came before it stands.
    Failed(ProviderError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Why a provider could not answer (or stopped answering).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Busy, unreachable, a 5xx or 429: may work if tried again, after `retry_after_ms` when
    /// the upstream said.
    #[error("the provider is unavailable: {why}")]
    Unavailable {
        why: String,
        retry_after_ms: Option<u64>,
    },
    /// The upstream refused this request (a 4xx other than 429: a bad key, a bad parameter).
    /// Trying again unchanged will not help.
    #[error("the provider refused the request: {0}")]
    Refused(String),
    /// No byte, or no event, within the configured time.
    #[error("the provider timed out: {0}")]
    TimedOut(String),
    /// The upstream broke its protocol (a malformed event, a stream that ended without its end).
    #[error("the provider failed: {0}")]
    Failed(String),
}

impl ProviderError {
    /// The failure's kind, in a word (`/metrics`).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ProviderError::Unavailable { .. } => "unavailable",
            ProviderError::Refused(_) => "refused",
            ProviderError::TimedOut(_) => "timed_out",
            ProviderError::Failed(_) => "failed",
        }
    }

    /// Whether a failure before the first piece of text may be retried.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::Unavailable { .. } | ProviderError::TimedOut(_)
        )
    }
}

/// A running generation: its events, in order. Dropping it (or calling
/// [`Generation::stop`]) stops the provider.
#[derive(Debug)]
pub struct Generation {
    pub events: tokio::sync::mpsc::Receiver<Event>,
    /// A provider that counts its own tokens (llama.cpp in this process) can be stopped
    /// without closing `events`: cancelling this token ends the generation within one token
    /// with `Done { finish_reason: Cancelled, usage }`, its exact count. `None`: closing is
    /// the one way, and the handler counts what came.
    pub halt: Option<synesis_infer::CancelToken>,
}

impl Generation {
    /// A generation with its sending end, for a provider to fill.
    pub fn channel() -> (tokio::sync::mpsc::Sender<Event>, Generation) {
        let (tx, events) = tokio::sync::mpsc::channel(EVENTS_BUFFER);
        (tx, Generation { events, halt: None })
    }

    /// Asks the provider to stop; events already queued can still be read.
    pub fn stop(&mut self) {
        self.events.close();
    }
}

/// Something that answers asks. Implementations are shared by every request for their model.
pub trait Provider: Send + Sync + fmt::Debug {
    /// The most input tokens `ask` can count as, for the hold placed before it runs: exact
    /// when the provider has its tokenizer here, otherwise a bound that is never below the
    /// upstream's count (the settlement charges the actual count, never more than the hold).
    fn input_tokens_bound(&self, ask: &Ask) -> Result<u64, ProviderError>;

    /// Starts answering `ask` (must be called inside the tokio runtime). Refusals that need no
    /// work (a full queue) may come back at once as the generation's only event.
    fn start(&self, ask: Ask) -> Generation;

    /// A device said it will probably escalate here soon: get ready (load the model).
    fn prewarm(&self) {}

    /// The tokens one request's context holds (prompt plus output), when known here: a model
    /// in this process knows it (from its settings, or once loaded); an upstream does not say.
    fn context_tokens(&self) -> Option<u32> {
        None
    }

    /// Whether this provider can serve BYOK asks (an upstream that takes the user's key).
    fn takes_user_keys(&self) -> bool {
        false
    }

    /// Whether `name` is an adapter this provider serves.
    fn has_adapter(&self, name: &str) -> bool {
        let _ = name;
        false
    }

    /// The architecture accounts' uploaded adapters must be for, when this provider can load
    /// them (a model in this process); `None`: it takes no uploads.
    fn adapter_architecture(&self) -> Option<String> {
        None
    }
}

/// A bound on the tokens a text can be for any byte-level tokenizer: at most one token per
/// byte, plus `overhead` per turn for the chat format's own tokens.
pub fn bytes_bound(turns: &[ChatTurn], overhead_per_turn: u64) -> u64 {
    const TEMPLATE_TOKENS: u64 = 16;
    turns.iter().fold(TEMPLATE_TOKENS, |n, t| {
        n.saturating_add(t.content.len() as u64)
            .saturating_add(overhead_per_turn)
    })
}

/// [`bytes_bound`] for an ask to an upstream, its tools and format counted too: one token per
/// byte of their names, descriptions and schemas, and [`TOOLS_OVERHEAD_TOKENS`] for the
/// instructions an upstream adds when tools are given.
pub fn ask_bound(ask: &Ask, overhead_per_turn: u64) -> u64 {
    let shape = &ask.shape;
    let tools = shape.tools.iter().fold(0u64, |n, t| {
        n.saturating_add((t.name.len() + t.description.len() + t.parameters.len()) as u64)
            .saturating_add(overhead_per_turn)
    });
    let format = match &shape.format {
        synesis_proto::message::AnswerFormat::Schema(schema) => schema.len() as u64,
        _ => 0,
    };
    let instructions = if shape.tools.is_empty() {
        0
    } else {
        TOOLS_OVERHEAD_TOKENS
    };
    bytes_bound(&ask.turns, overhead_per_turn)
        .saturating_add(tools)
        .saturating_add(format)
        .saturating_add(instructions)
}

/// What an upstream may add to the prompt when tools are given (Anthropic documents a few
/// hundred tokens of tool-use instructions).
pub const TOOLS_OVERHEAD_TOKENS: u64 = 1_024;

/// The provider a served model's config names.
pub fn build(
    config: &crate::config::ProviderConfig,
) -> anyhow::Result<std::sync::Arc<dyn Provider>> {
    use crate::config::ProviderConfig;
    Ok(match config {
        ProviderConfig::Llama(settings) => {
            std::sync::Arc::new(local::Llama::new(settings.clone())?)
        }
        ProviderConfig::OpenAi(u) => std::sync::Arc::new(
            openai::OpenAi::new(http_settings(u)?)?.with_adapters(u.adapters.clone()),
        ),
        ProviderConfig::Anthropic(u) => {
            std::sync::Arc::new(anthropic::Anthropic::new(http_settings(u)?)?)
        }
    })
}

/// An upstream's settings, its key read from the environment now (at start).
fn http_settings(u: &crate::config::Upstream) -> anyhow::Result<HttpSettings> {
    let api_key = match &u.api_key_env {
        Some(var) => {
            let key = api_key_from_env(var)?;
            if key.is_none() {
                tracing::warn!(var = %var, "the upstream's key variable is not set: only BYOK asks will carry a key");
            }
            key
        }
        None => None,
    };
    Ok(HttpSettings {
        base_url: u.base_url.clone(),
        api_key,
        connect_timeout: u.connect_timeout,
        first_byte_timeout: u.first_byte_timeout,
        idle_timeout: u.idle_timeout,
    })
}
