"""Calibrated int4: GPTQ (Frantar et al., 2022) onto the asymmetric block grid MatMulNBits runs.

Round-to-nearest puts each weight on its block's grid independently. GPTQ quantizes
the columns (input features) of ``W`` one at a time and moves the rounding error of
each column onto the columns not yet quantized, weighted by the inverse Hessian
``H = Σ xᵀx`` of the layer's inputs on calibration text, so that the layer's *output*
on such inputs changes least. The grid is the one ``quant.py`` writes: per block of
``block`` inputs a float scale and minimum, codes 0..15, and the exact zero-point
correction. Blocks always tile the input dimension in order, so the codes map onto
MatMulNBits blocks one to one.

Two ways to walk the columns:

- in order (``act_order=False``), each block's grid chosen from its weights as they
  are when GPTQ reaches them (already moved by the errors of the blocks before);
- by activation order (``act_order=True``): the columns whose inputs carry the most
  energy (largest Hessian diagonal) first, while their error can still be spread over
  every other column. The columns of one block are then visited at different times,
  so every block's grid (scale and minimum) is fixed up front from the original
  weights ("static groups"); only the codes are chosen by GPTQ.

``damp`` adds that fraction of the mean Hessian diagonal to the diagonal before the
inverse: more damping is closer to round-to-nearest, less trusts the calibration text
more (and fails on a singular Hessian).

The Hessians are gathered layer by layer (``jishi.export.calibrate``), so only one
layer's are in memory at a time.
"""

from __future__ import annotations

import numpy as np

from jishi.export.quant import QuantizedWeight, from_codes, from_grid

DAMP = 0.01  # fraction of the mean Hessian diagonal added to it
# The build's default walk: by activation order (static groups). On the 20-block student of
# bench/quant_methods.py, with integer zero points (the build's default), held-out perplexity 37.50 against 38.64
# in input order (fp32 35.07) and top-1 agreement 85.2% against 81.5%. With exact zero points the order was the
# other way (46.37 against 44.20): there the blocks' minima keep the grid the pruned teacher's weights came from.
ACT_ORDER = True


def gptq_quantize(w: np.ndarray, hessian, bits: int = 4, block: int = 32, damp: float = DAMP,
                  act_order: bool = False, lazy: int = 128, exact_zero_points: bool = True) -> QuantizedWeight:
    """GPTQ of ``w`` (out × in) given the inputs' Hessian (in × in); returns MatMulNBits form.

    ``exact_zero_points``: each block's grid runs from its minimum to its maximum (``scale·q + min``), which
    MatMulNBits reaches only with a correction side path; without, the grid holds 0 and its zero point is a
    code (``scale·(q − zp)``), MatMulNBits' own form with no extra nodes."""
    import torch

    W = torch.tensor(np.asarray(w, dtype=np.float32), dtype=torch.float64)
    n, k = W.shape
    if k % block:
        raise ValueError(f"input size {k} is not a multiple of the block size {block}")
    if not damp > 0:
        raise ValueError(f"the damping must be a positive fraction of the Hessian's mean diagonal, not {damp}")
    H = torch.as_tensor(hessian, dtype=torch.float64).clone()
    if H.shape != (k, k):
        raise ValueError(f"a Hessian of shape {tuple(H.shape)} does not fit a weight with {k} inputs")
    qmax = (1 << bits) - 1
    nb = k // block
    # An input never seen in the calibration text: its column is rounded to nearest, its error goes nowhere.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=torch.float64)

    static = act_order
    scales = torch.zeros((n, nb), dtype=torch.float32)
    mins = torch.zeros((n, nb), dtype=torch.float32)
    zeros = torch.zeros((n, nb), dtype=torch.float32)  # integer zero points, when not exact

    def grid(lo, hi):
        """A block grid from its weights' range: (scale, minimum, zero point)."""
        if exact_zero_points:
            return (hi - lo) / qmax, lo, None
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        scale = (hi - lo) / qmax
        zp = torch.clamp(torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale))), 0, qmax)
        return scale, -scale * zp, zp

    def take(b, g):
        scales[:, b], mins[:, b] = g[0], g[1]
        if g[2] is not None:
            zeros[:, b] = g[2]

    if static:  # every block's grid from the original weights, as round-to-nearest would choose it
        wb = W.float().reshape(n, nb, block)
        for b in range(nb):
            take(b, grid(wb[:, b].amin(dim=1), wb[:, b].amax(dim=1)))
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(k)
    W = W[:, perm]
    H = H[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    lazy = block * max(1, lazy // block)
    codes = torch.zeros((n, k), dtype=torch.uint8)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            b = col // block
            if not static and col % block == 0:  # the block's grid, from its weights as they are now
                grp = W1[:, i:i + block].float()
                take(b, grid(grp.amin(dim=1), grp.amax(dim=1)))
            lo, scale = mins[:, b], scales[:, b]
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            w_col = W1[:, i]
            q = torch.clamp(torch.round((w_col.float() - lo) / safe), 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            err = (w_col - (scale * q + lo).double()) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if not exact_zero_points:
        return from_codes(codes.numpy(), scales.numpy(), zeros.numpy().astype(np.uint8), bits, block)
    return from_grid(codes.numpy(), scales.numpy(), mins.numpy(), bits, block)


def gptq_model(model, batches, bits: int = 4, block: int = 32, progress=None, damp: float = DAMP,
               act_order: bool = ACT_ORDER, exact_zero_points: bool = True) -> dict[str, QuantizedWeight]:
    """GPTQ codes of every block projection of ``model``, by weight name (fused projections under the
    split names the graph reads); ``exact_zero_points`` as in ``gptq_quantize``."""
    from jishi.export.calibrate import calibrate
    from jishi.export.from_torch import model_config, numpy_weights

    cfg = model_config(model.config, 16)
    return calibrate(model, cfg, numpy_weights(model, cfg), batches, "gptq", bits, block, damp=damp,
                     act_order=act_order, progress=progress, exact_zero_points=exact_zero_points).codes


def output_error(w_hat: np.ndarray, w: np.ndarray, x: np.ndarray) -> float:
    """Relative Frobenius error of the layer's output ``x·Wᵀ`` when ``w`` is replaced by ``w_hat``."""
    return float(np.linalg.norm(x @ (w_hat - w).T) / np.linalg.norm(x @ w.T))


def hessian_error(w_hat: np.ndarray, w: np.ndarray, hessian: np.ndarray) -> float:
    """``output_error`` over the inputs whose mean ``xᵀx`` is ``hessian``, without the inputs themselves."""
    d = np.asarray(w_hat, np.float64) - w
    w = np.asarray(w, np.float64)
    return float(np.sqrt(max(np.einsum("ij,ij->", d @ hessian, d), 0.0) / np.einsum("ij,ij->", w @ hessian, w)))
