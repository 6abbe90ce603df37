"""Structured output, tools and logprobs on the real default base, int4 (slow: a build and a few answers)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("torch")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

import jishi  # noqa: E402

CITY = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                         "country": {"type": "string", "maxLength": 40},
                                         "population": {"type": "integer", "minimum": 0, "maximum": 100000000}},
        "required": ["name", "country", "population"]}
QUESTIONS = ["Describe Paris as JSON.", "Give Nairobi's details as JSON.", "Tokyo as a JSON record, please.",
             "Tell me about Lima in JSON."]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from jishi.distill.base import load_base
    from jishi.pipeline import build

    bundle = build(load_base(), "int4", tmp_path_factory.mktemp("real-int4") / "int4", quiet=True, evaluate=False)
    return jishi.load(bundle)


@pytest.mark.parametrize("temperature", [0, 0.7])
def test_schema_answers_validate_on_the_real_model(model, temperature):
    for q in QUESTIONS:
        r = model.chat([{"role": "user", "content": q}], schema=CITY, temperature=temperature, seed=1,
                       max_new_tokens=120)
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), CITY)


def test_a_forced_tool_call_validates_on_the_real_model(model):
    from jishi.runtime.server import tools as T

    weather = T.Tool("get_weather", "The weather in a city",
                     {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                      "required": ["city"]})
    messages, _ = T.render([{"role": "user", "content": "What's the weather in Paris?"}], [weather], native=False)
    r = model.chat(messages, grammar=T.call_grammar([weather], "required"), temperature=0, max_new_tokens=80)
    calls = T.parse_calls(r.text)
    assert calls and calls[0]["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), weather.parameters)


def test_int4_logprobs_stay_near_score(model):
    """Decode runs one token at a time and score() many: int4 kernels round them differently.
    Bound measured on AVX-512 VNNI: median |difference| about 0.02 nats, worst about 0.5."""
    diffs = []
    for q in ["What is the capital of France?", "Write a haiku about rice.", "List three farm animals."]:
        messages = [{"role": "user", "content": q}]
        r = model.chat(messages, temperature=0.7, seed=1, max_new_tokens=64, logprobs=0)
        ids = model.tokenizer.encode(model.chat_prompt(messages), bos=False)
        tokens = [e.token for e in r.logprobs]
        scored = model.score(ids + tokens)[len(ids) - 1:]
        diffs += list(np.abs(np.array([e.logprob for e in r.logprobs]) - scored))
    assert np.median(diffs) < 0.1 and max(diffs) < 1.0, (np.median(diffs), max(diffs))


def test_memory_comes_back_after_a_burst(model):
    """RSS grows with the caches during a burst and returns to near its start once they are released."""
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("starlette")
    import threading

    import httpx
    from serving import LiveServer

    proc = psutil.Process()
    with LiveServer(model, max_concurrent=4, queue=16, release_after=2.0) as live:
        httpx.post(live.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=60)
        start, first_kv = proc.memory_info().rss, live.scheduler.kv_bytes()

        def one(i):
            httpx.post(live.url + "/v1/completions", json={"prompt": f"word number {i} " * 150, "max_tokens": 150,
                                                           "temperature": 0.8}, timeout=600)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        grown = peak = 0
        while any(t.is_alive() for t in threads):
            grown = max(grown, live.scheduler.kv_bytes())
            peak = max(peak, proc.memory_info().rss)
            threading.Event().wait(0.2)
        deadline = threading.Event()
        for _ in range(50):
            if live.scheduler.kv_bytes() == first_kv:
                break
            deadline.wait(0.2)
        assert grown > first_kv and live.scheduler.kv_bytes() == first_kv
        # most of what the burst added is given back (the allocator keeps some: measured alone,
        # 352 -> 575 -> 328 MB; inside pytest, with torch loaded, a few tens of MB stay)
        assert proc.memory_info().rss - start < (peak - start) / 2, (start >> 20, peak >> 20)
