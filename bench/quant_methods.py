"""int4 methods on weights that lie on no 4-bit grid: a pruned, briefly distilled student of the default base.

    python bench/quant_methods.py                  # the student (a few minutes of training), then every method
    python bench/quant_methods.py --only gptq-act  # some rows only
    python bench/quant_methods.py --fresh awq      # measure a row again
    python bench/quant_methods.py --model rotated  # the teacher on no grid (same logits), every method
    python bench/quant_methods.py --only llamacpp-f32,llamacpp-q4_k_m,llamacpp-q4_0  # llama.cpp's rows only

Run by hand, not in CI. The student is SmolLM2-135M-Instruct (``load_base("smollm2-135m-instruct")``,
cached under ~/.cache/jishi) with 20 of its 30 blocks kept by block influence and distilled for
``--steps`` steps on the calibration text; it lives under ``--work`` and its training resumes from its
checkpoint. Every row is a bundle built from it (``jishi.pipeline.build``) and measured on the held-out
text against the student's own fp32 weights in torch (perplexity and top-1 agreement), plus KL against
the teacher; each finished row is written at once to ``--out`` (JSON) and skipped on the next run, so an
interrupted run continues where it stopped. Rows: round-to-nearest, GPTQ in input order, GPTQ by
activation order (static groups), AWQ scaling with rounding, AWQ scaling with GPTQ, int8, and
round-to-nearest and both GPTQ walks onto integer zero points (MatMulNBits' own grid), all at block 32; then the best int4 method at blocks 16 and 64. Last, on a few layers, how much of the distillation each
method takes back (the student is the pruned teacher plus a small change). The table is printed as markdown.

llama.cpp's quantizations of the same student are rows of the same table, as anchors: the student is written
once to an F32 GGUF (``jishi.distill.gguf_write``, tokenizer from the teacher's GGUF) under ``--work``/llamacpp,
quantized by llama.cpp's own quantizer to Q4_K_M and Q4_0 (bench/llamacpp_models.py), also with an importance
matrix (each linear layer's mean squared input per column, measured in torch on the calibration sequences
GPTQ uses, passed as ``llama-quantize --imatrix`` passes one), and scored by llama.cpp on the very windows and
reference argmax of the other rows (bench/llamacpp_score.py). Both scripts run in the peers' interpreter
(``--peers-python``, made by bench/setup_peers.sh). The F32 file scored the same way is the check row: it
must give the torch fp32 perplexity to about 0.1%, or the converter or the scorer is wrong. llama.cpp rows
have no KL against the teacher, and their build time is llama.cpp's quantizing alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# label → (quant, build options)
# Every option is named, so that a row means the same whatever the build's defaults become.
EXACT = {"zero_points": "exact"}
ROWS = {
    "rtn": ("int4", {"method": "rtn", **EXACT}),
    "gptq": ("int4", {"method": "gptq", "act_order": False, **EXACT}),
    "gptq-act": ("int4", {"method": "gptq", "act_order": True, **EXACT}),
    "awq": ("int4", {"method": "awq", **EXACT}),
    "awq-gptq": ("int4", {"method": "awq-gptq", "act_order": False, **EXACT}),
    "int8": ("int8", {}),
    # the same methods onto MatMulNBits' own grid (integer zero points): no correction path, faster to run
    "rtn-int": ("int4", {"method": "rtn", "zero_points": "integer"}),
    "gptq-int": ("int4", {"method": "gptq", "act_order": False, "zero_points": "integer"}),
    "gptq-act-int": ("int4", {"method": "gptq", "act_order": True, "zero_points": "integer"}),
    # the default GPTQ, then a LoRA trained against those very codes (jishi build --recover-steps), measured with it active
    "gptq-lora": ("int4", {"method": "gptq", "act_order": True, "zero_points": "integer", "recover_steps": 24}),
}
NAMES = {"rtn": "int4 round-to-nearest", "gptq": "int4 GPTQ, input order", "gptq-act": "int4 GPTQ, activation order",
         "awq": "int4 AWQ scaling + round-to-nearest", "awq-gptq": "int4 AWQ scaling + GPTQ",
         "int8": "int8 round-to-nearest", "rtn-int": "int4 round-to-nearest, integer zero points",
         "gptq-int": "int4 GPTQ, input order, integer zero points",
         "gptq-act-int": "int4 GPTQ, activation order, integer zero points",
         "gptq-lora": "int4 GPTQ, activation order, integer zero points + grid LoRA (24 steps of 4 x 256 tokens, rank 16)",
         "llamacpp-f32": "llama.cpp F32 (check: should equal fp32)", "llamacpp-q4_k_m": "llama.cpp Q4_K_M",
         "llamacpp-q4_0": "llama.cpp Q4_0", "llamacpp-q4_k_m-imatrix": "llama.cpp Q4_K_M + importance matrix",
         "llamacpp-q4_0-imatrix": "llama.cpp Q4_0 + importance matrix"}
# llama.cpp's own quantizer on the same student: label → (llama.cpp type, with an importance matrix)
LLAMACPP = {"llamacpp-f32": ("F32", False), "llamacpp-q4_k_m": ("Q4_K_M", False), "llamacpp-q4_0": ("Q4_0", False),
            "llamacpp-q4_k_m-imatrix": ("Q4_K_M", True), "llamacpp-q4_0-imatrix": ("Q4_0", True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["student", "rotated"], default="student",
                    help="student: the pruned, briefly distilled student (its weights are the teacher's grid plus a "
                         "small change); rotated: the teacher itself with its residual stream turned by a random "
                         "rotation (jishi.distill.rotate): the same logits, weights on no grid, as a Hugging Face "
                         "fp16/bf16 checkpoint arrives")
    ap.add_argument("--layers", type=int, default=20, help="blocks the student keeps (default 20 of 30)")
    ap.add_argument("--steps", type=int, default=16, help="distillation steps of 4 x 256 tokens (default 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", default="16,64", help="other block sizes for the best int4 method (default 16,64; '' for none)")
    ap.add_argument("--only", help="labels to run, comma-separated (e.g. rtn,gptq-act,gptq-act@64)")
    ap.add_argument("--fresh", action="append", default=[], metavar="LABEL", help="measure this row again")
    ap.add_argument("--undone", default="0,5,10", help="student layers on which to measure how much of the "
                    "distillation each method undoes (default 0,5,10; '' for none)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "quant-methods"))
    ap.add_argument("--peers-python", default=str(ROOT / ".venv-peers" / "bin" / "python"),
                    help="the interpreter with llama-cpp-python, for llama.cpp's rows (default .venv-peers)")
    ap.add_argument("--out", help="results JSON (default bench/results/quant_methods.json, or "
                    "quant_methods-rotated.json for --model rotated)")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / ("quant_methods.json" if args.model == "student"
                                                     else "quant_methods-rotated.json"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    work, out = Path(args.work) / ("rotated" if args.model == "rotated" else ""), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    only = set(args.only.split(",")) if args.only else None

    from jishi.distill.base import load_base

    teacher = load_base("smollm2-135m-instruct")
    if args.model == "rotated":
        student_dir = make_rotated(teacher, work)
        student = load_base(str(student_dir))
        results["student"] = {"teacher": teacher.name, "rotated": True, "seed": 0}
        args.undone = ""  # nothing was distilled
    else:
        student_dir = make_student(teacher, work, args)
        student = load_base(str(student_dir))
        results["student"] = describe_student(student_dir)
    results["machine"] = {"threads": args.threads, "cpus": os.cpu_count()}

    def run(label: str, measuring) -> None:
        if (only and label not in only) or (label in results["rows"] and label not in args.fresh):
            return
        print(f"== {label}", file=sys.stderr, flush=True)
        results["rows"][label] = measuring()
        save(out, results)

    for label, (quant, options) in ROWS.items():
        run(label, lambda: measure(student, teacher, work, label, quant, options, 32))
    for label, (kind, imatrix) in LLAMACPP.items():
        run(label, lambda: measure_llamacpp(student, Path(teacher.source), work / "llamacpp" / student_dir.name,
                                            kind, imatrix, args))
    int4 = {k: v for k, v in results["rows"].items()
            if v["quant"] == "int4" and v["block"] == 32 and not v.get("recover_steps")}
    if int4 and args.blocks:
        best = min(int4, key=lambda k: int4[k]["perplexity"])
        for block in (int(b) for b in args.blocks.split(",") if b):
            quant, options = ROWS[best]
            run(f"{best}@{block}", lambda: measure(student, teacher, work, f"{best}@{block}", quant, options, block))
    layers = tuple(int(x) for x in args.undone.split(",") if x)
    if layers and ("undone" not in results or "undone" in args.fresh):
        print("== undone", file=sys.stderr, flush=True)
        results["undone"] = undone(student, teacher, student_dir, layers)
    save(out, results)
    print(table(results))


def make_student(teacher, work: Path, args) -> Path:
    """The pruned, briefly distilled student (resumes its training; done once)."""
    from jishi.distill.kd import KDConfig
    from jishi.distill.student import DistillOptions, distill
    from jishi.heldout import calibration_text

    out = work / f"student-L{args.layers}-s{args.steps}"
    if (out / "jishi_distill.json").is_file():
        return out
    data = work / "calibration.txt"
    if not data.is_file():
        data.write_text(calibration_text(), encoding="utf-8")
    config = KDConfig(steps=args.steps, batch_size=4, seq_len=256, eval_every=max(1, args.steps // 4),
                      checkpoint_every=max(1, args.steps // 4), eval_windows=4)
    distill(teacher, out, DistillOptions(layers=args.layers, data=(str(data),), resume=True), config)
    return out


def make_rotated(teacher, work: Path) -> Path:
    """The teacher with its residual stream rotated, as a Hugging Face directory (done once)."""
    import copy

    from jishi.distill.rotate import rotate_residual

    out = work / "rotated-s0"
    if not (out / "config.json").is_file():
        model = rotate_residual(copy.deepcopy(teacher.model).float(), seed=0)
        model.save_pretrained(out)
        teacher.tokenizer.save_pretrained(out)
    return out


def describe_student(path: Path) -> dict:
    rec = json.loads((path / "jishi_distill.json").read_text())
    training = rec["training"]
    return {"teacher": rec["teacher"]["name"], "layers_kept": rec["plan"]["layers"], "steps": training["steps_done"],
            "tokens": training["tokens"], "heldout_kl_before": rec["heldout"]["before"], "heldout_kl_after": rec["heldout"]["after"]}


def measure(student, teacher, work: Path, label: str, quant: str, options: dict, block: int) -> dict:
    import shutil

    from jishi.pipeline import build
    from jishi.runtime.bundle import open_bundle

    target = work / "bundles" / label.replace("@", "-b")
    shutil.rmtree(target, ignore_errors=True)
    load = os.getloadavg()[0]
    t0 = time.time()
    recovering = bool(options.get("recover_steps"))
    build(student, quant, target, block=block, teacher=teacher, merge_points=recovering or False, **options)
    seconds = time.time() - t0
    bundle = open_bundle(target)
    q, ev = bundle.manifest.graph.quantization, bundle.manifest.evaluation
    cal = q.get("calibration") or {}
    if quant == "int4" and not cal:  # round-to-nearest calibrates nothing: its layer output error measured the same way
        cal = {"output_error": rtn_output_error(student, block, options.get("zero_points", "exact") == "exact")}
    # with the grid LoRA: the figures with it active (the KL against the teacher is measured without adapters)
    got = ev["recovered"] if recovering else ev
    row = {"quant": quant, "block": block, "method": q.get("method"), **{k: v for k, v in options.items() if k != "method"},
           "perplexity": got["perplexity"], "fp32_perplexity": ev["reference_perplexity"],
           "vs_fp32": round(got["perplexity"] / ev["reference_perplexity"] - 1, 4), "top1_vs_fp32": got["top1_agreement"],
           "kl_vs_teacher": None if recovering else ev["teacher"]["kl"], "teacher_perplexity": ev["teacher"]["perplexity"],
           **({"without_lora": {"perplexity": ev["perplexity"], "top1_vs_fp32": ev["top1_agreement"]},
               "recovery": ev["recovered"]} if recovering else {}),
           "layer_output_error": cal.get("output_error"), "awq_alpha": cal.get("awq_alpha"),
           "size_mb": round(bundle.size / 1e6, 1), "build_seconds": round(seconds, 1), "load_avg_at_start": round(load, 2),
           "heldout": ev["heldout"], "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    shutil.rmtree(target, ignore_errors=True)  # the figures are what is kept
    shutil.rmtree(target.with_name(target.name + ".recover"), ignore_errors=True)
    return row


def measure_llamacpp(student, reference: Path, where: Path, kind: str, imatrix: bool, args) -> dict:
    """llama.cpp's ``kind`` of the student, made by llama.cpp's quantizer from the student's F32 GGUF (written
    once) and scored by llama.cpp on the held-out windows the other rows are scored on."""
    from jishi.distill.gguf_write import write_gguf
    from llamacpp_models import describe

    if not Path(args.peers_python).is_file():
        raise SystemExit(f"{args.peers_python} is missing: llama.cpp's rows need llama-cpp-python "
                         "(bash bench/setup_peers.sh, or --peers-python PYTHON)")
    where.mkdir(parents=True, exist_ok=True)
    f32 = where / "f32.gguf"
    if not f32.is_file():
        write_gguf(student.model, reference, f32, name=where.name)
    fp32, heldout = heldout_windows(student, where)
    load = os.getloadavg()[0]
    t0 = time.time()
    target = f32
    if kind != "F32":
        target = where / f"{kind}{'-imatrix' if imatrix else ''}.gguf"
        target.unlink(missing_ok=True)  # made anew whenever its row is measured
        peers(args, ROOT / "bench" / "llamacpp_models.py", f32, where, "--types", kind, "--threads", args.threads,
              *(("--imatrix", importance_matrix(student, where)) if imatrix else ()))
    seconds = time.time() - t0
    score = peers(args, ROOT / "bench" / "llamacpp_score.py", target, where / "windows.npy", where / "top.npy",
                  "--threads", args.threads)
    made = describe(target)
    return {"quant": "llama.cpp", "block": None if kind == "F32" else 32, "method": kind, "imatrix": imatrix,
            "perplexity": score["perplexity"], "fp32_perplexity": fp32, "vs_fp32": round(score["perplexity"] / fp32 - 1, 4),
            "top1_vs_fp32": score["top1_agreement"], "kl_vs_teacher": None, "teacher_perplexity": None,
            "layer_output_error": None, "awq_alpha": None, "size_mb": made["size_mb"],
            "tensor_types": made["tensor_types"], "build_seconds": round(seconds, 1), "kv_cache": score["cache"],
            "score_seconds": score["seconds"], "load_avg_at_start": round(load, 2), "heldout": heldout,
            "measured_at": time.strftime("%Y-%m-%d %H:%M")}


def peers(args, script: Path, *argv) -> dict:
    """The JSON line a bench script prints, run in the peers' interpreter (llama-cpp-python)."""
    import subprocess

    done = subprocess.run([args.peers_python, str(script), *map(str, argv)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script.name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def heldout_windows(student, where: Path) -> tuple[float, str]:
    """The held-out windows the build's evaluation scores (the student's tokenizer, windows of min(512, its
    positions), no BOS) and the student's fp32 argmax at every position, saved for llamacpp_score.py; returns
    the fp32 perplexity on them and their description. The torch figures are cached on ``student`` exactly as
    the build's evaluation caches them, so every row compares with the same reference."""
    import numpy as np

    from jishi.distill.evaluate import reference_stats
    from jishi.heldout import WINDOW, heldout_text, windows

    wins = windows(student.runtime_tokenizer().encode(heldout_text(), bos=False),
                   min(WINDOW, student.model.config.max_position_embeddings))
    key = (len(wins), len(wins[0]))
    if key not in student.reference_stats:
        student.reference_stats[key] = reference_stats(student.model, wins)
    logp, top = student.reference_stats[key]
    np.save(where / "windows.npy", np.array(wins, np.int32))
    np.save(where / "top.npy", np.array(top, np.int32))
    nll = -sum(float(lp.sum()) for lp in logp)
    return (round(float(np.exp(nll / sum(len(w) - 1 for w in wins))), 4),
            f"pydoc_data.topics, first 20000 characters, {len(wins)} windows of {len(wins[0])} tokens, no BOS")


def importance_matrix(student, where: Path) -> Path:
    """llama.cpp's importance matrix of the student, measured in torch: every linear layer's mean squared input
    per column over the calibration sequences jishi's GPTQ uses (16 x 256 tokens of the calibration text), by
    GGUF tensor name. The head is left out, as llama-imatrix leaves it out by default. Made once."""
    import numpy as np
    import torch

    from jishi.distill.gguf_write import gguf_name
    from jishi.distill.prune import calibration_batches

    path = where / "imatrix.npz"
    if path.is_file():
        return path
    sums, counts = {}, {}

    def recorder(name):
        def record(module, inputs):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + len(x)
        return record

    hooks = [m.register_forward_pre_hook(recorder(gguf_name(f"{n}.weight"))) for n, m in student.model.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    try:
        with torch.no_grad():
            for batch in calibration_batches(student.runtime_tokenizer(), 16, 256):
                student.model(batch)
    finally:
        for h in hooks:
            h.remove()
    tmp = where / "imatrix.part.npz"
    np.savez(tmp, **{k: (sums[k] / counts[k]).float().numpy() for k in sums})
    os.replace(tmp, path)
    return path


def undone(student, teacher, student_dir: Path, layers) -> dict:
    """How much of the distillation each method takes back, per layer and input: the student's weights are
    the pruned teacher's plus a change Δ; with e = Ŵ − W the error a method leaves, the share undone is
    ⟨e, −Δ⟩ / ⟨Δ, Δ⟩ in the layer-output inner product ⟨a, b⟩ = tr(a·H·bᵀ) (1: all of Δ rounded away)."""
    import numpy as np

    from jishi.distill.prune import calibration_batches
    from jishi.export.calibrate import READERS, layer_statistics, quantize_group
    from jishi.export.from_torch import model_config, numpy_weights

    kept = json.loads((student_dir / "jishi_distill.json").read_text())["plan"]["layers"]
    cfg = model_config(student.model.config, 256)
    ws = numpy_weights(student.model, cfg)
    wt = numpy_weights(teacher.model, model_config(teacher.model.config, 256))
    out = {}
    for i, stats in layer_statistics(student.model, calibration_batches(student.runtime_tokenizer(), 16, 256)):
        if i > max(layers):
            break
        if i not in layers:
            continue
        for key, readers in READERS.items():
            w = np.concatenate([ws[f"model.layers.{i}.{r}.weight"] for r in readers])
            delta = w - np.concatenate([wt[f"model.layers.{kept[i]}.{r}.weight"] for r in readers])
            H = stats[key].hessian
            row = {}
            for label, method, act_order in (("rtn", "rtn", False), ("gptq", "gptq", False), ("gptq-act", "gptq", True)):
                e = quantize_group(w, stats[key], method, act_order=act_order)[0].dequantize() - w
                row[label] = round(float(-np.einsum("ij,ij->", e @ H, delta) / np.einsum("ij,ij->", delta @ H, delta)), 3)
            out[f"layer {i} {key}"] = row
    return out


def rtn_output_error(student, block: int, exact: bool = True) -> float:
    from jishi.distill.prune import calibration_batches
    from jishi.export.calibrate import calibrate
    from jishi.export.from_torch import model_config, numpy_weights

    cfg = model_config(student.model.config, 256)
    batches = calibration_batches(student.runtime_tokenizer(), 16, 256)
    return calibrate(student.model, cfg, numpy_weights(student.model, cfg), batches, "rtn", 4, block,
                     exact_zero_points=exact).record["output_error"]


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def table(results: dict) -> str:
    rows = results["rows"]
    fp32 = next(iter(rows.values()))["fp32_perplexity"] if rows else float("nan")
    lines = [f"student fp32 perplexity {fp32:.2f}",
             "| weights | block | perplexity | vs fp32 | top-1 vs fp32 | KL vs teacher | layer output error | size MB | build s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        err = "" if r["layer_output_error"] is None else f"{r['layer_output_error']:.4f}"
        kl = "" if r["kl_vs_teacher"] is None else f"{r['kl_vs_teacher']:.3f}"
        block = "" if r["block"] is None else r["block"]
        lines.append(f"| {NAMES[label.split('@')[0]]} | {block} | {r['perplexity']:.2f} | {100 * r['vs_fp32']:+.1f}% | "
                     f"{100 * r['top1_vs_fp32']:.1f}% | {kl} | {err} | {r['size_mb']:.0f} | {r['build_seconds']:.0f} |")
    types = {label: r["tensor_types"] for label, r in rows.items() if r.get("tensor_types")}
    if types:
        lines += ["", "tensor types llama.cpp chose (block: of its 4-bit types; Q4_K's 32-value scales sit in blocks of 256):"]
        lines += [f"- {NAMES[label]}: " + ", ".join(f"{k} {v}" for k, v in t.items()) for label, t in types.items()]
    if results.get("undone"):
        lines += ["", "share of the distillation undone (layer-output metric):", "| layer, input | rtn | gptq | gptq-act |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v['rtn']:.2f} | {v['gptq']:.2f} | {v['gptq-act']:.2f} |" for k, v in results["undone"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
