"""The 32-value block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Byte layouts (per block): Q4_0 ``d, qs[16]`` with w = d·(q − 8); Q4_1 ``d, m, qs[16]`` with
w = d·q + m; Q5_0 ``d, qh[4], qs[16]`` with w = d·(q − 16), the fifth bit of value i being
bit i of the little-endian 32-bit ``qh``; Q5_1 ``d, m, qh[4], qs[16]`` with w = d·q + m;
Q8_0 ``d, qs[32]`` (int8) with w = d·q. ``d`` and ``m`` are fp16; in ``qs`` the low nibbles
are values 0..15 and the high nibbles values 16..31.
"""

from __future__ import annotations

import numpy as np

from jishi.export.gguf_formats.common import GGUFFormat, f16, nibbles, rows
from jishi.export.quant import from_codes, from_grid


SHIFT_5 = np.uint8(128 - 16)  # Q5_0's codes 0..31 around 16, stored as 112..143 around 128 (MatMulNBits' default)


def _fifth_bits(raw: np.ndarray, offset: int) -> np.ndarray:
    qh = np.ascontiguousarray(raw[..., offset:offset + 4]).view("<u4")
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q4_0(raw):
    return from_codes(rows(nibbles(raw[..., 2:18])), f16(raw, 0), 8, 4, 32)


def _q4_1(raw):
    return from_grid(rows(nibbles(raw[..., 4:20])), f16(raw, 0), f16(raw, 2), 4, 32)


def _q5_0(raw):
    codes = nibbles(raw[..., 6:22]) | (_fifth_bits(raw, 2) << 4)
    return from_codes(rows(codes) + SHIFT_5, f16(raw, 0), 128, 8, 32)


def _q5_1(raw):
    codes = nibbles(raw[..., 8:24]) | (_fifth_bits(raw, 4) << 4)
    return from_grid(rows(codes), f16(raw, 0), f16(raw, 2), 8, 32)


def _q8_0(raw):
    codes = raw[..., 2:34] ^ np.uint8(0x80)  # int8 q → q + 128 as uint8
    return from_codes(rows(codes), f16(raw, 0), 128, 8, 32)


FORMATS = (
    GGUFFormat("Q4_0", 32, 18, "int4 block 32, zero point 8", _q4_0),
    GGUFFormat("Q4_1", 32, 20, "int4 block 32, float minimum", _q4_1),
    GGUFFormat("Q5_0", 32, 22, "int8 block 32 (5-bit codes + 112), zero point 128", _q5_0),
    GGUFFormat("Q5_1", 32, 24, "int8 block 32 (5-bit codes), float minimum", _q5_1),
    GGUFFormat("Q8_0", 32, 34, "int8 block 32, zero point 128", _q8_0),
)
