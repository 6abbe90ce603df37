"""One request's generation, token by token: sampling, EOS, stop strings and streamed text.

``Generation`` holds no model: whoever owns an engine feeds it logits and runs the
engine on the token it picks. ``Model`` drives one in a plain loop; the server's
scheduler drives many, one token each in turn, on engines that share a session.

    gen = Generation(tokenizer, prompt_ids, budget, params, stops, seed)
    logits = engine.feed(prompt_ids)
    while True:
        piece = gen.push(logits)     # picks a token, returns the text it releases ("" or more)
        ...
        if gen.done:
            break
        logits = engine.step(gen.token)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from jishi.runtime.sampling import SamplingParams, SeenTokens, log_softmax, sample
from jishi.runtime.tokenizer import TextStream, Tokenizer


def normalize_stops(stop: str | Iterable[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    return tuple(s for s in stop if s)


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (the raw log-softmax, before
    penalties, biases and constraint masks), and the ``top`` most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def make_rng(seed: int | None, index: int = 0) -> np.random.Generator:
    """The random stream of answer ``index`` of a request (answer 0 of seed s is ``default_rng(s)``)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng(seed if index == 0 else (seed, index))


class Generation:
    """The state of one answer. ``push(logits)`` picks the next token and returns the text
    that can be shown now; text that may be the start of a stop string is held back, and a
    multi-byte character is never split. After ``done``: ``text``, ``finish_reason``,
    ``completion_tokens``."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], budget: int, params: SamplingParams,
                 stops: tuple[str, ...] = (), seed: int | None = None, vocab_size: int | None = None,
                 matcher=None, logprobs: int | None = None, index: int = 0):
        """``matcher``: a constraint's (constraints.Matcher) or None. ``logprobs``: None, or how many
        alternatives (0..20) to record with each token's log-probability. ``index``: which of a
        request's answers this is (each has its own random stream from the seed)."""
        if budget < 1:
            raise ValueError(f"budget must be at least 1, got {budget}")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}")
        self.tokenizer = tokenizer
        self.prompt_tokens = len(prompt_ids)
        self.budget = budget
        self.params = params
        self.stops = stops
        self._rng = make_rng(seed, index)
        self.index = index
        self._seen = (SeenTokens(vocab_size or tokenizer.vocab_size, prompt_ids)
                      if params.repetition_penalty != 1.0 and params.temperature > 0 else None)
        self.matcher = matcher
        self.top_logprobs = logprobs
        self.logprobs: list[TokenLogprob] = []  # one per token, when asked for
        self._logprobs_taken = 0
        self.tokens: list[int] = []  # every token picked, EOS included
        self._text = TextStream(tokenizer)
        self._pending = ""  # held back: it may be the start of a stop string
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._said: list[str] = []
        self.token: int | None = None  # the last token picked (to feed next, unless done)
        self.completion_tokens = 0
        self.finish_reason = "length"
        self.done = False

    @property
    def text(self) -> str:
        return "".join(self._said)

    def push(self, logits: np.ndarray) -> str:
        """Pick a token from ``logits`` (which may be changed in place); the text it releases."""
        if self.done:
            raise RuntimeError("this generation is over")
        lp = log_softmax(logits) if self.top_logprobs is not None else None  # before anything changes them
        token = sample(logits, self.params, self._rng, self._seen.array if self._seen is not None else None,
                       self.matcher)
        if lp is not None:
            self.logprobs.append(_record(lp, token, self.top_logprobs))
        self.token = token
        self.tokens.append(token)
        self.completion_tokens += 1
        last = self.completion_tokens == self.budget
        grammar_done = False
        if self.matcher is not None:
            self.matcher.accept(token)
            grammar_done = self.matcher.stopped and token not in self.tokenizer.eos_ids
        if token in self.tokenizer.eos_ids:
            self.finish_reason = "stop"
            self._pending += self._text.flush().rstrip("\ufffd")  # complete characters held with a partial one
            return self._finish()
        self._pending += self._text.add(token)
        if last or grammar_done:
            self._pending += self._text.flush()
        cut = find_stop(self._pending, self.stops)
        if cut is not None:
            self._pending = self._pending[:cut]
            self.finish_reason = "stop"
            return self._finish()
        if grammar_done:  # the grammar is complete: nothing may follow
            self.finish_reason = "stop"
            return self._finish()
        if last:
            return self._finish()
        if self._seen is not None:
            self._seen.add(token)
        if len(self._pending) > self._hold:
            keep = len(self._pending) - self._hold
            piece, self._pending = self._pending[:keep], self._pending[keep:]
            self._said.append(piece)
            return piece
        return ""

    def take_logprobs(self) -> list[TokenLogprob]:
        """The logprob entries recorded since the last call (for streamed chunks)."""
        out = self.logprobs[self._logprobs_taken:]
        self._logprobs_taken = len(self.logprobs)
        return out

    def _finish(self) -> str:
        self.done = True
        piece, self._pending = self._pending, ""
        if piece:
            self._said.append(piece)
        return piece


def _record(lp: np.ndarray, token: int, k: int) -> TokenLogprob:
    top = ()
    if k:
        ids = np.argpartition(lp, -k)[-k:]
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        top = tuple((int(i), float(lp[i])) for i in ids)
    return TokenLogprob(token, float(lp[token]), top)
