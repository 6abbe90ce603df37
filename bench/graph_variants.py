"""Copies of an int4/gguf bundle with its zero-point side paths written another way, for A/B runs.

    python bench/graph_variants.py BUNDLE KIND [KIND ...] [--out bench/work/variants]

KIND is one of

- ``const``: the side paths' A (block sums) and B (corrections) as initializers instead of graph
  inputs, so onnxruntime prepacks them (same logits, bit for bit);
- ``reducesum``: the block sums by Reshape + ReduceSum instead of a MatMul with the 0/1 matrix
  (the same sums, rounded otherwise: int8 activations downstream may round differently);
- ``b16``: B stored in fp16 and widened by a Cast every run (not exact: for timing only);
- ``noside``: no side path at all (not exact: the grid's minima are rounded to integer zero points;
  the floor the side path is measured against).

Each copy has no merge points (its manifest says so) and a copy of the weights file. Compare them
with ``bench/token_profile.py BUNDLE VARIANT ... --paired ROUNDS``.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("const", "reducesum", "b16", "noside")


def variant(src: Path, out: Path, kind: str) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from jishi.export.bundle_writer import with_files, write_manifest
    from jishi.export.graph import block_sum_matrix
    from jishi.runtime.bundle import open_bundle

    manifest = open_bundle(src).manifest
    block = int((manifest.merge_points or {}).get("block", 32))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in (manifest.graph.file, "manifest.json", "manifest.sig") and f.is_file():
            shutil.copy2(f, out / f.name)
    model = onnx.load(str(src / manifest.graph.file), load_external_data=kind == "b16")
    g = model.graph
    a_rows = {v.name: v.type.tensor_type.shape.dim[0].dim_value for v in g.input
              if v.name.startswith("lora.") and v.name.endswith(".a")}
    if not a_rows:
        raise SystemExit(f"{src} has no merge points to rewrite")
    nodes, extra = [], {}
    rename = {}
    for node in g.node:
        if node.name.endswith("/side_a"):
            k = a_rows[node.input[1]]
            if kind == "noside":
                continue
            if kind == "reducesum":
                extra.setdefault(f"shape.blocks.{k}", np.array([-1, k // block, block], np.int64))
                extra.setdefault("axes.last", np.array([-1], np.int64))
                nodes.append(helper.make_node("Reshape", [node.input[0], f"shape.blocks.{k}"], [node.name + "/blocks"],
                                              name=node.name + "/blocks"))
                nodes.append(helper.make_node("ReduceSum", [node.name + "/blocks", "axes.last"], [node.output[0]],
                                              name=node.name, keepdims=0))
                continue
            node.input[1] = f"block_sums.{k}.{block}"
            extra.setdefault(node.input[1], block_sum_matrix(k, block))
        elif node.name.endswith("/side_b"):
            if kind == "noside":
                rename[node.output[0]] = node.input[2]
                continue
            if kind == "b16":
                nodes.append(helper.make_node("Cast", [node.input[1] + "16"], [node.input[1] + "/f32"], to=TensorProto.FLOAT,
                                              name=node.input[1] + "/cast"))
                node.input[1] = node.input[1] + "/f32"
        nodes.append(node)
    for node in nodes:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    del g.node[:]
    g.node.extend(nodes)
    if kind == "b16":  # B as fp16 graph inputs with defaults: a Cast of an input is not folded at load
        inits = []
        for t in g.initializer:
            if t.name.startswith("lora.") and t.name.endswith(".b"):
                inits.append(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name + "16"))
            else:
                inits.append(t)
        del g.initializer[:]
        g.initializer.extend(inits)
        inputs = [helper.make_tensor_value_info(v.name + "16", TensorProto.FLOAT16,
                                                [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
                  if v.name.startswith("lora.") and v.name.endswith(".b") else v
                  for v in g.input if not (v.name.startswith("lora.") and v.name.endswith(".a"))]
    else:
        inputs = [v for v in g.input if not v.name.startswith("lora.")]
        if kind == "noside":
            keep = [t for t in g.initializer if not t.name.startswith("lora.")]
            del g.initializer[:]
            g.initializer.extend(keep)
    del g.input[:]
    g.input.extend(inputs)
    g.initializer.extend(numpy_helper.from_array(v, n) for n, v in extra.items())
    if kind == "b16":
        (out / manifest.graph.data_file).unlink()
        onnx.save_model(model, str(out / manifest.graph.file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=manifest.graph.data_file, size_threshold=1024)
    else:
        (out / manifest.graph.file).write_bytes(model.SerializeToString())
    write_manifest(out, with_files(replace(manifest, merge_points=None), out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("kinds", nargs="+", choices=KINDS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "work" / "variants"))
    args = ap.parse_args()
    src = Path(args.bundle)
    for kind in args.kinds:
        print(variant(src, Path(args.out) / f"{src.name}-{kind}", kind))


if __name__ == "__main__":
    main()
