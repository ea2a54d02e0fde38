//! The cost of one vitals sample, against its anchor: reading the two kernel files the sample
//! cannot do without (/proc/stat for CPU counters, /proc/meminfo for memory) with plain
//! `std::fs::read_to_string`. The ratio says what sysinfo, the disk, the sensors and NVML add.
//!
//! `heartbeat_sample` is the path a heartbeat takes (heartbeats are at least 200 ms apart, so
//! each re-reads the CPU counters); `back_to_back_sample` is a sample taken sooner, which reuses
//! the last CPU reading — cheaper, and never what a heartbeat pays.
//!
//! `cargo bench -p synesis-benches --bench vitals`
#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark whose fixture fails stops

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use synesis_vitals::{SystemSampler, VitalsSource};

fn vitals(c: &mut Criterion) {
    let dir = std::env::temp_dir();
    let mut sampler = SystemSampler::new(&dir).expect("vitals are readable here");
    sampler.sample(); // the first sample waits for a CPU reading; measure the steady state
    let mut group = c.benchmark_group("vitals_sample");
    group.bench_function("anchor_read_proc_stat_and_meminfo", |b| {
        b.iter(|| {
            let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
            let mem = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
            black_box(stat.len() + mem.len())
        })
    });
    group.bench_function("heartbeat_sample", |b| {
        b.iter(|| black_box(sampler.sample_as_heartbeat()))
    });
    group.bench_function("back_to_back_sample", |b| {
        b.iter(|| black_box(sampler.sample()))
    });
    group.finish();
}

criterion_group!(benches, vitals);
criterion_main!(benches);
