"""The 256-value super-block types: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Each super-block holds sub-blocks of 32 (Q4_K, Q5_K) or 16 (Q2_K, Q3_K, Q6_K) values with
small integer scales (and minimums) times the super-block's fp16 ``d`` (and ``dmin``). A
sub-block's float scale ``d·sc`` is exact in float32 (an 11-bit mantissa times at most
8 bits), so each sub-block becomes one MatMulNBits block with that scale.

Byte layouts (per super-block):

- Q2_K ``scales[16], qs[64], d, dmin``: sub-block s (16 values) has scale d·(scales[s] & 15)
  and minimum −dmin·(scales[s] >> 4); value 128h + 32j + l is bits 2j..2j+1 of qs[32h + l].
- Q3_K ``hmask[32], qs[64], scales[12], d``: two low bits as Q2_K, the third bit of value
  128h + 32j + l is bit 4h + j of hmask[l] (clear means −4); 16 signed 6-bit scales (−32).
- Q4_K ``d, dmin, scales[12], qs[128]``: eight 6-bit scales and minimums packed in 12 bytes;
  sub-block 2g is the low nibbles of qs[32g:32g+32], 2g+1 their high nibbles.
- Q5_K ``d, dmin, scales[12], qh[32], qs[128]``: Q4_K plus a fifth bit, bit s of qh[l] for
  value l of sub-block s.
- Q6_K ``ql[128], qh[64], scales[16] (int8), d``: per half h, value 32i + l (i = 0..3) has
  its low four bits in ql[64h + l + 32·(i & 1)] (low nibble for i < 2) and its top two in
  bits 2i..2i+1 of qh[32h + l]; w = d·scales[s]·(q − 32).
"""

from __future__ import annotations

import numpy as np

from jishi.export.gguf_formats.common import GGUFFormat, bits_of, f16, rows
from jishi.export.quant import from_codes, from_grid


# Codes around a fixed offset are moved to MatMulNBits' default zero point, 2^(bits−1), so none is stored.
SHIFT_3 = np.uint8(8 - 4)  # Q3_K: 0..7 around 4 → 4..11 around 8
SHIFT_6 = np.uint8(128 - 32)  # Q6_K: 0..63 around 32 → 96..159 around 128


def _two_bit_codes(qs: np.ndarray) -> np.ndarray:
    """qs (n, b, 64) → codes (n, b, 256) in value order, the layout Q2_K and Q3_K share."""
    halves = qs.reshape(*qs.shape[:-1], 2, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    return ((halves[..., None, :] >> shifts) & 3).reshape(*qs.shape[:-1], 256)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and minimums of a Q4_K / Q5_K super-block from its 12 bytes."""
    sc = np.empty((*s.shape[:-1], 8), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


_Q3_LOW = np.arange(16) % 8
_Q3_NIBBLE = 4 * (np.arange(16) // 8)
_Q3_HIGH = 8 + np.arange(16) % 4
_Q3_SHIFT = 2 * (np.arange(16) // 4)


def _q3_scales(s: np.ndarray) -> np.ndarray:
    """The sixteen signed 6-bit scales of a Q3_K super-block from its 12 bytes."""
    low = (s[..., _Q3_LOW] >> _Q3_NIBBLE.astype(np.uint8)) & 0x0F
    high = (s[..., _Q3_HIGH] >> _Q3_SHIFT.astype(np.uint8)) & 3
    return (low | (high << 4)).astype(np.int16) - 32


def _q2_k(raw):
    sc = raw[..., 0:16]
    d, dmin = f16(raw, 80)[..., None], f16(raw, 82)[..., None]
    codes = _two_bit_codes(raw[..., 16:80])
    return from_grid(rows(codes), rows(d * (sc & 0x0F)), rows(-(dmin * (sc >> 4))), 4, 16)


def _q3_k(raw):
    high = bits_of(raw[..., 0:32], 8).reshape(*raw.shape[:-1], 256)
    codes = _two_bit_codes(raw[..., 32:96]) | (high << 2)
    scale = f16(raw, 108)[..., None] * _q3_scales(raw[..., 96:108])
    return from_codes(rows(codes) + SHIFT_3, rows(scale), 8, 4, 16)


def _q4_low(qs: np.ndarray) -> np.ndarray:
    groups = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return np.concatenate([groups & 0x0F, groups >> 4], axis=-2).reshape(*qs.shape[:-1], 256)


def _q4_k(raw):
    sc, mn = _scale_min_k4(raw[..., 4:16])
    d, dmin = f16(raw, 0)[..., None], f16(raw, 2)[..., None]
    return from_grid(rows(_q4_low(raw[..., 16:144])), rows(d * sc), rows(-(dmin * mn)), 4, 32)


def _q5_k(raw):
    sc, mn = _scale_min_k4(raw[..., 4:16])
    d, dmin = f16(raw, 0)[..., None], f16(raw, 2)[..., None]
    fifth = bits_of(raw[..., 16:48], 8).reshape(*raw.shape[:-1], 256)
    codes = _q4_low(raw[..., 48:176]) | (fifth << 4)
    return from_grid(rows(codes), rows(d * sc), rows(-(dmin * mn)), 8, 32)


def _q6_k(raw):
    lead = raw.shape[:-1]
    ql = raw[..., 0:128].reshape(*lead, 2, 2, 32)  # half, which 32 bytes, byte
    qh = raw[..., 128:192].reshape(*lead, 2, 32)
    low = np.stack([ql[..., 0, :] & 0x0F, ql[..., 1, :] & 0x0F, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], axis=-2)
    top = (qh[..., None, :] >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    codes = (low | (top << 4)).reshape(*lead, 256)
    scales = np.ascontiguousarray(raw[..., 192:208]).view(np.int8).astype(np.float32)
    return from_codes(rows(codes) + SHIFT_6, rows(f16(raw, 208)[..., None] * scales), 128, 8, 16)


FORMATS = (
    GGUFFormat("Q2_K", 256, 84, "int4 block 16 (2-bit codes), float minimum", _q2_k),
    GGUFFormat("Q3_K", 256, 110, "int4 block 16 (3-bit codes + 4), zero point 8", _q3_k),
    GGUFFormat("Q4_K", 256, 144, "int4 block 32, float minimum", _q4_k),
    GGUFFormat("Q5_K", 256, 176, "int8 block 32 (5-bit codes), float minimum", _q5_k),
    GGUFFormat("Q6_K", 256, 210, "int8 block 16 (6-bit codes + 96), zero point 128", _q6_k),
)
