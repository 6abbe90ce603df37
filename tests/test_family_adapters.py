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
