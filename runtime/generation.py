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

from typing import Iterable

import numpy as np

from jishi.runtime.sampling import SamplingParams, SeenTokens, sample
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


class Generation:
    """The state of one answer. ``push(logits)`` picks the next token and returns the text
    that can be shown now; text that may be the start of a stop string is held back, and a
    multi-byte character is never split. After ``done``: ``text``, ``finish_reason``,
    ``completion_tokens``."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], budget: int, params: SamplingParams,
                 stops: tuple[str, ...] = (), seed: int | None = None, vocab_size: int | None = None):
        if budget < 1:
            raise ValueError(f"budget must be at least 1, got {budget}")
        self.tokenizer = tokenizer
        self.prompt_tokens = len(prompt_ids)
        self.budget = budget
        self.params = params
        self.stops = stops
        self._rng = np.random.default_rng(seed)
        self._seen = (SeenTokens(vocab_size or tokenizer.vocab_size, prompt_ids)
                      if params.repetition_penalty != 1.0 else None)
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
        token = sample(logits, self.params, self._rng, self._seen.array if self._seen is not None else None)
        self.token = token
        self.completion_tokens += 1
        last = self.completion_tokens == self.budget
        if token in self.tokenizer.eos_ids:
            self.finish_reason = "stop"
            self._pending += self._text.flush().rstrip("\ufffd")  # complete characters held with a partial one
            return self._finish()
        self._pending += self._text.add(token)
        if last:
            self._pending += self._text.flush()
        cut = find_stop(self._pending, self.stops)
        if cut is not None:
            self._pending = self._pending[:cut]
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

    def _finish(self) -> str:
        self.done = True
        piece, self._pending = self._pending, ""
        if piece:
            self._said.append(piece)
        return piece
