//! What the tunnel adds to an answer: an escalation through the cloud (a device's mutual-TLS
//! QUIC connection on loopback → the escalation handler → hold → the in-process llama.cpp
//! provider → chunks back → settlement with the answer stored) against the **anchor**, the same
//! provider called directly in the same process, on the same tiny model and settings.
//!
//! - `escalation/{tiny,bench}/ttft/*`: time to the first chunk (the tunnel's includes the durable hold).
//! - `escalation/{tiny,bench}/answer/*`: the whole answer (the tunnel's includes the durable settlement);
//!   with `Throughput::Elements` = chunks, criterion reports chunks/s, whose ratio is the
//!   streaming overhead.
//!
//! Run: `cargo bench -p synesis-benches --bench escalation`. The cloud's database lives in the
//! temporary directory: with `TMPDIR=/dev/shm` its two durable commits per request (the hold
//! before the first chunk, the settlement before the end) cost no disk flush, which separates
//! the tunnel's own cost from the disk's. Goals (issue 11): ≤ 0.5 ms p50 added
//! to the first chunk and the whole answer, and chunks/s through the tunnel ≥ 0.97 of the
//! provider alone.
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code

#[allow(dead_code)] // each bench uses part of it
mod common;

use std::time::{Duration, Instant};

use common::{BenchCloud, cloud_with_device, escalate, llama_settings};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use synesis_cloud::config::{EscalationSettings, ProviderConfig, Served, Serving};
use synesis_cloud::provider::local::Llama;
use synesis_cloud::provider::{Ask, Event, Provider};
use synesis_proto::message::{ChatRole, ChatTurn, Tier};

const MAX_TOKENS: u32 = 64;

fn turns() -> Vec<ChatTurn> {
    vec![ChatTurn {
        role: ChatRole::User,
        content: "hello".into(),
    }]
}

/// One answer from the provider alone: (time to the first piece, whole time, pieces).
async fn direct(provider: &Llama, model: &str) -> (Duration, Duration, u64) {
    let started = Instant::now();
    let mut generation = provider.start(Ask {
        model: model.into(),
        turns: turns(),
        max_tokens: MAX_TOKENS,
        temperature: 0.0,
        top_p: None,
        seed: None,
        stop: vec![],
        adapter: None,
        adapter_file: None,
        key: None,
        shape: Default::default(),
    });
    let (mut first, mut pieces) = (None, 0);
    while let Some(event) = generation.events.recv().await {
        match event {
            Event::Text(_) => {
                first.get_or_insert_with(|| started.elapsed());
                pieces += 1;
            }
            Event::Logprobs(_) => {}
            Event::Done { .. } => break,
            Event::Failed(e) => panic!("{e}"),
        }
    }
    (first.unwrap_or_default(), started.elapsed(), pieces)
}

/// One answer through the cloud on `conn`: (time to the first chunk, whole time, chunks).
async fn tunnelled(conn: &quinn::Connection, model: &str) -> (Duration, Duration, u64) {
    escalate(conn, model, None, turns(), MAX_TOKENS).await
}

/// An embedded cloud serving `models` (name, file), an enrolled device, its connection.
async fn cloud(dir: &std::path::Path, models: &[(&str, std::path::PathBuf)]) -> BenchCloud {
    let mut serving = Serving {
        escalation: EscalationSettings::default(),
        ..Serving::default()
    };
    for (name, file) in models {
        serving.models.insert(
            (*name).into(),
            Served {
                provider: ProviderConfig::Llama(llama_settings(file)),
                tiers: vec![Tier::Free, Tier::Managed],
            },
        );
    }
    cloud_with_device(dir, serving).await
}

fn escalation(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    // The tiny model (~10,000 tokens/s: the harshest anchor, where per-chunk cost shows most)
    // and the 26 M-parameter bench model (closer to a real model's pace).
    let models: Vec<(&str, std::path::PathBuf)> = [
        ("tiny", synesis_infer::tiny::TinySpec::TINY),
        ("bench", synesis_infer::tiny::TinySpec::BENCH),
    ]
    .into_iter()
    .map(|(name, spec)| {
        let file = dir.path().join(format!("{name}.gguf"));
        synesis_infer::tiny::write_model(&file, spec).unwrap();
        (name, file)
    })
    .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bench = runtime.block_on(cloud(dir.path(), &models));
    let conn = &bench.conn;
    for (name, file) in &models {
        let provider = Llama::new(llama_settings(file)).unwrap();
        // Warm both (model loads, first contexts) and check they answer alike.
        let (_, _, alone) = runtime.block_on(direct(&provider, name));
        let (_, _, through) = runtime.block_on(tunnelled(conn, name));
        assert_eq!(alone, through, "the same greedy answer both ways");

        let mut ttft = c.benchmark_group(format!("escalation/{name}/ttft"));
        ttft.bench_function("provider", |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| runtime.block_on(direct(&provider, name)).0)
                    .sum()
            });
        });
        ttft.bench_function("tunnel", |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| runtime.block_on(tunnelled(conn, name)).0)
                    .sum()
            });
        });
        ttft.finish();

        let mut answer = c.benchmark_group(format!("escalation/{name}/answer"));
        answer.throughput(Throughput::Elements(alone));
        answer.bench_function("provider", |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| runtime.block_on(direct(&provider, name)).1)
                    .sum()
            });
        });
        answer.bench_function("tunnel", |b| {
            b.iter_custom(|n| {
                (0..n)
                    .map(|_| runtime.block_on(tunnelled(conn, name)).1)
                    .sum()
            });
        });
        answer.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(8));
    targets = escalation
}
criterion_main!(benches);
