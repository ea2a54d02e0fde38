//! The in-process provider: llama.cpp (`synesis-infer`) on a GGUF file named in `cloud.toml`.
//!
//! One model load serves every request for the model: [`Model::generate`] takes `&self` and
//! makes a context per generation, so `sequences` worker threads generate in parallel on the
//! one load, their steps taking turns on the process's compute threads
//! ([`synesis_infer::compute_budget`]: never more llama.cpp threads than cores, whatever
//! `sequences` × `threads` is; THREAD_SAFETY_PATTERNS.md §9). Requests beyond them wait in a queue of `queue` places; past that a request is
//! refused at once with `Unavailable` and a `retry_after_ms`, so a burst never grows memory or
//! latency without bound. The model (and its configured adapters) is loaded on first use, or
//! earlier when a device's pre-warm signal names it.
//!
//! Stopping: the handler cancels the generation's `halt` token (then reads the `Done` with the
//! exact count of tokens generated) or closes its receiver; the worker checks before every
//! token (through the cancel token it passes to llama.cpp), so generation stops within one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use synesis_infer::tools::{Tool, ToolChoice};
use synesis_infer::{CancelToken, ChatMessage, InferError, Model, Request, Settings};
use synesis_proto::Blob;
use synesis_proto::message::{
    AnswerFormat, AnswerShape, ChatRole, FinishReason, TokenLogprob, ToolChoice as WireChoice,
    TopLogprob,
};
use tokio::sync::mpsc::Sender;

use super::{Ask, Event, Generation, Provider, ProviderError, ProviderUsage};

/// How long a refused request is told to wait when every place is taken.
const RETRY_AFTER_MS: u64 = 1_000;
/// How often a paused generation (`pause_while`, tests only) looks at its file again.
const PAUSE_POLL: std::time::Duration = std::time::Duration::from_millis(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSettings {
    pub path: PathBuf,
    /// Generations running at once on the one load.
    pub sequences: usize,
    /// Requests that may wait for a sequence.
    pub queue: usize,
    /// Adapters served with the model: name → GGUF adapter file.
    pub adapters: BTreeMap<String, PathBuf>,
    /// Context length per sequence (0: the model's own).
    pub n_ctx: u32,
    /// CPU threads a sequence decodes with (at most the process's compute budget, which all
    /// sequences share step by step).
    pub threads: u32,
    /// Accounts' adapters kept loaded (least recently used out).
    pub adapters_loaded: usize,
    /// For tests: while this file exists, a generation waits after each piece it sends (its
    /// cancel still stops it), so a test holds an answer in the middle on any machine.
    pub pause_while: Option<PathBuf>,
}

/// llama.cpp in this process, for one model file.
#[derive(Debug)]
pub struct Llama {
    shared: Arc<Loaded>,
    jobs: SyncSender<Job>,
}

#[derive(Debug)]
struct Loaded {
    settings: LocalSettings,
    model: OnceLock<Result<Model, String>>,
    /// A pre-warm load is under way (a second signal starts no second thread).
    prewarming: std::sync::atomic::AtomicBool,
}

impl Loaded {
    /// The model, loaded on the first call (later callers wait for that one load).
    fn model(&self) -> Result<&Model, ProviderError> {
        self.model
            .get_or_init(|| {
                let s = &self.settings;
                let settings = Settings {
                    n_ctx: s.n_ctx,
                    threads: s.threads.max(1),
                    adapters_max: s.adapters_loaded,
                    ..Settings::default()
                };
                let started = std::time::Instant::now();
                let model = Model::load(&s.path, settings).map_err(|e| e.to_string())?;
                for (name, path) in &s.adapters {
                    model
                        .load_adapter(name, path)
                        .map_err(|e| format!("adapter {name:?}: {e}"))?;
                }
                tracing::info!(
                    path = %s.path.display(),
                    adapters = s.adapters.len(),
                    ms = started.elapsed().as_millis(),
                    "model loaded"
                );
                Ok(model)
            })
            .as_ref()
            .map_err(|why| ProviderError::Failed(format!("the model cannot be loaded: {why}")))
    }
}

struct Job {
    /// Made into llama.cpp's request by the worker (a grammar is built there, off the
    /// runtime's threads).
    ask: Ask,
    events: Sender<Event>,
    /// The generation's `halt`: cancelled by the handler, or here when `events` closes.
    cancel: CancelToken,
}

impl Llama {
    /// Starts the worker threads; the model itself loads on first use.
    pub fn new(settings: LocalSettings) -> std::io::Result<Llama> {
        let sequences = settings.sequences.max(1);
        let (jobs, queue) = sync_channel(settings.queue);
        let queue = Arc::new(Mutex::new(queue));
        let shared = Arc::new(Loaded {
            settings,
            model: OnceLock::new(),
            prewarming: std::sync::atomic::AtomicBool::new(false),
        });
        for n in 0..sequences {
            let (shared, queue) = (Arc::clone(&shared), Arc::clone(&queue));
            std::thread::Builder::new()
                .name(format!("llama-seq-{n}"))
                .spawn(move || work(&shared, &queue))?;
        }
        Ok(Llama { shared, jobs })
    }

    /// Whether the model is loaded (pre-warm shows up here).
    pub fn is_loaded(&self) -> bool {
        matches!(self.shared.model.get(), Some(Ok(_)))
    }
}

/// One sequence: takes the next job, runs it, and again, until the provider is dropped.
fn work(shared: &Loaded, queue: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue.recv()
        };
        let Ok(job) = job else { return };
        if job.events.is_closed() {
            continue; // the asker left while it waited
        }
        if job.cancel.is_cancelled() {
            // Halted while it waited: nothing generated (the prompt counts as the hold did).
            let _ = job.events.blocking_send(Event::Done {
                finish_reason: FinishReason::Cancelled,
                usage: None,
            });
            continue;
        }
        let last = match shared.model() {
            // A panic in one generation fails that request, not this sequence.
            Ok(model) => {
                let pause = shared.settings.pause_while.as_deref();
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(model, &job, pause)))
                    .unwrap_or_else(|_| {
                        Event::Failed(ProviderError::Failed("the generation panicked".into()))
                    })
            }
            Err(e) => Event::Failed(e),
        };
        let _ = job.events.blocking_send(last);
    }
}

fn run(model: &Model, job: &Job, pause_while: Option<&std::path::Path>) -> Event {
    let cancel = &job.cancel;
    let mut on_text = |piece: &str| {
        if piece.is_empty() {
            return;
        }
        // A closed receiver is the handler saying stop.
        if job
            .events
            .blocking_send(Event::Text(piece.to_owned()))
            .is_err()
        {
            cancel.cancel();
        }
        if let Some(file) = pause_while {
            while file.exists() && !job.events.is_closed() {
                std::thread::sleep(PAUSE_POLL);
            }
        }
    };
    let request = match request(&job.ask) {
        Ok(request) => request,
        Err(e) => return Event::Failed(e),
    };
    match model.generate(&request, cancel, &mut on_text) {
        Ok(g) => {
            if request.logprobs.is_some() {
                let _ = job.events.blocking_send(Event::Logprobs(logprobs(&g)));
            }
            Event::Done {
                finish_reason: match g.finish_reason {
                    synesis_infer::FinishReason::Stop => FinishReason::Stop,
                    synesis_infer::FinishReason::Length => FinishReason::Length,
                    synesis_infer::FinishReason::Cancelled => FinishReason::Cancelled,
                },
                usage: Some(ProviderUsage {
                    input_tokens: g.prompt_tokens as u64,
                    output_tokens: g.completion_tokens as u64,
                }),
            }
        }
        Err(e @ (InferError::PromptTooLong { .. } | InferError::UnknownAdapter(_))) => {
            Event::Failed(ProviderError::Refused(e.to_string()))
        }
        Err(e) => Event::Failed(ProviderError::Failed(e.to_string())),
    }
}

/// A generation's tokens and their log-probabilities, as the protocol carries them.
#[allow(clippy::cast_possible_truncation)] // log-probabilities, to f32
fn logprobs(g: &synesis_infer::Generation) -> Vec<TokenLogprob> {
    g.tokens
        .iter()
        .map(|t| TokenLogprob {
            bytes: Blob(t.bytes.clone()),
            logprob: t.logprob as f32,
            top: t
                .top
                .iter()
                .map(|(bytes, logprob)| TopLogprob {
                    bytes: Blob(bytes.clone()),
                    logprob: *logprob as f32,
                })
                .collect(),
        })
        .collect()
}

/// The ask as llama.cpp's request: earlier turns as context, the last (a user turn) as the
/// prompt.
fn request(ask: &Ask) -> Result<Request, ProviderError> {
    let Some((last, earlier)) = ask.turns.split_last() else {
        return Err(ProviderError::Refused("the conversation is empty".into()));
    };
    if last.role != ChatRole::User {
        return Err(ProviderError::Refused(
            "the last turn must be the user's".into(),
        ));
    }
    let role = |r: ChatRole| match r {
        ChatRole::System => "system",
        ChatRole::User => "user",
        ChatRole::Assistant => "assistant",
    };
    let mut request = Request {
        max_tokens: ask.max_tokens,
        temperature: ask.temperature,
        top_p: ask.top_p,
        // llama.cpp's sampler seed is 32 bits: the low half of the request's.
        seed: ask
            .seed
            .map_or(0, |s| u32::try_from(s & u64::from(u32::MAX)).unwrap_or(0)),
        stop: ask.stop.clone(),
        lora: ask.adapter.clone().map(|name| (name, 1.0)),
        lora_file: ask.adapter_file.clone(),
        context: earlier
            .iter()
            .map(|t| ChatMessage {
                role: role(t.role).into(),
                content: t.content.clone(),
            })
            .collect(),
        presence_penalty: ask.shape.presence_penalty,
        frequency_penalty: ask.shape.frequency_penalty,
        top_k: ask.shape.top_k,
        logprobs: ask
            .shape
            .logprobs
            .map(|n| n.min(synesis_infer::TOP_LOGPROBS_MAX)),
        ..Request::new(last.content.clone())
    };
    shape(&mut request, &ask.shape)?;
    Ok(request)
}

/// The tools and format the ask's shape names, held as the device's own model holds them
/// (`synesis_infer::tools::shape`).
fn shape(request: &mut Request, shape: &AnswerShape) -> Result<(), ProviderError> {
    let mut tools = Vec::with_capacity(shape.tools.len());
    for t in &shape.tools {
        let parameters = if t.parameters.is_empty() {
            None
        } else {
            Some(serde_json::from_str(&t.parameters).map_err(|e| {
                ProviderError::Refused(format!(
                    "the tool {:?}'s parameters are not JSON: {e}",
                    t.name
                ))
            })?)
        };
        tools.push(Tool {
            name: t.name.clone(),
            description: t.description.clone(),
            parameters,
        });
    }
    let choice = match &shape.tool_choice {
        WireChoice::None => None,
        WireChoice::Auto => Some(ToolChoice::Auto),
        WireChoice::Required => Some(ToolChoice::Required),
        WireChoice::Named(name) => Some(ToolChoice::Named(name.clone())),
    };
    let schema = match &shape.format {
        AnswerFormat::Text => None,
        AnswerFormat::Json => Some(r#"{"type":"object"}"#),
        AnswerFormat::Schema(schema) => Some(schema.as_str()),
    };
    synesis_infer::tools::shape(request, &tools, choice.as_ref(), schema)
        .map_err(|e| ProviderError::Refused(e.to_string()))
}

impl Provider for Llama {
    fn context_tokens(&self) -> Option<u32> {
        match self.shared.settings.n_ctx {
            // The model's own, known once it is loaded (asking must not load it).
            0 => match self.shared.model.get() {
                Some(Ok(model)) => Some(model.info().context_length),
                _ => None,
            },
            n => Some(n),
        }
    }

    fn input_tokens_bound(&self, ask: &Ask) -> Result<u64, ProviderError> {
        let request = request(ask)?;
        let model = self.shared.model()?;
        let n = model
            .prompt_tokens(&request)
            .map_err(|e| ProviderError::Failed(e.to_string()))?;
        // Refused here, before any hold: the same check generation makes.
        let context = match self.shared.settings.n_ctx {
            0 => model.info().context_length,
            n => n,
        } as usize;
        if n >= context {
            return Err(ProviderError::Refused(format!(
                "the prompt is {n} tokens; the model's context holds {context}"
            )));
        }
        Ok(n as u64)
    }

    fn start(&self, ask: Ask) -> Generation {
        let (events, mut generation) = Generation::channel();
        let cancel = CancelToken::default();
        generation.halt = Some(cancel.clone());
        let refused = |e: ProviderError| {
            // The channel is new and has room for this one event.
            let _ = events.try_send(Event::Failed(e));
        };
        match request(&Ask {
            // Checked here with no grammar (a refusal needs no work); built in the worker.
            shape: Default::default(),
            ..ask.clone()
        }) {
            Err(e) => refused(e),
            Ok(_) => match self.jobs.try_send(Job {
                ask,
                events: events.clone(),
                cancel,
            }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => refused(ProviderError::Unavailable {
                    why: format!(
                        "all {} sequences are busy and {} requests wait",
                        self.shared.settings.sequences, self.shared.settings.queue
                    ),
                    retry_after_ms: Some(RETRY_AFTER_MS),
                }),
                Err(TrySendError::Disconnected(_)) => {
                    refused(ProviderError::Failed("the model's workers stopped".into()));
                }
            },
        }
        generation
    }

    fn prewarm(&self) {
        if self.shared.model.get().is_some()
            || self
                .shared
                .prewarming
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let shared = Arc::clone(&self.shared);
        // Loading takes seconds for a real model: never on the caller's (async) thread.
        let _ = std::thread::Builder::new()
            .name("llama-prewarm".into())
            .spawn(move || {
                if let Err(e) = shared.model() {
                    tracing::warn!(error = %e, "pre-warm could not load the model");
                }
            });
    }

    fn has_adapter(&self, name: &str) -> bool {
        self.shared.settings.adapters.contains_key(name)
    }

    fn adapter_architecture(&self) -> Option<String> {
        let meta = synesis_infer::GgufMetadata::read(&self.shared.settings.path).ok()?;
        meta.architecture().map(str::to_owned)
    }
}
