//! `synesis demo` (the README's first command): the whole product in one command on the tiny
//! model, every step reported with its figures, nothing left running or behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use synesis_e2e::{Device, json_of};

const STEPS: [&str; 8] = [
    "cloud",
    "device",
    "local answer",
    "escalation",
    "adapter",
    "invitation",
    "usage",
    "shutdown",
];

#[test]
fn the_demo_runs_every_step_and_leaves_nothing_behind() {
    let device = Device::new();
    let tmp = tempfile::tempdir().unwrap();
    let report = json_of(
        device
            .synesis()
            .env("TMPDIR", tmp.path())
            .args(["--json", "demo"]),
    );
    assert_eq!(report["ok"], true, "{report:#}");
    let steps = report["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(names, STEPS, "{report:#}");
    assert!(steps.iter().all(|s| s["ok"] == true), "{report:#}");
    let figures = |step: &str| &steps[STEPS.iter().position(|s| *s == step).unwrap()]["figures"];
    assert_eq!(figures("local answer")["route"], "local");
    assert!(
        figures("local answer")["tokens_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(figures("escalation")["route"], "cloud");
    assert_eq!(figures("escalation")["reason"], "low_confidence");
    assert!(
        figures("escalation")["cost"]["total_micro_usd"]
            .as_i64()
            .unwrap()
            > 0
    );
    assert_eq!(figures("adapter")["push"]["serving"], true);
    assert!(figures("invitation")["tokens_used"].as_u64().unwrap() > 0);
    assert_eq!(figures("usage")["local"]["generations"], 1);
    assert_eq!(figures("usage")["cloud"]["charges"], 2);
    assert_eq!(figures("shutdown")["left_running"], false);
    assert_eq!(figures("shutdown")["removed"], true);
    assert_eq!(
        report["model"]["real"], false,
        "no real model here: the tiny one"
    );
    // Its temporary directory is gone, and this device's own home was not touched.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    assert!(!device.home().join("config").join("config.toml").exists());
}

#[test]
fn a_kept_demo_leaves_its_files_and_says_how_to_go_on() {
    let device = Device::new();
    let keep = tempfile::tempdir().unwrap();
    let dir = keep.path().join("demo");
    let out = device
        .synesis()
        .args(["demo", "--keep"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("every step held"), "{stdout}");
    assert!(
        stdout.contains("synesis-cloud serve --listen 127.0.0.1:"),
        "{stdout}"
    );
    for kept in ["cloud.toml", "cloud", "ada", "carl"] {
        assert!(dir.join(kept).exists(), "{kept}");
    }
    // A directory that is not empty is refused before anything runs.
    let again = device
        .synesis()
        .args(["demo", "--keep"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
}
