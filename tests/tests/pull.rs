//! `synesis model pull` against a local server that speaks the Hub's download protocol
//! (`synesis_e2e::hub`), reached through `HF_ENDPOINT`: resolve → redirect → Range, the
//! published SHA-256, gated repositories, a connection cut mid-file, the content-addressed store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use synesis_e2e::hub::Hub;
use synesis_e2e::{Device, json_of, run_ok, skip_unless};
use synesis_infer::tiny::{TinySpec, write_lora, write_model};

const REPO: &str = "acme/tiny-GGUF";
const FILE: &str = "tiny-Q4_K_M.gguf";

fn tiny_model_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_model(&path, TinySpec::TINY).unwrap();
    std::fs::read(path).unwrap()
}

fn pull(device: &Device, hub: &Hub, args: &[&str]) -> Command {
    let mut cmd = device.synesis();
    cmd.env("HF_ENDPOINT", &hub.endpoint)
        .args(["--json", "model", "pull"])
        .args(args);
    cmd
}

fn fails(cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn models(device: &Device) -> Vec<serde_json::Value> {
    json_of(device.synesis().args(["--json", "model", "list"]))
        .as_array()
        .unwrap()
        .clone()
}

/// The files in the store, and the partial downloads.
fn store(device: &Device, sub: &str) -> Vec<PathBuf> {
    let dir = device.home().join("data").join("models").join(sub);
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap();
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_cut_download_resumes_where_it_stopped_and_the_same_file_is_stored_once() {
    let hub = Hub::start();
    let bytes = tiny_model_bytes();
    let size = bytes.len() as u64;
    hub.add(REPO, FILE, bytes);
    let device = Device::new();

    // The connection is cut a third of the way in: the command fails and says what to do.
    hub.cut_next_after(size / 3);
    let reference = format!("hf:{REPO}/{FILE}");
    let stderr = fails(&mut pull(&device, &hub, &[&reference]));
    assert!(
        stderr.contains("cut after") && stderr.contains("run the same command again"),
        "{stderr}"
    );
    assert!(models(&device).is_empty());
    assert_eq!(
        store(&device, "partial").len(),
        1,
        "the partial file is kept"
    );

    // The same command again asks for the rest only.
    let before = hub.body_bytes();
    let v = json_of(&mut pull(&device, &hub, &[&reference]));
    let sent = hub.body_bytes() - before;
    assert!(sent < size, "the second pull sent {sent} of {size} bytes");
    assert_eq!(v["pulled"]["resumed_from_bytes"], size - sent, "{v}");
    assert_eq!(v["pulled"]["downloaded_bytes"], sent, "{v}");
    let last = hub.requests().last().cloned().unwrap();
    assert!(last.path.starts_with("/cdn/"), "{last:?}");
    assert_eq!(
        last.range.as_deref(),
        Some(format!("bytes={}-", size - sent).as_str())
    );
    assert_eq!(v["name"], "tiny-Q4_K_M", "{v}");
    assert_eq!(v["default"], true, "{v}");
    let blobs = store(&device, "blobs");
    assert_eq!(blobs.len(), 1);
    assert_eq!(sha256_hex(&blobs[0]), v["sha256"].as_str().unwrap());
    assert!(
        store(&device, "partial").is_empty(),
        "the partial file became the model"
    );

    // The repository form of the same file, under a second name: nothing is downloaded, the
    // store keeps one copy.
    let before = hub.body_bytes();
    let again = json_of(&mut pull(
        &device,
        &hub,
        &[&format!("hf.co/{REPO}:q4_k_m"), "--name", "second"],
    ));
    assert_eq!(
        hub.body_bytes(),
        before,
        "the stored file was not fetched again"
    );
    assert_eq!(again["pulled"]["already_stored"], true, "{again}");
    assert_eq!(again["path"], v["path"], "{again}");
    assert_eq!(store(&device, "blobs").len(), 1);
    assert_eq!(models(&device).len(), 2);

    // The same name again is not an error: it already has this content.
    let same = json_of(&mut pull(&device, &hub, &[&reference]));
    assert_eq!(same["registered"], false, "{same}");

    // The file stays while a name points to it, and goes with the last name.
    run_ok(device.synesis().args(["model", "rm", "tiny-Q4_K_M"]));
    assert_eq!(store(&device, "blobs").len(), 1);
    run_ok(device.synesis().args(["model", "rm", "second"]));
    assert!(store(&device, "blobs").is_empty());
}

#[test]
fn a_corrupted_byte_is_refused_and_nothing_is_kept() {
    let hub = Hub::start();
    hub.add(REPO, FILE, tiny_model_bytes());
    hub.corrupt(REPO, FILE, 4096);
    let device = Device::new();
    let stderr = fails(&mut pull(&device, &hub, &[&format!("{REPO}:Q4_K_M")]));
    assert!(
        stderr.contains("SHA-256") && stderr.contains("damaged"),
        "{stderr}"
    );
    assert!(models(&device).is_empty());
    assert!(store(&device, "blobs").is_empty());
    assert!(store(&device, "partial").is_empty());
}

#[test]
fn a_gated_repository_needs_hf_token_and_the_token_goes_to_the_hub_only() {
    let hub = Hub::start();
    hub.add("acme/gated-GGUF", FILE, tiny_model_bytes());
    hub.gate("acme/gated-GGUF", "hf_test_token");
    let device = Device::new();
    let reference = "acme/gated-GGUF:Q4_K_M";

    let stderr = fails(&mut pull(&device, &hub, &[reference]));
    assert!(
        stderr.contains("gated or private") && stderr.contains("HF_TOKEN"),
        "{stderr}"
    );
    let stderr = fails(pull(&device, &hub, &[reference]).env("HF_TOKEN", "hf_wrong"));
    assert!(stderr.contains("HF_TOKEN was refused"), "{stderr}");
    assert!(models(&device).is_empty());

    let v = json_of(pull(&device, &hub, &[reference]).env("HF_TOKEN", "hf_test_token"));
    assert_eq!(v["name"], "tiny-Q4_K_M", "{v}");
    // The Hub saw the token; the CDN (another origin) never did.
    let asked = hub.requests();
    let with_token: Vec<&str> = asked
        .iter()
        .filter(|r| r.authorization.as_deref() == Some("Bearer hf_test_token"))
        .map(|r| r.path.as_str())
        .collect();
    assert!(
        with_token.iter().any(|p| p.contains("/resolve/")),
        "{asked:?}"
    );
    assert!(
        asked
            .iter()
            .filter(|r| r.path.starts_with("/cdn/"))
            .all(|r| r.authorization.is_none()),
        "{asked:?}"
    );
}

#[test]
fn what_is_not_a_gguf_model_is_refused_saying_why() {
    let hub = Hub::start();
    hub.add(REPO, "page-Q8_0.gguf", b"<html>not a model</html>".to_vec());
    let dir = tempfile::tempdir().unwrap();
    let lora = dir.path().join("a.gguf");
    write_lora(&lora, TinySpec::TINY, 7).unwrap();
    hub.add(REPO, "adapter-Q2_K.gguf", std::fs::read(&lora).unwrap());
    let device = Device::new();

    let stderr = fails(&mut pull(&device, &hub, &[&format!("{REPO}:Q8_0")]));
    assert!(stderr.contains("not a GGUF file"), "{stderr}");
    let stderr = fails(&mut pull(&device, &hub, &[&format!("{REPO}:Q2_K")]));
    assert!(stderr.contains("LoRA adapter"), "{stderr}");
    // A quantisation the repository lacks: the ones it has are named.
    let stderr = fails(&mut pull(&device, &hub, &[&format!("{REPO}:Q5_K_M")]));
    assert!(stderr.contains("Q2_K, Q8_0"), "{stderr}");
    assert!(models(&device).is_empty());
    assert!(store(&device, "blobs").is_empty());
}

/// Gemma 3 270M (`../shared/models/gemma.sh`; CI fetches it with `scripts/fetch-gemma.sh` and
/// names it in `SYNESIS_GEMMA`), pulled through the Hub protocol and answering.
#[test]
fn a_real_model_pulled_through_the_hub_protocol_answers() {
    let path = std::env::var_os("SYNESIS_GEMMA")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/synesis-models/gemma-3-270m-q4_k_m.gguf"))
        })
        .filter(|p| p.exists());
    if skip_unless(path.is_some(), "Gemma 3 270M is not here (SYNESIS_GEMMA)") {
        return;
    }
    let path = path.unwrap();
    let hub = Hub::start();
    hub.add(
        "ggml-org/gemma-3-270m-GGUF",
        "gemma-3-270m-Q4_K_M.gguf",
        std::fs::read(&path).unwrap(),
    );
    let device = Device::new();
    let v = json_of(&mut pull(
        &device,
        &hub,
        &["ggml-org/gemma-3-270m-GGUF", "--name", "gemma"],
    ));
    assert_eq!(v["architecture"], "gemma3", "{v}");
    assert_eq!(v["sha256"], sha256_hex(&path), "{v}");
    let answer = json_of(device.synesis().args([
        "--json",
        "ask",
        "--local",
        "--model",
        "gemma",
        "--max-tokens",
        "8",
        "The capital of France is",
    ]));
    assert_eq!(answer["completion_tokens"], 8, "{answer}");
    assert!(
        !answer["text"].as_str().unwrap().trim().is_empty(),
        "{answer}"
    );
}

/// Ollama's `/api/pull` on `synesis serve`, through the official `ollama` client: progress lines
/// as Ollama sends them, then the model is registered and served by the same service at once;
/// a damaged file is an error line and nothing is kept.
#[test]
fn the_ollama_client_pulls_through_the_service_and_the_model_answers_at_once() {
    if skip_unless(
        synesis_e2e::python_has("ollama"),
        "python3 with the `ollama` package is not installed (pip install ollama)",
    ) {
        return;
    }
    let hub = Hub::start();
    hub.add(REPO, FILE, tiny_model_bytes());
    // The hub damages a blob (by content): the broken one is another model.
    let other = tempfile::tempdir().unwrap();
    let other_path = other.path().join("m.gguf");
    let spec = TinySpec {
        seed: 9,
        ..TinySpec::TINY
    };
    write_model(&other_path, spec).unwrap();
    hub.add(
        "acme/broken-GGUF",
        "broken-Q4_K_M.gguf",
        std::fs::read(&other_path).unwrap(),
    );
    hub.corrupt("acme/broken-GGUF", "broken-Q4_K_M.gguf", 4096);
    let device = Device::new();
    let serving = synesis_e2e::serve(
        &device,
        &["--listen", "127.0.0.1:0"],
        &[("HF_ENDPOINT", hub.endpoint.as_str())],
    )
    .unwrap();
    let script = format!(
        r#"
import ollama
c = ollama.Client(host="http://{addr}")
lines = list(c.pull("{REPO}:Q4_K_M", stream=True))
statuses = [l.status for l in lines]
assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
assert any(l.total and l.completed == l.total for l in lines if l.status == "downloading"), lines
names = [m.model for m in c.list().models]
assert len(names) == 1, names
answer = c.generate(model=names[0], prompt="hello", options={{"num_predict": 4}})
assert answer.done and answer.eval_count > 0, answer
try:
    list(c.pull("acme/broken-GGUF:Q4_K_M", stream=True))
    raise AssertionError("a damaged file was pulled")
except ollama.ResponseError as e:
    assert "SHA-256" in str(e), e
assert len(c.list().models) == 1
print("ok", names[0], statuses[:3])
"#,
        addr = serving.addr
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(models(&device).len(), 1);
    assert!(store(&device, "partial").is_empty());
}
