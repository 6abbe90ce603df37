"""The trade-off of shrinking the default base: pruned and distilled students at every weight format.

    python bench/distill.py                       # teacher + a 20-of-30-layer student (about 30 min of training)
    python bench/distill.py --students 20,15      # and a 15-layer one
    python bench/distill.py --quick               # a few minutes: checks every stage works, figures meaningless

Run by hand, not in CI. Every stage writes its result under ``--work`` (default
``bench/work/distill``) and is skipped when that result exists, and training resumes
from its last checkpoint, so an interrupted run (or a new session) continues where it
stopped: run the same command again. ``--fresh STAGE`` forgets a stage (or a pattern of them: ``--fresh 'speed-*'``).

Stages, per student of N layers (blocks chosen by block influence on calibration text):
``prune-LN`` (the pruned student, untrained, saved and measured), ``distill-LN`` (KD
against the teacher on the calibration text), ``qat-LN`` (a shorter QAT distillation
from the distilled student: fake-quantized int4 weights, saved on the grid); then a
bundle of every model in every format (``build-*``), its decode speed and peak RSS in a
fresh process (``speed-*``, bench/worker.py) and its quality against the fp32 teacher on
the held-out text (``quality-*``). The report (markdown table, JSON, an SVG of held-out
KL against training tokens) goes to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUANTS = ("fp32", "int8", "int4", "int4-gptq")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--students", default="20", help="layer counts, comma-separated (default 20)")
    ap.add_argument("--steps", type=int, default=150, help="distillation steps per student (default 150 ≈ 30 min here)")
    ap.add_argument("--qat-steps", type=int, default=40, help="QAT steps after distillation (default 40)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--qat-lr", type=float, default=1e-3, help="QAT's learning rate (default 1e-3: its weights must "
                    "move across 4-bit steps; 1e-4 left the 20-block student at held-out KL 1.21 after 40 steps)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast in training")
    ap.add_argument("--quants", default=",".join(QUANTS))
    ap.add_argument("--max-windows", type=int, default=9, help="held-out windows of 512 (default all 9)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "distill"))
    ap.add_argument("--fresh", action="append", default=[], metavar="STAGE", help="run this stage again (a pattern: --fresh 'speed-*')")
    ap.add_argument("--quick", action="store_true", help="tiny settings that only check the stages run")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.qat_steps, args.seq_len, args.max_windows = 3, 2, 64, 1
        args.quants = "int4"
        args.work = args.work + "-quick"
    work = Path(args.work)
    (work / "state").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    bench = Bench(work, args)
    students = [int(s) for s in args.students.split(",") if s]
    quants = [q for q in args.quants.split(",") if q]

    models = {"teacher": None}  # name → HF directory (None: the known base)
    for n in students:
        bench.stage(f"prune-L{n}", lambda n=n: bench.prune(n))
        models[f"L{n}"] = bench.stage(f"distill-L{n}", lambda n=n: bench.distill(n))["dir"]
        models[f"L{n}-qat"] = bench.stage(f"qat-L{n}", lambda n=n: bench.qat(n))["dir"]
    rows = []
    for name, directory in models.items():
        for q in (["int4"] if name.endswith("-qat") else quants) + (["fp32"] if name.endswith("-qat") else []):
            label = f"{name}-{q}"
            bundle = bench.stage(f"build-{label}", lambda d=directory, q=q, label=label: bench.build(d, q, label))["bundle"]
            speed = bench.stage(f"speed-{label}", lambda b=bundle: bench.speed(b))
            quality = bench.stage(f"quality-{label}", lambda b=bundle: bench.quality(b))
            rows.append({"model": name, "weights": q, **quality, **speed})
    bench.stage("teacher-eval-nll", bench.teacher_eval_nll)
    bench.report(rows, students)


class Bench:
    def __init__(self, work: Path, args):
        self.work, self.args = work, args
        self._teacher = None

    # -- bookkeeping --------------------------------------------------------------------------------------
    def stage(self, name: str, fn):
        path = self.work / "state" / f"{name}.json"
        if path.is_file() and not any(fnmatch.fnmatch(name, pattern) for pattern in self.args.fresh):
            return json.loads(path.read_text())
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.time()
        result = fn()
        result["seconds"] = round(time.time() - t0, 1)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, path)
        return result

    @property
    def teacher(self):
        if self._teacher is None:
            from jishi.distill.base import load_base

            self._teacher = load_base(None)
        return self._teacher

    def calibration_file(self) -> Path:
        from jishi.heldout import calibration_text

        path = self.work / "calibration.txt"
        if not path.is_file():
            path.write_text(calibration_text(), encoding="utf-8")
        return path

    def kd_config(self, steps: int, qat: bool = False):
        from jishi.distill.kd import KDConfig

        a = self.args
        return KDConfig(steps=steps, batch_size=a.batch_size, seq_len=a.seq_len, learning_rate=a.qat_lr if qat else a.lr,
                        bf16=a.bf16, eval_every=max(1, steps // 10), checkpoint_every=max(1, min(25, steps // 5)),
                        eval_windows=4, qat_bits=4 if qat else None)

    # -- stages -------------------------------------------------------------------------------------------
    def prune(self, n: int) -> dict:
        from jishi.distill.prune import build_student, calibration_batches, non_embedding_params, plan_student
        from jishi.distill.student import save_student
        from jishi.evaluation import evaluate_models

        t = self.teacher
        tok = t.runtime_tokenizer()
        plan = plan_student(t.model, calibration_batches(tok, 4, min(self.args.seq_len, 512)), layers=n, method="influence")
        student = build_student(t.model, plan)
        out = self.work / f"L{n}-pruned"
        save_student(student, t, out, {"teacher": {"name": t.name, "layers": t.model.config.num_hidden_layers},
                                       "plan": plan.as_dict(), "training": None})
        rows, _ = evaluate_models([str(out)], teacher_loaded=t, max_windows=self.args.max_windows, decode_tokens=0,
                                  quiet=True)
        r = rows[0]
        # the baseline: evenly spaced blocks, same count, also untrained
        even = plan_student(t.model, [], layers=n, method="even")
        even_dir = self.work / f"L{n}-even-pruned"
        save_student(build_student(t.model, even), t, even_dir, {"plan": even.as_dict(), "training": None})
        e, _ = evaluate_models([str(even_dir)], teacher_loaded=t, max_windows=self.args.max_windows, decode_tokens=0,
                               quiet=True)
        return {"dir": str(out), "layers": list(plan.layers), "importance": list(plan.importance),
                "non_embedding_params": non_embedding_params(student), "perplexity": r.perplexity,
                "top1_agreement": r.top1_agreement, "kl": r.kl,
                "even": {"layers": list(even.layers), "perplexity": e[0].perplexity,
                         "top1_agreement": e[0].top1_agreement, "kl": e[0].kl}}

    def distill(self, n: int) -> dict:
        from jishi.distill.student import DistillOptions, distill

        out = self.work / f"L{n}"
        if not out.is_dir():
            distill(self.teacher, out, DistillOptions(layers=n, data=(str(self.calibration_file()),), resume=True),
                    self.kd_config(self.args.steps))
        return self._after_training(out)

    def qat(self, n: int) -> dict:
        from jishi.distill.student import DistillOptions, distill

        out = self.work / f"L{n}-qat"
        if not out.is_dir():
            distill(self.teacher, out, DistillOptions(init=str(self.work / f"L{n}"), data=(str(self.calibration_file()),),
                                                      resume=True), self.kd_config(self.args.qat_steps, qat=True))
        return self._after_training(out)

    def _after_training(self, out: Path) -> dict:
        from jishi.evaluation import evaluate_models

        rec = json.loads((out / "jishi_distill.json").read_text())
        rows, _ = evaluate_models([str(out)], teacher_loaded=self.teacher, max_windows=self.args.max_windows,
                                  decode_tokens=0, quiet=True)
        r = rows[0]
        return {"dir": str(out), "perplexity": r.perplexity, "top1_agreement": r.top1_agreement, "kl": r.kl,
                "evals": rec["evals"], "tokens": rec["training"]["tokens"], "steps": rec["training"]["steps_done"],
                "heldout": rec["heldout"]}

    def build(self, directory: str | None, quant: str, label: str) -> dict:
        import shutil

        from jishi.pipeline import build

        out = self.work / "bundles" / label
        shutil.rmtree(out, ignore_errors=True)
        base = self.teacher if directory is None else directory
        # "int4" is round-to-nearest here (the row it has always been); a teacher GGUF keeps its grid either way
        q, method = {"int4-gptq": ("int4", "gptq"), "int4": ("int4", None if directory is None else "rtn")}.get(quant, (quant, None))
        build(base, q, out, context=2048, evaluate=False, method=method)
        return {"bundle": str(out)}

    def speed(self, bundle: str) -> dict:
        prompts = self.work / "prompts.json"
        if not prompts.is_file():
            tok = self.teacher.runtime_tokenizer()
            from jishi.heldout import calibration_text

            chat = tok.apply_chat_template([{"role": "user", "content": "Give me three tips for storing grain."}])
            prompts.write_text(json.dumps({"prefill": tok.encode(calibration_text()[:4000], bos=False)[:500],
                                           "chat": tok.encode(chat)}))
        new = "16" if self.args.quick else "128"
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "worker.py"), "jishi", bundle, str(prompts),
                               str(self.args.threads), new], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"speed of {bundle} failed:\n{done.stderr[-2000:]}")
        res = json.loads(done.stdout.strip().splitlines()[-1])
        return {k: res[k] for k in ("decode_tok_s", "prefill_tok_s", "peak_rss_mb", "load_s")}

    def quality(self, bundle: str) -> dict:
        from jishi.evaluation import evaluate_models

        rows, info = evaluate_models([bundle], teacher_loaded=self.teacher, max_windows=self.args.max_windows,
                                     decode_tokens=0, quiet=True)
        r = rows[0]
        return {"non_embedding_params": r.non_embedding_params, "size_mb": round(r.size_bytes / 1e6, 1),
                "perplexity": round(r.perplexity, 3), "top1_agreement": round(r.top1_agreement, 4),
                "kl": round(r.kl, 4), "windows": info["windows"]}

    def teacher_eval_nll(self) -> dict:
        """The teacher's NLL on the windows training measured the student on (for the gap curve)."""
        import torch

        from jishi.heldout import heldout_text, windows

        wins = windows(self.teacher.runtime_tokenizer().encode(heldout_text(), bos=False), self.args.seq_len)[:4]
        nll, count = 0.0, 0
        with torch.no_grad():
            for w in wins:
                x = torch.tensor([w])
                logits = self.teacher.model(input_ids=x, use_cache=False).logits[0, :-1].float()
                nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
                count += len(w) - 1
        return {"nll": nll / count, "windows": len(wins), "window": self.args.seq_len}

    # -- report -------------------------------------------------------------------------------------------
    def report(self, rows: list[dict], students: list[int]) -> None:
        results = ROOT / "bench" / "results"
        results.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        suffix = "-quick" if self.args.quick else ""
        lines = ["| model | weights | non-emb params | size MB | perplexity | top-1 vs teacher | KL vs teacher | "
                 "decode tok/s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['weights']} | {r['non_embedding_params'] / 1e6:.1f}M | {r['size_mb']:.0f} | "
                         f"{r['perplexity']:.2f} | {100 * r['top1_agreement']:.1f}% | {r['kl']:.3f} | "
                         f"{r['decode_tok_s']:.0f} | {r['peak_rss_mb']:.0f} |")
        lines += ["", "| student | torch fp32 | perplexity | top-1 vs teacher | KL vs teacher |", "|---|---|---|---|---|"]
        curves = {}
        for n in students:
            p = json.loads((self.work / "state" / f"prune-L{n}.json").read_text())
            d = json.loads((self.work / "state" / f"distill-L{n}.json").read_text())
            q = json.loads((self.work / "state" / f"qat-L{n}.json").read_text())
            if "even" in p:
                ev = p["even"]
                lines.append(f"| L{n} evenly spaced (blocks {ev['layers']}) | pruned | {ev['perplexity']:.2f} | "
                             f"{100 * ev['top1_agreement']:.1f}% | {ev['kl']:.3f} |")
            lines.append(f"| L{n} by influence (blocks {p['layers']}) | pruned | {p['perplexity']:.2f} | {100 * p['top1_agreement']:.1f}% | {p['kl']:.3f} |")
            lines.append(f"| L{n} | distilled ({d['steps']} steps, {d['tokens']} tokens) | {d['perplexity']:.2f} | "
                         f"{100 * d['top1_agreement']:.1f}% | {d['kl']:.3f} |")
            lines.append(f"| L{n} | + QAT ({q['steps']} steps, int4 grid) | {q['perplexity']:.2f} | "
                         f"{100 * q['top1_agreement']:.1f}% | {q['kl']:.3f} |")
            curves[f"L{n}"] = [(e["tokens"], e["kl"]) for e in d["evals"]]
            last = d["tokens"]
            curves[f"L{n} QAT"] = [(last + e["tokens"], e["kl"]) for e in q["evals"]]
        import math

        teacher_nll = json.loads((self.work / "state" / "teacher-eval-nll.json").read_text())["nll"]
        by = {(r["model"], r["weights"]): r for r in rows}
        for n in students:
            d = json.loads((self.work / "state" / f"distill-L{n}.json").read_text())
            p = json.loads((self.work / "state" / f"prune-L{n}.json").read_text())
            lines += ["", f"L{n}: the NLL gap to the teacher as training goes on (4 held-out windows of "
                          f"{self.args.seq_len}; teacher NLL {teacher_nll:.3f})", "",
                      "| tokens | held-out KL | student NLL | gap closed |", "|---|---|---|---|"]
            nll0 = d["evals"][0]["nll"]
            for e in d["evals"]:
                lines.append(f"| {e['tokens']:,} | {e['kl']:.3f} | {e['nll']:.3f} | "
                             f"{100 * (nll0 - e['nll']) / (nll0 - teacher_nll):.0f}% |")
            t32 = by.get(("teacher", "fp32"))
            if t32:  # the same on the whole held-out text (9 windows of 512), from perplexities
                closed = (math.log(p["perplexity"]) - math.log(d["perplexity"])) / (math.log(p["perplexity"]) - math.log(t32["perplexity"]))
                lines.append(f"\nOn the whole held-out text: pruned {p['perplexity']:.2f} → distilled {d['perplexity']:.2f} "
                             f"(teacher {t32['perplexity']:.2f}): {100 * closed:.0f}% of the NLL gap closed; "
                             f"distilled ÷ teacher perplexity {d['perplexity'] / t32['perplexity']:.2f}x")
            for model in ("teacher", f"L{n}"):
                f32, rtn, gptq = by.get((model, "fp32")), by.get((model, "int4")), by.get((model, "int4-gptq"))
                if f32 and rtn and gptq:
                    lines.append(f"{model}: int4-GPTQ perplexity {100 * (gptq['perplexity'] / f32['perplexity'] - 1):+.1f}% "
                                 f"of fp32, int4-RTN {100 * (rtn['perplexity'] / f32['perplexity'] - 1):+.1f}%")
        text = "\n".join(lines) + "\n"
        (results / f"distill{suffix}-{stamp}.md").write_text(text)
        (results / f"distill{suffix}-{stamp}.json").write_text(json.dumps({"rows": rows, "args": vars(self.args)}, indent=2))
        (results / f"distill{suffix}-kl.svg").write_text(svg_plot(curves, "training tokens", "held-out KL to the teacher (nats/token)"))
        print(text)
        print(f"wrote bench/results/distill{suffix}-{stamp}.md and distill{suffix}-kl.svg", file=sys.stderr)


def svg_plot(curves: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, w: int = 640, h: int = 400) -> str:
    """A line plot as SVG text (no plotting library on the build machine)."""
    pts = [p for c in curves.values() for p in c]
    if not pts:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    x0, x1 = 0.0, max(p[0] for p in pts) or 1.0
    y0, y1 = 0.0, max(p[1] for p in pts) * 1.05 or 1.0
    L, R, T, B = 70, 20, 20, 50
    sx = lambda x: L + (x - x0) / (x1 - x0) * (w - L - R)
    sy = lambda y: h - B - (y - y0) / (y1 - y0) * (h - T - B)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{L}" y1="{h - B}" x2="{w - R}" y2="{h - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{h - B}" stroke="black"/>']
    for i in range(6):
        xv, yv = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        out.append(f'<text x="{sx(xv):.0f}" y="{h - B + 16}" text-anchor="middle">{xv:,.0f}</text>')
        out.append(f'<text x="{L - 6}" y="{sy(yv) + 4:.0f}" text-anchor="end">{yv:.2f}</text>')
        out.append(f'<line x1="{L}" y1="{sy(yv):.1f}" x2="{w - R}" y2="{sy(yv):.1f}" stroke="#ddd"/>')
    out.append(f'<text x="{(L + w - R) / 2:.0f}" y="{h - 12}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="16" y="{(T + h - B) / 2:.0f}" text-anchor="middle" transform="rotate(-90 16 {(T + h - B) / 2:.0f})">{ylabel}</text>')
    for k, (name, c) in enumerate(curves.items()):
        color = colors[k % len(colors)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in c)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        out.append(f'<text x="{w - R - 120}" y="{T + 16 + 16 * k}" fill="{color}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
