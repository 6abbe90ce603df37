"""What one decode step's attention costs by cache length, with an fp32 or an fp16 KV cache.

    python bench/attention_kv.py [--bundle BUNDLE] [--lengths 100 500 1000 1800] [--threads 2] [--runs 50]

One GroupQueryAttention node shaped as one layer of the bundle (default: the default base's
shape: 9 query heads, 3 KV heads, head size 64, context 2048), run as the engine runs it: past
and present bound to one buffer, one new token, rotary inside. fp16 runs the same node with
fp16 inputs (what an fp16 KV cache would need: onnxruntime's CPU attention takes one type for
the query and the cache). Reports the median microseconds a step per layer and the
layer count's total, so the share of a token's time that attention takes at each length can
be read beside a decode benchmark. Writes bench/results/attention-kv-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def attention_graph(heads: int, kv_heads: int, head_dim: int, context: int, fp16: bool) -> bytes:
    from onnx import TensorProto, helper

    t = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    value = helper.make_tensor_value_info
    inputs = [value("q", t, [1, "s", heads * head_dim]), value("k", t, [1, "s", kv_heads * head_dim]),
              value("v", t, [1, "s", kv_heads * head_dim]), value("past_key", t, [1, kv_heads, context, head_dim]),
              value("past_value", t, [1, kv_heads, context, head_dim]), value("seqlens_k", TensorProto.INT32, [1]),
              value("total", TensorProto.INT32, []), value("cos", t, [context, head_dim // 2]),
              value("sin", t, [context, head_dim // 2])]
    outputs = [value("out", t, [1, "s", heads * head_dim]), value("present_key", t, [1, kv_heads, context, head_dim]),
               value("present_value", t, [1, kv_heads, context, head_dim])]
    node = helper.make_node("GroupQueryAttention", [i.name for i in inputs], [o.name for o in outputs],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, do_rotary=1)
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def time_steps(heads, kv_heads, head_dim, context, fp16, lengths, threads, runs) -> dict:
    import onnxruntime as ort

    dtype = np.float16 if fp16 else np.float32
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(attention_graph(heads, kv_heads, head_dim, context, fp16), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    cache = {n: rng.standard_normal((1, kv_heads, context, head_dim)).astype(dtype) for n in ("key", "value")}
    io = session.io_binding()
    for name, array in cache.items():
        shared = ort.OrtValue.ortvalue_from_numpy(array)
        io.bind_ortvalue_input(f"past_{name}", shared)
        io.bind_ortvalue_output(f"present_{name}", shared)
    out = np.zeros((1, 1, heads * head_dim), dtype)
    io.bind_ortvalue_output("out", ort.OrtValue.ortvalue_from_numpy(out))
    angles = np.arange(context)[:, None] * (1e4 ** (-np.arange(head_dim // 2) / (head_dim // 2)))[None, :]
    for name, array in (("q", rng.standard_normal((1, 1, heads * head_dim))),
                        ("k", rng.standard_normal((1, 1, kv_heads * head_dim))),
                        ("v", rng.standard_normal((1, 1, kv_heads * head_dim))),
                        ("cos", np.cos(angles)), ("sin", np.sin(angles))):
        io.bind_cpu_input(name, np.ascontiguousarray(array.astype(dtype)))
    result = {}
    for length in lengths:
        io.bind_cpu_input("seqlens_k", np.asarray([length], np.int32))
        io.bind_cpu_input("total", np.asarray(length + 1, np.int32))
        for _ in range(5):
            session.run_with_iobinding(io)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run_with_iobinding(io)
            times.append(time.perf_counter() - start)
        result[length] = statistics.median(times) * 1e6
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="take the layer shape from this bundle (default: the default base's)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[100, 500, 1000, 1800])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    heads, kv_heads, head_dim, context, layers = 9, 3, 64, 2048, 30
    if args.bundle:
        c = json.loads((Path(args.bundle) / "manifest.json").read_text())["config"]
        heads, kv_heads, head_dim = c["num_heads"], c["num_kv_heads"], c["head_dim"]
        context, layers = c["context_length"], c["num_layers"]
    load = os.getloadavg()[0]
    rows = {}
    for kind, fp16 in (("fp32", False), ("fp16", True)):
        rows[kind] = time_steps(heads, kv_heads, head_dim, context, fp16, args.lengths, args.threads, args.runs)
    print(f"attention per decode step ({heads} heads, {kv_heads} KV heads, head size {head_dim}; "
          f"{args.threads} threads; load {load:.1f})")
    print("| cache length | fp32 µs/layer | fp16 µs/layer | fp32 ms/token (all layers) | fp16 ÷ fp32 |")
    print("|---|---|---|---|---|")
    for n in args.lengths:
        a, b = rows["fp32"][n], rows["fp16"][n]
        print(f"| {n} | {a:.0f} | {b:.0f} | {a * layers / 1000:.1f} | {b / a:.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"attention-kv-{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps({"shape": {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                                         "context": context, "layers": layers},
                               "threads": args.threads, "loadavg_1m": load, "us_per_layer": rows}, indent=2))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
