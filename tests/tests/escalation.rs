//! Escalations end to end, for real: `synesis cloud ask` (and a client speaking the protocol
//! directly) against `synesis-cloud serve` answering with the tiny GGUF model through its
//! in-process llama.cpp provider, over QUIC on loopback; charges read back from the cloud's
//! ledger and the device's local ledger. A test that must act in the middle of an answer (cut,
//! kill, cancel, a limit of running requests, a hold's deadline) asks the scripted upstream
//! (`synesis_e2e::upstream`, model `up`), whose chunks come only as the test releases them:
//! no verdict depends on how fast this machine generates.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::path::Path;
use std::time::Duration;

use synesis_e2e::upstream::{Script, Upstream, paced_text, upstream, upstream_model};
use synesis_e2e::{
    Cloud, Device, Reply, connect, done, exchange, exchange_telling, json_of, run_ok, wait_for,
};
use synesis_proto::message::{EscalationRequest, FinishReason};
use synesis_proto::{ErrorCode, Message, RequestId};
use synesis_tunnel::Identity;

const PROMPT: &str = "hello";

/// A cloud serving the tiny model (written by a device's `model add --tiny`), an account of
/// `tier` with a device enrolled and `credit` dollars on it (none for `None`).
struct Setup {
    cloud: Cloud,
    device: Device,
    _config: tempfile::TempDir,
}

fn setup(tier: &str, credit: Option<&str>, extra_config: &str) -> Setup {
    let device = Device::new();
    let config = tempfile::tempdir().unwrap();
    // The tiny model with a context long enough for long answers.
    let model = config.path().join("tiny-long.gguf");
    let spec = synesis_infer::tiny::TinySpec {
        n_ctx: 4_096,
        ..synesis_infer::tiny::TinySpec::TINY
    };
    synesis_infer::tiny::write_model(&model, spec).unwrap();
    run_ok(
        device
            .synesis()
            .args(["model", "add"])
            .arg(&model)
            .args(["--name", "tiny"]),
    );
    let file = config.path().join("cloud.toml");
    std::fs::write(&file, cloud_toml(&model, extra_config)).unwrap();
    let cloud = Cloud::start_with(&["--config", file.to_str().unwrap()]);
    run_ok(
        cloud
            .admin()
            .args(["account", "create", "acme", "--tier", tier]),
    );
    let token = cloud.token("acme", "1h");
    device.login(&token);
    if let Some(amount) = credit {
        cloud.top_up(&device, amount);
    }
    Setup {
        cloud,
        device,
        _config: config,
    }
}

fn cloud_toml(model: &Path, extra: &str) -> String {
    format!(
        "{extra}\n[prices.tiny]\ninput_usd_per_mtok = \"1.00\"\noutput_usd_per_mtok = \"2.00\"\n\
         [models.tiny]\nprovider = \"llama\"\npath = {:?}\nsequences = 2\nqueue = 64\nthreads = 1\n",
        model.display().to_string()
    )
}

/// The exact Managed charge of the tiny model's prices: (input × 1 + output × 2) µUSD × 1.03,
/// rounded half up.
fn managed_total(input: u64, output: u64) -> i64 {
    let base_pico = u128::from(input) * 1_000_000 + u128::from(output) * 2_000_000;
    let total = (base_pico * 10_300 + 5_000_000_000) / 10_000_000_000;
    i64::try_from(total).unwrap()
}

fn usage(s: &Setup) -> serde_json::Value {
    json_of(s.device.synesis().args(["--json", "cloud", "usage"]))
}

/// Chunks in a paced answer.
const PACED: u32 = 40;

/// A Managed account with $10 whose model `up` is the scripted upstream answering `script`
/// (`Script::Paced` answers wait for the test at every chunk).
async fn paced(script: Vec<Script>, extra_config: &str) -> (Setup, Upstream) {
    let up = upstream(script).await;
    let extra = format!(
        "{extra_config}\n{}",
        upstream_model(up.port, "[\"managed\"]")
    );
    (setup("managed", Some("10.00"), &extra), up)
}

/// Waits (30 s at most) until `condition` holds of the upstream, or panics saying `what`.
fn wait_upstream(s: &Setup, up: &Upstream, what: &str, condition: impl Fn(&Upstream) -> bool) {
    assert!(
        wait_for(Duration::from_secs(30), || condition(up)),
        "{what}: {} requests, {} chunks written\n{}",
        up.requests(),
        up.written(),
        s.cloud.log()
    );
}

/// A finished `synesis --json cloud ask`: its JSON, or a panic with its stderr and `context`.
fn answered(out: &std::process::Output, context: &str) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{context}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"))
}

/// `synesis --json cloud ask --model up --max-tokens PACED PROMPT` in the background.
fn spawn_ask(device: &Device) -> std::process::Child {
    device
        .synesis()
        .args(["--json", "cloud", "ask", "--model", "up", "--max-tokens"])
        .arg(PACED.to_string())
        .arg(PROMPT)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn request(id: RequestId, max_tokens: u32) -> EscalationRequest {
    synesis_e2e::escalation_request(id, "tiny", PROMPT, max_tokens)
}

/// A request to the scripted upstream, `up`.
fn up_request(id: RequestId, max_tokens: u32) -> EscalationRequest {
    synesis_e2e::escalation_request(id, "up", PROMPT, max_tokens)
}

fn refusal(reply: &Reply) -> ErrorCode {
    match &reply.end {
        Some(Message::ErrorMsg(e)) => e.code,
        other => panic!("no ErrorMsg: {other:?}"),
    }
}

#[test]
fn cloud_ask_matches_the_local_answer_and_is_charged_exactly_once() {
    let s = setup("managed", Some("10.00"), "");
    let local = json_of(s.device.synesis().args([
        "--json",
        "ask",
        "--local",
        "--model",
        "tiny",
        "--max-tokens",
        "24",
        PROMPT,
    ]));
    let cloud =
        json_of(
            s.device
                .synesis()
                .args(["--json", "cloud", "ask", "--max-tokens", "24", PROMPT]),
        );
    assert_eq!(
        cloud["text"], local["text"],
        "greedy: the same text on both sides"
    );
    let (input, output) = (
        cloud["input_tokens"].as_u64().unwrap(),
        cloud["output_tokens"].as_u64().unwrap(),
    );
    assert_eq!(input, local["prompt_tokens"].as_u64().unwrap());
    assert_eq!(output, local["completion_tokens"].as_u64().unwrap());
    assert_eq!(
        cloud["usage_counted"], false,
        "llama.cpp counted the tokens"
    );
    let total = managed_total(input, output);
    assert_eq!(cloud["total_micro_usd"].as_i64().unwrap(), total);
    assert_eq!(
        cloud["cost"]["base_micro_usd"].as_i64().unwrap()
            + cloud["cost"]["markup_micro_usd"].as_i64().unwrap(),
        total
    );

    let u = usage(&s);
    let charges = u["charges"].as_array().unwrap();
    assert_eq!(charges.len(), 1, "{u}");
    assert_eq!(charges[0]["request_id"], cloud["request_id"]);
    assert_eq!(charges[0]["total_micro_usd"].as_i64().unwrap(), total);
    assert_eq!(
        u["held_micro_usd"].as_i64().unwrap(),
        0,
        "no hold stays open"
    );
    assert_eq!(u["balance_micro_usd"].as_i64().unwrap(), 10_000_000 - total);

    // The device's own ledger has the charge, by request id.
    let local_usage = json_of(s.device.synesis().args(["--json", "usage"]));
    assert_eq!(local_usage["cloud"]["charges"], 1, "{local_usage}");
    assert_eq!(
        local_usage["cloud"]["total_micro_usd"].as_i64().unwrap(),
        total,
        "{local_usage}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_request_id_fifty_times_runs_the_model_once_and_charges_once() {
    let s = setup("managed", Some("10.00"), "");
    let (_endpoint, conn) = connect(&s.device).await;
    let id = synesis_tunnel::clock::new_request_id();
    let first: Message = request(id, 32).into();
    // 25 at once on one connection, then 25 more after it finished.
    let storm: Vec<_> = (0..25)
        .map(|_| {
            let (conn, first) = (conn.clone(), first.clone());
            tokio::spawn(async move { exchange(&conn, first, None).await })
        })
        .collect();
    let mut replies = Vec::new();
    for r in storm {
        replies.push(r.await.unwrap());
    }
    for _ in 0..25 {
        replies.push(exchange(&conn, first.clone(), None).await);
    }
    let one = done(&replies[0]).clone();
    for r in &replies {
        assert_eq!(done(r), &one, "every repeat has the same outcome");
        assert_eq!(r.text, replies[0].text);
        assert_eq!(
            r.chunks,
            (0..one.chunks).collect::<Vec<_>>(),
            "no gap, no repeat"
        );
    }
    let u = usage(&s);
    assert_eq!(u["charges"].as_array().unwrap().len(), 1, "{u}");
    let runs = s.cloud.log().matches("escalation finished").count();
    assert_eq!(runs, 1, "the model ran once:\n{}", s.cloud.log());

    // The same id with another body is a conflict, not a replay.
    let other = exchange(&conn, request(id, 33).into(), None).await;
    assert_eq!(refusal(&other), ErrorCode::IDEMPOTENCY_CONFLICT);
}

/// The upstream has made five chunks and waits: a cancel then gets exactly those five, charged,
/// and the cloud hangs up on the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_some_chunks_is_charged_for_those_only() {
    let (s, up) = paced(vec![Script::Paced(PACED)], "").await;
    up.release(5);
    let (_endpoint, conn) = connect(&s.device).await;
    let id = synesis_tunnel::clock::new_request_id();
    let reply = exchange(&conn, up_request(id, PACED).into(), Some(5)).await;
    let d = done(&reply);
    assert_eq!(d.finish_reason, FinishReason::Cancelled);
    assert_eq!(reply.chunks, (0..5).collect::<Vec<_>>(), "the five made");
    assert_eq!(reply.text, paced_text(5));
    assert_eq!(d.chunks, 5, "the device has every chunk made");
    assert_eq!(d.usage.output_tokens, 5, "charged per chunk produced");
    assert_eq!(
        d.cost.total.0,
        managed_total(d.usage.input_tokens, d.usage.output_tokens)
    );
    let u = usage(&s);
    assert_eq!(
        u["held_micro_usd"].as_i64().unwrap(),
        0,
        "the hold is released: {u}"
    );
    assert_eq!(
        u["charges"][0]["total_micro_usd"].as_i64().unwrap(),
        d.cost.total.0
    );
    wait_upstream(&s, &up, "the cloud stopped the upstream", |up| {
        up.dropped() == 1
    });
}

#[test]
fn refusals_come_first_are_clear_and_cost_nothing() {
    let s = setup("managed", None, "");
    let ask = |args: &[&str]| {
        let out = s
            .device
            .synesis()
            .args(["cloud", "ask"])
            .args(args)
            .arg(PROMPT)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was refused");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let broke = ask(&[]);
    assert!(broke.contains("INSUFFICIENT_FUNDS"), "{broke}");
    let unknown = ask(&["--model", "gpt-9"]);
    assert!(
        unknown.contains("UNKNOWN_MODEL") && unknown.contains("tiny"),
        "{unknown}"
    );
    let byok = ask(&["--byok"]);
    assert!(byok.contains("SYNESIS_BYOK_KEY"), "{byok}");
    s.cloud.top_up(&s.device, "1.00");
    let capped = ask(&["--max-tokens", "1000", "--max-cost", "0.000001"]);
    assert!(capped.contains("MAX_COST_EXCEEDED"), "{capped}");
    let u = usage(&s);
    assert_eq!(u["charges"].as_array().unwrap().len(), 0, "{u}");
    assert_eq!(u["balance_micro_usd"].as_i64().unwrap(), 1_000_000);
}

#[test]
fn the_free_quota_admits_a_hold_exactly_at_its_boundary() {
    // The hold's quota tokens: the prompt's exact count (llama.cpp's) plus max_tokens.
    let probe = setup("free", None, "");
    let local = json_of(probe.device.synesis().args([
        "--json",
        "ask",
        "--local",
        "--model",
        "tiny",
        "--max-tokens",
        "8",
        PROMPT,
    ]));
    let held = local["prompt_tokens"].as_u64().unwrap() + 8;
    for (quota, admitted) in [(held - 1, false), (held, true), (held + 1, true)] {
        let s = setup(
            "free",
            None,
            &format!("[tiers]\nfree_quota_tokens = {quota}\n"),
        );
        let out = s
            .device
            .synesis()
            .args(["--json", "cloud", "ask", "--max-tokens", "8", PROMPT])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.success(),
            admitted,
            "quota {quota} for {held}: {stderr}"
        );
        if !admitted {
            assert!(stderr.contains("QUOTA_EXCEEDED"), "{stderr}");
        }
        let u = usage(&s);
        assert_eq!(
            u["charges"].as_array().unwrap().len(),
            usize::from(admitted),
            "{u}"
        );
        assert_eq!(
            u["balance_micro_usd"].as_i64().unwrap(),
            0,
            "Free costs no money"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_at_once_never_overdraw_and_the_refused_cost_nothing() {
    // $0.002 covers about four holds of (input + 200 output) at once.
    let s = setup(
        "managed",
        Some("0.002"),
        "[escalation]\nper_account_max = 64\n",
    );
    let (_e1, a) = connect(&s.device).await;
    let (_e2, b) = connect(&s.device).await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let conn = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let id = synesis_tunnel::clock::new_request_id();
                exchange(&conn, request(id, 200).into(), None).await
            })
        })
        .collect();
    let (mut served, mut refused, mut charged) = (0, 0, 0i64);
    for t in tasks {
        let r = t.await.unwrap();
        match &r.end {
            Some(Message::EscalationDone(d)) => {
                served += 1;
                charged += d.cost.total.0;
            }
            Some(Message::ErrorMsg(e)) => {
                assert!(
                    e.code == ErrorCode::INSUFFICIENT_FUNDS || e.code == ErrorCode::UNAVAILABLE,
                    "{e:?}"
                );
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        served > 0 && refused > 0,
        "served {served}, refused {refused}"
    );
    let u = usage(&s);
    assert_eq!(u["charges"].as_array().unwrap().len(), served, "{u}");
    let balance = u["balance_micro_usd"].as_i64().unwrap();
    assert_eq!(balance, 2_000 - charged, "only the served were charged");
    assert!(balance >= 0);
    assert_eq!(u["held_micro_usd"].as_i64().unwrap(), 0);
}

/// The answer is held at a quarter while the tunnel is cut; a second quarter is made during the
/// cut, which lasts until the tunnel gives the connection up (three missed heartbeats); the rest
/// only after. The device resumes and has the whole answer, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_survives_a_tunnel_cut_longer_than_three_heartbeats() {
    let (s, up) = paced(vec![Script::Paced(PACED)], "").await;
    let relay = synesis_e2e::UdpRelay::start(s.cloud.addr);
    // A second device of the account, whose tunnel goes through the relay.
    let device = Device::new();
    device.login(&relay.token_via(&s.cloud.token("acme", "1h")));
    let _tunnel = device.tunnel("1s");
    assert!(wait_for(Duration::from_secs(15), || device
        .state()
        .as_deref()
        == Some("connected")));
    let ask = spawn_ask(&device);
    wait_upstream(&s, &up, "the cloud asked the upstream", |up| {
        up.requests() == 1
    });
    up.release(PACED / 4);
    wait_upstream(&s, &up, "a quarter made", |up| up.written() == PACED / 4);
    relay.cut(true);
    up.release(PACED / 4);
    assert!(
        wait_for(Duration::from_secs(30), || device.state().as_deref()
            != Some("connected")),
        "the tunnel never gave up the cut connection:\n{}",
        device.tunnel_log()
    );
    wait_upstream(&s, &up, "half made during the cut", |up| {
        up.written() == PACED / 2
    });
    relay.cut(false);
    up.release(PACED);
    let out = ask.wait_with_output().unwrap();
    let v = answered(&out, &device.tunnel_log());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(v["text"], paced_text(PACED), "no gap, no repeat: {stderr}");
    assert!(v["resumed"].as_u64().unwrap() >= 1, "it was cut: {stderr}");
    assert_eq!(v["via"], "service");
    let u = usage(&s);
    assert_eq!(u["charges"].as_array().unwrap().len(), 1, "one charge: {u}");
    assert_eq!(u["charges"][0]["output_tokens"], PACED, "{u}");
}

/// The cloud is killed with half the answer made and the rest not yet released; restarted, it
/// runs the request again under its hold (a second upstream request), and the device ends
/// with the whole answer, charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_killed_mid_answer_and_restarted_finishes_it_charged_once() {
    let (mut s, up) = paced(vec![Script::Paced(PACED), Script::Paced(PACED)], "").await;
    let ask = spawn_ask(&s.device);
    wait_upstream(&s, &up, "the cloud asked the upstream", |up| {
        up.requests() == 1
    });
    up.release(PACED / 2);
    wait_upstream(&s, &up, "half made", |up| up.written() == PACED / 2);
    synesis_e2e::signal(s.cloud.process.pid(), "KILL");
    let _ = s.cloud.process.wait(Duration::from_secs(20));
    s.cloud.restart();
    wait_upstream(&s, &up, "the restarted cloud ran it again", |up| {
        up.requests() == 2
    });
    up.release(PACED);
    let out = ask.wait_with_output().unwrap();
    let v = answered(&out, &s.cloud.log());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(v["text"], paced_text(PACED), "{stderr}");
    assert!(
        v["started_over"].as_u64().unwrap() + v["resumed"].as_u64().unwrap() >= 1,
        "{stderr}"
    );
    let u = usage(&s);
    assert_eq!(
        u["charges"].as_array().unwrap().len(),
        1,
        "charged once: {u}"
    );
    assert_eq!(u["charges"][0]["output_tokens"], PACED, "{u}");
    assert_eq!(
        u["held_micro_usd"].as_i64().unwrap(),
        0,
        "no hold left open: {u}"
    );
}

/// The OpenAI-compatible provider against a real server: llama-cpp-python's, on the tiny model.
/// Skipped (with a message) where `pip install "llama-cpp-python[server]"` was not run; never in
/// CI, which installs it.
#[test]
fn an_openai_compatible_upstream_answers_through_the_cloud() {
    if synesis_e2e::skip_unless(
        synesis_e2e::python_has("llama_cpp.server"),
        "llama-cpp-python[server] is not installed (pip install \"llama-cpp-python[server]\")",
    ) {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("tiny.gguf");
    synesis_infer::tiny::write_model(&model, synesis_infer::tiny::TinySpec::TINY).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = std::process::Command::new("python3")
        .args([
            "-m",
            "llama_cpp.server",
            "--host",
            "127.0.0.1",
            "--n_ctx",
            "256",
            "--port",
        ])
        .arg(port.to_string())
        .arg("--model")
        .arg(&model)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _server = synesis_e2e::Running { child: server };
    assert!(
        wait_for(Duration::from_secs(60), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "the llama-cpp-python server started"
    );
    let extra = format!(
        "[prices.up]\ninput_usd_per_mtok = \"1.00\"\noutput_usd_per_mtok = \"2.00\"\n\
         [models.up]\nprovider = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\n\
         upstream_model = \"tiny\"\n"
    );
    let s = setup("managed", Some("10.00"), &extra);
    let v = json_of(s.device.synesis().args([
        "--json",
        "cloud",
        "ask",
        "--model",
        "up",
        "--max-tokens",
        "8",
        PROMPT,
    ]));
    assert_eq!(
        v["usage_counted"], true,
        "this server streams no usage: {v}"
    );
    let (input, output) = (
        v["input_tokens"].as_u64().unwrap(),
        v["output_tokens"].as_u64().unwrap(),
    );
    assert!(output <= 8, "{v}");
    assert_eq!(
        v["total_micro_usd"].as_i64().unwrap(),
        managed_total(input, output)
    );
    let u = usage(&s);
    assert_eq!(u["charges"].as_array().unwrap().len(), 1, "{u}");
}

/// A device's pre-warm signal reaches the cloud on the control stream: the in-process
/// provider loads the model before any escalation, and `admin devices` shows the signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prewarm_signal_loads_the_model_and_shows_in_admin_devices() {
    let s = setup("managed", None, "");
    let identity = Identity::load(&s.device.home().join("data"))
        .unwrap()
        .unwrap();
    let (_vitals_tx, vitals) = tokio::sync::watch::channel(synesis_e2e::empty_vitals());
    let tunnel = synesis_tunnel::Tunnel::spawn(synesis_tunnel::Options {
        identity,
        config: synesis_tunnel::machine::Config::default(),
        vitals,
        seed: 7,
        data_dir: None,
    });
    let mut status = tunnel.status();
    tokio::time::timeout(Duration::from_secs(15), async {
        while status.borrow_and_update().state != synesis_tunnel::TunnelState::Connected {
            status.changed().await.unwrap();
        }
    })
    .await
    .expect("connected");
    assert!(
        !s.cloud.log().contains("model loaded"),
        "nothing loads before it is needed"
    );
    assert!(tunnel.prewarm(synesis_proto::message::Prewarm {
        model: Some("tiny".into()),
        reason: "GPU 0 at 97 %".into(),
    }));
    let loaded = tokio::task::spawn_blocking({
        let log = s.cloud.dir().with_extension("serve.log");
        move || {
            wait_for(Duration::from_secs(15), || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("model loaded")
            })
        }
    });
    assert!(
        loaded.await.unwrap(),
        "the pre-warm loaded the model:\n{}",
        s.cloud.log()
    );
    let shown = wait_for(Duration::from_secs(5), || {
        s.cloud
            .devices()
            .iter()
            .any(|d| d["prewarm"]["model"] == "tiny")
    });
    assert!(shown, "{:?}", s.cloud.devices());
    tunnel.shutdown().await;
}

/// A generation longer than its hold's time stops before the hold expires and is charged for
/// what it produced. Before, the settlement was refused (hold expired): the whole answer was
/// delivered and nothing was charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_outlasting_its_hold_is_cut_and_charged_not_given_away() {
    // The generation stops 2 s (a fifth of the hold's time) before the hold expires, which
    // leaves the settlement room on a loaded machine. The upstream makes three chunks and then
    // waits for a release that never comes (its idle time and the cloud's are 30 s): only the
    // hold's deadline can end the answer, at 8 s.
    let (s, up) = paced(vec![Script::Paced(PACED)], "[ledger]\nhold_ttl = \"10s\"\n").await;
    up.release(3);
    let out = s
        .device
        .synesis()
        .args(["--json", "cloud", "ask", "--model", "up", "--max-tokens"])
        .arg(PACED.to_string())
        .arg(PROMPT)
        .output()
        .unwrap();
    let v = answered(&out, &s.cloud.log());
    assert_eq!(v["finish_reason"], "length", "{v}");
    assert_eq!(v["text"], paced_text(3), "{v}");
    assert_eq!(v["output_tokens"], 3, "{v}");
    let u = usage(&s);
    assert_eq!(u["charges"].as_array().unwrap().len(), 1, "{u}");
    assert_eq!(
        u["charges"][0]["total_micro_usd"].as_i64().unwrap(),
        managed_total(v["input_tokens"].as_u64().unwrap(), 3)
    );
    assert_eq!(u["held_micro_usd"].as_i64().unwrap(), 0, "{u}");
    wait_upstream(&s, &up, "the cloud stopped the upstream", |up| {
        up.dropped() == 1
    });
}

/// BYOK is a tier the operator grants per model: a key sent to an upstream whose `tiers` do not
/// name "byok" is refused, not billed at the BYOK fee for the operator's own compute.
#[test]
fn a_byok_key_is_refused_where_the_operator_did_not_allow_byok() {
    let extra = "[prices.house]\ninput_usd_per_mtok = \"1.00\"\noutput_usd_per_mtok = \"2.00\"\n\
                 [models.house]\nprovider = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n";
    let s = setup("managed", Some("10.00"), extra);
    let out = s
        .device
        .synesis()
        .args(["cloud", "ask", "--byok", "--model", "house", PROMPT])
        .env("SYNESIS_BYOK_KEY", "sk-not-a-real-key")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("MODEL_NOT_ALLOWED"), "{stderr}");
    assert!(
        !s.cloud.log().contains("sk-not-a-real-key"),
        "the key is never logged"
    );
}

/// A request id reused with another body is refused without blocking the first body: a repeat
/// of the original right after still gets its stored answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_repeat_does_not_block_the_original_answer() {
    let s = setup(
        "managed",
        Some("10.00"),
        "[escalation]\nresume_window = \"1s\"\n",
    );
    let (_endpoint, conn) = connect(&s.device).await;
    let id = synesis_tunnel::clock::new_request_id();
    let first = exchange(&conn, request(id, 16).into(), None).await;
    let answer = done(&first).clone();
    // The run is forgotten (its resume window, a second, is long past); the answer is stored.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let other = exchange(&conn, request(id, 17).into(), None).await;
    assert_eq!(refusal(&other), ErrorCode::IDEMPOTENCY_CONFLICT);
    let again = exchange(&conn, request(id, 16).into(), None).await;
    assert_eq!(done(&again), &answer, "the stored answer, replayed");
    assert_eq!(again.text, first.text);
}

/// An upstream that fails before its first chunk is retried; BYOK sends the user's key to it
/// (never the operator's, never to a log) and charges the account only the licensing fee.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_500_is_retried_and_byok_pays_only_the_fee() {
    let up = upstream(vec![Script::Fail500]).await;
    let s = setup(
        "managed",
        Some("10.00"),
        &upstream_model(up.port, "[\"managed\", \"byok\"]"),
    );
    let out = s
        .device
        .synesis()
        .args(["--json", "cloud", "ask", "--byok", "--model", "up", PROMPT])
        .env("SYNESIS_BYOK_KEY", "sk-user-key-123")
        .output()
        .unwrap();
    let v = answered(&out, &s.cloud.log());
    assert_eq!(v["text"], "Hi there");
    assert_eq!(
        (v["input_tokens"].as_u64(), v["output_tokens"].as_u64()),
        (Some(7), Some(2))
    );
    assert_eq!(v["usage_counted"], false, "the upstream's own usage");
    // BYOK: base 0, the fee = round(exact × 30 %): (7 × 1 + 2 × 2) µUSD × 0.3 = 3.3 → 3.
    assert_eq!(v["cost"]["base_micro_usd"], 0);
    assert_eq!(v["total_micro_usd"], 3);
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one 500, one retry: {seen:?}");
    assert!(
        seen.iter().all(|a| a == "bearer sk-user-key-123"),
        "{seen:?}"
    );
    assert!(
        !s.cloud.log().contains("sk-user-key-123"),
        "the key is never logged"
    );
    let u = usage(&s);
    assert_eq!(u["charges"].as_array().unwrap().len(), 1, "{u}");
    assert_eq!(u["balance_micro_usd"].as_i64().unwrap(), 10_000_000 - 3);
}

/// An upstream that goes silent mid-answer: the request ends after the idle time, charged for
/// what was streamed (the cloud's count), and its hold is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_silent_mid_answer_ends_at_the_idle_time_and_releases_the_hold() {
    let up = upstream(vec![Script::Hang]).await;
    let extra = format!(
        "[escalation]\nidle_timeout = \"1s\"\n{}",
        upstream_model(up.port, "[\"managed\"]")
    );
    let s = setup("managed", Some("10.00"), &extra);
    let out = s
        .device
        .synesis()
        .args([
            "--json",
            "cloud",
            "ask",
            "--model",
            "up",
            "--max-tokens",
            "50",
            PROMPT,
        ])
        .output()
        .unwrap();
    let v = answered(&out, "");
    assert_eq!(v["text"], "Hi");
    assert_eq!(v["finish_reason"], "failed", "{v}");
    assert_eq!(v["usage_counted"], true);
    assert_eq!(v["output_tokens"], 1, "one chunk streamed, one counted");
    let u = usage(&s);
    assert_eq!(u["held_micro_usd"].as_i64().unwrap(), 0, "{u}");
    assert_eq!(u["charges"].as_array().unwrap().len(), 1, "{u}");
}

/// Ctrl-C on `synesis cloud ask` with three chunks shown and the upstream waiting: the cloud
/// stops the upstream and charges the three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_answer_and_charges_what_was_produced() {
    use std::io::Read;
    let (s, up) = paced(vec![Script::Paced(PACED)], "").await;
    up.release(3);
    // Not `--json`: the answer streams to stdout, so the test sees what was shown; the summary
    // (tokens in and out, how it finished) is the last line on stderr.
    let mut ask = s
        .device
        .synesis()
        .args(["cloud", "ask", "--model", "up", "--max-tokens"])
        .arg(PACED.to_string())
        .arg(PROMPT)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = ask.stdout.take().unwrap();
    let (shows, shown_so_far) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buf = [0u8; 4_096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            text.extend_from_slice(&buf[..n]);
            let _ = shows.send(String::from_utf8_lossy(&text).into_owned());
        }
        text
    });
    let three = paced_text(3);
    let mut shown = String::new();
    while !shown.contains(&three) {
        match shown_so_far.recv_timeout(Duration::from_secs(30)) {
            Ok(text) => shown = text,
            Err(e) => {
                let _ = ask.kill();
                let out = ask.wait_with_output().unwrap();
                panic!(
                    "three chunks not shown within 30 s ({e}): {shown:?} {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    synesis_e2e::signal(ask.id(), "INT");
    let out = ask.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(shown.trim_end(), three.trim_end(), "shown, nothing more");
    // "[up · 57 in + 3 out tokens (counted by the cloud) · … · cancelled]"
    let summary = stderr
        .lines()
        .rfind(|l| l.starts_with('[') && l.contains(" out tokens"))
        .unwrap_or_else(|| panic!("no summary: {stderr}"));
    assert!(summary.contains(" · cancelled"), "{summary}");
    let tokens = summary
        .split(" · ")
        .find(|part| part.contains(" in + "))
        .unwrap();
    let count = |word: usize| -> u64 {
        tokens
            .split_whitespace()
            .nth(word)
            .unwrap()
            .parse()
            .unwrap()
    };
    let (input, produced) = (count(0), count(3));
    assert_eq!(produced, 3, "{summary}");
    let u = usage(&s);
    assert_eq!(u["held_micro_usd"].as_i64().unwrap(), 0, "{u}");
    assert_eq!(
        u["charges"][0]["total_micro_usd"].as_i64().unwrap(),
        managed_total(input, produced)
    );
    wait_upstream(&s, &up, "the cloud stopped the upstream", |up| {
        up.dropped() == 1
    });
}

/// One account cannot take every sequence: past `per_account_max` running requests it is told
/// to wait (`LIMIT_EXCEEDED`, with `retry_after_ms`), and charged nothing for that. The two
/// running ones are held after their first chunk until the third was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_at_its_limit_of_running_requests_is_told_to_wait() {
    let (s, up) = paced(
        vec![Script::Paced(PACED), Script::Paced(PACED)],
        "[escalation]\nper_account_max = 2\n",
    )
    .await;
    up.release(1);
    let (_endpoint, conn) = connect(&s.device).await;
    let (running, started): (Vec<_>, Vec<_>) = (0..2)
        .map(|_| {
            let conn = conn.clone();
            let (tell, started) = tokio::sync::oneshot::channel();
            let run = tokio::spawn(async move {
                let id = synesis_tunnel::clock::new_request_id();
                exchange_telling(&conn, up_request(id, PACED).into(), None, Some(tell)).await
            });
            (run, started)
        })
        .unzip();
    // Both are running (each sent its first chunk, and waits for the rest).
    for started in started {
        tokio::time::timeout(Duration::from_secs(30), started)
            .await
            .expect("a request started within 30 s")
            .expect("it sent a chunk");
    }
    let third = exchange(
        &conn,
        up_request(synesis_tunnel::clock::new_request_id(), 8).into(),
        None,
    )
    .await;
    match &third.end {
        Some(Message::ErrorMsg(e)) => {
            assert_eq!(e.code, ErrorCode::LIMIT_EXCEEDED, "{e:?}");
            assert!(e.retry_after_ms.is_some());
        }
        other => panic!("the third ran: {other:?}"),
    }
    assert_eq!(up.requests(), 2, "the third never reached the upstream");
    up.release(PACED);
    for r in running {
        let r = r.await.unwrap();
        done(&r);
        assert_eq!(r.text, paced_text(PACED));
    }
    // Room again once they ended.
    let later = exchange(
        &conn,
        up_request(synesis_tunnel::clock::new_request_id(), 8).into(),
        None,
    )
    .await;
    done(&later);
    assert_eq!(later.text, "Hi there");
    let u = usage(&s);
    assert_eq!(u["charges"].as_array().unwrap().len(), 3, "{u}");
}

// ------------------------------------------------------------------ local first (`synesis ask`)

/// `synesis --json ask --explain …`: the JSON, and the explanation on stderr.
fn ask_explained(
    device: &Device,
    args: &[&str],
    env: &[(&str, &str)],
) -> (serde_json::Value, String) {
    let mut cmd = device.synesis();
    cmd.args(["--json", "ask", "--explain"])
        .args(args)
        .arg(PROMPT)
        // The machine running the tests is busy: its load must not decide these routes.
        .env("SYNESIS_STRESS_CPU_PERCENT", "100")
        .env("SYNESIS_STRESS_MEMORY_PERCENT", "100");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (answered(&out, &stderr), stderr)
}

/// The policy's decision and its first reason, as `--json` reports them.
fn routed(v: &serde_json::Value, decision: &str, reason: &str) {
    assert_eq!(v["route"]["decision"], decision, "{v}");
    assert_eq!(v["route"]["detail"][0]["reason"], reason, "{v}");
}

#[test]
fn with_no_local_model_ask_goes_to_the_cloud_and_says_why() {
    let s = setup("managed", Some("10.00"), "");
    let bare = Device::new();
    bare.login(&s.cloud.token("acme", "1h"));
    let (v, stderr) = ask_explained(&bare, &["--max-tokens", "8"], &[]);
    routed(&v, "cloud", "no_local_model");
    assert!(
        stderr.contains("answering by the cloud: no local model"),
        "{stderr}"
    );
    assert_eq!(usage(&s)["charges"].as_array().unwrap().len(), 1);
}

#[test]
fn an_over_long_request_goes_to_the_cloud_and_local_only_refuses_it() {
    let s = setup("managed", Some("10.00"), "");
    // 57 prompt tokens + 4,060 do not fit the local context of 4,096.
    let (v, _) = ask_explained(&s.device, &["--max-tokens", "4060"], &[]);
    routed(&v, "cloud", "over_context");
    let out = s
        .device
        .synesis()
        .args(["ask", "--local", "--max-tokens", "4060", PROMPT])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exceed the local context of 4096"),
        "{stderr}"
    );
}

#[test]
fn the_first_tokens_confidence_decides_and_explain_and_json_agree() {
    let s = setup("managed", Some("10.00"), "");
    // The tiny model's first tokens score about -1.8: a threshold above that escalates...
    let (v, stderr) = ask_explained(
        &s.device,
        &["--max-tokens", "24"],
        &[("SYNESIS_MIN_CONFIDENCE", "-0.01")],
    );
    routed(&v, "cloud", "low_confidence");
    assert!(
        v["route"]["cascade_ms"].as_f64().unwrap() > 0.0,
        "the probe's cost is reported"
    );
    assert!(
        stderr.contains("answering by the cloud: confidence"),
        "{stderr}"
    );
    // ... one below it stays here, and the answer is the same greedy text.
    let (v, stderr) = ask_explained(
        &s.device,
        &["--max-tokens", "24"],
        &[("SYNESIS_MIN_CONFIDENCE", "-50")],
    );
    routed(&v, "local", "confident_enough");
    assert!(
        stderr.contains("answering on this device: confidence"),
        "{stderr}"
    );
    let local = json_of(s.device.synesis().args([
        "--json",
        "ask",
        "--local",
        "--max-tokens",
        "24",
        PROMPT,
    ]));
    assert_eq!(
        v["text"], local["text"],
        "the probe's tokens are the answer's first tokens"
    );
    assert_eq!(
        usage(&s)["charges"].as_array().unwrap().len(),
        1,
        "only the escalated one"
    );
    // Each answer is in the local ledger with its route's reason.
    let by_route = json_of(
        s.device
            .synesis()
            .args(["--json", "usage", "--by", "route"]),
    );
    let groups: Vec<(String, String)> = by_route["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["key"].as_str().unwrap().to_owned(),
                g["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for want in [
        ("confident_enough", "local"),
        ("low_confidence", "cloud"),
        ("forced_local", "local"),
    ] {
        assert!(
            groups.contains(&(want.0.to_owned(), want.1.to_owned())),
            "{want:?} in {by_route}"
        );
    }
}

#[test]
fn with_the_tunnel_down_ask_answers_here_and_says_so() {
    let mut s = setup("managed", Some("10.00"), "");
    let _tunnel = s.device.tunnel("1s");
    assert!(wait_for(Duration::from_secs(15), || s
        .device
        .state()
        .as_deref()
        == Some("connected")));
    synesis_e2e::signal(s.cloud.process.pid(), "KILL");
    let _ = s.cloud.process.wait(Duration::from_secs(5));
    assert!(wait_for(Duration::from_secs(15), || s
        .device
        .state()
        .as_deref()
        != Some("connected")));
    // Even a request the policy would send to the cloud stays here, with the reason.
    let (v, stderr) = ask_explained(
        &s.device,
        &["--max-tokens", "8"],
        &[("SYNESIS_MIN_CONFIDENCE", "-0.01")],
    );
    routed(&v, "local", "cloud_unreachable");
    assert!(stderr.contains("the cloud is unreachable"), "{stderr}");
}

#[test]
fn a_cloud_that_refuses_for_money_leaves_the_answer_here_and_says_so() {
    let s = setup("managed", None, "");
    let (v, stderr) = ask_explained(
        &s.device,
        &["--max-tokens", "8"],
        &[("SYNESIS_MIN_CONFIDENCE", "-0.01")],
    );
    assert!(
        stderr.contains("INSUFFICIENT_FUNDS") && stderr.contains("answering on this device"),
        "{stderr}"
    );
    assert_eq!(v["completion_tokens"], 8, "answered here: {v}");
    assert_eq!(usage(&s)["charges"].as_array().unwrap().len(), 0);
}

#[test]
fn a_stressed_device_escalates() {
    let s = setup("managed", Some("10.00"), "");
    // Any memory in use is "stressed" at a 0 % threshold: a verdict every machine gives.
    let (v, stderr) = ask_explained(
        &s.device,
        &["--max-tokens", "8"],
        &[("SYNESIS_STRESS_MEMORY_PERCENT", "0")],
    );
    routed(&v, "cloud", "stressed");
    assert!(
        stderr.contains("the device is stressed: memory"),
        "{stderr}"
    );
}
