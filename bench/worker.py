"""One measurement in a fresh process: load, prefill, time to first token, decode, peak RSS.

    python bench/worker.py SYSTEM PATH PROMPTS.json THREADS

SYSTEM is jishi, torch, genai or llamacpp. PROMPTS.json holds the token ids all
systems get: ``prefill`` (~500 tokens) and ``chat`` (a chat prompt). Prints one
JSON object. Each peer is driven through its own public API with greedy decoding.
"""

from __future__ import annotations

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

    def decode():
        e.reset()
        t0 = time.perf_counter()
        logits = e.feed(prompts["chat"])
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

    def decode():
        ids = torch.tensor([prompts["chat"]])
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

    def decode():
        g = generator(len(prompts["chat"]) + new_tokens + 1)
        t0 = time.perf_counter()
        g.append_tokens(np.array(prompts["chat"], dtype=np.int32))
        t1 = time.perf_counter()
        out = []
        for _ in range(new_tokens - 1):
            g.generate_next_token()
            out.append(int(g.get_next_tokens()[0]))
        return t1 - t0, time.perf_counter() - t1, out

    return load, prefill, decode


def run_llamacpp(path, prompts, threads, new_tokens):
    from llama_cpp import Llama

    t = time.perf_counter()
    m = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
    load = time.perf_counter() - t

    def prefill():
        m.reset()
        t = time.perf_counter()
        m.eval(prompts["prefill"])
        return time.perf_counter() - t

    def decode():
        m.reset()
        t0 = time.perf_counter()
        m.eval(prompts["chat"])
        token = m.sample(temp=0.0)
        t1 = time.perf_counter()
        out = [token]
        for _ in range(new_tokens - 1):
            m.eval([token])
            token = m.sample(temp=0.0)
            out.append(token)
        return t1 - t0, time.perf_counter() - t1, out

    return load, prefill, decode


SYSTEMS = {"jishi": run_jishi, "torch": run_torch, "genai": run_genai, "llamacpp": run_llamacpp}


def main() -> None:
    system, path, prompts_file, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    new_tokens = int(sys.argv[5]) if len(sys.argv) > 5 else 128
    prompts = json.load(open(prompts_file))
    load, prefill, decode = SYSTEMS[system](path, prompts, threads, new_tokens)
    prefill()  # warm up
    prefill_s = min(prefill() for _ in range(2))
    decode()
    ttft, decode_s, tokens = decode()
    print(json.dumps({
        "load_s": round(load, 3),
        "prefill_tok_s": round(len(prompts["prefill"]) / prefill_s, 1),
        "ttft_ms": round(1e3 * ttft, 1),
        "decode_tok_s": round((new_tokens - 1) / decode_s, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "tokens": tokens[:16],
    }))


if __name__ == "__main__":
    main()
