"""F32, F16 and BF16 tensors: kept as they are (BF16 widened to float32, which is exact)."""

from __future__ import annotations

import numpy as np

from jishi.export.gguf_formats.common import GGUFFormat, rows


def _f32(raw: np.ndarray) -> np.ndarray:
    return rows(np.ascontiguousarray(raw).view("<f4")).astype(np.float32)


def _f16(raw: np.ndarray) -> np.ndarray:
    return rows(np.ascontiguousarray(raw).view("<f2")).astype(np.float16)


def _bf16(raw: np.ndarray) -> np.ndarray:
    half = rows(np.ascontiguousarray(raw).view("<u2")).astype(np.uint32)
    return (half << 16).view(np.float32)


FORMATS = (
    GGUFFormat("F32", 1, 4, "fp32", _f32),
    GGUFFormat("F16", 1, 2, "fp16", _f16),
    GGUFFormat("BF16", 1, 2, "fp32 (from bf16)", _bf16),
)
