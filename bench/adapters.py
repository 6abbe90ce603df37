"""What the adapter merge points cost, how fast adapters switch, and what each adds to memory.

    .venv/bin/python bench/adapters.py [--repeats 12] [--threads 2]

On the default base, builds what is missing under bench/work/adapters/: int4 and int8
bundles with merge points (the default) and without (--no-merge-points), and two random
rank-16 LoRA adapters on all seven projections (PEFT, added to the bundles with merge
points). Then, in one process, alternates 48-token greedy decodes of every variant
``--repeats`` times (the machine's noise hits all alike) and reports medians and ratios;
times adapter switches; and, in a fresh process, measures resident memory as adapters
are loaded and activated. Writes bench/results/adapters-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "adapters"
RESULTS = ROOT / "bench" / "results"
NEW_TOKENS = 48


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def ensure_inputs() -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from jishi.distill.base import load_base
    from jishi.export.adapters import add_adapter
    from jishi.pipeline import build

    WORK.mkdir(parents=True, exist_ok=True)
    base = None
    paths = {}
    for quant in ("int4", "int8"):
        for mp in (True, False):
            out = WORK / f"{quant}{'' if mp else '-no-merge-points'}"
            if not (out / "manifest.json").exists():
                base = base or load_base()
                build(base, quant, out, evaluate=False, merge_points=mp)
            paths[out.name] = out
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for seed, name in ((1, "one"), (2, "two")):
        peft_dir = WORK / f"peft-{name}"
        if not (peft_dir / "adapter_config.json").exists():
            base = base or load_base()
            torch.manual_seed(seed)
            model = get_peft_model(load_base().model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
            with torch.no_grad():
                for key, p in model.named_parameters():
                    if "lora_B" in key:
                        p.normal_(0.0, 0.01)  # peft starts B at zero: make the adapter change the output
            model.save_pretrained(peft_dir)
        for quant in ("int4", "int8"):
            bundle = paths[quant]
            from jishi.runtime.bundle import open_bundle

            if name not in [a["name"] for a in open_bundle(bundle).manifest.adapters]:
                add_adapter(bundle, name, peft_dir)
    return paths


def decode_ms(model, ids: list[int]) -> float:
    """Milliseconds per token of a greedy decode of NEW_TOKENS tokens after ``ids``."""
    import numpy as np

    engine = model.engine
    engine.reset()
    logits = engine.feed(ids)
    t0 = time.perf_counter()
    for _ in range(NEW_TOKENS):
        logits = engine.step(int(np.argmax(logits)))
    return (time.perf_counter() - t0) * 1000 / NEW_TOKENS


def speed(paths: dict[str, Path], repeats: int, threads: int) -> dict:
    import jishi

    prompt = "Write a short note for a farmer about storing maize after harvest, in three sentences."
    variants = {
        "int4, no merge points": (paths["int4-no-merge-points"], None),
        "int4, merge points, no adapter": (paths["int4"], None),
        "int4, adapter active": (paths["int4"], "one"),
        "int8, no merge points": (paths["int8-no-merge-points"], None),
        "int8, merge points, no adapter": (paths["int8"], None),
        "int8, merge-point graph, no adapter": (paths["int8"], "graph"),
        "int8, adapter active": (paths["int8"], "one"),
    }
    models = {}
    for label, (path, adapter) in variants.items():
        m = jishi.load(path, threads=threads, force=True)
        if adapter == "graph":
            m.open_adapter_graph()
        elif adapter:
            m.use_adapter(adapter)
        models[label] = m
    ids = next(iter(models.values())).tokenizer.encode(prompt)
    times: dict[str, list[float]] = {k: [] for k in models}
    for label, m in models.items():  # warm up
        decode_ms(m, ids)
    for r in range(repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for label in order:
            times[label].append(decode_ms(models[label], ids))
    out = {}
    for label, ts in times.items():
        out[label] = {"decode_tok_s": round(1000 / statistics.median(ts), 1), "ms_per_token": round(statistics.median(ts), 3)}
    for quant in ("int4", "int8"):
        ref = out[f"{quant}, no merge points"]["decode_tok_s"]
        for label in out:
            if label.startswith(quant):
                out[label]["ratio_to_no_merge_points"] = round(out[label]["decode_tok_s"] / ref, 3)
    return out


def switching(paths: dict[str, Path], threads: int) -> dict:
    import jishi

    out = {}
    for quant in ("int4", "int8"):
        m = jishi.load(paths[quant], threads=threads, force=True)
        t0 = time.perf_counter()
        m.use_adapter("one")
        first = time.perf_counter() - t0
        m.use_adapter("two")
        times = []
        for i in range(40):
            t0 = time.perf_counter()
            m.use_adapter("one" if i % 2 == 0 else "two")
            times.append(time.perf_counter() - t0)
        times.sort()
        out[quant] = {"first_activation_ms": round(first * 1000, 1),
                      "switch_ms_median": round(statistics.median(times) * 1000, 2),
                      "switch_ms_p95": round(times[int(0.95 * len(times)) - 1] * 1000, 2)}
    return out


def memory(path: Path, threads: int) -> dict:
    """Resident memory as adapters are loaded and activated (run in a fresh process)."""
    import gc

    import jishi

    m = jishi.load(path, threads=threads, force=True)
    m.open_adapter_graph()
    decode_ms(m, [1, 2, 3])
    gc.collect()
    steps = {"model loaded": rss_mb()}
    sizes = {}
    for name in ("one", "two"):
        adapter = m.load_adapter(name)
        gc.collect()
        steps[f"adapter {name} loaded"] = rss_mb()
        sizes[name] = {"tensors_mb": round(adapter.nbytes / 1e6, 2),
                       "file_mb": round(m.bundle.path(next(a["file"] for a in m.manifest.adapters if a["name"] == name)).stat().st_size / 1e6, 2)}
    for name in ("one", "two", None):
        m.use_adapter(name)
        decode_ms(m, [1, 2, 3])
        gc.collect()
        steps[f"active: {name or 'none'}"] = rss_mb()
    return {"rss_mb": {k: round(v, 1) for k, v in steps.items()}, "adapters": sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)  # the fresh process of the memory measurement
    args = ap.parse_args()
    if args.memory_of:
        print(json.dumps(memory(Path(args.memory_of), args.threads)))
        return
    paths = ensure_inputs()
    load = os.getloadavg()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "repeats": args.repeats,
              "new_tokens": NEW_TOKENS, "load_average_before": [round(x, 2) for x in load]}
    result["decode"] = speed(paths, args.repeats, args.threads)
    result["switch"] = switching(paths, args.threads)
    result["memory"] = {}
    for quant in ("int4", "int8"):
        done = subprocess.run([sys.executable, __file__, "--memory-of", str(paths[quant]), "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        result["memory"][quant] = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"adapters-{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    print("\n| variant | decode tok/s | vs no merge points |\n|---|---|---|")
    for label, d in result["decode"].items():
        print(f"| {label} | {d['decode_tok_s']:.1f} | {d['ratio_to_no_merge_points']:.3f} |")
    print("\n| bundle | first activation ms | switch ms (median / p95) |\n|---|---|---|")
    for quant, s in result["switch"].items():
        print(f"| {quant} | {s['first_activation_ms']:.1f} | {s['switch_ms_median']:.2f} / {s['switch_ms_p95']:.2f} |")
    print("\n| bundle | " + " | ".join(result["memory"]["int4"]["rss_mb"]) + " |")
    print("|---" * (1 + len(result["memory"]["int4"]["rss_mb"])) + "|")
    for quant, mem in result["memory"].items():
        print(f"| {quant} RSS MB | " + " | ".join(f"{v:.0f}" for v in mem["rss_mb"].values()) + " |")
    for quant, mem in result["memory"].items():
        for name, s in mem["adapters"].items():
            print(f"{quant} adapter {name}: {s['tensors_mb']} MB of tensors, file {s['file_mb']} MB")
    print(f"\nload average before {result['load_average_before']}, after {result['load_average_after']}; wrote {out}")


if __name__ == "__main__":
    main()
