"""Shrinking a model: pruning, distillation, resume, processes, calibrated and QAT int4, the CLI."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jishi.errors import JishiError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    from conftest import make_tiny

    return make_tiny("llama", tmp_path_factory.mktemp("teacher") / "teacher6", tiny_tokenizer, layers=6, seed=3)


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    from jishi.distill.base import load_base

    return load_base(str(teacher_dir))


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    """Real text for training: calibration text (after the held-out part), never the held-out text."""
    from jishi.heldout import calibration_text

    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(calibration_text()[:30_000], encoding="utf-8")
    return path


def _seqs(teacher, calib_file, seq_len=32):
    from jishi.distill.data import chunk, read_documents

    docs = read_documents([calib_file], teacher.runtime_tokenizer())
    return chunk(docs, seq_len, teacher.eos_token_ids[0])


def _heldout(teacher, seq_len=64, n=3):
    from jishi.heldout import heldout_text, windows

    return windows(teacher.runtime_tokenizer().encode(heldout_text(), bos=False), seq_len)[:n]


# -- pruning -------------------------------------------------------------------------------------------------

def test_pruned_student_keeps_the_chosen_blocks_bit_exact(teacher):
    from jishi.distill.prune import StudentPlan, build_student

    plan = StudentPlan((1, 3, 4), "even", None)
    student = build_student(teacher.model, plan)
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    t = teacher.model.state_dict()
    s = student.state_dict()
    for key, value in s.items():
        if key.startswith("model.layers."):
            j, rest = key.split(".", 3)[2:]
            source = t[f"model.layers.{plan.layers[int(j)]}.{rest}"]
        else:
            source = t[key]
        assert value.dtype == source.dtype and torch.equal(value, source), key
    # the copies are the student's own: training it cannot change the teacher
    assert student.model.layers[0].mlp.up_proj.weight.data_ptr() != teacher.model.model.layers[1].mlp.up_proj.weight.data_ptr()


def test_student_keeping_every_block_reproduces_the_teacher(teacher):
    from jishi.distill.prune import StudentPlan, build_student

    student = build_student(teacher.model, StudentPlan(tuple(range(6)), "even", None))
    ids = torch.tensor([_heldout(teacher, 48, 1)[0]])
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, teacher.model(input_ids=ids).logits)


@pytest.mark.parametrize("method", ["influence", "skip-loss"])
def test_importance_drops_the_blocks_that_do_nothing(teacher, method):
    """Blocks whose attention and MLP outputs are zeroed pass their input through: both measures
    must rank them last, where evenly spaced selection would keep one of them."""
    import copy

    from jishi.distill.prune import calibration_batches, even_layers, plan_student

    model = copy.deepcopy(teacher.model)
    with torch.no_grad():
        for i in (0, 2, 3):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    batches = calibration_batches(teacher.runtime_tokenizer(), 2, 64)
    plan = plan_student(model, batches, layers=3, method=method)
    assert plan.layers == (1, 4, 5)
    assert all(abs(plan.importance[i]) < 1e-6 for i in (0, 2, 3))
    assert min(plan.importance[i] for i in (1, 4, 5)) > 1e-3
    assert even_layers(6, 3) == [0, 2, 5]


def test_width_pruning_keeps_the_most_active_mlp_channels(teacher):
    import copy

    from jishi.distill.prune import calibration_batches, plan_student, build_student

    model = copy.deepcopy(teacher.model)
    rng = np.random.default_rng(0)
    chosen = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            keep = np.sort(rng.choice(96, 32, replace=False))
            quiet = torch.tensor([c for c in range(96) if c not in keep])
            layer.mlp.up_proj.weight[quiet] *= 0.01  # these channels barely activate
            chosen[i] = tuple(int(c) for c in keep)
    batches = calibration_batches(teacher.runtime_tokenizer(), 2, 64)
    plan = plan_student(model, batches, layers=2, method="even", width_ratio=1 / 3)
    assert plan.intermediate_size == 32 and plan.layers == (0, 5)
    assert plan.channels == (chosen[0], chosen[5])
    student = build_student(model, plan)
    idx = torch.tensor(chosen[5])
    src, dst = model.model.layers[5].mlp, student.model.layers[1].mlp
    assert torch.equal(dst.gate_proj.weight, src.gate_proj.weight[idx])
    assert torch.equal(dst.up_proj.weight, src.up_proj.weight[idx])
    assert torch.equal(dst.down_proj.weight, src.down_proj.weight[:, idx])


def test_head_pruning_keeps_the_strongest_heads_of_each_group_and_exports(teacher, tmp_path):
    """Query heads are chosen per key/value group by their output's norm; the student is sliced
    consistently (q rows, o columns, head_dim), so a pruned head that contributed nothing changes
    nothing, and the exporter runs the narrower attention exactly as torch does."""
    import copy

    import jishi
    from jishi.distill.prune import StudentPlan, build_student, calibration_batches, pick_heads, plan_student
    from jishi.pipeline import build

    assert pick_heads([0.1, 0.9, 0.5, 0.7, 0.2, 0.3], 6, 2, 4) == (1, 2, 3, 5)
    model = copy.deepcopy(teacher.model)  # 4 query heads of 16, 2 key/value heads: groups {0, 1} and {2, 3}
    with torch.no_grad():
        for layer in model.model.layers:
            q = layer.self_attn.q_proj.weight.view(4, 16, 64)
            q[0] = 0  # uniform attention: the mean of the values, a short vector
            q[3] = 0
            q[1] *= 20  # sharp attention: single value vectors, long
            q[2] *= 20
    batches = calibration_batches(teacher.runtime_tokenizer(), 2, 64)
    plan = plan_student(model, batches, layers=6, method="even", head_ratio=0.5)
    assert plan.num_heads == 2 and plan.heads == ((1, 2),) * 6
    student = build_student(model, plan)
    assert student.config.num_attention_heads == 2 and student.config.head_dim == 16
    assert student.config.num_key_value_heads == 2
    src, dst = model.model.layers[3].self_attn, student.model.layers[3].self_attn
    assert torch.equal(dst.q_proj.weight, torch.cat([src.q_proj.weight[16:32], src.q_proj.weight[32:48]]))
    assert torch.equal(dst.o_proj.weight, torch.cat([src.o_proj.weight[:, 16:32], src.o_proj.weight[:, 32:48]], 1))
    assert torch.equal(dst.k_proj.weight, src.k_proj.weight) and torch.equal(dst.v_proj.weight, src.v_proj.weight)

    # heads 0 and 3 silenced at o_proj: dropping them must leave the logits as they are
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, :16] = 0
            layer.self_attn.o_proj.weight[:, 48:] = 0
    plan = StudentPlan(tuple(range(6)), "even", None, num_heads=2, heads=((1, 2),) * 6)
    student = build_student(model, plan)
    ids = torch.tensor([_heldout(teacher, 48, 1)[0]])
    with torch.no_grad():
        want, got = model(input_ids=ids).logits[0], student(input_ids=ids).logits[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    out = tmp_path / "student"
    from jishi.distill.student import save_student

    save_student(student, teacher, out, {"plan": plan.as_dict(), "training": None})
    bundle = jishi.load(build(str(out), "fp32", tmp_path / "fp32", context=128, evaluate=False, quiet=True))
    assert bundle.manifest.config.num_heads == 2 and bundle.manifest.config.head_dim == 16
    np.testing.assert_allclose(bundle.engine.feed(ids[0].tolist(), all_logits=True), got.numpy(), atol=1e-4, rtol=0)


def test_layer_counts_are_checked(teacher):
    from jishi.distill.prune import layers_to_keep

    assert layers_to_keep(30, keep_ratio=2 / 3) == 20
    with pytest.raises(JishiError, match="cannot keep 7 layers of a teacher with 6"):
        layers_to_keep(6, layers=7)
    with pytest.raises(JishiError, match="keep ratio must be in"):
        layers_to_keep(6, keep_ratio=1.5)


# -- data ----------------------------------------------------------------------------------------------------

def test_data_files_text_jsonl_and_the_heldout_check(teacher, tmp_path):
    from jishi.distill.data import read_documents
    from jishi.heldout import heldout_text

    tok = teacher.runtime_tokenizer()
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "Plants need water."}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}) + "\n")
    docs = read_documents([f], tok)
    assert [d.real for d in docs] == [True, True]
    assert tok.decode(docs[0].ids) == "Plants need water."
    assert tok.decode(docs[1].ids, skip_special=False) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{oops\n")
    with pytest.raises(JishiError, match="bad.jsonl, line 2: not JSON"):
        read_documents([bad], tok)
    leak = tmp_path / "leak.txt"
    leak.write_text("Some notes.\n" + heldout_text()[5000:6000])
    with pytest.raises(JishiError, match="contains the held-out evaluation text"):
        read_documents([leak], tok)


def test_the_calibration_text_holds_no_passage_of_the_heldout_text():
    """pydoc_data.topics repeats paragraphs: the calibration text leaves the shared lines out."""
    from jishi.heldout import HELDOUT_CHARS, _topics_text, calibration_text, heldout_text

    held, calib, after = heldout_text(), calibration_text(), _topics_text()[HELDOUT_CHARS:]
    passages = [held[i:i + 80] for i in range(0, len(held) - 80, 80)]
    assert sum(p in after for p in passages) > 50  # the raw text after the held-out part repeats much of it
    assert not [p for p in passages if p in calib]
    assert len(calib) > 0.95 * len(after)


# -- distillation --------------------------------------------------------------------------------------------

def _student(teacher, layers=(0, 5)):
    from jishi.distill.prune import StudentPlan, build_student

    return build_student(teacher.model, StudentPlan(tuple(layers), "even", None))


def test_a_few_distillation_steps_reduce_heldout_kl(teacher, calib_file, tmp_path):
    from jishi.distill.kd import KDConfig, train

    seqs, real = _seqs(teacher, calib_file, 64)
    student = _student(teacher)
    cfg = KDConfig(steps=16, batch_size=4, seq_len=64, learning_rate=3e-3, temperature=1.0, ce_weight=0.0,
                   eval_every=8, checkpoint_every=100)
    res = train(teacher.model, student, seqs, real, cfg, tmp_path / "work", layer_map=[0, 5],
                eval_windows=_heldout(teacher), quiet=True)
    kls = [e["kl"] for e in res.evals]
    assert [e["step"] for e in res.evals] == [0, 8, 16]
    assert kls[-1] < 0.8 * kls[0], kls
    assert res.tokens == 16 * 4 * 64 and len(res.history) == 16


def test_hidden_loss_and_topk_cache_train(teacher, calib_file, tmp_path):
    """The hidden-state loss alone (on four sequences, so every step sees the same batch) is lowered;
    the top-k cache (with bf16 autocast) is written once and trains."""
    from jishi.distill.kd import KDConfig, train

    seqs, real = _seqs(teacher, calib_file, 32)
    cfg = KDConfig(steps=12, batch_size=4, seq_len=32, learning_rate=3e-3, kl_weight=0.0, ce_weight=0.0,
                   hidden_weight=1.0, checkpoint_every=100)
    res = train(teacher.model, _student(teacher, (0, 3, 5)), seqs[:4], real[:4], cfg, tmp_path / "h",
                layer_map=[0, 3, 5], quiet=True)
    hidden = [h["hidden"] for h in res.history]
    assert hidden[0] > 0.1 and hidden[-1] < 0.5 * hidden[0], hidden
    cfg = KDConfig(steps=4, batch_size=4, seq_len=32, teacher_topk=16, checkpoint_every=100, bf16=True)
    res = train(teacher.model, _student(teacher), seqs, real, cfg, tmp_path / "k", quiet=True)
    ids = np.load(tmp_path / "k" / "teacher" / "topk_ids.npy")
    assert ids.shape == (len(seqs), 32, 16)
    assert all(np.isfinite(h["kl"]) and h["kl"] > 0 for h in res.history)


def test_topk_kl_is_a_lower_bound_equal_with_all_tokens():
    from jishi.distill.kd import kl_full, kl_topk

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 50, generator=g) * 2, torch.randn(5, 50, generator=g)
    full = kl_full(t, s, 2.0)
    lp = torch.log_softmax(t / 2.0, -1)
    v, i = lp.topk(50, -1)
    assert torch.allclose(kl_topk(i, v, s, 2.0), full, atol=1e-4)
    v, i = lp.topk(8, -1)
    assert 0 < float(kl_topk(i, v, s, 2.0)) < float(full)


def test_resume_after_an_interrupt_reaches_the_same_weights(teacher, calib_file, tmp_path):
    from jishi.distill.kd import CHECKPOINT, KDConfig, load_checkpoint, train

    seqs, real = _seqs(teacher, calib_file, 32)
    cfg = KDConfig(steps=6, batch_size=4, grad_accum=2, seq_len=32, learning_rate=2e-3, checkpoint_every=2,
                   eval_every=3)
    held = _heldout(teacher, 32, 2)
    whole = _student(teacher)
    ref = train(teacher.model, whole, seqs, real, cfg, tmp_path / "a", eval_windows=held, quiet=True)

    part = _student(teacher)
    stopped = train(teacher.model, part, seqs, real, cfg, tmp_path / "b", eval_windows=held, stop_after=3, quiet=True)
    assert stopped.steps == 3
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)["step"] == 2  # the interrupt lost one step, less than an interval
    assert not list((tmp_path / "b").glob(".*.tmp"))
    again = _student(teacher)  # a new process: fresh weights, everything else from the checkpoint
    res = train(teacher.model, again, seqs, real, cfg, tmp_path / "b", eval_windows=held, resume=True, quiet=True)
    assert res.steps == 6
    for (k, a), b in zip(whole.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["loss"] for h in res.history] == [h["loss"] for h in ref.history]
    assert res.evals == ref.evals

    other = KDConfig(**{**cfg.__dict__, "learning_rate": 1e-3})
    with pytest.raises(JishiError, match="made with other settings or data"):
        train(teacher.model, _student(teacher), seqs, real, other, tmp_path / "b", resume=True, quiet=True)


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(teacher_dir, calib_file, tmp_path):
    """torchrun with two gloo processes splits each step's sequences; the weights match one process."""
    from safetensors.torch import load_file

    common = ["distill", "--base", str(teacher_dir), "--layers", "2", "--select", "even", "--data", str(calib_file),
              "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--lr", "2e-3", "--eval-every", "100",
              "--checkpoint-every", "100", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "jishi.cli", *common, "-o", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous: other runs may share this machine
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                          "-m", "jishi.cli", *common, "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    moved = 0.0
    start = load_file(Path(teacher_dir) / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=0)
        if k in start:
            moved = max(moved, float((a[k] - start[k]).abs().max()))
    assert moved > 1e-3  # it trained: the comparison is not of untouched weights
    rec = json.loads((tmp_path / "two" / "jishi_distill.json").read_text())
    assert rec["training"]["processes"] == 2


# -- calibrated int4 and QAT ---------------------------------------------------------------------------------

def test_gptq_beats_round_to_nearest_on_a_layers_output():
    from jishi.export.gptq import gptq_quantize, output_error
    from jishi.export.quant import quantize_asymmetric
    from test_quant import run_matmul_nbits

    rng = np.random.default_rng(0)
    n, k = 64, 128
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    mix = np.eye(k) + 0.6 * rng.standard_normal((k, 8)) @ rng.standard_normal((8, k)) / np.sqrt(8)
    scale = np.where(rng.random(k) < 0.05, 8.0, 1.0)  # a few outlier input features, as in real activations

    def inputs(m):
        return ((rng.standard_normal((m, k)) @ mix) * scale).astype(np.float32)

    calib = inputs(2048)
    q = gptq_quantize(w, calib.T.astype(np.float64) @ calib / len(calib), bits=4, block=32)
    rtn = quantize_asymmetric(w, 4, 32, correct=True)
    fresh = inputs(1024)  # measured on inputs GPTQ did not see
    e_gptq, e_rtn = output_error(q.dequantize(), w, fresh), output_error(rtn.dequantize(), w, fresh)
    assert e_gptq < 0.75 * e_rtn, (e_gptq, e_rtn)
    # the codes run in MatMulNBits exactly as dequantize() says
    x = fresh[:4]
    np.testing.assert_allclose(run_matmul_nbits(q, x), x @ q.dequantize().T, atol=2e-5, rtol=0)


def test_calibrated_build_uses_the_gptq_codes(tiny_dirs, tmp_path):
    import jishi
    from jishi.distill.base import load_base
    from jishi.distill.prune import calibration_batches
    from jishi.export.gptq import gptq_model
    from jishi.pipeline import ZERO_POINTS, build

    base = load_base(str(tiny_dirs["llama"]))
    gptq_dir = build(base, "int4", tmp_path / "gptq", context=128, evaluate=False, quiet=True, calibrated=True,
                     accuracy_level=0, calibration_sequences=4)
    rtn_dir = build(base, "int4", tmp_path / "rtn", context=128, evaluate=False, quiet=True, accuracy_level=0,
                    method="rtn")
    m = jishi.load(gptq_dir)
    assert m.manifest.graph.quantization["method"] == "gptq"
    assert "calibration" in m.manifest.provenance

    codes = gptq_model(base.model, calibration_batches(base.runtime_tokenizer(), 4, 128),
                       exact_zero_points=ZERO_POINTS == "exact")  # the build's default grid
    import copy

    from jishi.export.quant import quantize_symmetric_int8

    ref = copy.deepcopy(base.model)  # what the graph should compute: GPTQ projections, the 8-bit embedding / LM head
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in codes:
                p.copy_(torch.from_numpy(codes[name].dequantize()))
            elif name == "model.embed_tokens.weight":
                p.copy_(torch.from_numpy(quantize_symmetric_int8(p.numpy()).dequantize()))
    ids = _heldout(base, 48, 1)[0]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = m.engine.feed(ids, all_logits=True)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    other = jishi.load(rtn_dir).engine.feed(ids, all_logits=True)
    assert np.abs(other - got).max() > 1e-3
    with pytest.raises(JishiError, match="--calibrated applies to int4 only"):
        build(base, "int8", tmp_path / "x", quiet=True, calibrated=True)


def test_int4_block_size_is_a_choice(tiny_dirs, tmp_path):
    import jishi
    from jishi.distill.base import load_base
    from jishi.pipeline import build

    base = load_base(str(tiny_dirs["llama"]))
    ids = _heldout(base, 48, 1)[0]
    ref = jishi.load(build(base, "fp32", tmp_path / "f", context=128, evaluate=False, quiet=True)).engine.feed(ids, all_logits=True)
    err = {}
    for block in (16, 32):
        m = jishi.load(build(base, "int4", tmp_path / f"b{block}", context=128, evaluate=False, quiet=True, block=block))
        assert m.manifest.graph.quantization["block"] == block
        err[block] = float(np.abs(m.engine.feed(ids, all_logits=True) - ref).mean())
    assert err[16] < err[32]  # smaller blocks, finer grid
    with pytest.raises(JishiError, match="MLP size 96 is not a multiple of the block size 64"):
        build(base, "int4", tmp_path / "b64", context=128, evaluate=False, quiet=True, block=64)


def test_qat_student_exports_exactly_onto_the_int4_grid(teacher_dir, calib_file, tmp_path):
    """After QAT the saved weights are grid values: the int4 bundle computes what the fp32 bundle of the
    same weights computes, and re-quantizing them changes nothing."""
    import jishi
    from jishi.distill.base import load_base
    from jishi.distill.kd import KDConfig, QAT_TARGETS
    from jishi.distill.student import DistillOptions, distill
    from jishi.export.quant import quantize_asymmetric
    from jishi.pipeline import build

    plain = distill(str(teacher_dir), tmp_path / "plain", DistillOptions(layers=2, method="even", data=(str(calib_file),)),
                    KDConfig(steps=2, batch_size=4, seq_len=32, learning_rate=3e-3, eval_windows=1), quiet=True)
    out = distill(str(teacher_dir), tmp_path / "qat", DistillOptions(init=str(plain), data=(str(calib_file),)),
                  KDConfig(steps=4, batch_size=4, seq_len=32, learning_rate=3e-3, qat_bits=4, eval_every=2,
                           checkpoint_every=2, eval_windows=2), quiet=True)
    student = load_base(str(out))
    teacher = load_base(str(teacher_dir))
    assert student.add_bos == teacher.add_bos and student.chat_template == teacher.chat_template
    assert student.eos_token_ids == teacher.eos_token_ids
    record = json.loads((out / "jishi_distill.json").read_text())
    assert record["qat"] == {"bits": 4, "block": 32, "on_grid": True}
    assert record["init"]["from"] == "plain" and record["plan"]["layers"] == [0, 5]
    moved = 0.0
    for name, p in student.model.named_parameters():
        if name.split(".")[-2] in QAT_TARGETS:
            w = p.detach().numpy()
            np.testing.assert_allclose(quantize_asymmetric(w, 4, 32).dequantize(), w, atol=1e-6, rtol=0)
            src = teacher.model.get_parameter(name.replace("layers.1.", "layers.5.")).detach().numpy()
            moved = max(moved, float(np.abs(w - src).max()))
    assert moved > 1e-3  # trained (and snapped) weights, not the teacher's
    from jishi.export.quant import quantize_symmetric_int8

    b4 = build(student, "int4", tmp_path / "q4", context=128, evaluate=False, quiet=True, accuracy_level=0)
    q = jishi.load(b4).manifest.graph.quantization  # the default for a QAT student: its own grid, rounded to
    assert q["method"] == "rtn" and q["method_reason"].startswith("a student trained on this int4 grid (QAT, block 32)")
    assert q["zero_point_correction"] is True  # its grid's float minima, not the integer default's
    ids = _heldout(teacher, 48, 1)[0]
    l4 = jishi.load(b4).engine.feed(ids, all_logits=True)
    # The int4 bundle's embedding / LM head are 8-bit blocks; its projections are the student's own weights.
    with torch.no_grad():
        emb = student.model.model.embed_tokens.weight
        emb.copy_(torch.from_numpy(quantize_symmetric_int8(emb.numpy()).dequantize()))
        want = student.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(l4, want, atol=2e-4, rtol=0)


def test_a_saved_student_keeps_the_teachers_end_token(teacher, tmp_path):
    """A GGUF-converted tokenizer may call another token EOS than the model's; the student's
    directory must say the one the teacher's bundle stops on, and no BOS if the teacher has none."""
    import copy
    from dataclasses import replace

    from jishi.distill.base import load_base
    from jishi.distill.student import save_student

    tok = copy.deepcopy(teacher.tokenizer)
    tok.eos_token = "<|im_start|>"
    confused = replace(teacher, tokenizer=tok)
    out = save_student(_student(teacher), confused, tmp_path / "s", None)
    student = load_base(str(out))
    assert student.eos_token_ids == teacher.eos_token_ids == [2]
    assert student.add_bos is False and student.chat_template == teacher.chat_template
    text = "Plants need water. <|im_end|>"
    assert student.runtime_tokenizer().encode(text) == teacher.runtime_tokenizer().encode(text)


def test_fake_quant_matches_the_exporters_grid():
    from jishi.distill.kd import fake_quant
    from jishi.export.quant import quantize_asymmetric

    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(1)) * 0.1
    fq = fake_quant(w, 4, 32).numpy()
    rtn = quantize_asymmetric(w.numpy(), 4, 32, correct=True).dequantize()
    np.testing.assert_allclose(fq, rtn, atol=1e-6, rtol=0)
    assert np.abs(fq - w.numpy()).max() > 1e-3


# -- the command line ----------------------------------------------------------------------------------------

def _cli(*args, timeout=600, cache=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if cache:
        env["JISHI_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "jishi.cli", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_cli_distill_build_eval(teacher_dir, tmp_path):
    """The default path: the teacher writes the data; the student builds into a bundle; eval compares."""
    student = tmp_path / "student"
    done = _cli("distill", "--base", str(teacher_dir), "--layers", "3", "--generate", "4", "--generate-tokens", "24",
                "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3", "--threads", "1",
                "-o", str(student), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(student)
    assert "Teacher writing distillation text" in done.stderr and "Distilling" in done.stderr
    cached = list((tmp_path / "cache" / "distill-data").glob("teacher-*.jsonl"))  # the next run reads it back
    assert len(cached) == 1 and len(cached[0].read_text().splitlines()) == 4
    assert {"model.safetensors", "config.json", "tokenizer.json", "jishi_distill.json"} <= {p.name for p in student.iterdir()}
    rec = json.loads((student / "jishi_distill.json").read_text())
    assert rec["data"]["generated"] == 4 and rec["plan"]["method"] == "influence" and len(rec["plan"]["layers"]) == 3

    bundle = tmp_path / "student-int4"
    done = _cli("build", "--base", str(student), "--context", "128", "--no-eval", "-o", str(bundle))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["config"]["num_layers"] == 3
    assert manifest["provenance"]["distilled"]["plan"]["layers"] == rec["plan"]["layers"]
    assert manifest["graph"]["quantization"]["method"] == "gptq"  # a student's weights are on no 4-bit grid
    assert "int4 by GPTQ: a distilled student's weights lie on no 4-bit grid" in done.stderr

    done = _cli("eval", str(bundle), "--compare", str(student), "--window", "64", "--max-windows", "2",
                "--decode-tokens", "8", "--threads", "1")  # the teacher is found from the student's record
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "perplexity" in lines[2] and "KL vs teacher" in lines[2]
    rows = [line.split() for line in lines[4:]]
    assert [r[0] for r in rows] == ["student-int4", "student"] and rows[0][2] == "int4-gptq" and rows[1][2] == "fp32"
    done = _cli("eval", str(teacher_dir), "--teacher", str(teacher_dir), "--window", "64", "--max-windows", "1",
                "--decode-tokens", "0", "--json")
    figures = json.loads(done.stdout)["models"][0]
    assert figures["kl"] < 1e-9 and figures["top1_agreement"] == 1.0  # the teacher against itself


def test_build_distill_is_one_stage_and_measures_the_student_against_its_teacher(teacher_dir, calib_file, tmp_path, capsys):
    """`build --distill`: prune, distil, GPTQ int4, and the manifest holds the comparison with the teacher."""
    from jishi.cli import main
    from jishi.distill.base import load_base
    from jishi.heldout import heldout_text, windows

    bundle = tmp_path / "small-int4"
    args = ["build", "--base", str(teacher_dir), "--distill", "--layers", "3", "--data", str(calib_file), "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--threads", "1", "--context", "128", "-o", str(bundle)]
    assert main(args) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(bundle) and "GPTQ on calibration text" in out.err
    student = tmp_path / "small-int4.student"
    rec = json.loads((student / "jishi_distill.json").read_text())
    assert rec["training"]["steps_done"] == 2 and len(rec["plan"]["layers"]) == 3
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["config"]["num_layers"] == 3 and m["graph"]["quantization"]["method"] == "gptq"
    assert m["provenance"]["distilled"]["plan"]["layers"] == rec["plan"]["layers"]
    ev, vt = m["evaluation"], m["evaluation"]["teacher"]
    # two code paths (the build's own evaluation, the teacher comparison) score the same bundle on the same windows
    assert vt["student_perplexity"] == pytest.approx(ev["perplexity"], rel=1e-3)
    teacher = load_base(str(teacher_dir)).model
    wins = windows(load_base(str(teacher_dir)).runtime_tokenizer().encode(heldout_text(), bos=False), 128)
    nll = 0.0
    with torch.no_grad():
        for w in wins:
            logp = torch.log_softmax(teacher(input_ids=torch.tensor([w])).logits[0].double(), -1)
            nll -= float(logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
    assert vt["perplexity"] == pytest.approx(float(np.exp(nll / sum(len(w) - 1 for w in wins))), rel=1e-6)
    assert vt["windows"] == len(wins) and 0 < vt["top1_agreement"] < 1 and vt["kl"] > 0
    assert main(["info", str(bundle)]) == 0
    info = capsys.readouterr().out
    assert re.search(r"\ndistilled +from teacher6: 3 of 6 blocks, 2 steps on 128 tokens\n", info)
    assert f"perplexity {vt['student_perplexity']:.2f} against its {vt['perplexity']:.2f}" in info

    # run again with --resume: the finished student is built again, not trained again
    assert main(args + ["--resume", "--quant", "int8", "-o", str(tmp_path / "small-int8"), "--student", str(student)]) == 0
    assert "is already distilled (2 steps): building it" in capsys.readouterr().err
    assert json.loads((tmp_path / "small-int8" / "manifest.json").read_text())["graph"]["quantization"]["name"] == "int8"

    code = main(["build", "--base", str(teacher_dir), "--layers", "3", "-o", str(tmp_path / "x")])
    assert code == 1 and "--layers is a distillation option: add --distill" in capsys.readouterr().err
    code = main(["build", "--base", str(teacher_dir), "--distill", "-o", str(tmp_path / "x")])
    assert code == 1 and "say how small the student is: --layers N or --keep-ratio R" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_errors_say_what_to_do(teacher_dir, tmp_path, capsys):
    from jishi.cli import main

    def err(*args):
        code = main(list(args))
        return code, capsys.readouterr().err

    code, msg = err("distill", "--base", str(teacher_dir), "-o", str(tmp_path / "s"))
    assert code == 1 and "say how small the student is: --layers N or --keep-ratio R" in msg
    with pytest.raises(SystemExit) as e:
        main(["distill", "--layers", "2", "--keep-ratio", "0.5", "-o", str(tmp_path / "s")])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    code, msg = err("distill", "--base", str(teacher_dir), "--init", str(teacher_dir), "--data", __file__,
                    "-o", str(tmp_path / "s"))
    assert code == 1 and "is not a student written by jishi distill" in msg
    code, msg = err("distill", "--base", str(teacher_dir), "--layers", "9", "--data", __file__, "-o", str(tmp_path / "s"))
    assert code == 1 and msg.startswith("jishi: error: cannot keep 9 layers of a teacher with 6")
    code, msg = err("distill", "--base", str(teacher_dir), "--layers", "2", "--data", str(tmp_path / "none.txt"),
                    "-o", str(tmp_path / "s"))
    assert code == 1 and "no data file" in msg
    code, msg = err("distill", "--base", str(teacher_dir), "--layers", "2", "--steps", "0", "-o", str(tmp_path / "s"))
    assert code == 1 and "--steps must be at least 1" in msg
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, msg = err("distill", "--base", str(teacher_dir), "--layers", "2", "--data", __file__, "-o", str(tmp_path / "busy"))
    assert code == 1 and "is not a student directory" in msg
    code, msg = err("build", "--base", str(teacher_dir), "--quant", "int8", "--calibrated")
    assert code == 1 and "--calibrated applies to int4 only" in msg
    code, msg = err("eval", str(teacher_dir))
    assert code == 1 and "pass --teacher BASE" in msg
    code, msg = err("eval", str(tmp_path / "missing" / "bundle"))
    assert code == 1 and "no bundle or model directory" in msg
    assert not (tmp_path / "s").exists()
