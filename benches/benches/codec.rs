//! The wire codec (bincode frames) against two anchors, for three messages that dominate
//! traffic (a heartbeat, a 256-byte escalation chunk and a 1 MiB upload chunk):
//!
//! - `json`: the same messages through serde_json as our types derive it (the format the
//!   original design used): byte blobs become arrays of decimal numbers and times formatted
//!   text, which flatters the frame on big payloads;
//! - `json_fair`: what a JSON protocol designed for this traffic would send: blobs in base64,
//!   times as integer milliseconds (typed mirrors of the three messages; decoding includes the
//!   base64 decode a receiver needs).
//!
//! `cargo bench -p synesis-benches --bench codec` prints the encoded sizes first, then the
//! criterion timings; the ratios are read from the two lines of each pair.

// A benchmark whose fixture fails should stop at once.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;

use base64::Engine as _;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use synesis_benches::{escalation_chunk, heartbeat, upload_chunk};
use synesis_proto::vitals::{CpuVitals, DiskVitals, GpuVitals, MemoryVitals, Temperature};
use synesis_proto::{Decoded, FrameLimits, Message, RequestId, decode_frame, encode_frame};

/// The three messages as a JSON protocol designed for them would carry them.
// Externally tagged (`{"heartbeat": {…}}`), as `Message` is: an internally tagged enum makes
// serde_json buffer every message before it can decode it, which would handicap the anchor.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Fair {
    Heartbeat {
        seq: u64,
        sent_at_ms: i64,
        vitals: FairVitals,
    },
    EscalationChunk {
        request_id: RequestId,
        seq: u32,
        text: String,
    },
    UploadChunk {
        upload_id: RequestId,
        index: u32,
        data: Base64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct FairVitals {
    sampled_at_ms: i64,
    cpu: CpuVitals,
    memory: MemoryVitals,
    disk: Option<DiskVitals>,
    temperatures: Vec<Temperature>,
    gpus: Vec<GpuVitals>,
    gpu_unavailable_reason: Option<String>,
}

/// Bytes as a base64 string.
#[derive(Debug)]
struct Base64(Vec<u8>);

impl Serialize for Base64 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Base64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Base64, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(Base64)
            .map_err(serde::de::Error::custom)
    }
}

fn fair(m: &Message) -> Fair {
    match m {
        Message::Heartbeat(h) => Fair::Heartbeat {
            seq: h.seq,
            sent_at_ms: h.sent_at.0,
            vitals: FairVitals {
                sampled_at_ms: h.vitals.sampled_at.0,
                cpu: h.vitals.cpu.clone(),
                memory: h.vitals.memory.clone(),
                disk: h.vitals.disk.clone(),
                temperatures: h.vitals.temperatures.clone(),
                gpus: h.vitals.gpus.clone(),
                gpu_unavailable_reason: h.vitals.gpu_unavailable_reason.clone(),
            },
        },
        Message::EscalationChunk(c) => Fair::EscalationChunk {
            request_id: c.request_id,
            seq: c.seq,
            text: c.text.clone(),
        },
        Message::UploadChunk(u) => Fair::UploadChunk {
            upload_id: u.upload_id,
            index: u.index,
            data: Base64(u.data.0.clone()),
        },
        other => panic!("no fair JSON for {other:?}"),
    }
}

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
        "{:<24} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "message", "frame B", "json B", "fair B", "json/fr", "fair/fr"
    );
    for (name, m) in cases() {
        let f = frame(&m).len();
        let j = serde_json::to_vec(&m).expect("fixture serialises").len();
        let fair = serde_json::to_vec(&fair(&m))
            .expect("fixture serialises")
            .len();
        eprintln!(
            "{name:<24} {f:>10} {j:>10} {fair:>10} {:>8.2} {:>8.2}",
            j as f64 / f as f64,
            fair as f64 / f as f64
        );
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
        let fair_message = fair(&m);
        let fair_json = serde_json::to_vec(&fair_message).expect("fixture serialises");
        group.bench_function(BenchmarkId::new("encode", "json_fair"), |b| {
            let mut out = Vec::with_capacity(fair_json.len());
            b.iter(|| {
                out.clear();
                serde_json::to_writer(&mut out, black_box(&fair_message)).expect("serialises");
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
        group.bench_function(BenchmarkId::new("decode", "json_fair"), |b| {
            b.iter(|| serde_json::from_slice::<Fair>(black_box(&fair_json)).expect("parses"))
        });
        group.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
