"""The exact forms of a Q4_1-style block grid (w = d·q + m, m any float) in MatMulNBits, timed.

    python bench/zero_points.py [--threads 2] [--repeats 300]

One projection of SmolLM2-135M's shapes (576 → 3072, and 1536 → 576), random codes, fp16 scales
and float minima. Forms:

- ``float zero points``: MatMulNBits with zero_points of the scales' type, zp = −m/d per block;
- ``uint4 zp + side path (inputs)``: the zero point rounded to uint4, its shift undone by
  ``(x·S)·Δ`` (a MatMul with the 0/1 block-sum matrix S, a Gemm adding Δ), S and Δ bound as
  graph inputs, as jishi's graphs with merge points have them;
- ``uint4 zp + side path (constants)``: the same with S and Δ as initializers (prepacked);
- ``uint4 zp, no correction``: inexact, the floor the side path is measured against.

For each: the largest difference from numpy's product with the exact weights (float64), relative
to the largest output, with float activations (accuracy level 0) and int8 ones (level 4), and the
time of one token's product (the fastest tenth of ``--repeats`` runs, the forms alternating).
Writes bench/results/zero-points-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 32


def grid(n: int, k: int, rng):
    """Codes, fp16 scales and fp16 minima of a Q4_1-like weight, and the weight itself (float64)."""
    nb = k // BLOCK
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    d = (rng.random((n, nb)) * 0.02 + 0.001).astype(np.float16).astype(np.float32)
    m = (-rng.random((n, nb)) * 0.15).astype(np.float16).astype(np.float32)
    w = q.reshape(n, nb, BLOCK).astype(np.float64) * d[:, :, None] + m[:, :, None]
    return q, d, m, w.reshape(n, k)


def model(form: str, q, d, m, level: int):
    from onnx import TensorProto, helper, numpy_helper

    from jishi.export.graph import block_sum_matrix
    from jishi.export.quant import pack, pack_zero_points

    n, k = q.shape
    zpf = -m / d
    zp = np.clip(np.rint(zpf), 0, 15)
    inits = [numpy_helper.from_array(pack(q, 4, BLOCK), "qweight"), numpy_helper.from_array(d.reshape(-1), "scales")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])]
    mnb = ["x", "qweight", "scales"]
    if form == "float zero points":
        inits.append(numpy_helper.from_array(zpf.astype(np.float32).reshape(-1), "zp"))
    else:
        inits.append(numpy_helper.from_array(pack_zero_points(zp.astype(np.uint8), 4), "zp"))
    mnb.append("zp")
    nodes = [helper.make_node("MatMulNBits", mnb, ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=BLOCK,
                              accuracy_level=level)]
    out = "y"
    if form.startswith("uint4 zp + side path"):
        delta = (d * (zp - zpf)).T.astype(np.float32).copy()  # (k/block, n): the shift of each block
        s = block_sum_matrix(k, BLOCK)
        if form.endswith("(inputs)"):
            inputs += [helper.make_tensor_value_info("S", TensorProto.FLOAT, [k, "r"]),
                       helper.make_tensor_value_info("D", TensorProto.FLOAT, ["r", n])]
        else:
            inits += [numpy_helper.from_array(s, "S"), numpy_helper.from_array(delta, "D")]
        nodes += [helper.make_node("MatMul", ["x", "S"], ["low"]), helper.make_node("Gemm", ["low", "D", "y"], ["z"])]
        out = "z"
    g = helper.make_graph(nodes, "one", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["rows", n])], inits)
    mdl = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    mdl.ir_version = 10
    extra = {}
    if form.endswith("(inputs)"):
        extra = {"S": block_sum_matrix(k, BLOCK), "D": (d * (zp - zpf)).T.astype(np.float32).copy()}
    return mdl, extra


FORMS = ("float zero points", "uint4 zp + side path (inputs)", "uint4 zp + side path (constants)", "uint4 zp, no correction")


def main() -> None:
    import onnxruntime as ort

    from jishi.runtime.settings import RuntimeSettings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results = []
    for n, k in ((3072, 576), (576, 1536)):
        q, d, m, w = grid(n, k, rng)
        rows = rng.standard_normal((64, k)).astype(np.float32)
        exact = rows.astype(np.float64) @ w.T
        token = rng.standard_normal((1, k)).astype(np.float32)
        for level in (0, 4):
            sessions = {}
            for form in FORMS:
                mdl, extra = model(form, q, d, m, level)
                so = RuntimeSettings(threads=args.threads).session_options()
                s = ort.InferenceSession(mdl.SerializeToString(), so, providers=["CPUExecutionProvider"])
                got = s.run(None, {"x": rows, **extra})[0]
                err = float(np.abs(got - exact).max() / np.abs(exact).max())
                sessions[form] = (s, extra, err)
            times = {form: [] for form in FORMS}
            for _ in range(args.repeats):
                for form, (s, extra, _) in sessions.items():
                    t = time.perf_counter()
                    s.run(None, {"x": token, **extra})
                    times[form].append(time.perf_counter() - t)
            for form, (_, _, err) in sessions.items():
                us = float(np.percentile(times[form], 10)) * 1e6
                results.append({"n": n, "k": k, "accuracy_level": level, "form": form, "relative_error": err, "token_us": round(us, 1)})
                print(f"{k:5d}→{n:<5d} level {level}  {form:34s} error {err:8.1e}  one token {us:8.1f} µs")
    out = ROOT / "bench" / "results" / f"zero-points-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "onnxruntime": ort.__version__,
                               "loadavg": Path("/proc/loadavg").read_text().split()[:3], "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
