"""The non-linear 4-bit types IQ4_NL and IQ4_XS: a 4-bit index into a fixed table of 16
int8 values. As 8-bit blocks the codes are the table values themselves (+128, zero point
128), so the weights stay exactly d·table[index].

Layouts: IQ4_NL ``d, qs[16]`` (32 values, low nibbles first); IQ4_XS per 256 values
``d, scales_h (u16), scales_l[4], qs[128]``: sub-block i (32 values) has the 6-bit scale
(nibble i of scales_l) | (bits 2i..2i+1 of scales_h) << 4, minus 32, times d.
"""

from __future__ import annotations

import numpy as np

from jishi.export.gguf_formats.common import GGUFFormat, f16, nibbles, rows
from jishi.export.quant import from_codes

TABLE = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int16)


def _codes(index: np.ndarray) -> np.ndarray:
    return (TABLE[index] + 128).astype(np.uint8)


def _iq4_nl(raw):
    return from_codes(rows(_codes(nibbles(raw[..., 2:18]))), f16(raw, 0), 128, 8, 32)


def _iq4_xs(raw):
    lead = raw.shape[:-1]
    high = np.ascontiguousarray(raw[..., 2:4]).view("<u2")  # (…, 1)
    low = np.stack([raw[..., 4:8] & 0x0F, raw[..., 4:8] >> 4], axis=-1).reshape(*lead, 8)
    top = (high >> (2 * np.arange(8, dtype=np.uint16))) & 3
    scale = f16(raw, 0)[..., None] * ((low.astype(np.int16) | (top.astype(np.int16) << 4)) - 32)
    index = nibbles(raw[..., 8:136].reshape(*lead, 8, 16)).reshape(*lead, 256)
    return from_codes(rows(_codes(index)), rows(scale), 128, 8, 32)


FORMATS = (
    GGUFFormat("IQ4_NL", 32, 18, "int8 block 32 (4-bit codebook values), zero point 128", _iq4_nl),
    GGUFFormat("IQ4_XS", 256, 136, "int8 block 32 (4-bit codebook values), zero point 128", _iq4_xs),
)
