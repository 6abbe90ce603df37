"""A GGUF file's tensors as stored: raw blocks, by the Hugging Face name transformers gives them.

transformers dequantizes a GGUF into float weights; the exporter wants the blocks themselves
(codes, scales, minimums) to keep each tensor exactly on its grid. This module reads them with
``gguf``'s reader, maps the GGUF names to the model's own parameter names with transformers'
own map, and puts the rows in the order transformers' tensor processor puts them (Llama's
q/k rows are permuted in GGUF files): the permutation is found by running that processor on
a column of row numbers, so it is transformers' rule exactly, never a copy of it.

It also checks a file before anything loads it: a truncated file, or a tensor type that
neither ``gguf`` nor jishi can read, is refused with the file's name and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jishi.errors import BaseModelError


@dataclass(frozen=True)
class RawTensor:
    """One 2-D GGUF tensor: ``data`` holds its n rows of raw blocks (uint8, n × row bytes)."""

    gguf_name: str
    type_name: str  # gguf.GGMLQuantizationType name: "Q4_K", "F32", ...
    n: int  # rows (output features)
    k: int  # values per row (input features)
    data: np.ndarray
    bits_per_weight: float  # storage per value, scales included (Q4_K: 4.5)


def open_reader(path: Path):
    """gguf's reader on ``path``, or a BaseModelError that says what is wrong with the file."""
    from gguf import GGUFReader

    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise BaseModelError(f"{path} is not a readable GGUF file (it does not start with 'GGUF'): fetch or convert "
                             "it again, or pass a Hugging Face model directory")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, KeyError, struct errors for a damaged file
        raise BaseModelError(
            f"{path} is not a readable GGUF file (truncated or damaged; gguf's reader: {type(e).__name__}: {e}): "
            "fetch or convert it again (and check its sha256)") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise BaseModelError(
                f"{path} is not a readable GGUF file (truncated: tensor {t.name} ends at byte {end:,} but the file "
                f"has {size:,} bytes): fetch or convert it again (and check its sha256)")
    return reader


def check_tensor_types(path: Path, reader=None) -> dict[str, int]:
    """Count the file's tensor types; refuse a type ``gguf`` cannot dequantize (jishi cannot load it)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits  # the types gguf can dequantize in numpy

    reader = reader or open_reader(path)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        kind = GGMLQuantizationType(t.tensor_type)
        if kind not in _type_traits and kind.name not in ("F32", "F16"):
            raise BaseModelError(
                f"{path}: tensor {t.name} is of type {kind.name}, which jishi cannot read (the gguf package has no "
                "decoder for it); convert the model to a common type, e.g. `llama-quantize --allow-requantize "
                "IN.gguf OUT.gguf Q4_K_M`, or use its F16 / safetensors original")
        counts[kind.name] = counts.get(kind.name, 0) + 1
    return counts


def row_order(model, gguf_name: str, n: int, config: dict) -> np.ndarray | None:
    """The row permutation transformers applies to this tensor when it loads it, or None for none."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    arch = {"gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}.get(
        model.config.model_type, model.config.model_type)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    probe = np.arange(n, dtype=np.float64)[:, None]
    out = np.asarray(processor.process(weights=probe, name=gguf_name, tensor_key_mapping={}, parsed_parameters={}).weights)
    if out.shape != probe.shape:
        raise BaseModelError(f"transformers reshapes the GGUF tensor {gguf_name} on loading; its blocks cannot be kept")
    order = out[:, 0]
    if np.array_equal(order, probe[:, 0]):
        return None
    if not np.array_equal(np.sort(order), probe[:, 0]):
        raise BaseModelError(f"transformers changes the values of the GGUF tensor {gguf_name} on loading, "
                             "so its blocks cannot be kept as they are")
    return order.astype(np.int64)


def read_raw(path: Path, model, names: set[str] | None = None) -> dict[str, RawTensor]:
    """The 2-D tensors of the GGUF at ``path`` by the parameter names of ``model`` (as transformers
    loaded it from that file), rows in the model's order. ``names`` limits which are read."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    reader = open_reader(path)
    mapping = get_gguf_hf_weights_map(model)
    cfg = model.config
    config = {"num_attention_heads": cfg.num_attention_heads,
              "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads}
    out: dict[str, RawTensor] = {}
    for t in reader.tensors:
        hf = mapping.get(t.name)
        if hf is None or (names is not None and hf not in names) or len(t.shape) != 2:
            continue
        k, n = (int(v) for v in t.shape)  # GGUF lists the fastest-varying dimension first
        data = np.asarray(t.data).view(np.uint8).reshape(n, -1)
        order = row_order(model, t.name, n, config)
        if order is not None:
            data = data[order]
        kind = GGMLQuantizationType(t.tensor_type)
        values, size = GGML_QUANT_SIZES[kind]
        out[hf] = RawTensor(t.name, kind.name, n, k, data, 8 * size / values)
    return out


def _meta(reader, key: str):
    f = reader.fields.get(key)
    if f is None or not f.data:
        return None
    v = f.parts[f.data[0]]
    return bytes(v).decode("utf-8", "replace") if f.types and f.types[0].name == "STRING" else v[0]


def check_shapes(path: Path, reader=None) -> None:
    """The file's hyperparameters against its own weights' shapes: a clear error naming the field
    that contradicts them (before transformers fails on a size mismatch)."""
    reader = reader or open_reader(path)
    arch = _meta(reader, "general.architecture")
    if arch is None:
        raise BaseModelError(f"{path} has no general.architecture: it is not a model GGUF (a vision projector or "
                             "an adapter?); pass the language model's own GGUF")
    shapes = {t.name: [int(v) for v in t.shape] for t in reader.tensors}  # [k, n]: input size first

    def want(field: str, claimed, tensor: str, axis: int, found_as: str, times: int = 1):
        if claimed is None or tensor not in shapes:
            return
        found = shapes[tensor][axis] if axis < len(shapes[tensor]) else 1
        if int(claimed) * times != found:
            raise BaseModelError(
                f"{path}: {arch}.{field} is {int(claimed)} but {tensor} has {found} {found_as}; the file's metadata "
                "contradicts its weights: convert the model again (or fix the field with gguf's gguf_set_metadata)")

    hidden = _meta(reader, f"{arch}.embedding_length")
    heads = _meta(reader, f"{arch}.attention.head_count")
    kv = _meta(reader, f"{arch}.attention.head_count_kv") or heads
    head_dim = _meta(reader, f"{arch}.attention.key_length") or (int(hidden) // int(heads) if hidden and heads else None)
    want("embedding_length", hidden, "token_embd.weight", 0, "values per row")
    want("feed_forward_length", _meta(reader, f"{arch}.feed_forward_length"), "blk.0.ffn_gate.weight", 1, "rows")
    if head_dim:
        want("attention.head_count", heads, "blk.0.attn_q.weight", 1, f"rows (heads of {head_dim})", int(head_dim))
        want("attention.head_count_kv", kv, "blk.0.attn_k.weight", 1, f"rows (heads of {head_dim})", int(head_dim))
    vocab = _meta(reader, f"{arch}.vocab_size")
    want("vocab_size", vocab, "token_embd.weight", 1, "rows")
    layers = _meta(reader, f"{arch}.block_count")
    found = {int(n.split(".")[1]) for n in shapes if n.startswith("blk.")}
    if layers is not None and found != set(range(int(layers))):
        raise BaseModelError(f"{path}: {arch}.block_count is {int(layers)} but the file has weights for "
                             f"{len(found)} blocks; convert the model again")


def check_file(path: Path) -> dict[str, int]:
    """Everything jishi checks in a GGUF before loading it; returns its tensor types and counts."""
    reader = open_reader(path)
    counts = check_tensor_types(path, reader)
    check_shapes(path, reader)
    return counts
