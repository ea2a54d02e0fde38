//! The wire codec (bincode frames) against its anchor, the same messages as serde_json (the
//! format the original design used), for three messages that dominate traffic:
//! a heartbeat, a 256-byte escalation chunk and a 1 MiB upload chunk.
//!
//! `cargo bench -p synesis-benches --bench codec` prints the encoded sizes first, then the
//! criterion timings; the ratios are read from the two lines of each pair.

// A benchmark whose fixture fails should stop at once.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use synesis_benches::{escalation_chunk, heartbeat, upload_chunk};
use synesis_proto::{Decoded, FrameLimits, Message, decode_frame, encode_frame};

fn cases() -> Vec<(&'static str, Message)> {
    vec![
        ("heartbeat", heartbeat()),
        ("escalation_chunk_256B", escalation_chunk(256)),
        ("upload_chunk_1MiB", upload_chunk(1 << 20)),
    ]
}

fn frame(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(m, FrameLimits::default(), &mut out).expect("fixture encodes");
    out
}

fn print_sizes() {
    eprintln!(
        "{:<24} {:>12} {:>12} {:>8}",
        "message", "frame B", "json B", "json/fr"
    );
    for (name, m) in cases() {
        let f = frame(&m).len();
        let j = serde_json::to_vec(&m).expect("fixture serialises").len();
        eprintln!("{name:<24} {f:>12} {j:>12} {:>8.2}", j as f64 / f as f64);
    }
}

fn codec(c: &mut Criterion) {
    print_sizes();
    for (name, m) in cases() {
        let framed = frame(&m);
        let json = serde_json::to_vec(&m).expect("fixture serialises");
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Bytes(framed.len() as u64));

        group.bench_function(BenchmarkId::new("encode", "frame"), |b| {
            let mut out = Vec::with_capacity(framed.len());
            b.iter(|| {
                out.clear();
                encode_frame(black_box(&m), FrameLimits::default(), &mut out).expect("encodes");
                black_box(out.len())
            })
        });
        group.bench_function(BenchmarkId::new("encode", "json"), |b| {
            let mut out = Vec::with_capacity(json.len());
            b.iter(|| {
                out.clear();
                serde_json::to_writer(&mut out, black_box(&m)).expect("serialises");
                black_box(out.len())
            })
        });
        group.bench_function(BenchmarkId::new("decode", "frame"), |b| {
            b.iter(
                || match decode_frame(black_box(&framed), FrameLimits::default()) {
                    Ok(Decoded::Frame { message, .. }) => message,
                    other => panic!("{other:?}"),
                },
            )
        });
        group.bench_function(BenchmarkId::new("decode", "json"), |b| {
            b.iter(|| serde_json::from_slice::<Message>(black_box(&json)).expect("parses"))
        });
        group.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
