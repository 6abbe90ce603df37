"""How int4 codes are found: the default by where the weights come from, the methods (round-to-nearest,
GPTQ in order and by activation order, AWQ scaling, both), and calibration that is honest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jishi.errors import BaseModelError, JishiError  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    from jishi.distill.base import load_base

    return load_base(str(tiny_dirs["llama"]))


def _manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


# -- the default ------------------------------------------------------------------------------------------------

def test_off_grid_weights_get_calibrated_int4_by_default_and_the_build_says_what_it_cost(llama, tmp_path, capsys):
    from jishi.pipeline import INT4_BOUND, build

    out = build(llama, None, tmp_path / "b", context=128, calibration_sequences=4)
    m = _manifest(out)
    q = m["graph"]["quantization"]
    assert q["name"] == "int4" and q["method"] == "gptq"
    assert q["method_reason"].startswith("these weights lie on no 4-bit grid")
    cal = q["calibration"]
    assert cal["sequences"] == 4 and cal["tokens_per_sequence"] == 128 and cal["act_order"] is True
    assert cal["heldout_check"]["in_heldout"] == 0 and cal["heldout_check"]["windows"] > 100_000
    assert 0 < cal["output_error"] < 0.2
    ev = m["evaluation"]
    assert ev["calibration_check"] == cal["heldout_check"]
    ratio = ev["perplexity"] / ev["reference_perplexity"]
    assert ev["int4_check"] == {"bound": INT4_BOUND, "perplexity_ratio": round(ratio, 4), "within": ratio <= INT4_BOUND}
    err = capsys.readouterr().err
    assert "int4 by GPTQ: these weights lie on no 4-bit grid" in err
    assert f"held-out perplexity {ev['perplexity']:.2f} against the unquantized model's {ev['reference_perplexity']:.2f}" in err


def test_int4_beyond_the_bound_is_said_with_what_to_do():
    from jishi.export.graph import QuantRecipe
    from jishi.pipeline import _int4_check

    said = []
    check = _int4_check({"perplexity": 22.2, "reference_perplexity": 16.69, "top1_agreement": 0.578},
                        QuantRecipe("int4", method="gptq"), said.append)
    assert check["within"] is False and check["perplexity_ratio"] == round(22.2 / 16.69, 4)
    assert "--quant int8" in check["advice"]
    assert said == [f"warning: int4 by GPTQ: held-out perplexity 22.20 against the unquantized model's 16.69 (+33.0%), "
                    f"top-1 agreement 57.8%, beyond the +5% bound for int4: {check['advice']}"]
    said.clear()
    assert _int4_check({"perplexity": 15.19, "reference_perplexity": 15.15, "top1_agreement": 0.968},
                       QuantRecipe("int4", method="grid"), said.append) == {"bound": 1.05, "perplexity_ratio": 1.0026,
                                                                            "within": True}
    assert said[0].endswith("(+0.3%), top-1 agreement 96.8%: within the +5% bound")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    pytest.importorskip("gguf")
    from gguf_files import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf"
    write_tiny_gguf(path, tiny_tokenizer)
    return path


def test_a_gguf_base_keeps_its_own_grids_by_default(tiny_gguf, tmp_path):
    from jishi.distill.base import load_base
    from jishi.pipeline import build

    base = load_base(str(tiny_gguf))
    default = _manifest(build(base, None, tmp_path / "d", context=128, evaluate=False, quiet=True))
    assert default["graph"]["quantization"]["name"] == "gguf" and default["graph"]["quantization"]["method"] == "grid"
    int4 = _manifest(build(base, "int4", tmp_path / "i4", context=128, evaluate=False, quiet=True))["graph"]["quantization"]
    assert int4["method"] == "grid" and "its 4-bit blocks are kept exactly" in int4["method_reason"]
    assert int4["formats"] and "calibration" not in int4
    rtn = _manifest(build(base, "int4", tmp_path / "r", context=128, evaluate=False, quiet=True, method="rtn"))
    assert rtn["graph"]["quantization"]["method"] == "rtn" and "formats" not in rtn["graph"]["quantization"]
    # another block size is not the file's grid: calibrated
    b16 = _manifest(build(base, "int4", tmp_path / "b16", context=128, evaluate=False, quiet=True, block=16,
                          calibration_sequences=2))["graph"]["quantization"]
    assert b16["method"] == "gptq" and b16["method_reason"].startswith("block 16 is not the GGUF's own 4-bit grid")


def _cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "jishi.cli", *args], capture_output=True, text=True, timeout=600, env=env)


def test_round_to_nearest_stays_available_by_name_and_the_aliases_agree(tiny_dirs, tmp_path):
    done = _cli("build", "--base", str(tiny_dirs["llama"]), "--method", "rtn", "--context", "64", "--no-eval",
                "-o", str(tmp_path / "rtn"))
    assert done.returncode == 0, done.stderr
    assert "int4 by round-to-nearest: asked for (--method rtn)" in done.stderr
    assert _manifest(tmp_path / "rtn")["graph"]["quantization"]["method"] == "rtn"
    done = _cli("build", "--base", str(tiny_dirs["llama"]), "--calibrated", "--method", "awq", "-o", str(tmp_path / "x"))
    assert done.returncode == 1 and "--calibrated means --method gptq, and --method awq was asked for" in done.stderr
    done = _cli("build", "--base", str(tiny_dirs["llama"]), "--quant", "int8", "--method", "gptq", "-o", str(tmp_path / "x"))
    assert done.returncode == 1 and "--method gptq applies to int4 only, not int8" in done.stderr


def test_bad_method_options_are_refused_with_what_to_do(llama, tmp_path):
    from jishi.pipeline import build

    with pytest.raises(JishiError, match="unknown int4 method 'hqq'; choose one of rtn, gptq, awq, awq-gptq"):
        build(llama, "int4", tmp_path / "x", method="hqq", quiet=True)
    with pytest.raises(JishiError, match=r"--method gptq applies to int4 only \(asked for int8\)"):
        build(llama, "int8", tmp_path / "x", method="gptq", quiet=True)
    with pytest.raises(JishiError, match="the GPTQ damping is a fraction .* above 0 and below 1"):
        build(llama, "int4", tmp_path / "x", damp=0.0, quiet=True)
    with pytest.raises(JishiError, match="folds input scales into the norms.*--no-merge-points"):
        build(llama, "int4", tmp_path / "x", method="awq", merge_points=True, quiet=True)
