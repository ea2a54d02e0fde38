//! The device's OpenAI-compatible HTTP API (`synesis serve`) as other programs use it: the
//! official `openai` Python client (tests/python/openai_client.py) against a real service with a
//! local model and a cloud one, and raw HTTP for who may call it. The Python test is skipped,
//! with a message, where Python or the `openai` package is missing (`pip install openai`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Duration;

use synesis_e2e::upstream::{Script, upstream, upstream_model};
use synesis_e2e::{Device, json_of, raw_http, run_ok, serve, wait_for};

/// One HTTP/1.1 request: the status code and the body.
fn http(addr: &str, method: &str, path: &str, key: Option<&str>) -> (u16, String) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Host", addr)];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    raw_http(addr, method, path, &headers, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_chats_streams_lists_models_and_gets_openai_errors() {
    if synesis_e2e::skip_unless(
        synesis_e2e::python_has("openai"),
        "python3 with the `openai` package is not installed (pip install openai)",
    ) {
        return;
    }
    // The cloud answers as `up`, the scripted upstream: the script's first two cloud requests
    // (one whole, one streamed) are answered at once; the third, the one the client cuts after
    // three pieces, gets three chunks and then waits for a release that never comes, so the
    // cut is in the middle on any machine. The device has a small local model, `pocket`.
    let up = upstream(vec![Script::Answer, Script::Answer, Script::Paced(400)]).await;
    up.release(3);
    let t = synesis_e2e::tiny_cloud(&upstream_model(up.port, "[\"managed\"]"));
    let d = &t.owner;
    run_ok(d.synesis().args(["model", "rm", "tiny"]));
    let pocket = t.files.path().join("pocket.gguf");
    synesis_infer::tiny::write_model(&pocket, synesis_infer::tiny::TinySpec::TINY).unwrap();
    run_ok(
        d.synesis()
            .args(["model", "add"])
            .arg(&pocket)
            .args(["--name", "pocket"]),
    );
    let serving = serve(d, &["--listen", "127.0.0.1:0"], &[]).unwrap();
    assert!(wait_for(Duration::from_secs(20), || d.state().as_deref()
        == Some("connected")));

    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/openai_client.py"
        ))
        .env("BASE_URL", format!("http://{}/v1", serving.addr))
        .env("LOCAL_MODEL", "pocket")
        .env("CLOUD_MODEL", "up")
        // The enrolled device's API needs its key (made on the service's first start).
        .env(
            "API_KEY",
            std::fs::read_to_string(d.home().join("config/api-key"))
                .unwrap()
                .trim(),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let cut = last["cut_request_id"].as_str().unwrap().to_owned();

    // The cut answer: cancelled on the cloud, charged for what it made.
    let mut charged = None;
    assert!(
        wait_for(Duration::from_secs(30), || {
            let usage = json_of(d.synesis().args(["--json", "cloud", "usage"]));
            charged = usage["charges"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["request_id"] == cut.as_str())
                .cloned();
            charged.is_some()
        }),
        "the cut request is charged: {}",
        t.cloud.log()
    );
    let charged = charged.unwrap();
    assert_eq!(
        charged["output_tokens"], 3,
        "charged for the three made, not all 400 tokens: {charged}"
    );
    assert_eq!(up.requests(), 3, "the cut request was the script's third");
    assert!(
        wait_for(Duration::from_secs(30), || up.dropped() == 1),
        "the cloud stopped the upstream"
    );
    drop(serving);
}

#[test]
fn a_remote_address_needs_allow_remote_and_a_key_which_requests_then_carry() {
    let device = Device::new();
    run_ok(device.synesis().args(["model", "add", "--tiny", "pocket"]));
    let refused = serve(&device, &["--listen", "0.0.0.0:0"], &[])
        .err()
        .unwrap();
    assert!(refused.contains("--allow-remote"), "{refused}");
    let refused = serve(&device, &["--listen", "0.0.0.0:0", "--allow-remote"], &[])
        .err()
        .unwrap();
    assert!(refused.contains("needs an API key"), "{refused}");

    let serving = serve(
        &device,
        &["--listen", "0.0.0.0:0", "--allow-remote"],
        &[("SYNESIS_API_KEY", "sekrit")],
    )
    .unwrap();
    let port = serving.addr.rsplit_once(':').unwrap().1;
    let addr = format!("127.0.0.1:{port}");
    let (status, body) = http(&addr, "GET", "/v1/models", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains(r#""code":"invalid_api_key""#), "{body}");
    assert_eq!(http(&addr, "GET", "/v1/models", Some("wrong")).0, 401);
    let (status, body) = http(&addr, "GET", "/v1/models", Some("sekrit"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""id":"pocket""#), "{body}");
    assert_eq!(
        http(&addr, "GET", "/health", None).0,
        200,
        "health needs no key"
    );
}

/// A web page must not make the loopback API spend: a cross-site "simple" POST (text/plain,
/// no preflight), a page whose name was rebound to 127.0.0.1 (its own `Host`), or any request
/// a page sends with its `Origin` is refused before anything is read or run.
#[test]
fn web_pages_cannot_use_the_loopback_api() {
    let device = Device::new();
    run_ok(device.synesis().args(["model", "add", "--tiny", "pocket"]));
    let serving = serve(&device, &["--listen", "127.0.0.1:0"], &[]).unwrap();
    let addr = serving.addr.as_str();
    let chat = r#"{"model":"pocket","max_tokens":2,"messages":[{"role":"user","content":"hi"}]}"#;
    let json = ("Content-Type", "application/json");
    // What a program sends: answered.
    let (status, body) = raw_http(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("Host", addr), json],
        chat,
    );
    assert_eq!(status, 200, "{body}");
    // A page on another site, with a body it may send without asking first.
    let evil = ("Origin", "https://evil.example");
    let plain = ("Content-Type", "text/plain");
    let (status, body) = raw_http(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("Host", addr), evil, plain],
        chat,
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains(r#""code":"forbidden_origin""#), "{body}");
    let (status, _) = raw_http(addr, "GET", "/v1/models", &[("Host", addr), evil], "");
    assert_eq!(status, 403);
    // DNS rebinding: the page's own name, resolved to 127.0.0.1.
    let rebound = ("Host", "evil.example:11435");
    let (status, _) = raw_http(addr, "POST", "/v1/chat/completions", &[rebound, json], chat);
    assert_eq!(status, 403);
    // Not JSON at all (a form, say): refused too.
    let (status, body) = raw_http(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("Host", addr), plain],
        chat,
    );
    assert_eq!(status, 415, "{body}");
    // A page on this machine (a local dev server) may.
    let local = ("Origin", "http://localhost:3000");
    let (status, _) = raw_http(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("Host", addr), local, json],
        chat,
    );
    assert_eq!(status, 200);
}

/// A client that sends each request once it has the last answer is never refused for being
/// too many at once: an answer's place among `--max-concurrent` is free by the time its client
/// has the end of it. (The service wrote its ledger entry after the answer's end went out, and
/// held the place meanwhile, so the next request of a quick client met a 429.)
#[test]
fn a_client_that_waits_for_each_answer_is_never_refused() {
    let device = Device::new();
    run_ok(device.synesis().args(["model", "add", "--tiny", "pocket"]));
    let serving = serve(
        &device,
        &["--listen", "127.0.0.1:0", "--max-concurrent", "1"],
        &[],
    )
    .unwrap();
    let body = r#"{"model":"pocket","max_tokens":2,"messages":[{"role":"user","content":"hi"}]}"#;
    let headers = [
        ("Host", serving.addr.as_str()),
        ("Content-Type", "application/json"),
    ];
    for n in 0..20 {
        let (status, reply) = raw_http(
            &serving.addr,
            "POST",
            "/v1/chat/completions",
            &headers,
            body,
        );
        assert_eq!(status, 200, "request {n}: {reply}");
    }
    // Streamed as well: the place is free once the stream has ended.
    let body = body.replace(r#""max_tokens""#, r#""stream":true,"max_tokens""#);
    for n in 0..10 {
        let (status, reply) = raw_http(
            &serving.addr,
            "POST",
            "/v1/chat/completions",
            &headers,
            &body,
        );
        assert_eq!(status, 200, "streamed request {n}: {reply}");
        assert!(reply.contains("[DONE]"), "{reply}");
    }
}

/// `/metrics` takes the key every endpoint but `/health` takes, and counts what the API did:
/// requests by endpoint and status, answers by route and outcome, tokens, the first token's
/// time; the Prometheus project's own parser reads it.
#[test]
fn the_api_counts_its_requests_and_answers_for_prometheus() {
    if synesis_e2e::skip_unless(
        synesis_e2e::python_has("prometheus_client"),
        "python3 with the `prometheus_client` package is not installed (pip install prometheus_client)",
    ) {
        return;
    }
    let device = Device::new();
    run_ok(device.synesis().args(["model", "add", "--tiny", "pocket"]));
    let key = "metrics-test-key";
    let serving = serve(
        &device,
        &["--listen", "127.0.0.1:0"],
        &[("SYNESIS_API_KEY", key)],
    )
    .unwrap();
    let addr = serving.addr.as_str();
    assert_eq!(http(addr, "GET", "/metrics", None).0, 401);
    let auth = format!("Bearer {key}");
    let headers = [
        ("Host", addr),
        ("Content-Type", "application/json"),
        ("Authorization", auth.as_str()),
    ];
    let body = r#"{"model":"pocket","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#;
    let streamed = body.replace(r#""max_tokens""#, r#""stream":true,"max_tokens""#);
    let mut tokens = (0.0, 0.0);
    for body in [body, body, streamed.as_str()] {
        let (status, reply) = raw_http(addr, "POST", "/v1/chat/completions", &headers, body);
        assert_eq!(status, 200, "{reply}");
        if !reply.contains("[DONE]") {
            let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
            tokens.0 += v["usage"]["prompt_tokens"].as_f64().unwrap();
            tokens.1 += v["usage"]["completion_tokens"].as_f64().unwrap();
        }
    }
    assert_eq!(http(addr, "GET", "/no/such/path", Some(key)).0, 404);

    let (status, text) = http(addr, "GET", "/metrics", Some(key));
    assert_eq!(status, 200, "{text}");
    let s = synesis_e2e::prometheus_samples(&text);
    let sample = |key: &str| synesis_e2e::sample(&s, key);
    assert_eq!(
        sample("synesis_api_requests_total{path=\"/v1/chat/completions\",status=\"200\"}"),
        3.0
    );
    assert_eq!(
        sample("synesis_api_requests_total{path=\"/metrics\",status=\"401\"}"),
        1.0
    );
    assert_eq!(
        sample("synesis_api_requests_total{path=\"other\",status=\"404\"}"),
        1.0
    );
    let answered: f64 = ["stop", "length"]
        .iter()
        .map(|f| {
            s.get(&format!(
                "synesis_api_answers_total{{outcome=\"{f}\",route=\"local\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(answered, 3.0, "{text}");
    assert_eq!(
        sample("synesis_api_time_to_first_token_seconds_count{route=\"local\"}"),
        3.0
    );
    // The two collected answers' usage, plus the streamed one's (at least one token each way).
    assert!(sample("synesis_api_tokens_total{direction=\"in\",route=\"local\"}") > tokens.0);
    assert!(sample("synesis_api_tokens_total{direction=\"out\",route=\"local\"}") > tokens.1);
    assert_eq!(sample("synesis_api_in_flight{}"), 0.0);
}
