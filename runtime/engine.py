"""One decoder session and its KV cache: feed tokens, get logits.

The cache is one preallocated block bound as both the past input and the
present output of every layer, so GroupQueryAttention appends in place. The
decode step's inputs and its logits output are bound to fixed buffers too: a
step writes four numbers into numpy arrays and runs, with no allocation.

The cache grows with the conversation (in steps of ``KV_STEP`` tokens, up to
the context) instead of being allocated for the whole context at once: onnxruntime's
attention scratch scales with the cache length, so a short chat on a small
board stays small.

The engine remembers which tokens its cache holds, so a request that starts
with the same tokens (the next turn of a chat) only feeds what is new.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from jishi.errors import ContextLengthError
from jishi.runtime.manifest import ModelConfig

PREFILL_CHUNK = 512  # tokens per prefill run: bounds the attention scratch memory
KV_STEP = 256  # the cache grows by whole steps of this many positions


def make_session(path: Path, settings) -> ort.InferenceSession:
    """A session with ``settings`` (runtime.settings.RuntimeSettings, or a thread count with the defaults)."""
    from jishi.runtime.settings import RuntimeSettings

    if isinstance(settings, int):
        settings = RuntimeSettings(threads=settings)
    return ort.InferenceSession(str(path), settings.session_options(), providers=list(settings.providers))


def keep_common_prefix(tokens: list[int], ids: list[int]) -> int:
    """Cut ``tokens`` (what a cache holds) to its common start with ``ids``, leaving at least
    one token of ``ids`` to feed; returns how many were kept."""
    n = 0
    limit = min(len(tokens), len(ids) - 1)
    while n < limit and tokens[n] == ids[n]:
        n += 1
    del tokens[n:]
    return n


class Engine:
    def __init__(self, session: ort.InferenceSession, cfg: ModelConfig, context: int,
                 base_inputs: dict[str, np.ndarray] | None = None):
        self.session = session
        self.cfg = cfg
        self.context = context
        self.tokens: list[int] = []  # what the cache holds, in order
        self._io = session.io_binding()
        self._base = base_inputs or {}  # inputs always bound unless an adapter replaces them (merge-point A)
        self._arrays: dict[str, np.ndarray] = {}
        self._kv = np.zeros((2 * cfg.num_layers, 1, cfg.num_kv_heads, 0, cfg.head_dim), dtype=np.float32)
        self._reserve(min(context, KV_STEP))

        # Fixed buffers for the one-token decode step.
        self._ids = np.zeros((1, 1), np.int64)
        self._seqlens = np.zeros((1,), np.int32)
        self._total = np.zeros((), np.int32)
        self._last = np.zeros((1,), np.int64)
        self._logits = np.zeros((1, cfg.vocab_size), np.float32)
        self._step_values = {
            "input_ids": ort.OrtValue.ortvalue_from_numpy(self._ids),
            "seqlens_k": ort.OrtValue.ortvalue_from_numpy(self._seqlens),
            "total_sequence_length": ort.OrtValue.ortvalue_from_numpy(self._total),
            "logits_index": ort.OrtValue.ortvalue_from_numpy(self._last),
        }
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits)
        self._bind_step()
        if self._base:
            self.set_inputs({})

    def sibling(self) -> "Engine":
        """Another engine on the same session (weights shared), with its own cache and buffers."""
        return Engine(self.session, self.cfg, self.context, self._base)

    @property
    def capacity(self) -> int:
        """Positions the cache has room for now (it grows up to the context)."""
        return self._kv.shape[3]

    def _reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions, keeping what the cache holds."""
        if needed <= self.capacity:
            return
        steps = -(-max(needed, 2 * self.capacity) // KV_STEP)
        size = min(self.context, steps * KV_STEP)
        kv = np.zeros(self._kv.shape[:3] + (size, self._kv.shape[4]), dtype=np.float32)
        kept = len(self.tokens)
        kv[:, :, :, :kept] = self._kv[:, :, :, :kept]
        values = [ort.OrtValue.ortvalue_from_numpy(kv[i]) for i in range(kv.shape[0])]
        self._kv, self._kv_values = kv, values
        self._bind_kv()

    def _bind_step(self) -> None:
        for name, value in self._step_values.items():
            self._io.bind_ortvalue_input(name, value)
        self._io.bind_ortvalue_output("logits", self._logits_value)

    def set_inputs(self, arrays: dict[str, np.ndarray]) -> None:
        """Bind these extra graph inputs (an adapter's) over the base ones; the cache is reset."""
        merged = {**self._base, **arrays}
        by_array: dict[int, ort.OrtValue] = {}  # one OrtValue per distinct array (shared defaults)
        self._io.clear_binding_inputs()
        self._arrays = merged  # keep the memory alive while bound
        for name, a in merged.items():
            value = by_array.setdefault(id(a), ort.OrtValue.ortvalue_from_numpy(a))
            self._io.bind_ortvalue_input(name, value)
        self._bind_kv()
        self._bind_step()
        self.reset()

    def _bind_kv(self) -> None:
        for i in range(self.cfg.num_layers):
            for j, kind in enumerate(("key", "value")):
                value = self._kv_values[2 * i + j]
                self._io.bind_ortvalue_input(f"past_{kind}.{i}", value)
                self._io.bind_ortvalue_output(f"present_{kind}.{i}", value)

    def reset(self) -> None:
        self.tokens = []

    @property
    def kv_bytes(self) -> int:
        return self._kv.nbytes

    def shrink(self) -> bool:
        """Empty the cache and give it back down to its first step. True if it was larger."""
        first = min(self.context, KV_STEP)
        if self.capacity <= first:
            return False
        self.tokens = []
        self._kv = np.zeros(self._kv.shape[:3] + (0, self._kv.shape[4]), dtype=np.float32)
        self._reserve(first)
        return True

    def copy_prefix(self, other: "Engine", n: int) -> None:
        """Hold the first ``n`` tokens of ``other``'s cache (an engine on the same session and inputs)."""
        self.tokens = []
        self._reserve(n)
        self._kv[:, :, :, :n] = other._kv[:, :, :, :n]
        self.tokens = list(other.tokens[:n])

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` cached tokens (speculative decoding drops a rejected draft this way).
        The positions past ``n`` are overwritten by the next tokens fed; attention never reads them,
        as each run's ``seqlens_k`` says how far the cache is valid."""
        if not 0 <= n <= len(self.tokens):
            raise ValueError(f"cannot keep {n} of {len(self.tokens)} cached tokens")
        del self.tokens[n:]

    def reuse_prefix(self, ids: list[int]) -> int:
        """Keep the cached tokens that ``ids`` starts with (at least one token stays to feed)."""
        return keep_common_prefix(self.tokens, ids)

    def step(self, token: int) -> np.ndarray:
        """Feed one token; the logits (vocab,) for the next one. The array is reused by the next step."""
        pos = len(self.tokens)
        if pos >= self.context:
            raise ContextLengthError(f"the context window of {self.context} tokens is full")
        if pos >= self.capacity:
            self._reserve(pos + 1)
        self._ids[0, 0] = token
        self._seqlens[0] = pos
        self._total[...] = pos + 1
        self.session.run_with_iobinding(self._io)
        self.tokens.append(token)
        return self._logits[0]

    def feed(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Feed several tokens after what the cache holds; logits of the last one, or of every one (n × vocab)."""
        if not ids:
            raise ValueError("feed() needs at least one token")
        if len(self.tokens) + len(ids) > self.context:
            raise ContextLengthError(
                f"{len(self.tokens) + len(ids)} tokens do not fit in the context window of {self.context}"
            )
        if len(ids) == 1 and not all_logits:
            return self.step(ids[0]).copy()
        self._reserve(len(self.tokens) + len(ids))
        out = []
        try:
            for start in range(0, len(ids), PREFILL_CHUNK):
                logits = self._run_chunk(ids[start:start + PREFILL_CHUNK], all_logits)
                if all_logits:
                    out.append(logits)
        finally:
            self._bind_step()
        return np.concatenate(out, axis=0) if all_logits else logits[-1]

    def hidden_states(self, ids: list[int]) -> np.ndarray:
        """The final-norm hidden state of each of ``ids`` (n × hidden), fed from an empty cache."""
        self.reset()
        if len(ids) > self.context:
            raise ContextLengthError(f"{len(ids)} tokens do not fit in the context window of {self.context}")
        self._reserve(len(ids))
        out = []
        try:
            for start in range(0, len(ids), PREFILL_CHUNK):
                chunk = ids[start:start + PREFILL_CHUNK]
                hidden = np.empty((len(chunk), self.cfg.hidden_size), np.float32)
                self._io.bind_ortvalue_output("hidden_states", ort.OrtValue.ortvalue_from_numpy(hidden))
                self._run_chunk(chunk, False)
                out.append(hidden)
        finally:
            self._io.clear_binding_outputs()
            self._bind_kv()
            self._bind_step()
        return np.concatenate(out, axis=0)

    def hidden_states_batch(self, batch: list[list[int]]) -> list[np.ndarray]:
        """The final-norm hidden states of several token lists in one run (each n_i × hidden).

        The lists are right-padded to the longest; each row's own length goes in ``seqlens_k``,
        so attention never sees the padding (checked: rows equal single runs exactly). Runs on
        a cache of its own, so the engine's cache stays as it was."""
        cfg = self.cfg
        n, width = len(batch), max(len(ids) for ids in batch)
        if width > self.context:
            raise ContextLengthError(f"{width} tokens do not fit in the context window of {self.context}")
        ids = np.zeros((n, width), np.int64)
        for i, row in enumerate(batch):
            ids[i, :len(row)] = row
        kv = np.zeros((2 * cfg.num_layers, n, cfg.num_kv_heads, width, cfg.head_dim), np.float32)
        hidden = np.empty((n * width, cfg.hidden_size), np.float32)
        io = self.session.io_binding()
        keep = []
        for name, a in self._arrays.items() if self._arrays else self._base.items():
            io.bind_cpu_input(name, a)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("seqlens_k", np.asarray([len(r) - 1 for r in batch], np.int32))
        io.bind_cpu_input("total_sequence_length", np.asarray(width, np.int32))
        io.bind_cpu_input("logits_index", np.zeros(1, np.int64))
        for i in range(cfg.num_layers):
            for j, kind in enumerate(("key", "value")):
                value = ort.OrtValue.ortvalue_from_numpy(kv[2 * i + j])
                keep.append(value)
                io.bind_ortvalue_input(f"past_{kind}.{i}", value)
                io.bind_ortvalue_output(f"present_{kind}.{i}", value)
        io.bind_ortvalue_output("hidden_states", ort.OrtValue.ortvalue_from_numpy(hidden))
        io.bind_output("logits")
        self.session.run_with_iobinding(io)
        rows = hidden.reshape(n, width, cfg.hidden_size)
        return [rows[i, :len(r)] for i, r in enumerate(batch)]

    def _run_chunk(self, chunk: list[int], all_logits: bool) -> np.ndarray:
        pos, n = len(self.tokens), len(chunk)
        io = self._io
        io.bind_cpu_input("input_ids", np.asarray([chunk], dtype=np.int64))
        io.bind_cpu_input("seqlens_k", np.asarray([pos + n - 1], dtype=np.int32))
        io.bind_cpu_input("total_sequence_length", np.asarray(pos + n, dtype=np.int32))
        index = np.arange(n, dtype=np.int64) if all_logits else np.asarray([n - 1], dtype=np.int64)
        io.bind_cpu_input("logits_index", index)
        logits = np.empty((index.size, self.cfg.vocab_size), dtype=np.float32)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(io)
        self.tokens.extend(chunk)
        return logits
