//! Models, generation, adapters: llama.cpp through `llama-cpp-2`.
//!
//! Ownership (THREAD_SAFETY_PATTERNS.md): a loaded [`Model`] is shared (`&self`) by every
//! generation that runs on it; each [`Model::generate`] call makes a context of its own, so
//! generations run in parallel and a KV cache never mixes two requests or two adapters. The two
//! llama.cpp rules hold by construction: contexts are never *created* in parallel (creating one
//! mutates the model; a mutex serialises that step only), and adapters are loaded and freed
//! only while no context reserves its compute graph (`adapters.rs`), so they can come and go
//! while generations run. Generations share the process's cores through one budget
//! (`compute.rs`): each step decodes with the threads it leased, so generations at once take
//! turns on the cores instead of spinning against each other.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::adapters::Adapters;
use crate::compute::{ComputeLease, compute_budget};
use crate::metadata::{GgufMetadata, MetadataError};
use crate::stream::TextStream;

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("{0} does not exist")]
    NotFound(PathBuf),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("{path} is an adapter, not a model")]
    IsAdapter { path: PathBuf },
    #[error("{path} is a model, not an adapter (general.type is not \"adapter\")")]
    NotAdapter { path: PathBuf },
    #[error("the adapter {path} is for the {adapter} architecture, the model is {model}")]
    ArchitectureMismatch {
        path: PathBuf,
        adapter: String,
        model: String,
    },
    #[error("llama.cpp could not load {path} (damaged, truncated, or an unsupported architecture)")]
    Load { path: PathBuf },
    #[error("llama.cpp could not start: {0}")]
    Backend(String),
    #[error("no adapter named {0:?} is loaded")]
    UnknownAdapter(String),
    #[error(
        "the prompt is {prompt_tokens} tokens; the context holds {context_tokens} (leave room for at least one generated token)"
    )]
    PromptTooLong {
        prompt_tokens: usize,
        context_tokens: u32,
    },
    #[error("llama.cpp failed: {0}")]
    Llama(String),
    #[error("{0}")]
    Grammar(String),
    #[error("cancelled")]
    Cancelled,
    #[error("the prompt is empty (it is no tokens for this model)")]
    EmptyPrompt,
}

/// llama.cpp allows one backend per process: this is it. Code that calls `llama-cpp-2` directly
/// in the same process (a benchmark's bare loop) must use this one too.
pub fn backend() -> Result<&'static LlamaBackend, InferError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            #[cfg(feature = "dynamic-backends")]
            load_cpu_backends();
            let mut backend = LlamaBackend::init().map_err(|e| e.to_string())?;
            // llama.cpp logs every load to stderr; the CLI's own messages say what matters.
            if std::env::var_os("SYNESIS_LLAMA_LOGS").is_none() {
                backend.void_logs();
            }
            Ok(backend)
        })
        .as_ref()
        .map_err(|e| InferError::Backend(e.clone()))
}

/// With `dynamic-backends`, ggml's kernels are loadable modules, one per CPU variant; ggml
/// picks the best the CPU supports. They are looked for in `SYNESIS_GGML_BACKENDS` when set,
/// else in `ggml-backends/` beside the executable (where a package puts them), else where the
/// build wrote them.
#[cfg(feature = "dynamic-backends")]
fn load_cpu_backends() {
    let named = std::env::var_os("SYNESIS_GGML_BACKENDS").map(std::path::PathBuf::from);
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("ggml-backends")));
    match named.or(beside).filter(|dir| dir.is_dir()) {
        Some(dir) => llama_cpp_2::llama_backend::load_backends_from_path(&dir),
        None => llama_cpp_2::llama_backend::load_backends(),
    }
}

/// How contexts are made for a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Context length in tokens; 0 means the model's own.
    pub n_ctx: u32,
    /// CPU threads for generation and for prompt processing, at most the process's compute
    /// budget ([`crate::compute_budget`]), which every generation's steps share.
    pub threads: u32,
    /// The most prompt tokens decoded in one step.
    pub batch: u32,
    /// Layers to offload to a GPU when llama.cpp was built with one (`u32::MAX`: all).
    pub gpu_layers: u32,
    /// Adapters loaded on demand (`Request::lora_file`) kept at once; past it the least
    /// recently used is freed.
    pub adapters_max: usize,
}

impl Default for Settings {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        Settings {
            n_ctx: 0,
            threads: u32::try_from(threads).unwrap_or(4),
            batch: 512,
            gpu_layers: u32::MAX,
            adapters_max: 8,
        }
    }
}

/// What a caller asks of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub prompt: String,
    /// Wrap the prompt in the model's chat template, when it has one.
    pub chat: bool,
    pub max_tokens: u32,
    /// 0 is greedy.
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub seed: u32,
    /// Generation ends before any of these; they are not part of the answer.
    pub stop: Vec<String>,
    /// An adapter by name, and its scale: one loaded with [`Model::load_adapter`], or else
    /// one kept in the model's cache of adapters loaded on demand.
    pub lora: Option<(String, f32)>,
    /// Where to load `lora` from when no adapter of that name is loaded (into the cache).
    pub lora_file: Option<PathBuf>,
    /// Earlier turns of the conversation (a system prompt first, when there is one); `prompt`
    /// is the user's last turn. Empty for a single question.
    pub context: Vec<ChatMessage>,
    /// A grammar the answer must follow (JSON mode, a JSON schema, a tool call).
    pub grammar: Option<Grammar>,
    /// OpenAI's presence penalty: subtracted from the logit of every token already generated.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty: subtracted once per earlier occurrence of the token.
    pub frequency_penalty: f32,
    /// Record each generated token's log-probability, with this many of the likeliest
    /// alternatives (at most [`TOP_LOGPROBS_MAX`]) in [`Generation::tokens`].
    pub logprobs: Option<u8>,
}

/// The most alternatives [`Request::logprobs`] may ask for (OpenAI's limit).
pub const TOP_LOGPROBS_MAX: u8 = 20;

/// A grammar in llama.cpp's GBNF that the generated text must follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grammar {
    pub gbnf: String,
    /// The rule the text as a whole follows.
    pub root: String,
    /// Empty: the grammar holds from the first token. Otherwise the text is free until one of
    /// these words appears, and the grammar holds from that word on (it must match it).
    pub triggers: Vec<String>,
}

impl Grammar {
    /// The grammar of the JSON documents a JSON schema accepts (llama.cpp's converter, the one
    /// its server uses); `{"type": "object"}` is any JSON object.
    ///
    /// Bounded before llama.cpp sees it: a schema of at most [`SCHEMA_MAX_BYTES`] (the
    /// converter's time grows fast with a schema's properties), and a grammar whose every
    /// repetition `{m,n}` has m ≤ n ≤ [`REPEAT_MAX`] (llama.cpp's parser expands a repetition
    /// into rules, and one with m > n into rules without end).
    pub fn json_schema(schema: &str) -> Result<Grammar, InferError> {
        if schema.len() > SCHEMA_MAX_BYTES {
            return Err(InferError::Grammar(format!(
                "the JSON schemas of one request are {} bytes; at most {SCHEMA_MAX_BYTES} are taken",
                schema.len()
            )));
        }
        let gbnf = llama_cpp_2::json_schema_to_grammar(schema)
            .map_err(|e| InferError::Grammar(format!("the JSON schema has no grammar: {e}")))?;
        check_repetitions(&gbnf)?;
        Ok(Grammar {
            gbnf,
            root: "root".into(),
            triggers: Vec::new(),
        })
    }
}

/// The most bytes of JSON schema one request's grammar is made from.
pub const SCHEMA_MAX_BYTES: usize = 16 * 1024;
/// The most times a grammar may repeat one thing (a schema's `maxLength`, `maxItems`).
pub const REPEAT_MAX: u64 = 4_096;

/// Refuses a grammar with a repetition `{m,n}` (or `{m,}`, `{m}`) llama.cpp's parser would
/// expand past [`REPEAT_MAX`] or without end (m > n); quoted text and character classes are
/// skipped.
fn check_repetitions(gbnf: &str) -> Result<(), InferError> {
    let bytes = gbnf.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' | b'[' => {
                let close = if bytes[i] == b'"' { b'"' } else { b']' };
                i += 1;
                while i < bytes.len() && bytes[i] != close {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'{' => {
                let end = gbnf[i..].find('}').map_or(bytes.len(), |e| i + e);
                let inside = &gbnf[i + 1..end];
                let (low, high) = match inside.split_once(',') {
                    Some((low, high)) => (low.trim(), Some(high.trim())),
                    None => (inside.trim(), None),
                };
                let number = |t: &str| t.parse::<u64>().ok();
                let low = number(low).unwrap_or(0);
                let high = match high {
                    Some("") => None,
                    Some(h) => number(h),
                    None => Some(low),
                };
                if low > REPEAT_MAX || high.is_some_and(|h| h > REPEAT_MAX || h < low) {
                    return Err(InferError::Grammar(format!(
                        "the schema asks for a repetition {{{inside}}}: no text satisfies it, or it is over {REPEAT_MAX} (maxLength, maxItems)"
                    )));
                }
                i = end;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// One generated token, and how likely the model found it and its likeliest alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub bytes: Vec<u8>,
    pub logprob: f64,
    /// The likeliest tokens at this place, most likely first.
    pub top: Vec<(Vec<u8>, f64)>,
}

/// One earlier turn: `role` is `system`, `user` or `assistant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl Request {
    pub fn new(prompt: impl Into<String>) -> Request {
        Request {
            prompt: prompt.into(),
            chat: true,
            max_tokens: 128,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            seed: 0,
            stop: Vec::new(),
            lora: None,
            lora_file: None,
            context: Vec::new(),
            grammar: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of generation, or a stop string.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
    Cancelled,
}

/// What one generation produced, with its measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub time_to_first_token: Duration,
    /// Generated tokens per second, after the first.
    pub tokens_per_second: f64,
    /// Mean log-probability of the generated tokens under the model (before sampling
    /// transformations): the device's confidence in its answer. `None` when nothing was generated.
    pub mean_logprob: Option<f64>,
    pub finish_reason: FinishReason,
    /// How long attaching the adapter took, when one was used.
    pub lora_attach: Option<Duration>,
    /// How long loading the adapter took, when this generation loaded it (a cold adapter).
    pub lora_load: Option<Duration>,
    /// Each token of `text`, when [`Request::logprobs`] asked for them: their bytes make up
    /// `text` (a stop string and what came with it are left out).
    pub tokens: Vec<TokenLogprob>,
}

/// Cancels a generation from another thread or task; it stops before its next decode step.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Facts about a loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub architecture: String,
    pub context_length: u32,
    pub n_vocab: i32,
    pub n_params: u64,
    pub size_bytes: u64,
    pub has_chat_template: bool,
}

pub struct Model {
    /// Declared before `model`: every adapter is freed before the model is.
    adapters: Adapters,
    model: LlamaModel,
    path: PathBuf,
    info: ModelInfo,
    settings: Settings,
    /// Held while a context is created (llama.cpp mutates the model doing it).
    creating_context: Mutex<()>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("info", &self.info)
            .field("adapters", &self.adapters.pinned_names())
            .field("cached_adapters", &self.adapters.cached_names())
            .finish()
    }
}

impl Model {
    /// Loads a GGUF model (memory-mapped). The file is checked in Rust first, so a file that is
    /// not a GGUF model gets a clear error rather than reaching llama.cpp.
    pub fn load(path: &Path, settings: Settings) -> Result<Model, InferError> {
        if !path.is_file() {
            return Err(InferError::NotFound(path.to_owned()));
        }
        let meta = GgufMetadata::read(path)?;
        if meta.is_adapter() {
            return Err(InferError::IsAdapter {
                path: path.to_owned(),
            });
        }
        let backend = backend()?;
        let params = LlamaModelParams::default()
            .with_n_gpu_layers(settings.gpu_layers)
            .with_use_mmap(true);
        let model =
            LlamaModel::load_from_file(backend, path, &params).map_err(|_| InferError::Load {
                path: path.to_owned(),
            })?;
        let info = ModelInfo {
            architecture: meta.architecture().unwrap_or("unknown").to_owned(),
            context_length: model.n_ctx_train(),
            n_vocab: model.n_vocab(),
            n_params: model.n_params(),
            size_bytes: model.size(),
            has_chat_template: model.chat_template(None).is_ok(),
        };
        Ok(Model {
            adapters: Adapters::new(settings.adapters_max),
            model,
            path: path.to_owned(),
            info,
            settings,
            creating_context: Mutex::new(()),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads a LoRA adapter under `name`, kept as long as the model; later requests attach it
    /// by name. Returns how long loading took (zero when `name` was already loaded: the first
    /// file stays). Generations may run meanwhile.
    pub fn load_adapter(&self, name: &str, path: &Path) -> Result<Duration, InferError> {
        self.adapters
            .pin(&self.model, &self.info.architecture, name, path)
    }

    /// The adapters loaded with [`Model::load_adapter`], by name.
    pub fn adapters(&self) -> Vec<String> {
        self.adapters.pinned_names()
    }

    /// The adapters loaded on demand and still kept, least recently used first.
    pub fn cached_adapters(&self) -> Vec<String> {
        self.adapters.cached_names()
    }

    /// Drops a cached adapter (a new version will be loaded under the same name on next use);
    /// generations using it finish on it. Whether it was cached.
    pub fn forget_adapter(&self, name: &str) -> bool {
        self.adapters.forget(name)
    }

    /// The prompt as the model sees it: the turns wrapped in its chat template when asked and
    /// present, otherwise their texts one after another (a blank line between them).
    fn prompt_text(&self, request: &Request) -> Result<String, InferError> {
        let plain = || {
            let mut text = String::new();
            for turn in &request.context {
                text.push_str(&turn.content);
                text.push_str("\n\n");
            }
            text.push_str(&request.prompt);
            text
        };
        if !request.chat {
            return Ok(plain());
        }
        let Ok(template) = self.model.chat_template(None) else {
            return Ok(plain());
        };
        let turns = request
            .context
            .iter()
            .map(|t| (t.role.as_str(), t.content.as_str()))
            .chain([("user", request.prompt.as_str())]);
        let mut messages = Vec::with_capacity(request.context.len() + 1);
        for (role, content) in turns {
            messages.push(
                LlamaChatMessage::new(role.into(), content.into())
                    .map_err(|e| InferError::Llama(e.to_string()))?,
            );
        }
        // A template llama.cpp does not know: fall back to the plain prompt.
        Ok(self
            .model
            .apply_chat_template(&template, &messages, true)
            .unwrap_or_else(|_| plain()))
    }

    /// A new context on this model: never two made at once (making one mutates the model).
    fn context(
        &self,
        backend: &LlamaBackend,
        params: LlamaContextParams,
    ) -> Result<llama_cpp_2::context::LlamaContext<'_>, InferError> {
        let _creating = self
            .creating_context
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.model
            .new_context(backend, params)
            .map_err(|e| InferError::Llama(e.to_string()))
    }

    /// How many tokens `request`'s prompt is, as [`Model::generate`] would feed it.
    pub fn prompt_tokens(&self, request: &Request) -> Result<usize, InferError> {
        let prompt = self.prompt_text(request)?;
        Ok(self
            .model
            .vocab()
            .tokenize(prompt.as_bytes(), true, true)
            .len())
    }

    /// Runs one generation, streaming whole UTF-8 text pieces to `on_text` as they are made.
    pub fn generate(
        &self,
        request: &Request,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation, InferError> {
        let backend = backend()?;
        let prompt = self.prompt_text(request)?;
        let vocab = self.model.vocab();
        let tokens = vocab.tokenize(prompt.as_bytes(), true, true);
        if tokens.is_empty() {
            return Err(InferError::EmptyPrompt);
        }
        let n_ctx = if self.settings.n_ctx == 0 {
            self.info.context_length
        } else {
            self.settings.n_ctx
        };
        if tokens.len() >= n_ctx as usize {
            return Err(InferError::PromptTooLong {
                prompt_tokens: tokens.len(),
                context_tokens: n_ctx,
            });
        }

        // Never more than the budget holds, or a step could never get its threads.
        let budget = compute_budget();
        let leased = usize::try_from(self.settings.threads)
            .unwrap_or(usize::MAX)
            .clamp(1, budget.threads());
        let threads = i32::try_from(leased).unwrap_or(1);
        let batch_size = self.settings.batch.max(1);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(batch_size)
            .with_n_ubatch(batch_size)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        // Declared before the context, so the context is dropped first: nothing can use the
        // adapter after it may be freed.
        let adapter = match &request.lora {
            Some((name, _)) => Some(self.adapters.find(
                &self.model,
                &self.info.architecture,
                name,
                request.lora_file.as_deref(),
            )?),
            None => None,
        };
        let lora_load = adapter.as_ref().and_then(|a| a.loaded_in);
        // Held until the prompt is decoded: the context reserves its graph over the model's
        // adapters when it is created and again on the first decode after attaching one.
        let graph = self.adapters.graph();
        let mut ctx = self.context(backend, params)?;

        let lora_attach = match (&adapter, &request.lora) {
            (Some(found), Some((_, scale))) => {
                let started = Instant::now();
                found
                    .adapter
                    .with(|a| ctx.lora_adapter_set(a, *scale))
                    .map_err(|e| InferError::Llama(e.to_string()))?;
                Some(started.elapsed())
            }
            _ => None,
        };

        let started = Instant::now();
        // A step holds the threads it computes with: a decode, and the sampling of the token
        // it gives. Dropped before anything that may wait (`on_text`, a slow client), and
        // before the next step asks again, so others get their turn in between.
        let mut step: Option<ComputeLease<'_>> = None;
        // The prompt, in batches; logits only for its last token.
        let chunk = batch_size as usize;
        let mut batch = LlamaBatch::new(chunk.max(1), 1);
        let last = tokens.len() - 1;
        for (c, piece) in tokens.chunks(chunk).enumerate() {
            if cancel.is_cancelled() {
                return Ok(Generation::cancelled_before_start(
                    tokens.len(),
                    lora_attach,
                    lora_load,
                ));
            }
            batch.clear();
            for (j, &token) in piece.iter().enumerate() {
                let pos = c * chunk + j;
                batch
                    .add(
                        token,
                        i32::try_from(pos).unwrap_or(i32::MAX),
                        &[0],
                        pos == last,
                    )
                    .map_err(|e| InferError::Llama(e.to_string()))?;
            }
            drop(step.take());
            step = Some(budget.acquire(leased));
            ctx.decode(&mut batch)
                .map_err(|e| InferError::Llama(e.to_string()))?;
        }
        drop(graph);

        let mut sampler = sampler(&self.model, request, n_ctx)?;
        let mut text = TextStream::new(&request.stop);
        let mut tokens_out = Vec::new();
        let mut logprob_sum = 0.0f64;
        let mut generated = 0usize;
        let mut first_token_at = None;
        let mut n_past = tokens.len();
        let finish = loop {
            if request.max_tokens == 0 {
                break FinishReason::Length;
            }
            if cancel.is_cancelled() {
                break FinishReason::Cancelled;
            }
            // Sampled within the step that decoded: `step` holds its lease still.
            debug_assert!(step.is_some());
            let index = batch.n_tokens() - 1;
            let token = if request.grammar.is_some() {
                // By hand, so that nothing a grammar does can abort the process: a token only
                // the grammar's rejection left (every candidate was rejected: no text can
                // follow) is never accepted, and an accept llama.cpp throws on (a lazy
                // grammar's trigger replayed into text it rejects) ends the answer.
                let mut candidates = ctx.token_data_array_ith(index);
                sampler.apply(&mut candidates);
                let picked = candidates
                    .selected
                    .and_then(|i| candidates.data.get(i))
                    .filter(|d| d.logit().is_finite())
                    .map(|d| d.id());
                match picked {
                    Some(token) if sampler.try_accept(token).is_ok() => token,
                    _ => break FinishReason::Stop,
                }
            } else {
                // `sample` accepts the token into the chain (the penalties).
                sampler.sample(&ctx, index)
            };
            let logits = ctx.get_logits_ith(index);
            let norm = LogNorm::of(logits);
            logprob_sum += norm.logprob(logits, token);
            if let Some(top) = request.logprobs
                && !vocab.is_eog(token)
            {
                tokens_out.push(TokenLogprob {
                    bytes: vocab.token_to_piece(token, false, None),
                    logprob: norm.logprob(logits, token),
                    top: top_tokens(logits, top.min(TOP_LOGPROBS_MAX))
                        .into_iter()
                        .map(|t| {
                            (
                                vocab.token_to_piece(t, false, None),
                                norm.logprob(logits, t),
                            )
                        })
                        .collect(),
                });
            }
            drop(step.take());
            generated += 1;
            first_token_at.get_or_insert_with(Instant::now);
            if vocab.is_eog(token) {
                break FinishReason::Stop;
            }
            let bytes = vocab.token_to_piece(token, false, None);
            if text.push(&bytes, on_text) {
                break FinishReason::Stop;
            }
            // Checked before decoding: the last token's logits would never be used.
            if generated >= request.max_tokens as usize || n_past + 1 >= n_ctx as usize {
                break FinishReason::Length;
            }
            // Checked again here so that a cancel never costs another decode step.
            if cancel.is_cancelled() {
                break FinishReason::Cancelled;
            }
            batch.clear();
            batch
                .add(token, i32::try_from(n_past).unwrap_or(i32::MAX), &[0], true)
                .map_err(|e| InferError::Llama(e.to_string()))?;
            n_past += 1;
            step = Some(budget.acquire(leased));
            ctx.decode(&mut batch)
                .map_err(|e| InferError::Llama(e.to_string()))?;
        };
        drop(step);
        text.finish(on_text);
        let ended = Instant::now();

        let ttft = first_token_at.map_or(Duration::ZERO, |t| t - started);
        let after_first = first_token_at.map_or(Duration::ZERO, |t| ended - t);
        #[allow(clippy::cast_precision_loss)] // token counts
        let tokens_per_second = if generated > 1 && !after_first.is_zero() {
            (generated - 1) as f64 / after_first.as_secs_f64()
        } else {
            0.0
        };
        #[allow(clippy::cast_precision_loss)]
        let mean_logprob = (generated > 0).then(|| logprob_sum / generated as f64);
        let text = text.into_text();
        // The tokens that make up the text: a stop string's are not part of it.
        let mut kept = 0;
        tokens_out.retain(|t: &TokenLogprob| {
            kept += t.bytes.len();
            kept <= text.len()
        });
        Ok(Generation {
            text,
            prompt_tokens: tokens.len(),
            completion_tokens: generated,
            time_to_first_token: ttft,
            tokens_per_second,
            mean_logprob,
            finish_reason: finish,
            lora_attach,
            lora_load,
            tokens: tokens_out,
        })
    }
}

/// The most tokens one text to embed may be.
pub const EMBED_TOKENS_MAX: u32 = 512;

/// Texts as vectors ([`Model::embed`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// One per text, in order, each of unit length (L2).
    pub vectors: Vec<Vec<f32>>,
    /// The tokens of every text together.
    pub prompt_tokens: usize,
}

impl Model {
    /// Each text as one vector: its tokens' hidden states pooled as the model says
    /// (`{arch}.pooling_type`; mean pooling for a model that says nothing, such as a chat
    /// model), then scaled to unit length. A text must fit the context. `cancel` stops it
    /// between texts.
    pub fn embed(&self, texts: &[String], cancel: &CancelToken) -> Result<Embeddings, InferError> {
        let backend = backend()?;
        let vocab = self.model.vocab();
        let tokenized: Vec<Vec<LlamaToken>> = texts
            .iter()
            .map(|t| vocab.tokenize(t.as_bytes(), true, true))
            .collect();
        // One text is one step, whose output buffers grow with its tokens (times the
        // vocabulary, for a model that also has logits): texts are bounded.
        let n_ctx = self.info.context_length.clamp(1, EMBED_TOKENS_MAX);
        let longest = tokenized.iter().map(Vec::len).max().unwrap_or(0).max(1);
        if longest > n_ctx as usize {
            return Err(InferError::PromptTooLong {
                prompt_tokens: longest,
                context_tokens: n_ctx,
            });
        }
        let pooling = GgufMetadata::read(&self.path)
            .ok()
            .and_then(|m| {
                let arch = m.architecture()?.to_owned();
                m.uint(&format!("{arch}.pooling_type"))
            })
            .and_then(|p| i32::try_from(p).ok())
            .filter(|&p| p > 0)
            .map_or(LlamaPoolingType::Mean, LlamaPoolingType::from);
        // The whole text in one step: pooling needs every token's state at once.
        let size = u32::try_from(longest).unwrap_or(u32::MAX);
        let threads = i32::try_from(self.settings.threads.clamp(1, 64)).unwrap_or(1);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(size))
            .with_n_batch(size)
            .with_n_ubatch(size)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_embeddings(true)
            .with_pooling_type(pooling);
        let mut ctx = self.context(backend, params)?;
        let mut batch = LlamaBatch::new(longest, 1);
        let mut vectors = Vec::with_capacity(texts.len());
        for tokens in &tokenized {
            if cancel.is_cancelled() {
                return Err(InferError::Cancelled);
            }
            ctx.clear_kv_cache();
            batch.clear();
            for (pos, &token) in tokens.iter().enumerate() {
                batch
                    .add(token, i32::try_from(pos).unwrap_or(i32::MAX), &[0], true)
                    .map_err(|e| InferError::Llama(e.to_string()))?;
            }
            if tokens.is_empty() {
                vectors.push(vec![0.0; usize::try_from(self.model.n_embd()).unwrap_or(0)]);
                continue;
            }
            {
                let _step = compute_budget().acquire(usize::try_from(threads).unwrap_or(1));
                ctx.decode(&mut batch)
                    .map_err(|e| InferError::Llama(e.to_string()))?;
            }
            let pooled = ctx
                .embeddings_seq_ith(0)
                .map_err(|e| InferError::Llama(e.to_string()))?;
            let norm = pooled
                .iter()
                .map(|x| f64::from(*x).powi(2))
                .sum::<f64>()
                .sqrt();
            #[allow(clippy::cast_possible_truncation)] // a unit vector's parts
            let scale = if norm > 0.0 { (1.0 / norm) as f32 } else { 0.0 };
            vectors.push(pooled.iter().map(|x| x * scale).collect());
        }
        Ok(Embeddings {
            vectors,
            prompt_tokens: tokenized.iter().map(Vec::len).sum(),
        })
    }
}

impl Generation {
    fn cancelled_before_start(
        prompt_tokens: usize,
        lora_attach: Option<Duration>,
        lora_load: Option<Duration>,
    ) -> Generation {
        Generation {
            text: String::new(),
            prompt_tokens,
            completion_tokens: 0,
            time_to_first_token: Duration::ZERO,
            tokens_per_second: 0.0,
            mean_logprob: None,
            finish_reason: FinishReason::Cancelled,
            lora_attach,
            lora_load,
            tokens: Vec::new(),
        }
    }
}

/// The request's sampling chain: its grammar first (so only tokens it allows are left), the
/// penalties, then greedy or the temperature's draw.
fn sampler(model: &LlamaModel, request: &Request, n_ctx: u32) -> Result<LlamaSampler, InferError> {
    let mut chain = Vec::new();
    if let Some(g) = &request.grammar {
        let grammar = if g.triggers.is_empty() {
            LlamaSampler::grammar(model, &g.gbnf, &g.root)
        } else {
            LlamaSampler::grammar_lazy(model, &g.gbnf, &g.root, &g.triggers, &[])
        };
        chain.push(
            grammar.map_err(|e| InferError::Grammar(format!("the grammar is not valid: {e}")))?,
        );
    }
    if request.presence_penalty != 0.0 || request.frequency_penalty != 0.0 {
        chain.push(LlamaSampler::penalties(
            model.n_vocab(),
            i32::try_from(n_ctx).unwrap_or(i32::MAX),
            1.0,
            request.frequency_penalty,
            request.presence_penalty,
        ));
    }
    if request.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
        return Ok(LlamaSampler::chain_simple(chain));
    }
    if let Some(k) = request.top_k {
        chain.push(LlamaSampler::top_k(k));
    }
    if let Some(p) = request.top_p {
        chain.push(LlamaSampler::top_p(p, 1));
    }
    chain.push(LlamaSampler::temp(request.temperature));
    chain.push(LlamaSampler::dist(request.seed));
    Ok(LlamaSampler::chain_simple(chain))
}

/// The `n` likeliest tokens, most likely first.
fn top_tokens(logits: &[f32], n: u8) -> Vec<LlamaToken> {
    let n = usize::from(n);
    let mut top: Vec<(f32, usize)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return Vec::new();
    }
    for (i, &l) in logits.iter().enumerate() {
        if top.len() == n && top.last().is_some_and(|&(least, _)| l <= least) {
            continue;
        }
        let at = top.partition_point(|&(m, _)| m >= l);
        top.insert(at, (l, i));
        top.truncate(n);
    }
    top.into_iter()
        .map(|(_, i)| LlamaToken(i32::try_from(i).unwrap_or(i32::MAX)))
        .collect()
}

#[cfg(test)]
fn logprob(logits: &[f32], token: LlamaToken) -> f64 {
    LogNorm::of(logits).logprob(logits, token)
}

/// What turns a logit into its log softmax: the largest logit and log Σ exp(l - max).
#[derive(Debug, Clone, Copy)]
struct LogNorm {
    max: f32,
    ln_sum: f64,
}

impl LogNorm {
    /// log softmax(logits)[token] = logits[token] - max - ln_sum.
    fn logprob(self, logits: &[f32], token: LlamaToken) -> f64 {
        match usize::try_from(token.0).ok().and_then(|i| logits.get(i)) {
            Some(&l) => f64::from(l - self.max) - self.ln_sum,
            None => f64::NEG_INFINITY,
        }
    }

    /// Computed stably, to a relative error of about 1e-5.
    ///
    /// It runs once per generated token over the whole vocabulary (262,144 logits for Gemma
    /// 3), so it is written to vectorise: lanes of [`LANES`] for the maximum and the sum, and
    /// [`exp_nonpositive`] in place of the libm `exp` (a scalar call per logit cost Gemma
    /// 1.5 ms a token, more than the decode's own overhead).
    fn of(logits: &[f32]) -> LogNorm {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = logits.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (m, &l) in lanes.iter_mut().zip(chunk) {
                *m = if l > *m { l } else { *m };
            }
        }
        let max = chunks
            .remainder()
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
        // Summed in f32 lanes over blocks short enough to keep their rounding small, the blocks
        // in f64.
        let mut sum = 0.0f64;
        for block in logits.chunks(1024) {
            let mut acc = [0.0f32; LANES];
            let mut chunks = block.chunks_exact(LANES);
            for chunk in &mut chunks {
                for (a, &l) in acc.iter_mut().zip(chunk) {
                    *a += exp_nonpositive(l - max);
                }
            }
            let tail: f32 = chunks
                .remainder()
                .iter()
                .map(|&l| exp_nonpositive(l - max))
                .sum();
            sum += f64::from(acc.iter().sum::<f32>() + tail);
        }
        LogNorm {
            max,
            ln_sum: sum.ln(),
        }
    }
}

/// The lanes [`logprob`] works in (a multiple of every x86 and ARM vector width).
const LANES: usize = 16;

/// e^x for x ≤ 0, to a relative error under 2e-5, in operations that vectorise: 2^(x·log2 e)
/// split into an integer power of two (built in the exponent bits) and 2^f for f in [0, 1)
/// (its Taylor series to degree 6). Under -87, e^x is below f32's normal range and counts as 0.
#[inline(always)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // i in [-126, 0]
fn exp_nonpositive(x: f32) -> f32 {
    if x < -87.0 || x.is_nan() {
        return 0.0;
    }
    let t = x * std::f32::consts::LOG2_E;
    let i = t.floor();
    let f = t - i;
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5
                + f * (0.055_504_11
                    + f * (0.009_618_13 + f * (0.001_333_355 + f * 0.000_154_035)))));
    let scale = f32::from_bits((((i as i32) + 127) as u32) << 23);
    p * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprob_is_a_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let p: f64 = (0..3).map(|i| logprob(&logits, LlamaToken(i)).exp()).sum();
        assert!((p - 1.0).abs() < 1e-4, "{p}");
        assert!(logprob(&logits, LlamaToken(2)) > logprob(&logits, LlamaToken(0)));
        assert_eq!(logprob(&logits, LlamaToken(7)), f64::NEG_INFINITY);
    }

    #[test]
    fn the_fast_exp_is_within_2e_5_of_exp_where_it_matters() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let exact = f64::from(x).exp();
            let fast = f64::from(exp_nonpositive(x));
            assert!(
                (fast - exact).abs() <= 2e-5 * exact,
                "{x}: {fast} vs {exact}"
            );
            x -= 0.013;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn logprob_over_a_large_vocabulary_matches_the_exact_sum() {
        // A vocabulary the size of Gemma's, spread as real logits are, and not a multiple of
        // the lanes.
        let n = 262_147;
        let logits: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 10_007) as f32 / 10_007.0) * 30.0 - 20.0)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        for token in [0, 5, n - 1] {
            let exact = f64::from(logits[token] - max) - sum.ln();
            let fast = logprob(&logits, LlamaToken(i32::try_from(token).unwrap()));
            assert!((fast - exact).abs() < 1e-4, "{token}: {fast} vs {exact}");
        }
    }
}
