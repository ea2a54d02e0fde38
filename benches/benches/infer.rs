//! On-device generation against its anchor: a bare `llama-cpp-2` decode loop written here, on
//! the same generated ~26M-parameter model, the same prompt, greedy, the same number of tokens,
//! the same context settings. The ratio bare/synesis is the overhead of `synesis-infer`
//! (chat-free prompt, streaming UTF-8, stop-string checks, log-probabilities, cancellation).
//! Goal: ≥ 0.97.
//!
//! With a real model (`SYNESIS_GEMMA=PATH`, e.g. from `scripts/fetch-gemma.sh`) and
//! llama-cpp-python installed, a second anchor: the peer. The same Gemma file, the same prompt,
//! greedy, 64 tokens, 2 threads, its KV cache reset before each answer as ours is; the ratio
//! llama-cpp-python/synesis is decode speed against the peer (goal: ≥ 1.00 from a plain
//! `cargo build --release`, which `.cargo/config.toml` makes a native build).
//!
//! `cargo bench -p synesis-benches --bench infer`
//! `SYNESIS_GEMMA=$(bash scripts/fetch-gemma.sh) cargo bench -p synesis-benches --bench infer -- gemma`
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap
)] // a benchmark; small numbers

use std::hint::black_box;
use std::num::NonZeroU32;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use synesis_infer::tiny::{TinySpec, write_model};
use synesis_infer::{CancelToken, Model, Request, Settings};

const PROMPT: &str = "the synesis cloud and the device model say hello world";
const THREADS: u32 = 2;
const N_CTX: u32 = 512;
const BATCH: u32 = 512;

/// The anchor: prompt in one batch, then greedy sample-and-decode for `n` tokens.
fn bare(model: &LlamaModel, n: usize) -> usize {
    let backend = synesis_infer::backend().expect("backend");
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(N_CTX))
        .with_n_batch(BATCH)
        .with_n_ubatch(BATCH)
        .with_n_threads(THREADS as i32)
        .with_n_threads_batch(THREADS as i32);
    let mut ctx = model.new_context(backend, params).expect("context");
    let vocab = model.vocab();
    let tokens = vocab.tokenize(PROMPT.as_bytes(), true, true);
    let mut batch = LlamaBatch::new(BATCH as usize, 1);
    for (i, &t) in tokens.iter().enumerate() {
        batch.add(t, i as i32, &[0], i == tokens.len() - 1).unwrap();
    }
    ctx.decode(&mut batch).unwrap();
    let mut sampler = LlamaSampler::greedy();
    let mut pos = tokens.len();
    let mut produced = 0;
    while produced < n {
        let token = sampler.sample(&ctx, batch.n_tokens() - 1);
        sampler.accept(token);
        produced += 1;
        black_box(vocab.token_to_piece(token, false, None));
        if produced == n {
            break;
        }
        batch.clear();
        batch.add(token, pos as i32, &[0], true).unwrap();
        pos += 1;
        ctx.decode(&mut batch).unwrap();
    }
    produced
}

fn synesis(model: &mut Model, n: u32) -> usize {
    let request = Request {
        chat: false,
        max_tokens: n,
        ..Request::new(PROMPT)
    };
    let g = model.generate(&request, &CancelToken::default(), &mut |p| {
        black_box(p);
    });
    g.expect("generation").completion_tokens
}

/// The same context settings as the anchors'.
fn settings() -> Settings {
    Settings {
        n_ctx: N_CTX,
        threads: THREADS,
        batch: BATCH,
        gpu_layers: 0,
        ..Settings::default()
    }
}

fn infer(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.gguf");
    write_model(&path, TinySpec::BENCH).expect("write the bench model");
    let mut ours = Model::load(&path, settings()).expect("load");
    let backend = synesis_infer::backend().expect("backend");
    let theirs = LlamaModel::load_from_file(
        backend,
        Path::new(&path),
        &LlamaModelParams::default().with_n_gpu_layers(0),
    )
    .expect("load bare");

    // Same work on both sides: as many tokens as synesis makes before a possible end-of-text.
    let n = synesis(&mut ours, 32);
    assert_eq!(bare(&theirs, n), n);
    eprintln!(
        "model: {} parameters; generating {n} tokens",
        ours.info().n_params
    );

    let mut group = c.benchmark_group("infer_first_token");
    group.sample_size(20);
    group.bench_function("bare_llama_cpp_2", |b| b.iter(|| bare(&theirs, 1)));
    group.bench_function("synesis_infer", |b| b.iter(|| synesis(&mut ours, 1)));
    group.finish();

    let mut group = c.benchmark_group(format!("infer_{n}_tokens"));
    group.sample_size(10);
    group.bench_function("bare_llama_cpp_2", |b| b.iter(|| bare(&theirs, n)));
    group.bench_function("synesis_infer", |b| b.iter(|| synesis(&mut ours, n as u32)));
    group.finish();
}

/// llama-cpp-python, kept running: each line `N` on its stdin generates N tokens (greedy, the
/// KV cache reset first) and answers with the count.
const PEER: &str = r#"
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]), n_threads_batch=int(sys.argv[2]),
            n_ctx=512, n_batch=512, verbose=False)
prompt = sys.argv[3]
for line in sys.stdin:
    llm.reset()
    out = llm.create_completion(prompt, max_tokens=int(line), temperature=0.0, top_k=1)
    print(out["usage"]["completion_tokens"], flush=True)
"#;

struct Peer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Peer {
    fn start(model: &Path, prompt: &str) -> Option<Peer> {
        use std::process::{Command, Stdio};
        let mut child = Command::new("python3")
            .args(["-c", PEER])
            .arg(model)
            .arg(THREADS.to_string())
            .arg(prompt)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let stdin = child.stdin.take()?;
        let stdout = std::io::BufReader::new(child.stdout.take()?);
        Some(Peer {
            child,
            stdin,
            stdout,
        })
    }

    fn generate(&mut self, n: usize) -> usize {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{n}").expect("the peer reads");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("the peer answers");
        line.trim().parse().expect("the peer's token count")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ours against llama-cpp-python on a real model (see the top of this file).
fn gemma(c: &mut Criterion) {
    const GEMMA_PROMPT: &str = "Here is a short explanation of why the sky is blue:";
    const N: usize = 64;
    let Some(path) = std::env::var_os("SYNESIS_GEMMA") else {
        eprintln!("gemma: skipped (SYNESIS_GEMMA names no model; scripts/fetch-gemma.sh gets it)");
        return;
    };
    let path = std::path::PathBuf::from(path);
    let Some(mut peer) = Peer::start(&path, GEMMA_PROMPT) else {
        eprintln!("gemma: skipped (python3 with llama_cpp cannot start)");
        return;
    };
    let mut ours = Model::load(&path, settings()).expect("load gemma");
    let run_n = |model: &mut Model, n: usize| {
        let request = Request {
            chat: false,
            max_tokens: n as u32,
            ..Request::new(GEMMA_PROMPT)
        };
        model
            .generate(&request, &CancelToken::default(), &mut |p| {
                black_box(p);
            })
            .expect("generation")
            .completion_tokens
    };
    let run = |model: &mut Model| run_n(model, N);
    let (mine, theirs) = (run(&mut ours), peer.generate(N));
    eprintln!("gemma: synesis makes {mine} tokens, llama-cpp-python {theirs}");
    // What each answer costs before its tokens: the prompt, and (ours) a new context.
    let mut group = c.benchmark_group("gemma_first_token");
    group.sample_size(20);
    group.bench_function("llama_cpp_python", |b| b.iter(|| peer.generate(1)));
    group.bench_function("synesis_infer", |b| b.iter(|| run_n(&mut ours, 1)));
    group.finish();
    let mut group = c.benchmark_group(format!("gemma_{N}_tokens"));
    group.sample_size(10);
    group.bench_function("llama_cpp_python", |b| b.iter(|| peer.generate(N)));
    group.bench_function("synesis_infer", |b| b.iter(|| run(&mut ours)));
    group.finish();
}

criterion_group!(benches, infer, gemma);
criterion_main!(benches);
