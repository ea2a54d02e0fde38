//! `synesis vitals` as a person (or a script) runs it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use synesis_e2e::{Device, json_of};

const KEYS: [&str; 7] = [
    "sampled_at",
    "cpu",
    "memory",
    "disk",
    "temperatures",
    "gpus",
    "gpu_unavailable_reason",
];

#[test]
fn json_has_the_documented_shape() {
    let device = Device::new();
    let v = json_of(device.synesis().args(["vitals", "--json"]));
    for key in KEYS {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    for key in ["usage_percent", "cores", "per_core_percent", "load_average"] {
        assert!(v["cpu"].get(key).is_some(), "missing cpu.{key}: {v}");
    }
    for key in [
        "total_bytes",
        "used_bytes",
        "swap_total_bytes",
        "swap_used_bytes",
    ] {
        assert!(v["memory"][key].is_u64(), "memory.{key}: {v}");
    }
    assert!(v["sampled_at"].as_str().unwrap().ends_with('Z'));
    assert!(v["cpu"]["cores"].as_u64().unwrap() >= 1);
    // The disk is the one holding this device's data directory.
    assert!(
        v["disk"]["path"]
            .as_str()
            .unwrap()
            .starts_with(device.home().to_str().unwrap())
    );
    if v["gpus"].as_array().unwrap().is_empty() {
        assert!(v["gpu_unavailable_reason"].is_string(), "{v}");
    }
}

#[test]
fn watch_prints_a_line_per_interval_and_stops_cleanly_on_sigint() {
    let device = Device::new();
    let mut child = device
        .synesis()
        .args(["vitals", "--watch", "--json", "--interval", "200ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..3 {
        let line = lines.next().expect("a line per interval").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(KEYS.iter().all(|k| v.get(k).is_some()), "{line}");
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());

    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running 10 s after SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "exit after SIGINT: {status}");
    // Whatever was printed after the signal is still whole lines of JSON.
    for line in lines {
        serde_json::from_str::<serde_json::Value>(&line.unwrap()).unwrap();
    }
}

#[test]
fn a_too_short_interval_is_a_usage_error() {
    let device = Device::new();
    let out = device
        .synesis()
        .args(["vitals", "--watch", "--interval", "10ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 200ms"));
}
