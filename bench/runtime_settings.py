"""What onnxruntime's memory and thread settings do to load time, peak RSS and decode speed.

    python bench/runtime_settings.py BUNDLE [BUNDLE ...] [--repeats 3] [--tokens 64]

Each setting runs in a fresh process (peak RSS is per process), one after another,
alternating, ``--repeats`` times; the figures are medians. For every bundle it writes two
copies, one with its external data page aligned and one packed back to back (as the bundle
writer does), to measure what onnxruntime's memory mapping of aligned weights does. Writes bench/results/runtime-settings-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

SETTINGS = {
    "default": {},
    "no arena": {"cpu_mem_arena": False},
    "no prepack": {"prepacking": False},
    "no arena, no prepack": {"cpu_mem_arena": False, "prepacking": False},
    "no spinning": {"spinning": False},
}


PAGE = 4096


def save_aligned(model, path: Path) -> None:
    """Write the graph with every external weight starting on a page boundary of the data file:
    onnxruntime memory-maps external initializers on the CPU when their offsets are aligned."""
    import onnx
    from onnx.external_data_helper import set_external_data

    data = path.with_name(path.name + ".data")
    with open(data, "wb") as f:
        for tensor in model.graph.initializer:
            if not tensor.HasField("raw_data") or len(tensor.raw_data) < 1024:
                continue
            offset = -(-f.tell() // PAGE) * PAGE
            f.write(b"\0" * (offset - f.tell()))
            f.write(tensor.raw_data)
            set_external_data(tensor, data.name, offset, len(tensor.raw_data))
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(path))


def relaid_copy(bundle: Path, out: Path, aligned: bool) -> Path:
    """The bundle with its weights written page aligned, or packed back to back (as onnx writes
    them, and as the bundle writer does)."""
    import onnx

    from jishi.export.bundle_writer import with_files, write_manifest
    from jishi.runtime.bundle import open_bundle

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle, out)
    m = open_bundle(out).manifest
    model = onnx.load(str(out / m.graph.file))  # with its external data
    os.remove(out / m.graph.data_file)
    if aligned:
        save_aligned(model, out / m.graph.file)
    else:
        onnx.save_model(model, str(out / m.graph.file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=m.graph.data_file, size_threshold=1024)
    write_manifest(out, with_files(m, out))
    return out


def one(bundle: str, setting: str, threads: int, tokens: int) -> dict:
    """Runs in the child: load, a 32-token prompt, then greedy steps, three times."""
    from dataclasses import replace

    import numpy as np

    import jishi.runtime.model as model_mod
    from jishi.runtime import settings as settings_mod

    base = settings_mod.RuntimeSettings(threads=threads)
    chosen = replace(base, **SETTINGS[setting])
    model_mod_settings = lambda threads=None: chosen  # noqa: E731
    settings_mod.for_this_machine = model_mod_settings
    t0 = time.perf_counter()
    m = model_mod.load(bundle, force=True)
    load_s = time.perf_counter() - t0
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids = list(range(100, 132))
    speeds = []
    for _ in range(3):  # each pass: ``tokens`` steps, or fewer if they take over 4 s (the slow settings)
        m.engine.reset()
        logits = m.engine.feed(ids)
        t = time.perf_counter()
        n = 0
        while n < tokens and (n < 4 or time.perf_counter() - t < 4.0):
            logits = m.engine.step(int(np.argmax(logits)))
            n += 1
        speeds.append(n / (time.perf_counter() - t))
    opts = m.engine.session.get_session_options()
    return {"setting": setting, "load_s": load_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mb": rss_loaded, "decode_tok_s": statistics.median(speeds),
            "arena": opts.enable_cpu_mem_arena, "prepack_off": opts.get_session_config_entry("session.disable_prepacking")}


def cpu_of_others() -> float:
    """Seconds of CPU all processes used so far (from /proc/stat), to see how busy the machine was."""
    fields = Path("/proc/stat").read_text().split("\n")[0].split()[1:]
    return (int(fields[0]) + int(fields[1]) + int(fields[2])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles", nargs="*")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--one", nargs=2, metavar=("BUNDLE", "SETTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.threads, args.tokens)))
        return
    work = ROOT / "bench" / "work"
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for bundle in map(Path, args.bundles):
        variants = {layout: relaid_copy(bundle, work / f"{bundle.name}-{layout}", layout == "aligned")
                    for layout in ("aligned", "unaligned")}
        for r in range(args.repeats):
            for layout, path in variants.items():
                for setting in SETTINGS if layout == "aligned" else ["default", "no arena"]:
                    before, wall = cpu_of_others(), time.perf_counter()
                    out = subprocess.run([sys.executable, __file__, "--one", str(path), setting, "--threads", str(args.threads),
                                          "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    busy = (cpu_of_others() - before) / (time.perf_counter() - wall)
                    row.update(bundle=bundle.name, layout=layout, repeat=r, machine_cpus_busy=busy)
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    table = []
    keys = sorted({(r["bundle"], r["layout"], r["setting"]) for r in runs}, key=lambda k: (k[0], k[1], list(SETTINGS).index(k[2])))
    for key in keys:
        rows = [r for r in runs if (r["bundle"], r["layout"], r["setting"]) == key]
        med = {f: statistics.median(r[f] for r in rows) for f in ("load_s", "peak_rss_mb", "rss_after_load_mb", "decode_tok_s")}
        table.append({"bundle": key[0], "layout": key[1], "setting": key[2], **med, "runs": len(rows)})
    print("\n| bundle | weights layout | setting | load s | RSS after load MB | peak RSS MB | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['bundle']} | {t['layout']} | {t['setting']} | {t['load_s']:.2f} | {t['rss_after_load_mb']:.0f} | "
              f"{t['peak_rss_mb']:.0f} | {t['decode_tok_s']:.0f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"runtime-settings-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"threads": args.threads, "tokens": args.tokens, "table": table, "runs": runs}, indent=1))
    print(f"\n{out}")


if __name__ == "__main__":
    main()
