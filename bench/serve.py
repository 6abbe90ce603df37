"""The classroom server under load: jishi batched, jishi unbatched and llama.cpp's server (by hand, not in CI).

    python bench/serve.py [--bundle /tmp/smol-int4] [--levels 1 4 8 16 32] [--seconds 15] [--repeats 2]
                          [--threads 2] [--max-tokens 64] [--llamacpp-python .venv-peers/bin/python]

Starts every server at once on 127.0.0.1 (jishi's int4 bundle twice, with and without
``--batch``, and llama-cpp-python's server on the same base's GGUF, each with the same
threads), then for each number of concurrent clients runs each server in turn, ``--repeats``
times, interleaved. Each client is its own process on loopback: it sends the same chat
prompts with greedy decoding and ``max_tokens``, streamed, one request after another,
until the level's time is up; answers in flight may finish within ``--grace`` seconds, after
which they are cut and the tokens that arrived count (one cut before its first token counts
its wait as its time to first token, a lower bound). Reported per server and
level: total completion tokens per second, p50/p95 time to first token, the medians over
the repeats, the load average and the CPU other processes used. ``--before PYTHON BUNDLE`` adds an older jishi
(another checkout's environment) beside the current one, for a before/after in one sitting. Writes
bench/results/serve-<date>.json and prints a table with ratios.

llama-cpp-python needs a compiler and lives in its own environment:
``bash bench/setup_peers.sh`` (.venv-peers).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
QUESTIONS = [
    "Write a long story about a farmer and a clever goat.",
    "Explain in detail how rain forms and why it matters for crops.",
    "Describe a day at a village school, hour by hour.",
    "Give many tips for keeping chickens healthy in a hot summer.",
    "Explain step by step how a bicycle works.",
    "Write a letter to a friend about the market in town.",
    "Describe how to plant and care for a vegetable garden.",
    "Tell the history of writing, from clay tablets to computers.",
]

# One client: stdlib only (fast to start, light on the CPU the servers share).
CLIENT = r"""
import http.client, json, resource, socket, sys, time
port, model, questions, max_tokens, until, hard, who = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
extra = json.loads(sys.argv[8])
done = []
k = who
while time.time() < until:
    body = {"model": model, "messages": [{"role": "user", "content": questions[k % len(questions)]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}
    k += 1
    t0 = time.time()
    first, pieces, usage, finished, status = None, 0, None, False, None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=max(0.1, hard - t0))
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
        r = conn.getresponse()
        status = r.status
        while status == 200:
            conn.sock.settimeout(max(0.05, hard - time.time()))
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if line == b"data: [DONE]":
                finished = True
                break
            if not line.startswith(b"data: "):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    pieces += 1
                    if first is None:
                        first = time.time()
        conn.close()
    except (socket.timeout, TimeoutError, OSError):
        pass  # past the level's hard end: what arrived counts
    if status is not None and status != 200:
        done.append({"status": status})
        time.sleep(0.5)
        continue
    done.append({"status": 200, "start": t0, "end": time.time(), "ttft": (first - t0) if first else None,
                 "tokens": usage if (finished and usage is not None) else pieces, "finished": finished,
                 "usage_reported": usage is not None})
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"requests": done, "cpu_s": ru.ru_utime + ru.ru_stime}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def busy_cpu_seconds() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return sum(int(x) for x in fields[:3]) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def start_servers(args) -> dict:
    """name → {proc, port, model} for every server, each on its own loopback port."""
    servers = {}
    slots = str(max(args.levels))
    jishi = [sys.executable, "-m", "jishi", "serve", args.bundle, "--threads", str(args.threads),
             "--max-concurrent", slots, "--queue", str(4 * max(args.levels)), "--max-tokens", str(args.max_tokens)]
    logs = RESULTS / "serve-logs"
    logs.mkdir(parents=True, exist_ok=True)
    for name, flag in (("jishi batched", "--batch"), ("jishi unbatched", "--no-batch")):
        if name not in args.systems:
            continue
        port = free_port()
        proc = subprocess.Popen(jishi + [flag, "--port", str(port)], stdout=subprocess.DEVNULL,
                                stderr=open(logs / f"{name.replace(' ', '-')}.log", "w"))
        servers[name] = {"proc": proc, "port": port, "extra": {"repetition_penalty": 1.0}}
    if args.before:  # another jishi (an older checkout's environment) with its own bundle, batched
        python, bundle = args.before
        name = "jishi batched (before)"
        port = free_port()
        cmd = [python, "-m", "jishi", "serve", bundle] + jishi[5:] + ["--batch", "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(logs / "jishi-before.log", "w"))
        servers[name] = {"proc": proc, "port": port, "extra": {"repetition_penalty": 1.0}}
    if "llama.cpp server" in args.systems:
        if not Path(args.llamacpp_python).exists():
            print(f"{args.llamacpp_python} not found: llama.cpp's server is left out (see this script's help)",
                  file=sys.stderr)
        else:
            from jishi.distill.base import fetch_known

            gguf = str(fetch_known("smollm2-135m-instruct"))
            port = free_port()
            proc = subprocess.Popen([args.llamacpp_python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
                                     "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch",
                                     str(args.threads), "--n_ctx", "2048", "--model_alias", "smollm2",
                                     # its default cuts off the answer in progress when another request comes
                                     "--interrupt_requests", "False"],
                                    stdout=subprocess.DEVNULL, stderr=open(logs / "llama.cpp-server.log", "w"))
            servers["llama.cpp server"] = {"proc": proc, "port": port, "extra": {"repeat_penalty": 1.0}}
    deadline = time.monotonic() + 180
    for name, s in servers.items():
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{s['port']}/v1/models", timeout=5) as r:
                    s["model"] = json.load(r)["data"][0]["id"]
                break
            except OSError:
                if time.monotonic() > deadline or s["proc"].poll() is not None:
                    raise RuntimeError(f"{name} did not start; see {logs}")
                time.sleep(0.5)
    return servers


def run_level(server: dict, clients: int, seconds: float, max_tokens: int, grace: float) -> dict:
    until = time.time() + seconds
    hard = until + grace  # answers still streaming then are cut: the tokens that arrived count
    before_busy, before_server = busy_cpu_seconds(), process_cpu_seconds(server["proc"].pid)
    load_before = os.getloadavg()
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, str(server["port"]), server["model"], json.dumps(QUESTIONS),
                               str(max_tokens), str(until), str(hard), str(i), json.dumps(server["extra"])],
                              stdout=subprocess.PIPE, text=True) for i in range(clients)]
    outs = [json.loads(p.communicate(timeout=seconds + grace + 120)[0]) for p in procs]
    elapsed_busy = busy_cpu_seconds() - before_busy
    server_cpu = process_cpu_seconds(server["proc"].pid) - before_server
    clients_cpu = sum(o["cpu_s"] for o in outs)
    requests = [r for o in outs for r in o["requests"]]
    ok = [r for r in requests if r["status"] == 200]
    end = max((r["end"] for r in ok), default=time.time())
    wall = end - t0
    tokens = sum(r["tokens"] for r in ok)
    # An answer cut before its first token counts with the time it waited: a lower bound.
    ttft = [r["ttft"] if r["ttft"] is not None else r["end"] - r["start"] for r in ok]
    return {
        "clients": clients, "wall_s": round(wall, 2), "requests": len(ok), "refused": len(requests) - len(ok),
        "unfinished": sum(not r["finished"] for r in ok), "no_first_token": sum(r["ttft"] is None for r in ok),
        "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * percentile(ttft, 50), 1) if ttft else None,
        "ttft_p95_ms": round(1000 * percentile(ttft, 95), 1) if ttft else None,
        "usage_reported": all(r["usage_reported"] for r in ok),
        "server_cpu_s": round(server_cpu, 1), "clients_cpu_s": round(clients_cpu, 1),
        "others_cpu_s": round(max(0.0, elapsed_busy - server_cpu - clients_cpu), 1),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="/tmp/smol-int4")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--seconds", type=float, default=15.0, help="time per level and server, in seconds")
    ap.add_argument("--grace", type=float, default=10.0,
                    help="seconds answers in flight may take after the level's time; then they are cut")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--llamacpp-python", default=str(ROOT / ".venv-peers" / "bin" / "python"))
    ap.add_argument("--systems", nargs="+", default=["jishi batched", "jishi unbatched", "llama.cpp server"])
    ap.add_argument("--before", nargs=2, metavar=("PYTHON", "BUNDLE"),
                    help="also an older jishi, batched: the python of its environment and a bundle it built "
                         "(a worktree of an earlier commit: before and after in one sitting)")
    args = ap.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    servers = start_servers(args)
    runs: dict[str, dict[int, list[dict]]] = {name: {n: [] for n in args.levels} for name in servers}
    try:
        for name, s in servers.items():  # warm up: the first request pays for first-run allocations
            run_level(s, 1, 0.1, 8, 60)
        for n in args.levels:
            for r in range(args.repeats):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in order:
                    res = run_level(servers[name], n, args.seconds, args.max_tokens, args.grace)
                    runs[name][n].append(res)
                    print(f"[{n:2d} clients, {r + 1}/{args.repeats}] {name:16s} {res['tokens_per_s']:7.1f} tok/s  "
                          f"ttft p50 {res['ttft_p50_ms']} ms p95 {res['ttft_p95_ms']} ms  "
                          f"load {res['loadavg_before'][0]}  others {res['others_cpu_s']} s", file=sys.stderr)
    finally:
        for s in servers.values():
            s["proc"].terminate()
        for s in servers.values():
            s["proc"].wait(timeout=30)

    summary: dict = {}
    for name, levels in runs.items():
        summary[name] = {}
        for n, rs in levels.items():
            summary[name][n] = {k: statistics.median(x[k] for x in rs) if all(x[k] is not None for x in rs) else None
                                for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "others_cpu_s")}
            summary[name][n]["loadavg_1m"] = [x["loadavg_before"][0] for x in rs]
    single = summary.get("jishi batched", {}).get(1, {}).get("tokens_per_s") or \
        summary.get("jishi unbatched", {}).get(1, {}).get("tokens_per_s")
    lines = ["| clients | server | tokens/s | TTFT p50 ms | TTFT p95 ms | ÷ jishi 1 client | ÷ llama.cpp server | load (1 min) |",
             "|" + "---|" * 8]
    for n in args.levels:
        ref = summary.get("llama.cpp server", {}).get(n, {}).get("tokens_per_s")
        for name in servers:
            s = summary[name][n]
            tps = s["tokens_per_s"]
            lines.append(f"| {n} | {name} | {tps:.0f} | {s['ttft_p50_ms']:.0f} | {s['ttft_p95_ms']:.0f} | "
                         f"{(tps / single) if single else float('nan'):.2f} | {(tps / ref) if ref else float('nan'):.2f} | "
                         f"{', '.join(f'{x:.1f}' for x in s['loadavg_1m'])} |")
    table = "\n".join(lines)
    print(table)
    out = RESULTS / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "bundle": args.bundle, "threads": args.threads, "max_tokens": args.max_tokens, "seconds": args.seconds,
        "repeats": args.repeats, "cpu_count": os.cpu_count(), "machine": os.uname().machine,
        "summary": summary, "runs": runs, "table": table}, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
