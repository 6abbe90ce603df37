"""The other rooms on the new families: LoRA fine-tuning through the merge points against PEFT,
Phi-3's fused projections mapped onto the seven merge points, merged adapters, pruning."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jishi

FAMILIES = ["qwen3", "gemma3", "phi3"]
RTOL = 1e-4  # of max|logit|, as for the fp32 graphs


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_tokenizer):
    from conftest import make_tiny

    root = tmp_path_factory.mktemp("families")
    return {f: make_tiny(f, root / f, tiny_tokenizer, layers=3) for f in FAMILIES}


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c = rng.choice(["red", "green", "blue", "white"])
        out.append({"messages": [{"role": "user", "content": f"What colour is the {c} box?"},
                                 {"role": "assistant", "content": f"The box is {c}."}]})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, family_dirs):
    """A short `jishi finetune` run per family, on all seven targets."""
    from jishi.distill.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("lora")
    data = root / "boxes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(24)))
    return {f: finetune(str(family_dirs[f]), data, root / f, config=FinetuneConfig(
        rank=4, alpha=8, epochs=2, learning_rate=3e-3, batch_size=8, heldout=0.0), quiet=True).output
        for f in FAMILIES}


def _peft_logits(base_dir, adapter_dir, ids):
    ref = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir).eval()
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_finetuned_adapter_through_the_merge_points_equals_peft(family, family_dirs, trained, tmp_path):
    from jishi.export.adapters import add_adapter
    from jishi.pipeline import build

    saved = json.loads((trained[family] / "adapter_config.json").read_text())["target_modules"]
    if family == "phi3":  # PEFT adapts the fused modules; the bundle has the same seven merge points
        assert sorted(saved) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    b = build(str(family_dirs[family]), "fp32", tmp_path / "b", context=128, evaluate=False, quiet=True,
              merge_points=True)
    add_adapter(b, "boxes", trained[family])
    m = jishi.load(b)
    assert sorted(m.manifest.adapters[0]["targets"]) == sorted(["q", "k", "v", "o", "gate", "up", "down"])
    ids = np.random.default_rng(4).integers(3, 384, size=30).tolist()
    want = _peft_logits(family_dirs[family], trained[family], ids)
    m.use_adapter("boxes")
    m.engine.reset()
    got = m.engine.feed(ids, all_logits=True)
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()
    # and the adapter changes the model: without it, the logits are the base's
    m.use_adapter(None)
    m.engine.reset()
    assert np.abs(m.engine.feed(ids, all_logits=True) - want).max() > 100 * RTOL * np.abs(want).max()


def test_phi3_adapter_merged_at_build_equals_peft(family_dirs, trained, tmp_path):
    """--merge folds a fused-projection LoRA into the right rows of qkv_proj / gate_up_proj."""
    from jishi.pipeline import build

    b = build(str(family_dirs["phi3"]), "fp32", tmp_path / "merged", context=128, quiet=True,
              merge=("boxes", trained["phi3"]), evaluate=False)
    ids = np.random.default_rng(5).integers(3, 384, size=30).tolist()
    want = _peft_logits(family_dirs["phi3"], trained["phi3"], ids)
    got = jishi.load(b).engine.feed(ids, all_logits=True)
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()


def test_a_fused_projection_must_be_adapted_whole(family_dirs, tmp_path):
    from jishi.distill.finetune import FinetuneConfig, finetune
    from jishi.errors import JishiError

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(4)))
    with pytest.raises(JishiError, match=r"--targets: this phi3 model stores q, k, v as one projection \(qkv_proj\): "
                                         "adapt all of them or none"):
        finetune(str(family_dirs["phi3"]), data, tmp_path / "out", config=FinetuneConfig(targets=("q", "v")), quiet=True)
    assert not (tmp_path / "out").exists()


def test_pruned_gemma3_keeps_each_layers_type_and_exports_like_its_torch_model(tiny_tokenizer, tmp_path):
    """Dropping blocks keeps each kept block's local/global type (and so its window and rope base)."""
    from conftest import make_tiny
    from jishi.distill.prune import StudentPlan, build_student
    from jishi.pipeline import build

    teacher_dir = make_tiny("gemma3", tmp_path / "teacher", tiny_tokenizer, layers=4)  # local, global, local, global
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    assert teacher.config.layer_types == ["sliding_attention", "full_attention"] * 2
    student = build_student(teacher, StudentPlan((0, 1, 3), "even", None))
    assert student.config.layer_types == ["sliding_attention", "full_attention", "full_attention"]
    student.save_pretrained(tmp_path / "student")
    transformers.AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp_path / "student")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32).eval()
    assert reloaded.config.layer_types == student.config.layer_types
    m = jishi.load(build(str(tmp_path / "student"), "fp32", tmp_path / "b", context=128, evaluate=False, quiet=True))
    assert m.manifest.config.features["layer_windows"] == [8, None, None]
    ids = np.random.default_rng(6).integers(3, 384, size=40).tolist()
    with torch.no_grad():
        want = reloaded(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(m.engine.feed(ids, all_logits=True) - want).max() <= RTOL * np.abs(want).max()


def test_phi3_width_pruning_slices_the_fused_projections(family_dirs, tmp_path):
    """MLP channels cut from gate_up_proj (its gate rows and its up rows), query heads cut from qkv_proj;
    the width-pruned student exports like its own PyTorch forward. A head-pruned Phi-3 with longrope
    would not load again in transformers (its factors are checked against hidden size / heads): refused."""
    from jishi.distill.prune import StudentPlan, build_student
    from jishi.errors import JishiError
    from jishi.pipeline import build

    teacher = transformers.AutoModelForCausalLM.from_pretrained(family_dirs["phi3"], dtype=torch.float32).eval()
    channels = tuple(tuple(range(i, 96, 3))[:32] for i in range(3))  # 32 of 96 channels per layer
    student = build_student(teacher, StudentPlan((0, 1, 2), "even", None, 32, channels))
    for j, layer in enumerate(student.model.layers):
        gate_up = teacher.model.layers[j].mlp.gate_up_proj.weight
        idx = torch.tensor(channels[j])
        assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([gate_up[idx], gate_up[idx + 96]]))
    student.save_pretrained(tmp_path / "student")
    transformers.AutoTokenizer.from_pretrained(family_dirs["phi3"]).save_pretrained(tmp_path / "student")
    m = jishi.load(build(str(tmp_path / "student"), "fp32", tmp_path / "b", context=128, evaluate=False, quiet=True))
    ids = np.random.default_rng(7).integers(3, 384, size=40).tolist()
    with torch.no_grad():
        want = student(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(m.engine.feed(ids, all_logits=True) - want).max() <= RTOL * np.abs(want).max()

    with pytest.raises(JishiError, match="would not load again .*short_factor.*cannot lose query heads"):
        build_student(teacher, StudentPlan((0, 1, 2), "even", None, None, None, 1, ((1,), (0,), (1,))))


def test_phi3_head_pruning_without_longrope_slices_qkv_proj(tiny_tokenizer, tmp_path):
    from conftest import make_tiny
    from jishi.distill.prune import StudentPlan, build_student

    base = make_tiny("phi3", tmp_path / "phi3", tiny_tokenizer, rope_scaling=None, layers=2)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    heads = ((1,), (0,))
    student = build_student(teacher, StudentPlan((0, 1), "even", None, None, None, 1, heads))
    hd = 32
    for j, layer in enumerate(student.model.layers):
        qkv = teacher.model.layers[j].self_attn.qkv_proj.weight
        q = qkv[heads[j][0] * hd:(heads[j][0] + 1) * hd]
        assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat([q, qkv[2 * hd:]]))
    from jishi.pipeline import build

    student.save_pretrained(tmp_path / "student")
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "student")
    m = jishi.load(build(str(tmp_path / "student"), "fp32", tmp_path / "b", context=128, evaluate=False, quiet=True))
    assert (m.manifest.config.num_heads, m.manifest.config.head_dim) == (1, 32)
    ids = np.random.default_rng(8).integers(3, 384, size=40).tolist()
    with torch.no_grad():
        want = student(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(m.engine.feed(ids, all_logits=True) - want).max() <= RTOL * np.abs(want).max()
