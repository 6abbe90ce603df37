"""Each GGUF tensor type in its most exact onnxruntime MatMulNBits form: one entry per type.

A GGUF weight is a row-major (n × k) matrix cut along k into blocks of raw bytes; each
entry reads those bytes (codes, scales and minimums exactly as the file stores them) and
returns them as a :class:`~jishi.export.quant.QuantizedWeight`:

- 2-, 3- and 4-bit types become 4-bit MatMulNBits blocks of 32 or 16, the codes unchanged;
- 5-, 6- and 8-bit types and the non-linear 4-bit codebooks become 8-bit blocks holding
  their integer codes (or codebook values) unchanged;
- a type whose offset is a fixed code (Q4_0: 8, Q6_K: 32, Q8_0: 0) gets that code as an
  integer zero point, exact with no correction; a type with a float minimum per block
  (Q4_1, Q4_K, Q2_K, Q5_1, Q5_K) gets the rounded zero point plus the exact correction
  of ``quant.from_grid``;
- F32, F16 and BF16 stay floats (a numpy array, float16 for F16, float32 otherwise).

The entries read numpy arrays only; the file itself is read in ``jishi.distill.gguf_tensors``.
A type not listed here has no exact form: the build re-quantizes it and measures the cost.
"""

from __future__ import annotations

import numpy as np

from jishi.export.gguf_formats import floats, iq4, k_quants, legacy
from jishi.export.gguf_formats.common import GGUFFormat
from jishi.export.quant import QuantizedWeight

FORMATS: dict[str, GGUFFormat] = {f.name: f for m in (floats, legacy, k_quants, iq4) for f in m.FORMATS}


def exact_form(type_name: str) -> GGUFFormat | None:
    """The registry entry for a GGUF type name (``"Q4_K"``), or None when it has no exact form."""
    return FORMATS.get(type_name)


def to_weight(type_name: str, raw: np.ndarray, n: int, k: int) -> QuantizedWeight | np.ndarray:
    """The weight (n × k) whose GGUF bytes are ``raw`` (n rows of k/values-per-block blocks)."""
    fmt = FORMATS.get(type_name)
    if fmt is None:
        raise KeyError(type_name)
    if k % fmt.block_values:
        raise ValueError(f"a {type_name} row of {k} values is not a whole number of {fmt.block_values}-value blocks")
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // fmt.block_values, fmt.block_bytes)
    return fmt.decode(raw)
