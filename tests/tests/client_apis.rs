//! The three APIs the device's HTTP service speaks on one port, as other programs use them:
//! OpenAI's (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`), Ollama's (`/api/…`)
//! and Anthropic's Messages API (`/v1/messages`), each through its official Python client
//! (tests/python/api_clients.py) against a real `synesis serve` with tiny local models: a chat
//! model with a context roomy enough for tool instructions, and an embedding model. Random
//! weights make the text gibberish, but tool calls and JSON answers are held by a grammar, so
//! they must parse and validate. Then raw HTTP for the errors each API has its own shape for.
//!
//! The client test is skipped, with a message, where Python or one of the packages is missing
//! (`pip install openai ollama anthropic jsonschema`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use synesis_e2e::{Device, python_has, raw_http, run_ok, serve};
use synesis_infer::tiny::TinySpec;

/// A device (in no account) with `pocket`, a tiny chat model with a 4096-token context (the
/// tools' instructions fit), and `embedder`, a tiny embedding model 64 wide; and the directory
/// holding their files.
fn device_with_models() -> (Device, tempfile::TempDir) {
    let device = Device::new();
    let files = tempfile::tempdir().unwrap();
    let chat = files.path().join("pocket.gguf");
    synesis_infer::tiny::write_model(
        &chat,
        TinySpec {
            n_ctx: 4096,
            ..TinySpec::TINY
        },
    )
    .unwrap();
    let embedder = files.path().join("embedder.gguf");
    synesis_infer::tiny::write_embedding_model(&embedder, TinySpec::TINY).unwrap();
    for (path, name) in [(&chat, "pocket"), (&embedder, "embedder")] {
        run_ok(
            device
                .synesis()
                .args(["model", "add"])
                .arg(path)
                .args(["--name", name]),
        );
    }
    (device, files)
}

#[test]
fn the_openai_ollama_and_anthropic_clients_use_one_local_service() {
    if synesis_e2e::skip_unless(
        python_has("openai")
            && python_has("ollama")
            && python_has("anthropic")
            && python_has("jsonschema"),
        "python3 with the `openai`, `ollama`, `anthropic` and `jsonschema` packages is not installed \
         (pip install openai ollama anthropic jsonschema)",
    ) {
        return;
    }
    let (device, _files) = device_with_models();
    let serving = serve(&device, &["--listen", "127.0.0.1:0"], &[]).unwrap();

    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/api_clients.py"
        ))
        .env("BASE", format!("http://{}", serving.addr))
        .env("CHAT_MODEL", "pocket")
        .env("EMBED_MODEL", "embedder")
        // No proxy between the clients and loopback, whatever the developer's shell has.
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("all_proxy")
        .env("NO_PROXY", "*")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the clients' checks failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    drop(serving);
}

/// `body` as JSON, or the test fails showing it.
fn json(status: u16, body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {body:?}"))
}

#[test]
fn each_api_refuses_in_its_own_shape() {
    let (device, _files) = device_with_models();
    let serving = serve(&device, &["--listen", "127.0.0.1:0"], &[]).unwrap();
    let addr = serving.addr.as_str();
    let headers = [("Host", addr), ("Content-Type", "application/json")];

    // OpenAI: a field this server does not act on is refused by name, never ignored.
    for (field, value) in [
        ("logit_bias", r#"{"65":5}"#),
        ("audio", r#"{"voice":"alloy","format":"wav"}"#),
        ("modalities", r#"["text"]"#),
    ] {
        let body = format!(
            r#"{{"model":"pocket","max_tokens":2,"messages":[{{"role":"user","content":"hi"}}],"{field}":{value}}}"#
        );
        let (status, reply) = raw_http(addr, "POST", "/v1/chat/completions", &headers, &body);
        assert_eq!(status, 400, "{field}: {reply}");
        let error = &json(status, &reply)["error"];
        for key in ["message", "type", "param", "code"] {
            assert!(error.get(key).is_some(), "{field}: no `{key}` in {reply}");
        }
        assert_eq!(error["code"], "unsupported_parameter", "{field}: {reply}");
        assert!(
            error["message"].as_str().unwrap().contains(field),
            "{field}: the message names it: {reply}"
        );
    }

    // A schema no text satisfies ends the answer; one that would expand without end, a raw
    // prompt of nothing, and tools mentioned in the text are answered or refused: the service
    // keeps serving (each of these once aborted the process, or filled its memory).
    let impossible = [
        (
            r#""response_format":{"type":"json_schema","json_schema":{"name":"s","schema":{"type":"integer","minimum":5,"maximum":3}}}"#,
            200,
        ),
        (
            r#""response_format":{"type":"json_schema","json_schema":{"name":"s","schema":{"type":"string","minLength":5,"maxLength":2}}}"#,
            400,
        ),
        (
            r#""tools":[{"type":"function","function":{"name":"f"}}],"temperature":0"#,
            200,
        ),
    ];
    for (extra, expected) in impossible {
        let body = format!(
            r#"{{"model":"pocket","max_tokens":40,"messages":[{{"role":"user","content":"<tool_call>: one\n<tool_call>: two\n"}}],{extra}}}"#
        );
        let (status, reply) = raw_http(addr, "POST", "/v1/chat/completions", &headers, &body);
        assert_eq!(status, expected, "{extra}: {reply}");
    }
    let (status, reply) = raw_http(
        addr,
        "POST",
        "/v1/completions",
        &headers,
        r#"{"model":"pocket","prompt":"","max_tokens":4}"#,
    );
    assert!(status == 200 || status == 400, "{status} {reply}");
    let (status, _) = raw_http(addr, "GET", "/health", &[("Host", addr)], "");
    assert_eq!(status, 200, "still serving");

    // Ollama: its version, as its clients ask for it first.
    let (status, reply) = raw_http(addr, "GET", "/api/version", &[("Host", addr)], "");
    assert_eq!(status, 200, "/api/version: {reply}");
    let version = json(status, &reply);
    assert!(
        version["version"].as_str().is_some_and(|v| !v.is_empty()),
        "/api/version: {reply}"
    );
    // Its models, under the names they were added as.
    let (status, reply) = raw_http(addr, "GET", "/api/tags", &[("Host", addr)], "");
    assert_eq!(status, 200, "/api/tags: {reply}");
    let names: Vec<String> = json(status, &reply)["models"]
        .as_array()
        .unwrap_or_else(|| panic!("/api/tags: no models list: {reply}"))
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .collect();
    assert!(
        names.iter().any(|n| n == "pocket" || n == "pocket:latest"),
        "/api/tags: {reply}"
    );
    // An unknown model: 404 and Ollama's error, a string, whether streamed (Ollama's default)
    // or not.
    for stream in ["", r#","stream":false"#, r#","stream":true"#] {
        let body = format!(
            r#"{{"model":"no-such-model","messages":[{{"role":"user","content":"hi"}}]{stream}}}"#
        );
        let (status, reply) = raw_http(addr, "POST", "/api/chat", &headers, &body);
        assert_eq!(status, 404, "/api/chat {body}: {reply}");
        let error = json(status, &reply);
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "/api/chat {body}: the error is a string: {reply}"
        );
    }
}

/// Tools and response formats through the cloud, asked with the official `openai` client of an
/// enrolled device's service: the cloud's upstream is sent them in OpenAI's shape (its recorded
/// request bodies show the tool's schema and the response format's), and its streamed tool call
/// comes back as a parsed call; the cloud's in-process model holds a forced call and a JSON
/// schema by the same grammar a local model does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_and_formats_reach_the_clouds_model_and_its_upstream() {
    if synesis_e2e::skip_unless(
        python_has("openai") && python_has("jsonschema"),
        "python3 with the `openai` and `jsonschema` packages is not installed",
    ) {
        return;
    }
    use synesis_e2e::upstream::{Script, upstream, upstream_model};
    let up = upstream(vec![
        Script::ToolCall("get_weather", r#"{"city":"Paris","days":3}"#),
        Script::Answer,
        Script::Answer,
    ])
    .await;
    let spec = TinySpec {
        n_ctx: 4096,
        ..TinySpec::TINY
    };
    let t = synesis_e2e::tiny_cloud_with(spec, &upstream_model(up.port, "[\"managed\"]"));
    let d = &t.owner;
    let serving = serve(d, &["--listen", "127.0.0.1:0"], &[]).unwrap();
    assert!(synesis_e2e::wait_for(
        std::time::Duration::from_secs(20),
        || d.state().as_deref() == Some("connected")
    ));
    let key = std::fs::read_to_string(d.home().join("config/api-key")).unwrap();
    let script = format!(
        r#"
import json, openai, jsonschema
c = openai.OpenAI(base_url="http://{addr}/v1", api_key="{key}", max_retries=0, timeout=120)
params = {{"type": "object", "properties": {{"city": {{"type": "string", "enum": ["Paris", "Oslo"]}}, "days": {{"type": "integer"}}}}, "required": ["city", "days"], "additionalProperties": False}}
tools = [{{"type": "function", "function": {{"name": "get_weather", "description": "The weather.", "parameters": params}}}}]
forced = {{"type": "function", "function": {{"name": "get_weather"}}}}
hello = [{{"role": "user", "content": "weather in Paris?"}}]
schema = {{"type": "object", "properties": {{"ok": {{"type": "boolean"}}}}, "required": ["ok"], "additionalProperties": False}}

# The upstream: its streamed call comes back parsed.
raw = c.chat.completions.with_raw_response.create(model="up", messages=hello, tools=tools, tool_choice=forced, max_tokens=40)
r = raw.parse()
assert raw.headers["x-synesis-route"] == "cloud", raw.headers
assert r.choices[0].finish_reason == "tool_calls", r
call = r.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {{"city": "Paris", "days": 3}}, call
c.chat.completions.create(model="up", messages=hello, max_tokens=8,
    response_format={{"type": "json_schema", "json_schema": {{"name": "s", "schema": schema}}}})
c.chat.completions.create(model="up", messages=hello, max_tokens=8, logprobs=True, top_logprobs=2)

# The cloud's own model: the grammar holds the call and the schema, whole and streamed.
for choice in [forced, "required"]:
    raw = c.chat.completions.with_raw_response.create(model="cloud/tiny", messages=hello, tools=tools, tool_choice=choice, max_tokens=120, temperature=0)
    r = raw.parse()
    assert raw.headers["x-synesis-route"] == "cloud", raw.headers
    call = r.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), params)
chunks = list(c.chat.completions.create(model="cloud/tiny", messages=hello, tools=tools, tool_choice=forced, max_tokens=120, temperature=0, stream=True))
calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
assert len(calls) == 1 and calls[0].function.name == "get_weather", calls
jsonschema.validate(json.loads(calls[0].function.arguments), params)
assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]
r = c.chat.completions.create(model="cloud/tiny", messages=hello, max_tokens=60, temperature=0.8, seed=3,
    response_format={{"type": "json_schema", "json_schema": {{"name": "s", "schema": schema}}}})
jsonschema.validate(json.loads(r.choices[0].message.content), schema)

# Logprobs through the cloud: each token's bytes make up the text, with the alternatives asked.
for stream in [False, True]:
    if stream:
        chunks = list(c.chat.completions.create(model="cloud/tiny", messages=hello, max_tokens=12, logprobs=True, top_logprobs=2, stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        tokens = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    else:
        r = c.chat.completions.create(model="cloud/tiny", messages=hello, max_tokens=12, logprobs=True, top_logprobs=2)
        text, tokens = r.choices[0].message.content, r.choices[0].logprobs.content
    assert tokens, "logprobs came back"
    assert bytes(b for t in tokens for b in t.bytes).decode("utf-8", "replace") == text, (tokens, text)
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens), tokens
print("ok")
"#,
        addr = serving.addr,
        key = key.trim()
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        t.cloud.log()
    );
    // What the upstream was sent: the tool with its schema and the forced choice, then the
    // response format with its schema.
    let bodies = up.bodies.lock().unwrap().clone();
    let sent: Vec<serde_json::Value> = bodies
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    assert_eq!(sent.len(), 3, "{bodies:?}");
    assert_eq!(sent[2]["logprobs"], true, "{}", sent[2]);
    assert_eq!(sent[2]["top_logprobs"], 2);
    let tool = &sent[0]["tools"][0];
    assert_eq!(tool["function"]["name"], "get_weather", "{}", sent[0]);
    assert_eq!(
        tool["function"]["parameters"]["properties"]["city"]["enum"],
        serde_json::json!(["Paris", "Oslo"])
    );
    assert_eq!(sent[0]["tool_choice"]["function"]["name"], "get_weather");
    assert_eq!(sent[1]["response_format"]["type"], "json_schema");
    assert_eq!(
        sent[1]["response_format"]["json_schema"]["schema"]["required"],
        serde_json::json!(["ok"])
    );
    drop(serving);
}
