"""Speed, memory and size of jishi's bundles against the peers, on one known base, in one sitting.

    python bench/spine.py [--base smollm2-135m-instruct|gemma3-270m] [--repeats 3] [--threads 2]
                          [--peers-python .venv-peers/bin/python] [--fp32] [--torch] [--only NAME ...]

Builds what is missing under bench/work/<base>/: jishi's default bundle of the base (the GGUF's
own grids, ``quant gguf``), its int4 and int8 bundles (and fp32 with ``--fp32``), llama.cpp's
files (the shipped GGUF as it is, plus Q4_0, Q4_K_M and Q8_0 quantized by llama.cpp from an
fp32 GGUF of the same weights, bench/llamacpp_models.py), a Hugging Face directory of the base
and onnxruntime-genai's int4 model of it (where its builder takes the model; else its refusal
is recorded). Then runs every system in a fresh process (bench/worker.py), one after another,
alternating, ``--repeats`` times, and reports medians and ratios to jishi's default bundle.

Before the rounds, llama.cpp runs once per setting on the shipped file (flash attention on and
off; its OpenMP threads spinning, the default, or waiting passively, which matters when other
work holds the cores); the fastest decode is the setting every llama.cpp row gets (every probe
is in the JSON).
onnxruntime-genai's builder and llama-cpp-python need transformers 5 and a compiler; they live
in their own environment (bench/setup_peers.sh). The CPU time other processes used during each
run and the load average are recorded; runs where others used more than ``--noisy`` cores on
average are marked. Writes bench/results/spine-<base>-<date>.json and .md (the table); ``--pool A.json B.json``
makes one table of several sittings' runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT = "jishi gguf (default)"
BASES = ("smollm2-135m-instruct", "gemma3-270m")
LLAMACPP_TYPES = ("Q4_0", "Q4_K_M", "Q8_0")


def cpu_info() -> dict:
    """The CPU's name and the vector ISA the kernels can use (from /proc/cpuinfo)."""
    info = {"machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = {}
    for line in text.splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    info.update(name=fields.get("model name"), family=fields.get("cpu family"), model=fields.get("model"),
                isa=[f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                 "amx_int8") if f in flags])
    return info


def isa_label(cpu: dict) -> str:
    isa = cpu.get("isa", [])
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in isa]
    return ", ".join(shown) or "no AVX2"


def prompts(tokenizer, long: int = 0) -> dict:
    """The same token ids for everyone: a 500-token prefill and a prompt of about 100 tokens; with
    ``long``, the same request over about that many tokens of text (decode after a long prompt).

    The chat prompt uses the base's chat template; a pretrained base without one (Gemma 3 270M)
    gets the same request as plain text. Both start with BOS where the base adds it."""
    from jishi.heldout import heldout_text

    ids = tokenizer.encode(heldout_text(), bos=False)
    bos = [tokenizer.bos_id] if tokenizer.info.add_bos and tokenizer.bos_id is not None else []

    def request(n: int) -> list[int]:
        text = f"Summarise this text in two sentences:\n{tokenizer.decode(ids[:n])}"
        if tokenizer.info.chat_template:
            return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
        return tokenizer.encode(f"{text}\n\nSummary:")

    out = {"prefill": bos + ids[:500 - len(bos)], "chat": request(80)}
    if long:
        if len(ids) < long:
            raise SystemExit(f"the held-out text has {len(ids)} tokens: --long {long} is more")
        out["long"] = request(long - (len(out["chat"]) - 80))
    return out


def gguf_type_label(path: Path) -> str:
    """The quantization a GGUF file's name says (SmolLM2-135M-Instruct.Q4_1.gguf: Q4_1)."""
    found = re.search(r"(?i)(?<![a-z0-9])(i?q\d_k_[sml]|i?q\d_k|q\d_\d|bf16|f16|f32)(?![a-z0-9])", path.stem)
    return found.group(1).upper() if found else "GGUF"


def run_logged(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_jishi(base_name: str, work: Path, fp32: bool) -> tuple[dict, object]:
    from jishi.distill.base import load_base
    from jishi.pipeline import build

    base = None
    systems = {}
    # (name, quant, folder, build options): the last int4 leaves the GGUF's grids for MatMulNBits' own (GPTQ onto
    # integer zero points: no correction side path), measured for quality by its build's evaluation
    quants = [(DEFAULT, None, "jishi-gguf", {}), ("jishi int4", "int4", "jishi-int4", {}),
              ("jishi int4 integer", "int4", "jishi-int4-integer", {"method": "gptq", "zero_points": "integer"}),
              ("jishi int8", "int8", "jishi-int8", {})]
    if fp32:
        quants.append(("jishi fp32", "fp32", "jishi-fp32", {}))
    for name, quant, folder, options in quants:
        out = work / folder
        if not (out / "manifest.json").exists():
            base = base or load_base(base_name)
            build(base, quant, out, evaluate=bool(options), **options)
        manifest = json.loads((out / "manifest.json").read_text())
        q = manifest["graph"]["quantization"]
        systems[name] = {"system": "jishi", "path": str(out), "python": sys.executable,
                         "settings": {"quantization": {k: v for k, v in q.items() if k in ("name", "block", "accuracy_level",
                                                                                             "zero_point_correction", "formats",
                                                                                             "method")},
                                      "perplexity": {k: manifest["evaluation"].get(k) for k in
                                                     ("perplexity", "reference_perplexity", "top1_agreement")}
                                      if manifest.get("evaluation") else None,
                                      "merge_points": bool(manifest.get("merge_points")), "runtime": "jishi.load defaults"}}
    return systems, base


def ensure_hf_dir(base_name: str, work: Path, base) -> tuple[Path, object]:
    from jishi.distill.base import load_base

    hf_dir = work / "hf"
    if not (hf_dir / "config.json").exists():
        base = base or load_base(base_name)
        base.model.save_pretrained(hf_dir)
        base.tokenizer.save_pretrained(hf_dir)
    return hf_dir, base


def ensure_llamacpp(gguf: Path, work: Path, peers_python: str, threads: int) -> dict:
    done = run_logged([peers_python, str(ROOT / "bench" / "llamacpp_models.py"), str(gguf), str(work / "llamacpp"),
                       "--types", *LLAMACPP_TYPES, "--threads", str(threads)])
    if done.returncode:
        raise SystemExit(f"making llama.cpp's files failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ensure_genai(hf_id: str, hf_dir: Path, work: Path, peers_python: str, threads: int) -> tuple[Path | None, dict]:
    """onnxruntime-genai's int4 model of the Hugging Face directory, or why its builder refused."""
    genai = work / "genai-int4"
    cmd = [peers_python, "-m", "onnxruntime_genai.models.builder", "-m", hf_id, "-i", str(hf_dir), "-o", str(genai),
           "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")]
    written_by = json.loads((hf_dir / "config.json").read_text()).get("transformers_version")
    record = {"builder_command": " ".join(["python"] + cmd[1:]), "hf_config_written_by_transformers": written_by}
    if not (genai / "genai_config.json").exists():
        done = run_logged(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if done.returncode or not (genai / "genai_config.json").exists():
            record["refused"] = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
            return None, record
    config_file = genai / "genai_config.json"
    config = json.loads(config_file.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != threads:
        options["intra_op_num_threads"] = threads  # the same threads as everyone (else all cores)
        config_file.write_text(json.dumps(config, indent=4))
    record["session_options"] = options
    return genai, record


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


def run_once(spec: dict, prompt_file: Path, threads: int, tokens: int) -> dict:
    cmd = [spec["python"], str(ROOT / "bench" / "worker.py"), spec["system"], spec["path"], str(prompt_file), str(threads),
           str(tokens), *spec.get("worker_args", [])]
    load_before = os.getloadavg()[0]
    before, own_before = busy_cpu_seconds(), children_cpu_seconds()
    t = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), **spec.get("env", {}))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"{spec['system']} {spec['path']} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # CPU the machine spent during the run beyond the worker's own was someone else's.
    own = children_cpu_seconds() - own_before
    result["others_cpu_s"] = round(max(0.0, busy_cpu_seconds() - before - own), 2)
    result["process_s"] = round(wall, 2)
    result["others_cores"] = round(result["others_cpu_s"] / wall, 2)
    result["loadavg_1m_before"] = round(load_before, 2)
    return result


def probe_llamacpp(shipped: str, peers_python: str, prompt_file: Path, threads: int, tokens: int,
                   flash_attn: str, wait: str) -> dict:
    """llama.cpp once per setting on the shipped file: flash attention on and off, and its OpenMP
    threads waiting actively (spinning, the default) or passively between jobs. The fastest decode wins."""
    choices = [(fa, w) for fa in (("off", "on") if flash_attn == "auto" else (flash_attn,))
               for w in (("active", "passive") if wait == "auto" else (wait,))]
    runs = {}
    for fa, w in choices:
        spec = {"system": "llamacpp", "path": shipped, "python": peers_python, "worker_args": ["--flash-attn", fa],
                "env": {"OMP_WAIT_POLICY": w.upper()}}
        key = f"flash_attn {fa}, OMP_WAIT_POLICY {w}"
        try:
            runs[key] = {"flash_attn": fa, "wait": w, **run_once(spec, prompt_file, threads, tokens)}
        except RuntimeError as e:
            runs[key] = {"flash_attn": fa, "wait": w, "error": str(e)[-500:]}
            continue
        r = runs[key]
        print(f"llama.cpp {key}: decode {r['decode_tok_s']} tok/s, prefill {r['prefill_tok_s']} tok/s, "
              f"others {r['others_cores']} cores", file=sys.stderr)
    ok = [r for r in runs.values() if "decode_tok_s" in r]
    best = max(ok, key=lambda r: r["decode_tok_s"]) if ok else {"flash_attn": "off", "wait": "active"}
    return {"chosen": {"flash_attn": best["flash_attn"], "wait": best["wait"]}, "runs": runs}


SUMMARY_KEYS = ("prefill_tok_s", "ttft_ms", "decode_tok_s", "peak_rss_mb", "load_s", "process_s", "others_cores")


def summarise(runs: dict[str, list[dict]], sizes: dict[str, float]) -> dict:
    """Medians per system, and ratios of the medians to jishi's default bundle."""
    summary = {}
    for name, rs in runs.items():
        s = summary[name] = {k: statistics.median(r[k] for r in rs) for k in SUMMARY_KEYS}
        if all("decode_long_tok_s" in r for r in rs):
            s["decode_long_tok_s"] = statistics.median(r["decode_long_tok_s"] for r in rs)
            s["long_vs_short"] = round(statistics.median(r["decode_long_tok_s"] / r["decode_tok_s"] for r in rs), 3)
        s["size_mb"] = sizes[name]
        s["runs"] = len(rs)
        s["noisy_runs"] = sum(r["noisy"] for r in rs)
        quiet = [r for r in rs if not r["noisy"]]
        if quiet and len(quiet) < len(rs):
            s["decode_tok_s_quiet_runs"] = statistics.median(r["decode_tok_s"] for r in quiet)
    ref = summary.get(DEFAULT)
    if ref:
        for s in summary.values():
            s["decode_vs_default"] = round(s["decode_tok_s"] / ref["decode_tok_s"], 3)
            s["prefill_vs_default"] = round(s["prefill_tok_s"] / ref["prefill_tok_s"], 3)
    return summary


def table_lines(summary: dict) -> list[str]:
    long = all("long_vs_short" in s for s in summary.values()) and bool(summary)
    lines = ["| system | size MB | prefill tok/s | TTFT ms | decode tok/s | peak RSS MB | load s | decode ÷ default | "
             "prefill ÷ default | " + ("decode after the long prompt tok/s | long ÷ short | " if long else "")
             + "noisy runs |", "|" + "---|" * (12 if long else 10)]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['size_mb']:.0f} | {s['prefill_tok_s']:.0f} | {s['ttft_ms']:.0f} | "
                     f"{s['decode_tok_s']:.0f} | {s['peak_rss_mb']:.0f} | {s['load_s']:.2f} | "
                     f"{s.get('decode_vs_default', 1):.2f} | {s.get('prefill_vs_default', 1):.2f} | "
                     + (f"{s['decode_long_tok_s']:.0f} | {s['long_vs_short']:.2f} | " if long else "")
                     + f"{s['noisy_runs']}/{s['runs']} |")
    return lines


def pool(files: list[Path]) -> None:
    """One table from several sittings of one base: medians over all their runs (systems in every sitting)."""
    data = [json.loads(f.read_text()) for f in files]
    bases = {d["base"] for d in data}
    if len(bases) != 1:
        raise SystemExit(f"--pool takes sittings of one base, got {sorted(bases)}")
    names = [n for n in data[0]["runs"] if all(n in d["runs"] for d in data)]
    runs = {n: [r for d in data for r in d["runs"][n]] for n in names}
    summary = summarise(runs, {n: data[-1]["summary"][n]["size_mb"] for n in names})
    loads = [r["loadavg_1m_before"] for rs in runs.values() for r in rs]
    head = (f"{bases.pop()}: {len(files)} sittings pooled ({', '.join(f.name for f in files)}), medians of "
            f"{len(next(iter(runs.values())))} runs each; 1-minute load average {min(loads):.1f}–{max(loads):.1f} before the runs")
    table = "\n".join([head, "", *table_lines(summary)])
    print(table)
    out = files[-1].with_name(files[-1].stem + "-pooled.md")
    out.write_text(table + "\n")
    print(f"wrote {out}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", choices=BASES, default=BASES[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens decoded after the chat prompt")
    ap.add_argument("--peers-python", default=str(ROOT / ".venv-peers" / "bin" / "python"))
    ap.add_argument("--fp32", action="store_true", help="also jishi's fp32 bundle (large and slow for bigger bases)")
    ap.add_argument("--torch", action="store_true", help="also transformers in fp32")
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp's flash attention; auto measures both once and keeps the faster")
    ap.add_argument("--omp-wait", choices=("auto", "active", "passive"), default="auto",
                    help="llama.cpp's OpenMP wait policy; auto measures both once and keeps the faster")
    ap.add_argument("--noisy", type=float, default=0.25,
                    help="mark a run where other processes used more than this many cores on average")
    ap.add_argument("--long", type=int, default=0, metavar="TOKENS",
                    help="also decode after a prompt of about this many tokens (e.g. 1800; default off), and report "
                         "its decode speed as a share of the one after the ~100-token prompt")
    ap.add_argument("--only", nargs="*", help="names of systems to run (substrings; default all)")
    ap.add_argument("--pool", nargs="+", type=Path, metavar="JSON",
                    help="run nothing: pool the runs of these sittings of one base into one table")
    args = ap.parse_args()
    if args.pool:
        return pool(args.pool)

    from jishi.distill.base import KNOWN_BASES, fetch_known
    from jishi.runtime.bundle import open_bundle
    from jishi.runtime.tokenizer import Tokenizer

    work = ROOT / "bench" / "work" / args.base
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y%m%d-%H%M%S")
    loadavg_start = os.getloadavg()
    cpu = cpu_info()
    gguf = fetch_known(args.base)

    systems, base = ensure_jishi(args.base, work, args.fp32)
    bundle = open_bundle(systems[DEFAULT]["path"])
    tokenizer = Tokenizer(bundle.path(bundle.manifest.tokenizer.file), bundle.manifest.tokenizer)
    prompt_file = work / "prompts.json"
    prompt_file.write_text(json.dumps(prompts(tokenizer, args.long)))
    longest = max(len(v) for k, v in json.loads(prompt_file.read_text()).items() if k != "prefill")
    tokens = min(args.tokens, bundle.manifest.config.context_length - longest - 1)

    peers = {}
    peers_ok = bool(args.peers_python) and Path(args.peers_python).exists()
    hf_dir = None
    if peers_ok or args.torch:
        hf_dir, base = ensure_hf_dir(args.base, work, base)
    if args.torch:
        systems["transformers fp32"] = {"system": "torch", "path": str(hf_dir), "python": sys.executable,
                                        "settings": {"dtype": "float32", "threads": args.threads}}
    if peers_ok:
        made = ensure_llamacpp(gguf, work, args.peers_python, args.threads)
        peers["llamacpp_files"] = made
        probe = probe_llamacpp(str(gguf), args.peers_python, prompt_file, args.threads, tokens, args.flash_attn,
                               args.omp_wait)
        peers["llamacpp_probe"] = probe
        fa, wait = probe["chosen"]["flash_attn"], probe["chosen"]["wait"]
        batch = max(512, *(len(v) for v in json.loads(prompt_file.read_text()).values()))
        settings = {"n_threads": args.threads, "n_threads_batch": args.threads, "n_batch": batch, "n_ubatch": batch,
                    "n_ctx": 2048, "use_mmap": True, "flash_attn": fa == "on", "OMP_WAIT_POLICY": wait,
                    "greedy": "argmax of the last logits"}
        llama_env = {"OMP_WAIT_POLICY": wait.upper()}
        label = gguf_type_label(gguf)
        systems[f"llama.cpp {label} (as shipped)"] = {"system": "llamacpp", "path": str(gguf), "python": args.peers_python,
                                                      "worker_args": ["--flash-attn", fa], "env": llama_env, "settings": settings,
                                                      "tensor_types": made["shipped"]["tensor_types"]}
        for kind in LLAMACPP_TYPES:
            systems[f"llama.cpp {kind} (from F32)"] = {"system": "llamacpp", "path": made[kind]["path"],
                                                       "python": args.peers_python, "worker_args": ["--flash-attn", fa],
                                                       "env": llama_env, "settings": settings, "tensor_types": made[kind]["tensor_types"]}
        genai_dir, record = ensure_genai(KNOWN_BASES[args.base].hf_id, hf_dir, work, args.peers_python, args.threads)
        peers["genai"] = record
        if genai_dir:
            systems["onnxruntime-genai int4"] = {"system": "genai", "path": str(genai_dir), "python": args.peers_python,
                                                 "settings": {"precision": "int4 (builder defaults)",
                                                              **record["session_options"]}}
        else:
            print(f"onnxruntime-genai's builder refused {args.base}:\n{record['refused']}", file=sys.stderr)
    else:
        print("peers' environment not found: only jishi runs (see bench/setup_peers.sh)", file=sys.stderr)
    del base

    if args.only:
        systems = {k: v for k, v in systems.items() if k == DEFAULT or any(o in k for o in args.only)}

    runs: dict[str, list[dict]] = {k: [] for k in systems}
    for r in range(args.repeats):
        for name, spec in systems.items():
            res = run_once(spec, prompt_file, args.threads, tokens)
            res["noisy"] = res["others_cores"] > args.noisy
            runs[name].append(res)
            print(f"[{r + 1}/{args.repeats}] {name:32s} decode {res['decode_tok_s']:7.1f} tok/s  prefill "
                  f"{res['prefill_tok_s']:7.1f} tok/s  rss {res['peak_rss_mb']:6.0f} MB  others "
                  f"{res['others_cores']} cores{'  NOISY' if res['noisy'] else ''}", file=sys.stderr)

    summary = summarise(runs, {name: size_mb(spec["path"]) for name, spec in systems.items()})
    loadavg_end = os.getloadavg()
    head = (f"{args.base}, {args.threads} threads, {cpu.get('name')} ({isa_label(cpu)}), medians of {args.repeats} "
            f"alternating runs; load average {loadavg_start[0]:.1f} at the start, {loadavg_end[0]:.1f} at the end")
    lines = [head, "", *table_lines(summary)]
    if "llamacpp_probe" in peers:
        chosen = peers["llamacpp_probe"]["chosen"]
        probes = ", ".join(f"{k}: {v.get('decode_tok_s', 'failed')}" for k, v in peers["llamacpp_probe"]["runs"].items())
        lines += ["", f"llama.cpp: flash attention {chosen['flash_attn']}, OMP_WAIT_POLICY {chosen['wait']} "
                      f"(probe decode tok/s on the shipped file: {probes})"]
    if peers.get("genai", {}).get("refused"):
        lines += ["", f"onnxruntime-genai's builder refused: {peers['genai']['refused'].strip().splitlines()[-1]}"]
    table = "\n".join(lines)
    print(table)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"spine-{args.base}-{started}.json"
    out.write_text(json.dumps({
        "base": args.base, "gguf": str(gguf), "threads": args.threads, "repeats": args.repeats, "tokens": tokens,
        "prompt_tokens": {k: len(v) for k, v in json.loads(prompt_file.read_text()).items()},
        "cpu": cpu, "loadavg_start": [round(x, 2) for x in loadavg_start],
        "loadavg_end": [round(x, 2) for x in loadavg_end], "noisy_threshold_cores": args.noisy,
        "reference": DEFAULT, "systems": {k: {kk: vv for kk, vv in v.items() if kk != "python"} for k, v in systems.items()},
        "peers": peers, "summary": summary, "runs": runs,
    }, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
