"""Several KV caches in one buffer per layer, so that one ONNX run decodes many answers.

Decoding a small model on a CPU is bound by reading the weights, and a run reads
them once however many token rows it carries: one run for N answers costs little
more than one run for one. ``BatchEngine`` keeps the caches of ``rows`` answers as
row ``i`` of one block per layer, shape (rows, kv heads, capacity, head dim):

- a lane's prefill runs with batch 1 on ``kv[i:i+1]``, a contiguous view: the
  OrtValue over it points into the block, so GroupQueryAttention writes the
  lane's keys and values straight into its row (no copy in or out);
- a decode step runs the lanes of a contiguous range of rows together: input ids
  (n, 1), each row's own past length in ``seqlens_k``, the longest plus one as
  ``total_sequence_length``, logits for rows 0..n-1. Rows of different lengths
  are fine: attention and rotary positions are per row;
- only lanes that decode take part: ``arrange`` swaps rows so that each group of
  lanes (one adapter per group, as the merge-point inputs are bound per run) sits
  in a contiguous range. A swap copies the filled part of two rows and happens
  when an answer starts or ends, not per token.

The block grows in steps of ``KV_STEP`` positions up to the context, for every row
at once (a run needs one capacity), so memory is rows × the longest cache.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from jishi.errors import ContextLengthError
from jishi.runtime.engine import KV_STEP, PREFILL_CHUNK
from jishi.runtime.manifest import ModelConfig

_BINDINGS_KEPT = 64  # IO bindings cached by (rows, inputs); dropped all at once past this


class Lane:
    """One answer's cache: a row of the batch block. It has an Engine's interface (feed, step,
    reuse_prefix, set_inputs, reset, tokens), so a scheduler slot can hold either."""

    def __init__(self, batch: "BatchEngine", row: int):
        self.batch = batch
        self.row = row  # where its cache is now; ``arrange`` may move it
        self.tokens: list[int] = []
        self.inputs: dict = batch._merged({})  # the graph inputs it runs with (base + an adapter's)

    @property
    def capacity(self) -> int:
        return self.batch.capacity

    def set_inputs(self, arrays: dict[str, np.ndarray]) -> None:
        """Run with these extra graph inputs (an adapter's) over the base ones; the cache is reset.
        Lanes given the same dict share it, and may then decode in one run."""
        self.inputs = self.batch._merged(arrays)
        self.reset()

    def reset(self) -> None:
        self.tokens = []

    def reuse_prefix(self, ids: list[int]) -> int:
        from jishi.runtime.engine import keep_common_prefix

        return keep_common_prefix(self.tokens, ids)

    def step(self, token: int) -> np.ndarray:
        return self.batch.decode([self], [token])[0]

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` cached tokens (a rejected speculative draft); see Engine.truncate."""
        if not 0 <= n <= len(self.tokens):
            raise ValueError(f"cannot keep {n} of {len(self.tokens)} cached tokens")
        del self.tokens[n:]

    def copy_prefix(self, other: "Lane", n: int) -> None:
        """Hold the first ``n`` tokens of ``other``'s cache (same batch, same inputs): a copy of
        their rows, so a second answer to one prompt skips its prefill."""
        if other.batch is not self.batch or other.inputs is not self.inputs:
            raise ValueError("copy_prefix() needs a lane of the same batch with the same inputs")
        kv = self.batch._kv
        kv[:, self.row, :, :n] = kv[:, other.row, :, :n]
        self.tokens = list(other.tokens[:n])

    def feed(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        return self.batch.prefill(self, ids, all_logits)


class BatchEngine:
    def __init__(self, session: ort.InferenceSession, cfg: ModelConfig, context: int, rows: int,
                 base_inputs: dict[str, np.ndarray] | None = None):
        if rows < 1:
            raise ValueError("a batch needs at least one row")
        self.session = session
        self.cfg = cfg
        self.context = context
        self.rows = rows
        self._base = base_inputs or {}
        self._merged_cache: dict[int, tuple[dict, dict]] = {}  # id(arrays) -> (arrays, base + arrays)
        self._kv = np.zeros((2 * cfg.num_layers, rows, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
        self._bindings: dict = {}
        self._ids = np.zeros((rows, 1), np.int64)
        self._seqlens = np.zeros((rows,), np.int32)
        self._total = np.zeros((), np.int32)
        self._index = np.arange(rows, dtype=np.int64)
        self._logits = np.zeros((rows, cfg.vocab_size), np.float32)
        self.lanes = [Lane(self, i) for i in range(rows)]
        self._at = list(self.lanes)  # the lane in each row
        self._reserve(min(context, KV_STEP))
        self.runs = 0  # model runs, prefill chunks included
        self.swaps = 0
        self.decode_runs = 0
        self.decoded_rows = 0  # rows over all decode runs: ÷ decode_runs is the mean batch
        self.widest = 0  # the most rows one decode run carried
        self.batched_prefills = 0  # runs that read several prompts at once

    @property
    def capacity(self) -> int:
        return self._kv.shape[3]

    def _merged(self, arrays: dict) -> dict:
        if not arrays:
            return self._base
        hit = self._merged_cache.get(id(arrays))
        if hit is None or hit[0] is not arrays:
            if len(self._merged_cache) > 16:
                self._merged_cache.clear()
            hit = self._merged_cache[id(arrays)] = (arrays, {**self._base, **arrays})
        return hit[1]

    # --- memory ----------------------------------------------------------------------

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        if needed > self.context:
            raise ContextLengthError(f"{needed} tokens do not fit in the context window of {self.context}")
        steps = -(-max(needed, 2 * self.capacity) // KV_STEP)
        size = min(self.context, steps * KV_STEP)
        kv = np.zeros(self._kv.shape[:3] + (size, self._kv.shape[4]), np.float32)
        kept = max(len(lane.tokens) for lane in self.lanes)
        kv[:, :, :, :kept] = self._kv[:, :, :, :kept]
        self._kv = kv
        self._bindings.clear()  # they point at the old block

    @property
    def kv_bytes(self) -> int:
        return self._kv.nbytes

    def shrink(self) -> bool:
        """Empty every lane and give the block back down to its first step (the lanes must be
        idle). True if it was larger."""
        first = min(self.context, KV_STEP)
        if self.capacity <= first:
            return False
        for lane in self.lanes:
            lane.reset()
        self._kv = np.zeros(self._kv.shape[:3] + (first, self._kv.shape[4]), np.float32)
        self._bindings.clear()
        return True

    def swap(self, a: int, b: int) -> None:
        """Exchange the caches in rows ``a`` and ``b`` (and which lane is where)."""
        if a == b:
            return
        la, lb = self._at[a], self._at[b]
        m = max(len(la.tokens), len(lb.tokens))
        if m:
            kv = self._kv
            held = kv[:, a, :, :m].copy()
            kv[:, a, :, :m] = kv[:, b, :, :m]
            kv[:, b, :, :m] = held
        self._at[a], self._at[b] = lb, la
        la.row, lb.row = b, a
        self.swaps += 1

    def arrange(self, groups: list[list[Lane]]) -> list[tuple[int, int]]:
        """Move rows so that each group's lanes fill a contiguous range, the groups one after
        another from row 0; their (start, stop) ranges. A lane already inside its range stays."""
        ranges, lo = [], 0
        for group in groups:
            hi = lo + len(group)
            members = set(map(id, group))
            holes = [r for r in range(lo, hi) if id(self._at[r]) not in members]
            for lane in group:
                if not lo <= lane.row < hi:
                    self.swap(lane.row, holes.pop())
            ranges.append((lo, hi))
            lo = hi
        return ranges

    # --- runs ----------------------------------------------------------------------

    def _binding(self, lo: int, hi: int, inputs: dict, step: bool):
        key = (lo, hi, id(inputs), step)
        hit = self._bindings.get(key)
        if hit is not None and hit[0] is inputs:
            return hit[1]
        if len(self._bindings) >= _BINDINGS_KEPT:
            self._bindings.clear()
        io = self.session.io_binding()
        keep = []  # the OrtValues (and through them the arrays) stay alive with the binding

        def value(array):
            v = ort.OrtValue.ortvalue_from_numpy(array)
            keep.append(v)
            return v

        shared: dict[int, ort.OrtValue] = {}
        for name, a in inputs.items():
            if id(a) not in shared:
                shared[id(a)] = value(a)
            io.bind_ortvalue_input(name, shared[id(a)])
        for i in range(self.cfg.num_layers):
            for j, kind in enumerate(("key", "value")):
                v = value(self._kv[2 * i + j, lo:hi])  # contiguous: the run writes into the block
                io.bind_ortvalue_input(f"past_{kind}.{i}", v)
                io.bind_ortvalue_output(f"present_{kind}.{i}", v)
        if step:
            n = hi - lo
            io.bind_ortvalue_input("input_ids", value(self._ids[lo:hi]))
            io.bind_ortvalue_input("seqlens_k", value(self._seqlens[lo:hi]))
            io.bind_ortvalue_input("total_sequence_length", value(self._total))
            io.bind_ortvalue_input("logits_index", value(self._index[:n]))
            io.bind_ortvalue_output("logits", value(self._logits[lo:hi]))
        self._bindings[key] = (inputs, io, keep)
        return io

    def decode(self, lanes: list[Lane], tokens: list[int]) -> np.ndarray:
        """One token for each lane, in one run; their next-token logits (n × vocab), row k for
        ``lanes[k]``. The lanes must fill a contiguous range of rows (``arrange``) and share
        their inputs. The array is overwritten by the next run over those rows."""
        if not lanes or len(lanes) != len(tokens):
            raise ValueError("decode() needs one token for each of at least one lane")
        lo = min(lane.row for lane in lanes)
        hi = lo + len(lanes)
        if sorted(lane.row for lane in lanes) != list(range(lo, hi)):
            raise ValueError("the lanes of a decode step must fill a contiguous range of rows (see arrange)")
        inputs = lanes[0].inputs
        if any(lane.inputs is not inputs for lane in lanes):
            raise ValueError("the lanes of a decode step must share their inputs (one adapter per run)")
        longest = max(len(lane.tokens) for lane in lanes)
        if longest >= self.context:
            raise ContextLengthError(f"the context window of {self.context} tokens is full")
        self._reserve(longest + 1)
        for lane, token in zip(lanes, tokens):
            self._ids[lane.row, 0] = token
            self._seqlens[lane.row] = len(lane.tokens)
        self._total[...] = longest + 1
        self.session.run_with_iobinding(self._binding(lo, hi, inputs, step=True))
        self.runs += 1
        self.decode_runs += 1
        self.decoded_rows += len(lanes)
        self.widest = max(self.widest, len(lanes))
        for lane, token in zip(lanes, tokens):
            lane.tokens.append(token)
        order = [lane.row - lo for lane in lanes]
        out = self._logits[lo:hi]
        return out if order == list(range(len(lanes))) else out[order]

    def prefill_many(self, lanes: list[Lane], prompts: list[list[int]]) -> np.ndarray:
        """Read several prompts into empty lanes in one run; the logits after each (n × vocab).

        The lanes move to a contiguous range of rows (``arrange``) and must share their inputs.
        The prompts are right-padded to the longest, with each row's own length in
        ``seqlens_k``: attention never sees the padding, and the cache positions past a row's
        length (the padding's keys and values) are written over as that row decodes."""
        if not lanes or len(lanes) != len(prompts) or any(not p for p in prompts):
            raise ValueError("prefill_many() needs one non-empty prompt for each of at least one lane")
        if any(lane.tokens for lane in lanes):
            raise ValueError("prefill_many() fills empty lanes only")
        inputs = lanes[0].inputs
        if any(lane.inputs is not inputs for lane in lanes):
            raise ValueError("the lanes of one prefill run must share their inputs (one adapter per run)")
        width = max(len(p) for p in prompts)
        if width > self.context:
            raise ContextLengthError(f"{width} tokens do not fit in the context window of {self.context}")
        self._reserve(width)
        (lo, hi), = self.arrange([lanes])
        order = sorted(range(len(lanes)), key=lambda k: lanes[k].row)
        n = hi - lo
        ids = np.zeros((n, width), np.int64)
        lengths = np.zeros(n, np.int32)
        for k in order:
            r = lanes[k].row - lo
            ids[r, :len(prompts[k])] = prompts[k]
            lengths[r] = len(prompts[k])
        io = self.session.io_binding()
        keep = []
        shared: dict[int, ort.OrtValue] = {}
        for name, a in inputs.items():
            if id(a) not in shared:
                shared[id(a)] = ort.OrtValue.ortvalue_from_numpy(a)
            io.bind_ortvalue_input(name, shared[id(a)])
        for i in range(self.cfg.num_layers):
            for j, kind in enumerate(("key", "value")):
                v = ort.OrtValue.ortvalue_from_numpy(self._kv[2 * i + j, lo:hi])
                keep.append(v)
                io.bind_ortvalue_input(f"past_{kind}.{i}", v)
                io.bind_ortvalue_output(f"present_{kind}.{i}", v)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("seqlens_k", lengths - 1)
        io.bind_cpu_input("total_sequence_length", np.asarray(width, np.int32))
        io.bind_cpu_input("logits_index", (np.arange(n) * width + lengths - 1).astype(np.int64))
        logits = np.empty((n, self.cfg.vocab_size), np.float32)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(io)
        self.runs += 1
        self.batched_prefills += 1
        out = np.empty_like(logits)
        for k, (lane, p) in enumerate(zip(lanes, prompts)):
            lane.tokens = list(p)
            out[k] = logits[lane.row - lo]
        return out

    def prefill(self, lane: Lane, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Feed tokens after what the lane holds, with batch 1 on its row; logits of the last
        one (a new array), or of every one (n × vocab)."""
        if not ids:
            raise ValueError("feed() needs at least one token")
        if len(lane.tokens) + len(ids) > self.context:
            raise ContextLengthError(
                f"{len(lane.tokens) + len(ids)} tokens do not fit in the context window of {self.context}")
        if len(ids) == 1 and not all_logits:
            return lane.step(ids[0]).copy()
        self._reserve(len(lane.tokens) + len(ids))
        out = []
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK]
            pos, n = len(lane.tokens), len(chunk)
            io = self._binding(lane.row, lane.row + 1, lane.inputs, step=False)
            io.bind_cpu_input("input_ids", np.asarray([chunk], dtype=np.int64))
            io.bind_cpu_input("seqlens_k", np.asarray([pos + n - 1], dtype=np.int32))
            io.bind_cpu_input("total_sequence_length", np.asarray(pos + n, dtype=np.int32))
            index = np.arange(n, dtype=np.int64) if all_logits else np.asarray([n - 1], dtype=np.int64)
            io.bind_cpu_input("logits_index", index)
            logits = np.empty((index.size, self.cfg.vocab_size), np.float32)
            io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            self.session.run_with_iobinding(io)
            self.runs += 1
            lane.tokens.extend(chunk)
            out.append(logits)
        return np.concatenate(out, axis=0) if all_logits else out[-1][-1]
