//! Fixtures shared by the benchmarks in `benches/benches/`. Run them all with
//! `cargo bench -p synesis-benches`, or one with `cargo bench -p synesis-benches --bench codec`.

use synesis_proto::message::{EscalationChunk, Heartbeat, UploadChunk};
use synesis_proto::vitals::{CpuVitals, DiskVitals, MemoryVitals, Temperature, Vitals};
use synesis_proto::{Blob, Message, RequestId, UnixMillis};

/// A request id fixed for reproducible sizes.
pub fn request_id() -> RequestId {
    RequestId::from_parts(1_795_000_000_000, [0x5a; 10])
}

/// A heartbeat as an 8-core laptop without an NVIDIA GPU sends it.
pub fn heartbeat() -> Message {
    Heartbeat {
        seq: 1_234,
        sent_at: UnixMillis(1_795_000_000_000),
        vitals: Vitals {
            sampled_at: UnixMillis(1_795_000_000_000),
            cpu: CpuVitals {
                usage_percent: 37.5,
                cores: 8,
                per_core_percent: vec![12.0, 80.5, 33.3, 5.0, 61.2, 7.7, 44.4, 55.5],
                load_average: Some([1.25, 0.98, 0.75]),
            },
            memory: MemoryVitals {
                total_bytes: 16 << 30,
                used_bytes: 9 << 30,
                swap_total_bytes: 2 << 30,
                swap_used_bytes: 1 << 28,
            },
            disk: Some(DiskVitals {
                path: "/home/ada/.local/share/synesis".into(),
                total_bytes: 512 << 30,
                available_bytes: 201 << 30,
            }),
            temperatures: vec![
                Temperature {
                    label: "Package id 0".into(),
                    celsius: 61.0,
                },
                Temperature {
                    label: "nvme0".into(),
                    celsius: 44.0,
                },
            ],
            gpus: vec![],
            gpu_unavailable_reason: Some("NVML not loadable: libnvidia-ml.so.1 not found".into()),
        },
    }
    .into()
}

/// An escalation chunk carrying `text_bytes` of ASCII text.
pub fn escalation_chunk(text_bytes: usize) -> Message {
    let text: String = "the quick brown fox jumps over the lazy dog "
        .chars()
        .cycle()
        .take(text_bytes)
        .collect();
    EscalationChunk {
        request_id: request_id(),
        seq: 41,
        text,
    }
    .into()
}

/// An upload chunk of `bytes` pseudo-random bytes (a fixed xorshift stream).
pub fn upload_chunk(bytes: usize) -> Message {
    let mut x: u32 = 0x9e37_79b9;
    let data = (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect();
    UploadChunk {
        upload_id: request_id(),
        index: 3,
        data: Blob(data),
    }
    .into()
}
