"""LoRA adapters through the merge points, against peft in PyTorch."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jishi
from jishi.errors import AdapterError

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft(base_dir, out, seed, r=4, alpha=8, targets=ALL):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)  # peft starts B at zero: make the adapter do something
    lora.save_pretrained(out)
    return lora.eval()


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, tiny_dirs, tiny_bundles):
    """The fp32 and int4 tiny bundles, each with two adapters, and the peft models. The int4 one has exact zero
    points, whose correction rides in the side paths the adapters use (the tests below check that sharing)."""
    from jishi.export.adapters import add_adapter

    from jishi.pipeline import build

    root = tmp_path_factory.mktemp("adapters")
    models = {"alpha": make_peft(tiny_dirs["llama"], root / "alpha", 1),
              "beta": make_peft(tiny_dirs["llama"], root / "beta", 2, r=2, targets=["q_proj", "v_proj", "down_proj"])}
    bundles = {}
    for quant in ("fp32", "int4"):
        b = build(str(tiny_dirs["llama"]), quant, root / f"bundle-{quant}", context=256, evaluate=False, quiet=True,
                  merge_points=True, **({"zero_points": "exact"} if quant == "int4" else {}))
        for name in models:
            add_adapter(b, name, root / name)
        bundles[quant] = b
    return bundles, models, root


IDS = list(range(5, 45))


def torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_bundle_without_merge_points_refuses_adapters(tiny_dirs, tmp_path, adapted):
    from jishi.export.adapters import add_adapter
    from jishi.pipeline import build

    _, _, root = adapted
    b = build(str(tiny_dirs["llama"]), "fp32", tmp_path / "plain", context=256, evaluate=False, quiet=True,
              merge_points=False)
    assert sorted(p.name for p in b.glob("*.onnx")) == ["model.onnx"]
    with pytest.raises(AdapterError, match="built without merge points"):
        add_adapter(b, "alpha", root / "alpha")


def test_cli_build_with_an_adapter_and_run_with_it(adapted, tiny_dirs, tmp_path):
    import subprocess
    import sys

    _, models, root = adapted
    out = tmp_path / "cli"
    cli = lambda *a: subprocess.run([sys.executable, "-m", "jishi.cli", *a], capture_output=True, text=True, timeout=300)
    done = cli("build", "--base", str(tiny_dirs["llama"]), "--quant", "fp32", "--context", "128", "--no-eval",
               "--adapter", f"alpha={root / 'alpha'}", "-o", str(out))
    assert done.returncode == 0, done.stderr
    listed = cli("adapter", "list", str(out))
    assert "alpha" in listed.stdout and "q,k,v,o,gate,up,down" in listed.stdout
    run = cli("run", str(out), "Hello", "--raw", "--temperature", "0", "--max-tokens", "6", "--adapter", "alpha")
    assert run.returncode == 0, run.stderr
    expected = jishi.load(out).generate("Hello", max_new_tokens=6, temperature=0, adapter="alpha").text
    assert run.stdout == expected + "\n"
    assert cli("adapter", "remove", str(out), "alpha").returncode == 0
    assert jishi.load(out).adapters == []


def test_adapter_logits_match_peft_and_no_adapter_matches_the_base(adapted, tiny_dirs):
    bundles, models, _ = adapted
    m = jishi.load(bundles["fp32"])
    assert m.adapters == ["alpha", "beta"]
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    for name in ("alpha", "beta", None, "alpha"):  # switching there and back
        m.use_adapter(name)
        got = m.engine.feed(IDS, all_logits=True)
        m.engine.reset()
        expected = torch_logits(models[name] if name else base)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("zero_points", ["exact", "integer"])
def test_int4_with_an_adapter_is_its_quantized_weights_plus_the_adapter(adapted, tiny_dirs, tmp_path, zero_points):
    """At accuracy level 0, int4 + adapter equals peft on the dequantized int4 weights, tightly: with exact zero
    points the adapter rides in the same side path as the zero-point correction, with integer ones alone."""
    from jishi.export.adapters import add_adapter
    from jishi.export.quant import quantize_asymmetric, quantize_symmetric_int8
    from jishi.pipeline import build

    bundles, models, root = adapted
    b = build(str(tiny_dirs["llama"]), "int4", tmp_path / f"int4-{zero_points}", context=128, evaluate=False,
              quiet=True, accuracy_level=0, merge_points=True, method="rtn", zero_points=zero_points)
    add_adapter(b, "alpha", root / "alpha")
    ref = copy.deepcopy(models["alpha"])  # the fixture's model stays the float one for the other tests
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith("base_layer"):
                mod.weight.copy_(torch.from_numpy(quantize_asymmetric(mod.weight.numpy(), 4, 32, correct=zero_points == "exact").dequantize()))
        emb = ref.base_model.model.model.embed_tokens.weight
        emb.copy_(torch.from_numpy(quantize_symmetric_int8(emb.numpy()).dequantize()))
    m = jishi.load(b)
    m.use_adapter("alpha")
    np.testing.assert_allclose(m.engine.feed(IDS, all_logits=True), torch_logits(ref), atol=1e-4, rtol=0)


def test_generate_with_an_adapter_and_switching_reproduces_outputs(adapted):
    bundles, _, _ = adapted
    m = jishi.load(bundles["fp32"])
    kw = dict(max_new_tokens=12, temperature=0)
    first = {n: m.generate("The value", adapter=n, **kw).text for n in ("alpha", "beta", None)}
    again = {n: m.generate("The value", adapter=n, **kw).text for n in (None, "beta", "alpha")}
    assert first == again
    assert len(set(first.values())) == 3


def test_wrong_adapters_are_refused(adapted, tmp_path, tiny_tokenizer):
    from conftest import make_tiny
    from jishi.export.adapters import add_adapter

    bundles, _, root = adapted
    other = make_tiny("llama", tmp_path / "wider", tiny_tokenizer, hidden_size=96, intermediate_size=128)
    make_peft(other, tmp_path / "foreign", 3)
    b = tmp_path / "b"
    shutil.copytree(bundles["fp32"], b)
    with pytest.raises(AdapterError, match="expected \\(64, r\\).*made for another base"):
        add_adapter(b, "foreign", tmp_path / "foreign")
    deeper = make_tiny("llama", tmp_path / "deeper", tiny_tokenizer, layers=3)
    make_peft(deeper, tmp_path / "deep", 4)
    with pytest.raises(AdapterError, match="weights for layer 2, but the model has 2 layers"):
        add_adapter(b, "deep", tmp_path / "deep")
    (tmp_path / "junk").mkdir()
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        add_adapter(b, "junk", tmp_path / "junk")
    m = jishi.load(b)
    with pytest.raises(AdapterError, match="no adapter 'nope'; it has: alpha, beta"):
        m.generate("Hi", adapter="nope")
    corrupt = b / "adapters" / "alpha.onnx_adapter"
    corrupt.write_bytes(b"\0" * corrupt.stat().st_size)
    import json
    body = json.loads((b / "manifest.json").read_text())
    import hashlib
    body["files"]["adapters/alpha.onnx_adapter"]["sha256"] = hashlib.sha256(corrupt.read_bytes()).hexdigest()
    (b / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(AdapterError, match="not a readable adapter file"):
        jishi.load(b).generate("Hi", adapter="alpha")


@pytest.mark.parametrize("zero_points", ["exact", "integer"])
def test_int4_merge_points_with_no_adapter_change_nothing(tiny_dirs, tmp_path, zero_points):
    """With exact zero points the shared block-sum matrix the runtime binds is the correction the plain graph
    stores; with integer ones the merge points are zeros when no adapter is bound."""
    from jishi.pipeline import build

    kw = dict(context=128, evaluate=False, quiet=True, zero_points=zero_points)
    with_mp = jishi.load(build(str(tiny_dirs["qwen2"]), "int4", tmp_path / "mp", merge_points=True, **kw))
    without = jishi.load(build(str(tiny_dirs["qwen2"]), "int4", tmp_path / "plain", merge_points=False, **kw))
    a_default = "block_sums" if zero_points == "exact" else "zeros"
    assert with_mp.manifest.merge_points["a_default"] == a_default and without.manifest.merge_points is None
    expected = without.engine.feed(IDS, all_logits=True)
    assert with_mp.graph_file == "model.onnx"  # the constant side paths, for requests with no adapter
    np.testing.assert_array_equal(with_mp.engine.feed(IDS, all_logits=True), expected)
    with_mp.open_adapter_graph()  # the merge points, with the block sums bound as A
    assert with_mp.graph_file == "model.lora.onnx" and with_mp.has_merge_points
    np.testing.assert_array_equal(with_mp.engine.feed(IDS, all_logits=True), expected)


def test_plain_graph_beside_the_merge_points_reads_the_same_weights(adapted):
    """Bundles with merge points hold the graph twice over one weights file: fp32/int8/fp16 without the
    side paths in the plain one, int4 with them as constants (they carry its zero-point corrections)."""
    import onnx

    bundles, _, _ = adapted
    fp32, int4 = bundles["fp32"], bundles["int4"]
    assert sorted(p.name for p in int4.glob("*.onnx")) == ["model.lora.onnx", "model.onnx"]
    assert sorted(p.name for p in fp32.glob("*.onnx")) == ["model.lora.onnx", "model.onnx"]
    plain4 = onnx.load(str(int4 / "model.onnx"), load_external_data=False)
    lora4 = onnx.load(str(int4 / "model.lora.onnx"), load_external_data=False)
    assert not [i for i in plain4.graph.input if i.name.startswith("lora.")]
    assert len(plain4.graph.node) == len(lora4.graph.node)  # every projection of the tiny model is corrected
    sums = {t.name: onnx.numpy_helper.to_array(t) for t in plain4.graph.initializer if t.name.startswith("block_sums.")}
    assert set(sums) == {"block_sums.64.32", "block_sums.96.32"}
    np.testing.assert_array_equal(sums["block_sums.64.32"], np.kron(np.eye(2, dtype=np.float32), np.ones((32, 1), np.float32)))
    plain4, lora4 = (onnx.load(str(int4 / f)) for f in ("model.onnx", "model.lora.onnx"))  # with the weights
    corrections = {t.name: onnx.numpy_helper.to_array(t) for t in plain4.graph.initializer if t.name.endswith(".zp_correction")}
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in lora4.graph.initializer if t.name.startswith("lora.")}
    assert len(corrections) == 2 * 4
    for name, value in corrections.items():  # B's stored default, the same bytes
        np.testing.assert_array_equal(value, defaults["lora." + name.removesuffix(".zp_correction") + ".b"])
    plain = onnx.load(str(fp32 / "model.onnx"), load_external_data=False)
    lora = onnx.load(str(fp32 / "model.lora.onnx"), load_external_data=False)
    assert not [i for i in plain.graph.input if i.name.startswith("lora.")]
    assert len(lora.graph.node) - len(plain.graph.node) == 2 * 4 * 2  # two nodes per fused projection, 2 layers
    locations = {e.value for g in (plain, lora) for t in g.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}

    m = jishi.load(fp32)
    assert m.graph_file == "model.onnx" and not m.has_merge_points
    plain_logits = m.engine.feed(IDS, all_logits=True).copy()
    m.use_adapter("alpha")
    assert m.graph_file == "model.lora.onnx" and m.has_merge_points
    m.use_adapter(None)
    m.engine.reset()
    np.testing.assert_array_equal(m.engine.feed(IDS, all_logits=True), plain_logits)
    assert jishi.load(fp32, adapters=True).graph_file == "model.lora.onnx"
