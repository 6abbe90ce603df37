"""A LoRA trained against the exact int4 codes of a bundle: it lowers the KL it is trained on, the bundle runs it
as torch does on the dequantized codes, and a bundle of other codes refuses it."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jishi
from jishi.errors import AdapterError, JishiError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = list(range(5, 45))


def _codes(base, cfg, weights, block=32, sequences=4, seq_len=128):
    """GPTQ codes as the build makes them (context 128: sequences of min(256, 128) tokens): the same calibration
    batches, the same quantizer."""
    from jishi.distill.prune import calibration_batches
    from jishi.export.calibrate import calibrate
    from jishi.grid_recovery import block_codes
    from jishi.pipeline import ZERO_POINTS

    batches = calibration_batches(base.runtime_tokenizer(), sequences, seq_len)
    exact = ZERO_POINTS == "exact"
    cal = calibrate(base.model, cfg, weights, batches, "gptq", 4, block, exact_zero_points=exact)
    return block_codes(cfg, weights, block, exact, cal.codes)


def _grid_model(base, cfg, weights, codes, head_bits=8):
    from jishi.distill.grid_lora import on_grid
    from jishi.grid_recovery import grid_values

    return on_grid(base.model, grid_values(cfg, weights, codes, 32, head_bits), cfg)


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    from jishi.distill.base import load_base
    from jishi.export.from_torch import model_config, numpy_weights

    base = load_base(str(tiny_dirs["llama"]))
    cfg = model_config(base.model.config, 128)
    weights = numpy_weights(base.model, cfg)
    return base, cfg, weights


def test_training_on_the_grid_lowers_the_kl_on_held_out_tokens(tiny):
    from jishi.distill.grid_lora import GridLoraConfig, mean_kl, train_on_grid
    from jishi.grid_recovery import training_sequences
    from jishi.heldout import calibration_text, heldout_text, windows

    base, cfg, weights = tiny
    codes = _codes(base, cfg, weights)
    grid = _grid_model(base, cfg, weights, codes)
    # the grid model holds exactly the codes' values, frozen
    q0 = grid.model.layers[0].self_attn.q_proj.weight
    np.testing.assert_array_equal(q0.detach().numpy(), codes["model.layers.0.self_attn.q_proj.weight"].dequantize())
    assert not any(p.requires_grad for p in grid.parameters())
    tok = base.runtime_tokenizer()
    seqs = training_sequences(tok, calibration_text(), 400, 64)
    held = windows(tok.encode(heldout_text(), bos=False), 64)[:4]
    assert not {tuple(s) for s in seqs} & {tuple(h) for h in held}
    before = mean_kl(base.model, grid, held)
    assert before > 1e-3  # int4 moved the model
    config = GridLoraConfig(steps=100, rank=8, alpha=16, batch_size=4, seq_len=64, learning_rate=3e-3)
    result = train_on_grid(base.model, grid, seqs, cfg, config, eval_windows=held, quiet=True)
    assert result.kl_before == pytest.approx(before, rel=1e-5)  # B starts at zero: step 0 is the int4 model
    after = mean_kl(base.model, result.model, held)
    assert after == pytest.approx(result.kl_after, rel=1e-5)
    assert after < 0.75 * before, (before, after)  # measured: 0.0121 → 0.0076
    # only the LoRA moved: the grid weights are as they were
    np.testing.assert_array_equal(result.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
                                  .detach().numpy(), codes["model.layers.0.self_attn.q_proj.weight"].dequantize())


@pytest.fixture(scope="module")
def recovered(tmp_path_factory, tiny_dirs):
    """An int4 bundle built with a grid LoRA (accuracy level 0, GPTQ on 4 calibration sequences of 64 tokens)."""
    from jishi.pipeline import build

    root = tmp_path_factory.mktemp("grid-lora")
    out = build(str(tiny_dirs["llama"]), "int4", root / "int4", context=128, evaluate=False, quiet=True,
                accuracy_level=0, calibration_sequences=4, recover_steps=6, recover_rank=4)
    return out, root


def test_the_bundle_runs_the_lora_as_torch_does_on_the_dequantized_codes(recovered, tiny):
    from jishi.export.quant import codes_digest
    from jishi.runtime.bundle import open_bundle

    out, _ = recovered
    base, cfg, weights = tiny
    manifest = open_bundle(out).manifest
    assert [a["name"] for a in manifest.adapters] == ["recover"]
    info = json.loads((out.with_name(out.name + ".recover") / "jishi_adapter.json").read_text())
    assert info["grid"]["method"] == "gptq" and info["grid"]["zero_points"] == "integer"
    assert info["grid"]["codes_sha256"] == manifest.graph.quantization["codes_sha256"]
    codes = _codes(base, cfg, weights)
    assert codes_digest(codes) == manifest.graph.quantization["codes_sha256"]  # the reference has the bundle's codes
    ref = peft.PeftModel.from_pretrained(_grid_model(base, cfg, weights, codes), str(out.with_name(out.name + ".recover")))
    ref.eval()
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0].numpy()
        plain = _grid_model(base, cfg, weights, codes)(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(expected - plain).max() > 1e-3  # the trained LoRA does something
    m = jishi.load(out)
    np.testing.assert_allclose(m.engine.feed(IDS, all_logits=True), plain, atol=1e-4, rtol=0)
    m.engine.reset()
    m.use_adapter("recover")
    np.testing.assert_allclose(m.engine.feed(IDS, all_logits=True), expected, atol=1e-4, rtol=0)


def test_a_bundle_of_other_codes_refuses_the_adapter(recovered, tiny_dirs):
    from jishi.export.adapters import add_adapter
    from jishi.pipeline import build

    out, root = recovered
    adapter = out.with_name(out.name + ".recover")
    rtn = build(str(tiny_dirs["llama"]), "int4", root / "rtn", context=128, evaluate=False, quiet=True, method="rtn")
    with pytest.raises(AdapterError, match=r"adapter int4\.recover was trained against int4 codes sha256 .*\(gptq, "
                                           r"block 32, integer zero points.*this bundle has codes sha256 .*"
                                           r"jishi build --base BASE --recover-steps N"):
        add_adapter(rtn, "recover", adapter)
    fp32 = build(str(tiny_dirs["llama"]), "fp32", root / "fp32", context=128, evaluate=False, quiet=True)
    with pytest.raises(AdapterError, match=r"this bundle has no record of its int4 codes \(a fp32 bundle\)"):
        add_adapter(fp32, "recover", adapter)
    with pytest.raises(AdapterError, match="cannot be merged into the float weights"):
        build(str(tiny_dirs["llama"]), "int4", root / "merged", context=128, evaluate=False, quiet=True,
              merge=("recover", adapter))
    assert not (root / "merged").exists()


def test_recovery_needs_int4_codes_with_merge_points(tiny_dirs, tmp_path):
    from jishi.pipeline import build

    d = str(tiny_dirs["llama"])
    with pytest.raises(JishiError, match="--recover-steps trains against int4 codes, and this build is int8"):
        build(d, "int8", tmp_path / "a", evaluate=False, quiet=True, recover_steps=2)
    with pytest.raises(JishiError, match="--recover-steps trains against int4 codes of rtn or gptq, and this build's "
                                         "are by AWQ scaling and GPTQ"):
        build(d, "int4", tmp_path / "b", evaluate=False, quiet=True, recover_steps=2, method="awq-gptq",
              merge_points=None)
    with pytest.raises(JishiError, match="--recover-steps adds a LoRA at the merge points"):
        build(d, "int4", tmp_path / "c", evaluate=False, quiet=True, recover_steps=2, merge_points=False)


def test_cli_build_with_recovery_adds_the_adapter(tiny_dirs, tmp_path):
    import subprocess
    import sys

    cli = lambda *a: subprocess.run([sys.executable, "-m", "jishi.cli", *a], capture_output=True, text=True, timeout=600)
    out = tmp_path / "rec"
    done = cli("build", "--base", str(tiny_dirs["llama"]), "--context", "128", "--calibration-sequences", "2",
               "--recover-steps", "2", "--recover-rank", "2", "--no-eval", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "Training the LoRA on the int4 grid" in done.stderr and "Held-out KL to the float model" in done.stderr
    listed = cli("adapter", "list", str(out))
    assert "recover" in listed.stdout and "q,k,v,o,gate,up,down" in listed.stdout
    info = json.loads((tmp_path / "rec.recover" / "jishi_adapter.json").read_text())
    assert info["config"]["rank"] == 2 and info["training"]["steps"] == 2
    bad = cli("build", "--base", str(tiny_dirs["llama"]), "--quant", "int8", "--recover-steps", "2", "--no-eval",
              "-o", str(tmp_path / "int8"))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--recover-steps trains against int4 codes, and this build is int8: use --quant int4" in bad.stderr
