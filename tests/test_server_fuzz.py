"""A fuzz of the server on loopback: thousands of mutated bodies, odd headers and clients that
leave mid-stream. No answer may be a 5xx, the server answers after, and the KV memory goes back
to its first step once the burst is over."""

from __future__ import annotations

import json
import random
import socket
import time

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

import jishi  # noqa: E402
from serving import LiveServer  # noqa: E402

REQUESTS = 2000
SECONDS = 150  # the fuzz stops early past this, whatever the count

BASE_CHAT = {"messages": [{"role": "user", "content": "What is a list?"}], "max_tokens": 4}
BASE_COMPLETION = {"prompt": "The value of", "max_tokens": 4}
ODD = [None, True, False, 0, -1, 1, 2**63, -2**70, 1e308, -1e-308, 0.5, "", "x", "NaN", "\u0000", "😀" * 50,
       [], [1], ["a"], {}, {"a": 1}, [[[]]], "a" * 5000, 3.7, -0.0]
FIELDS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_tokens", "n", "stop",
          "logprobs", "top_logprobs", "logit_bias", "response_format", "grammar", "tools", "tool_choice", "stream",
          "stream_options", "model", "messages", "prompt", "max_completion_tokens", "user", "echo", "suffix"]
SPECIAL = {
    "response_format": [{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                         "properties": {"a": {"type": "integer", "maximum": 9, "minimum": 0}}, "required": ["a"]}}},
                        {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}},
                        {"type": "json_object"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": 3}],
    "grammar": ['start: "a"', "start: (", 'start: /[a-z]{1,3}/', "%import nothing"],
    "tools": [[{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                "properties": {"q": {"enum": ["x", "y"]}}, "required": ["q"]}}}],
              [{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "items": 3}}}],
              [{"type": "function"}], [{"function": {"name": "g"}}]],
    "tool_choice": ["auto", "none", "required", {"type": "function", "function": {"name": "f"}},
                    {"type": "function", "function": {"name": "zz"}}, {"type": "function"}],
    "logit_bias": [{"5": 100}, {"5": "x"}, {"-1": 3}, {"99999999999999999999": 1}, {"5": 1e300}],
    "messages": [[{"role": "tool", "content": "r"}], [{"role": "assistant", "tool_calls": [{"function": {}}]}],
                 [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function":
                   {"name": "f", "arguments": "{not json"}}]}, {"role": "user", "content": "ok"}],
                 [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}]],
}
RAW = [b"{", b"[]", b"null", b'{"prompt": "a", "temperature": NaN}', b'{"prompt": "a", "top_p": -Infinity}',
       b"\xff\xfe\x00", b'{"prompt": "' + b"[" * 5000 + b'"}', b"[" * 100000, b'{"messages": ' + b"[" * 3000]


def mutate(rng: random.Random) -> tuple[str, object]:
    chat = rng.random() < 0.6
    body = json.loads(json.dumps(BASE_CHAT if chat else BASE_COMPLETION))
    for _ in range(rng.randint(1, 4)):
        name = rng.choice(FIELDS)
        roll = rng.random()
        if roll < 0.1:
            body.pop(name, None)
        elif name in SPECIAL and roll < 0.7:
            body[name] = rng.choice(SPECIAL[name])
        else:
            body[name] = rng.choice(ODD)
    if body.get("max_tokens") not in (None,) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8  # keep each answer short: the fuzz is about the checks
    body.pop("max_completion_tokens", None) if isinstance(body.get("max_completion_tokens"), int) else None
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def ollama_mutation(rng: random.Random) -> tuple[str, object]:
    body = {"model": "fuzzed", "messages": [{"role": "user", "content": "hi"}], "stream": rng.random() < 0.5,
            "options": {"num_predict": 4}}
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(["format", "options", "messages", "model", "stream", "tools", "keep_alive"])
        if key == "options":
            body["options"][rng.choice(["temperature", "seed", "num_ctx", "top_k", "stop", "num_predict",
                                        "repeat_penalty", "min_p"])] = rng.choice(ODD)
        else:
            body[key] = rng.choice(ODD + SPECIAL["tools"][:1])
    return rng.choice(["/api/chat", "/api/generate", "/api/embed", "/api/show"]), body


ODD_HEADERS = [
    b"Content-Type: text/plain\r\n",
    b"Content-Type: application/json; charset=utf-16\r\n",
    b"Authorization: Bearer \xc3\xa9\r\n",
    b"Authorization: \r\n",
    b"Content-Length: 99999999999\r\n",
    b"Content-Length: 5\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"X-Very-Long: " + b"a" * 8000 + b"\r\n",
    b"Accept: */*\r\nAccept: text/event-stream\r\n",
]


def raw_request(port: int, extra: bytes, body: bytes) -> int:
    """POST /v1/completions with these header lines (a Content-Length of the body's size unless
    they bring their own framing); the status code of the answer."""
    framing = b"" if b"Content-Length" in extra or b"Transfer-Encoding" in extra else \
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    if b"Transfer-Encoding" in extra:
        body = hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + framing
                  + b"\r\n" + body)
        head = s.recv(64)
    return int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else 0


def leave_mid_stream(port: int) -> None:
    """A client that sends a streaming request, reads a little, and drops the connection."""
    body = json.dumps({"prompt": "The value of", "max_tokens": 200, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        s.recv(256)


@pytest.fixture(scope="module")
def model(tiny_tokenizer, tmp_path_factory):
    """A tiny Llama with a context of 1024: a burst can grow its caches past the first 256 positions."""
    from conftest import make_tiny

    from jishi.pipeline import build

    root = tmp_path_factory.mktemp("fuzz")
    base = make_tiny("llama", root / "base", tiny_tokenizer, max_position_embeddings=1024)
    return jishi.load(build(str(base), "fp32", root / "fuzzed", context=1024, evaluate=False, quiet=True), threads=1)


def test_fuzz_no_5xx_and_the_server_lives_and_memory_comes_back(model):
    rng = random.Random(1234)
    statuses: dict[int, int] = {}
    with LiveServer(model, max_concurrent=4, queue=64, release_after=1.0) as live:
        first = live.scheduler.kv_bytes()
        client = httpx.Client(base_url=live.url, timeout=60)
        start = time.monotonic()
        sent = 0
        for i in range(REQUESTS):
            if time.monotonic() - start > SECONDS:
                break
            roll = rng.random()
            if roll < 0.02:
                leave_mid_stream(live.port)
                continue
            if roll < 0.06:
                r = client.post(rng.choice(["/v1/chat/completions", "/v1/completions", "/api/chat"]),
                                content=rng.choice(RAW), headers={"content-type": "application/json"})
            elif roll < 0.08:  # odd headers, written by hand
                status = raw_request(live.port, rng.choice(ODD_HEADERS), json.dumps(BASE_COMPLETION).encode())
                statuses[status] = statuses.get(status, 0) + 1
                assert status < 500, status
                sent += 1
                continue
            elif roll < 0.25:
                path, body = ollama_mutation(rng)
                r = client.post(path, json=body)
            else:
                path, body = mutate(rng)
                r = client.post(path, json=body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (r.status_code, r.text[:500])
            sent += 1
        print(f"fuzz: {sent} requests, statuses {dict(sorted(statuses.items()))}")
        assert sent >= 500, f"only {sent} requests in {SECONDS} s"
        assert live.health()["status"] == "ok"
        ok = client.post("/v1/completions", json={"prompt": "The value of", "max_tokens": 4, "temperature": 0})
        assert ok.status_code == 200
        assert statuses.get(200, 0) > 50 and statuses.get(400, 0) > 200, statuses
        # a burst of long answers grows the caches; idle, they go back to the first step
        for _ in range(4):
            leave_mid_stream(live.port)
        burst = [client.post("/v1/completions", json={"prompt": "word " * 200, "max_tokens": 150})
                 for _ in range(2)]
        assert all(r.status_code == 200 for r in burst)
        grown = live.scheduler.kv_bytes()
        deadline = time.monotonic() + 20
        while live.scheduler.kv_bytes() > first and time.monotonic() < deadline:
            time.sleep(0.2)
        assert grown > first and live.scheduler.kv_bytes() == first
        assert client.post("/v1/completions", json=BASE_COMPLETION).status_code == 200
