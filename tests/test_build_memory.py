"""The memory a build needs, checked before anything is loaded."""

from __future__ import annotations

from dataclasses import replace

import pytest

from jishi.devices.plan import ModelShape, build_memory
from jishi.errors import DeviceFitError

GiB = 2**30
# Shapes of bases people bring (their configs): 1-4B, tied embeddings.
LLAMA_3_2_1B = ModelShape("llama-3.2-1b", 16, 2048, 8192, 32, 8, 64, 128256, True)
LLAMA_3_2_3B = ModelShape("llama-3.2-3b", 28, 3072, 8192, 24, 8, 128, 128256, True)
QWEN3_4B = ModelShape("qwen3-4b", 36, 2560, 9728, 32, 8, 128, 151936, True)


@pytest.mark.parametrize("shape", [LLAMA_3_2_1B, LLAMA_3_2_3B, QWEN3_4B], ids=lambda s: s.name)
def test_a_1_to_4b_gguf_builds_within_24_gib(shape):
    """Read one tensor at a time, and measured before onnxruntime opens the bundle, a 4B GGUF stays under
    24 GiB; through transformers' own loading (twice the float32 weights) it would not."""
    need = build_memory(shape, "gguf")
    params = shape.linear_params + shape.embedding_params
    assert 4 * params < need < 24 * GiB
    if shape is QWEN3_4B:
        assert build_memory(shape, "gguf", gguf=False) > 24 * GiB


def test_the_estimate_covers_what_the_default_base_was_measured_to_take():
    """Measured here: `jishi build` of SmolLM2-135M (--quant gguf, evaluation included) peaked at 1.54 GB of
    RSS; the estimate must cover it without asking for much more."""
    smol = ModelShape("smollm2", 30, 576, 1536, 9, 3, 64, 49152, True)
    assert 1.54e9 <= build_memory(smol, "gguf") <= 2.5e9


def test_a_build_that_does_not_fit_is_refused_before_loading(tiny_dirs, monkeypatch):
    import jishi.devices.detect as detect_mod
    from jishi.pipeline import build, check_build_memory

    real = detect_mod.detect()
    need = check_build_memory(str(tiny_dirs["llama"]), "int4")
    monkeypatch.setattr(detect_mod, "detect", lambda *a, **k: replace(real, available_bytes=need // 2))
    with pytest.raises(DeviceFitError, match=r"building llama needs about .* GiB of memory .* available now: close "
                                             r"other programs.*--no-memory-check"):
        build(str(tiny_dirs["llama"]), "int4", "/nonexistent/never-written", quiet=True)
    monkeypatch.setattr(detect_mod, "detect", lambda *a, **k: replace(real, available_bytes=need + 1))
    assert check_build_memory(str(tiny_dirs["llama"]), "int4") == need
