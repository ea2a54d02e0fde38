//! On-device generation against its anchor: a bare `llama-cpp-2` decode loop written here, on
//! the same generated ~26M-parameter model, the same prompt, greedy, the same number of tokens,
//! the same context settings. The ratio bare/synesis is the overhead of `synesis-infer`
//! (chat-free prompt, streaming UTF-8, stop-string checks, log-probabilities, cancellation).
//! Goal: ≥ 0.97.
//!
//! `cargo bench -p synesis-benches --bench infer`
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

fn infer(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.gguf");
    write_model(&path, TinySpec::BENCH).expect("write the bench model");
    let settings = Settings {
        n_ctx: N_CTX,
        threads: THREADS,
        batch: BATCH,
        gpu_layers: 0,
        ..Settings::default()
    };
    let mut ours = Model::load(&path, settings).expect("load");
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

criterion_group!(benches, infer);
criterion_main!(benches);
