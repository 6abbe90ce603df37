"""Where each decoded token's time and each megabyte of memory go, for jishi bundles and, beside
them, onnxruntime-genai's int4 graph run the same way.

    python bench/token_profile.py BUNDLE [BUNDLE ...] [--genai DIR] [--repeats 3] [--tokens 128] [--threads 2]

Every measurement runs in a fresh process, one system after another, alternating, ``--repeats``
times; the tables are medians. In each process:

1. time: the chat prompt of bench/spine.py (about 100 tokens), then ``--tokens`` greedy steps,
   timing each step's wall time, the onnxruntime run inside it, the argmax, and the default
   sampler (temperature, top-k, top-p, repetition penalty) on the same logits; a 500-token
   prefill. Then a second session of the same graph with onnxruntime's profiler on runs the
   prefill and the decode again; its JSON trace is grouped by role (LM head, body MatMulNBits,
   the zero-point correction's side path, attention, norms, embedding, the MLP's activation,
   other ops, and the executor between nodes). The profiler adds microseconds to every node
   (3–7 inside it, 4–18 between nodes, against 0.3 for a trivial node unprofiled: a 600-node
   step traces about twice as long), so each child measures that on a chain of trivial nodes,
   takes it off every node, and applies each part's share to the unprofiled run time.
2. memory: the process's RSS from /proc/self/smaps after the imports, after loading, and after
   the prompt and its answer, split into the mapped weights file, onnxruntime's library, other
   libraries, and heap/anonymous memory; the KV cache's resident pages; onnxruntime's allocator
   figures from the trace. A second process per system loads the graph with prepacking off
   (session.disable_prepacking=1) to size the prepacked copies, and the tokenizer alone.

onnxruntime-genai's graph (``--genai``, default bench/work/genai-int4 when it exists; bench/spine.py
builds it) is run by a plain onnxruntime loop with the same session options and IO binding
(its KV buffers bound as both past and present), not by onnxruntime-genai's own loop, so the
two graphs are compared and not the two Python loops. The load average and other processes'
CPU time are recorded with every run; runs where others used more than ``--max-others`` CPUs
on average are left out of the medians (and counted). Writes bench/results/profile-<date>.json.

    python bench/token_profile.py BUNDLE [BUNDLE ...] --ab '{}' '{"spinning": true}' [--repeats 5]

is the A/B mode: no profiler and no load-only processes, only time and memory, every bundle (and
the genai graph) under each change of jishi's runtime settings (the fields of
runtime.settings.RuntimeSettings, over what this machine's device profile gives), all alternating;
it writes bench/results/profile-ab-<date>.json. The step time's fastest tenth (p10) and the
process's CPU time per step are printed beside the medians: on a shared machine they move less.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"

ROLES = ("lm_head", "body_matmulnbits", "zp_side_path", "attention", "norms", "embedding", "mlp_activation",
         "other_ops", "executor")
ROLE_NAMES = {
    "lm_head": "LM head", "body_matmulnbits": "body MatMulNBits", "zp_side_path": "zero-point side path (MatMul+Gemm)",
    "attention": "attention (GroupQueryAttention)", "norms": "norms", "embedding": "embedding gather",
    "mlp_activation": "MLP activation (Split, SiLU, Mul)", "other_ops": "other ops (Reshape, Shape, Gather…)",
    "executor": "executor between nodes (estimate)",
}


# --- memory --------------------------------------------------------------------------------------

def smaps() -> list[tuple[int, int, str, int]]:
    """(start, end, path or [kind], Rss bytes) of every mapping of this process."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
            if head:
                cur = [int(head.group(1), 16), int(head.group(2), 16), head.group(3).strip() or "[anon]", 0]
                out.append(cur)
            elif line.startswith("Rss:") and cur is not None:
                cur[3] = int(line.split()[1]) * 1024
    return [tuple(m) for m in out]


def rss_breakdown(maps, data_files=()) -> dict:
    """MB by kind of mapping."""
    data_files = {str(Path(p).resolve()) for p in data_files}
    kinds = Counter()
    for start, end, path, rss in maps:
        if path in data_files:
            kinds["weights_file_mapped"] += rss
        elif "onnxruntime" in path and ".so" in path:
            kinds["onnxruntime_library"] += rss
        elif path.startswith("/"):
            kinds["other_files_and_libraries"] += rss
        else:
            kinds["heap_and_anonymous"] += rss
    out = {k: round(v / 2**20, 1) for k, v in kinds.items()}
    out["total"] = round(sum(m[3] for m in maps) / 2**20, 1)
    return out


def resident_mb(address: int, nbytes: int) -> float:
    """Resident MB of one buffer (mincore on its pages; Linux)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    start = address - address % page
    pages = -(-(address + nbytes - start) // page)
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vec) != 0:
        return float("nan")
    return round(sum(b & 1 for b in vec) * page / 2**20, 1)


def vm_hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


# --- the trace -----------------------------------------------------------------------------------

def role_of(name: str, op: str) -> str:
    if "lm_head" in name:
        return "lm_head"
    if name.endswith("/side_a") or name.endswith("/side_b"):
        return "zp_side_path"
    if op == "MatMulNBits":
        return "body_matmulnbits"
    if op == "GroupQueryAttention":
        return "attention"
    if op.endswith("LayerNormalization"):
        return "norms"
    if op in ("GatherBlockQuantized",) or name.startswith("embed") or "embed_tokens" in name:
        return "embedding"
    if "/mlp/" in name and op in ("Split", "Sigmoid", "Mul", "QuickGelu", "FastGelu"):
        return "mlp_activation"
    return "other_ops"


def parse_trace(path: str, node_overhead_us: float = 0.0) -> list[dict]:
    """Per run of the session: µs by role (as traced, and less ``node_overhead_us`` per node: what the
    profiler adds inside each node's time), nodes by role, the run's own time, allocator figures."""
    events = json.load(open(path))
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    starts = [r["ts"] for r in runs]
    per = [Counter() for _ in runs]
    corrected = [Counter() for _ in runs]
    role_nodes = [Counter() for _ in runs]
    count = [0] * len(runs)
    first = [None] * len(runs)
    by_node = [defaultdict(int) for _ in runs]
    for e in events:
        if e.get("cat") != "Node":
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0:
            continue
        name = e["name"].removesuffix("_kernel_time")
        role = role_of(name, e["args"].get("op_name", ""))
        per[i][role] += e["dur"]
        corrected[i][role] += max(0.0, e["dur"] - node_overhead_us)
        role_nodes[i][role] += 1
        count[i] += 1
        by_node[i][re.sub(r"layers?\.?(\d+)", "layer*", name)] += e["dur"]
        if first[i] is None or e["ts"] < first[i]["ts"]:
            first[i] = e
    out = []
    for r, p, q, rn, c, f, nodes in zip(runs, per, corrected, role_nodes, count, first, by_node):
        p["executor"] = max(0, r["dur"] - sum(p.values()))  # between nodes: the executor, and the profiler itself
        args = f["args"] if f else {}
        out.append({"run_us": r["dur"], "roles_us": dict(p), "corrected_us": dict(q), "role_nodes": dict(rn),
                    "nodes": c, "by_node_us": dict(nodes),
                    "arena_held_mb": round(int(args.get("mem_arena_held", 0)) / 2**20, 1),
                    "allocator_in_use_mb": round(int(args.get("mem_bytes_in_use", 0)) / 2**20, 1)})
    return out


def profiler_overhead(settings, nodes: int = 600) -> dict:
    """What onnxruntime's profiler adds per node, with these session settings: a chain of ``nodes``
    Add nodes on one 576-wide row (about 0.3 µs each unprofiled) is run without and with it."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph_nodes, x = [], "x"
    for i in range(nodes):
        graph_nodes.append(helper.make_node("Add", [x, x], [f"y{i}"], name=f"add{i}"))
        x = f"y{i}"
    g = helper.make_graph(graph_nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 576])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    feed = {"x": np.ones((1, 576), np.float32)}
    plain = ort.InferenceSession(model.SerializeToString(), settings.session_options(), providers=["CPUExecutionProvider"])
    times = []
    for _ in range(200):
        t = time.perf_counter()
        plain.run(None, feed)
        times.append(time.perf_counter() - t)
    so = settings.session_options()
    so.enable_profiling = True
    so.profile_file_prefix = str(WORK / f"chain-{os.getpid()}")
    profiled = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(50):
        profiled.run(None, feed)
    trace = profiled.end_profiling()
    events = json.load(open(trace))
    os.remove(trace)
    node = statistics.median(e["dur"] for e in events if e.get("cat") == "Node")
    run = statistics.median(e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    unprofiled = float(np.percentile(times, 10)) * 1e6 / nodes
    return {"unprofiled_node_us": round(unprofiled, 3), "in_node_us": round(node - unprofiled, 3),
            "between_nodes_us": round((run - node * nodes) / nodes, 3)}


# --- the two kinds of engine ---------------------------------------------------------------------

class TimedSession:
    """A session whose run_with_iobinding time is recorded (what the engine's step spends in onnxruntime)."""

    def __init__(self, session):
        self._s = session
        self.last = 0.0

    def run_with_iobinding(self, io, *a):
        t = time.perf_counter()
        self._s.run_with_iobinding(io, *a)
        self.last = time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self._s, name)


class GenaiEngine:
    """onnxruntime-genai's decoder graph driven like jishi's engine: fixed KV buffers bound as past
    and present (its GroupQueryAttention shares them), fixed decode-step inputs, the logits of
    the last position."""

    def __init__(self, session, layers: int, kv_heads: int, head_dim: int, vocab: int, step: int):
        import numpy as np
        import onnxruntime as ort

        self.session, self.tokens, self.vocab, self.layers, self.step_size = session, [], vocab, layers, step
        self._kv = np.zeros((2 * layers, 1, kv_heads, 0, head_dim), np.float32)
        self._io = session.io_binding()
        self._ids = np.zeros((1, 1), np.int64)
        self._logits = np.zeros((1, 1, vocab), np.float32)
        self._ids_value = ort.OrtValue.ortvalue_from_numpy(self._ids)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits)
        self._reserve(step)

    @property
    def kv_bytes(self) -> int:
        return self._kv.nbytes

    def _reserve(self, needed: int):
        """Grow the cache in whole steps, as jishi's engine does (its buffers only become resident where written)."""
        import numpy as np
        import onnxruntime as ort

        if needed <= self._kv.shape[3]:
            return
        size = -(-needed // self.step_size) * self.step_size
        kv = np.zeros(self._kv.shape[:3] + (size, self._kv.shape[4]), np.float32)
        kept = len(self.tokens)
        kv[:, :, :, :kept] = self._kv[:, :, :, :kept]
        self._kv, self._values = kv, [ort.OrtValue.ortvalue_from_numpy(kv[i]) for i in range(kv.shape[0])]
        self._mask = np.ones((1, size), np.int64)
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                self._io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", self._values[2 * i + j])
                self._io.bind_ortvalue_output(f"present.{i}.{kind}", self._values[2 * i + j])

    def reset(self):
        self.tokens = []

    def _bind_mask(self, total: int):
        import onnxruntime as ort

        self._mask_value = ort.OrtValue.ortvalue_from_numpy(self._mask[:, :total])
        self._io.bind_ortvalue_input("attention_mask", self._mask_value)

    def feed(self, ids):
        import numpy as np

        total = len(self.tokens) + len(ids)
        self._reserve(total)
        self._io.bind_cpu_input("input_ids", np.asarray([ids], np.int64))
        self._bind_mask(total)
        import onnxruntime as ort

        logits = np.empty((1, len(ids), self.vocab), np.float32)  # the graph returns every position's logits
        self._io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(self._io)
        self.tokens.extend(ids)
        return logits[0, -1].copy()

    def step(self, token: int):
        self._reserve(len(self.tokens) + 1)
        self._ids[0, 0] = token
        self._io.bind_ortvalue_input("input_ids", self._ids_value)
        self._bind_mask(len(self.tokens) + 1)
        self._io.bind_ortvalue_output("logits", self._logits_value)
        self.session.run_with_iobinding(self._io)
        self.tokens.append(token)
        return self._logits[0, 0]


def open_system(kind: str, path: str, threads: int, settings_changes: dict | None = None, profile_prefix: str | None = None,
                tokenizer: bool = True):
    """(engine, vocab, data files, tokenizer-or-None, model-or-None) for a jishi bundle or a genai directory."""
    from dataclasses import replace

    from jishi.runtime.settings import for_this_machine

    # what jishi runs with on this machine (its device profile), then the changes asked for
    settings = replace(for_this_machine(threads), **(settings_changes or {}))
    if kind == "jishi":
        import jishi.runtime.model as model_mod
        from jishi.runtime import settings as settings_mod

        chosen = _with_profiling(settings, profile_prefix)
        settings_mod.for_this_machine = lambda threads=None: chosen  # Model asks for it when it loads
        m = model_mod.load(path, threads=threads, force=True)
        cfg = m.manifest.config
        return m.engine, cfg.vocab_size, [m.bundle.path(m.manifest.graph.data_file)], m.tokenizer, m
    import onnxruntime as ort

    cfg = json.load(open(Path(path) / "genai_config.json"))["model"]
    dec = cfg["decoder"]
    tok = None
    if tokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    session = ort.InferenceSession(str(Path(path) / dec["filename"]), _with_profiling(settings, profile_prefix).session_options(),
                                   providers=["CPUExecutionProvider"])
    from jishi.runtime.engine import KV_STEP

    engine = GenaiEngine(session, dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"], cfg["vocab_size"],
                         step=KV_STEP)
    return engine, cfg["vocab_size"], [Path(path) / (dec["filename"] + ".data")], tok, None


def _with_profiling(settings, prefix):
    if prefix is None:
        return settings

    class Profiled(type(settings)):
        def session_options(self):
            so = super().session_options()
            so.enable_profiling = True
            so.profile_file_prefix = prefix
            return so

    from dataclasses import asdict

    return Profiled(**asdict(settings))


# --- one process ---------------------------------------------------------------------------------

def child_run(kind: str, path: str, prompts: dict, threads: int, tokens: int, settings_changes: dict,
              profiled: bool = True) -> dict:
    start_maps = smaps()
    import numpy as np
    import onnxruntime  # noqa: F401
    import tokenizers  # noqa: F401

    import jishi.runtime.model  # noqa: F401
    from jishi.runtime.sampling import SamplingParams, SeenTokens, sample

    stages = {"start": rss_breakdown(start_maps)}
    stages["imports"] = rss_breakdown(smaps())
    from dataclasses import replace

    from jishi.runtime.settings import for_this_machine

    run_settings = replace(for_this_machine(threads), **settings_changes)  # before open_system stands in for it
    t = time.perf_counter()
    engine, vocab, data_files, _, model = open_system(kind, path, threads, settings_changes)
    load_s = time.perf_counter() - t
    stages["loaded"] = rss_breakdown(smaps(), data_files)

    timed = TimedSession(engine.session)
    engine.session = timed
    chat = prompts["chat"]
    params = SamplingParams()  # jishi's default sampler
    rng = np.random.default_rng(0)

    def answer(n):
        engine.reset()
        t0 = time.perf_counter()
        logits = engine.feed(chat)
        ttft = time.perf_counter() - t0
        token = int(np.argmax(logits))
        seen = SeenTokens(vocab, chat)
        rows = []
        cpu = 0.0
        for _ in range(n - 1):
            c1, t1 = time.process_time(), time.perf_counter()
            logits = engine.step(token)
            t2, c2 = time.perf_counter(), time.process_time()
            cpu += c2 - c1
            run = timed.last
            token = int(np.argmax(logits))
            t3 = time.perf_counter()
            work = logits.copy()
            t4 = time.perf_counter()
            sample(work, params, rng, seen.array)
            t5 = time.perf_counter()
            seen.add(token)
            rows.append((t2 - t1, run, t3 - t2, t5 - t4))
        return ttft, rows, cpu / (n - 1)

    answer(16)  # warm up
    ttft, rows, cpu = answer(tokens)

    stages["answered"] = rss_breakdown(smaps(), data_files)
    kv = engine._kv  # the cache's resident pages (part of heap_and_anonymous)
    stages["answered"]["kv_cache_resident"] = resident_mb(int(kv.ctypes.data), kv.nbytes)
    peak = vm_hwm_mb()

    def prefill():
        engine.reset()
        t0 = time.perf_counter()
        engine.feed(prompts["prefill"])
        return time.perf_counter() - t0

    prefill()
    prefill_s = min(prefill() for _ in range(2))

    med = {k: statistics.median(r[i] for r in rows) * 1e3 for i, k in enumerate(("step_ms", "run_ms", "argmax_ms", "sampler_ms"))}
    timing = {
        "decode_tok_s": round(len(rows) / sum(r[0] + r[2] for r in rows), 1),
        "step_ms": round(med["step_ms"], 3), "session_run_ms": round(med["run_ms"], 3),
        # the fastest tenth of the steps: less sensitive to other processes than the median on a shared machine
        "step_p10_ms": round(float(np.percentile([r[0] for r in rows], 10)) * 1e3, 3),
        "engine_python_ms": round(statistics.median((r[0] - r[1]) * 1e3 for r in rows), 3),
        "argmax_ms": round(med["argmax_ms"], 4), "default_sampler_ms": round(med["sampler_ms"], 4),
        "cpu_ms_per_token": round(cpu * 1e3, 3),  # this process's CPU time (all its threads) during the steps
        "ttft_ms": round(ttft * 1e3, 1), "prefill_tok_s": round(len(prompts["prefill"]) / prefill_s, 1),
        "prefill_run_ms": round(prefill_s * 1e3, 1),
    }

    from dataclasses import asdict

    result = {"kind": kind, "path": path, "load_s": round(load_s, 3), "timing": timing,
              "settings": {k: v for k, v in asdict(run_settings).items() if k != "why"},
              "memory": {"stages": stages, "peak_rss_mb": peak, "kv_allocated_mb": round(engine.kv_bytes / 2**20, 1)}}
    if not profiled:
        return result
    # The profiled session: a second one on the same graph (after the memory figures above).
    prefix = str(WORK / f"trace-{os.getpid()}")
    pengine, *_ = open_system(kind, path, threads, settings_changes, profile_prefix=prefix, tokenizer=False)
    pengine.reset()
    pengine.feed(prompts["prefill"])
    pengine.reset()
    logits = pengine.feed(chat)
    token = int(np.argmax(logits))
    for _ in range(tokens - 1):
        token = int(np.argmax(pengine.step(token)))
    trace_file = pengine.session.end_profiling()
    overhead = profiler_overhead(run_settings)
    runs = parse_trace(trace_file, overhead["in_node_us"])
    os.remove(trace_file)
    prefill_run, decode_runs = runs[0], runs[2:]
    roles = {r: round(statistics.median(d["roles_us"].get(r, 0) for d in decode_runs) / 1e3, 4) for r in ROLES}
    # Each part's share of the traced node time, less the profiler's own time inside each node, applied to
    # the unprofiled run (the profiled pass ran at another moment: only its shares are comparable); the
    # executor's share is estimated as a trivial node's whole unprofiled cost times the nodes.
    traced = {r: statistics.median(d["corrected_us"].get(r, 0) for d in decode_runs) for r in ROLES[:-1]}
    nodes_per_run = statistics.median(d["nodes"] for d in decode_runs)
    executor = min(timing["session_run_ms"], overhead["unprofiled_node_us"] * nodes_per_run / 1e3)
    total = sum(traced.values()) or 1.0
    fixed = {r: round(v / total * (timing["session_run_ms"] - executor), 4) for r, v in traced.items()}
    fixed["executor"] = round(executor, 4)
    role_nodes = {r: statistics.median(d["role_nodes"].get(r, 0) for d in decode_runs) for r in ROLES[:-1]}
    nodes = defaultdict(list)
    for d in decode_runs:
        for n, us in d["by_node_us"].items():
            nodes[n].append(us)
    top = sorted(((n, statistics.median(v) / 1e3) for n, v in nodes.items()), key=lambda kv: -kv[1])[:25]
    result["profile"] = {
            "profiler_overhead": overhead, "decode_roles_corrected_ms": fixed, "decode_role_nodes": role_nodes,
            "decode_roles_ms": roles,
            "decode_run_ms": round(statistics.median(d["run_us"] for d in decode_runs) / 1e3, 3),
            "decode_nodes": statistics.median(d["nodes"] for d in decode_runs),
            "prefill_roles_ms": {r: round(prefill_run["roles_us"].get(r, 0) / 1e3, 2) for r in ROLES},
            "prefill_run_ms": round(prefill_run["run_us"] / 1e3, 1), "prefill_tokens": len(prompts["prefill"]),
            "top_nodes_ms": [(n, round(v, 4)) for n, v in top],
            "allocator_in_use_mb": decode_runs[-1]["allocator_in_use_mb"], "arena_held_mb": decode_runs[-1]["arena_held_mb"],
    }
    return result


def child_load(kind: str, path: str, prompts: dict, threads: int, prepacking: bool) -> dict:
    """RSS after the imports, after the tokenizer alone, and after the session (prepacking on or off)
    has run an 8-token prompt (a session without prepacking reads its weights only when it runs)."""
    import numpy as np  # noqa: F401
    import onnxruntime as ort  # noqa: F401
    import tokenizers

    import jishi.runtime.model  # noqa: F401

    out = {"imports": rss_breakdown(smaps())}
    tok_file = Path(path) / "tokenizer.json"
    t = tokenizers.Tokenizer.from_file(str(tok_file))
    out["tokenizer"] = rss_breakdown(smaps())
    del t
    engine, _, data_files, _, _ = open_system(kind, path, threads, {"prepacking": prepacking}, tokenizer=False)
    engine.feed(prompts["chat"][:8])
    out["session"] = rss_breakdown(smaps(), data_files)
    return out


def child_paired(systems: list[tuple[str, str]], prompts: dict, threads: int, tokens: int, rounds: int,
                 settings_changes: dict) -> dict:
    """Every system loaded in this one process, then ``rounds`` rounds in which each in turn (the order
    rotating) answers the chat prompt with ``tokens`` greedy steps: other processes slow every system
    of a round alike, so the ratios of a round to its first system are steadier than separate runs."""
    import numpy as np

    engines = []
    for kind, path in systems:
        engine, *_ = open_system(kind, path, threads, settings_changes, tokenizer=False)
        engines.append(engine)
    steps = [[] for _ in engines]
    cpu = [0.0 for _ in engines]
    per_round = []
    for r in range(rounds):
        order = list(range(len(engines)))
        order = order[r % len(order):] + order[:r % len(order)]
        medians = {}
        for i in order:
            e = engines[i]
            e.reset()
            token = int(np.argmax(e.feed(prompts["chat"])))
            times = []
            for _ in range(tokens - 1):
                c, t = time.process_time(), time.perf_counter()
                logits = e.step(token)
                times.append(time.perf_counter() - t)
                cpu[i] += time.process_time() - c
                token = int(np.argmax(logits))
            steps[i] += times
            medians[i] = statistics.median(times)
        per_round.append([medians[i] for i in range(len(engines))])
    out = []
    for i, (kind, path) in enumerate(systems):
        ratios = [row[i] / row[0] for row in per_round]
        out.append({"kind": kind, "path": path, "step_ms": round(statistics.median(steps[i]) * 1e3, 3),
                    "step_p10_ms": round(float(np.percentile(steps[i], 10)) * 1e3, 3),
                    "step_vs_first": round(statistics.median(ratios), 4),
                    "cpu_ms_per_step": round(cpu[i] / len(steps[i]) * 1e3, 3),
                    "step_vs_first_range": [round(min(ratios), 4), round(max(ratios), 4)]})
    return {"systems": out, "rounds": [[round(v * 1e3, 3) for v in row] for row in per_round]}


# --- the parent ----------------------------------------------------------------------------------

def busy_cpu_seconds() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return sum(int(x) for x in fields[:3]) / os.sysconf("SC_CLK_TCK")


def run_child(args: list[str]) -> dict:
    import resource

    load_before = Path("/proc/loadavg").read_text().split()[0]
    before = busy_cpu_seconds()
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_s = (after.ru_utime + after.ru_stime) - (own.ru_utime + own.ru_stime)
    res = json.loads(done.stdout.strip().splitlines()[-1])
    res["others_cpus"] = round(max(0.0, busy_cpu_seconds() - before - own_s) / wall, 2)
    res["loadavg_before"] = float(load_before)
    return res


def median_of(rows: list[dict], path: tuple) -> float:
    vals = []
    for r in rows:
        v = r
        for p in path:
            v = v[p]
        vals.append(v)
    return round(statistics.median(vals), 4)


def summarize(name: str, runs: list[dict], loads: dict) -> dict:
    t = {k: median_of(runs, ("timing", k)) for k in runs[0]["timing"]}
    roles = {r: median_of(runs, ("profile", "decode_roles_ms", r)) for r in ROLES}
    corrected = {r: median_of(runs, ("profile", "decode_roles_corrected_ms", r)) for r in ROLES}
    role_nodes = {r: median_of(runs, ("profile", "decode_role_nodes", r)) for r in ROLES[:-1]}
    overhead = {k: median_of(runs, ("profile", "profiler_overhead", k)) for k in runs[0]["profile"]["profiler_overhead"]}
    prefill_roles = {r: median_of(runs, ("profile", "prefill_roles_ms", r)) for r in ROLES}
    stages = {s: {k: median_of(runs, ("memory", "stages", s, k)) for k in runs[0]["memory"]["stages"][s]}
              for s in runs[0]["memory"]["stages"]}
    mem = {"stages": stages, "peak_rss_mb": median_of(runs, ("memory", "peak_rss_mb")),
           "kv_allocated_mb": runs[0]["memory"]["kv_allocated_mb"],
           "allocator_in_use_mb": median_of(runs, ("profile", "allocator_in_use_mb")),
           "arena_held_mb": median_of(runs, ("profile", "arena_held_mb"))}
    on, off = loads.get(True), loads.get(False)
    if on and off:
        imp, tok = on["imports"]["total"], on["tokenizer"]["total"]
        mem["load_only"] = {
            "imports_mb": imp, "tokenizer_mb": round(tok - imp, 1),
            "session_prepacked_mb": round(on["session"]["total"] - tok, 1),
            "session_not_prepacked_mb": round(off["session"]["total"] - off["tokenizer"]["total"], 1),
            "prepacked_heap_mb": round(on["session"].get("heap_and_anonymous", 0) - off["session"].get("heap_and_anonymous", 0), 1),
            "weights_file_mapped_prepacked_mb": on["session"].get("weights_file_mapped", 0),
            "weights_file_mapped_not_prepacked_mb": off["session"].get("weights_file_mapped", 0),
        }
    return {"name": name, "runs_kept": len(runs), "timing": t, "decode_roles_ms": roles,
            "decode_roles_corrected_ms": corrected, "decode_role_nodes": role_nodes, "profiler_overhead": overhead,
            "decode_run_profiled_ms": median_of(runs, ("profile", "decode_run_ms")),
            "decode_nodes": median_of(runs, ("profile", "decode_nodes")),
            "prefill_roles_ms": prefill_roles, "prefill_run_profiled_ms": median_of(runs, ("profile", "prefill_run_ms")),
            "memory": mem, "top_nodes_ms": runs[len(runs) // 2]["profile"]["top_nodes_ms"]}


def tables(summaries: list[dict]) -> str:
    names = [s["name"] for s in summaries]
    lines = ["Per decoded token: each part's share of the traced node time (less the profiler's own time per node, "
             "measured on a chain of trivial nodes) applied to the unprofiled onnxruntime run; the executor's part is a "
             "trivial node's unprofiled cost times the nodes", "",
             "| part | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in ROLES:
        cells = []
        for s in summaries:
            v, total = s["decode_roles_corrected_ms"][r], s["timing"]["session_run_ms"]
            nodes = f", {s['decode_role_nodes'][r]:.0f} nodes" if r != "executor" else ""
            cells.append(f"{v:.2f} ms ({100 * v / total:.0f}%{nodes})" if total else "–")
        lines.append(f"| {ROLE_NAMES[r]} | " + " | ".join(cells) + " |")
    lines.append("| onnxruntime run, unprofiled | " + " | ".join(f"{s['timing']['session_run_ms']:.2f} ms" for s in summaries) + " |")
    lines.append("| profiled run (as traced) | " + " | ".join(f"{s['decode_run_profiled_ms']:.2f} ms, {s['decode_nodes']:.0f} nodes"
                                                               for s in summaries) + " |")
    lines.append("| profiler's own time per node (in it / between) | " + " | ".join(
        f"{s['profiler_overhead']['in_node_us']:.1f} / {s['profiler_overhead']['between_nodes_us']:.1f} µs" for s in summaries) + " |")
    lines += ["", "Unprofiled, per decoded token", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in (("session_run_ms", "onnxruntime run"), ("engine_python_ms", "engine's Python around the run"),
                       ("argmax_ms", "argmax (greedy)"), ("default_sampler_ms", "default sampler instead (top-k/top-p)"),
                       ("step_ms", "step wall time"), ("decode_tok_s", "decode tok/s (greedy)"),
                       ("prefill_tok_s", "prefill tok/s (500 tokens)"), ("ttft_ms", "time to first token ms (~100 tokens)")):
        lines.append(f"| {label} | " + " | ".join(f"{s['timing'][key]:.3f}" if key.endswith("_ms") and key != "ttft_ms"
                                                  else f"{s['timing'][key]:.1f}" for s in summaries) + " |")
    lines += ["", "Prefill, 500 tokens (profiled)", "", "| part | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in ROLES:
        cells = [f"{s['prefill_roles_ms'][r]:.1f} ms ({100 * s['prefill_roles_ms'][r] / s['prefill_run_profiled_ms']:.0f}%)"
                 for s in summaries]
        lines.append(f"| {ROLE_NAMES[r]} | " + " | ".join(cells) + " |")
    lines += ["", "Memory, MB (RSS from /proc/self/smaps)", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows = [("after imports (Python, numpy, onnxruntime, tokenizers, jishi)", lambda m: m["stages"]["imports"]["total"]),
            ("after load", lambda m: m["stages"]["loaded"]["total"]),
            ("after the prompt and the answer", lambda m: m["stages"]["answered"]["total"]),
            ("peak (VmHWM)", lambda m: m["peak_rss_mb"]),
            ("… weights file, mapped", lambda m: m["stages"]["answered"].get("weights_file_mapped", 0)),
            ("… heap and anonymous", lambda m: m["stages"]["answered"].get("heap_and_anonymous", 0)),
            ("…… of which the KV cache (resident)", lambda m: m["stages"]["answered"].get("kv_cache_resident", 0)),
            ("… onnxruntime's library", lambda m: m["stages"]["answered"].get("onnxruntime_library", 0)),
            ("… other libraries and files", lambda m: m["stages"]["answered"].get("other_files_and_libraries", 0)),
            ("onnxruntime allocator in use (trace)", lambda m: m["allocator_in_use_mb"]),
            ("onnxruntime arena held (trace)", lambda m: m["arena_held_mb"]),
            ("tokenizer alone", lambda m: m.get("load_only", {}).get("tokenizer_mb", float("nan"))),
            ("session, prepacking on", lambda m: m.get("load_only", {}).get("session_prepacked_mb", float("nan"))),
            ("session, prepacking off", lambda m: m.get("load_only", {}).get("session_not_prepacked_mb", float("nan"))),
            ("prepacked copies (heap, on − off)", lambda m: m.get("load_only", {}).get("prepacked_heap_mb", float("nan"))),
            ("weights file mapped after load, prepacking on / off",
             lambda m: f"{m.get('load_only', {}).get('weights_file_mapped_prepacked_mb', 0):.1f} / "
                       f"{m.get('load_only', {}).get('weights_file_mapped_not_prepacked_mb', 0):.1f}")]
    for label, f in rows:
        lines.append(f"| {label} | " + " | ".join(v if isinstance(v := f(s["memory"]), str) else f"{v:.1f}" for s in summaries) + " |")
    return "\n".join(lines)


def ab_table(runs: dict[str, list[dict]], noisy: dict[str, int]) -> tuple[str, dict]:
    """Medians of the kept runs of each system, and ratios to the first."""
    summary = {}
    for name, rs in runs.items():
        kept = [x for x in rs if x["kept"]]
        if not kept:
            summary[name] = {"runs_kept": 0, "noisy_runs_left_out": noisy[name]}
            continue
        summary[name] = {k: median_of(kept, ("timing", k)) for k in kept[0]["timing"]}
        summary[name].update(answered_rss_mb=median_of(kept, ("memory", "stages", "answered", "total")),
                             peak_rss_mb=median_of(kept, ("memory", "peak_rss_mb")),
                             load_s=median_of(kept, ("load_s",)), runs_kept=len(kept), noisy_runs_left_out=noisy[name])
    first = next((v for v in summary.values() if v.get("runs_kept")), None)
    lines = ["| system | decode tok/s | ÷ first | onnxruntime run ms | step ms | step p10 ms | CPU ms/token | prefill tok/s | "
             "RSS after answer MB | peak RSS MB | load s | runs kept |", "|---|" + "---|" * 11]
    for name, v in summary.items():
        if not v.get("runs_kept"):
            lines.append(f"| {name} | all runs noisy | | | | | | | | | | 0 |")
            continue
        v["decode_vs_first"] = round(v["decode_tok_s"] / first["decode_tok_s"], 3)
        lines.append(f"| {name} | {v['decode_tok_s']:.1f} | {v['decode_vs_first']:.3f} | {v['session_run_ms']:.2f} | "
                     f"{v['step_ms']:.2f} | {v['step_p10_ms']:.2f} | {v['cpu_ms_per_token']:.2f} | {v['prefill_tok_s']:.0f} | {v['answered_rss_mb']:.0f} | {v['peak_rss_mb']:.0f} | "
                     f"{v['load_s']:.2f} | {v['runs_kept']} |")
    return "\n".join(lines), summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*")
    ap.add_argument("--genai", default=str(WORK / "genai-int4"), help="onnxruntime-genai's model directory ('' for none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-others", type=float, default=0.5, help="leave out runs where other processes used more CPUs than this")
    ap.add_argument("--settings", default="{}", help="JSON of RuntimeSettings fields to change for every run")
    ap.add_argument("--ab", nargs="*", metavar="JSON",
                    help="A/B mode: no profiler, only timing and RSS; every bundle runs under each of these RuntimeSettings "
                         "changes (JSON, default just '{}'), all alternating")
    ap.add_argument("--paired", type=int, metavar="ROUNDS",
                    help="paired mode: every bundle (and the genai graph) in one process, ROUNDS rounds of one answer each, "
                         "order rotating; step time ratios to the first bundle, per round")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child and args.child[0] == "paired":
        prompts = json.load(open(args.child[1]))
        pairs = [tuple(x.split("=", 1)) for x in args.child[2:]]
        print(json.dumps(child_paired(pairs, prompts, args.threads, args.tokens, args.paired, json.loads(args.settings))))
        return
    if args.child:
        changes = json.loads(args.settings)
        mode, kind, path = args.child[:3]
        prompts = json.load(open(args.child[3]))
        if mode in ("run", "time"):
            out = child_run(kind, path, prompts, args.threads, args.tokens, changes, profiled=mode == "run")
        else:
            out = child_load(kind, path, prompts, args.threads, mode == "load-prepacked")
        print(json.dumps(out))
        return

    variants = [json.loads(v) for v in (args.ab or ["{}"])] if args.ab is not None else [json.loads(args.settings)]
    systems = {}
    for b in args.bundles:
        for v in variants:
            label = Path(b).name + (f" {json.dumps(v)}" if v else "")
            systems[label] = ("jishi", str(Path(b).resolve()), v)
    if args.genai and (Path(args.genai) / "genai_config.json").exists():
        for v in variants:
            systems["onnxruntime-genai int4 graph" + (f" {json.dumps(v)}" if v else "")] = ("genai", str(Path(args.genai).resolve()), v)
    if not systems:
        ap.error("give at least one bundle (or --genai DIR)")
    sys.path.insert(0, str(ROOT / "bench"))
    from spine import prompts as spine_prompts

    from jishi.runtime.bundle import open_bundle
    from jishi.runtime.tokenizer import Tokenizer

    WORK.mkdir(parents=True, exist_ok=True)
    first_jishi = next((p for k, p, _ in systems.values() if k == "jishi"), None)
    if first_jishi is None:
        ap.error("give at least one jishi bundle: its tokenizer writes the prompts every system gets")
    bundle = open_bundle(first_jishi)
    prompt_file = WORK / "profile-prompts.json"
    prompt_file.write_text(json.dumps(spine_prompts(Tokenizer(bundle.path(bundle.manifest.tokenizer.file),
                                                              bundle.manifest.tokenizer))))

    def common(v):
        return ["--threads", str(args.threads), "--tokens", str(args.tokens), "--settings", json.dumps(v)]

    if args.paired:
        import onnxruntime

        names = [n for n, (k, p, v) in systems.items() if not v] or list(systems)
        res = run_child(["--child", "paired", str(prompt_file), *[f"{systems[n][0]}={systems[n][1]}" for n in names],
                         *common(json.loads(args.settings)), "--paired", str(args.paired)])
        lines = ["| system | step ms (median) | step p10 ms | step ÷ first, median of rounds | range | CPU ms/step |",
                 "|---|---|---|---|---|---|"]
        for n, r in zip(names, res["systems"]):
            lines.append(f"| {n} | {r['step_ms']:.2f} | {r['step_p10_ms']:.2f} | {r['step_vs_first']:.3f} | "
                         f"{r['step_vs_first_range'][0]:.3f}–{r['step_vs_first_range'][1]:.3f} | {r['cpu_ms_per_step']:.2f} |")
        text = "\n".join(lines)
        print(text)
        print(f"others used {res['others_cpus']} CPUs on average; load average before: {res['loadavg_before']}")
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"profile-paired-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps({"threads": args.threads, "tokens": args.tokens, "rounds": args.paired,
                                   "settings": json.loads(args.settings), "onnxruntime": onnxruntime.__version__,
                                   "systems": dict(zip(names, res["systems"])), "per_round_step_ms": res["rounds"],
                                   "others_cpus": res["others_cpus"], "loadavg_before": res["loadavg_before"],
                                   "table": text}, indent=1))
        print(f"wrote {out}", file=sys.stderr)
        return

    runs: dict[str, list[dict]] = {k: [] for k in systems}
    noisy: dict[str, int] = {k: 0 for k in systems}
    loads: dict[str, dict] = {k: {} for k in systems}
    if args.ab is None:
        for name, (kind, path, v) in systems.items():
            for prepacked in (True, False):
                loads[name][prepacked] = run_child(["--child", "load-prepacked" if prepacked else "load-plain", kind, path,
                                                    str(prompt_file), *common(v)])
    mode = "time" if args.ab is not None else "run"
    for r in range(args.repeats):
        for name, (kind, path, v) in systems.items():
            res = run_child(["--child", mode, kind, path, str(prompt_file), *common(v)])
            kept = res["others_cpus"] <= args.max_others
            prof = f"  profiled {res['profile']['decode_run_ms']:.2f} ms" if "profile" in res else ""
            print(f"[{r + 1}/{args.repeats}] {name:40s} decode {res['timing']['decode_tok_s']:6.1f} tok/s  run "
                  f"{res['timing']['session_run_ms']:.2f} ms{prof}  rss {res['memory']['stages']['answered']['total']:.0f} MB  "
                  f"others {res['others_cpus']} CPUs  load {res['loadavg_before']}{'' if kept else '  (noisy: left out)'}",
                  file=sys.stderr, flush=True)
            res["kept"] = kept
            runs[name].append(res)
            noisy[name] += not kept
    import onnxruntime

    header = {"threads": args.threads, "tokens": args.tokens, "repeats": args.repeats, "max_others_cpus": args.max_others,
              "onnxruntime": onnxruntime.__version__, "machine": os.uname().machine, "cpu_count": os.cpu_count()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.ab is not None:
        text, summary = ab_table(runs, noisy)
        print(text)
        out = RESULTS / f"profile-ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps({**header, "systems": {k: [s[1], s[2]] for k, s in systems.items()}, "summary": summary,
                                   "runs": runs, "table": text}, indent=1))
        print(f"wrote {out}", file=sys.stderr)
        return
    summaries = []
    for name, rs in runs.items():
        kept = [x for x in rs if x["kept"]] or rs  # all noisy: the medians of all, marked
        s = summarize(name, kept, loads[name])
        s["noisy_runs_left_out"] = noisy[name] if len(kept) < len(rs) else 0
        s["all_runs_noisy"] = not any(x["kept"] for x in rs)
        summaries.append(s)
    text = tables(summaries)
    print(text)
    out = RESULTS / f"profile-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({**header, "settings": variants[0], "summaries": summaries,
                               "load_only": {k: {str(p): v for p, v in d.items()} for k, d in loads.items()},
                               "runs": runs, "tables": text}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
