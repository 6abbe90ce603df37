"""Templates that think (Qwen3): <think>…</think> comes back as reasoning_content (Ollama: thinking)."""

from __future__ import annotations

import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from jishi.runtime.server import reasoning as R

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")


@pytest.mark.parametrize("text, expected", [
    ("<think>\nsoil is dry\n</think>\n\nWater it.", ("soil is dry", "Water it.")),
    ("Water it.", (None, "Water it.")),
    ("<think>still thinking", ("still thinking", "")),
    ("<thin", (None, "<thin")),
])
def test_split_and_the_streaming_splitter_agree_whatever_the_pieces(text, expected):
    assert R.split(text) == expected
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(4, len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        s = R.Splitter()
        outs = [s.push(p) for p in pieces] + [s.flush()]
        reasoning = "".join(r for r, _ in outs)
        content = "".join(c for _, c in outs)
        assert content == expected[1]
        assert reasoning.strip() == (expected[0] or "")


@pytest.fixture(scope="module")
def thinker(tiny_bundles, tmp_path_factory):
    import jishi
    from conftest import CHAT_TEMPLATE
    from jishi.export.bundle_writer import write_manifest
    from jishi.runtime.bundle import open_bundle

    path = tmp_path_factory.mktemp("think") / "b"
    shutil.copytree(tiny_bundles["fp32"], path)
    m = open_bundle(path).manifest
    template = CHAT_TEMPLATE + "{# answers may open with <think> #}"
    write_manifest(Path(path), replace(m, tokenizer=replace(m.tokenizer, chat_template=template)))
    return jishi.load(path, threads=1)


GRAMMAR = 'start: "<think>" /[a-z]{2,6}/ "</think>" /[a-z]{2,6}/'


def test_reasoning_content_whole_and_streamed_and_ollamas_thinking(thinker):
    from serving import LiveServer

    with LiveServer(thinker, max_concurrent=2) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
        args = dict(model=thinker.name, messages=[{"role": "user", "content": "Hi"}], temperature=1.0, seed=2,
                    max_tokens=40, extra_body={"grammar": GRAMMAR})
        whole = client.chat.completions.create(**args).choices[0].message
        raw = thinker.chat([{"role": "user", "content": "Hi"}], temperature=1.0, seed=2, max_new_tokens=40,
                           grammar=GRAMMAR).text
        reasoning, content = R.split(raw)
        assert raw.startswith("<think>") and whole.content == content
        assert whole.model_extra["reasoning_content"] == reasoning
        r_parts, c_parts = [], []
        for chunk in client.chat.completions.create(**args, stream=True):
            if chunk.choices:
                d = chunk.choices[0].delta
                r_parts.append((d.model_extra or {}).get("reasoning_content") or "")
                c_parts.append(d.content or "")
        assert "".join(r_parts).strip() == reasoning and "".join(c_parts) == content


def test_ollama_thinking_whole_and_streamed(thinker):
    """A generation that thought (token by token) renders as Ollama's message.thinking and content."""
    import numpy as np

    ollama = pytest.importorskip("ollama")
    from jishi.runtime.generation import Generation
    from jishi.runtime.sampling import SamplingParams
    from jishi.runtime.server.dialect_ollama import Renderer

    text = "<think>\nthe soil is dry\n</think>\n\nWater the beans."
    ids = thinker.tokenizer.encode(text) + [2]

    def run(renderer):
        gen = Generation(thinker.tokenizer, [1], len(ids), SamplingParams(temperature=0), vocab_size=384)
        lines = []
        for t in ids:
            logits = np.zeros(384, np.float32)
            logits[t] = 1.0
            piece = gen.push(logits)
            if piece:
                lines += renderer.piece(0, piece, gen)
        return gen, lines + renderer.done(0, gen)

    gen, _ = run(Renderer(thinker.name, True, 1, tools_on=False, context=None, thinks=True))
    whole = ollama.ChatResponse.model_validate(
        Renderer(thinker.name, True, 1, tools_on=False, context=None, thinks=True).whole([gen]))
    assert whole.message.thinking == "the soil is dry" and whole.message.content == "Water the beans."
    _, lines = run(Renderer(thinker.name, True, 1, tools_on=False, context=None, thinks=True))
    parts = [ollama.ChatResponse.model_validate(line) for line in lines]
    assert "".join(p.message.thinking or "" for p in parts).strip() == "the soil is dry"
    assert "".join(p.message.content for p in parts) == "Water the beans." and parts[-1].done
