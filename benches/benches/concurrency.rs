//! Answers at once on one machine (issue 23, item 14): N = 1, 2, 4 answers started together,
//! against the **anchor**, the same N answers one after another, in the same run. Goal: at once
//! takes no longer than one after another (≤ 1.0 ×, ≤ 1.2 × on a loaded machine); before the
//! process's compute budget (`synesis_infer::compute_budget`), two at once on two cores took
//! 30 × one.
//!
//! - `concurrency/cloud/*`: the cloud's in-process llama.cpp provider (`sequences` = 4,
//!   `threads` = 2, the cloud's default threads), answers through `Provider::start`.
//! - `concurrency/device/*`: the device's model host as it runs a local answer: one shared
//!   `Model` loaded with the default settings (threads = cores), each answer on its own thread.
//! - `concurrency/device_http/*`: the same through `synesis serve` over HTTP, when the release
//!   binary is built (`cargo build --release -p synesis-cli`); skipped, saying so, otherwise.
//!
//! Run: `cargo bench -p synesis-benches --bench concurrency`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use synesis_cloud::provider::local::{Llama, LocalSettings};
use synesis_cloud::provider::{Ask, Event, Provider};
use synesis_infer::tiny::{TinySpec, write_model};
use synesis_infer::{CancelToken, Model, Request, Settings};
use synesis_proto::message::{ChatRole, ChatTurn};

/// A token is a few ms of real work; written and loaded at once.
const SPEC: TinySpec = TinySpec {
    n_embd: 128,
    n_layer: 2,
    n_head: 4,
    n_ff: 352,
    n_ctx: 256,
    seed: 3,
};
const TOKENS: u32 = 32;
const PROMPT: &str = "the synesis cloud and the device model say hello world";

/// `n` calls of `answer`, all at once or one after another: the wall time until the last ends.
fn answers(n: usize, together: bool, answer: &(dyn Fn() + Sync)) -> Duration {
    if !together {
        let started = Instant::now();
        (0..n).for_each(|_| answer());
        return started.elapsed();
    }
    let start = Barrier::new(n + 1);
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    answer();
                })
            })
            .collect();
        start.wait();
        let started = Instant::now();
        runs.into_iter().for_each(|r| r.join().unwrap());
        started.elapsed()
    })
}

fn group(c: &mut Criterion, path: &str, answer: &(dyn Fn() + Sync)) {
    answer(); // warm
    let mut group = c.benchmark_group(format!("concurrency/{path}"));
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    for n in [1usize, 2, 4] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("at_once", n), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| answers(n, true, answer)).sum())
        });
        if n > 1 {
            group.bench_function(BenchmarkId::new("one_after_another", n), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| answers(n, false, answer)).sum())
            });
        }
    }
    group.finish();
}

fn cloud(c: &mut Criterion, model: &Path) {
    let llama = Llama::new(LocalSettings {
        path: model.to_owned(),
        sequences: 4,
        queue: 16,
        adapters: Default::default(),
        n_ctx: 0,
        threads: 2,
        adapters_loaded: 8,
        pause_while: None,
    })
    .unwrap();
    let answer = || {
        let mut generation = llama.start(Ask {
            model: "bench".into(),
            turns: vec![ChatTurn {
                role: ChatRole::User,
                content: PROMPT.into(),
            }],
            max_tokens: TOKENS,
            temperature: 0.0,
            top_p: None,
            seed: None,
            stop: vec![],
            adapter: None,
            adapter_file: None,
            key: None,
            shape: Default::default(),
        });
        loop {
            match generation.events.blocking_recv() {
                Some(Event::Text(_)) => {}
                Some(Event::Done { .. }) => return,
                other => panic!("{other:?}"),
            }
        }
    };
    group(c, "cloud", &answer);
}

fn device(c: &mut Criterion, model: &Path) {
    let model = Model::load(model, Settings::default()).unwrap();
    let request = Request {
        max_tokens: TOKENS,
        ..Request::new(PROMPT)
    };
    let answer = || {
        model
            .generate(&request, &CancelToken::default(), &mut |p| {
                std::hint::black_box(p);
            })
            .unwrap();
    };
    group(c, "device", &answer);
}

/// `target/release/synesis`, beside this bench's `deps/` directory, when it is built.
fn synesis_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("synesis");
    path.is_file().then_some(path)
}

struct Serving(Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn device_http(c: &mut Criterion, model: &Path) {
    let Some(synesis) = synesis_binary() else {
        eprintln!(
            "concurrency/device_http skipped: build the binary first (cargo build --release -p synesis-cli)"
        );
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let command = || {
        let mut cmd = Command::new(&synesis);
        cmd.env("SYNESIS_HOME", home.path());
        cmd
    };
    let added = command()
        .args(["model", "add"])
        .arg(model)
        .args(["--name", "bench"])
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    let mut child = command()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _serving = Serving(child);
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_owned();
    let body = serde_json::json!({
        "model": "bench",
        "max_tokens": TOKENS,
        "temperature": 0,
        "messages": [{"role": "user", "content": PROMPT}],
    })
    .to_string();
    let answer = || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    };
    group(c, "device_http", &answer);
}

fn concurrency(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("bench.gguf");
    write_model(&model, SPEC).unwrap();
    eprintln!(
        "compute budget: {} threads",
        synesis_infer::compute_budget().threads()
    );
    cloud(c, &model);
    device(c, &model);
    device_http(c, &model);
}

criterion_group!(benches, concurrency);
criterion_main!(benches);
