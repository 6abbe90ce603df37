"""What a decode run costs by the number of rows it carries, and what moving a row costs (by hand).

    python bench/batch_rows.py [--bundle /tmp/smol-int4] [--threads 2] [--rows 1 2 4 8 16 32] [--length 200]

Every row holds ``--length`` tokens. For each row count, interleaved, the median time of a
decode run over that many rows; then the median time of ``BatchEngine.swap`` of two rows of
that length. A row that runs without being needed (an idle row left in the range instead of
compacted away) costs the difference between n + 1 and n rows, on every token; a swap is paid
once when an answer starts or ends. Writes bench/results/batch-rows-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="/tmp/smol-int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--length", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import jishi
    from jishi.runtime.batch import BatchEngine

    m = jishi.load(args.bundle, threads=args.threads)
    e = m.engine
    b = BatchEngine(e.session, m.manifest.config, m.context, max(args.rows), e._base)
    ids = m.tokenizer.encode("The history of writing " * 100)[:args.length]
    lanes = b.lanes
    first = lanes[0].feed(ids)
    for lane in lanes[1:]:  # same cache in every row: copy it rather than prefill each
        b._reserve(len(ids) + 64)
        b._kv[:, lane.row] = b._kv[:, lanes[0].row]
        lane.tokens = list(ids)
    token = int(np.argmax(first))
    times: dict[int, list[float]] = {n: [] for n in args.rows}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for n in args.rows:
            group = lanes[:n]
            for lane in group:  # the same length each time: drop the token the last run added
                del lane.tokens[len(ids):]
            t = time.perf_counter()
            b.decode(group, [token] * n)
            times[n].append(time.perf_counter() - t)
        loads.append(os.getloadavg()[0])
    swaps = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        b.swap(0, 1)
        swaps.append(time.perf_counter() - t)
    med = {n: statistics.median(ts) * 1000 for n, ts in times.items()}
    print("| rows | ms per run | ms per row | tokens/s |")
    print("|---|---|---|---|")
    for n in args.rows:
        print(f"| {n} | {med[n]:.1f} | {med[n] / n:.2f} | {1000 * n / med[n]:.0f} |")
    swap_ms = statistics.median(swaps) * 1000
    print(f"swap of two {args.length}-token rows: {swap_ms:.2f} ms; load average {loads[0]:.2f} → {loads[-1]:.2f}")
    out = ROOT / "bench" / "results" / f"batch-rows-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundle": args.bundle, "threads": args.threads, "length": args.length,
                               "ms_per_run": med, "runs_ms": times, "swap_ms": swap_ms, "loadavg_1m": loads}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
