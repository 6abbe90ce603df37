"""Embeddings over HTTP: OpenAI's /v1/embeddings and Ollama's /api/embed.

The work runs in a worker thread (one at a time, under a lock) on the model's own engine,
beside the scheduler's slots: onnxruntime sessions take concurrent runs, and the slots
have their own caches.
"""

from __future__ import annotations

import base64
import threading
import time

import numpy as np
from starlette.concurrency import run_in_threadpool

from jishi.errors import BundleError, ContextLengthError
from jishi.runtime.server.protocol import APIError, bad

MAX_INPUTS = 256
_LOCK = threading.Lock()


def inputs(body: dict, name: str = "input") -> list[str]:
    value = body.get(name)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad(f"'{name}' must be a string or a non-empty list of strings", name,
                  "missing" if value is None else "invalid_type")
    if len(value) > MAX_INPUTS:
        raise bad(f"'{name}' holds at most {MAX_INPUTS} texts per request, got {len(value)}", name)
    for i, t in enumerate(value):
        if not isinstance(t, str) or not t:
            raise bad(f"'{name}[{i}]' must be a non-empty string (token arrays are not taken)", f"{name}[{i}]")
    return value


async def embed(server, texts: list[str], adapter: str | None, truncate: bool, param: str = "input"):
    """(vectors, prompt tokens) for ``texts``; 400s for what the request can fix."""
    model = server.model
    if not model.has_embeddings:
        raise APIError(400, f"{model.name} was built before embeddings; rebuild it with `jishi build`",
                       param="model", code="unsupported")

    def work():
        with _LOCK:
            tokens = sum(len(model.tokenizer.encode(t)) for t in texts)
            return model.embed(texts, adapter=adapter, truncate=truncate), tokens

    try:
        return await run_in_threadpool(work)
    except ContextLengthError as e:
        raise bad(str(e).replace("truncate=True", "a shorter text"), param, "context_length_exceeded") from None
    except BundleError as e:
        raise APIError(400, str(e), param="model", code="unsupported") from None


def openai_body(body) -> tuple[list[str], str]:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad("'encoding_format' must be \"float\" or \"base64\"", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad("'dimensions' is not supported: these embeddings have the model's hidden size", "dimensions",
                  "unsupported")
    return inputs(body), fmt


def openai_response(vectors: np.ndarray, fmt: str, model_id: str, tokens: int) -> dict:
    def encode(v):
        return base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()

    return {"object": "list", "model": model_id,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def ollama_response(vectors: np.ndarray, model_id: str, tokens: int, started: float) -> dict:
    return {"model": model_id, "embeddings": vectors.tolist(), "total_duration": int((time.monotonic() - started) * 1e9),
            "load_duration": 0, "prompt_eval_count": tokens}
