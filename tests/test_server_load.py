"""Load: 32 clients on loopback against `jishi serve` (its own process) for a bounded time (slow).

Every request must be answered or refused with 429; the figures go to the artifacts folder.
JISHI_LOAD_SECONDS sets the duration (default 60).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from serving import artifacts_dir, build_adapted, free_port  # noqa: E402

pytestmark = pytest.mark.slow
CLIENTS = 32
SECONDS = float(os.environ.get("JISHI_LOAD_SECONDS", "60"))
QUESTIONS = ["What is a list?", "Explain a loop.", "Name three fruits.", "How do plants grow?", "What is rain?"]


def rss_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def client(url: str, name: str, rng: random.Random, until: float, out: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < until:
            stream = rng.random() < 0.7
            body = {"model": name, "max_tokens": rng.randint(16, 64), "temperature": 0.8, "seed": rng.randint(0, 999),
                    "stream": stream}
            if rng.random() < 0.2:
                body["model"] = f"{name}:alpha"
            if rng.random() < 0.5:
                body["messages"] = [{"role": "user", "content": rng.choice(QUESTIONS)}]
                path = "/v1/chat/completions"
            else:
                body["prompt"] = rng.choice(QUESTIONS)
                path = "/v1/completions"
            start = time.monotonic()
            first = None
            tokens = 0
            if stream:
                body["stream_options"] = {"include_usage": True}
                async with http.stream("POST", path, json=body) as r:
                    status = r.status_code
                    if status == 200:
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if chunk.get("usage"):
                                tokens = chunk["usage"]["completion_tokens"]
                            elif first is None and chunk["choices"] and (
                                    chunk["choices"][0].get("text") or chunk["choices"][0].get("delta", {}).get("content")):
                                first = time.monotonic()
                    else:
                        await r.aread()
                        retry = r.headers.get("retry-after")
            else:
                r = await http.post(path, json=body)
                status = r.status_code
                retry = r.headers.get("retry-after")
                if status == 200:
                    tokens = r.json()["usage"]["completion_tokens"]
            end = time.monotonic()
            if status == 200:
                out["ok"] += 1
                out["tokens"] += tokens
                out["latency"].append(end - start)
                if first is not None:
                    out["ttft"].append(first - start)
            elif status == 429:
                out["refused"] += 1
                assert retry and int(retry) >= 1
                await asyncio.sleep(min(int(retry), 2) * rng.uniform(0.5, 1.0))
            else:
                out["failed"].append(status)


def test_32_clients_are_answered_or_refused_and_memory_stays_flat(tmp_path_factory, tiny_dirs):
    bundle = build_adapted(tiny_dirs, tmp_path_factory.mktemp("load"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("load-log") / "server.log"
    log_file = open(log_path, "w")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen([sys.executable, "-m", "jishi", "serve", str(bundle), "--port", str(port), "--threads", "1",
                             "--max-concurrent", "8", "--queue", "16"],
                            stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                name = httpx.get(url + "/health", timeout=2).json()["model"]
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
                time.sleep(0.2)
        out = {"ok": 0, "refused": 0, "failed": [], "tokens": 0, "latency": [], "ttft": []}
        samples = []

        async def main():
            start = time.monotonic()
            until = start + SECONDS

            async def watch_memory():
                while time.monotonic() < until:
                    samples.append((time.monotonic() - start, rss_kb(proc.pid, "VmRSS")))
                    await asyncio.sleep(1)

            rngs = [random.Random(i) for i in range(CLIENTS)]
            await asyncio.gather(watch_memory(), *(client(url, name, rngs[i], until, out) for i in range(CLIENTS)))
            return time.monotonic() - start

        elapsed = asyncio.run(main())
        peak_kb = rss_kb(proc.pid, "VmHWM")
        health = httpx.get(url + "/health", timeout=10).json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log_file.close()
    log = log_path.read_text()
    assert out["failed"] == [], f"requests failed with {sorted(set(out['failed']))}"
    assert out["ok"] > 0 and out["ttft"]
    warm = [kb for t, kb in samples if t >= min(10.0, SECONDS / 3)]
    figures = {
        "clients": CLIENTS, "seconds": round(elapsed, 1), "answered": out["ok"], "refused_429": out["refused"],
        "requests_per_s": round(out["ok"] / elapsed, 2), "tokens_per_s": round(out["tokens"] / elapsed, 1),
        "ttft_p50_ms": round(1000 * percentile(out["ttft"], 50), 1),
        "ttft_p95_ms": round(1000 * percentile(out["ttft"], 95), 1),
        "latency_p50_ms": round(1000 * percentile(out["latency"], 50), 1),
        "latency_p95_ms": round(1000 * percentile(out["latency"], 95), 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "rss_after_warmup_mb": round(warm[0] / 1024, 1), "rss_at_end_mb": round(warm[-1] / 1024, 1),
        "server": {"max_concurrent": 8, "queue": 16, "threads": 1, "bundle": "tiny llama fp32, context 256, one adapter"},
    }
    path = artifacts_dir() / "load-test.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2), f"\nwritten to {path}")
    assert health["active"] == 0 and health["queued"] == 0  # everything finished or was let go
    assert log.count('"POST /v1/') >= out["ok"] + out["refused"]  # one log line per request
    # Memory flat: after the warm-up the server grows by less than 32 MB however many requests it serves.
    assert max(warm) - warm[0] < 32 * 1024, samples
