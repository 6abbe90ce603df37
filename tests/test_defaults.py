"""A model's own defaults: taken from the base's generation_config.json at build, set with
`jishi defaults`, and used by generate/chat, the CLI, the OpenAI and the Ollama routes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import jishi
from jishi.errors import BundleError
from jishi.runtime import defaults as D

CHAT = [{"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def sampled(tiny_tokenizer, tmp_path_factory):
    """A tiny base whose generation_config.json asks for its own sampling values."""
    from conftest import make_tiny

    from jishi.pipeline import build

    root = tmp_path_factory.mktemp("defaults")
    base = make_tiny("llama", root / "base", tiny_tokenizer)
    gc = json.loads((base / "generation_config.json").read_text())
    gc.update(do_sample=True, temperature=0.6, top_p=0.8, top_k=20, repetition_penalty=1.05)
    (base / "generation_config.json").write_text(json.dumps(gc))
    return build(str(base), "fp32", root / "sampled", context=256, evaluate=False, quiet=True)


def test_the_bases_generation_config_becomes_the_bundles_defaults(sampled):
    m = jishi.load(sampled, threads=1)
    assert m.manifest.defaults == {"temperature": 0.6, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}
    own = m.generate("Once", max_new_tokens=16, seed=3).text
    spelled = m.generate("Once", max_new_tokens=16, seed=3, temperature=0.6, top_k=20, top_p=0.8,
                         repetition_penalty=1.05).text
    jishis = m.generate("Once", max_new_tokens=16, seed=3, temperature=0.7, top_k=40, top_p=0.95,
                        repetition_penalty=1.1).text
    assert own == spelled != jishis


def test_a_greedy_generation_config_means_temperature_zero(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert D.from_generation_config(tmp_path) == {"temperature": 0.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    assert D.from_generation_config(tmp_path) == {}


def jishi_cli(*args):
    return subprocess.run([sys.executable, "-m", "jishi.cli", *args], capture_output=True, text=True, timeout=300)


def test_jishi_defaults_sets_them_and_every_front_end_uses_them(tiny_bundles, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundles["fp32"], bundle)
    done = jishi_cli("defaults", str(bundle), "--temperature", "0", "--system", "Answer briefly.",
                     "--max-tokens", "7", "--stop", "zzz")
    assert done.returncode == 0, done.stderr
    assert "temperature         0.0  (set)" in done.stdout and "Answer briefly." in done.stdout
    m = jishi.load(bundle, threads=1)
    assert m.defaults.system_prompt == "Answer briefly." and m.defaults.max_tokens == 7
    with_system = [{"role": "system", "content": "Answer briefly."}] + CHAT
    assert m.chat_prompt(CHAT) == m.chat_prompt(with_system)
    r = m.chat(CHAT)
    ref = m.chat(with_system, temperature=0, max_new_tokens=7)
    assert (r.text, r.completion_tokens) == (ref.text, ref.completion_tokens) and r.completion_tokens <= 7
    run = jishi_cli("run", str(bundle), "What is a list?")
    assert run.returncode == 0 and run.stdout == ref.text + "\n"

    pytest.importorskip("starlette")
    import httpx
    from serving import LiveServer

    with LiveServer(m, max_concurrent=1) as live:
        body = httpx.post(live.url + "/v1/chat/completions", json={"messages": CHAT}, timeout=60).json()
        assert body["choices"][0]["message"]["content"] == ref.text
        assert body["usage"]["prompt_tokens"] == ref.prompt_tokens
        shown = httpx.post(live.url + "/api/show", json={"model": m.name}).json()
        assert "temperature 0.0" in shown["parameters"] and shown["system"] == "Answer briefly."
        r = httpx.post(live.url + "/api/chat", json={"model": m.name, "messages": CHAT, "stream": False}).json()
        assert r["message"]["content"] == ref.text
    done = jishi_cli("defaults", str(bundle), "--reset")
    assert done.returncode == 0 and jishi.load(bundle).manifest.defaults == {}


def test_bad_defaults_are_refused(tiny_bundles, tmp_path):
    from jishi.export.bundle_writer import write_manifest
    from jishi.runtime.bundle import open_bundle

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundles["fp32"], bundle)
    done = jishi_cli("defaults", str(bundle), "--temperature", "nan")
    assert done.returncode == 1 and "temperature must be a finite number" in done.stderr
    m = open_bundle(bundle).manifest
    write_manifest(Path(bundle), replace(m, defaults={"temperature": -1}))
    with pytest.raises(BundleError, match="temperature must be >= 0"):
        jishi.load(bundle)
    write_manifest(Path(bundle), replace(m, defaults={"colour": "blue"}))
    with pytest.raises(BundleError, match="unknown defaults colour"):
        jishi.load(bundle)
