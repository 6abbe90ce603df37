"""The Ollama-compatible API with the real ollama client: every route, streaming NDJSON, format,
options, tags as adapters, and dropping old turns past num_ctx."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
ollama = pytest.importorskip("ollama")
jsonschema = pytest.importorskip("jsonschema")

import jishi  # noqa: E402
from serving import LiveServer, build_adapted  # noqa: E402

SCHEMA = {"type": "object", "properties": {"crop": {"enum": ["rice", "maize", "beans"]},
                                           "hectares": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["crop", "hectares"]}


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_dirs):
    return jishi.load(build_adapted(tiny_dirs, tmp_path_factory.mktemp("ollama")), threads=1)


@pytest.fixture(scope="module")
def live(model):
    with LiveServer(model, max_concurrent=2, queue=4) as s:
        yield s


@pytest.fixture(scope="module")
def client(live):
    return ollama.Client(host=live.url, timeout=60)


def test_version_tags_show_and_ps(client, live, model):
    assert httpx.get(live.url + "/api/version").json()["version"]
    names = [m.model for m in client.list().models]
    assert names == [f"{model.name}:latest", f"{model.name}:alpha"]
    shown = client.show(f"{model.name}:latest")
    assert "temperature 0.7" in shown.parameters and "num_ctx 256" in shown.parameters
    assert shown.license and shown.template == model.manifest.tokenizer.chat_template
    assert shown.details.family == "llama" and shown.details.format == "onnx"
    assert shown.modelinfo["llama.context_length"] == 256
    ps = client.ps().models
    assert [m.model for m in ps] == names and ps[0].context_length == 256
    with pytest.raises(ollama.ResponseError) as info:
        client.show("nothing:latest")
    assert info.value.status_code == 404 and model.name in info.value.error


def test_chat_equals_the_runtime_whole_and_streamed(client, model):
    messages = [{"role": "user", "content": "What is a list?"}]
    ref = model.chat(messages, temperature=0, max_new_tokens=20)
    r = client.chat(model=model.name, messages=messages, options={"temperature": 0, "num_predict": 20})
    assert r.message.content == ref.text and r.done and r.done_reason == ref.finish_reason
    assert r.prompt_eval_count == ref.prompt_tokens and r.eval_count == ref.completion_tokens
    parts = list(client.chat(model=f"{model.name}:latest", messages=messages, stream=True,
                             options={"temperature": 0, "num_predict": 20}))
    assert "".join(p.message.content for p in parts) == ref.text
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert parts[-1].eval_duration >= 0 and parts[-1].total_duration > 0


def test_generate_applies_the_template_raw_does_not(client, model):
    ref = model.chat([{"role": "user", "content": "Hello"}], temperature=0, max_new_tokens=12)
    r = client.generate(model=model.name, prompt="Hello", options={"temperature": 0, "num_predict": 12})
    assert r.response == ref.text
    assert r.context[:r.prompt_eval_count] == model.tokenizer.encode(model.chat_prompt(
        [{"role": "user", "content": "Hello"}]), bos=False)
    raw = model.generate("The value of", temperature=0, max_new_tokens=12)
    r = client.generate(model=model.name, prompt="The value of", raw=True, options={"temperature": 0, "num_predict": 12})
    assert r.response == raw.text
    streamed = "".join(p.response for p in client.generate(model=model.name, prompt="The value of", raw=True,
                                                           stream=True, options={"temperature": 0, "num_predict": 12}))
    assert streamed == raw.text


def test_format_json_and_a_schema(client, model):
    for seed in range(3):
        r = client.chat(model=model.name, messages=[{"role": "user", "content": "The farm?"}], format=SCHEMA,
                        options={"temperature": 1.0, "seed": seed, "num_predict": 60})
        jsonschema.validate(json.loads(r.message.content), SCHEMA)
    r = client.generate(model=model.name, prompt="Field", format=SCHEMA, options={"seed": 1, "num_predict": 60})
    jsonschema.validate(json.loads(r.response), SCHEMA)


def test_options_seed_stop_and_the_adapter_tag(client, model):
    opts = {"temperature": 1.0, "seed": 9, "num_predict": 16, "top_k": 20, "top_p": 0.9, "min_p": 0.05,
            "repeat_penalty": 1.2}
    a = client.generate(model=model.name, prompt="Once", raw=True, options=opts).response
    b = client.generate(model=model.name, prompt="Once", raw=True, options=opts).response
    ref = model.generate("Once", max_new_tokens=16, temperature=1.0, seed=9, top_k=20, top_p=0.9, min_p=0.05,
                         repetition_penalty=1.2).text
    assert a == b == ref
    plain = client.generate(model=model.name, prompt="The value of", raw=True,
                            options={"temperature": 0, "num_predict": 20}).response
    cut = plain[3:6]
    stopped = client.generate(model=model.name, prompt="The value of", raw=True,
                              options={"temperature": 0, "num_predict": 20, "stop": [cut]})
    assert stopped.response == plain[:plain.find(cut)] and stopped.done_reason == "stop"
    adapted = client.generate(model=f"{model.name}:alpha", prompt="The value of", raw=True,
                              options={"temperature": 0, "num_predict": 20}).response
    assert adapted == model.generate("The value of", temperature=0, max_new_tokens=20, adapter="alpha").text
    assert adapted != plain


def test_old_turns_go_past_num_ctx_but_never_the_system_prompt(client, model, live):
    system = {"role": "system", "content": "You are brief."}
    history = []
    for i in range(8):
        history += [{"role": "user", "content": f"Question {i} about lists and tuples?"},
                    {"role": "assistant", "content": "Lists change; tuples do not. " * 3}]
    messages = [system] + history + [{"role": "user", "content": "And sets?"}]
    full = len(model.tokenizer.encode(model.chat_prompt(messages), bos=False))
    assert full > 200
    r = client.chat(model=model.name, messages=messages, options={"num_ctx": 200, "num_predict": 20,
                                                                  "temperature": 0})
    assert r.prompt_eval_count + 20 <= 200
    # exactly the newest turns that fit, with the system prompt first
    kept = None
    for start in range(0, len(history) + 1, 2):
        trial = [system] + history[start:] + messages[-1:]
        n = len(model.tokenizer.encode(model.chat_prompt(trial), bos=False))
        if n + 20 <= 200:
            kept = trial
            break
    assert r.prompt_eval_count == len(model.tokenizer.encode(model.chat_prompt(kept), bos=False))
    ref = model.chat(kept, temperature=0, max_new_tokens=20)
    assert r.message.content == ref.text
    # the OpenAI route keeps its clear 400 for the same conversation
    too_long = httpx.post(live.url + "/v1/chat/completions", json={"messages": messages * 3, "max_tokens": 20})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body, words", [
    ({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "options": {"temperature": "hot"}},
     "'options.temperature' must be a number"),
    ({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "options": {"top_p": 5}},
     "'options.top_p'"),
    ({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "format": "xml"}, "'format' must be"),
    ({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "format": {"type": 3}},
     "not a valid JSON Schema"),
    ({"model": "llama", "messages": "hi"}, "'messages' must be"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "'model' is required"),
])
def test_bad_ollama_requests_are_400_with_an_error_string(live, body, words):
    r = httpx.post(live.url + "/api/chat", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]


@pytest.fixture(scope="module")
def roomy(tiny_tokenizer, tmp_path_factory):
    """A tiny Llama with a context of 1024: a tool list takes room in the prompt."""
    from conftest import make_tiny

    from jishi.pipeline import build

    root = tmp_path_factory.mktemp("ollama-roomy")
    base = make_tiny("llama", root / "base", tiny_tokenizer, max_position_embeddings=1024)
    model = jishi.load(build(str(base), "fp32", root / "roomy", context=1024, evaluate=False, quiet=True), threads=1)
    with LiveServer(model, max_concurrent=2, queue=4) as s:
        yield model, ollama.Client(host=s.url, timeout=60)


def test_chat_tools_in_ollama_shape(roomy):
    model, client = roomy
    tool = {"type": "function", "function": {"name": "water_level", "description": "The tank's water level",
                                             "parameters": {"type": "object", "properties": {
                                                 "tank": {"enum": ["north", "south"]}}, "required": ["tank"]}}}
    calls = []
    for seed in range(8):
        r = client.chat(model=model.name, messages=[{"role": "user", "content": "How full is the north tank?"}],
                        tools=[tool], options={"temperature": 1.0, "seed": seed, "num_predict": 60})
        if r.message.tool_calls:
            calls.append(r.message.tool_calls[0])
        else:
            assert not r.message.content.startswith("<")
    for call in calls:  # arguments arrive as an object, as Ollama sends them
        assert call.function.name == "water_level"
        jsonschema.validate(dict(call.function.arguments), tool["function"]["parameters"])


def test_a_tool_call_answer_has_ollamas_shape(model):
    """A generation that wrote a call (token by token, as the grammar makes it) renders as Ollama's
    message.tool_calls, with the arguments as an object; the ollama client's own model reads it."""
    import numpy as np

    from jishi.runtime.generation import Generation
    from jishi.runtime.sampling import SamplingParams
    from jishi.runtime.server.dialect_ollama import Renderer

    text = '<tool_call>\n{"name": "water_level", "arguments": {"tank": "north"}}\n</tool_call>'
    ids = model.tokenizer.encode(text) + [2]
    gen = Generation(model.tokenizer, [1], len(ids), SamplingParams(temperature=0), vocab_size=384)
    for t in ids:
        logits = np.zeros(384, np.float32)
        logits[t] = 1.0
        gen.push(logits)
    assert gen.done and gen.text == text
    body = Renderer(model.name, True, 1, tools_on=True, context=None).whole([gen])
    r = ollama.ChatResponse.model_validate(body)
    assert r.message.content == "" and r.done
    assert r.message.tool_calls[0].function.name == "water_level"
    assert dict(r.message.tool_calls[0].function.arguments) == {"tank": "north"}
