"""Every model family against transformers, on tiny seeded models of each.

The tiny models (tests/conftest.py) have the families' own features switched on: Gemma 3's
local layers with a sliding window of 8 (the sequences below run past it) and their own rope
base, Qwen3's QK-norm, Phi-3's fused projections with partial rotary and longrope.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_export import _dequantized_reference  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]
CONTEXT = 128
RTOL = 1e-4  # of max|logit|: fp32 graph and PyTorch sum the same products in another order
N_TOKENS = 40


def _torch_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(vocab: int, n: int = N_TOKENS, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


def _teacher_forced(engine, ids: list[int]) -> np.ndarray:
    """Logits at every position the way the runtime computes them: a prefill, single steps
    with the cache bound in place, then a multi-token chunk on a filled cache."""
    engine.reset()
    out = [engine.feed(ids[:16], all_logits=True)]
    out += [engine.step(t).copy()[None] for t in ids[16:30]]
    out.append(engine.feed(ids[30:], all_logits=True))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_tokenizer):
    from conftest import make_tiny

    root = tmp_path_factory.mktemp("families")
    dirs = {f: make_tiny(f, root / f, tiny_tokenizer) for f in FAMILIES if f != "mistral"}
    # Mistral and Qwen2 with their sliding windows on (Qwen2: on the layers from max_window_layers).
    dirs["mistral"] = make_tiny("mistral", root / "mistral", tiny_tokenizer, sliding_window=8)
    dirs["qwen2-window"] = make_tiny("qwen2", root / "qwen2-window", tiny_tokenizer, use_sliding_window=True,
                                     sliding_window=8, max_window_layers=1)
    # final logit softcapping (Gemma 2 has it; Gemma 3's configs leave it out): logits = c·tanh(logits / c)
    dirs["gemma3-softcap"] = make_tiny("gemma3", root / "gemma3-softcap", tiny_tokenizer, final_logit_softcapping=2.0)
    # rope scalings: Llama 3.1/3.2's, linear, and YaRN (Qwen2.5 / Qwen3 long context)
    dirs["llama3-rope"] = make_tiny("llama", root / "llama3-rope", tiny_tokenizer, rope_theta=500_000.0, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    dirs["llama-linear"] = make_tiny("llama", root / "llama-linear", tiny_tokenizer,
                                     rope_scaling={"rope_type": "linear", "factor": 4.0})
    dirs["qwen3-yarn"] = make_tiny("qwen3", root / "qwen3-yarn", tiny_tokenizer, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
    return dirs


def _build(base, tmp_path, quant="fp32", **kw):
    from jishi.pipeline import build

    return build(str(base), quant, tmp_path / f"b-{quant}", context=kw.pop("context", CONTEXT), evaluate=False,
                 quiet=True, **kw)


@pytest.mark.parametrize("family", FAMILIES + ["qwen2-window", "gemma3-softcap", "llama3-rope", "llama-linear",
                                                "qwen3-yarn"])
def test_fp32_bundle_equals_transformers_at_every_position(family, family_dirs, tmp_path):
    import jishi

    ref_model = _torch_model(family_dirs[family])
    model = jishi.load(_build(family_dirs[family], tmp_path))
    ids = _ids(model.manifest.config.vocab_size)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(ref).max()
    assert 1.0 < scale < 20.0, f"tiny {family} logits of order {scale:.2f}: the weight scales are unrealistic"
    got = _teacher_forced(model.engine, ids)
    err = np.abs(got - ref).max(axis=1)
    assert err.max() <= RTOL * scale, f"worst position {int(err.argmax())}: {err.max():.2e} > {RTOL * scale:.2e}"


def test_gemma3_layers_keep_their_own_window_and_rope_base(family_dirs, tmp_path):
    """The manifest records the features; the graph's local layer masks past 8 tokens and uses
    the local rope table, the global layer neither (a graph with both global fails the match)."""
    import jishi

    model = jishi.load(_build(family_dirs["gemma3"], tmp_path))
    cfg = model.manifest.config
    assert (cfg.family, cfg.model_type) == ("gemma3", "gemma3_text")
    f = cfg.features
    assert f["layer_windows"] == [8, None] and f["local_rope_theta"] == 10_000.0 and f["qk_norm"]
    assert f["norm_offset"] == 1.0 and f["activation"] == "gelu_tanh" and f["embedding_scale"] == 8.0
    assert f["attention_scale"] == pytest.approx(24 ** -0.5)
    from jishi.runtime.describe import architecture  # what `jishi info` shows

    assert architecture(cfg) == ("gemma3_text, RMSNorm (1 + w), sandwich norms, QK-norm, GeGLU, sliding window 8 on 1 "
                                 "of 2 layers, rope base 10000, embeddings x8, tied head")
    import onnx

    graph = onnx.load(str(model.bundle.path("model.onnx")), load_external_data=False).graph
    attn = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    windows = [next(a.i for a in n.attribute if a.name == "local_window_size") for n in attn]
    assert windows == [8, -1]
    assert [n.input[7] for n in attn] == ["rope.local.cos", "rope.cos"]


def test_gemma3_with_a_context_shorter_than_its_window_keeps_the_local_rope_base(tiny_tokenizer, tmp_path):
    """Gemma 3 270M's window is 512: a bundle built with a shorter context masks nothing on its local
    layers, but they still rotate with their own rope base (a graph that used the global one there was off
    by 10 in a logit on the real model at context 256)."""
    import jishi
    from conftest import make_tiny

    base = make_tiny("gemma3", tmp_path / "wide-window", tiny_tokenizer, sliding_window=96)
    model = jishi.load(_build(base, tmp_path, context=64))
    ids = _ids(model.manifest.config.vocab_size)
    with torch.no_grad():
        ref = _torch_model(base)(torch.tensor([ids])).logits[0].numpy()
    got = _teacher_forced(model.engine, ids)
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()
    import onnx

    graph = onnx.load(str(model.bundle.path("model.onnx")), load_external_data=False).graph
    attn = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert [next(a.i for a in n.attribute if a.name == "local_window_size") for n in attn] == [-1, -1]
    assert [n.input[7] for n in attn] == ["rope.local.cos", "rope.cos"]


def test_phi3_longrope_beyond_the_original_positions(family_dirs, tmp_path):
    """A context past original_max_position_embeddings takes the long factors, as transformers does
    for a sequence that long: the whole 200-token sequence matches."""
    import jishi

    ref_model = _torch_model(family_dirs["phi3"])
    model = jishi.load(_build(family_dirs["phi3"], tmp_path, context=256))
    ids = _ids(model.manifest.config.vocab_size, n=200, seed=3)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    got = model.engine.feed(ids, all_logits=True)
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()

    # Decoding across the original 128 positions: short factors before, long ones after, the cached
    # keys keeping the rotation they were given; transformers with its cache does the same.
    with torch.no_grad():
        out = ref_model(torch.tensor([ids[:100]]), use_cache=True)
        cache, want = out.past_key_values, [out.logits[0, -1].numpy()]
        for t in ids[100:160]:
            out = ref_model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            want.append(out.logits[0, -1].numpy())
    engine = model.engine
    engine.reset()
    got = [engine.feed(ids[:100])] + [engine.step(t).copy() for t in ids[100:160]]
    got, want = np.stack(got).reshape(61, -1), np.stack(want)
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()
    assert np.abs(want[:28] - ref[99:127]).max() > 100 * RTOL * np.abs(ref).max()  # short factors differ


def _graph_engine(cfg, model, recipe, tmp_path):
    from jishi.export.from_torch import numpy_weights, rope_tables
    from jishi.export.graph import build_decoder, save_model
    from jishi.runtime.engine import Engine, make_session

    graph = build_decoder(cfg, numpy_weights(model, cfg), None, recipe, rope=rope_tables(model, cfg))
    save_model(graph, tmp_path / f"{recipe.name}-{recipe.accuracy_level}.onnx")
    return Engine(make_session(tmp_path / f"{recipe.name}-{recipe.accuracy_level}.onnx", 1), cfg, CONTEXT)


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3"])
def test_quantized_bundle_computes_with_exactly_its_codes(family, quant, family_dirs, tmp_path):
    """At accuracy level 0 (float activations) the int8 / int4 graph is PyTorch running the
    dequantized codes; at level 4 (int8 activations) its top-1 token agrees with it except
    near ties."""
    from jishi.export.from_torch import model_config
    from jishi.export.graph import QuantRecipe

    model = _torch_model(family_dirs[family])
    cfg = model_config(model.config, CONTEXT)
    exact = _graph_engine(cfg, model, QuantRecipe(quant, accuracy_level=0), tmp_path)
    fast = _graph_engine(cfg, model, QuantRecipe(quant, accuracy_level=4), tmp_path)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        ref = _dequantized_reference(model, quant)(torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(ref).max()
    got = _teacher_forced(exact, ids)
    assert np.abs(got - ref).max() <= RTOL * scale

    level4 = _teacher_forced(fast, ids)
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    differ = level4.argmax(1) != ref.argmax(1)
    # int8 activations move a logit by less than 5% of the largest one (measured on AVX-512 VNNI: 1.3-2.7%);
    # a flip is allowed only near a tie, and these random models have many (measured agreement 92.5-100%).
    assert np.abs(level4 - ref).max() < 0.05 * scale
    assert np.all(margin[differ] < 0.1 * scale), "a top-1 token flipped where PyTorch's choice was clear"
    assert differ.mean() <= 0.15
    # The perplexity of the sequence itself (next-token log-likelihood) within 2% of the exact graph's (measured: 0.5%).
    assert abs(_perplexity(level4, ids) / _perplexity(ref, ids) - 1) < 0.02


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    z = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def test_context_defaults_to_the_models_positions_up_to_2048(family_dirs, tmp_path):
    """A 512-position model builds without --context (it used to fail at 2048); a longer one gets 2048."""
    import jishi
    from jishi.export.from_torch import model_config

    model = jishi.load(_build(family_dirs["llama"], tmp_path, context=None))
    assert model.manifest.config.context_length == 512
    long = transformers.LlamaConfig(max_position_embeddings=131_072, hidden_size=64, num_attention_heads=4,
                                    intermediate_size=96, num_hidden_layers=1)
    assert model_config(long).context_length == 2048


def test_multimodal_and_unknown_architectures_are_refused_with_the_list():
    from jishi.errors import BaseModelError
    from jishi.export.from_torch import model_config

    with pytest.raises(BaseModelError, match="multimodal.*vision tower.*gemma3_text.*mmproj.*Supported families: "
                                             "llama, mistral, qwen2, qwen3, gemma3, phi3"):
        model_config(transformers.Gemma3Config())
    with pytest.raises(BaseModelError, match="family 'falcon' is not supported.*supported: llama, mistral"):
        model_config(transformers.FalconConfig())


def test_config_that_contradicts_itself_is_refused():
    from jishi.errors import BaseModelError
    from jishi.export.from_torch import model_config

    small = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=96,
                 num_hidden_layers=2, vocab_size=64)
    # 12 of 32 dimensions rotating: GroupQueryAttention's tables must be a multiple of 8 wide.
    odd = transformers.Phi3Config(partial_rotary_factor=0.375, **small)
    with pytest.raises(BaseModelError, match="rotary dimension of 12 in heads of 32 is not supported"):
        model_config(odd, 64)
    gemma = transformers.Gemma3TextConfig(head_dim=32, sliding_window=8, **small)
    gemma.layer_types = ["sliding_attention"] * 3
    with pytest.raises(BaseModelError, match="3 layer_types for 2 layers"):
        model_config(gemma, 64)
    with pytest.raises(BaseModelError, match="context 1024 is longer than the model's 512 positions"):
        model_config(transformers.Qwen3Config(max_position_embeddings=512, **small), 1024)


def test_phi3_calibrated_int4_takes_gptq_codes_for_its_fused_projections(family_dirs):
    """GPTQ runs on qkv_proj / gate_up_proj (one Hessian each) and hands the graph codes under the
    split names: the graph's fused q/k/v weight holds exactly those codes, not round-to-nearest ones."""
    from onnx import numpy_helper

    from jishi.export.from_torch import model_config, numpy_weights, rope_tables
    from jishi.export.gptq import gptq_model
    from jishi.export.graph import QuantRecipe, build_decoder
    from jishi.export.quant import concat_outputs, quantize_asymmetric

    model = _torch_model(family_dirs["phi3"])
    cfg = model_config(model.config, CONTEXT)
    batches = [torch.tensor([_ids(cfg.vocab_size, 64, seed=s)]) for s in range(4)]
    codes = gptq_model(model, batches, 4, 32)
    assert sorted(k.split(".")[4] for k in codes if ".layers.0." in k) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    weights = numpy_weights(model, cfg)
    graph = build_decoder(cfg, weights, None, QuantRecipe("int4", method="gptq"), rope=rope_tables(model, cfg),
                          prequantized=codes)
    stored = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}["layer0.attn.qkv.qweight"]
    names = [f"model.layers.0.self_attn.{t}_proj.weight" for t in "qkv"]
    assert np.array_equal(stored, concat_outputs([codes[n] for n in names]).packed)
    rtn = concat_outputs([quantize_asymmetric(weights[n], 4, 32, correct=True) for n in names]).packed
    assert not np.array_equal(stored, rtn)
