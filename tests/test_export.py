"""The exported graph against PyTorch, on tiny models of each supported family."""

from __future__ import annotations

import numpy as np
import pytest

from margins import assert_greedy_agrees

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# fp32 graph vs PyTorch fp32: both sum the same products in a different order.
ATOL = 1e-4


def _torch_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def _bundle(tmp_path, base, quant="fp32", **kw):
    from jishi.pipeline import build

    return build(str(base), quant, tmp_path / f"b-{quant}", context=128, evaluate=False, quiet=True, **kw)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_fp32_logits_match_torch_prefill_and_every_decode_step(family, tiny_dirs, tmp_path):
    import jishi

    ref_model = _torch_model(tiny_dirs[family])
    model = jishi.load(_bundle(tmp_path, tiny_dirs[family]))
    rng = np.random.default_rng(1)
    ids = rng.integers(3, model.manifest.config.vocab_size, size=40).tolist()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()

    engine = model.engine
    prefill = engine.feed(ids[:24], all_logits=True)
    np.testing.assert_allclose(prefill, ref[:24], atol=ATOL, rtol=0)
    for t in range(24, 36):  # one token at a time, cache bound in place
        np.testing.assert_allclose(engine.step(ids[t]), ref[t], atol=ATOL, rtol=0)
    # a multi-token chunk after a filled cache (the next turn of a chat)
    np.testing.assert_allclose(engine.feed(ids[36:], all_logits=True), ref[36:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_generation_matches_transformers_generate(family, tiny_dirs, tmp_path):
    import jishi

    ref_model = _torch_model(tiny_dirs[family])
    model = jishi.load(_bundle(tmp_path, tiny_dirs[family]))
    prompt = "Return the value of the expression"
    ids = model.tokenizer.encode(prompt)
    with torch.no_grad():
        out = ref_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    expected = out.sequences[0, len(ids):].tolist()
    margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]

    engine = model.engine
    engine.reset()
    logits = engine.feed(ids)
    got = []
    for _ in range(len(expected)):
        got.append(int(np.argmax(logits)))
        logits = engine.step(got[-1])
    assert_greedy_agrees(got, expected, margins, ATOL)


def _dequantized_reference(model, quant, head_bits=8, exact=True):
    """The torch model with the exact weights the quantized graph stores (dequantized)."""
    from jishi.export.quant import quantize_asymmetric, quantize_symmetric_int8

    head = (lambda w: quantize_symmetric_int8(w)) if head_bits == 8 else (lambda w: quantize_asymmetric(w, 4, 32, correct=False))

    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                w = mod.weight.numpy()
                qw = quantize_asymmetric(w, 4, 32, correct=exact) if quant == "int4" else quantize_asymmetric(w, 8, 32, correct=False)
                mod.weight.copy_(torch.from_numpy(qw.dequantize()))
        for emb in {id(model.model.embed_tokens.weight): model.model.embed_tokens.weight,
                    id(model.lm_head.weight): model.lm_head.weight}.values():
            emb.copy_(torch.from_numpy(head(emb.numpy()).dequantize()))
    return model


@pytest.mark.parametrize("quant,head_bits,exact", [("int4", 8, True), ("int8", 8, True), ("int4", 4, True),
                                                   ("int4", 8, False)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quantized_graph_computes_with_exactly_its_quantized_weights(family, quant, head_bits, exact, tiny_dirs, tmp_path):
    """At accuracy level 0 (float activations) the int4/int8 graph is the dequantized model, tightly,
    with the embedding and LM head at 8 or 4 bits; a tied pair is stored once. int4 with integer zero
    points has no correction nodes (two fewer per fused projection) and is its own dequantized model too."""
    from jishi.export.from_torch import model_config, numpy_weights, rotary
    from jishi.export.graph import QuantRecipe, build_decoder, save_model
    from jishi.runtime.engine import Engine, make_session

    model = _torch_model(tiny_dirs[family])
    cfg = model_config(model.config, 128)
    inv_freq, scaling = rotary(model)
    graph = build_decoder(cfg, numpy_weights(model), inv_freq,
                          QuantRecipe(quant, accuracy_level=0, head_bits=head_bits, zero_point_correction=exact), scaling)
    if quant == "int4":
        corrections = sum(n.op_type == "Gemm" for n in graph.graph.node)
        assert corrections == (4 * cfg.num_layers if exact else 0)
    names = {t.name for t in graph.graph.initializer}
    assert "lm_head.qweight" in names
    assert ("model.embed_tokens.qweight" in names) == (not cfg.tie_word_embeddings)
    save_model(graph, tmp_path / "model.onnx")
    engine = Engine(make_session(tmp_path / "model.onnx", 1), cfg, 128)

    ids = list(range(5, 69))
    with torch.no_grad():
        expected = _dequantized_reference(model, quant, head_bits, exact)(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(engine.feed(ids, all_logits=True), expected, atol=ATOL, rtol=0)


def test_fp16_bundle_is_half_the_size_and_close(tiny_dirs, tmp_path):
    import jishi

    fp32 = _bundle(tmp_path, tiny_dirs["qwen2"], "fp32")
    fp16 = _bundle(tmp_path, tiny_dirs["qwen2"], "fp16")
    size = lambda p: (p / "model.onnx.data").stat().st_size
    assert size(fp16) < 0.55 * size(fp32)
    ids = list(range(10, 40))
    a = jishi.load(fp32).engine.feed(ids, all_logits=True)
    b = jishi.load(fp16).engine.feed(ids, all_logits=True)
    np.testing.assert_allclose(a, b, atol=5e-3)


def test_unsupported_family_is_refused(tmp_path, tiny_tokenizer):
    from jishi.errors import BaseModelError
    from jishi.pipeline import build

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(BaseModelError, match="gpt2.*family 'gpt2' is not supported.*supported: llama, mistral, qwen2, "
                                             "qwen3, gemma3, phi3"):
        build(str(tmp_path / "gpt2"), "fp32", tmp_path / "out", evaluate=False, quiet=True)
    assert not (tmp_path / "out").exists()


def test_cache_grows_with_the_conversation_and_keeps_its_contents(tiny_dirs, tmp_path):
    """The KV cache starts small and grows in steps; logits across a growth are unchanged."""
    import jishi
    from jishi.pipeline import build
    from jishi.runtime.engine import KV_STEP

    ref_model = _torch_model(tiny_dirs["llama"])
    model = jishi.load(build(str(tiny_dirs["llama"]), "fp32", tmp_path / "b", context=512, evaluate=False, quiet=True))
    ids = np.random.default_rng(2).integers(3, 300, size=300).tolist()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    engine = model.engine
    assert engine.capacity == KV_STEP
    np.testing.assert_allclose(engine.feed(ids[:250], all_logits=True), ref[:250], atol=ATOL, rtol=0)
    for t in range(250, 270):  # crosses position 256: the cache grows while decoding
        np.testing.assert_allclose(engine.step(ids[t]), ref[t], atol=ATOL, rtol=0)
    assert engine.capacity == 2 * KV_STEP
    np.testing.assert_allclose(engine.feed(ids[270:], all_logits=True), ref[270:], atol=ATOL, rtol=0)


def test_weights_the_exporter_does_not_handle_are_refused(tmp_path, tiny_tokenizer):
    """A Llama with MLP biases must not export silently without them."""
    from conftest import make_tiny
    from jishi.errors import BaseModelError
    from jishi.pipeline import build

    base = make_tiny("llama", tmp_path / "biased", tiny_tokenizer, mlp_bias=True)
    with pytest.raises(BaseModelError, match="weights jishi's exporter does not handle .*mlp.down_proj.bias"):
        build(str(base), "fp32", tmp_path / "out", context=64, evaluate=False, quiet=True)
