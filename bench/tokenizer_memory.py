"""What a tokenizer costs the process that loads it: its BPE merges as ``["a", "b"]`` pairs (what
tokenizers writes) against ``"a b"`` strings (what jishi writes into a bundle, runtime.tokenizer.compact_merges).

    python bench/tokenizer_memory.py TOKENIZER.json|BUNDLE [...] [--repeats 3]

Each form is loaded in a fresh process (``tokenizers.Tokenizer.from_file``), alternating, and measured:
peak RSS (VmHWM), RSS after the load, the load's seconds; then the same text is encoded by both and the
ids compared. For a bundle, the whole process is measured too (``jishi.load`` and a 128-token answer,
the bundle with either form of its tokenizer: copies whose other files are hard links). Medians go to
bench/results/tokenizer_memory-DATE.json and a table is printed. Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOAD = """
import sys, time
t = time.perf_counter()
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
seconds = time.perf_counter() - t
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
mb = lambda key: int(status[key].split()[0]) / 1024
print(mb("VmHWM"), mb("VmRSS"), seconds)
"""


GENERATE = """
import sys, time
t = time.perf_counter()
import jishi
m = jishi.load(sys.argv[1])
seconds = time.perf_counter() - t
m.generate("Write a short note about the water cycle for a school class.", max_new_tokens=128, temperature=0)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
mb = lambda key: int(status[key].split()[0]) / 1024
print(mb("VmHWM"), mb("VmRSS"), seconds)
"""


def bundle_with(src: Path, dst: Path, tokenizer_text: str) -> Path:
    """A copy of bundle ``src`` whose tokenizer.json is ``tokenizer_text`` (the other files hard-linked)."""
    import os

    from jishi.export.bundle_writer import sha256_of

    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in ("tokenizer.json", "manifest.json", "signature.json"):
            os.link(f, dst / f.name)
    (dst / "tokenizer.json").write_text(tokenizer_text, encoding="utf-8")
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = {"size": (dst / "tokenizer.json").stat().st_size,
                                           "sha256": sha256_of(dst / "tokenizer.json")}
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dst


def measure(path: Path, code: str = LOAD) -> dict:
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    peak, rss, seconds = map(float, done.stdout.split())
    return {"peak_rss_mb": peak, "rss_mb": rss, "load_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tokenizers", nargs="+", type=Path, help="tokenizer.json files or bundle directories")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"tokenizer_memory-{time.strftime('%Y%m%d-%H%M')}.json")
    args = ap.parse_args()
    from tokenizers import Tokenizer

    from jishi.runtime.tokenizer import compact_merges

    sample = Path(json.__file__).read_text()  # any long text with code and prose
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for given in args.tokenizers:
            src = given / "tokenizer.json" if given.is_dir() else given
            body = json.loads(src.read_text(encoding="utf-8"))
            merges = body.get("model", {}).get("merges") or []
            pairs = json.dumps({**body, "model": {**body["model"], "merges": [m.split(" ", 1) if isinstance(m, str)
                                                                             else m for m in merges]}},
                               ensure_ascii=False)
            forms = {"pairs": pairs, "strings": compact_merges(pairs)}
            if forms["strings"] == pairs:
                print(f"{given}: its merges cannot be written as strings (a part holds a space, or it is no BPE)",
                      file=sys.stderr)
                continue
            files = {}
            for form, text in forms.items():
                files[form] = Path(tmp) / f"{len(results)}-{form}.json"
                files[form].write_text(text, encoding="utf-8")
            runs = {form: [] for form in forms}
            for _ in range(args.repeats):
                for form in forms:
                    runs[form].append(measure(files[form]))
            same = (Tokenizer.from_file(str(files["pairs"])).encode(sample).ids
                    == Tokenizer.from_file(str(files["strings"])).encode(sample).ids)
            row = {"tokenizer": str(given), "merges": len(merges), "same_ids": same}
            for form, rs in runs.items():
                row[form] = {key: round(statistics.median(r[key] for r in rs), 2) for key in rs[0]}
            if given.is_dir():  # the whole process: load and a 128-token answer
                copies = {form: bundle_with(given, Path(tmp) / f"{len(results)}-{form}", text)
                          for form, text in forms.items()}
                whole = {form: [] for form in forms}
                for _ in range(args.repeats):
                    for form in forms:
                        whole[form].append(measure(copies[form], GENERATE))
                row["whole_process"] = {form: {key: round(statistics.median(r[key] for r in rs), 2) for key in rs[0]}
                                        for form, rs in whole.items()}
            results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "rows": results}, indent=1))
    print("| tokenizer | merges | peak RSS MB, pairs → strings | RSS after load MB | load s | same ids |")
    print("|---|---|---|---|---|---|")
    for r in results:
        p, s = r["pairs"], r["strings"]
        print(f"| {r['tokenizer']} | {r['merges']:,} | {p['peak_rss_mb']:.0f} → {s['peak_rss_mb']:.0f} | "
              f"{p['rss_mb']:.0f} → {s['rss_mb']:.0f} | {p['load_s']:.2f} → {s['load_s']:.2f} | {r['same_ids']} |")
    for r in results:
        if "whole_process" in r:
            p, s = r["whole_process"]["pairs"], r["whole_process"]["strings"]
            print(f"{r['tokenizer']}, load + 128 tokens: peak RSS {p['peak_rss_mb']:.0f} → {s['peak_rss_mb']:.0f} MB, "
                  f"RSS at the end {p['rss_mb']:.0f} → {s['rss_mb']:.0f} MB, load {p['load_s']:.2f} → {s['load_s']:.2f} s")
    print(f"Wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
