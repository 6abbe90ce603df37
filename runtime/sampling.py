"""Choosing the next token from logits, in numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 means greedy
    top_k: int = 40  # 0 means no limit
    top_p: float = 0.95
    repetition_penalty: float = 1.1  # 1 means none

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style penalty on tokens already in the context: divide positive logits, multiply negative ones.

    Changes ``logits`` in place (the engine's buffer is rewritten by the next step anyway).
    """
    if penalty != 1.0 and seen.size:
        vals = logits[seen]
        logits[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: np.ndarray | None = None) -> int:
    """One token id from a vector of logits (which may be changed in place)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return int(np.argmax(logits))
    # Order is unchanged by a positive temperature: pick the top k on the raw logits.
    if params.top_k and params.top_k < logits.size:
        candidates = np.argpartition(logits, -params.top_k)[-params.top_k:]
    else:
        candidates = np.arange(logits.size)
    order = candidates[np.argsort(-logits[candidates], kind="stable")]
    scaled = logits[order].astype(np.float64) / params.temperature
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(order.size, p=probs)])


class SeenTokens:
    """The distinct token ids of a context, kept as an array for the repetition penalty."""

    def __init__(self, vocab_size: int, ids):
        self._mask = np.zeros(vocab_size, dtype=bool)
        self._ids: list[int] = []
        for i in ids:
            self.add(i)
        self.array = np.asarray(self._ids, dtype=np.int64)

    def add(self, token: int) -> None:
        if 0 <= token < self._mask.size and not self._mask[token]:
            self._mask[token] = True
            self._ids.append(token)
            self.array = np.asarray(self._ids, dtype=np.int64)
