"""Choosing the next token from logits, in numpy.

The order, for one token:

1. ``logit_bias`` is added (it shapes the choice even when greedy, as in OpenAI's API);
2. a constraint's mask (constraints.py) sets forbidden tokens to -inf;
3. temperature 0 takes the argmax of that: plain greedy, no penalty, no truncation;
4. otherwise the repetition penalty, then top-k, the temperature, top-p and min-p
   cut the distribution, and the token is drawn from what is left.

Every value is checked (finite, in range) when ``SamplingParams`` is made, so a NaN
or an infinity never reaches the sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 (never) .. 100 (always)


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 means plain greedy
    top_k: int = 40  # 0 means no limit
    top_p: float = 0.95
    repetition_penalty: float = 1.1  # 1 means none; applies only when sampling (temperature > 0)
    min_p: float = 0.0  # drop tokens below min_p × the most likely token's probability; 0 means none
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, bias in [-100, 100]

    def __post_init__(self):
        t = _finite("temperature", self.temperature)
        if t < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)):
            raise ValueError(f"top_k must be an integer, got {type(self.top_k).__name__}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < _finite("top_p", self.top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if _finite("repetition_penalty", self.repetition_penalty) <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= _finite("min_p", self.min_p) <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for pair in self.logit_bias:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ValueError(f"logit_bias holds (token id, bias) pairs, got {pair!r}")
            token, bias = pair
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if abs(_finite(f"logit_bias[{token}]", bias)) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias[{token}] must be between -100 and 100, got {bias}")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a logit_bias token is outside the vocabulary."""
        for token, _ in self.logit_bias:
            if token >= vocab_size:
                raise ValueError(f"logit_bias names token {token}, but the vocabulary has {vocab_size} tokens "
                                 f"(ids 0..{vocab_size - 1})")


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style penalty on tokens already in the context: divide positive logits, multiply negative ones.

    Changes ``logits`` in place (the engine's buffer is rewritten by the next step anyway).
    """
    if penalty != 1.0 and seen.size:
        vals = logits[seen]
        logits[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def apply_logit_bias(logits: np.ndarray, bias: tuple[tuple[int, float], ...]) -> np.ndarray:
    for token, b in bias:
        if token < logits.size:
            logits[token] += b
    return logits


def top_k_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """The indices of the ``k`` largest logits, in no particular order: the set
    ``np.argpartition(logits, -k)[-k:]`` holds (where logits tie at the k-th value, another of
    the tied ones may be picked).

    Partitioning the whole vocabulary took about 1.7 ms of a 10 ms decode step (49,152 logits,
    numpy 2.4; bench/token_profile.py). Instead the logits are cut into at least 16·k groups, whose maxima
    are one elementwise maximum over rows; the k-th largest of those maxima is a floor that at
    least k logits reach (one in each of the top k groups), so the k largest are among the logits
    at or above it, usually a few more than k, and only those are partitioned.
    """
    n = logits.size
    groups = 1 << (16 * k - 1).bit_length()  # a power of two, at least 16k
    rows = n // groups
    if rows < 2:  # a small vocabulary: nothing to gain
        return np.argpartition(logits, -k)[-k:]
    maxima = logits[:rows * groups].reshape(rows, groups).max(axis=0)  # group j: logits j, j + groups, …
    if rows * groups < n:
        maxima = np.concatenate([maxima, logits[rows * groups:]])  # the rest: a group each
    floor = np.partition(maxima, maxima.size - k)[maxima.size - k]
    candidates = np.flatnonzero(logits >= floor)
    if candidates.size < k:  # NaN logits compare false: the plain way
        return np.argpartition(logits, -k)[-k:]
    if candidates.size == k:
        return candidates
    return candidates[np.argpartition(logits[candidates], -k)[-k:]]


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: np.ndarray | None = None,
           mask=None) -> int:
    """One token id from a vector of logits (which may be changed in place). ``mask`` is a
    constraint's matcher (anything with ``apply(logits)``) or None."""
    if params.logit_bias:
        apply_logit_bias(logits, params.logit_bias)
    if mask is not None:
        mask.apply(logits)
    if params.temperature == 0:
        return int(np.argmax(logits))
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    # Order is unchanged by a positive temperature: pick the top k on the raw logits.
    if params.top_k and params.top_k < logits.size:
        candidates = top_k_indices(logits, params.top_k)
    else:
        candidates = np.arange(logits.size)
    order = candidates[np.argsort(-logits[candidates], kind="stable")]
    scaled = logits[order].astype(np.float64) / params.temperature
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    if params.min_p > 0:
        keep = int(np.count_nonzero(probs >= params.min_p * probs[0]))  # sorted: a prefix
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(order.size, p=probs)])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the vocabulary, in float64."""
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


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
