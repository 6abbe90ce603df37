"""One measurement in a fresh process: load, prefill, time to first token, decode, peak RSS.

    python bench/worker.py SYSTEM PATH PROMPTS.json THREADS [NEW_TOKENS] [--flash-attn on|off]

SYSTEM is jishi, torch, genai or llamacpp. PROMPTS.json holds the token ids all
systems get: ``prefill`` (~500 tokens), ``chat`` (a chat prompt) and, optionally, ``long``
(~1,800 tokens: decode is then also timed after it, where attention reads a long cache). Prints one
JSON object. Each peer is driven through its own public API with greedy decoding
(the most likely token, read from the logits where the API gives them).
``--flash-attn`` is llama.cpp's flash attention (default off).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def peak_rss_mb() -> float:
    """This process's high-water RSS. Not ru_maxrss: Linux carries that over from the parent across exec."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_jishi(path, prompts, threads, new_tokens):
    import numpy as np

    import jishi

    t = time.perf_counter()
    m = jishi.load(path, threads=threads)
    load = time.perf_counter() - t
    e = m.engine

    def prefill():
        e.reset()
        t = time.perf_counter()
        e.feed(prompts["prefill"])
        return time.perf_counter() - t

    def decode(key="chat"):
        e.reset()
        t0 = time.perf_counter()
        logits = e.feed(prompts[key])
        token = int(np.argmax(logits))
        t1 = time.perf_counter()
        out = [token]
        for _ in range(new_tokens - 1):
            token = int(np.argmax(e.step(token)))
            out.append(token)
        return t1 - t0, time.perf_counter() - t1, out

    return load, prefill, decode


def run_torch(path, prompts, threads, new_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    load = time.perf_counter() - t

    def prefill():
        ids = torch.tensor([prompts["prefill"]])
        with torch.no_grad():
            t = time.perf_counter()
            m(ids)
            return time.perf_counter() - t

    def decode(key="chat"):
        ids = torch.tensor([prompts[key]])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            t0 = time.perf_counter()
            m(ids, use_cache=True)  # the prefill alone, for time to first token
            t1 = time.perf_counter()
            rest = m.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            t2 = time.perf_counter()
        # generate() also prefills: subtract one prefill to get the decode time of new_tokens − 1 steps
        return t1 - t0, max(1e-9, (t2 - t1) - (t1 - t0)), rest[0, ids.shape[1]:].tolist()

    return load, prefill, decode


def run_genai(path, prompts, threads, new_tokens):
    import numpy as np
    import onnxruntime_genai as og

    t = time.perf_counter()
    config = og.Config(path)
    config.clear_providers()
    m = og.Model(config)
    load = time.perf_counter() - t

    def generator(max_length):
        p = og.GeneratorParams(m)
        p.set_search_options(max_length=max_length, do_sample=False)
        return og.Generator(m, p)

    def prefill():
        g = generator(len(prompts["prefill"]) + 8)
        t = time.perf_counter()
        g.append_tokens(np.array(prompts["prefill"], dtype=np.int32))
        return time.perf_counter() - t

    def decode(key="chat"):
        g = generator(len(prompts[key]) + new_tokens + 1)
        t0 = time.perf_counter()
        g.append_tokens(np.array(prompts[key], dtype=np.int32))  # runs the prompt
        g.generate_next_token()  # picks the first token from the prompt's logits
        t1 = time.perf_counter()
        out = [int(g.get_next_tokens()[0])]
        for _ in range(new_tokens - 1):  # each runs the last token, then picks the next
            g.generate_next_token()
            out.append(int(g.get_next_tokens()[0]))
        return t1 - t0, time.perf_counter() - t1, out

    return load, prefill, decode


def run_llamacpp(path, prompts, threads, new_tokens, flash_attn=False):
    import numpy as np
    from llama_cpp import Llama

    batch = max(512, *(len(p) for p in prompts.values()))  # each prompt in one batch
    t = time.perf_counter()
    m = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=batch,
              n_ubatch=batch, flash_attn=flash_attn, verbose=False)
    load = time.perf_counter() - t

    import llama_cpp

    vocab = m.n_vocab()

    def last_argmax():
        # The last position's logits, as llama.cpp's context holds them (eval() copies them nowhere).
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m.ctx, -1), shape=(vocab,))))

    def prefill():
        m.reset()
        t = time.perf_counter()
        m.eval(prompts["prefill"])
        return time.perf_counter() - t

    def decode(key="chat"):
        m.reset()
        t0 = time.perf_counter()
        m.eval(prompts[key])
        token = last_argmax()
        t1 = time.perf_counter()
        out = [token]
        for _ in range(new_tokens - 1):
            m.eval([token])
            token = last_argmax()
            out.append(token)
        return t1 - t0, time.perf_counter() - t1, out

    return load, prefill, decode


def versions(system) -> dict:
    """The versions of what ran, and for llama.cpp the CPU features its build uses."""
    from importlib.metadata import PackageNotFoundError, version

    names = {"jishi": ["jishi", "onnxruntime"], "torch": ["torch", "transformers"],
             "genai": ["onnxruntime-genai"], "llamacpp": ["llama-cpp-python"]}[system]
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    if system == "llamacpp":
        import llama_cpp

        out["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return out


SYSTEMS = {"jishi": run_jishi, "torch": run_torch, "genai": run_genai, "llamacpp": run_llamacpp}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=sorted(SYSTEMS))
    ap.add_argument("path")
    ap.add_argument("prompts")
    ap.add_argument("threads", type=int)
    ap.add_argument("new_tokens", type=int, nargs="?", default=128)
    ap.add_argument("--flash-attn", choices=("on", "off"), default="off")
    args = ap.parse_args()
    new_tokens = args.new_tokens
    prompts = json.load(open(args.prompts))
    extra = {"flash_attn": args.flash_attn == "on"} if args.system == "llamacpp" else {}
    load, prefill, decode = SYSTEMS[args.system](args.path, prompts, args.threads, new_tokens, **extra)
    prefill()  # warm up
    prefill_s = min(prefill() for _ in range(2))
    decode()
    ttft, decode_s, tokens = decode()
    long = {}
    if "long" in prompts:
        _, long_s, _ = decode("long")
        long = {"long_prompt_tokens": len(prompts["long"]), "decode_long_tok_s": round((new_tokens - 1) / long_s, 1)}
    print(json.dumps({
        "load_s": round(load, 3),
        "prefill_tok_s": round(len(prompts["prefill"]) / prefill_s, 1),
        "ttft_ms": round(1e3 * ttft, 1),
        "decode_tok_s": round((new_tokens - 1) / decode_s, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **long,
        "tokens": tokens[:16],
        "versions": versions(args.system),
    }))


if __name__ == "__main__":
    main()
