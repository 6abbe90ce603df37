"""Activation-aware scaling (after AWQ, Lin et al., 2023), folded into the RMSNorm before the weights.

A few input channels of a layer carry most of the activation magnitude; their weights
matter most, and a 4-bit block grid shared with quiet channels serves them badly.
Multiplying input channel ``j`` of the weights by ``s_j`` and dividing the input by it
leaves the layer's output unchanged in float, but gives the loud channels' weights more
of each block's range. The division costs nothing at run time: the inputs of q/k/v and
of gate/up are RMSNorm outputs, so it is folded into the norm's weight
(``γ'_j = γ_j / s_j``; with Gemma's ``(1 + w)`` norms, ``w' = (1 + w) / s − 1``).

``s = (mean |x_j|)^α``, normalised so that its largest and smallest entries multiply to
1; ``α`` is searched on a small grid per layer and input (``α = 0``, no scaling, is on
the grid), choosing the one whose quantized weights change the layer's output least on
the calibration inputs, measured through their Hessian ``H = mean xᵀx``:
``‖x·(Ŵ/s − W)ᵀ‖² = tr((Ŵ/s − W)·H·(Ŵ/s − W)ᵀ)``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

ALPHAS = tuple(i / 10 for i in range(11))


def channel_scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """``(mean |x|)^α`` per input channel, normalised to a geometric middle of 1 (float64)."""
    a = np.asarray(mean_abs, np.float64)
    a = np.maximum(a, 1e-6 * max(float(a.max()), 1e-30))  # a channel never active still gets a finite scale
    s = a ** alpha
    return s / np.sqrt(s.max() * s.min())


def search(w: np.ndarray, hessian: np.ndarray, mean_abs: np.ndarray,
           quantize: Callable[[np.ndarray, np.ndarray], np.ndarray], alphas=ALPHAS) -> tuple[np.ndarray, float, dict]:
    """The input scales (k,) for ``w`` (n × k) whose quantization moves the output least, their ``α`` and
    the squared output error of every ``α`` tried. ``quantize(w_scaled, hessian_scaled)`` returns the
    dequantized weights it would store."""
    w = np.asarray(w, np.float64)
    H = np.asarray(hessian, np.float64)
    errors, best = {}, None
    for alpha in alphas:
        s = channel_scales(mean_abs, alpha)
        w_hat = quantize((w * s).astype(np.float32), H / np.outer(s, s)).astype(np.float64) / s
        d = w_hat - w
        errors[alpha] = float(np.einsum("ij,ij->", d @ H, d))
        if best is None or errors[alpha] < errors[best]:
            best = alpha
    return channel_scales(mean_abs, best), best, errors


def fold_into_norm(gamma: np.ndarray, s: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """The norm weight whose output is the old one's divided by ``s`` (``offset``: Gemma's 1 in ``1 + w``)."""
    return ((np.asarray(gamma, np.float64) + offset) / s - offset).astype(np.float32)
