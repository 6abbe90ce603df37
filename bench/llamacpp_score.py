"""Perplexity and top-1 agreement of a GGUF file in llama.cpp, on token windows given as numbers.

    .venv-peers/bin/python bench/llamacpp_score.py MODEL.gguf WINDOWS.npy TOP.npy [--threads 2] [--cache f16]

Run with the peers' interpreter (it needs llama-cpp-python). WINDOWS.npy holds the windows (windows x tokens)
as jishi scores them: no BOS (none is added here), each window run from an empty cache with every position's
logits kept. The figures are those of jishi's build evaluation (``jishi.pipeline.evaluate_bundle``), so that
llama.cpp's rows stand in the same table: the perplexity is exp of the mean negative log-likelihood of tokens
2..n of every window (the first token has nothing before it to be predicted from), the top-1 agreement the
share of all n positions whose argmax equals TOP.npy's (the reference's argmax, windows x tokens). Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def log_normalizer(logits: np.ndarray) -> np.ndarray:
    """log Σ exp of each row, in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return (np.log(np.exp(x - m).sum(axis=-1, keepdims=True)) + m)[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("windows")
    ap.add_argument("top")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", choices=["f16", "f32"], default="f16",
                    help="the KV cache's type (default f16, llama.cpp's own default)")
    args = ap.parse_args()
    import llama_cpp

    wins, top = np.load(args.windows), np.load(args.top)
    if wins.ndim != 2 or top.shape != wins.shape:
        raise SystemExit(f"windows {wins.shape} and reference argmax {top.shape} must both be windows x tokens")
    n = wins.shape[1]
    cache = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[args.cache]
    llm = llama_cpp.Llama(args.model, n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, n_threads=args.threads,
                          n_threads_batch=args.threads, type_k=cache, type_v=cache, verbose=False)
    nll, agree = 0.0, 0
    t0 = time.time()
    for win, ref in zip(wins.tolist(), top):
        llm.reset()
        llm.eval(win)
        logits = llm.scores[:n]
        nll -= float((logits[np.arange(n - 1), win[1:]].astype(np.float64) - log_normalizer(logits)[:-1]).sum())
        agree += int((logits.argmax(-1) == ref).sum())
    print(json.dumps({"perplexity": round(float(np.exp(nll / (len(wins) * (n - 1)))), 4),
                      "top1_agreement": round(agree / wins.size, 4), "windows": len(wins), "window": n,
                      "cache": args.cache, "threads": args.threads, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
