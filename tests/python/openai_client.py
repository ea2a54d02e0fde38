"""The device's OpenAI-compatible API (`synesis serve`) through the official `openai` client.

Run by tests/tests/openai_api.rs with BASE_URL, LOCAL_MODEL, CLOUD_MODEL and API_KEY (the
enrolled device's key, which every request carries) set. Each check
raises on failure; the last line printed is a JSON object with what the Rust side checks next
(the request cut mid-stream, whose charge the cloud settles).
"""

import json
import os
import urllib.error
import urllib.request

import openai

base_url = os.environ["BASE_URL"]
local_model = os.environ["LOCAL_MODEL"]
cloud_model = os.environ["CLOUD_MODEL"]
api_key = os.environ.get("API_KEY", "unused")
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
hello = [{"role": "user", "content": "hello"}]


def check(condition, what):
    if not condition:
        raise AssertionError(what)
    print("ok:", what, flush=True)


ids = [m.id for m in client.models.list()]
check(local_model in ids and "auto" in ids and cloud_model in ids, f"/v1/models lists {ids}")

# Not streamed: the answer whole, the route and cost in the headers.
for model, route in [(local_model, "local"), (cloud_model, "cloud")]:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=hello, max_tokens=8)
    answer = raw.parse()
    check(raw.headers["x-synesis-route"] == route, f"{model} answered by the {route} route")
    check(raw.headers["x-synesis-request-id"] in answer.id, "the request id in the header and the id")
    cost = int(raw.headers["x-synesis-cost-micro-usd"])
    check((cost > 0) == (route == "cloud"), f"{model} cost {cost} µUSD")
    check(isinstance(answer.choices[0].message.content, str), "a text answer")
    check(0 < answer.usage.completion_tokens <= 8, f"usage {answer.usage}")
    check(answer.choices[0].finish_reason in ("stop", "length"), "a finish reason")

# Streamed, with the usage (and the cost) in the last chunk.
for model in [local_model, cloud_model]:
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=hello,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1]
    check(last.usage is not None and last.usage.completion_tokens > 0, f"{model}: usage last")
    check(isinstance(text, str), f"{model}: streamed {len(chunks)} chunks")
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(finish in (["stop"], ["length"]), f"{model}: one finish reason {finish}")
    synesis = (last.model_extra or {}).get("x_synesis", {})
    check(
        (synesis.get("cost_micro_usd", 0) > 0) == (model == cloud_model),
        f"{model}: the cost in the last chunk {synesis}",
    )

# Errors: OpenAI's shape and status codes.
try:
    client.chat.completions.create(model="no-such-model", messages=hello)
    raise AssertionError("an unknown model was answered")
except openai.NotFoundError as e:
    check(e.status_code == 404 and e.body["code"] == "model_not_found", f"unknown model: {e.body}")

# What the cloud does not take yet (a raw prompt) is refused by name for a cloud model, never
# passed on without it.
try:
    client.completions.create(model=cloud_model, prompt="hello", max_tokens=4)
    raise AssertionError("a raw prompt went to the cloud")
except openai.BadRequestError as e:
    check(
        e.body["code"] == "unsupported_parameter" and "raw prompt" in e.body["message"],
        f"a raw prompt for a cloud model: {e.body['message']}",
    )



def post(body):
    """Status and JSON body of a raw POST to /chat/completions."""
    request = urllib.request.Request(f"{base_url}/chat/completions", data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


status, body = post(b"{not json")
check(status == 400 and body["error"]["type"] == "invalid_request_error", f"bad JSON: {body}")
status, body = post(b"x" * (2 << 20))
check(status == 413 and body["error"]["code"] == "request_too_large", f"oversize body: {body}")
try:
    client.chat.completions.create(model=local_model, messages=[])
    raise AssertionError("an empty conversation was answered")
except openai.BadRequestError as e:
    check(e.status_code == 400, f"no messages: {e.body}")

# A client that goes away mid-stream: the answer stops, and the cloud charges what it made.
stream = client.chat.completions.create(
    model=cloud_model, messages=hello, max_tokens=400, stream=True
)
seen = 0
cut_id = None
for chunk in stream:
    cut_id = chunk.id.removeprefix("chatcmpl-")
    if chunk.choices and chunk.choices[0].delta.content:
        seen += 1
    if seen >= 3:
        break
stream.close()
check(cut_id is not None, "a stream cut after 3 pieces")
print(json.dumps({"cut_request_id": cut_id}), flush=True)
