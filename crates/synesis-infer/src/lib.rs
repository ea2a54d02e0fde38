//! `synesis-infer` — on-device inference with llama.cpp (`llama-cpp-2`).
//!
//! What it owns:
//! - [`Model`]: a GGUF model loaded once (memory-mapped), its LoRA adapters loaded once and
//!   attached per request by name, and [`Model::generate`]: streaming generation with max
//!   tokens, stop strings, temperature, top-p/top-k, seed, the model's chat template, and
//!   cancellation ([`CancelToken`]); each [`Generation`] reports tokens, time to first token,
//!   tokens/s and the mean log-probability (the device's confidence).
//! - [`ComputeBudget`]: the process's compute threads ([`compute_budget`]); every decode step
//!   of every generation takes its threads from it, so generations at once never run more
//!   llama.cpp threads than the machine has cores.
//! - [`GgufMetadata`]: a bounded Rust reader of GGUF headers, so files are checked before
//!   llama.cpp sees them.
//! - `tiny` (feature `tiny`): writes small random llama models and matching LoRA adapters,
//!   so tests and demos need no download.
//!
//! What it must not do: network IO, or any policy about when to escalate (it reports; the
//! caller decides).

mod adapters;
mod compute;
mod engine;
#[cfg(feature = "tiny")]
mod gguf;
mod metadata;
mod stream;
#[cfg(feature = "tiny")]
pub mod tiny;
pub mod tools;

pub use compute::{ComputeBudget, ComputeLease, compute_budget};
pub use engine::{
    CancelToken, ChatMessage, EMBED_TOKENS_MAX, Embeddings, FinishReason, Generation, Grammar,
    InferError, Model, ModelInfo, REPEAT_MAX, Request, SCHEMA_MAX_BYTES, Settings,
    TOP_LOGPROBS_MAX, TokenLogprob, backend,
};
pub use metadata::{GgufMetadata, MetaValue, MetadataError};
