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
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, KeyError, struct errors for a damaged file
        raise BaseModelError(
            f"{path} cannot be read as a GGUF file ({type(e).__name__}: {e}); it is damaged, truncated or not "
            "a GGUF: download or convert it again") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise BaseModelError(
                f"{path} is truncated: tensor {t.name} ends at byte {end:,} but the file has {size:,} bytes; "
                "download it again (and check its sha256)")
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
