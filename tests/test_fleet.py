"""Two models on one server: both listed at once, each loaded on first use, unloaded when idle
or past the memory budget; `jishi serve A B`."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
ollama = pytest.importorskip("ollama")

import jishi  # noqa: E402
from serving import LiveServer, free_port  # noqa: E402

CHAT = [{"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def two(tiny_bundles, tiny_dirs, tmp_path_factory):
    from jishi.pipeline import build

    qwen = build(str(tiny_dirs["qwen2"]), "fp32", tmp_path_factory.mktemp("fleet") / "qwen", context=256,
                 evaluate=False, quiet=True, name="qwen-tiny")
    return {"llama": tiny_bundles["fp32"], "qwen": qwen}


def make_fleet(two, **kw):
    from jishi.runtime.server.app import ServerConfig
    from jishi.runtime.server.fleet import Fleet

    return Fleet.from_paths([two["llama"], two["qwen"]], ServerConfig(max_concurrent=2, queue=4),
                            lambda p: jishi.load(p, threads=1), **kw)


def test_both_listed_each_loaded_on_first_use_and_answers_are_each_models(two):
    fleet = make_fleet(two)
    a, b = (fleet.entries[n] for n in fleet.entries)
    ref_a = jishi.load(two["llama"], threads=1).chat(CHAT, temperature=0, max_new_tokens=12).text
    ref_b = jishi.load(two["qwen"], threads=1).chat(CHAT, temperature=0, max_new_tokens=12).text
    assert ref_a != ref_b
    with LiveServer(fleet) as live:
        ids = [m["id"] for m in httpx.get(live.url + "/v1/models").json()["data"]]
        assert ids == [a.name, b.name]
        assert [m["model"] for m in httpx.get(live.url + "/api/tags").json()["models"]] == \
            [f"{a.name}:latest", f"{b.name}:latest"]
        assert live.health()["loaded"] == []  # nothing read but the manifests
        r = httpx.post(live.url + "/v1/chat/completions", json={"model": a.name, "messages": CHAT, "max_tokens": 12,
                                                                "temperature": 0}, timeout=60).json()
        assert r["choices"][0]["message"]["content"] == ref_a
        assert live.health()["loaded"] == [a.name]
        client = ollama.Client(host=live.url)
        r = client.chat(model=f"{b.name}:latest", messages=CHAT, options={"temperature": 0, "num_predict": 12})
        assert r.message.content == ref_b
        assert live.health()["loaded"] == [a.name, b.name]
        assert [m.model for m in client.ps().models] == [f"{a.name}:latest", f"{b.name}:latest"]
        err = httpx.post(live.url + "/v1/chat/completions", json={"model": "nope", "messages": CHAT}).json()
        assert err["error"]["code"] == "model_not_found" and a.name in err["error"]["message"]


def test_idle_models_unload_and_the_budget_holds(two):
    fleet = make_fleet(two, idle_unload=0.5)
    a, b = (fleet.entries[n] for n in fleet.entries)
    with LiveServer(fleet) as live:
        body = {"messages": CHAT, "max_tokens": 4, "temperature": 0}
        assert httpx.post(live.url + "/v1/chat/completions", json={**body, "model": a.name}).status_code == 200
        time.sleep(0.8)
        assert httpx.post(live.url + "/v1/chat/completions", json={**body, "model": b.name}).status_code == 200
        assert live.health()["loaded"] == [b.name]  # a was idle past its time: unloaded when b loaded
    fleet = make_fleet(two)
    a, b = (fleet.entries[n] for n in fleet.entries)
    fleet.budget = max(a.estimate, b.estimate) + 1  # room for one at a time
    with LiveServer(fleet) as live:
        for name in (a.name, b.name, a.name):
            assert httpx.post(live.url + "/v1/chat/completions", json={**body, "model": name}).status_code == 200
            assert live.health()["loaded"] == [name]
        assert a.loads == 2 and b.loads == 1


def _wait_loaded(live, want, seconds=5.0):
    deadline = time.monotonic() + seconds
    while live.health()["loaded"] != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return live.health()["loaded"]


def test_keep_alive_as_ollama_means_it(two):
    """``keep_alive`` (the ollama client's own field): 0 unloads a model once its answer is done, a negative time
    keeps it past the server's idle time, a duration shows in /api/ps; an empty request loads (or, with 0,
    unloads) a model and answers done_reason "load" / "unload"; a bad value is a 400 naming the field."""
    from datetime import datetime, timezone

    fleet = make_fleet(two, idle_unload=0.6)
    a, b = (fleet.entries[n] for n in fleet.entries)
    with LiveServer(fleet) as live:
        client = ollama.Client(host=live.url)
        r = client.chat(model=a.name, messages=CHAT, options={"num_predict": 3}, keep_alive=0)
        assert r.done and _wait_loaded(live, []) == []  # the reaper let it go right after the answer
        r = client.generate(model=b.name, keep_alive="10m")
        assert r.done_reason == "load" and live.health()["loaded"] == [b.name]
        (shown,) = client.ps().models
        left = (shown.expires_at - datetime.now(timezone.utc)).total_seconds()
        assert 540 < left <= 600, left
        time.sleep(1.5)  # past the server's own idle time: the request's 10 minutes hold
        assert live.health()["loaded"] == [b.name]
        r = client.generate(model=b.name, keep_alive=0)
        assert r.done_reason == "unload" and live.health()["loaded"] == []
        client.chat(model=a.name, messages=[], keep_alive=-1)
        time.sleep(1.5)
        assert live.health()["loaded"] == [a.name]
        (shown,) = client.ps().models
        assert shown.expires_at.year == 2999
        for bad in ("soon", "5 minutes", True, [1]):
            r = httpx.post(live.url + "/api/generate", json={"model": a.name, "prompt": "hi", "keep_alive": bad})
            assert r.status_code == 400 and "'keep_alive' must be seconds or a duration" in r.json()["error"], bad
        r = httpx.post(live.url + "/api/generate", json={"model": "nope", "keep_alive": 0})
        assert r.status_code == 404


def test_jishi_serve_two_models(two):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jishi.cli", "serve", str(two["llama"]), str(two["qwen"]),
                             "--port", str(port), "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
                time.sleep(0.3)
        assert len(r.json()["data"]) == 2
        r = httpx.post(f"http://127.0.0.1:{port}/api/generate", json={"model": "qwen-tiny", "prompt": "Hi",
                                                                      "stream": False, "options": {"num_predict": 3}},
                       timeout=60)
        assert r.status_code == 200 and r.json()["done"] is True
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "serving 2 models" in err and "each loads on first use" in err
