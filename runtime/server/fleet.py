"""Several models behind one server: each loads on first use and unloads when idle.

`jishi serve A B ...` lists every model at once (their manifests are read at start, the
weights are not). A request names a model (``NAME``, ``NAME:latest`` or ``NAME:ADAPTER``);
the first request for it loads it and starts its own scheduler. A model idle for
``idle_unload`` seconds after its last answer (or for the ``keep_alive`` its last request gave,
as Ollama's requests do: 0 unloads it once the answer is done, a negative time never) is
unloaded by a reaper thread; before a load, when the estimated memory of those loaded plus the
new one passes ``budget``, the least recently used idle ones go too. A model is idle when its
scheduler has nothing running or queued. A server of one model (``Fleet.single``) loaded it at
start and keeps it.

The estimate per model: its weights twice (onnxruntime keeps a prepacked copy) plus its
slots' KV caches at full context (weights + slots × context × KV per token).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from jishi.errors import JishiError
from jishi.runtime.server.protocol import APIError

REAP_EVERY = 1.0  # seconds between the reaper's looks at idle models


def estimate_bytes(bundle, slots: int, context: int | None = None) -> int:
    c = bundle.manifest.config
    ctx = context or c.context_length
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
    return 2 * bundle.size + slots * ctx * per_token


@dataclass
class Entry:
    name: str
    bundle: object  # the runtime Bundle: manifest and size, read at start
    load: Callable[[], object]  # -> a loaded Model
    estimate: int
    server: object | None = None  # app.Server once loaded
    last_used: float = 0.0
    keep_alive: float | None = None  # seconds after the last answer, from a request; None: the fleet's idle_unload
    loads: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def adapters(self) -> list[str]:
        return [a["name"] for a in self.bundle.manifest.adapters]


class Fleet:
    def __init__(self, entries: list[Entry], config, idle_unload: float = 300.0, budget: int | None = None):
        if not entries:
            raise JishiError("a server needs at least one model")
        names = [e.name for e in entries]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise JishiError(f"two models are named {', '.join(twice)}: give one another name "
                             "(jishi build --name NAME) so that requests can tell them apart")
        self.entries = {e.name: e for e in entries}
        self.config = config
        self.idle_unload = idle_unload
        self.budget = budget
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None

    @classmethod
    def single(cls, server) -> "Fleet":
        """One model, already loaded (its scheduler is started by the app)."""
        m = server.model
        entry = Entry(m.name, m.bundle, lambda: m, 0, server=server, last_used=time.monotonic())
        fleet = cls([entry], server.config, idle_unload=float("inf"))
        fleet._preloaded = True
        return fleet

    @classmethod
    def from_paths(cls, paths, config, load: Callable[[str], object], idle_unload: float = 300.0,
                   budget: int | None = None, context: int | None = None) -> "Fleet":
        """Read each bundle's manifest now; ``load(path)`` loads one when it is first asked for."""
        from jishi.runtime.bundle import open_bundle
        from jishi.runtime.model import resolve_bundle

        entries = []
        for p in paths:
            path = resolve_bundle(p)
            bundle = open_bundle(path)
            entries.append(Entry(bundle.manifest.name, bundle, (lambda q=str(path): load(q)),
                                 estimate_bytes(bundle, config.max_concurrent, context)))
        return cls(entries, config, idle_unload, budget)

    # --- naming ------------------------------------------------------------------------

    @property
    def default(self) -> Entry:
        return next(iter(self.entries.values()))

    def ids(self) -> list[str]:
        """Every model id: each bundle and each of its adapters."""
        return [i for e in self.entries.values() for i in [e.name] + [f"{e.name}:{a}" for a in e.adapters]]

    def entry_for(self, model_id: str | None) -> Entry:
        if model_id is None:
            return self.default
        base = model_id.partition(":")[0]
        entry = self.entries.get(base)
        if entry is None:
            raise APIError(404, f"the model {model_id!r} does not exist here; GET /v1/models lists the models "
                           f"({', '.join(self.ids())})", param="model", code="model_not_found")
        return entry

    # --- loading -------------------------------------------------------------------------

    def loaded(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.server is not None]

    async def server_for(self, model_id: str | None):
        """The model's Server, loading it (in a worker thread) on first use."""
        entry = self.entry_for(model_id)
        if entry.server is None:
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(self._load, entry)
        entry.last_used = time.monotonic()
        return entry.server

    def keep(self, model_id: str | None, seconds: float | None) -> None:
        """A request's ``keep_alive``: how long its model stays loaded after its last answer (inf: always)."""
        if seconds is not None:
            self.entry_for(model_id).keep_alive = seconds

    def expires(self, entry: Entry) -> float:
        """When (time.monotonic) an idle loaded model is unloaded: its last answer plus its keep-alive."""
        keep = self.idle_unload if entry.keep_alive is None else entry.keep_alive
        last = max(entry.last_used, entry.server.scheduler.last_finished if entry.server is not None else 0.0)
        return last + keep

    def unload(self, model_id: str | None) -> bool:
        """Unload a model now if it is idle (Ollama's request with keep_alive 0 and no prompt). True if it went."""
        if getattr(self, "_preloaded", False):
            return False
        entry = self.entry_for(model_id)
        with self._lock:
            if entry.server is not None and self._idle(entry):
                self._unload(entry)
                return True
        return False

    def _reap(self) -> None:
        while not self._closed.wait(REAP_EVERY):
            try:
                self.unload_idle()
            except Exception:  # a reaper that dies would leave memory held: keep going
                pass

    def _load(self, entry: Entry) -> None:
        if self._reaper is None and not getattr(self, "_preloaded", False) and self.idle_unload != float("inf"):
            self._reaper = threading.Thread(target=self._reap, name="jishi-unload", daemon=True)
            self._reaper.start()
        with entry.lock:
            if entry.server is not None:
                return
            self.unload_idle(need=entry.estimate, keep=entry)
            from jishi.runtime.server.app import Server

            try:
                model = entry.load()
                server = Server(model, self.config)
            except JishiError as e:
                raise APIError(503, f"the model {entry.name} cannot be loaded: {e}", type="server_error",
                               param="model", code="model_unavailable") from None
            server.scheduler.start()
            entry.loads += 1
            entry.last_used = time.monotonic()
            entry.server = server

    @staticmethod
    def _idle(entry: Entry) -> bool:
        s = entry.server.scheduler.status()
        return s["active"] == 0 and s["queued"] == 0

    def unload_idle(self, need: int = 0, keep: Entry | None = None) -> list[str]:
        """Unload what has been idle too long, then (if ``need`` more bytes would pass the budget)
        the least recently used idle models. The names unloaded."""
        if getattr(self, "_preloaded", False):
            return []
        gone = []
        with self._lock:
            now = time.monotonic()
            for e in self.loaded():
                if e is not keep and now >= self.expires(e) and self._idle(e):
                    self._unload(e)
                    gone.append(e.name)
            if self.budget is not None:
                for e in sorted(self.loaded(), key=lambda e: e.last_used):
                    if sum(x.estimate for x in self.loaded()) + need <= self.budget:
                        break
                    if e is not keep and self._idle(e):
                        self._unload(e)
                        gone.append(e.name)
        return gone

    @staticmethod
    def _unload(entry: Entry) -> None:
        server, entry.server = entry.server, None
        server.scheduler.stop()

    def close(self) -> None:
        self._closed.set()
        for e in self.loaded():
            e.server.scheduler.stop()
