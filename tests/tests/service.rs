//! The tunnel service as people run it: `synesis tunnel start` in the background (returning once
//! connected), `status`, `logs`, `stop` (draining: an answer being written finishes), a service
//! killed with SIGKILL replaced by the next start, and every `synesis` command riding its one
//! connection. Real binaries, real QUIC, the tiny models.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::io::Read;
use std::time::Duration;

use synesis_e2e::{Device, json_of, run_ok, signal, tiny_cloud, tiny_cloud_with, wait_for};

/// `synesis tunnel status`'s exit code (3: not running).
fn status_code(device: &Device) -> Option<i32> {
    device
        .synesis()
        .args(["tunnel", "status"])
        .output()
        .unwrap()
        .status
        .code()
}

fn start(device: &Device) -> serde_json::Value {
    json_of(
        device
            .synesis()
            .args(["--json", "tunnel", "start", "--heartbeat-interval", "1s"]),
    )
}

/// Kills the device's service when the test ends, however it ends (a failed assertion too):
/// a service started in the background outlives its test otherwise.
struct KillsService<'a>(&'a Device);

impl Drop for KillsService<'_> {
    fn drop(&mut self) {
        let Ok(out) = self
            .0
            .synesis()
            .args(["--json", "tunnel", "status"])
            .output()
        else {
            return;
        };
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            && let Some(pid) = v["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
        {
            signal(pid, "KILL");
        }
    }
}

/// How many connections of `device` the cloud identified so far.
fn connections(log: &str, device: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("device connection identified") && l.contains(device))
        .count()
}

#[test]
fn start_returns_connected_and_a_killed_service_is_replaced_by_the_next_start() {
    let t = tiny_cloud("");
    let d = &t.owner;
    let _service = KillsService(d);
    assert_eq!(status_code(d), Some(3), "not running yet");

    let first = start(d);
    assert_eq!(first["state"], "connected", "{first}");
    let pid = u32::try_from(first["pid"].as_u64().unwrap()).unwrap();
    let again = start(d);
    assert_eq!(again["already_running"], true, "{again}");
    let status = json_of(d.synesis().args(["--json", "tunnel", "status"]));
    assert_eq!(status["pid"].as_u64(), Some(u64::from(pid)));
    assert_eq!(status["tunnel"]["state"], "connected", "{status}");

    // SIGKILL: the socket and the lock file stay behind; the next start takes over.
    signal(pid, "KILL");
    assert!(wait_for(Duration::from_secs(10), || status_code(d) == Some(3)));
    let socket = d.home().join("run/tunnel.sock");
    assert!(socket.exists(), "a killed service leaves its socket");
    let second = start(d);
    assert_eq!(second["state"], "connected", "{second}");
    assert_ne!(second["pid"], first["pid"]);
    run_ok(d.synesis().args(["cloud", "ping", "--count", "1"]));

    let logs = String::from_utf8(run_ok(d.synesis().args(["tunnel", "logs", "-n", "200"])).stdout)
        .unwrap();
    assert!(logs.contains("synesis: connected"), "{logs}");
    assert_eq!(
        logs.matches("--- synesis tunnel start").count(),
        2,
        "{logs}"
    );

    let stopped = json_of(d.synesis().args(["--json", "tunnel", "stop"]));
    assert_eq!(stopped["stopped"], true, "{stopped}");
    assert_eq!(status_code(d), Some(3));
    assert!(!socket.exists(), "a stopped service removes its socket");
    let idle = json_of(d.synesis().args(["--json", "tunnel", "stop"]));
    assert_eq!(idle["running"], false, "{idle}");
}

#[test]
fn two_concurrent_asks_through_the_service_are_one_connection_on_the_cloud() {
    let t = tiny_cloud("");
    let d = &t.owner;
    let _service = KillsService(d);
    let device = start(d)["device_id"].as_str().unwrap().to_owned();
    // The setup's top-up had a connection of its own; the service has one more.
    let before = connections(&t.cloud.log(), &device);
    let asks: Vec<_> = (0..2)
        .map(|_| {
            d.synesis()
                .args(["--json", "cloud", "ask", "--max-tokens", "16", "hello"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for ask in asks {
        let out = ask.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["via"], "service", "{v}");
    }
    assert_eq!(
        connections(&t.cloud.log(), &device),
        before,
        "the asks opened no connection of their own: {}",
        t.cloud.log()
    );
    run_ok(d.synesis().args(["tunnel", "stop"]));
}

#[test]
fn stop_during_an_escalation_lets_the_answer_finish() {
    let spec = synesis_infer::tiny::TinySpec {
        n_ctx: 4_096,
        ..synesis_infer::tiny::TinySpec::BENCH
    };
    let t = tiny_cloud_with(spec, "");
    let d = &t.owner;
    let _service = KillsService(d);
    let ask = |extra: &[&str]| {
        let mut cmd = d.synesis();
        cmd.args(["cloud", "ask", "--max-tokens", "300"])
            .args(extra)
            .arg("hello");
        cmd
    };
    // Without the service: the whole answer, to compare with.
    let reference = String::from_utf8(run_ok(&mut ask(&[])).stdout).unwrap();

    start(d);
    let mut child = ask(&[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the answer is streaming, stop the service.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    let stopped = json_of(d.synesis().args(["--json", "tunnel", "stop"]));
    assert_eq!(stopped["stopped"], true, "{stopped}");
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let mut text = first.to_vec();
    text.extend(rest);
    assert_eq!(String::from_utf8(text).unwrap(), reference, "{stderr}");
    assert!(
        !stderr.contains("resum") && !stderr.contains("again"),
        "streamed to its end through the draining service: {stderr}"
    );
    // Charged once.
    let usage = json_of(d.synesis().args(["--json", "cloud", "usage"]));
    assert_eq!(usage["charges"].as_array().unwrap().len(), 2, "{usage}");
}

/// `synesis --json tunnel events` in the background: its lines, as they come.
fn event_feed(
    device: &Device,
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<serde_json::Value>,
) {
    use std::io::BufRead;
    let mut child = device
        .synesis()
        .args(["--json", "tunnel", "events"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// The next event for which `wanted` holds (within a minute), skipping others.
fn next_event(
    events: &std::sync::mpsc::Receiver<serde_json::Value>,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let event = events
            .recv_timeout(left)
            .expect("the event within a minute");
        if wanted(&event) {
            return event;
        }
    }
}

#[test]
fn events_show_escalations_with_their_cost_and_a_reconnect_after_a_cloud_restart() {
    let mut t = tiny_cloud("");
    let d = &t.owner;
    let _service = KillsService(d);
    start(d);
    let (mut feed, events) = event_feed(d);
    let now = next_event(&events, |_| true);
    assert_eq!(
        (now["event"].as_str(), now["state"].as_str()),
        (Some("state"), Some("connected"))
    );

    let answer = json_of(
        d.synesis()
            .args(["--json", "cloud", "ask", "--max-tokens", "4", "hi"]),
    );
    let id = answer["request_id"].clone();
    let started = next_event(&events, |e| e["event"] == "escalation_started");
    assert_eq!(
        (&started["request_id"], &started["model"]),
        (&id, &serde_json::json!("tiny"))
    );
    let finished = next_event(&events, |e| e["event"] == "escalation_finished");
    assert_eq!(finished["request_id"], id);
    assert_eq!(finished["outcome"], "done");
    assert_eq!(
        finished["cost_micro_usd"], answer["total_micro_usd"],
        "{answer}"
    );

    // The cloud dies and comes back: the feed shows the tunnel leave and regain it.
    signal(t.cloud.process.pid(), "KILL");
    let lost = next_event(&events, |e| {
        e["event"] == "state" && e["state"] != "connected"
    });
    assert!(lost["reason"].is_string(), "a reason: {lost}");
    t.cloud.restart();
    let back = next_event(&events, |e| {
        e["event"] == "state" && e["state"] == "connected"
    });
    assert!(back["reconnects"].as_u64().unwrap() >= 1, "{back}");

    run_ok(d.synesis().args(["tunnel", "stop"]));
    let last = next_event(&events, |e| e["event"] == "stopping");
    assert_eq!(last["grace_ms"], 30_000);
    assert!(
        feed.wait().unwrap().success(),
        "the feed ends with the service"
    );
}

#[test]
fn the_service_keeps_the_model_loaded_so_a_second_ask_skips_the_load() {
    let t = tiny_cloud("");
    let d = &t.owner;
    let _service = KillsService(d);
    let ask = || {
        json_of(
            d.synesis()
                .args(["--json", "ask", "--local", "--max-tokens", "4", "hello"]),
        )
    };
    let alone = ask();
    assert_eq!(
        (&alone["model_in"], &alone["model_loaded_now"]),
        (&serde_json::json!("this process"), &serde_json::json!(true))
    );
    start(d);
    let first = ask();
    assert_eq!(first["model_in"], "the service", "{first}");
    assert_eq!(first["model_loaded_now"], true, "{first}");
    let second = ask();
    assert_eq!(second["model_loaded_now"], false, "kept loaded: {second}");
    assert_eq!(
        second["text"], alone["text"],
        "the same greedy answer either way"
    );
    run_ok(d.synesis().args(["tunnel", "stop"]));
}
