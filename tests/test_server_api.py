"""OpenAI parity with the real openai client against a started server: structured output, tools,
logprobs against score(), n with a seed, min_p and logit_bias, and the 400s of bad values."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

import jishi  # noqa: E402
from serving import LiveServer  # noqa: E402

READING = {
    "type": "object",
    "properties": {
        "sensor": {"type": "string", "maxLength": 8},
        "celsius": {"type": "integer", "minimum": -40, "maximum": 60},
        "status": {"enum": ["ok", "check", "broken"]},
    },
    "required": ["sensor", "celsius", "status"],
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city today",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "time_now", "description": "The time",
                                          "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def model(tiny_tokenizer, tmp_path_factory):
    """A tiny Llama in fp32 with a context of 1024: the tool list takes room in the prompt."""
    from conftest import make_tiny

    from jishi.pipeline import build

    root = tmp_path_factory.mktemp("api")
    base = make_tiny("llama", root / "base", tiny_tokenizer, max_position_embeddings=1024)
    bundle = build(str(base), "fp32", root / "llama", context=1024, evaluate=False, quiet=True)
    return jishi.load(bundle, threads=1)


@pytest.fixture(scope="module")
def live(model):
    with LiveServer(model, max_concurrent=4, queue=8) as s:
        yield s


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.mark.parametrize("question", ["The greenhouse?", "Barn sensor reading", "Is the pump fine?"])
def test_json_schema_answers_validate(client, model, question):
    r = client.chat.completions.create(
        model=model.name, messages=[{"role": "user", "content": question}], temperature=1.0, seed=4, max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "reading", "schema": READING, "strict": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), READING)


def test_json_schema_streamed_and_completions_and_grammar(client, model):
    fmt = {"type": "json_schema", "json_schema": {"name": "reading", "schema": READING}}
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model.name, messages=[{"role": "user", "content": "Reading?"}], temperature=0.9, seed=2,
        max_tokens=120, response_format=fmt, stream=True) if c.choices]
    jsonschema.validate(json.loads("".join(pieces)), READING)
    r = client.completions.create(model=model.name, prompt="Reading:", max_tokens=120, temperature=0.9, seed=1,
                                  extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(r.choices[0].text), READING)
    r = client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "Rain?"}],
                                       max_tokens=20, extra_body={"grammar": 'start: "yes" | "no" | "maybe"'})
    assert r.choices[0].message.content in ("yes", "no", "maybe")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_tool_call_whose_arguments_validate_then_its_result(client, model, choice):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=model.name, messages=messages, tools=[WEATHER, CLOCK],
                                       tool_choice=choice, temperature=1.0, seed=0, max_tokens=120)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    call = c.message.tool_calls[0]
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    tool = {"get_weather": WEATHER, "time_now": CLOCK}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert call.id.startswith("call_") and call.type == "function"
    # The result goes back as a tool message; the answer is text and the prompt holds the result.
    messages += [c.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'}]
    r2 = client.chat.completions.create(model=model.name, messages=messages, tools=[WEATHER, CLOCK],
                                        tool_choice="none", temperature=0, max_tokens=10)
    assert r2.choices[0].finish_reason in ("stop", "length") and r2.choices[0].message.tool_calls is None
    from jishi.runtime.server import tools as T

    rendered, _ = T.render([{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                            {"role": "tool", "content": '{"sky": "sunny"}'}], [], native=False)
    assert rendered[0]["content"].startswith("<tool_call>\n{\"name\": \"" + call.function.name)
    assert rendered[1] == {"role": "user", "content": '<tool_response>\n{"sky": "sunny"}\n</tool_response>'}
    # the server's prompt is the conversation with the call and its result written in that format
    plain = [{"role": m["role"], "content": m.get("content") or "", **({"tool_calls": [
        tc for tc in m["tool_calls"]]} if m.get("tool_calls") else {})} for m in messages]
    expected, _ = T.render(plain, [], native=False)
    assert r2.usage.prompt_tokens == len(model.tokenizer.encode(model.chat_prompt(expected), bos=False))


def test_tool_call_streams_as_deltas(client, model):
    stream = client.chat.completions.create(
        model=model.name, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
        tool_choice="required", temperature=0.8, seed=5, max_tokens=120, stream=True)
    name, args, finish, content = "", "", None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            name += tc.function.name or ""
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and name == "get_weather" and content == ""
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])


def test_auto_may_answer_in_text_and_none_never_calls(client, model):
    seen = set()
    for seed in range(6):
        r = client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "Hello"}],
                                           tools=[WEATHER], temperature=1.0, seed=seed, max_tokens=40)
        c = r.choices[0]
        seen.add(c.finish_reason)
        if c.finish_reason == "tool_calls":
            jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
        else:
            assert c.message.tool_calls is None and not c.message.content.startswith("<")
    assert seen <= {"tool_calls", "stop", "length"}
    r = client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "Hello"}],
                                       tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=20)
    assert r.choices[0].message.tool_calls is None


def test_logprobs_equal_score_within_1e4_on_fp32(client, model):
    messages = [{"role": "user", "content": "What is a list?"}]
    r = client.chat.completions.create(model=model.name, messages=messages, temperature=0, max_tokens=20,
                                       logprobs=True, top_logprobs=4)
    ref = model.chat(messages, temperature=0, max_new_tokens=20, logprobs=0)
    got = r.choices[0].logprobs.content
    assert [e.token for e in got] == [model.tokenizer.decode([t.token], skip_special=False) for t in ref.logprobs]
    prompt_ids = model.tokenizer.encode(model.chat_prompt(messages), bos=False)
    tokens = [t.token for t in ref.logprobs]
    scored = model.score(prompt_ids + tokens)[len(prompt_ids) - 1:]
    np.testing.assert_allclose([e.logprob for e in got], scored, atol=1e-4)
    for e in got:
        assert len(e.top_logprobs) == 4 and e.top_logprobs[0].token == e.token  # greedy: the top one
        assert e.bytes == list(e.token.encode())
    c = client.completions.create(model=model.name, prompt="The value of", max_tokens=8, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == c.choices[0].text


def test_n_choices_share_one_prefill_and_a_seed_repeats(client, model, live):
    forks = live.scheduler.forks
    args = dict(model=model.name, messages=[{"role": "user", "content": "Tell me about rivers."}], n=3,
                temperature=1.0, seed=42, max_tokens=16)
    a = client.chat.completions.create(**args)
    b = client.chat.completions.create(**args)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # each choice has its own random stream
    assert live.scheduler.forks - forks == 4  # choices 1 and 2 of both requests copied choice 0's prefill
    if all(c.finish_reason == "length" for c in a.choices):
        assert a.usage.completion_tokens == 3 * 16  # usage counts every choice's tokens
    streamed = {}
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts


def test_min_p_and_logit_bias_through_the_api(client, model):
    greedy = client.completions.create(model=model.name, prompt="The value of", max_tokens=10, temperature=0)
    hot = client.completions.create(model=model.name, prompt="The value of", max_tokens=10, temperature=1.5,
                                    seed=3, extra_body={"min_p": 1.0, "repetition_penalty": 1.0})
    assert hot.choices[0].text == greedy.choices[0].text
    forced = client.completions.create(model=model.name, prompt="The value of", max_tokens=5, temperature=0,
                                       logit_bias={"65": 100})
    assert forced.choices[0].text == model.tokenizer.decode([65] * 5)


def raw(live, body, path="/v1/chat/completions"):
    return httpx.post(live.url + path, content=body if isinstance(body, bytes) else json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=60)


CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, param, words", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None, "NaN is not a JSON number"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', None, "Infinity is not a JSON number"),
    ({"messages": CHAT, "seed": -1}, "seed", "at least 0"),
    ({"messages": CHAT, "seed": 2**70}, "seed", "at most"),
    ({"messages": CHAT, "min_p": 2}, "min_p", "at most 1"),
    ({"messages": CHAT, "logit_bias": {"7": 500}}, "logit_bias", "-100 to 100"),
    ({"messages": CHAT, "logit_bias": {"99999": 1}}, "logit_bias", "vocabulary has 384"),
    ({"messages": CHAT, "logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    ({"messages": CHAT, "top_logprobs": 3}, "top_logprobs", "needs 'logprobs': true"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "at most 20"),
    ({"messages": CHAT, "response_format": {"type": "xml"}}, "response_format", "must be"),
    ({"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                     "schema": {"type": "wat"}}}},
     "response_format.json_schema.schema", "not a valid JSON Schema"),
    ({"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                     "schema": {"minimum": "3"}}}},
     "response_format.json_schema.schema", "not a valid JSON Schema"),
    ({"messages": CHAT, "grammar": "start: nowhere"}, "grammar", "Lark grammar cannot be compiled"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools[0].function.parameters", "not a valid JSON Schema"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name", "letters, digits"),
    ({"messages": CHAT, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "fly"}}},
     "tool_choice", "'fly', which is not in 'tools' (get_weather)"),
    ({"messages": CHAT, "tool_choice": "required"}, "tool_choice", "no 'tools' are given"),
    ({"messages": CHAT, "tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
    ({"messages": CHAT, "tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools", "cannot be combined"),
])
def test_bad_values_are_400s_naming_the_field(live, body, param, words):
    r = raw(live, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_the_server_stays_up_after_bad_values(live):
    for body in (b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "seed": -5}',
                 b'{"prompt": "x", "logprobs": -1}', b'{"prompt": "x", "n": 0}'):
        assert raw(live, body, "/v1/completions").status_code == 400
    assert live.health()["status"] == "ok"


def test_the_openai_clients_pydantic_parse(client, model):
    pydantic = pytest.importorskip("pydantic")

    class Reading(pydantic.BaseModel):
        sensor: str = pydantic.Field(max_length=8)
        celsius: int = pydantic.Field(ge=-40, le=60)

    r = client.chat.completions.parse(model=model.name, messages=[{"role": "user", "content": "Reading?"}],
                                      response_format=Reading, temperature=1.0, seed=3, max_tokens=80)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Reading) and -40 <= parsed.celsius <= 60


def test_n_waits_for_lanes_when_the_pool_is_smaller(model, client):
    """n=3 on a server with 2 slots: the third answer queues for a lane and is the same answer."""
    args = dict(model=model.name, messages=[{"role": "user", "content": "Tell me about rivers."}], n=3,
                temperature=1.0, seed=42, max_tokens=16)
    wide = [c.message.content for c in client.chat.completions.create(**args).choices]
    with LiveServer(model, max_concurrent=2, queue=4) as small:
        narrow = openai.OpenAI(base_url=small.url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [c.message.content for c in narrow.chat.completions.create(**args).choices] == wide


def test_prompts_that_arrive_together_are_read_in_one_run(model):
    """Jobs admitted in the same round share one prefill run; each answer is still its own."""
    import threading

    from jishi.runtime.sampling import SamplingParams
    from jishi.runtime.server.scheduler import Job

    prompts = ["The value of", "A list is", "Assignment statements are used to"]
    refs = [model.generate(p, max_new_tokens=8, temperature=0).text for p in prompts]
    with LiveServer(model, max_concurrent=4, queue=8) as live:
        sched = live.scheduler
        before = sched.batch.batched_prefills
        finished = threading.Semaphore(0)
        results = {}

        def sink_for(i):
            def sink(kind, value):
                if kind in ("done", "error", "cancelled"):
                    results[i] = value
                    finished.release()
            return sink

        jobs = [Job(prompt_ids=model.tokenizer.encode(p), budget=8, params=SamplingParams(temperature=0),
                    sink=sink_for(i)) for i, p in enumerate(prompts)]
        sched.submit_all(jobs)  # queued together: the next round admits all three
        for _ in jobs:
            assert finished.acquire(timeout=60)
        assert [results[i].text for i in range(3)] == refs
        assert sched.batch.batched_prefills > before
