//! What a newcomer meets, end to end against a real cloud (the tiny GGUF model through its
//! in-process llama.cpp provider, over QUIC on loopback) and the real `synesis` binary: the
//! cloud's own default model (no `--model` needed), `synesis cloud models`, the account's
//! standing known to the local-first policy from the service, one decision path for
//! `synesis ask` and the HTTP API (`model: "auto"` falls back here when the cloud refuses), a
//! request made while the tunnel reconnects, and `/v1/models` listing what this account can use.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use synesis_e2e::{Cloud, Device, json_of, run_ok, signal, wait_for};

const PROMPT: &str = "hello";

/// A cloud serving the tiny model under each name in `names` (with `extra` at the top of its
/// `cloud.toml`), the account `acme` of `tier` with `credit` dollars, and a device enrolled in
/// it; the device has the same model registered as `tiny` when `local_model`.
struct Setup {
    cloud: Cloud,
    device: Device,
    files: tempfile::TempDir,
}

fn setup(
    names: &[&str],
    extra: &str,
    tier: &str,
    credit: Option<&str>,
    local_model: bool,
) -> Setup {
    let device = Device::new();
    let files = tempfile::tempdir().unwrap();
    let model = files.path().join("tiny.gguf");
    synesis_infer::tiny::write_model(&model, synesis_infer::tiny::TinySpec::TINY).unwrap();
    if local_model {
        run_ok(
            device
                .synesis()
                .args(["model", "add"])
                .arg(&model)
                .args(["--name", "tiny"]),
        );
    }
    let mut toml = format!("{extra}\n");
    for name in names {
        toml.push_str(&format!(
            "[prices.{name}]\ninput_usd_per_mtok = \"1.00\"\noutput_usd_per_mtok = \"2.00\"\n\
             [models.{name}]\nprovider = \"llama\"\npath = {:?}\nthreads = 1\ncontext = 256\n",
            model.display().to_string()
        ));
    }
    let file = files.path().join("cloud.toml");
    std::fs::write(&file, toml).unwrap();
    let cloud = Cloud::start_with(&["--config", file.to_str().unwrap()]);
    run_ok(
        cloud
            .admin()
            .args(["account", "create", "acme", "--tier", tier]),
    );
    device.login(&cloud.token("acme", "1h"));
    if let Some(dollars) = credit {
        cloud.top_up(&device, dollars);
    }
    Setup {
        cloud,
        device,
        files,
    }
}

/// Appends `text` to the device's `config.toml`.
fn configure(device: &Device, text: &str) {
    let file = device.home().join("config").join("config.toml");
    let mut current = std::fs::read_to_string(&file).unwrap_or_default();
    current.push_str(text);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, current).unwrap();
}

/// The facts the service keeps about the account (`$RUNTIME/cloud.json`).
fn facts_file(device: &Device) -> PathBuf {
    device.home().join("run").join("cloud.json")
}

/// `synesis serve` (the service and its HTTP API), stopped with SIGTERM when dropped.
struct Serving {
    child: Child,
    addr: String,
    /// The device's API key (an enrolled device's API answers only with it).
    key: String,
}

impl Drop for Serving {
    fn drop(&mut self) {
        signal(self.child.id(), "TERM");
        let _ = self.child.wait();
    }
}

fn serve(device: &Device, env: &[(&str, &str)]) -> Serving {
    let mut child = device
        .synesis()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--heartbeat-interval",
            "1s",
        ])
        // The machine running the tests is busy: its load must not decide these routes.
        .env("SYNESIS_STRESS_CPU_PERCENT", "100")
        .env("SYNESIS_STRESS_MEMORY_PERCENT", "100")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let key = std::fs::read_to_string(device.home().join("config").join("api-key"))
        .expect("the service made the device's API key")
        .trim()
        .to_owned();
    Serving { child, addr, key }
}

/// A response: status, headers (names lowercased), body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn http(api: &Serving, method: &str, path: &str, body: &str) -> Response {
    let (addr, key) = (&api.addr, &api.key);
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn chat(api: &Serving, model: &str) -> Response {
    let body = serde_json::json!({
        "model": model,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": PROMPT}],
    });
    http(api, "POST", "/v1/chat/completions", &body.to_string())
}

/// `synesis --json ask --explain …` with `env`: its JSON and stderr.
fn ask(device: &Device, args: &[&str], env: &[(&str, &str)]) -> (serde_json::Value, String) {
    let out = device
        .synesis()
        .args(["--json", "ask", "--explain"])
        .args(args)
        .arg(PROMPT)
        .env("SYNESIS_STRESS_CPU_PERCENT", "100")
        .env("SYNESIS_STRESS_MEMORY_PERCENT", "100")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

/// Waits (30 s at most) for the service's first facts; the assertions that follow say what
/// was missing if they never come.
fn wait_for_file(file: &Path) {
    if !wait_for(Duration::from_secs(30), || file.exists()) {
        eprintln!("{} was never written", file.display());
    }
}

#[test]
fn a_newcomers_cloud_ask_names_no_model_and_gets_the_only_one_served() {
    let s = setup(&["house"], "", "managed", Some("10.00"), false);
    let out = s
        .device
        .synesis()
        .args(["--json", "cloud", "ask", "--max-tokens", "4", PROMPT])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], "house", "{v}");
}

#[test]
fn without_a_model_named_cloud_ask_and_ask_use_the_clouds_default_which_cloud_models_lists() {
    // The operator's default is not the first by name; no model is called `tiny`.
    let s = setup(
        &["alpha", "house"],
        "[escalation]\ndefault_model = \"house\"",
        "managed",
        Some("10.00"),
        false,
    );
    let asked =
        json_of(
            s.device
                .synesis()
                .args(["--json", "cloud", "ask", "--max-tokens", "4", PROMPT]),
        );
    assert_eq!(asked["model"], "house", "{asked}");
    let listed = json_of(s.device.synesis().args(["--json", "cloud", "models"]));
    assert_eq!(listed["default_model"], "house", "{listed}");
    assert_eq!(listed["tier"], "managed");
    let models = listed["models"].as_array().unwrap();
    let names: Vec<&str> = models
        .iter()
        .map(|m| m["model"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "house"], "{listed}");
    let house = &models[1];
    assert_eq!(house["default"], true);
    assert_eq!(house["input_micro_usd_per_mtok"], 1_000_000);
    assert_eq!(house["output_micro_usd_per_mtok"], 2_000_000);
    assert_eq!(house["context_tokens"], 256);

    // `synesis ask` with no local model goes to the cloud, to the same default.
    let (v, _) = ask(&s.device, &["--max-tokens", "4"], &[]);
    assert_eq!(v["model"], "house", "{v}");
    assert_eq!(v["route"]["decision"], "cloud", "{v}");
    // A name given still wins.
    let named = json_of(s.device.synesis().args([
        "--json",
        "cloud",
        "ask",
        "--model",
        "alpha",
        "--max-tokens",
        "4",
        PROMPT,
    ]));
    assert_eq!(named["model"], "alpha", "{named}");
    drop(s.files);
}

#[test]
fn the_policy_knows_the_spent_quota_from_the_service_in_ask_and_over_http_alike() {
    // A Free account whose quota cannot hold this request (57 prompt + 8 tokens > 20).
    let s = setup(
        &["tiny"],
        "[tiers]\nfree_quota_tokens = 20",
        "free",
        None,
        true,
    );
    // A threshold no answer meets: without the standing, the policy would escalate.
    let low = [("SYNESIS_MIN_CONFIDENCE", "-0.01")];
    let api = serve(&s.device, &low);
    wait_for_file(&facts_file(&s.device));

    let (v, stderr) = ask(&s.device, &["--max-tokens", "8"], &low);
    assert_eq!(v["route"]["decision"], "local", "{v}");
    assert_eq!(v["route"]["detail"][0]["reason"], "quota_spent", "{v}");
    assert!(
        stderr.contains("the Free quota has 20 tokens left"),
        "{stderr}"
    );

    let r = chat(&api, "auto");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-synesis-route"), Some("local"), "{}", r.body);
    assert_eq!(r.header("x-synesis-route-reason"), Some("quota_spent"));
    // Nothing was asked of the cloud.
    let usage = json_of(s.device.synesis().args(["--json", "cloud", "usage"]));
    assert_eq!(usage["charges"].as_array().unwrap().len(), 0, "{usage}");
}

#[test]
fn an_auto_request_the_cloud_refuses_is_answered_here_over_http_as_ask_does() {
    let s = setup(&["tiny"], "", "managed", Some("10.00"), true);
    // A cloud model the cloud does not serve: it refuses (UNKNOWN_MODEL) before any output.
    configure(&s.device, "\n[escalation]\ncloud_model = \"nope\"\n");
    let low = [("SYNESIS_MIN_CONFIDENCE", "-0.01")];
    let (v, stderr) = ask(&s.device, &["--max-tokens", "8"], &low);
    assert_eq!(v["completion_tokens"], 8, "answered here: {v}");
    assert!(
        stderr.contains("UNKNOWN_MODEL") && stderr.contains("answering on this device"),
        "{stderr}"
    );

    let api = serve(&s.device, &low);
    // Until the service's tunnel is up, the cloud is unreachable and the request is answered
    // here for that reason, not for the cloud's refusal this test is about.
    assert!(
        wait_for(Duration::from_secs(30), || s.device.state().as_deref()
            == Some("connected")),
        "the service never connected: {}",
        s.device.tunnel_log()
    );
    let r = chat(&api, "auto");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-synesis-route"), Some("local"));
    let why = r.header("x-synesis-fallback").unwrap_or_default();
    assert!(why.contains("UNKNOWN_MODEL"), "x-synesis-fallback: {why:?}");
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 8, "{body}");
    // A request that names the cloud's model keeps the cloud's refusal.
    let r = chat(&api, "cloud/nope");
    assert_eq!(r.status, 404, "{}", r.body);
}

/// A device in a managed account with its service connected (1 s heartbeats), then its cloud
/// killed: the setup, and the running service.
fn connected_then_cloud_killed() -> (Setup, synesis_e2e::Running) {
    let mut s = setup(&["tiny"], "", "managed", Some("10.00"), false);
    let tunnel = s.device.tunnel("1s");
    assert!(wait_for(Duration::from_secs(15), || s
        .device
        .state()
        .as_deref()
        == Some("connected")));
    signal(s.cloud.process.pid(), "KILL");
    let _ = s.cloud.process.wait(Duration::from_secs(5));
    (s, tunnel)
}

/// Runs `synesis --json ARGS PROMPT` while the service's tunnel reconnects (its cloud killed),
/// and brings the cloud back a second later: what the command printed, and the device's
/// tunnel log.
fn asked_while_reconnecting(args: &[&str]) -> (std::process::Output, String) {
    let (mut s, _tunnel) = connected_then_cloud_killed();
    assert!(wait_for(Duration::from_secs(15), || s
        .device
        .state()
        .as_deref()
        != Some("connected")));
    let asking = s
        .device
        .synesis()
        .arg("--json")
        .args(args)
        .args(["--max-tokens", "4", PROMPT])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The cloud comes back while the request waits.
    std::thread::sleep(Duration::from_secs(1));
    s.cloud.restart();
    (asking.wait_with_output().unwrap(), s.device.tunnel_log())
}

#[test]
fn a_cloud_ask_while_the_tunnel_reconnects_waits_for_it_and_says_so() {
    let (out, log) = asked_while_reconnecting(&["cloud", "ask"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{log}");
    assert!(
        stderr.contains("waiting for it to connect"),
        "the wait is shown: {stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], "tiny", "{v}");
}

/// `synesis ask` lets the policy choose: with no model on the device, a tunnel that is
/// reconnecting is a cloud to wait for, as `cloud ask` waits, not one to give up on.
#[test]
fn an_ask_the_policy_sends_to_the_cloud_waits_for_a_reconnecting_tunnel() {
    let (out, log) = asked_while_reconnecting(&["ask"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{log}");
    assert!(
        stderr.contains("waiting for it to connect"),
        "the wait is shown: {stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["route"]["decision"], "cloud", "{v}");
    assert_eq!(v["via"], "service", "{v}");
}

/// A tunnel deep in its backoff (the cloud was away long enough that the next attempt is 12 s
/// or more off) is asked to try sooner by a request that waits for it: the cloud is back, so
/// the request is answered through the service within the wait, not after it on a connection
/// of its own.
#[test]
fn a_request_brings_a_long_reconnect_backoff_forward() {
    let (mut s, _tunnel) = connected_then_cloud_killed();
    // Each attempt at a dead loopback port waits out its 10 s connect timeout, so this takes
    // a minute or so.
    let far = || {
        s.device
            .status()
            .and_then(|v| chrono::DateTime::parse_from_rfc3339(v["next_attempt_at"].as_str()?).ok())
            .is_some_and(|at| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap();
                i128::from(at.timestamp_millis()) > now.as_millis() as i128 + 12_000
            })
    };
    assert!(
        wait_for(Duration::from_secs(150), far),
        "the backoff never reached 12 s: {}",
        s.device.tunnel_log()
    );
    s.cloud.restart();
    let asked = Instant::now();
    let out = s
        .device
        .synesis()
        .args(["--json", "cloud", "ask", "--max-tokens", "4", PROMPT])
        .output()
        .unwrap();
    let took = asked.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", s.device.tunnel_log());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["via"], "service", "{v}");
    // The service's own record: the stream waited, and the tunnel connected within the wait
    // (without the request's nudge it waited out its 10 s and was refused).
    let log = s.device.tunnel_log();
    assert!(log.contains("waits for the tunnel to connect"), "{log}");
    assert!(!log.contains("did not connect in time"), "{log}");
    eprintln!("answered in {took:?} with the next attempt 12 s or more away");
}

#[test]
fn v1_models_lists_what_this_account_can_use_and_tells_a_cloud_model_from_a_local_one() {
    let s = setup(&["house", "tiny"], "", "managed", Some("10.00"), true);
    let api = serve(&s.device, &[]);
    wait_for_file(&facts_file(&s.device));
    let r = http(&api, "GET", "/v1/models", "");
    assert_eq!(r.status, 200, "{}", r.body);
    let listed: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let mut ids: Vec<(String, String)> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["owned_by"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    ids.sort();
    let want: Vec<(String, String)> = [
        ("auto", "synesis"),
        ("cloud/tiny", "synesis-cloud"),
        ("house", "synesis-cloud"),
        ("tiny", "synesis-local"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
    .collect();
    assert_eq!(ids, want, "only models this account can use: {listed}");
    // Each listed name reaches its model.
    let r = chat(&api, "cloud/tiny");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-synesis-route"), Some("cloud"));
    let r = chat(&api, "tiny");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-synesis-route"), Some("local"));
    let r = chat(&api, "house");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-synesis-route"), Some("cloud"));
}
