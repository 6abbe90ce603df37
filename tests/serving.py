"""Helpers for the server's tests: bundles made for serving, and a live server on a free loopback port."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

ARTIFACTS = Path(os.environ.get("JISHI_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def add_peft_adapter(base_dir: Path, bundle: Path, root: Path, name: str = "alpha", seed: int = 1) -> None:
    """Make a random PEFT LoRA adapter for the base (q, v and down projections) and add it to the bundle."""
    import peft
    import torch
    import transformers

    from jishi.export.adapters import add_adapter

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for pname, p in lora.named_parameters():
            if "lora_" in pname:
                p.normal_(0.0, 0.1)  # peft starts B at zero: make the adapter change the answers
    lora.save_pretrained(root / name)
    add_adapter(bundle, name, root / name)


def build_adapted(tiny_dirs, root: Path) -> Path:
    """The tiny Llama (fp32, context 256, merge points) with a LoRA adapter named 'alpha'."""
    from jishi.pipeline import build

    bundle = build(str(tiny_dirs["llama"]), "fp32", root / "served", context=256, evaluate=False, quiet=True,
                   merge_points=True)
    add_peft_adapter(tiny_dirs["llama"], bundle, root)
    return bundle


def build_endless(tokenizer, root: Path, adapter: bool = False) -> Path:
    """A larger tiny model (about 3 ms a token on one core) with a context of 4096 and no EOS token:
    it writes until its length limit, so a test has time to stop it while it is generating."""
    from conftest import make_tiny

    from jishi.export.bundle_writer import write_manifest
    from jishi.pipeline import build
    from jishi.runtime.bundle import open_bundle

    base = make_tiny("llama", root / "endless-base", tokenizer, layers=8, hidden_size=384, intermediate_size=768,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096)
    bundle = build(str(base), "fp32", root / "endless", context=4096, evaluate=False, quiet=True, merge_points=adapter)
    if adapter:
        add_peft_adapter(base, bundle, root)
    m = open_bundle(bundle).manifest
    write_manifest(Path(bundle), replace(m, tokenizer=replace(m.tokenizer, eos_token_ids=[])))
    return bundle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app served by uvicorn in a thread of this process, on 127.0.0.1 and a free port."""

    def __init__(self, model, **config):
        """``model``: a loaded Model, or a fleet.Fleet of several (then ``config`` is unused)."""
        import uvicorn

        from jishi.runtime.server.app import Server, ServerConfig, build_app
        from jishi.runtime.server.fleet import Fleet

        self.server = model if isinstance(model, Fleet) else Server(model, ServerConfig(**config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._uv = uvicorn.Server(uvicorn.Config(build_app(self.server), host="127.0.0.1", port=self.port,
                                                 log_level="warning", access_log=False, timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._uv.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uv.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def scheduler(self):
        return self.server.scheduler

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def close(self) -> None:
        self._uv.should_exit = True
        self._thread.join(timeout=15)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sse_events(lines) -> list:
    """The data objects of a server-sent event stream, up to and including the string '[DONE]'."""
    out = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        out.append(data if data == "[DONE]" else json.loads(data))
        if data == "[DONE]":
            break
    return out


CLIENT = """
import json, sys, time, httpx
url, body = sys.argv[1], json.loads(sys.argv[2])
with httpx.stream("POST", url, json=body, timeout=120) as r:
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            print(json.dumps([time.time(), json.loads(line[6:])["choices"][0]["text"]]), flush=True)
"""


def streaming_client(url: str, body: dict):
    """A client in its own process (as a user's would be): prints [arrival time, text] per piece."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", CLIENT, url, json.dumps(body)], stdout=subprocess.PIPE, text=True)
