"""Choose the kernel path of a built bundle's quantized matrix products, over the same weights.

``MatMulNBits`` has an ``accuracy_level`` attribute: 4 quantizes the activations to int8 inside the
kernel (the fast default), 0 keeps them in float. The int8 path runs different kernels on AVX2,
AVX-512 VNNI and ARM's dot product, so its results differ across CPUs in the last bits; level 0
is the same everywhere up to float summation order. Setting it on an existing bundle (rather than
building again) keeps every weight byte as it was, so two runs differ in the kernels alone: that is
how the test suite checks that nothing it asserts depends on one CPU's rounding.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnx

from jishi.errors import BundleError
from jishi.export.bundle_writer import with_files, write_manifest
from jishi.runtime.bundle import open_bundle
from jishi.runtime.manifest import SIGNATURE

LEVELS = (0, 1, 2, 3, 4)  # onnxruntime: 0 unset (float), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations


def set_accuracy_level(bundle_dir: str | Path, level: int) -> int:
    """Rewrite every ``MatMulNBits`` node of the bundle's graphs to ``level``; returns how many nodes changed.

    The manifest's hashes and recipe follow and a signature is dropped (sign the bundle again);
    external weight files are not touched.
    """
    if level not in LEVELS:
        raise BundleError(f"accuracy level must be one of {LEVELS}, not {level!r}")
    bundle_dir = Path(bundle_dir)
    bundle = open_bundle(bundle_dir)
    m = bundle.manifest
    graphs = [m.graph.file] + ([m.merge_points["graph"]] if m.merge_points and m.merge_points.get("graph") else [])
    changed = 0
    for name in graphs:
        path = bundle_dir / name
        model = onnx.load(str(path), load_external_data=False)
        here = 0
        for node in model.graph.node:
            if node.op_type != "MatMulNBits":
                continue
            for attr in node.attribute:
                if attr.name == "accuracy_level" and attr.i != level:
                    attr.i = level
                    here += 1
        if here:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(model.SerializeToString())
            tmp.replace(path)
            changed += here
    if changed or m.graph.quantization.get("accuracy_level") not in (None, level):
        quantization = dict(m.graph.quantization)
        if "accuracy_level" in quantization:
            quantization["accuracy_level"] = level
        (bundle_dir / SIGNATURE).unlink(missing_ok=True)
        write_manifest(bundle_dir, with_files(replace(m, graph=replace(m.graph, quantization=quantization)), bundle_dir))
    return changed
