"""Speculative decoding: guess several next tokens cheaply, check them all in one run.

Decoding a small model on a CPU costs about the same per run whether the run carries
one token or a handful (the weights are read once either way), so a run that checks
``k`` guessed tokens and keeps the ones the model would have chosen itself yields up to
``k + 1`` tokens for little more than the price of one.

A *drafter* guesses; the generation loop (``runtime.model``) verifies:

1. the drafter proposes ``d_1..d_k`` after the token ``t`` just chosen;
2. the engine is fed ``[t, d_1..d_k]`` as one chunk and returns the logits after each;
3. the ``Generation`` picks a token from each row in order, exactly as it would one step
   at a time (sampling, penalties, constraint masks, stops all included); while the pick
   equals the draft the next row is valid too; at the first difference the rest of the
   chunk is dropped and the cache is rolled back to the tokens that were kept.

So the tokens are the ones plain decoding picks: for greedy decoding the same tokens, and
for sampling the same distribution and, with a seed, the same random draws in the same
order. What can differ is rounding: a chunk of rows runs other matrix kernels than a
single row, so where two tokens are within rounding of a tie (quantized graphs, int8
activations) either may win, as between CPUs.

Two drafters:

- ``PromptLookup`` (n-gram lookup in the text so far): when the last few tokens occurred
  before, guess that what followed them then follows now. Free when nothing matches, and
  strong for input-grounded work: rewriting, extracting, summarizing, fixing code,
  answering from a given passage.
- ``DraftModel``: a smaller bundle with the same tokenizer greedily writes the guess.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from jishi.errors import JishiError


@dataclass
class SpeculationStats:
    """What speculation did for one answer: runs that checked a draft, tokens guessed and kept."""

    drafted: int = 0  # tokens proposed
    accepted: int = 0  # of those, tokens the model picked too
    verify_runs: int = 0  # runs that checked a draft
    steps: int = 0  # plain one-token runs

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "verify_runs": self.verify_runs,
                "steps": self.steps, "acceptance": round(self.acceptance, 4)}


class PromptLookup:
    """Guess the continuation of the last ``n`` tokens from where they last occurred.

    An index from each n-gram (n = ``min_ngram``..``max_ngram``) to the position after its latest
    occurrence is kept up to date as tokens arrive, so a proposal costs a few dictionary
    lookups, however long the text. The longest n-gram that matches wins; its latest earlier
    occurrence gives the guess."""

    free = True  # a guess costs nothing worth counting

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, max_draft: int = 8):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_draft < 1:
            raise ValueError(f"max_draft must be at least 1, got {max_draft}")
        self.max_ngram, self.min_ngram, self.max_draft = max_ngram, min_ngram, max_draft
        self._history: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}  # n-gram → the position just after its latest occurrence
        self._pending: dict[tuple[int, ...], int] = {}  # n-grams ending at the last token: indexed once it is not last

    def start(self, ids: list[int]) -> None:
        """A new answer after ``ids`` (the prompt)."""
        self._history, self._index, self._pending = [], {}, {}
        self.extend(ids)

    def extend(self, ids) -> None:
        """Tokens appended to the text (the prompt, then each kept token)."""
        h = self._history
        for token in ids:
            # the n-grams that ended at the previous last token now have a successor: index them
            self._index.update(self._pending)
            h.append(token)
            end = len(h)
            self._pending = {tuple(h[end - n:end]): end for n in range(self.min_ngram, min(self.max_ngram, end) + 1)}

    def propose(self, limit: int) -> list[int]:
        """Up to ``min(limit, max_draft)`` guessed tokens after the text so far ([] if nothing matches)."""
        h, limit = self._history, min(limit, self.max_draft)
        draft: list[int] = []
        while len(draft) < limit:
            # the text as it would be with the guesses so far: a match near the end (a loop, a list)
            # yields a short continuation, and the next lookup carries the guess on from there
            tail = (h[-self.max_ngram:] + draft)[-self.max_ngram:]
            more = self._continuation(tail, limit - len(draft))
            if not more:
                break
            draft += more
        return draft

    def _continuation(self, tail: list[int], limit: int) -> list[int]:
        h = self._history
        for n in range(min(self.max_ngram, len(tail), len(h) - 1), self.min_ngram - 1, -1):
            start = self._index.get(tuple(tail[len(tail) - n:]))
            if start is not None:
                return h[start:start + limit]
        return []


class DraftModel:
    """Guesses written greedily by a smaller model that shares the tokenizer (``model`` is a loaded
    ``jishi.runtime.model.Model``). Its cache follows the text: each proposal feeds only what it
    has not seen, and the guesses it made and the main model rejected are dropped."""

    free = False  # each guessed token is a run of the draft model

    def __init__(self, model, max_draft: int = 4):
        if max_draft < 1:
            raise ValueError(f"max_draft must be at least 1, got {max_draft}")
        self.model, self.max_draft = model, max_draft
        self._history: list[int] = []

    def start(self, ids: list[int]) -> None:
        self._history = list(ids)

    def extend(self, ids) -> None:
        self._history.extend(ids)

    def propose(self, limit: int) -> list[int]:
        import numpy as np

        h, limit = self._history, min(limit, self.max_draft)
        engine = self.model.engine
        if limit < 1 or len(h) + limit > engine.context:
            return []
        logits = engine.feed(h[engine.reuse_prefix(h):])
        out = [int(np.argmax(logits))]
        while len(out) < limit:
            out.append(int(np.argmax(engine.step(out[-1]))))
        return out


class DraftLength:
    """How many guesses are worth checking next, from what this answer has shown so far.

    The ``k``-th guess is kept only if the ``k - 1`` before it were, so with a per-token chance
    ``a`` of a guess being right it adds ``a**k`` expected tokens to a run, and it costs ``extra``
    (the time one more row adds to a run, as a share of a one-token run). Guessing ``k`` tokens pays
    while ``a**k > extra``. Both are measured as the answer goes: ``a`` from every guess the drafter
    made, checked or not (a guess left unchecked is compared with the token then chosen), ``extra``
    from the timed runs. So an answer that copies from its prompt gets long drafts, and one with
    nothing to copy gets none and costs a dictionary lookup a token."""

    PRIOR_HIT, PRIOR_EXTRA, RATE = 0.6, 0.25, 0.2

    def __init__(self, most: int):
        self.most = most
        self.hit = self.PRIOR_HIT  # chance that a guess is right, given the ones before it were
        self.extra = self.PRIOR_EXTRA
        self._step_s: float | None = None

    def __call__(self, available: int) -> int:
        if available < 1 or self.hit <= self.extra:
            return 0
        k = int(math.log(self.extra) / math.log(self.hit)) if self.hit < 1 else self.most
        return max(1, min(k, available, self.most))

    def observe(self, kept: int, guessed: int) -> None:
        """``kept`` of ``guessed`` guesses held (the first ``kept``, then one wrong unless all held)."""
        trials = [1.0] * kept + ([0.0] if kept < guessed else [])
        for t in trials:
            self.hit += self.RATE * (t - self.hit)

    def timed(self, tokens: int, seconds: float) -> None:
        """A run of ``tokens`` rows took ``seconds``."""
        if tokens == 1:
            self._step_s = seconds if self._step_s is None else self._step_s + self.RATE * (seconds - self._step_s)
        elif self._step_s:
            extra = max(0.02, (seconds - self._step_s) / (tokens - 1) / self._step_s)
            self.extra += self.RATE * (min(extra, 1.0) - self.extra)


@dataclass
class Speculation:
    """How a model speculates: ``lookup`` (default), ``draft`` (with ``draft_model``) or ``off``."""

    kind: str = "lookup"
    draft_model: object = None
    max_draft: int = 8
    stats: SpeculationStats = field(default_factory=SpeculationStats)

    KINDS = ("lookup", "draft", "off")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise JishiError(f"unknown speculation {self.kind!r}; choose one of {', '.join(self.KINDS)}")
        if self.kind == "draft" and self.draft_model is None:
            raise JishiError("speculation 'draft' needs a draft model (load(..., draft=BUNDLE), --draft BUNDLE)")

    def drafter(self):
        """A fresh drafter for one answer, or None when speculation is off."""
        if self.kind == "lookup":
            return PromptLookup(max_draft=self.max_draft)
        if self.kind == "draft":
            return DraftModel(self.draft_model, max_draft=min(self.max_draft, 4))
        return None

    def but(self, kind: str | None) -> "Speculation":
        """This speculation, or another kind for one request (keeping the draft model)."""
        return self if kind is None or kind == self.kind else Speculation(kind, self.draft_model, self.max_draft)

    @staticmethod
    def check_draft(draft, model) -> None:
        """A draft model must tokenize as ``model`` does: same vocabulary, same ids, same end tokens."""
        probe = "Draft check: naïve café, 東京, 12.5 kg\n\tdef f(x): return x**2"
        mine, theirs = model.tokenizer, draft.tokenizer
        if (draft.manifest.config.vocab_size != model.manifest.config.vocab_size
                or theirs.encode(probe, bos=False) != mine.encode(probe, bos=False)
                or set(theirs.eos_ids) != set(mine.eos_ids)):
            raise JishiError(f"the draft model {draft.name} does not share {model.name}'s tokenizer "
                             f"(vocabulary {draft.manifest.config.vocab_size} vs {model.manifest.config.vocab_size}); "
                             "a draft model must be built from the same base or distilled from it")


class Speculator:
    """One answer's speculation: its drafter, draft length and counts. ``round`` is one step of the
    decode loop for an engine (``runtime.engine.Engine`` or a ``runtime.batch.Lane``):

    before, ``gen.token`` is chosen and not yet fed; ``round`` feeds it, with the guesses worth
    checking, and picks from each row (``gen.push``) up to the first wrong guess; it cuts the cache
    back to the tokens kept and returns the text pieces. After, unless ``gen.done``, ``gen.token``
    is again chosen and not yet fed. No text is returned before the cache is consistent."""

    def __init__(self, speculation: Speculation, prompt_ids: list[int]):
        self.drafter = speculation.drafter()
        if self.drafter is None:
            raise ValueError("speculation is off")
        self.length = DraftLength(speculation.max_draft)
        self.stats = SpeculationStats()
        self.drafter.start(prompt_ids)

    def round(self, gen, engine, context: int) -> list[str]:
        token, drafter, length, stats = gen.token, self.drafter, self.length, self.stats
        drafter.extend((token,))
        # the draft fits the answer's budget after this token, and the context after the chunk
        room = min(gen.budget - gen.completion_tokens - 1, context - len(engine.tokens) - 2)
        guess = []
        if room > 0:  # a lookup guesses for free, as far as it can; a draft model writes only what is checked
            guess = drafter.propose(room if drafter.free else min(room, max(1, length(room))))
        draft = guess[:length(len(guess))] if guess else []
        start = time.perf_counter()
        if not draft:
            pieces = [gen.push(engine.step(token))]
            length.timed(1, time.perf_counter() - start)
            stats.steps += 1
            if guess:  # an unchecked guess still tells how good the guesses are
                length.observe(int(gen.token == guess[0]), 1)
            return pieces
        rows = engine.feed([token, *draft], all_logits=True)  # row j: the logits after draft[j - 1]
        length.timed(len(draft) + 1, time.perf_counter() - start)
        kept = len(engine.tokens) - len(draft)  # the cache with ``token`` and no guess
        pieces = []
        for j in range(len(draft) + 1):
            pieces.append(gen.push(rows[j]))
            if gen.done or j == len(draft) or gen.token != draft[j]:
                break
            drafter.extend((draft[j],))
        engine.truncate(kept + j)  # ``token`` and the j guesses kept
        stats.verify_runs += 1
        stats.drafted += len(draft)
        stats.accepted += j
        if not gen.done:
            length.observe(j, len(draft))
        return pieces
