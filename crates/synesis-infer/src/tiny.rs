//! Tiny llama-architecture models with seeded random weights and a byte-level SentencePiece
//! vocabulary (any text tokenizes), and matching LoRA adapters. No download: llama.cpp loads and
//! runs them for real, down the same code path a user's 4 GB model takes.

use std::io::{self, BufWriter, Write};
use std::path::Path;

use crate::gguf::{Gguf, Value};

/// The shape of a generated model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TinySpec {
    pub n_embd: u32,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_ff: u32,
    pub n_ctx: u32,
    /// Seeds every weight: the same spec writes the same bytes.
    pub seed: u64,
}

impl TinySpec {
    /// About 0.5 MB: for tests and `synesis model add --tiny`.
    pub const TINY: TinySpec = TinySpec {
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        n_ff: 128,
        n_ctx: 256,
        seed: 1,
    };
    /// About 26 million parameters (100 MB of f32): for benchmarks.
    pub const BENCH: TinySpec = TinySpec {
        n_embd: 512,
        n_layer: 8,
        n_head: 8,
        n_ff: 1408,
        n_ctx: 512,
        seed: 2,
    };
}

/// SentencePiece token types, as llama.cpp reads them.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_BYTE: i32 = 6;

/// The ChatML template; llama.cpp recognises it by its markers.
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then pieces (with every prefix of
/// each word piece, so SentencePiece can merge up to it).
fn vocabulary() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
    let mut types = vec![TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(TOKEN_BYTE);
    }
    let mut pieces: Vec<String> = vec!["\u{2581}".to_owned()];
    pieces.extend(('a'..='z').map(String::from));
    pieces.extend(('a'..='z').map(|c| format!("\u{2581}{c}")));
    for word in [
        "hello", "world", "the", "and", "synesis", "cloud", "device", "model",
    ] {
        for end in 2..=word.len() {
            let piece = format!("\u{2581}{}", &word[..end]);
            if !pieces.contains(&piece) {
                pieces.push(piece);
            }
        }
    }
    let n_fixed = tokens.len();
    tokens.extend(pieces);
    types.resize(tokens.len(), TOKEN_NORMAL);
    #[allow(clippy::cast_precision_loss)] // small indexes
    let scores = (0..tokens.len())
        .map(|i| if i < n_fixed { 0.0 } else { -(i as f32) })
        .collect();
    (tokens, scores, types)
}

/// SplitMix64: deterministic weights from the spec's seed.
struct Weights(u64);

impl Weights {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // 24 random bits to a float in [-1, 1)
        #[allow(clippy::cast_precision_loss)]
        let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
        unit * 2.0 - 1.0
    }

    /// `n` values uniform in ±`scale`.
    fn take(&mut self, n: u64, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn inv_sqrt(n: u32) -> f32 {
    #[allow(clippy::cast_precision_loss)]
    let n = n as f32;
    1.0 / n.sqrt()
}

fn write_file(path: &Path, gguf: &Gguf) -> io::Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    gguf.write(&mut out)?;
    out.flush()
}

/// Writes a llama model of shape `spec` to `path`.
pub fn write_model(path: &Path, spec: TinySpec) -> io::Result<()> {
    write(path, spec, None)
}

/// Writes an embedding model of shape `spec` to `path`: the same llama model, declaring mean
/// pooling (`llama.pooling_type` 1), as sentence-embedding GGUFs declare theirs.
pub fn write_embedding_model(path: &Path, spec: TinySpec) -> io::Result<()> {
    write(path, spec, Some(1))
}

fn write(path: &Path, spec: TinySpec, pooling: Option<u32>) -> io::Result<()> {
    let (tokens, scores, types) = vocabulary();
    let n_vocab = tokens.len() as u64;
    let (e, ff) = (u64::from(spec.n_embd), u64::from(spec.n_ff));
    let mut g = Gguf::default();
    g.set("general.architecture", Value::Str("llama".into()));
    g.set("general.type", Value::Str("model".into()));
    g.set(
        "general.name",
        Value::Str(format!("synesis-tiny-{}x{}", spec.n_layer, spec.n_embd)),
    );
    g.set("llama.context_length", Value::U32(spec.n_ctx));
    if let Some(pooling) = pooling {
        g.set("llama.pooling_type", Value::U32(pooling));
    }
    g.set("llama.embedding_length", Value::U32(spec.n_embd));
    g.set("llama.block_count", Value::U32(spec.n_layer));
    g.set("llama.feed_forward_length", Value::U32(spec.n_ff));
    g.set("llama.attention.head_count", Value::U32(spec.n_head));
    g.set("llama.attention.head_count_kv", Value::U32(spec.n_head));
    g.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    g.set(
        "llama.rope.dimension_count",
        Value::U32(spec.n_embd / spec.n_head),
    );
    g.set("tokenizer.ggml.model", Value::Str("llama".into()));
    g.set("tokenizer.ggml.tokens", Value::Strings(tokens));
    g.set("tokenizer.ggml.scores", Value::F32s(scores));
    g.set("tokenizer.ggml.token_type", Value::I32s(types));
    g.set("tokenizer.ggml.bos_token_id", Value::U32(1));
    g.set("tokenizer.ggml.eos_token_id", Value::U32(2));
    g.set("tokenizer.ggml.unknown_token_id", Value::U32(0));
    g.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    g.set("tokenizer.chat_template", Value::Str(CHAT_TEMPLATE.into()));

    let mut w = Weights(spec.seed);
    let ones = |n: u64| vec![1.0f32; usize::try_from(n).unwrap_or(0)];
    g.tensor("token_embd.weight", &[e, n_vocab], w.take(e * n_vocab, 1.0));
    for i in 0..spec.n_layer {
        let s_in = inv_sqrt(spec.n_embd);
        g.tensor(&format!("blk.{i}.attn_norm.weight"), &[e], ones(e));
        for m in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            g.tensor(&format!("blk.{i}.{m}.weight"), &[e, e], w.take(e * e, s_in));
        }
        g.tensor(&format!("blk.{i}.ffn_norm.weight"), &[e], ones(e));
        g.tensor(
            &format!("blk.{i}.ffn_gate.weight"),
            &[e, ff],
            w.take(e * ff, s_in),
        );
        g.tensor(
            &format!("blk.{i}.ffn_up.weight"),
            &[e, ff],
            w.take(e * ff, s_in),
        );
        g.tensor(
            &format!("blk.{i}.ffn_down.weight"),
            &[ff, e],
            w.take(ff * e, inv_sqrt(spec.n_ff)),
        );
    }
    g.tensor("output_norm.weight", &[e], ones(e));
    g.tensor(
        "output.weight",
        &[e, n_vocab],
        w.take(e * n_vocab, inv_sqrt(spec.n_embd) * 4.0),
    );
    write_file(path, &g)
}

/// Writes a LoRA adapter for a model of shape `spec` (rank 4, on `attn_q` of every layer and on
/// `output`), strong enough that greedy output changes with it.
pub fn write_lora(path: &Path, spec: TinySpec, seed: u64) -> io::Result<()> {
    const RANK: u64 = 4;
    let n_vocab = vocabulary().0.len() as u64;
    let e = u64::from(spec.n_embd);
    let mut g = Gguf::default();
    g.set("general.architecture", Value::Str("llama".into()));
    g.set("general.type", Value::Str("adapter".into()));
    g.set("general.name", Value::Str("synesis-tiny-lora".into()));
    g.set("adapter.type", Value::Str("lora".into()));
    g.set("adapter.lora.alpha", Value::F32(8.0));
    let mut w = Weights(seed);
    for i in 0..spec.n_layer {
        let base = format!("blk.{i}.attn_q.weight");
        g.tensor(&format!("{base}.lora_a"), &[e, RANK], w.take(e * RANK, 0.5));
        g.tensor(&format!("{base}.lora_b"), &[RANK, e], w.take(RANK * e, 0.5));
    }
    g.tensor("output.weight.lora_a", &[e, RANK], w.take(e * RANK, 0.5));
    g.tensor(
        "output.weight.lora_b",
        &[RANK, n_vocab],
        w.take(RANK * n_vocab, 0.5),
    );
    write_file(path, &g)
}
