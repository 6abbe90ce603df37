"""Embeddings: the graph's final-norm hidden states against PyTorch, pooling, normalization, the
old-bundle refusal, and /v1/embeddings and /api/embed over HTTP."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import jishi
from jishi.errors import BundleError, ContextLengthError, JishiError

TEXTS = ["Assignment statements bind names to values.", "A tuple cannot be changed.", "Rice grows in water."]


@pytest.fixture(scope="module")
def model(tiny_bundles):
    return jishi.load(tiny_bundles["fp32"], threads=1)


def torch_hidden(tiny_dirs, ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    with torch.no_grad():
        out = ref(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0].double().numpy()  # after the final norm


def test_embeddings_are_pytorchs_final_hidden_states_pooled(model, tiny_dirs):
    vecs = model.embed(TEXTS)
    assert vecs.shape == (3, 64) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-6)
    for text, v in zip(TEXTS, vecs):
        h = torch_hidden(tiny_dirs, model.tokenizer.encode(text))
        mean = h.mean(axis=0)
        np.testing.assert_allclose(v, mean / np.linalg.norm(mean), atol=1e-5)
    last = model.embed(TEXTS[0], pooling="last", normalize=False)
    np.testing.assert_allclose(last, torch_hidden(tiny_dirs, model.tokenizer.encode(TEXTS[0]))[-1], atol=1e-4)


def test_embedding_leaves_generation_as_it_was(model):
    before = model.generate("The value of", temperature=0, max_new_tokens=12).text
    model.embed(TEXTS)
    assert model.generate("The value of", temperature=0, max_new_tokens=12).text == before


def test_bad_embedding_calls(model):
    with pytest.raises(JishiError, match="non-empty texts"):
        model.embed([])
    with pytest.raises(JishiError, match="pooling must be one of"):
        model.embed("x", pooling="max")
    with pytest.raises(ContextLengthError, match="truncate=True"):
        model.embed("word " * 400)
    assert model.embed("word " * 400, truncate=True).shape == (64,)


def test_an_old_bundle_says_rebuild_for_embeddings(tiny_bundles, tmp_path):
    import shutil

    from jishi.export.bundle_writer import write_manifest
    from jishi.runtime.bundle import open_bundle

    old = tmp_path / "old"
    shutil.copytree(tiny_bundles["fp32"], old)
    m = open_bundle(old).manifest
    outputs = [o for o in m.graph.outputs if o != "hidden_states"]
    write_manifest(Path(old), replace(m, format_version=1, graph=replace(m.graph, outputs=outputs)))
    model = jishi.load(old)
    assert model.generate("Hi", temperature=0, max_new_tokens=3).completion_tokens == 3  # still generates
    with pytest.raises(BundleError, match="rebuild it with `jishi build` for embeddings"):
        model.embed("x")


@pytest.fixture(scope="module")
def live(model):
    pytest.importorskip("starlette")
    from serving import LiveServer

    with LiveServer(model, max_concurrent=2, queue=4) as s:
        yield s


def test_openai_embeddings_endpoint(live, model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
    r = client.embeddings.create(model=model.name, input=TEXTS)
    got = np.array([d.embedding for d in r.data], np.float32)
    np.testing.assert_allclose(got, model.embed(TEXTS), atol=1e-6)
    assert [d.index for d in r.data] == [0, 1, 2]
    assert r.usage.prompt_tokens == sum(len(model.tokenizer.encode(t)) for t in TEXTS)
    import base64

    import httpx

    raw = httpx.post(live.url + "/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "float"}).json()
    np.testing.assert_allclose(raw["data"][0]["embedding"], model.embed(TEXTS[0]), atol=1e-6)
    b64 = httpx.post(live.url + "/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(decoded, model.embed(TEXTS[0]), atol=1e-6)


def test_ollama_embed_endpoint(live, model):
    ollama = pytest.importorskip("ollama")
    r = ollama.Client(host=live.url).embed(model=f"{model.name}:latest", input=TEXTS)
    np.testing.assert_allclose(np.array(r.embeddings, np.float32), model.embed(TEXTS), atol=1e-6)
    assert r.prompt_eval_count == sum(len(model.tokenizer.encode(t)) for t in TEXTS)
    long = ollama.Client(host=live.url).embed(model=model.name, input="word " * 400)  # truncated, as Ollama does
    assert len(long.embeddings[0]) == 64


@pytest.mark.parametrize("path, body, param", [
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": ["ok", 5]}, "input[1]"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ("/v1/embeddings", {"input": "word " * 400}, "input"),
    ("/v1/embeddings", {"input": "x", "dimensions": 8}, "dimensions"),
])
def test_bad_embedding_requests_are_400(live, path, body, param):
    import httpx

    r = httpx.post(live.url + path, json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
