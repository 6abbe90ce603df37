"""Weight-only quantization into onnxruntime's MatMulNBits layout.

A linear layer's weight ``W`` (out × in, as torch stores it) is cut into blocks
of ``block`` values along the input dimension. Each block gets a scale ``d``
and a minimum ``m`` and its values become integer codes ``q`` so that
``w ≈ d·q + m``.

MatMulNBits wants an *integer* zero point ``z`` with ``w = d·(q − z)``, which
holds ``m = −d·z`` only when ``−m/d`` happens to be an integer. Rounding it
shifts every weight of the block by the same amount ``δ = d·(round(−m/d) + m/d)``.
That shift is a per-block constant, so its effect on ``y = x·Wᵀ`` is
``(block sums of x) · Δ`` with ``Δ`` of shape (in/block × out): a matrix 32
times smaller than ``W``. The exporter adds it back (see ``graph.py``), which
keeps a 4-bit base such as a Q4_1 GGUF exactly on its own grid while running
the fast uint4-zero-point kernels.

Codes are found by rounding against the block's own min and max. For weights
that came from a Q4_1 grid this recovers the grid exactly (every Q4_1 block
holds its minimum at code 0 and its maximum at code 15); for other weights it
is round-to-nearest with a float minimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight in MatMulNBits form: ``W[n, k] = scales[n, b]·(q[n, k] − zp[n, b]) + Δ[b, n]``."""

    bits: int
    block: int
    n: int  # output features
    k: int  # input features
    packed: np.ndarray  # uint8 (n, k/block, block·bits/8)
    scales: np.ndarray  # float32 (n, k/block)
    zero_points: np.ndarray  # uint8, packed as MatMulNBits wants
    correction: np.ndarray | None  # float32 (k/block, n), or None when exact without it

    def default_zero_points(self) -> bool:
        """Whether every zero point is MatMulNBits' default, 2^(bits−1): the input can then be left out."""
        nb = self.k // self.block
        return bool((unpack_zero_points(self.zero_points, self.bits, self.n, nb) == 1 << (self.bits - 1)).all())

    def dequantize(self) -> np.ndarray:
        """The weight this stands for, (n, k) float32, correction included."""
        q = unpack(self.packed, self.bits, self.n, self.k)
        nb = self.k // self.block
        zp = unpack_zero_points(self.zero_points, self.bits, self.n, nb).astype(np.float32)
        w = (q.reshape(self.n, nb, self.block).astype(np.float32) - zp[:, :, None]) * self.scales[:, :, None]
        if self.correction is not None:
            w = w + self.correction.T[:, :, None]
        return w.reshape(self.n, self.k)


def quantize_asymmetric(w: np.ndarray, bits: int = 4, block: int = 32, correct: bool = True) -> QuantizedWeight:
    """Quantize ``w`` (n × k) to ``bits`` with a per-block scale and minimum.

    With ``correct`` the rounding of the zero point is undone by a correction
    matrix, so the result is exactly ``d·q + m`` per block; without it the
    zero point is rounded (the usual integer-zero-point RTN).
    """
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    if k % block:
        raise ValueError(f"input size {k} is not a multiple of the block size {block}")
    qmax = (1 << bits) - 1
    nb = k // block
    wb = w.reshape(n, nb, block)
    lo = wb.min(axis=2)
    hi = wb.max(axis=2)
    if not correct:
        # Integer zero points can only express a grid that contains 0.
        lo = np.minimum(lo, 0.0)
        hi = np.maximum(hi, 0.0)
    scale = (hi - lo) / qmax
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zp_float = -lo / safe
    zp = np.clip(np.rint(zp_float), 0, qmax)
    if correct:
        q = np.clip(np.rint((wb - lo[:, :, None]) / safe[:, :, None]), 0, qmax)
        # w = d·q + lo = d·(q − zp) + d·(zp − zp_float)
        correction = (scale * (zp - zp_float)).astype(np.float32)
        correction = np.where(scale > 0, correction, lo).T.copy()
    else:
        q = np.clip(np.rint(wb / safe[:, :, None] + zp[:, :, None]), 0, qmax)
        correction = None
    q = q.astype(np.uint8).reshape(n, k)
    return QuantizedWeight(
        bits=bits,
        block=block,
        n=n,
        k=k,
        packed=pack(q, bits, block),
        scales=scale.astype(np.float32),
        zero_points=pack_zero_points(zp.astype(np.uint8), bits),
        correction=correction,
    )


def quantize_symmetric_int8(w: np.ndarray, block: int = 32) -> QuantizedWeight:
    """8-bit symmetric blocks (``w = d·q``, q in −127..127), as GGUF's Q8_0 stores them.

    For weights that came from Q8_0 this recovers the grid exactly.
    """
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    if k % block:
        raise ValueError(f"input size {k} is not a multiple of the block size {block}")
    nb = k // block
    wb = w.reshape(n, nb, block)
    scale = np.abs(wb).max(axis=2) / 127.0
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(wb / safe[:, :, None]), -127, 127) + 128
    zp = np.full((n, nb), 128, dtype=np.uint8)
    return QuantizedWeight(
        bits=8,
        block=block,
        n=n,
        k=k,
        packed=pack(q.astype(np.uint8).reshape(n, k), 8, block),
        scales=scale.astype(np.float32),
        zero_points=pack_zero_points(zp, 8),
        correction=None,
    )


def pack(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Codes (n × k, uint8) into MatMulNBits' B layout (n, k/block, block·bits/8)."""
    n, k = q.shape
    if bits == 8:
        return q.reshape(n, k // block, block).copy()
    if bits == 4:
        pairs = q.reshape(n, k // 2, 2)
        packed = (pairs[:, :, 0] & 0x0F) | ((pairs[:, :, 1] & 0x0F) << 4)
        return packed.astype(np.uint8).reshape(n, k // block, block // 2)
    raise ValueError(f"unsupported bit width {bits}")


def unpack(packed: np.ndarray, bits: int, n: int, k: int) -> np.ndarray:
    flat = packed.reshape(n, -1)
    if bits == 8:
        return flat[:, :k].copy()
    lo = flat & 0x0F
    hi = flat >> 4
    return np.stack([lo, hi], axis=2).reshape(n, -1)[:, :k]


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """Zero points (n × blocks) into MatMulNBits' layout: 4-bit ones two to a byte, per row."""
    n, nb = zp.shape
    if bits == 8:
        return zp.reshape(-1).copy()
    if nb % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), dtype=np.uint8)], axis=1)
    pairs = zp.reshape(n, -1, 2)
    return ((pairs[:, :, 0] & 0x0F) | ((pairs[:, :, 1] & 0x0F) << 4)).astype(np.uint8).reshape(-1)


def unpack_zero_points(packed: np.ndarray, bits: int, n: int, nb: int) -> np.ndarray:
    if bits == 8:
        return packed.reshape(n, nb)
    per_row = packed.reshape(n, -1)
    return np.stack([per_row & 0x0F, per_row >> 4], axis=2).reshape(n, -1)[:, :nb]


def concat_outputs(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack several weights that share an input (q, k, v; gate, up) into one."""
    first = parts[0]
    if any(p.k != first.k or p.bits != first.bits or p.block != first.block for p in parts):
        raise ValueError("weights to fuse must share input size, bit width and block size")
    nb = first.k // first.block
    zps = np.concatenate([unpack_zero_points(p.zero_points, p.bits, p.n, nb) for p in parts], axis=0)
    corrections = [p.correction for p in parts]
    if all(c is None for c in corrections):
        correction = None
    else:
        correction = np.concatenate(
            [c if c is not None else np.zeros((nb, p.n), np.float32) for c, p in zip(corrections, parts)], axis=1
        )
    return QuantizedWeight(
        bits=first.bits,
        block=first.block,
        n=sum(p.n for p in parts),
        k=first.k,
        packed=np.concatenate([p.packed for p in parts], axis=0),
        scales=np.concatenate([p.scales for p in parts], axis=0),
        zero_points=pack_zero_points(zps, first.bits),
        correction=correction,
    )


def from_grid(codes: np.ndarray, scale: np.ndarray, lo: np.ndarray, bits: int, block: int) -> QuantizedWeight:
    """MatMulNBits form of weights already on an asymmetric block grid ``w = scale·q + lo``: codes
    (n × k, 0..2^bits−1), scale and minimum (n × k/block), from a calibrated method or from QAT.
    The zero point is rounded and the exact correction keeps ``lo`` (as ``quantize_asymmetric``)."""
    codes = np.asarray(codes, dtype=np.uint8)
    n, k = codes.shape
    qmax = (1 << bits) - 1
    if k % block or scale.shape != (n, k // block) or lo.shape != scale.shape or codes.max(initial=0) > qmax:
        raise ValueError("codes, scales and minima do not describe one block grid")
    scale = np.asarray(scale, dtype=np.float32)
    lo = np.asarray(lo, dtype=np.float32)
    safe = np.where(scale != 0, scale, 1.0).astype(np.float32)
    zp_float = -lo / safe
    zp = np.clip(np.rint(zp_float), 0, qmax)
    correction = (scale * (zp - zp_float)).astype(np.float32)
    correction = np.where(scale != 0, correction, lo).T.copy()
    return QuantizedWeight(bits=bits, block=block, n=n, k=k, packed=pack(codes, bits, block), scales=scale,
                           zero_points=pack_zero_points(zp.astype(np.uint8), bits), correction=correction)


def from_codes(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int, block: int) -> QuantizedWeight:
    """MatMulNBits form of weights on a grid with an *integer* zero point ``w = scale·(q − zp)``: exact,
    no correction (Q4_0, Q8_0, Q6_K and the other GGUF types whose offset is a fixed code)."""
    codes = np.asarray(codes, dtype=np.uint8)
    n, k = codes.shape
    zero_point = np.broadcast_to(np.asarray(zero_point, dtype=np.uint8), (n, k // block))
    if k % block or scale.shape != (n, k // block) or codes.max(initial=0) > (1 << bits) - 1:
        raise ValueError("codes, scales and zero points do not describe one block grid")
    return QuantizedWeight(bits=bits, block=block, n=n, k=k, packed=pack(codes, bits, block),
                           scales=np.asarray(scale, dtype=np.float32),
                           zero_points=pack_zero_points(np.ascontiguousarray(zero_point), bits), correction=None)


def take_rows(qw: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    """Output rows ``start:stop`` of a weight (a fused q/k/v or gate/up split into its parts), unchanged."""
    nb = qw.k // qw.block
    zp = unpack_zero_points(qw.zero_points, qw.bits, qw.n, nb)[start:stop]
    return QuantizedWeight(bits=qw.bits, block=qw.block, n=stop - start, k=qw.k, packed=qw.packed[start:stop].copy(),
                           scales=qw.scales[start:stop].copy(), zero_points=pack_zero_points(np.ascontiguousarray(zp), qw.bits),
                           correction=None if qw.correction is None else qw.correction[:, start:stop].copy())


def codes_digest(codes: dict[str, QuantizedWeight]) -> str:
    """sha256 of a set of weights' codes, scales, zero points and corrections, in name order: two builds hold the
    same int4 weights exactly when their digests agree (what a LoRA trained against those weights needs)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(codes):
        qw = codes[name]
        h.update(f"{name}|{qw.bits}|{qw.block}|{qw.n}|{qw.k}|".encode())
        for part in (qw.packed, qw.scales, qw.zero_points, qw.correction):
            h.update(b"-" if part is None else np.ascontiguousarray(part).tobytes())
    return h.hexdigest()
