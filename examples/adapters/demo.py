"""Train the two demo adapters on the default base and measure what they teach.

    .venv/bin/python examples/adapters/demo.py            # everything (about 30-40 minutes on 2 cores)
    .venv/bin/python examples/adapters/demo.py --no-merged

For each dataset (farm-notes, helpdesk): fine-tune a LoRA adapter on train.jsonl, add it
to an int4 bundle of the base, and answer every held-out prompt greedily without and
with the adapter; a program checks each answer for the trained behaviour (checks.py).
With merging (the default) each adapter is also folded into int4 and int8 bundles,
which answer the same prompts. Figures go to bench/results/adapters-demo.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from checks import has_behaviour  # noqa: E402

DATASETS = ("farm-notes", "helpdesk")


def heldout(name: str) -> list[list[dict]]:
    rows = [json.loads(line)["messages"] for line in (HERE / name / "heldout.jsonl").read_text().splitlines() if line]
    return [[m for m in r if m["role"] != "assistant"] for r in rows]


def rate(model, name: str, adapter: str | None, max_new_tokens: int) -> tuple[float, list[str]]:
    answers = [model.chat(p, temperature=0, repetition_penalty=1.0, max_new_tokens=max_new_tokens, adapter=adapter).text
               for p in heldout(name)]
    return sum(has_behaviour(name, a) for a in answers) / len(answers), answers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "bundles" / "demo"), help="where bundles and adapters are written")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (one short epoch: higher than finetune's default)")
    ap.add_argument("--skip-training", action="store_true", help="reuse the adapters already in --work")
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--no-merged", action="store_true", help="skip the merged int4/int8 bundles")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "adapters-demo.json"))
    args = ap.parse_args()

    import jishi
    from jishi.distill.base import load_base
    from jishi.distill.finetune import FinetuneConfig, finetune
    from jishi.export.adapters import add_adapter
    from jishi.pipeline import build

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"base": "smollm2-135m-instruct", "decoding": "greedy, repetition penalty 1.0",
                     "max_new_tokens": args.max_new_tokens, "datasets": {}}
    base = load_base(None)
    bundle = work / "skills-int4"
    if not bundle.exists():
        build(base, "int4", bundle, evaluate=False)
    for name in DATASETS:
        adapter_dir = work / "adapters" / name
        if not args.skip_training:
            finetune(load_base(None), HERE / name / "train.jsonl", adapter_dir, name=name,
                     config=FinetuneConfig(epochs=args.epochs, learning_rate=args.lr))
        add_adapter(bundle, name, adapter_dir)
        info = json.loads((adapter_dir / "jishi_adapter.json").read_text())
        results["datasets"][name] = {"training": info["training"], "config": info["config"],
                                     "heldout_prompts": len(heldout(name)),
                                     "loss": {"before": info["heldout"]["loss_before"], "after": info["heldout"]["loss_after"]}}
    model = jishi.load(bundle)
    samples = {}
    for name in DATASETS:
        entry = results["datasets"][name]
        for label, adapter in (("without", None), ("with", name)):
            entry[f"rate_{label}_adapter"], answers = rate(model, name, adapter, args.max_new_tokens)
            samples[f"{name} {label}"] = answers[:3]
    if not args.no_merged:
        for name in DATASETS:
            entry = results["datasets"][name]
            merge = (name, work / "adapters" / name)
            # The int4 build measures the merged weights at int4 and int8 and recommends one.
            four = build(base, "int4", work / f"{name}-merged-int4", merge=merge)
            eight = build(base, "int8", work / f"{name}-merged-int8", merge=merge, evaluate=False)
            entry["merged"] = jishi.load(four).manifest.evaluation["merged"]
            for quant, path in (("int4", four), ("int8", eight)):
                entry[f"rate_merged_{quant}"], answers = rate(jishi.load(path), name, None, args.max_new_tokens)
                samples[f"{name} merged {quant}"] = answers[:2]
    results["samples"] = samples
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")

    cols = ["rate_without_adapter", "rate_with_adapter"] + ([] if args.no_merged else ["rate_merged_int4", "rate_merged_int8"])
    print("\n| dataset | held-out | loss before → after | " + " | ".join(c.replace("rate_", "").replace("_", " ") for c in cols) + " |")
    print("|---" * (3 + len(cols)) + "|")
    for name, e in results["datasets"].items():
        print(f"| {name} | {e['heldout_prompts']} | {e['loss']['before']:.2f} → {e['loss']['after']:.2f} | "
              + " | ".join(f"{100 * e[c]:.0f}%" for c in cols) + " |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
