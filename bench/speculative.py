"""What speculative decoding does for each kind of task: acceptance and end-to-end speed-up.

    python bench/speculative.py BUNDLE [--draft DRAFT_BUNDLE] [--repeats 3] [--tokens 128] [--threads 2]

For each task kind (rewrite, extract, summarize, fix code, and open questions where there
is nothing to look up) the same greedy request runs with speculation off, with prompt
lookup and, given ``--draft``, with the draft bundle, one after another, alternating,
``--repeats`` times, in one process. Reported per kind: the share of guessed tokens kept,
tokens per checking run, decode tokens/s (first token to last) and the end-to-end time,
each as a median and as a ratio to "off" from the same sitting; the process's CPU seconds
(with onnxruntime's spinning off, the work done: the figure to read on a machine shared with
other work, where wall time swings); and whether the answers were the plain ones. Writes bench/results/speculative-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

PASSAGE = ("The cooperative's well pump at the north field failed on 3 March after the pressure switch burned out. "
           "Amina Yusuf replaced the switch on 5 March with a spare from the Kisumu depot, and the pump has run "
           "since then at 2.1 bar. Water use rose to 14,000 litres a day during the dry spell, so the committee "
           "asked Peter Odhiambo to order a second switch and to check the tank's float valve every Monday.")
CODE = '''def average(values):
    total = 0
    for v in values:
        total += v
    return total / len(value)


def largest(values):
    best = values[0]
    for v in values:
        if v > best:
            best = v
    return best
'''
TASKS = {
    "rewrite": f"Rewrite this report in plain, simple English, keeping every fact:\n\n{PASSAGE}",
    "extract": f"List every person, date and number in this report, one per line:\n\n{PASSAGE}",
    "summarize": f"Summarize this report in two sentences:\n\n{PASSAGE}",
    "fix code": f"Fix the bug in this Python code and give the whole corrected code:\n\n{CODE}",
    "open question": "Write a short poem about rain on a farm.",
}


def timed(model, prompt: str, speculation: str, tokens: int) -> dict:
    model.engine.reset()
    cpu = time.process_time()
    start = time.perf_counter()
    stream = model.chat_stream([{"role": "user", "content": prompt}], max_new_tokens=tokens, temperature=0,
                               speculation=speculation)
    first = None
    for _ in stream:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    cpu = time.process_time() - cpu
    r = stream.result
    return {"text": r.text, "tokens": r.completion_tokens, "seconds": end - start, "cpu_seconds": cpu,
            "decode_tok_s": (r.completion_tokens - 1) / (end - first) if first and end > first else None,
            "speculation": r.speculation}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--draft", help="a draft bundle with the same tokenizer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import jishi

    model = jishi.load(args.bundle, threads=args.threads, draft=args.draft)
    kinds = ["off", "lookup"] + (["draft"] if args.draft else [])
    for kind in kinds:  # warm up each path once
        timed(model, TASKS["rewrite"], kind, 16)
    runs: dict = {task: {k: [] for k in kinds} for task in TASKS}
    loads = []
    for r in range(args.repeats):
        for task, prompt in TASKS.items():
            order = kinds if r % 2 == 0 else kinds[::-1]
            for kind in order:
                loads.append(os.getloadavg()[0])
                runs[task][kind].append(timed(model, prompt, kind, args.tokens))
                print(f"round {r + 1} {task:13s} {kind:6s} {runs[task][kind][-1]['seconds']:.2f} s", file=sys.stderr)

    summary = {}
    for task, by_kind in runs.items():
        plain = by_kind["off"]
        base_s = statistics.median(x["seconds"] for x in plain)
        base_tps = statistics.median(x["decode_tok_s"] for x in plain)
        summary[task] = {}
        for kind, xs in by_kind.items():
            cpu = statistics.median(x["cpu_seconds"] for x in xs)
            row = {"seconds": round(statistics.median(x["seconds"] for x in xs), 3),
                   "cpu_seconds": round(cpu, 3),
                   "cpu_saving": round(statistics.median(x["cpu_seconds"] for x in plain) / cpu, 3),
                   "decode_tok_s": round(statistics.median(x["decode_tok_s"] for x in xs), 1),
                   "speedup_end_to_end": round(base_s / statistics.median(x["seconds"] for x in xs), 3),
                   "speedup_decode": round(statistics.median(x["decode_tok_s"] for x in xs) / base_tps, 3),
                   "same_text_as_off": all(x["text"] == plain[0]["text"] for x in xs),
                   "tokens": xs[0]["tokens"]}
            s = xs[0]["speculation"]
            if s:
                row.update(acceptance=s["acceptance"], tokens_per_run=round(
                    xs[0]["tokens"] / max(1, s["verify_runs"] + s["steps"] + 1), 2))
            summary[task][kind] = row

    print(f"\n{Path(args.bundle).name}, {args.threads} threads, {args.tokens} greedy tokens, medians of {args.repeats}")
    print("| task | speculation | kept | tokens/run | decode tok/s | end-to-end s | × off | CPU s | CPU ÷ off | same text |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for task, rows in summary.items():
        for kind, row in rows.items():
            kept = f"{row['acceptance']:.0%}" if "acceptance" in row else "-"
            print(f"| {task} | {kind} | {kept} | {row.get('tokens_per_run', 1.0)} | {row['decode_tok_s']} | "
                  f"{row['seconds']} | {row['speedup_end_to_end']} | {row['cpu_seconds']} | "
                  f"{1 / row['cpu_saving']:.2f} | {'yes' if row['same_text_as_off'] else 'no'} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"speculative-{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps({"bundle": str(args.bundle), "draft": args.draft, "threads": args.threads,
                               "tokens": args.tokens, "repeats": args.repeats, "cpu": cpu_name(),
                               "loadavg_1m": [round(x, 2) for x in loads], "summary": summary,
                               "answers": {t: {k: v[0]["text"] for k, v in r.items()} for t, r in runs.items()}},
                              indent=2))
    print(out)
    return 0


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                flags = open("/proc/cpuinfo").read()
                isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2" if "avx2" in flags else "other"
                return f"{line.split(':', 1)[1].strip()} ({isa})"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
