"""The device's HTTP API (`synesis serve`) through the official clients of three APIs: OpenAI's
(`openai`), Ollama's (`ollama`) and Anthropic's Messages API (`anthropic`), with `jsonschema`
checking what a grammar was to hold the model to.

Run by tests/tests/client_apis.rs with BASE (`http://127.0.0.1:PORT`), CHAT_MODEL (a tiny local
chat model with a long context) and EMBED_MODEL (a tiny local embedding model, 64 wide) set. The
device is in no account, so no key is needed; the clients send placeholders.

The weights are random: text is gibberish, but what a grammar holds (tool calls, JSON) must parse
and validate. Every check prints `ok: …`; a failed check prints `FAIL: …` with its traceback and
the next section still runs, so one run tells everything that fails. The script exits non-zero
when anything failed, its last line naming the failed sections.
"""

import json
import math
import os
import sys
import traceback

import anthropic
import jsonschema
import ollama
import openai

BASE = os.environ["BASE"].rstrip("/")
CHAT_MODEL = os.environ["CHAT_MODEL"]
EMBED_MODEL = os.environ["EMBED_MODEL"]
EMBED_WIDTH = 64

oa = openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)
ol = ollama.Client(host=BASE, timeout=120)
an = anthropic.Anthropic(base_url=BASE, api_key="unused", max_retries=0, timeout=120)

HELLO = [{"role": "user", "content": "hello"}]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo"]},
        "days": {"type": "integer"},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER_DESCRIPTION = "The weather forecast for a city, for a number of days."
OPENAI_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": WEATHER_DESCRIPTION, "parameters": WEATHER_SCHEMA},
}
ANTHROPIC_TOOL = {"name": "get_weather", "description": WEATHER_DESCRIPTION, "input_schema": WEATHER_SCHEMA}
# What a response format holds the answer to: every value bounded, so an answer fits the budget.
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo"]},
        "days": {"type": "integer"},
        "umbrella": {"type": "boolean"},
    },
    "required": ["city", "days", "umbrella"],
    "additionalProperties": False,
}
# Greedy, for the Anthropic client, which has no `temperature` argument (the API takes one).
GREEDY = {"temperature": 0}
# Enough for a tool call or a schema's answer; the model's vocabulary is byte-level.
ROOMY = 200
FEW = 16

failed = []


def check(condition, what):
    if not condition:
        raise AssertionError(what)
    print("ok:", what, flush=True)


def section(fn):
    """Runs one group of checks at once; a failure is printed and recorded, not fatal."""
    name = fn.__name__
    print(f"== {name}", flush=True)
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every failure is reported, whatever it is
        failed.append(name)
        print(f"FAIL: {name}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
    return fn


def valid(instance, schema, what):
    try:
        jsonschema.validate(instance, schema)
    except jsonschema.ValidationError as e:
        raise AssertionError(f"{what}: {instance!r} does not validate: {e.message}") from e
    print("ok:", what, "validates:", json.dumps(instance), flush=True)


def parsed(text, what):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{what}: not JSON ({e}): {text!r}") from e


def unit(vector):
    return abs(math.sqrt(sum(x * x for x in vector)) - 1.0) < 1e-3


def known_model(names, model):
    """Whether a list of Ollama model names has `model` (Ollama adds `:latest` to a bare name)."""
    return model in names or f"{model}:latest" in names


# ---------------------------------------------------------------------------------------------
# OpenAI
# ---------------------------------------------------------------------------------------------


def openai_call_checked(message, finish_reason, what):
    check(finish_reason == "tool_calls", f"{what}: finish_reason tool_calls (got {finish_reason!r})")
    calls = message.tool_calls or []
    check(len(calls) >= 1, f"{what}: a tool call in message.tool_calls ({len(calls)})")
    call = calls[0]
    check(call.type == "function" and call.id, f"{what}: a function call with an id ({call.id!r})")
    check(call.function.name == "get_weather", f"{what}: named get_weather ({call.function.name!r})")
    valid(parsed(call.function.arguments, f"{what}: arguments"), WEATHER_SCHEMA, f"{what}: arguments")


@section
def openai_forced_tool_call():
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = oa.chat.completions.create(
        model=CHAT_MODEL,
        messages=WEATHER_QUESTION,
        tools=[OPENAI_TOOL],
        tool_choice=named,
        max_tokens=ROOMY,
        temperature=0,
    )
    choice = r.choices[0]
    openai_call_checked(choice.message, choice.finish_reason, "a named tool_choice, whole")


@section
def openai_forced_tool_call_streamed():
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = oa.chat.completions.create(
        model=CHAT_MODEL,
        messages=WEATHER_QUESTION,
        tools=[OPENAI_TOOL],
        tool_choice=named,
        max_tokens=ROOMY,
        temperature=0,
        stream=True,
    )
    calls = {}
    finish = []
    deltas = 0
    for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        if c.finish_reason:
            finish.append(c.finish_reason)
        for d in c.delta.tool_calls or []:
            deltas += 1
            call = calls.setdefault(d.index, {"id": None, "type": None, "name": "", "arguments": ""})
            if d.id:
                call["id"] = d.id
            if d.type:
                call["type"] = d.type
            if d.function is not None:
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
    check(finish == ["tool_calls"], f"streamed: one finish_reason, tool_calls ({finish})")
    check(len(calls) >= 1 and 0 in calls, f"streamed: tool_calls deltas from index 0 ({deltas} deltas)")
    call = calls[0]
    check(call["type"] == "function" and call["id"], f"streamed: a function call with an id ({call})")
    check(call["name"] == "get_weather", f"streamed: named get_weather ({call['name']!r})")
    args = parsed(call["arguments"], "streamed: arguments")
    valid(args, WEATHER_SCHEMA, "streamed: arguments")


@section
def openai_required_tool_call():
    r = oa.chat.completions.create(
        model=CHAT_MODEL,
        messages=WEATHER_QUESTION,
        tools=[OPENAI_TOOL],
        tool_choice="required",
        max_tokens=ROOMY,
        temperature=0,
    )
    choice = r.choices[0]
    openai_call_checked(choice.message, choice.finish_reason, "tool_choice required")


@section
def openai_no_tool_call():
    r = oa.chat.completions.create(
        model=CHAT_MODEL,
        messages=WEATHER_QUESTION,
        tools=[OPENAI_TOOL],
        tool_choice="none",
        max_tokens=FEW,
        temperature=0,
    )
    choice = r.choices[0]
    check(not choice.message.tool_calls, f"tool_choice none: no call ({choice.message.tool_calls})")
    check(choice.finish_reason in ("stop", "length"), f"tool_choice none: finish {choice.finish_reason!r}")
    check(isinstance(choice.message.content, str), "tool_choice none: a text answer")


def json_schema_format():
    return {"type": "json_schema", "json_schema": {"name": "forecast", "schema": ANSWER_SCHEMA}}


@section
def openai_json_schema():
    r = oa.chat.completions.create(
        model=CHAT_MODEL,
        messages=WEATHER_QUESTION,
        response_format=json_schema_format(),
        max_tokens=ROOMY,
        temperature=0,
    )
    choice = r.choices[0]
    check(choice.finish_reason == "stop", f"json_schema: finished, not cut ({choice.finish_reason!r})")
    valid(parsed(choice.message.content, "json_schema"), ANSWER_SCHEMA, "json_schema, whole")


@section
def openai_json_schema_streamed():
    stream = oa.chat.completions.create(
        model=CHAT_MODEL,
        messages=WEATHER_QUESTION,
        response_format=json_schema_format(),
        max_tokens=ROOMY,
        temperature=0,
        stream=True,
    )
    text = ""
    finish = []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].finish_reason:
                finish.append(chunk.choices[0].finish_reason)
    check(finish == ["stop"], f"json_schema streamed: finished, not cut ({finish})")
    valid(parsed(text, "json_schema streamed"), ANSWER_SCHEMA, "json_schema, streamed")


@section
def openai_json_object():
    r = oa.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Answer in JSON: what is the weather in Oslo?"}],
        response_format={"type": "json_object"},
        max_tokens=ROOMY,
        temperature=0,
    )
    choice = r.choices[0]
    content = choice.message.content
    check(choice.finish_reason == "stop", f"json_object: finished, not cut ({choice.finish_reason!r}): {content!r}")
    value = parsed(content, "json_object")
    check(isinstance(value, dict), f"json_object: an object ({type(value).__name__}): {content!r}")


def check_chat_logprobs(logprobs, content, asked, what):
    check(logprobs is not None and logprobs.content is not None, f"{what}: choices[0].logprobs.content")
    tokens = logprobs.content
    check(len(tokens) > 0, f"{what}: {len(tokens)} tokens")
    joined = "".join(t.token for t in tokens)
    if joined != content:
        as_bytes = b"".join(bytes(t.bytes or []) for t in tokens).decode("utf-8", "replace")
        raise AssertionError(
            f"{what}: tokens {joined!r} do not concatenate to the content {content!r} "
            f"(their bytes give {as_bytes!r})"
        )
    print("ok:", f"{what}: tokens concatenate to the content", flush=True)
    for t in tokens:
        if t.logprob > 0:
            raise AssertionError(f"{what}: logprob {t.logprob} > 0 for {t.token!r}")
        if len(t.top_logprobs) != asked:
            raise AssertionError(f"{what}: {len(t.top_logprobs)} top_logprobs, not {asked}, for {t.token!r}")
        for alt in t.top_logprobs:
            if alt.logprob > 0:
                raise AssertionError(f"{what}: top logprob {alt.logprob} > 0 for {alt.token!r}")
    print("ok:", f"{what}: every logprob <= 0, {asked} alternatives each", flush=True)


@section
def openai_logprobs():
    r = oa.chat.completions.create(
        model=CHAT_MODEL, messages=HELLO, logprobs=True, top_logprobs=3, max_tokens=8, temperature=0
    )
    choice = r.choices[0]
    check_chat_logprobs(choice.logprobs, choice.message.content, 3, "logprobs, whole")


@section
def openai_logprobs_streamed():
    chunks = list(
        oa.chat.completions.create(
            model=CHAT_MODEL,
            messages=HELLO,
            logprobs=True,
            top_logprobs=2,
            max_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    carrying = [i for i, c in enumerate(with_choices) if c.choices[0].logprobs is not None]
    check(carrying, f"streamed: a chunk carries choices[0].logprobs (of {len(with_choices)})")
    check(carrying[-1] < len(with_choices) - 1, f"streamed: logprobs come before the final chunk ({carrying})")
    content = []
    for i in carrying:
        content.extend(with_choices[i].choices[0].logprobs.content or [])
    lp = with_choices[carrying[0]].choices[0].logprobs.model_copy(update={"content": content})
    check_chat_logprobs(lp, text, 2, "logprobs, streamed")


@section
def openai_seed():
    def once(seed):
        r = oa.chat.completions.create(
            model=CHAT_MODEL, messages=HELLO, seed=seed, temperature=1, max_tokens=FEW
        )
        return r.choices[0].message.content

    first, second = once(42), once(42)
    check(first == second, f"seed 42 at temperature 1 twice: the same text ({first!r} vs {second!r})")


@section
def openai_stop_penalties_max_completion_tokens():
    r = oa.chat.completions.create(
        model=CHAT_MODEL,
        messages=HELLO,
        stop=["\n", "zz"],
        presence_penalty=0.5,
        frequency_penalty=0.5,
        max_completion_tokens=8,
        temperature=0,
    )
    choice = r.choices[0]
    check(r.usage.completion_tokens <= 8, f"max_completion_tokens 8: {r.usage.completion_tokens} tokens")
    content = choice.message.content or ""
    check("\n" not in content and "zz" not in content, f"stop sequences not in {content!r}")
    check(choice.finish_reason in ("stop", "length"), f"finish {choice.finish_reason!r}")


@section
def openai_unsupported_field():
    for field, extra in [("logit_bias", None), ("modalities", {"modalities": ["text"]})]:
        try:
            if extra is None:
                oa.chat.completions.create(
                    model=CHAT_MODEL, messages=HELLO, max_tokens=4, logit_bias={"65": 5}
                )
            else:
                oa.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=4, extra_body=extra)
            raise AssertionError(f"a request with `{field}` was answered")
        except openai.BadRequestError as e:
            check(e.status_code == 400, f"{field}: 400")
            check(field in str(e.message), f"{field}: the message names it: {e.message!r}")
            check(e.code == "unsupported_parameter", f"{field}: code unsupported_parameter ({e.code!r})")


@section
def openai_completions():
    r = oa.completions.create(model=CHAT_MODEL, prompt="hello", max_tokens=8, temperature=0)
    check(r.object == "text_completion", f"completions: object {r.object!r}")
    choice = r.choices[0]
    check(isinstance(choice.text, str), f"completions: text {choice.text!r}")
    check(choice.finish_reason in ("stop", "length"), f"completions: finish {choice.finish_reason!r}")
    check(r.usage is not None and 0 < r.usage.completion_tokens <= 8, f"completions: usage {r.usage}")

    chunks = list(
        oa.completions.create(model=CHAT_MODEL, prompt="hello", max_tokens=8, temperature=0, stream=True)
    )
    check(all(c.object == "text_completion" for c in chunks), f"completions streamed: {len(chunks)} chunks")
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(finish in (["stop"], ["length"]), f"completions streamed: one finish reason {finish}")
    check(text == choice.text, f"completions: streamed {text!r} = whole {choice.text!r} at temperature 0")


@section
def openai_completions_logprobs():
    r = oa.completions.create(model=CHAT_MODEL, prompt="hello", max_tokens=6, temperature=0, logprobs=2)
    choice = r.choices[0]
    lp = choice.logprobs
    check(lp is not None and lp.tokens, f"completions logprobs: tokens {lp and lp.tokens}")
    check("".join(lp.tokens) == choice.text, f"completions logprobs: tokens {lp.tokens} make {choice.text!r}")
    check(len(lp.token_logprobs) == len(lp.tokens), "completions logprobs: one logprob a token")
    check(all(x <= 0 for x in lp.token_logprobs), f"completions logprobs: <= 0 {lp.token_logprobs}")
    # Keyed by the token's text: two byte tokens that are each part of a character both read
    # as U+FFFD and fall on one key, so a token may show fewer than the 2 asked for.
    check(len(lp.top_logprobs) == len(lp.tokens), "completions logprobs: alternatives for each token")
    check(all(1 <= len(t) <= 2 for t in lp.top_logprobs), f"completions logprobs: up to 2 alternatives {lp.top_logprobs}")
    check(
        sum(len(t) == 2 for t in lp.top_logprobs) > 0,
        f"completions logprobs: 2 alternatives where their texts differ {lp.top_logprobs}",
    )


@section
def openai_embeddings():
    # As the client sends it by default (it asks for base64, and decodes it).
    r = oa.embeddings.create(model=EMBED_MODEL, input=["a", "b"])
    check(len(r.data) == 2, f"embeddings (default encoding): {len(r.data)} vectors")
    check([d.index for d in r.data] == [0, 1], "embeddings (default encoding): indexes 0, 1")
    for d in r.data:
        check(len(d.embedding) == EMBED_WIDTH, f"embeddings (default encoding): {len(d.embedding)} wide")
        check(unit(d.embedding), "embeddings (default encoding): unit length")


@section
def openai_embeddings_float():
    r = oa.embeddings.create(model=EMBED_MODEL, input=["a", "b"], encoding_format="float")
    check(len(r.data) == 2, f"embeddings (float): {len(r.data)} vectors")
    for d in r.data:
        check(len(d.embedding) == EMBED_WIDTH, f"embeddings (float): {len(d.embedding)} wide")
        check(unit(d.embedding), "embeddings (float): unit length")
    check(r.data[0].embedding != r.data[1].embedding, "embeddings (float): two texts, two vectors")


# ---------------------------------------------------------------------------------------------
# Ollama
# ---------------------------------------------------------------------------------------------

OLLAMA_TOOL = OPENAI_TOOL


@section
def ollama_list_and_show():
    listed = ol.list()
    names = [m.model for m in listed.models]
    check(known_model(names, CHAT_MODEL), f"list(): {CHAT_MODEL} among {names}")
    check(known_model(names, EMBED_MODEL), f"list(): {EMBED_MODEL} among {names}")
    shown = ol.show(CHAT_MODEL)
    check(shown is not None, f"show({CHAT_MODEL}): {shown.model_dump(exclude_none=True)}")


@section
def ollama_chat():
    options = {"temperature": 0, "num_predict": FEW}
    r = ol.chat(CHAT_MODEL, messages=HELLO, options=options)
    check(r.message.role == "assistant", f"chat: role {r.message.role!r}")
    check(isinstance(r.message.content, str), f"chat: content {r.message.content!r}")
    check(r.done is True, f"chat: done ({r.done_reason!r})")
    check(r.done_reason in ("stop", "length"), f"chat: done_reason {r.done_reason!r}")
    check(r.eval_count is None or r.eval_count <= FEW, f"chat: eval_count {r.eval_count}")

    parts = list(ol.chat(CHAT_MODEL, messages=HELLO, options=options, stream=True))
    check(len(parts) >= 1 and parts[-1].done, f"chat streamed: {len(parts)} parts, the last done")
    check(all(not p.done for p in parts[:-1]), "chat streamed: only the last part done")
    text = "".join(p.message.content or "" for p in parts)
    check(text == r.message.content, f"chat: streamed {text!r} = whole {r.message.content!r} at temperature 0")


@section
def ollama_chat_format_schema():
    r = ol.chat(
        CHAT_MODEL,
        messages=WEATHER_QUESTION,
        format=ANSWER_SCHEMA,
        options={"temperature": 0, "num_predict": ROOMY},
    )
    check(r.done_reason == "stop", f"format schema: finished, not cut ({r.done_reason!r})")
    valid(parsed(r.message.content, "format schema"), ANSWER_SCHEMA, "format schema")


@section
def ollama_chat_format_json():
    r = ol.chat(
        CHAT_MODEL,
        messages=[{"role": "user", "content": "Answer in JSON: what is the weather in Oslo?"}],
        format="json",
        options={"temperature": 0, "num_predict": ROOMY},
    )
    check(r.done_reason == "stop", f"format json: finished, not cut ({r.done_reason!r}): {r.message.content!r}")
    value = parsed(r.message.content, "format json")
    print("ok:", f"format json parses ({type(value).__name__})", flush=True)


@section
def ollama_chat_tools():
    r = ol.chat(
        CHAT_MODEL,
        messages=WEATHER_QUESTION,
        tools=[OLLAMA_TOOL],
        options={"temperature": 0, "num_predict": ROOMY},
    )
    calls = r.message.tool_calls or []
    if not calls:
        check(isinstance(r.message.content, str), f"tools: a text answer, no call ({r.message.content!r})")
        return
    for call in calls:
        check(call.function.name == "get_weather", f"tools: a call of get_weather ({call.function.name!r})")
        args = call.function.arguments
        check(isinstance(args, dict), f"tools: arguments an object ({type(args).__name__})")
        valid(dict(args), WEATHER_SCHEMA, "tools: arguments")


@section
def ollama_options():
    def once():
        r = ol.chat(
            CHAT_MODEL, messages=HELLO, options={"seed": 7, "temperature": 1, "top_p": 0.9, "top_k": 40, "num_predict": 12}
        )
        return r.message.content

    first, second = once(), once()
    check(first == second, f"options seed 7 at temperature 1 twice: the same text ({first!r} vs {second!r})")
    r = ol.chat(
        CHAT_MODEL,
        messages=HELLO,
        options={
            "temperature": 0,
            "num_predict": 8,
            "stop": ["\n", "zz"],
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
        },
    )
    content = r.message.content or ""
    check("\n" not in content and "zz" not in content, f"options stop: not in {content!r}")
    check(r.eval_count is None or r.eval_count <= 8, f"options num_predict 8: eval_count {r.eval_count}")


@section
def ollama_generate():
    options = {"num_predict": 8, "temperature": 0}
    r = ol.generate(CHAT_MODEL, "hello", options=options)
    check(isinstance(r.response, str) and r.done, f"generate: {r.response!r}, done {r.done}")
    check(r.eval_count is None or r.eval_count <= 8, f"generate: eval_count {r.eval_count}")
    parts = list(ol.generate(CHAT_MODEL, "hello", options=options, stream=True))
    check(parts and parts[-1].done, f"generate streamed: {len(parts)} parts, the last done")
    text = "".join(p.response or "" for p in parts)
    check(text == r.response, f"generate: streamed {text!r} = whole {r.response!r} at temperature 0")


@section
def ollama_embed():
    r = ol.embed(EMBED_MODEL, input=["a", "b"])
    check(len(r.embeddings) == 2, f"embed: {len(r.embeddings)} vectors")
    for v in r.embeddings:
        check(len(v) == EMBED_WIDTH, f"embed: {len(v)} wide")
        check(unit(v), "embed: unit length")


@section
def ollama_ps():
    running = ol.ps()
    names = [m.model for m in running.models]
    check(known_model(names, CHAT_MODEL), f"ps(): {CHAT_MODEL} among {names} after use")


@section
def ollama_unknown_model():
    try:
        ol.chat("no-such-model", messages=HELLO, options={"num_predict": 2})
        raise AssertionError("an unknown model was answered")
    except ollama.ResponseError as e:
        check(e.status_code == 404, f"unknown model: 404 ({e.status_code}: {e.error!r})")
    try:
        ol.generate("no-such-model", "hello", options={"num_predict": 2})
        raise AssertionError("an unknown model was answered by generate")
    except ollama.ResponseError as e:
        check(e.status_code == 404, f"unknown model, generate: 404 ({e.status_code}: {e.error!r})")


# ---------------------------------------------------------------------------------------------
# Anthropic
# ---------------------------------------------------------------------------------------------


def anthropic_tool_use_checked(message, what):
    check(message.stop_reason == "tool_use", f"{what}: stop_reason tool_use ({message.stop_reason!r})")
    uses = [b for b in message.content if b.type == "tool_use"]
    check(len(uses) >= 1, f"{what}: a tool_use block ({[b.type for b in message.content]})")
    use = uses[0]
    check(use.name == "get_weather" and use.id, f"{what}: get_weather with an id ({use.name!r}, {use.id!r})")
    check(isinstance(use.input, dict), f"{what}: input an object ({type(use.input).__name__})")
    valid(use.input, WEATHER_SCHEMA, f"{what}: input")


@section
def anthropic_text():
    m = an.messages.create(model=CHAT_MODEL, max_tokens=FEW, extra_body=GREEDY, messages=HELLO)
    check(m.type == "message" and m.role == "assistant", f"text: a message ({m.type!r}, {m.role!r})")
    check(m.content and m.content[0].type == "text", f"text: a text block ({[b.type for b in m.content]})")
    check(isinstance(m.content[0].text, str), f"text: {m.content[0].text!r}")
    check(m.stop_reason in ("end_turn", "max_tokens"), f"text: stop_reason {m.stop_reason!r}")
    check(0 < m.usage.output_tokens <= FEW, f"text: usage {m.usage}")

    m = an.messages.create(model=CHAT_MODEL, max_tokens=1, extra_body=GREEDY, messages=HELLO)
    check(m.usage.output_tokens <= 1, f"max_tokens 1: {m.usage.output_tokens} tokens")
    check(m.stop_reason in ("max_tokens", "end_turn"), f"max_tokens 1: stop_reason {m.stop_reason!r}")


@section
def anthropic_forced_tool():
    for choice in [{"type": "tool", "name": "get_weather"}, {"type": "any"}]:
        m = an.messages.create(
            model=CHAT_MODEL,
            max_tokens=ROOMY,
            extra_body=GREEDY,
            messages=WEATHER_QUESTION,
            tools=[ANTHROPIC_TOOL],
            tool_choice=choice,
        )
        anthropic_tool_use_checked(m, f"tool_choice {choice['type']}")


@section
def anthropic_auto_tool():
    m = an.messages.create(
        model=CHAT_MODEL,
        max_tokens=ROOMY,
        extra_body=GREEDY,
        messages=WEATHER_QUESTION,
        tools=[ANTHROPIC_TOOL],
        tool_choice={"type": "auto"},
    )
    if any(b.type == "tool_use" for b in m.content):
        anthropic_tool_use_checked(m, "tool_choice auto")
    else:
        check(m.stop_reason in ("end_turn", "max_tokens"), f"tool_choice auto, text: {m.stop_reason!r}")


@section
def anthropic_streamed_text():
    with an.messages.stream(model=CHAT_MODEL, max_tokens=FEW, extra_body=GREEDY, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(final.content and final.content[0].type == "text", f"streamed text: {[b.type for b in final.content]}")
    check(final.content[0].text == text, f"streamed text: the final message has the text ({text!r})")
    check(final.stop_reason in ("end_turn", "max_tokens"), f"streamed text: stop_reason {final.stop_reason!r}")
    whole = an.messages.create(model=CHAT_MODEL, max_tokens=FEW, extra_body=GREEDY, messages=HELLO)
    check(whole.content[0].text == text, f"streamed {text!r} = whole {whole.content[0].text!r} at temperature 0")


@section
def anthropic_streamed_tool():
    events = []
    with an.messages.stream(
        model=CHAT_MODEL,
        max_tokens=ROOMY,
        extra_body=GREEDY,
        messages=WEATHER_QUESTION,
        tools=[ANTHROPIC_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        for event in stream:
            kind = event.type
            if kind == "content_block_delta":
                kind += ":" + event.delta.type
            events.append(kind)
        final = stream.get_final_message()
    for needed in [
        "message_start",
        "content_block_start",
        "content_block_delta:input_json_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]:
        check(needed in events, f"streamed tool: a {needed} event")
    check(events[0] == "message_start" and events[-1] == "message_stop", f"streamed tool: events in order {events}")
    anthropic_tool_use_checked(final, "streamed tool")


@section
def anthropic_unknown_model():
    try:
        an.messages.create(model="no-such-model", max_tokens=4, messages=HELLO)
        raise AssertionError("an unknown model was answered")
    except anthropic.NotFoundError as e:
        check(e.status_code == 404, f"unknown model: NotFoundError ({e.body})")


if failed:
    print(f"FAILED: {len(failed)} sections: {', '.join(failed)}", flush=True)
    sys.exit(1)
print("all client checks passed", flush=True)
