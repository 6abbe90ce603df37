"""GGUF grids kept exactly: files whose blocks the test wrote, read back bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf_files import ENCODERS, write_tiny_gguf  # noqa: E402

from jishi.export.quant import QuantizedWeight, unpack, unpack_zero_points  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf"
    return path, write_tiny_gguf(path, tiny_tokenizer)


@pytest.fixture(scope="module")
def loaded(tiny_gguf):
    from jishi.distill.base import load_base

    return load_base(str(tiny_gguf[0]))


@pytest.fixture(scope="module")
def plan(tiny_gguf, loaded):
    from jishi.distill.gguf_tensors import read_raw
    from jishi.export.from_gguf import grid_weights
    from jishi.export.from_torch import numpy_weights

    weights = numpy_weights(loaded.model)
    return grid_weights(read_raw(tiny_gguf[0], loaded.model), weights), weights


def _hf_name(gguf_name: str) -> str:
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    _, layer, part, _ = gguf_name.split(".")
    return f"model.layers.{layer}.{parts[part]}.weight"


def _row_order(written: np.ndarray, loaded: np.ndarray) -> np.ndarray:
    """Which written row each loaded row is (transformers permutes Llama's q/k rows)."""
    index = {row.tobytes(): i for i, row in enumerate(written)}
    return np.array([index[row.tobytes()] for row in loaded])


def test_every_type_reads_back_the_codes_scales_and_minimums_written(tiny_gguf, plan):
    path, blocks = tiny_gguf
    grids, weights = plan
    assert not grids.requantized and not grids.notes
    seen = set()
    for gname, b in blocks.items():
        name = _hf_name(gname)
        qw = grids.weights[name]
        assert isinstance(qw, QuantizedWeight)
        kind = b.kind
        seen.add(kind)
        written = gguf.quants.dequantize(b.raw, gguf.GGMLQuantizationType[kind])
        order = _row_order(written, weights[name])
        nb = qw.k // qw.block
        assert qw.block == b.block
        default = 1 << (qw.bits - 1)  # integer zero points move to MatMulNBits' default, codes with them
        shift = default - b.zero_point if b.zero_point is not None else 0
        np.testing.assert_array_equal(unpack(qw.packed, qw.bits, qw.n, qw.k), b.codes[order] + shift)
        np.testing.assert_array_equal(qw.scales, b.scales[order])
        zp = unpack_zero_points(qw.zero_points, qw.bits, qw.n, nb).astype(np.float32)
        if b.zero_point is not None:
            assert qw.correction is None and qw.default_zero_points()
            assert (zp == default).all()
        else:  # the minimum, as the rounded zero point plus the correction carry it: to float32 rounding
            ulp = np.finfo(np.float32).eps * float(np.abs(b.minimum).max())
            np.testing.assert_allclose(qw.correction.T - zp * qw.scales, b.minimum[order], rtol=0, atol=2 * ulp)
        np.testing.assert_allclose(qw.dequantize(), written[order], rtol=0, atol=1e-6)
    assert seen == set(ENCODERS)


def test_bundle_holds_the_grids_and_computes_the_dequantized_model(tiny_gguf, loaded, plan, tmp_path):
    """Default quant of a GGUF base is its own grids; at accuracy level 0 the bundle's logits are
    PyTorch's on the dequantized weights at every position; the graph's initializers are the blocks."""
    import onnx

    from jishi.pipeline import build
    from jishi.runtime.model import load

    grids, _ = plan
    out = build(loaded, None, tmp_path / "b", context=128, evaluate=False, quiet=True, accuracy_level=0)
    model = load(out)
    q = model.manifest.graph.quantization
    assert q["name"] == "gguf" and q["block"] == 32 and q["zero_point_correction"] is True
    assert q["formats"]["self_attn.v_proj"] == {"Q6_K": 1, "Q5_K": 1}
    assert q["forms"]["Q6_K"] == "int8 block 16 (6-bit codes + 96), zero point 128"

    ids = [int(i) for i in np.random.default_rng(3).integers(3, 380, 90)]
    with torch.no_grad():
        expected = loaded.model(torch.tensor([ids])).logits[0].numpy()
    got = model.engine.feed(ids, all_logits=True)
    scale = float(np.abs(expected).max())
    assert 1.0 < scale < 100.0  # logits of a realistic size
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * scale)

    graph = onnx.load(str(out / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    # layer 0: q and k share Q4_K (one MatMulNBits), v is Q6_K (another); layer 1: q, k, v all Q5_K (one)
    qk = grids.weights["model.layers.0.self_attn.q_proj.weight"], grids.weights["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(inits["layer0.attn.qkv.part0.qweight"], np.concatenate([w.packed for w in qk]))
    np.testing.assert_array_equal(inits["layer0.attn.qkv.part1.qweight"],
                                  grids.weights["model.layers.0.self_attn.v_proj.weight"].packed)
    np.testing.assert_array_equal(inits["layer1.mlp.down.scales"],
                                  grids.weights["model.layers.1.mlp.down_proj.weight"].scales.reshape(-1))
    np.testing.assert_array_equal(inits["lm_head.qweight"], grids.weights["model.embed_tokens.weight"].packed)
    # fp16 block scales (Q5_0 here, Q8_0 in the table) are stored as the file's fp16 values, once for a tied pair
    o = grids.weights["model.layers.0.self_attn.o_proj.weight"]
    assert inits["layer0.attn.o.scales.fp16"].dtype == np.float16
    np.testing.assert_array_equal(inits["layer0.attn.o.scales.fp16"].astype(np.float32), o.scales.reshape(-1))
    assert "lm_head.scales.fp16" in inits and "model.embed_tokens.scales" not in inits
    assert not any(n.endswith("qzeros") and n.startswith(("lm_head", "layer0.attn.o")) for n in inits)


def test_a_fused_gguf_projection_is_split_into_the_graphs_parts_unchanged():
    """Phi-3 files hold gate and up as one ffn_up tensor: its blocks are split by rows, exactly."""
    from gguf_files import q4_k

    from jishi.distill.gguf_tensors import RawTensor
    from jishi.export.from_gguf import grid_weights

    b = q4_k(np.random.default_rng(5), 96, 256)
    full = gguf.quants.dequantize(b.raw, gguf.GGMLQuantizationType.Q4_K)
    raw = {"model.layers.0.mlp.gate_up_proj.weight": RawTensor("blk.0.ffn_up.weight", "Q4_K", 96, 256, b.raw, 4.5)}
    ref = {"model.layers.0.mlp.gate_proj.weight": full[:48], "model.layers.0.mlp.up_proj.weight": full[48:]}
    plan = grid_weights(raw, ref)
    gate, up = plan.weights["model.layers.0.mlp.gate_proj.weight"], plan.weights["model.layers.0.mlp.up_proj.weight"]
    np.testing.assert_array_equal(unpack(up.packed, 4, 48, 256), b.codes[48:])
    np.testing.assert_array_equal(gate.scales, b.scales[:48])
    np.testing.assert_allclose(up.dequantize(), full[48:], rtol=0, atol=1e-6)
    assert plan.formats == {"mlp.gate_up_proj": {"Q4_K": 1}} and not plan.requantized


def test_int4_keeps_the_4_bit_blocks_and_lists_what_it_re_quantized(loaded, plan, tmp_path):
    from jishi.pipeline import build
    from jishi.runtime.bundle import open_bundle

    grids, _ = plan
    out = build(loaded, "int4", tmp_path / "i4", context=128, evaluate=False, quiet=True, accuracy_level=0)
    q = open_bundle(out).manifest.graph.quantization
    assert q["name"] == "int4"
    kept = {t for counts in q["formats"].values() for t in counts}
    moved = {t for counts in q["requantized"].values() for t in counts}
    assert kept == {"Q4_0", "Q4_K"} and moved == {"Q5_0", "Q5_K", "Q6_K", "Q8_0"}

    import onnx

    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    gate_up = [grids.weights[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up")]  # both Q4_K in layer 1
    np.testing.assert_array_equal(inits["layer1.mlp.gate_up.qweight"], np.concatenate([w.packed for w in gate_up]))


def test_an_adapter_on_the_gguf_grids_equals_peft_on_the_dequantized_model(loaded, tmp_path):
    """Merge points on mixed grids: corrected projections carry their block sums, exact ones a zero
    column; with an adapter bound the logits equal PEFT on the dequantized weights (accuracy level 0)."""
    import copy

    import peft

    import jishi
    from jishi.export.adapters import add_adapter
    from jishi.pipeline import build

    out = build(loaded, None, tmp_path / "b", context=128, evaluate=False, quiet=True, accuracy_level=0)
    torch.manual_seed(7)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.get_peft_model(copy.deepcopy(loaded.model),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    lora.save_pretrained(tmp_path / "alpha")
    add_adapter(out, "alpha", tmp_path / "alpha")
    m = jishi.load(out)
    ids = list(range(5, 60))
    with torch.no_grad():
        plain = loaded.model(torch.tensor([ids])).logits[0].numpy()
        adapted = lora.eval()(torch.tensor([ids])).logits[0].numpy()
    scale = float(np.abs(plain).max())
    np.testing.assert_allclose(m.engine.feed(ids, all_logits=True), plain, atol=1e-4 * scale, rtol=0)
    m.engine.reset()
    m.use_adapter("alpha")
    np.testing.assert_allclose(m.engine.feed(ids, all_logits=True), adapted, atol=1e-4 * scale, rtol=0)
    assert np.abs(adapted - plain).max() > 100 * 1e-4 * scale  # the adapter does change the output


def test_the_gguf_is_read_into_torch_as_transformers_reads_it(tiny_gguf, loaded):
    """jishi reads a GGUF one tensor at a time; the model equals transformers' own reading exactly."""
    import transformers

    path = tiny_gguf[0]
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  torch_dtype=torch.float32).eval()
    ours, theirs = loaded.model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


# fp16 fields of each type (byte offset in its block): given finite values, the other bytes may be anything.
HALF_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}


@pytest.mark.parametrize("kind", sorted(HALF_FIELDS) + ["F16", "BF16", "F32"])
def test_every_registered_type_equals_ggufs_dequantize_on_random_blocks(kind):
    """Random bytes are valid blocks of every type (scales made finite): the registry's effective weights
    equal gguf's own dequantize, and each type is in the form the registry says."""
    from jishi.export.gguf_formats import FORMATS, to_weight

    fmt = FORMATS[kind]
    rng = np.random.default_rng(abs(hash(kind)) % 2**32)
    n, k = 6, 512
    nb = k // fmt.block_values
    if fmt.bits is None:
        values = rng.normal(0, 0.05, (n, k)).astype(np.float32)
        raw = {"F32": values, "F16": values.astype(np.float16),
               "BF16": (values.view(np.uint32) >> 16).astype(np.uint16)}[kind].view(np.uint8).reshape(n, -1)
    else:
        raw = rng.integers(0, 256, (n, nb, fmt.block_bytes), dtype=np.uint8)
        for at in HALF_FIELDS[kind]:
            raw[..., at:at + 2] = rng.uniform(-0.02, 0.02, (n, nb)).astype(np.float16)[..., None].view(np.uint8)
        raw = raw.reshape(n, -1)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(n, k)
    w = to_weight(kind, raw, n, k)
    if fmt.bits is None:
        np.testing.assert_array_equal(w.astype(np.float32), expected)
        return
    import re

    assert (w.bits, w.block) == (fmt.bits, int(re.search(r"block (\d+)", fmt.form).group(1)))
    np.testing.assert_allclose(w.dequantize(), expected, rtol=0, atol=1e-6 * max(1.0, float(np.abs(expected).max())))


def test_the_graph_for_requests_without_adapters_keeps_the_corrections_as_constants(loaded, tmp_path):
    """A GGUF bundle with merge points holds two graphs over one weights file: the one opened for
    plain requests has a side path (with constant A and B) exactly where a projection's grid needs a
    correction, none where it does not, and both graphs compute the dequantized model's logits."""
    import onnx

    from jishi.pipeline import build
    from jishi.runtime.model import load

    out = build(loaded, None, tmp_path / "b", context=128, evaluate=False, quiet=True, accuracy_level=0)
    assert load(out).manifest.merge_points["graph"] == "model.lora.onnx"
    plain = onnx.load(str(out / "model.onnx"), load_external_data=False)
    lora = onnx.load(str(out / "model.lora.onnx"), load_external_data=False)
    rows = {t.name: t.dims[0] for t in lora.graph.initializer if t.name.startswith("lora.") and t.name.endswith(".b")}
    corrected = {n.removeprefix("lora.").removesuffix(".b") for n, r in rows.items() if r > 1}
    uncorrected = {n.removeprefix("lora.").removesuffix(".b") for n, r in rows.items() if r == 1}
    assert corrected and uncorrected  # the tiny file mixes grids with float minima and without
    side = {n.name.removesuffix("/side_b") for n in plain.graph.node if n.name.endswith("/side_b")}
    assert side == corrected
    assert not [i for i in plain.graph.input if i.name.startswith("lora.")]
    assert len(lora.graph.node) - len(plain.graph.node) == 2 * len(uncorrected)

    ids = [int(i) for i in np.random.default_rng(5).integers(3, 380, 70)]
    with torch.no_grad():
        expected = loaded.model(torch.tensor([ids])).logits[0].numpy()
    model = load(out)
    got_plain = model.engine.feed(ids, all_logits=True)
    model.open_adapter_graph()
    got_lora = model.engine.feed(ids, all_logits=True)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(got_plain, expected, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(got_lora, got_plain, rtol=0, atol=1e-5 * scale)


def test_int4_from_a_gguf_keeps_its_corrections_at_the_merge_points(loaded, tmp_path):
    """--quant int4 of a GGUF keeps its Q4_K / Q4_0 blocks with their float minima whatever the int4 default
    for zero points: the merge points' defaults carry the block sums, so an adapter whose B is zero
    computes exactly what the plain graph does, and one with a B does change it."""
    import copy

    import peft

    import jishi
    from jishi.export.adapters import add_adapter
    from jishi.pipeline import build

    out = build(loaded, "int4", tmp_path / "i4", context=128, evaluate=False, quiet=True, accuracy_level=0)
    m = jishi.load(out)
    assert m.manifest.graph.quantization["zero_point_correction"] is True
    assert m.manifest.merge_points["a_default"] == "block_sums"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, std in (("zero", 0.0), ("alpha", 0.05)):
        torch.manual_seed(7)
        lora = peft.get_peft_model(copy.deepcopy(loaded.model),
                                   peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
        with torch.no_grad():
            for pname, p in lora.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0.0, std) if std else p.zero_()
        lora.save_pretrained(tmp_path / name)
        add_adapter(out, name, tmp_path / name)
    ids = list(range(5, 60))
    m = jishi.load(out)
    plain = m.engine.feed(ids, all_logits=True).copy()
    scale = float(np.abs(plain).max())
    m.engine.reset()
    m.use_adapter("zero")
    np.testing.assert_allclose(m.engine.feed(ids, all_logits=True), plain, atol=1e-5 * scale, rtol=0)
    m.engine.reset()
    m.use_adapter("alpha")
    assert np.abs(m.engine.feed(ids, all_logits=True) - plain).max() > 1e-2 * scale
