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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    assert cal["zero_points"] == "integer" and q["zero_point_correction"] is False
    assert cal["heldout_check"]["in_heldout"] == 0 and cal["heldout_check"]["windows"] > 100_000
    assert 0 < cal["output_error"] < 0.2
    ev = m["evaluation"]
    assert ev["calibration_check"] == cal["heldout_check"]
    ratio = ev["perplexity"] / ev["reference_perplexity"]
    assert ev["int4_check"] == {"bound": INT4_BOUND, "perplexity_ratio": round(ratio, 4), "within": ratio <= INT4_BOUND}
    err = capsys.readouterr().err
    assert "int4 by GPTQ: these weights lie on no 4-bit grid" in err
    from jishi.runtime.bundle import open_bundle
    from jishi.runtime.describe import describe

    text = describe(open_bundle(out))
    assert "codes" in text and "gptq: these weights lie on no 4-bit grid" in text
    assert "calibrated on  pydoc_data.topics after character 20000" in text and "heldout_check" not in text
    assert f"held-out perplexity {ev['perplexity']:.2f} against the unquantized model's {ev['reference_perplexity']:.2f}" in err


def test_info_says_what_the_int4_check_found(tiny_bundles, tmp_path):
    """jishi info: beyond the bound a warning with the advice; beyond it without the recovery LoRA but within it
    with the LoRA, which adapter to use."""
    import shutil
    from dataclasses import replace

    from jishi.export.bundle_writer import with_files, write_manifest
    from jishi.runtime.bundle import open_bundle
    from jishi.runtime.describe import describe

    bundle = shutil.copytree(tiny_bundles["int4"], tmp_path / "b")
    base = {"perplexity": 37.50, "reference_perplexity": 35.07, "top1_agreement": 0.852, "heldout": "the text"}
    for evaluation, expected in (
        ({**base, "int4_check": {"bound": 1.05, "perplexity_ratio": 1.0693, "within": False, "advice": "use int8"}},
         "int4 costs more than +5% perplexity here: use int8"),
        ({**base, "recovered": {"adapter": "recover", "perplexity": 36.65, "top1_agreement": 0.869},
          "int4_check": {"bound": 1.05, "perplexity_ratio": 1.0693, "within": False, "recovered_ratio": 1.0451,
                         "recovered_within": True}},
         "costs more than +5% perplexity without its LoRA, +4.5% with it: use --adapter recover")):
        m = open_bundle(bundle, verify_hashes=False).manifest
        write_manifest(bundle, with_files(replace(m, evaluation=evaluation), bundle))
        assert expected in describe(open_bundle(bundle))


def test_int4_beyond_the_bound_is_said_with_what_to_do():
    from jishi.export.graph import QuantRecipe
    from jishi.pipeline import _int4_check

    said = []
    check = _int4_check({"perplexity": 22.2, "reference_perplexity": 16.69, "top1_agreement": 0.578},
                        QuantRecipe("int4", method="gptq"), said.append)
    assert check["within"] is False and check["perplexity_ratio"] == round(22.2 / 16.69, 4)
    assert "--quant int8" in check["advice"] and "--recover-steps" in check["advice"] and "--block 16" in check["advice"]
    assert said == [f"warning: int4 by GPTQ: held-out perplexity 22.20 against the unquantized model's 16.69 (+33.0%), "
                    f"top-1 agreement 57.8%, beyond the +5% bound for int4: {check['advice']}"]
    said.clear()
    # AWQ's scales leave no merge points for a recovery LoRA: it is not offered there
    assert "--recover-steps" not in _int4_check({"perplexity": 22.2, "reference_perplexity": 16.69, "top1_agreement": 0.5},
                                                QuantRecipe("int4", method="awq"), said.append)["advice"]
    said.clear()
    # recovered: the plain bundle is beyond the bound, with its LoRA within it: said so, and no advice
    recovered = {"adapter": "recover", "perplexity": 36.65, "top1_agreement": 0.869}
    check = _int4_check({"perplexity": 37.50, "reference_perplexity": 35.07, "top1_agreement": 0.852,
                         "recovered": recovered}, QuantRecipe("int4", method="gptq"), said.append)
    assert check == {"bound": 1.05, "perplexity_ratio": 1.0693, "within": False, "recovered_ratio": 1.0451,
                     "recovered_within": True}
    assert said == ["int4 by GPTQ: held-out perplexity 37.50 against the unquantized model's 35.07 (+6.9%), top-1 "
                    "agreement 85.2%; with its recover LoRA +4.5%, within the +5% bound: use the bundle with "
                    "--adapter recover"]
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


def test_integer_zero_points_are_a_build_choice_recorded_in_the_manifest(tiny_dirs, tmp_path):
    """``--zero-points integer``: GPTQ onto MatMulNBits' own grid, no correction node in the graph, and
    the choice on record; asked of a bundle that is not int4 it is refused with the reason."""
    import onnx

    done = _cli("build", "--base", str(tiny_dirs["llama"]), "--method", "gptq", "--zero-points", "integer",
                "--calibration-sequences", "4", "--context", "64", "--no-eval", "-o", str(tmp_path / "int"))
    assert done.returncode == 0, done.stderr
    q = _manifest(tmp_path / "int")["graph"]["quantization"]
    assert q["zero_point_correction"] is False and q["calibration"]["zero_points"] == "integer"
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int" / "model.onnx"), load_external_data=False).graph.node]
    assert "Gemm" not in ops and ops.count("MatMulNBits") == 4 * 2 + 1
    # the adapter graph's side paths are the merge points alone: nothing to add when no adapter is bound
    assert _manifest(tmp_path / "int")["merge_points"]["a_default"] == "zeros"
    done = _cli("build", "--base", str(tiny_dirs["llama"]), "--quant", "int8", "--zero-points", "integer",
                "-o", str(tmp_path / "x"))
    assert done.returncode == 1 and "--zero-points applies to int4 bundles (this one is int8)" in done.stderr


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


# -- the methods on one layer ------------------------------------------------------------------------------------

def _layer(seed: int, n: int = 64, k: int = 128):
    """A weight and an input source with correlated features and a few loud ones, as in real activations."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    mix = np.eye(k) + 0.6 * rng.standard_normal((k, 8)) @ rng.standard_normal((8, k)) / np.sqrt(8)
    loud = np.where(rng.random(k) < 0.05, 8.0, 1.0)

    def inputs(m):
        return ((rng.standard_normal((m, k)) @ mix) * loud).astype(np.float32)

    return w, inputs


def _methods(w, calib):
    """Each method's dequantized weight for ``w`` calibrated on ``calib``, in the original input basis."""
    from jishi.export.calibrate import InputStats, quantize_group

    stats = InputStats(calib.T.astype(np.float64) @ calib / len(calib), np.abs(calib).mean(0), len(calib))
    out = {}
    for name, method, act_order in (("rtn", "rtn", True), ("gptq", "gptq", False), ("gptq-act", "gptq", True),
                                    ("awq", "awq", True), ("awq-gptq", "awq-gptq", True)):
        qw, s, _ = quantize_group(w, stats, method, act_order=act_order)
        out[name] = qw.dequantize() if s is None else qw.dequantize() / s
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_method_moves_a_layers_output_less_than_round_to_nearest(seed):
    """Layer output error ‖x·(Ŵ − W)ᵀ‖ / ‖x·Wᵀ‖ on the calibration inputs and on inputs none of them saw:
    GPTQ by activation order below plain GPTQ, AWQ scaling below rounding alone, AWQ + GPTQ lowest (on the
    calibration inputs it cannot be worse than GPTQ alone, which is one of the scalings it tries)."""
    from jishi.export.gptq import output_error

    w, inputs = _layer(seed)
    calib, fresh = inputs(2048), inputs(1024)
    got = _methods(w, calib)
    for x in (calib, fresh):
        e = {name: output_error(w_hat, w, x) for name, w_hat in got.items()}
        assert e["gptq"] < 0.5 * e["rtn"], e
        assert e["gptq-act"] < 0.9 * e["gptq"], e
        assert e["awq"] < 0.85 * e["rtn"], e
        assert e["awq-gptq"] < e["gptq-act"], e


def test_act_order_keeps_every_blocks_grid_in_place_and_runs_in_matmul_nbits():
    """Static groups: the scales and minima are round-to-nearest's, from the original weights, so the
    blocks still tile the inputs in order; only the codes differ, and MatMulNBits runs them as written."""
    from jishi.export.gptq import gptq_quantize
    from jishi.export.quant import quantize_asymmetric, unpack
    from test_quant import run_matmul_nbits

    w, inputs = _layer(3)
    calib = inputs(1024)
    q = gptq_quantize(w, calib.T.astype(np.float64) @ calib / len(calib), 4, 32, act_order=True)
    rtn = quantize_asymmetric(w, 4, 32, correct=True)
    np.testing.assert_array_equal(q.scales, rtn.scales)
    np.testing.assert_array_equal(q.zero_points, rtn.zero_points)
    np.testing.assert_array_equal(q.correction, rtn.correction)
    assert (unpack(q.packed, 4, q.n, q.k) != unpack(rtn.packed, 4, rtn.n, rtn.k)).mean() > 0.05
    x = inputs(4)
    np.testing.assert_allclose(run_matmul_nbits(q, x), x @ q.dequantize().T, atol=2e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_integer_zero_points_are_matmul_nbits_own_form_and_gptq_still_beats_rounding_on_them(seed):
    """On the integer-zero-point grid (0 on the grid, the zero point a code) there is no correction: the codes
    run in MatMulNBits as they are, every value is ``scale·(q − zp)``, and GPTQ moves the layer's output less
    than round-to-nearest does on that same grid, in either walk."""
    from jishi.export.calibrate import InputStats, quantize_group
    from jishi.export.gptq import gptq_quantize, output_error
    from jishi.export.quant import quantize_asymmetric, unpack, unpack_zero_points
    from test_quant import run_matmul_nbits

    w, inputs = _layer(seed)
    calib, fresh = inputs(2048), inputs(1024)
    H = calib.T.astype(np.float64) @ calib / len(calib)
    rtn = quantize_asymmetric(w, 4, 32, correct=False)
    for act_order in (False, True):
        q = gptq_quantize(w, H, 4, 32, act_order=act_order, exact_zero_points=False)
        assert q.correction is None and q.default_zero_points() is False
        codes = unpack(q.packed, 4, q.n, q.k).reshape(q.n, q.k // 32, 32).astype(np.float32)
        zp = unpack_zero_points(q.zero_points, 4, q.n, q.k // 32).astype(np.float32)
        np.testing.assert_array_equal(q.dequantize(), (q.scales[:, :, None] * (codes - zp[:, :, None])).reshape(q.n, q.k))
        x = inputs(4)
        np.testing.assert_allclose(run_matmul_nbits(q, x), x @ q.dequantize().T, atol=2e-5, rtol=0)
        for data in (calib, fresh):
            assert output_error(q.dequantize(), w, data) < 0.6 * output_error(rtn.dequantize(), w, data)
    # by activation order the grids are round-to-nearest's on the same weights
    q = gptq_quantize(w, H, 4, 32, act_order=True, exact_zero_points=False)
    np.testing.assert_array_equal(q.scales, rtn.scales)
    np.testing.assert_array_equal(q.zero_points, rtn.zero_points)
    stats = InputStats(H, np.abs(calib).mean(0), len(calib))
    for method in ("rtn", "gptq", "awq", "awq-gptq"):
        qw, _, _ = quantize_group(w, stats, method, exact_zero_points=False)
        assert qw.correction is None, method


def test_damping_is_a_parameter_between_trusting_the_calibration_and_rounding():
    from jishi.export.gptq import gptq_quantize, output_error
    from jishi.export.quant import quantize_asymmetric, unpack

    w, inputs = _layer(4)
    calib = inputs(2048)
    H = calib.T.astype(np.float64) @ calib / len(calib)
    err = {d: output_error(gptq_quantize(w, H, act_order=True, damp=d).dequantize(), w, calib) for d in (0.01, 0.1, 1.0)}
    assert err[0.01] < err[0.1] < err[1.0], err
    # damped without bound, no error is carried to other columns: round-to-nearest on the same grid
    flat = gptq_quantize(w, H, act_order=True, damp=1e9)
    assert (unpack(flat.packed, 4, 64, 128) == unpack(quantize_asymmetric(w, 4, 32).packed, 4, 64, 128)).mean() > 0.999
    with pytest.raises(ValueError, match="the damping must be a positive fraction"):
        gptq_quantize(w, H, damp=0.0)
    with pytest.raises(ValueError, match=r"a Hessian of shape \(64, 64\) does not fit a weight with 128 inputs"):
        gptq_quantize(w, H[:64, :64])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "phi3"])
def test_layer_by_layer_statistics_are_those_of_the_full_forward_pass(family, tiny_dirs):
    """Each layer run alone on the float outputs of the one before, with the arguments the model gives it
    (masks, rotary tables, Gemma 3's sliding windows), sees exactly the inputs it sees in the whole model."""
    from transformers import AutoModelForCausalLM

    from jishi.export.calibrate import INPUT_OF, layer_statistics

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 384, (1, 40), generator=g) for _ in range(3)]
    sums, hooks = {}, []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in INPUT_OF and ".layers." in name:
            key = (int(name.split(".layers.")[1].split(".")[0]), INPUT_OF[leaf])

            def hook(mod, args, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + x.T @ x
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    seen = set()
    for i, stats in layer_statistics(model, batches):
        for key, st in stats.items():
            np.testing.assert_allclose(st.hessian, sums[(i, key)].numpy() / 120, rtol=1e-10, atol=1e-12)
            assert st.tokens == 120 and st.mean_abs.shape == (st.hessian.shape[0],)
            seen.add((i, key))
    assert seen == set(sums) and len(seen) == 4 * model.config.num_hidden_layers


# -- calibration that is honest ----------------------------------------------------------------------------------

def test_calibration_text_that_shares_a_passage_with_the_heldout_text_is_refused(llama, tmp_path):
    from jishi.heldout import OVERLAP_CHARS, calibration_text, heldout_text
    from jishi.pipeline import build, check_calibration

    clean = check_calibration(calibration_text())
    assert clean == {"window_chars": OVERLAP_CHARS, "windows": len(calibration_text()) - OVERLAP_CHARS + 1, "in_heldout": 0}
    leaked = calibration_text()[:40_000] + heldout_text()[7_000:7_100] + calibration_text()[40_000:80_000]
    with pytest.raises(JishiError, match=r"the calibration file holds 1 passage\(s\) of the held-out evaluation text "
                                         r"\(pydoc_data.topics, first 20,000 characters\), e.g. '.+': the quality "
                                         r"measured on it would flatter a model calibrated on it. Remove those passages"):
        build(llama, "int4", tmp_path / "x", context=128, quiet=True, calibration=leaked, calibration_sequences=2)
    assert not (tmp_path / "x").exists()
    # the same text with the passage taken out calibrates, and the check is recorded
    out = build(llama, "int4", tmp_path / "ok", context=128, quiet=True, evaluate=False, calibration_sequences=2,
                calibration=calibration_text()[:40_000] + calibration_text()[40_000:80_000])
    q = _manifest(out)["graph"]["quantization"]
    assert q["calibration"]["heldout_check"]["in_heldout"] == 0
    assert q["calibration"]["text"].startswith("a given text (80,000 characters, sha256 ")


def test_calibration_text_too_short_for_the_method_is_refused_with_the_fix(llama, tmp_path):
    from jishi.distill.prune import calibration_batches
    from jishi.pipeline import build

    short = "Plants need water and light. " * 20
    n = len(llama.runtime_tokenizer().encode(short, bos=False))
    with pytest.raises(JishiError, match=rf"the calibration text has {n} tokens, fewer than the 4 sequences of 128 tokens "
                                         r"\(512 tokens\) calibration needs: give a longer calibration file "
                                         r"\(--calibration FILE\) or ask for fewer sequences \(--calibration-sequences N\)"):
        build(llama, "int4", tmp_path / "x", context=128, quiet=True, calibration=short, calibration_sequences=4)
    assert len(calibration_batches(llama.runtime_tokenizer(), 1, n, text=short)) == 1  # exactly enough is enough
    with pytest.raises(JishiError, match="ask for fewer or shorter calibration sequences"):
        calibration_batches(llama.runtime_tokenizer(), 100_000, 256)


@pytest.fixture(scope="module")
def other_tokenizers(tiny_tokenizer):
    """Byte-level BPE tokenizers that differ from the tiny models' one: a smaller vocabulary, and one of the same
    size trained on other text (the same special tokens, other ids for most tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from jishi.heldout import HELDOUT_CHARS, _topics_text

    def train(size, text):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator([text], trainers.BpeTrainer(
            vocab_size=size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        return tok

    text = _topics_text()
    return {"smaller": (train(320, text[HELDOUT_CHARS:HELDOUT_CHARS + 60_000]), 320),
            "other ids": (train(384, text[-60_000:]), 384)}


@pytest.mark.parametrize("kind,why", [("smaller", r"a vocabulary of 320 tokens against 384"),
                                      ("other ids", r"[\d,]+ of 384 tokens have other ids \(e.g. '.+': \d+ against \d+\)")])
def test_a_student_with_another_tokenizer_than_its_teacher_is_refused(kind, why, other_tokenizers, tiny_dirs, tmp_path):
    from conftest import make_tiny

    from jishi.evaluation import evaluate_models
    from jishi.pipeline import build

    tok, vocab = other_tokenizers[kind]
    student = make_tiny("llama", tmp_path / "student", tok, vocab_size=vocab)
    teacher = str(tiny_dirs["llama"])
    with pytest.raises(BaseModelError, match=rf"student does not share its teacher {teacher}'s tokenizer \({why}\), so the "
                                             r"two cannot be compared token by token: pass the model it was distilled "
                                             r"from as the teacher \(--teacher\)"):
        build(str(student), "int8", tmp_path / "x", context=64, quiet=True, teacher=teacher)
    # without a teacher to measure against, it builds
    build(str(student), "int8", tmp_path / "alone", context=64, quiet=True)
    with pytest.raises(JishiError, match=r"alone does not share the teacher llama's tokenizer \(.+\), so the two cannot be "
                                         r"compared token by token: pass the model it was distilled from as --teacher"):
        evaluate_models([str(tmp_path / "alone")], teacher, max_windows=1, decode_tokens=0, quiet=True)


def test_continuing_a_student_against_a_teacher_of_another_tokenizer_is_refused(other_tokenizers, tiny_dirs, tmp_path):
    import shutil

    from conftest import make_tiny

    from jishi.distill.student import RECORD, DistillOptions, distill

    tok, vocab = other_tokenizers["other ids"]
    student = make_tiny("llama", tmp_path / "student", tok, vocab_size=vocab)
    (student / RECORD).write_text(json.dumps({"teacher": {"layers": 2}, "plan": {"layers": [0, 1], "method": "even"}}))
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_dirs["llama"], teacher)
    with pytest.raises(BaseModelError, match=r"student does not share the teacher teacher's tokenizer \(.+ tokens have "
                                             r"other ids .+\): distillation matches them token by token, so pass the "
                                             r"teacher it was distilled from as --base"):
        distill(str(teacher), tmp_path / "again", DistillOptions(init=str(student)), quiet=True)


# -- the methods on tiny models ----------------------------------------------------------------------------------

def _batches(vocab: int, n: int = 4, length: int = 64):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (1, length), generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3"])
def test_every_calibrated_method_beats_round_to_nearest_on_a_tiny_models_layers(family, tiny_dirs):
    """Per layer and input, the output error of each method on the same weights (through the calibration
    inputs' Hessians), averaged: every calibrated method below round-to-nearest's."""
    from transformers import AutoModelForCausalLM

    from jishi.export.calibrate import calibrate
    from jishi.export.from_torch import model_config, numpy_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()
    cfg = model_config(model.config, 128)
    weights = numpy_weights(model, cfg)
    batches = _batches(cfg.vocab_size)
    err = {m: calibrate(model, cfg, weights, batches, m).record["output_error"] for m in ("rtn", "gptq", "awq", "awq-gptq")}
    assert err["gptq"] < 0.8 * err["rtn"] and err["awq-gptq"] < 0.8 * err["rtn"], err
    assert err["awq"] < err["rtn"], err
    ordered = calibrate(model, cfg, weights, batches, "gptq", act_order=True).record["output_error"]
    assert ordered < 0.8 * err["rtn"], (ordered, err)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_awq_scales_folded_into_the_norms_leave_the_float_model_unchanged_and_the_bundle_runs_its_codes(
        family, tiny_dirs, tmp_path):
    """In float, dividing the norms by the scales and multiplying the weights' inputs by them changes no logit
    (Gemma's (1 + w) norms included); the AWQ bundle (accuracy level 0) computes what torch computes with the
    folded norms and the dequantized scaled codes."""
    import copy

    import jishi
    from jishi.distill.base import load_base
    from jishi.distill.prune import calibration_batches
    from jishi.export.calibrate import calibrate
    from jishi.export.from_torch import model_config, numpy_weights
    from jishi.export.quant import quantize_symmetric_int8
    from jishi.pipeline import build

    base = load_base(str(tiny_dirs[family]))
    cfg = model_config(base.model.config, 128)
    weights = numpy_weights(base.model, cfg)
    cal = calibrate(base.model, cfg, weights, calibration_batches(base.runtime_tokenizer(), 2, 128), "awq",
                    exact_zero_points=False)
    assert set(cal.norms) == set(cal.scales) and len(cal.norms) == 2 * cfg.num_layers
    assert any(np.abs(s - 1).max() > 0.05 for s in cal.scales.values())  # some scaling was chosen
    ids = list(range(5, 69))

    def logits(model):
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0].numpy()

    folded, quantized = copy.deepcopy(base.model), copy.deepcopy(base.model)
    params = dict(folded.named_parameters())
    with torch.no_grad():
        for norm, s in cal.scales.items():
            params[norm].copy_(torch.from_numpy(cal.norms[norm]))
            layer = norm.rsplit(".", 2)[0]
            readers = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") if "input_layernorm" in norm \
                else ("mlp.gate_proj", "mlp.up_proj")
            for r in readers:
                params[f"{layer}.{r}.weight"].mul_(torch.from_numpy(s.astype(np.float32)))
        for name, p in quantized.named_parameters():
            if name in cal.codes:
                p.copy_(torch.from_numpy(cal.codes[name].dequantize()))
            elif name in cal.norms:
                p.copy_(torch.from_numpy(cal.norms[name]))
            elif name == "model.embed_tokens.weight":
                p.copy_(torch.from_numpy(quantize_symmetric_int8(p.numpy()).dequantize()))
    want = logits(base.model)
    np.testing.assert_allclose(logits(folded), want, atol=2e-5 * np.abs(want).max(), rtol=0)

    bundle = build(base, "int4", tmp_path / "awq", context=128, evaluate=False, quiet=True, method="awq",
                   merge_points=False, accuracy_level=0, calibration_sequences=2, zero_points="integer")
    m = jishi.load(bundle)
    q = m.manifest.graph.quantization
    assert q["method"] == "awq" and m.manifest.merge_points is None
    assert len(q["calibration"]["awq_alpha"]["attn_in"]) == cfg.num_layers
    np.testing.assert_allclose(m.engine.feed(ids, all_logits=True), logits(quantized), atol=2e-4, rtol=0)


# -- a model on no grid ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_a_rotated_residual_stream_computes_the_same_logits_on_weights_off_any_grid(family, tiny_dirs, tmp_path):
    """The stand-in for a checkpoint that arrives in fp16: the same function, every weight that touches the
    residual a dense mix of the old ones. Saved and loaded as a Hugging Face directory, it still agrees,
    and the logits of the turned model agree with the original's."""
    from transformers import AutoModelForCausalLM

    from jishi.distill.rotate import rotate_residual

    ref = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()
    ids = torch.randint(3, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
    before = ref.model.layers[0].self_attn.q_proj.weight.detach().numpy().copy()
    rotated = rotate_residual(AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval(), seed=3)
    after = rotated.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(after - before).max() > 0.01
    rotated.save_pretrained(tmp_path / "rotated")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "rotated", dtype=torch.float32).eval()
    with torch.no_grad():
        for m in (rotated, again):
            torch.testing.assert_close(m(ids).logits, expected, atol=2e-4, rtol=0)
    assert again.lm_head.weight.data_ptr() != again.model.embed_tokens.weight.data_ptr()


def test_rotation_refuses_a_family_that_normalizes_block_outputs(tiny_dirs):
    from transformers import AutoModelForCausalLM

    from jishi.distill.rotate import rotate_residual

    gemma = AutoModelForCausalLM.from_pretrained(tiny_dirs["gemma3"], dtype=torch.float32)
    with pytest.raises(JishiError, match="gemma3.* normalizes block outputs, whose gains cannot be folded"):
        rotate_residual(gemma)
