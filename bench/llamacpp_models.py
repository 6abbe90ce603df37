"""llama.cpp's own quantizations of a base, made from the same weights as the GGUF it ships in.

    python bench/llamacpp_models.py SHIPPED.gguf OUT_DIR [--types Q4_0 Q4_K_M Q8_0] [--threads 2] [--imatrix M.npz]

Run with the peers' interpreter (it needs llama-cpp-python). Writes OUT_DIR/f32.gguf: the
shipped file with every tensor dequantized to fp32 and its metadata (tokenizer, rope settings,
architecture) copied as it is, so the weights are exactly the shipped ones. Then quantizes that
file with llama.cpp's own quantizer (``llama_model_quantize``) to each type, OUT_DIR/<type>.gguf,
the way llama.cpp's users make them from a full-precision file. Prints one JSON object: per file,
its size and how many tensors of each GGUF type it holds (llama.cpp keeps some tensors on another
type when a row does not split into its blocks).

An OUT_DIR/f32.gguf already there is used as it is, so a model written to F32 GGUF by other means
(bench/quant_methods.py's student, through jishi.distill.gguf_write) is quantized by passing that file
as SHIPPED. ``--imatrix`` hands llama.cpp an importance matrix, as its ``llama-quantize --imatrix``
does: an .npz of tensor name (``blk.0.attn_q.weight``) → the mean squared activation of each input
column on calibration text; those files are OUT_DIR/<type>-imatrix.gguf.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize

SKIPPED_KEYS = ("general.architecture", "general.alignment")  # the writer sets these itself


def write_f32(src: Path, out: Path) -> None:
    """``src`` with its tensors dequantized to fp32; metadata copied (file type set to all-F32)."""
    reader = GGUFReader(src)
    arch = reader.get_field("general.architecture").contents()
    tmp = out.with_suffix(".tmp")
    writer = GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in SKIPPED_KEYS:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        value = int(LlamaFileType.ALL_F32) if field.name == "general.file_type" else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)


def quantize(src: Path, out: Path, kind: str, threads: int, imatrix: dict[str, np.ndarray] | None = None) -> None:
    """``src`` quantized to ``kind`` by llama.cpp, with the importance matrix ``imatrix`` (tensor name → per
    input column mean squared activation) weighting each weight's rounding error, if given."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = threads
    if imatrix:
        # llama.h's array of (name, values, count), ended by an entry with no name (zeroed here)
        values = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]
        entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
        for entry, name, v in zip(entries, imatrix, values):
            entry.name, entry.size = name.encode(), v.size
            entry.data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize to {kind} failed with {rc}")
    os.replace(tmp, out)


def describe(path: Path) -> dict:
    reader = GGUFReader(path)
    counts = collections.Counter(t.tensor_type.name for t in reader.tensors)
    return {"path": str(path), "size_mb": round(path.stat().st_size / 1e6, 1), "tensor_types": dict(sorted(counts.items()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shipped", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--types", nargs="*", default=["Q4_0", "Q4_K_M", "Q8_0"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--imatrix", type=Path, help="importance matrix (.npz of tensor name → per-column mean squared "
                    "activation) for the quantizations")
    args = ap.parse_args()
    imatrix = dict(np.load(args.imatrix)) if args.imatrix else None
    tag = "-imatrix" if imatrix else ""
    args.out.mkdir(parents=True, exist_ok=True)
    f32 = args.out / "f32.gguf"
    if not f32.is_file():
        write_f32(args.shipped, f32)
    made = {"shipped": describe(args.shipped), "F32": describe(f32)}
    for kind in args.types:
        out = args.out / f"{kind}{tag}.gguf"
        if not out.is_file():
            quantize(f32, out, kind, args.threads, imatrix)
        made[kind + tag] = describe(out)
    print(json.dumps(made))


if __name__ == "__main__":
    main()
