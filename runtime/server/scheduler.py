"""Many requests on one model: slots, a bounded queue, and one thread that steps them in turn.

Every slot is an ``Engine`` (its own KV cache) on the model's one onnxruntime
session, so the weights are in memory once and each slot costs only its cache.
A single scheduler thread runs every model call. Each round it

1. admits waiting jobs (first come, first served) into free slots, choosing the
   free slot whose cache already holds the longest start of the prompt;
2. feeds each prefilling slot one chunk of its prompt, so a long prompt never
   holds the others up for long; batched, new prompts that fit in one chunk are read
   together, in one run per adapter group;
3. advances every decoding slot by one token (``decode_round``).

So all active answers progress together and a new one gets its first token
after at most one round. An answer decoding alone, with nobody waiting, speculates
(runtime.speculative, the model's kind: prompt lookup unless it was loaded with a draft
model or with speculation off): a round checks its guesses in one run and may yield
several tokens, and the next job to arrive finds it back in step with the others. A job cancelled (its client left) frees its slot at
the start of the next round, and nothing more is computed for it.

Batched (the default), the slots are lanes of one ``BatchEngine``: a decode
round samples every slot's token, then runs the model once per adapter group
(rows that share the bound merge-point inputs), so N answers cost about one
run's weight reads instead of N. Unbatched, each slot is its own ``Engine``
and the round runs each slot in turn.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from jishi.runtime.generation import Generation
from jishi.runtime.sampling import SamplingParams

PREFILL_CHUNK = 64  # prompt tokens a slot feeds per round
SHARED_PREFIX = 16  # a prompt start at least this long, held by another slot, is copied rather than computed
_UNBOUND = object()  # a slot's adapter when its bindings are not known


class QueueFull(Exception):
    """Every slot is busy and the queue is at its limit; ``retry_after`` in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One request. ``sink(kind, value)`` is called from the scheduler thread with
    ("piece", text), then once ("done", Generation) or ("error", exception)."""

    prompt_ids: list[int]
    budget: int
    params: SamplingParams
    sink: Callable[[str, object], None]
    stops: tuple[str, ...] = ()
    seed: int | None = None
    adapter: str | None = None
    constraint: object | None = None  # a constraints.Constraint (already checked to compile)
    logprobs: int | None = None
    index: int = 0  # which answer of its request (n > 1): its own random stream from the seed
    leader: "Job | None" = None  # answer 0 of the request, whose prefill this one copies
    prefill_logits: np.ndarray | None = None  # a leader's logits after its prompt, for its followers
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None  # when a slot took it
    first_token: float | None = None
    finished: float | None = None
    cancelled: bool = False
    gen: Generation | None = None
    followers: int = 0  # how many answers after this one share its prompt
    speculator: object | None = None  # speculative.Speculator while it decodes alone

    def cancel(self) -> None:
        self.cancelled = True


class Slot:
    def __init__(self, engine):
        self.engine = engine
        self.adapter: str | None = None
        self.job: Job | None = None
        self.todo: list[int] = []  # prompt tokens still to feed
        self.logits: np.ndarray | None = None
        self.last_used = 0.0


class Scheduler:
    def __init__(self, model, max_concurrent: int = 4, queue_limit: int = 16, batch: bool = True,
                 release_after: float = 30.0):
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if queue_limit < 0:
            raise ValueError("the queue limit must be 0 or more")
        self.model = model
        self.queue_limit = queue_limit
        for name in model.adapters:  # load every adapter once, up front: errors show at start
            model.load_adapter(name)
        if model.adapters:
            model.open_adapter_graph()  # before the slots share its session
        self.batch = None
        if batch:
            from jishi.runtime.batch import BatchEngine

            e = model.engine
            self.batch = BatchEngine(e.session, e.cfg, e.context, max_concurrent, e._base)
            self.slots = [Slot(lane) for lane in self.batch.lanes]
        else:
            self.slots = [Slot(model.engine.sibling()) for _ in range(max_concurrent)]
        self._adapter_inputs: dict = {None: {}}  # merge-point inputs of the adapters some slot has bound
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._durations: deque[float] = deque(maxlen=32)  # seconds a slot spent per recent job
        self.tokens_generated = 0
        self.steps = 0  # model runs, prefill chunks included
        self.served = 0
        self.forks = 0  # answers started from another's prefill (n > 1)
        self.shared_tokens = 0  # prompt tokens copied from another slot's cache instead of computed
        self.release_after = release_after  # idle seconds before the caches are dropped and shrunk
        self.releases = 0

    # --- the outside: any thread -------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="jishi-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when every slot is busy and the queue is full."""
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue the answers of one request together (all or none), in order."""
        with self._cond:
            busy = sum(s.job is not None for s in self.slots)
            if busy + len(self._waiting) + len(jobs) > len(self.slots) + self.queue_limit:
                raise QueueFull(self._retry_after())
            self._waiting.extend(jobs)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job: a queued one leaves the queue; a running one frees its slot next round."""
        with self._cond:
            job.cancel()
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish_cancelled(job)
            self._cond.notify()

    def status(self) -> dict:
        with self._cond:
            return {"slots": len(self.slots), "active": sum(s.job is not None for s in self.slots),
                    "queued": len(self._waiting), "queue_limit": self.queue_limit, "served": self.served,
                    "tokens_generated": self.tokens_generated, "batched": self.batch is not None,
                    "kv_bytes": self.kv_bytes(), "shared_prompt_tokens": self.shared_tokens}

    def _retry_after(self) -> int:
        per_job = sorted(self._durations)[len(self._durations) // 2] if self._durations else 2.0
        ahead = len(self._waiting) + 1
        return int(min(60, max(1, round(per_job * ahead / len(self.slots)))))

    # --- the scheduler thread ----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and all(s.job is None for s in self.slots):
                    if not self._cond.wait(timeout=self.release_after) and self._release_memory():
                        continue
                if self._stop:
                    return
                self._admit()
                active = [s for s in self.slots if s.job is not None]
            for slot in active:
                if slot.job.cancelled:
                    self._release(slot, None)
            active = [s for s in active if s.job is not None]
            ready = []
            self._share_burst(active)
            together = self._prefill_together(active)
            for slot in active:
                if slot.todo and slot not in together:
                    self._guard(slot, self._prefill, slot)
                if slot.job is not None and not slot.todo:
                    ready.append(slot)
            if ready:
                self.decode_round(ready)
            time.sleep(0)  # let the event loop thread take the GIL and send what was made

    def _release_memory(self) -> bool:
        """After ``release_after`` idle seconds: drop the slots' caches and shrink the KV blocks
        back to their first step, so memory returns to its bound after a burst. True if any shrank."""
        engines = [self.batch] if self.batch is not None else [s.engine for s in self.slots]
        shrunk = False
        for e in engines:
            shrunk = e.shrink() or shrunk
        if shrunk:
            self.releases += 1
        return shrunk

    def kv_bytes(self) -> int:
        """Bytes the slots' KV caches hold now."""
        if self.batch is not None:
            return self.batch.kv_bytes
        return sum(s.engine.kv_bytes for s in self.slots)

    def _admit(self) -> None:
        """Move waiting jobs into free slots, oldest first (called with the lock held)."""
        while self._waiting:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            job = self._waiting[0]
            lead = job.leader
            if lead is not None and lead.prefill_logits is None and lead.gen is not None and lead.finished is None \
                    and not lead.cancelled:
                return  # its leader is still reading the prompt: wait, then copy its cache
            self._waiting.popleft()
            slot = max(free, key=lambda s: (s.adapter == job.adapter, _common_prefix(s.engine.tokens, job.prompt_ids),
                                            -s.last_used))
            slot.job = job
            job.started = time.monotonic()
            self._guard(slot, self._begin, slot)

    def _begin(self, slot: Slot) -> None:
        job = slot.job
        if slot.adapter != job.adapter:
            if job.adapter not in self._adapter_inputs:
                self._adapter_inputs[job.adapter] = self.model.adapter_inputs(job.adapter)
            slot.engine.set_inputs(self._adapter_inputs[job.adapter])  # resets the cache
            slot.adapter = job.adapter
            bound = {s.adapter for s in self.slots} | {None}
            for name in [n for n in self._adapter_inputs if n not in bound]:
                del self._adapter_inputs[name]  # built again when asked for: memory stays with the bound ones
        matcher = self.model.matcher(job.constraint) if job.constraint is not None else None
        job.gen = Generation(self.model.tokenizer, job.prompt_ids, job.budget, job.params, job.stops, job.seed,
                             self.model.manifest.config.vocab_size, matcher=matcher, logprobs=job.logprobs,
                             index=job.index)
        spec = getattr(self.model, "speculation", None)
        if spec is not None and spec.kind != "off":
            from jishi.runtime.speculative import Speculator

            job.speculator = Speculator(spec, job.prompt_ids)
        if self._fork(slot, job):
            return
        start = slot.engine.reuse_prefix(job.prompt_ids)
        slot.todo = job.prompt_ids[start + self._borrow_prefix(slot, job.prompt_ids, start):]

    def _borrow_prefix(self, slot: Slot, ids: list[int], have: int) -> int:
        """Copy into ``slot`` the longest start of ``ids`` that another slot's cache holds (a system
        prompt every request shares, an earlier turn of the same chat), when it is at least
        SHARED_PREFIX tokens longer than what the slot holds: a copy of cache rows instead of a
        prefill. Returns how many tokens more the slot then holds."""
        best, source = have, None
        for other in self.slots:
            if other is slot or other.adapter != slot.adapter:
                continue
            n = min(_common_prefix(other.engine.tokens, ids), len(ids) - 1)
            if n > best:
                best, source = n, other
        if source is None or best - have < SHARED_PREFIX:
            return 0
        if self.batch is not None and source.engine.inputs is not slot.engine.inputs:
            return 0
        slot.engine.copy_prefix(source.engine, best)
        self.shared_tokens += best - have
        return best - have

    def _share_burst(self, active: list[Slot]) -> None:
        """New prompts that arrived together and start alike (the same system prompt): their common
        start is computed once, in one slot, and copied to the others; each then reads only its own
        rest. Several prompts of one run cannot each extend a cache (onnxruntime's attention takes
        one row when it reads several tokens after a cache), so this pays when the common start is
        long: the rests are read one run each, the start once instead of once per prompt."""
        groups: dict = {}
        for slot in active:
            if slot.todo and not slot.engine.tokens and slot.job is not None and slot.job.leader is None:
                groups.setdefault(slot.adapter, []).append(slot)
        for group in groups.values():
            if len(group) < 3:
                continue
            n = min(len(s.todo) for s in group) - 1
            first = group[0].todo
            for other in group[1:]:
                n = min(n, _common_prefix(first, other.todo))
            if n < SHARED_PREFIX:
                continue
            lead = group[0]
            self._guard(lead, lead.engine.feed, first[:n])
            if lead.job is None:  # the run failed: the error went to its job, the others prefill as usual
                continue
            self.steps += 1
            for slot in group:
                if slot is not lead:
                    slot.engine.copy_prefix(lead.engine, n)
                    self.shared_tokens += n
                slot.todo = slot.todo[n:]

    def _fork(self, slot: Slot, job: Job) -> bool:
        """Start a follower from its leader's prefill: copy the prompt's cache rows instead of
        computing them again. False (prefill as usual) when the leader's cache is gone."""
        lead = job.leader
        if lead is None or lead.prefill_logits is None:
            return False
        n = len(job.prompt_ids)
        src = next((s for s in self.slots if s.job is lead), None)
        if src is None or src is slot or src.adapter != slot.adapter or src.engine.tokens[:n] != job.prompt_ids:
            return False
        slot.engine.copy_prefix(src.engine, n)
        slot.todo = []
        slot.logits = lead.prefill_logits.copy()
        self.forks += 1
        return True

    def _prefill_together(self, active: list[Slot]) -> list[Slot]:
        """Batched: the new prompts of this round that fit in one chunk, read in one run per
        adapter group (a run reads the weights once however many rows it carries). The slots done."""
        if self.batch is None:
            return []
        groups: dict = {}
        for slot in active:
            if slot.todo and not slot.engine.tokens and len(slot.todo) <= PREFILL_CHUNK:
                groups.setdefault(id(slot.engine.inputs), []).append(slot)
        done = []
        for group in groups.values():
            if len(group) < 2:
                continue
            try:
                logits = self.batch.prefill_many([s.engine for s in group], [s.todo for s in group])
            except Exception as e:  # every job of the run gets the error; the server goes on
                for slot in group:
                    slot.engine.reset()
                    slot.adapter = _UNBOUND
                    self._release(slot, e)
                done += group
                continue
            self.steps += 1
            for k, slot in enumerate(group):
                slot.todo, slot.logits = [], logits[k]
                job = slot.job
                if job.index == 0 and job.leader is None and job.followers:
                    job.prefill_logits = slot.logits.copy()
            done += group
        return done

    def _prefill(self, slot: Slot) -> None:
        chunk, slot.todo = slot.todo[:PREFILL_CHUNK], slot.todo[PREFILL_CHUNK:]
        slot.logits = slot.engine.feed(chunk)
        self.steps += 1
        job = slot.job
        if not slot.todo and job.index == 0 and job.leader is None and job.followers:
            job.prefill_logits = slot.logits.copy()  # before sampling changes them

    def decode_round(self, slots: list[Slot]) -> None:
        """One token for each of these slots: sample from its logits, hand the text on, run the
        model on the token. Batched: sample all, then one run per adapter group. A slot alone,
        with nobody waiting, speculates instead (``_speculate``)."""
        if len(slots) == 1 and slots[0].job.speculator is not None and not self._waiting:
            self._guard(slots[0], self._speculate, slots[0])
            return
        if self.batch is None:
            for slot in slots:
                self._guard(slot, self._decode_one, slot)
            return
        groups: dict = {}
        for slot in slots:
            if slot.logits is not None:  # else its token was chosen by a speculative round
                self._guard(slot, self._sample, slot)
            if slot.job is not None:
                groups.setdefault(id(slot.engine.inputs), []).append(slot)
        # Every slot's logits are read: rows may move and runs overwrite them now.
        order = list(groups.values())
        self.batch.arrange([[s.engine for s in group] for group in order])  # each group: a contiguous range
        for group in order:
            group.sort(key=lambda s: s.engine.row)
            try:
                logits = self.batch.decode([s.engine for s in group], [s.job.gen.token for s in group])
            except Exception as e:  # every job of the run gets the error; the server goes on
                for slot in group:
                    slot.engine.reset()
                    slot.adapter = _UNBOUND
                    self._release(slot, e)
                continue
            self.steps += 1
            for k, slot in enumerate(group):
                slot.logits = logits[k]

    def _sample(self, slot: Slot) -> bool:
        """Pick the slot's next token and hand its text on; False when the answer is over."""
        job, gen = slot.job, slot.job.gen
        piece = gen.push(slot.logits)
        self.tokens_generated += 1
        if job.first_token is None:
            job.first_token = time.monotonic()
        if piece:
            job.sink("piece", piece)
        if gen.done:
            self._release(slot, gen)
            return False
        return True

    def _decode_one(self, slot: Slot) -> None:
        if slot.logits is None or self._sample(slot):  # no logits: a speculative round chose its token
            slot.logits = slot.engine.step(slot.job.gen.token)
            self.steps += 1

    def _speculate(self, slot: Slot) -> None:
        """One speculative round for a slot decoding alone: it leaves the slot with its next token
        chosen and not yet fed (``slot.logits`` None), which a plain round then feeds."""
        if slot.logits is not None and not self._sample(slot):
            return
        job, gen = slot.job, slot.job.gen
        before = gen.completion_tokens
        pieces = job.speculator.round(gen, slot.engine, self.model.context)
        slot.logits = None
        self.steps += 1
        self.tokens_generated += gen.completion_tokens - before
        for piece in pieces:
            if piece:
                job.sink("piece", piece)
        if gen.done:
            self._release(slot, gen)

    def _guard(self, slot: Slot, fn, *args) -> None:
        """Run one unit of a slot's work; an error ends that job alone."""
        try:
            fn(*args)
        except Exception as e:  # the job gets the error; the server goes on
            slot.engine.reset()
            slot.adapter = _UNBOUND  # bind again before the next job: the error may have been mid-bind
            self._release(slot, e)

    @property
    def last_finished(self) -> float:
        """When (time.monotonic) a slot last let a job go; 0.0 if none has run."""
        return max((s.last_used for s in self.slots), default=0.0)

    def _release(self, slot: Slot, outcome) -> None:
        job = slot.job
        slot.job, slot.todo, slot.logits = None, [], None
        slot.last_used = time.monotonic()
        if job is None:
            return
        job.finished = slot.last_used
        self._durations.append(job.finished - (job.started or job.arrived))
        if outcome is None:
            self._finish_cancelled(job)
        elif isinstance(outcome, Exception):
            job.sink("error", outcome)
        else:
            self.served += 1
            job.sink("done", outcome)

    def _finish_cancelled(self, job: Job) -> None:
        job.finished = job.finished or time.monotonic()
        job.sink("cancelled", job.gen)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
