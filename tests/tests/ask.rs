//! `synesis model`, `synesis lora` and `synesis ask --local` on a fresh SYNESIS_HOME, with the
//! tiny model the CLI writes itself: llama.cpp loads and runs it for real.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::io::Write;
use std::process::Stdio;

use synesis_e2e::{Device, json_of, run_ok};

fn ask_json(device: &Device, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json", "ask", "--local", "--max-tokens", "16"];
    args.extend_from_slice(extra);
    json_of(device.synesis().args(&args))
}

#[test]
fn a_fresh_home_can_add_the_tiny_model_and_ask_it() {
    let device = Device::new();
    run_ok(device.synesis().args(["model", "add", "--tiny", "demo"]));
    let out = run_ok(device.synesis().args(["ask", "--local", "hello"]));
    assert!(!out.stdout.is_empty(), "an answer on stdout");

    let answer = ask_json(&device, &["hello"]);
    for key in [
        "text",
        "model",
        "lora",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "tokens_per_second",
        "mean_logprob",
        "finish_reason",
    ] {
        assert!(answer.get(key).is_some(), "missing {key}: {answer}");
    }
    assert_eq!(answer["model"], "demo");
    assert!(answer["completion_tokens"].as_u64().unwrap() >= 1);
    assert!(["stop", "length"].contains(&answer["finish_reason"].as_str().unwrap()));
    // Greedy by default: the same question, the same answer.
    assert_eq!(ask_json(&device, &["hello"])["text"], answer["text"]);

    let models = json_of(device.synesis().args(["--json", "model", "list"]));
    assert_eq!(models[0]["name"], "demo");
    assert_eq!(models[0]["default"], true);
    assert_eq!(models[0]["sha256"].as_str().unwrap().len(), 64);
}

#[test]
fn a_tiny_adapter_changes_the_answer_and_the_prompt_can_come_from_stdin() {
    let device = Device::new();
    run_ok(device.synesis().args(["model", "add", "--tiny", "demo"]));
    run_ok(
        device
            .synesis()
            .args(["lora", "add", "--tiny", "--name", "style", "--base", "demo"]),
    );
    let base = ask_json(&device, &["the cloud"]);
    let adapted = ask_json(&device, &["--lora", "style", "the cloud"]);
    assert_ne!(base["text"], adapted["text"]);
    assert_eq!(adapted["lora"], "style");
    assert_eq!(
        ask_json(&device, &["--lora", "style:0", "the cloud"])["text"],
        base["text"],
        "scale 0 is the base model"
    );

    let mut child = device
        .synesis()
        .args(["--json", "ask", "--local", "--max-tokens", "16", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"the cloud").unwrap();
    let out = child.wait_with_output().unwrap();
    let from_stdin: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(from_stdin["text"], base["text"]);
}

#[test]
fn mistakes_get_clear_messages() {
    let device = Device::new();
    let missing = device
        .synesis()
        .args(["ask", "--local", "--model", "nope", "hi"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no model named"));

    let not_gguf = device.home().join("notes.txt");
    std::fs::write(&not_gguf, "not a model").unwrap();
    let out = device
        .synesis()
        .args(["model", "add"])
        .arg(&not_gguf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a GGUF file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No model at all and no cloud: one line says what to do, and nothing is written.
    for args in [&["ask", "--local", "hi"][..], &["ask", "hi"][..]] {
        let first = device.synesis().args(args).output().unwrap();
        assert_eq!(first.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&first.stderr);
        assert!(
            stderr.contains("no model on this device")
                && stderr.contains("synesis model pull gemma3:270m")
                && stderr.lines().count() == 1,
            "{stderr}"
        );
    }
    assert!(!device.home().join("data/models").exists());
    run_ok(device.synesis().args(["model", "add", "--tiny", "demo"]));
    let model_as_lora = device.home().join("data/models/demo.gguf");
    let out = device
        .synesis()
        .args(["lora", "add", "--name", "x"])
        .arg(&model_as_lora)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an adapter"));

    let out = device
        .synesis()
        .args(["ask", "--local", "--lora", "missing", "hi"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no adapter named"));
    // Without --local the local-first policy decides: not enrolled, so this device answers.
    let out = device
        .synesis()
        .args(["ask", "--explain", "--max-tokens", "4", "hi"])
        .env("SYNESIS_STRESS_CPU_PERCENT", "100")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("answering on this device: not enrolled with a cloud"),
        "{stderr}"
    );
}
