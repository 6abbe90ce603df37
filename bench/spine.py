"""Speed, memory and size of jishi's bundles against the peers, on the default base, in one sitting.

    python bench/spine.py [--repeats 3] [--threads 2] [--peers-python .venv-peers/bin/python]

Builds what is missing (jishi fp32/int8/int4 bundles, a Hugging Face directory of the
base, onnxruntime-genai's int4 model of that directory), then runs every system in a
fresh process, one after another, alternating, ``--repeats`` times, and reports medians
and ratios to jishi int4. onnxruntime-genai's builder and llama-cpp-python need
transformers 5 and a compiler; they live in their own environment (bench/setup_peers.sh).
The CPU time other processes used during each run is recorded; runs where it was high
are marked. Writes bench/results/spine-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"


def prompts(tokenizer_json: Path) -> dict:
    """The same token ids for everyone: a 500-token prefill and a chat prompt of about 100 tokens."""
    from tokenizers import Tokenizer

    from jishi.heldout import heldout_text

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = tok.encode(heldout_text(), add_special_tokens=False).ids
    question = tok.decode(ids[:80])
    chat = f"<|im_start|>user\nSummarise this text in two sentences:\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return {"prefill": ids[:500], "chat": tok.encode(chat, add_special_tokens=False).ids}


def ensure_inputs(peers_python: str | None) -> dict[str, tuple[str, str, str]]:
    """name → (system, path, python) for every system that can run here."""
    from jishi.distill.base import fetch_known, load_base
    from jishi.pipeline import build

    WORK.mkdir(parents=True, exist_ok=True)
    gguf = fetch_known("smollm2-135m-instruct")
    hf_dir = WORK / "smollm2-hf"
    base = None
    if not (hf_dir / "config.json").exists():
        base = load_base()
        base.model.save_pretrained(hf_dir)
        base.tokenizer.save_pretrained(hf_dir)
    systems = {}
    for quant in ("fp32", "int8", "int4"):
        out = WORK / f"jishi-{quant}"
        if not (out / "manifest.json").exists():
            base = base or load_base()
            build(base, quant, out, evaluate=False)
        systems[f"jishi {quant}"] = ("jishi", str(out), sys.executable)
    systems["transformers fp32"] = ("torch", str(hf_dir), sys.executable)
    if peers_python and Path(peers_python).exists():
        genai = WORK / "genai-int4"
        if not (genai / "genai_config.json").exists():
            subprocess.run([peers_python, "-m", "onnxruntime_genai.models.builder", "-m", "HuggingFaceTB/SmolLM2-135M-Instruct",
                            "-i", str(hf_dir), "-o", str(genai), "-p", "int4", "-e", "cpu", "-c", str(WORK / "genai-cache")],
                           check=True)
        systems["onnxruntime-genai int4"] = ("genai", str(genai), peers_python)
        systems["llama.cpp Q4_1 (as shipped)"] = ("llamacpp", str(gguf), peers_python)
    else:
        print("peers' environment not found: only jishi and transformers run (see bench/setup_peers.sh)", file=sys.stderr)
    return systems


def size_mb(path: str) -> float:
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and f.suffix in (".onnx", ".data", ".safetensors", ".gguf")]
    return round(sum(f.stat().st_size for f in files) / 1e6, 1)


def busy_cpu_seconds() -> float:
    """CPU seconds used by every process so far (from /proc/stat), to see what others did during a run."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = (int(x) for x in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(system, path, python, prompt_file, threads) -> dict:
    before, own_before = busy_cpu_seconds(), children_cpu_seconds()
    t = time.perf_counter()
    done = subprocess.run([python, str(ROOT / "bench" / "worker.py"), system, path, str(prompt_file), str(threads)],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # CPU the machine spent during the run beyond the worker's own was someone else's.
    own = children_cpu_seconds() - own_before
    result["others_cpu_s"] = round(max(0.0, busy_cpu_seconds() - before - own), 2)
    result["process_s"] = round(wall, 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers-python", default=str(ROOT / ".venv-peers" / "bin" / "python"))
    ap.add_argument("--only", nargs="*", help="names of systems to run (default all)")
    args = ap.parse_args()

    systems = ensure_inputs(args.peers_python)
    if args.only:
        systems = {k: v for k, v in systems.items() if any(o in k for o in args.only)}
    prompt_file = WORK / "prompts.json"
    prompt_file.write_text(json.dumps(prompts(WORK / "jishi-int4" / "tokenizer.json")))

    runs: dict[str, list[dict]] = {k: [] for k in systems}
    for r in range(args.repeats):
        for name, (system, path, python) in systems.items():
            res = run_once(system, path, python, prompt_file, args.threads)
            runs[name].append(res)
            print(f"[{r + 1}/{args.repeats}] {name:30s} decode {res['decode_tok_s']:7.1f} tok/s  prefill "
                  f"{res['prefill_tok_s']:7.1f} tok/s  rss {res['peak_rss_mb']:6.0f} MB  others {res['others_cpu_s']} s",
                  file=sys.stderr)

    keys = ("prefill_tok_s", "ttft_ms", "decode_tok_s", "peak_rss_mb", "load_s", "process_s")
    summary = {}
    for name, rs in runs.items():
        summary[name] = {k: statistics.median(r[k] for r in rs) for k in keys}
        summary[name]["size_mb"] = size_mb(systems[name][1])
    ref = summary.get("jishi int4")
    if ref:
        for s in summary.values():
            s["decode_vs_jishi_int4"] = round(s["decode_tok_s"] / ref["decode_tok_s"], 3)
            s["prefill_vs_jishi_int4"] = round(s["prefill_tok_s"] / ref["prefill_tok_s"], 3)

    header = "| system | size MB | prefill tok/s | TTFT ms | decode tok/s | peak RSS MB | decode ÷ jishi int4 |"
    lines = [header, "|" + "---|" * 7]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['size_mb']:.0f} | {s['prefill_tok_s']:.0f} | {s['ttft_ms']:.0f} | "
                     f"{s['decode_tok_s']:.0f} | {s['peak_rss_mb']:.0f} | {s.get('decode_vs_jishi_int4', 1):.2f} |")
    print("\n".join(lines))

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"spine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "machine": os.uname().machine,
                               "cpu_count": os.cpu_count(), "summary": summary, "runs": runs}, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
