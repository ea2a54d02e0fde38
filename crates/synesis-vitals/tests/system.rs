//! The real sampler on this machine, checked against what the kernel says directly.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use synesis_vitals::{SystemSampler, VitalsSource};

fn meminfo_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text.lines().find(|l| l.starts_with("MemTotal:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn online_cpus() -> usize {
    let text = std::fs::read_to_string("/proc/stat").unwrap();
    text.lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count()
}

#[test]
fn a_sample_reports_this_machine() {
    let dir = tempfile::tempdir().unwrap();
    let mut sampler = SystemSampler::new(dir.path().join("not-yet-created")).unwrap();
    let v = sampler.sample();

    assert_eq!(v.memory.total_bytes, meminfo_total_bytes());
    assert!(v.memory.used_bytes > 0 && v.memory.used_bytes <= v.memory.total_bytes);
    assert_eq!(v.cpu.cores as usize, online_cpus());
    assert_eq!(v.cpu.per_core_percent.len(), online_cpus());
    assert!(
        (0.0..=100.0).contains(&v.cpu.usage_percent),
        "{}",
        v.cpu.usage_percent
    );
    assert!(v.cpu.load_average.is_some());
    let disk = v.disk.expect("the data directory's disk");
    assert!(disk.total_bytes > 0 && disk.available_bytes <= disk.total_bytes);
    assert!(v.sampled_at.0 > 1_700_000_000_000);

    // No NVIDIA driver here or on CI: an empty list and the reason, never an error.
    if v.gpus.is_empty() {
        assert!(v.gpu_unavailable_reason.is_some());
    }
}

#[test]
fn cpu_usage_rises_when_every_core_is_busy() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let mut sampler = SystemSampler::new(dir.path()).unwrap();
    sampler.sample();

    let stop = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..online_cpus())
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            })
        })
        .collect();
    std::thread::sleep(synesis_vitals::CPU_READING_INTERVAL_MIN * 2);
    let loaded = sampler.sample().cpu.usage_percent;
    stop.store(true, Ordering::Relaxed);
    spinners.into_iter().for_each(|t| t.join().unwrap());

    // Every core spun by this test: the reading must show most of the machine busy.
    assert!(loaded > 50.0, "CPU usage with every core busy: {loaded} %");
}
