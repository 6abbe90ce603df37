"""LoRA fine-tuning: the loss mask, that training learns, what is saved, and the base checks."""

from __future__ import annotations

import json
import re
import random
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jishi
from jishi.errors import AdapterError, JishiError


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "white", "black", "yellow"]
    out = []
    for _ in range(n):
        c = rng.choice(colours)
        out.append({"messages": [{"role": "user", "content": f"What colour is the {c} box?"},
                                 {"role": "assistant", "content": f"The box is {c}."}]})
    return out


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dirs):
    from jishi.distill.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("finetune")
    data = _write(root / "boxes.jsonl", _records(60))
    res = finetune(str(tiny_dirs["llama"]), data, root / "boxes",
                   config=FinetuneConfig(rank=4, alpha=8, epochs=6, learning_rate=3e-3, batch_size=8), quiet=True)
    return res, root


def test_loss_counts_only_the_assistant_turns(tiny_dirs):
    from jishi.distill.base import load_base
    from jishi.distill.finetune import encode_record

    base = load_base(str(tiny_dirs["llama"]))
    tok = base.runtime_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    ids, train = encode_record(tok, messages, 512)
    assert len(ids) == len(train)
    trained = tok.decode([i for i, t in zip(ids, train) if t], skip_special=False)
    assert trained == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"
    # The prompt part is exactly what the runtime feeds before the first answer.
    first = train.index(True)
    assert ids[:first] == tok.encode(tok.apply_chat_template(messages[:2], add_generation_prompt=True), bos=False)
    # Special-token text typed in a message is trained on as text, as the runtime serves it.
    typed = [{"role": "user", "content": "what is <|im_end|>?"}, {"role": "assistant", "content": "A marker."}]
    typed_ids, _ = encode_record(tok, typed, 512)
    end = tok.encode("<|im_end|>")[0]
    assert typed_ids.count(end) == 2  # the template's two, not the typed one
    assert typed_ids == tok.encode(tok.apply_chat_template(typed, add_generation_prompt=False), bos=False)
    # Cut at max_length, the mask is cut with it.
    short_ids, short_train = encode_record(tok, messages, 7)
    assert short_ids == ids[:7] and short_train == train[:7]


def test_finetune_learns_and_saves_a_peft_adapter(trained, tiny_dirs):
    from jishi.distill.base import load_base

    res, _ = trained
    assert res.heldout_records == 6 and res.train_records == 54
    assert res.heldout_loss_after < 0.5 * res.heldout_loss_before
    out = res.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "jishi_adapter.json"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["base_model_name_or_path"] == "llama"
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    info = json.loads((out / "jishi_adapter.json").read_text())
    assert info["base_sha256"] == load_base(str(tiny_dirs["llama"])).source_sha256
    assert info["heldout"]["loss_after"] == round(res.heldout_loss_after, 4)
    assert not list(out.parent.glob(".boxes.partial-*"))


def test_trained_adapter_runs_in_a_bundle_like_peft(trained, tiny_dirs, tmp_path):
    """The adapter the trainer saved, added to a bundle, gives peft's logits and its trained answer."""
    from transformers import AutoModelForCausalLM

    from jishi.export.adapters import add_adapter
    from jishi.pipeline import build

    res, _ = trained
    b = build(str(tiny_dirs["llama"]), "fp32", tmp_path / "b", context=256, evaluate=False, quiet=True, merge_points=True)
    add_adapter(b, "boxes", res.output)
    m = jishi.load(b)
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), res.output).eval()
    prompt = m.chat_prompt([{"role": "user", "content": "What colour is the green box?"}])
    ids = m.tokenizer.encode(prompt, bos=False)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].numpy()
    m.use_adapter("boxes")
    m.engine.reset()
    got = m.engine.feed(ids, all_logits=True)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # Greedy answers: token for token peft's, and in the trained shape (the base alone does not say it).
    answer = m.chat([{"role": "user", "content": "What colour is the green box?"}], temperature=0, max_new_tokens=12,
                    repetition_penalty=1.0, adapter="boxes")
    with torch.no_grad():
        ref = reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert m.tokenizer.encode(answer.text, bos=False) == [t for t in ref[0, len(ids):].tolist() if t != 2]
    assert answer.text.startswith("The box is")
    plain = m.chat([{"role": "user", "content": "What colour is the green box?"}], temperature=0, max_new_tokens=12)
    assert not plain.text.startswith("The box is")
    assert m.manifest.adapters[0]["base_sha256"] == json.loads((res.output / "jishi_adapter.json").read_text())["base_sha256"]


def test_adapters_for_another_base_are_refused(trained, tiny_bundles, tmp_path):
    from jishi.export.adapters import add_adapter

    res, _ = trained
    bundle = shutil.copytree(tiny_bundles["int4"], tmp_path / "b")
    # jishi's own record names the base by hash
    other = shutil.copytree(res.output, tmp_path / "other-hash")
    info = json.loads((other / "jishi_adapter.json").read_text())
    info["base_sha256"] = "ab" * 32
    (other / "jishi_adapter.json").write_text(json.dumps(info))
    with pytest.raises(AdapterError, match=r"trained on llama \(sha256 abababababab…\).*train it again"):
        add_adapter(bundle, "x", other)
    # a PEFT adapter made elsewhere names its base by model id
    foreign = shutil.copytree(res.output, tmp_path / "foreign")
    (foreign / "jishi_adapter.json").unlink()
    cfg = json.loads((foreign / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2-0.5B"
    (foreign / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"made for Qwen/Qwen2-0.5B, but this bundle is built from llama"):
        add_adapter(bundle, "x", foreign)
    # the same model under its hub id (organisation, case) is accepted
    cfg["base_model_name_or_path"] = "SomeOrg/Llama"
    (foreign / "adapter_config.json").write_text(json.dumps(cfg))
    add_adapter(bundle, "x", foreign)
    assert [a["name"] for a in jishi.load(bundle).manifest.adapters] == ["x"]


def test_bad_training_data_is_refused_with_the_line(tmp_path, tiny_dirs):
    from jishi.distill.finetune import finetune, read_records

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    with pytest.raises(JishiError, match=r"bad.jsonl, line 2: not JSON"):
        read_records(bad)
    bad.write_text('{"messages": [{"role": "user", "content": "only a question"}]}\n')
    with pytest.raises(JishiError, match=r"line 1: the record has no assistant message"):
        read_records(bad)
    bad.write_text('{"text": "plain"}\n')
    with pytest.raises(JishiError, match=r'line 1: a record needs "messages"'):
        read_records(bad)
    keep = tmp_path / "work"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(AdapterError, match="exists and is not an adapter directory"):
        finetune(str(tiny_dirs["llama"]), _write(tmp_path / "ok.jsonl", _records(12)), keep, quiet=True)
    assert (keep / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_dirs):
    """A random adapter, the tiny bundles with it active (fp32, int4) and with it merged in (fp32, int4)."""
    from test_adapters import make_peft

    from jishi.distill.base import load_base
    from jishi.export.adapters import add_adapter
    from jishi.pipeline import build

    root = tmp_path_factory.mktemp("merged")
    make_peft(tiny_dirs["llama"], root / "skill", 5)
    base = load_base(str(tiny_dirs["llama"]))
    out = {}
    for quant in ("fp32", "int4"):
        live = build(base, quant, root / f"live-{quant}", context=256, evaluate=False, quiet=True, merge_points=True)
        add_adapter(live, "skill", root / "skill")
        out[quant] = (live, build(base, quant, root / f"merged-{quant}", context=256, quiet=True,
                                  merge=("skill", root / "skill")))
    out["plain-int4"] = build(base, "int4", root / "plain-int4", context=256, evaluate=False, quiet=True)
    return out, root


def _logits(bundle, adapter=None, ids=tuple(range(5, 70))):
    m = jishi.load(bundle)
    m.use_adapter(adapter)
    m.engine.reset()
    return m.engine.feed(list(ids), all_logits=True).copy()


def test_merged_bundle_equals_the_adapter_at_run_time(merged):
    bundles, _ = merged
    live, folded = bundles["fp32"]
    assert jishi.load(folded).manifest.merge_points is None
    np.testing.assert_allclose(_logits(folded), _logits(live, "skill"), atol=2e-5, rtol=1e-5)
    # int4: the merged weights are quantized afresh (off the base's grid). Bound: merging costs no more
    # than quantizing itself does, measured against the exact fp32 logits with the adapter.
    exact = _logits(live, "skill")
    live4, folded4 = bundles["int4"]
    err_merged = np.abs(_logits(folded4) - exact).max()
    err_live = np.abs(_logits(live4, "skill") - exact).max()
    err_plain = np.abs(_logits(bundles["plain-int4"]) - _logits(bundles["fp32"][0])).max()
    assert err_merged < 2 * err_plain and err_live < 2 * err_plain, (err_merged, err_live, err_plain)


def test_merged_bundle_reports_int4_and_int8_and_recommends(merged):
    from jishi.cli import describe
    from jishi.runtime.bundle import open_bundle

    bundles, _ = merged
    b = open_bundle(bundles["int4"][1])
    ev = b.manifest.evaluation["merged"]
    assert set(ev) >= {"int4", "int8", "recommended", "reason", "reference_perplexity"}
    assert ev["int4"]["perplexity"] == b.manifest.evaluation["perplexity"]
    assert abs(ev["int8"]["loss"]) < abs(ev["int4"]["loss"])  # int8 is closer to the merged fp32 weights
    keeps = abs(ev["int4"]["loss"]) <= 0.03 and ev["int4"]["top1_agreement"] >= ev["int8"]["top1_agreement"] - 0.05
    assert ev["recommended"] == ("int4" if keeps else "int8")
    assert b.manifest.provenance["merged_adapter"]["name"] == "skill"
    text = describe(b)
    assert re.search(rf"recommended +{ev['recommended']}", text) and "adapter skill folded into the weights" in text


def test_merge_on_the_command_line_is_checked(tmp_path, tiny_dirs):
    from jishi.cli import main

    assert main(["build", "--base", str(tiny_dirs["llama"]), "--merge", "skill", "-o", str(tmp_path / "b")]) == 1
    assert main(["build", "--base", str(tiny_dirs["llama"]), "--adapter", f"a={tmp_path}", "--adapter", f"skill={tmp_path}",
                 "--merge", "skill", "-o", str(tmp_path / "b")]) == 1
    assert not (tmp_path / "b").exists()
