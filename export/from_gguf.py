"""A GGUF base's weights on their own grids, ready for the graph (``build_decoder(prequantized=...)``).

Each tensor's raw blocks (read by ``jishi.distill.gguf_tensors``) go through the format
registry (``gguf_formats``) and are checked against the float weights transformers loaded
from the same file: what the bundle computes is then exactly what the file says. A tensor
whose type has no exact form, or whose blocks do not match the loaded weights, is
re-quantized from those floats and listed as such: the build's evaluation measures the cost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from jishi.export.gguf_formats import FORMATS, to_weight
from jishi.export.quant import QuantizedWeight, quantize_asymmetric, quantize_symmetric_int8, take_rows

TABLES = ("model.embed_tokens.weight", "lm_head.weight")
FOUR_BIT_BLOCK_32 = ("Q4_0", "Q4_1", "Q4_K")  # what `--quant int4` keeps as it is
# Fused projections (Phi-3) that the graph takes as their parts: one GGUF tensor, split by rows.
FUSED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
         "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}


@dataclass
class GridPlan:
    weights: dict = field(default_factory=dict)  # parameter name -> QuantizedWeight | float array
    formats: dict = field(default_factory=dict)  # tensor group -> {GGUF type: count}
    requantized: dict = field(default_factory=dict)  # tensor group -> {GGUF type: count} re-quantized
    notes: list = field(default_factory=list)  # why a tensor was re-quantized

    @property
    def corrected(self) -> bool:
        return any(isinstance(w, QuantizedWeight) and w.correction is not None for w in self.weights.values())

    @property
    def side_block(self) -> int:
        """The block of the zero-point corrections' side path: the smallest corrected block (32 if none)."""
        blocks = [w.block for w in self.weights.values() if isinstance(w, QuantizedWeight) and w.correction is not None]
        return min(blocks, default=32)

    def record(self) -> dict:
        """The manifest's account of the formats, per tensor group."""
        used = {t for counts in self.formats.values() for t in counts}
        out = {"formats": self.formats, "forms": {t: FORMATS[t].form for t in sorted(used) if t in FORMATS}}
        if self.requantized:
            out["requantized"] = self.requantized
        return out


def group_of(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``; tables keep their own names."""
    return re.sub(r"^model\.|\.weight$", "", re.sub(r"layers\.\d+\.", "", name))


def grid_weights(raw: Mapping, reference: Mapping[str, np.ndarray], mode: str = "gguf",
                 progress: Callable[[int], None] | None = None) -> GridPlan:
    """The weights of ``raw`` (name -> RawTensor) in MatMulNBits form for the recipe ``mode``.

    ``gguf``: every tensor on its own grid, 4- or 8-bit; the embedding / LM head on theirs when
    GatherBlockQuantized can read it (no float minimum), else 8-bit blocks. ``int4``: only the 4-bit
    types with blocks of 32 (Q4_0, Q4_1, Q4_K) are kept; the rest is left to the int4 recipe.
    """
    plan = GridPlan()
    for name, t in raw.items():
        parts = _parts(name, reference)
        if name not in reference and not parts:
            continue
        ref = reference[name] if not parts else np.concatenate([reference[p] for p in parts], axis=0)
        table = name in TABLES
        group = group_of(name)
        if mode == "int4" and (table or t.type_name not in FOUR_BIT_BLOCK_32):
            plan.requantized.setdefault(group, {}).setdefault(t.type_name, 0)
            plan.requantized[group][t.type_name] += 1
            continue
        w = _exact(name, t, ref, plan.notes)
        if w is None or (table and isinstance(w, QuantizedWeight) and w.correction is not None):
            w = _requantize(t.bits_per_weight, ref, table)
            plan.requantized.setdefault(group, {}).setdefault(t.type_name, 0)
            plan.requantized[group][t.type_name] += 1
        if parts:
            at = np.cumsum([0] + [reference[p].shape[0] for p in parts])
            for p, a, b in zip(parts, at, at[1:]):
                plan.weights[p] = take_rows(w, a, b) if isinstance(w, QuantizedWeight) else w[a:b]
        else:
            plan.weights[name] = w
        plan.formats.setdefault(group, {}).setdefault(t.type_name, 0)
        plan.formats[group][t.type_name] += 1
        if progress:
            progress(1)
    if mode == "gguf":  # a projection the file does not hold as a tensor of its own: 8-bit blocks
        for name, ref in reference.items():
            if name.endswith("_proj.weight") and ref.ndim == 2 and name not in plan.weights:
                plan.weights[name] = quantize_asymmetric(ref, 8, 32, correct=False)
                plan.requantized.setdefault(group_of(name), {}).setdefault("not a tensor of the file", 0)
                plan.requantized[group_of(name)]["not a tensor of the file"] += 1
    return plan


def _parts(name: str, reference: Mapping) -> tuple[str, ...]:
    """The graph's names for the parts of a fused projection (empty if ``name`` is not one)."""
    for fused, parts in FUSED.items():
        if name.endswith(fused):
            stem = name[: -len(fused)]
            full = tuple(stem + p for p in parts)
            if all(p in reference for p in full):
                return full
    return ()


def _exact(name: str, t, ref: np.ndarray, notes: list):
    if t.type_name not in FORMATS:
        notes.append(f"{name}: {t.type_name} has no exact onnxruntime form")
        return None
    w = to_weight(t.type_name, t.data, t.n, t.k)
    if not _matches(w, ref):
        notes.append(f"{name}: its {t.type_name} blocks differ from the weights transformers loaded")
        return None
    return w


def _matches(w, ref: np.ndarray, rows: int = 2048) -> bool:
    """Whether ``w`` stands for ``ref``, to float32 rounding; compared a slice of rows at a time, so a
    262,144-row embedding costs megabytes here, not gigabytes."""
    n = w.n if isinstance(w, QuantizedWeight) else w.shape[0]
    if (n, w.k if isinstance(w, QuantizedWeight) else w.shape[1]) != ref.shape:
        return False
    tol = 1e-5 * float(np.abs(ref).max() or 1.0)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        eff = take_rows(w, a, b).dequantize() if isinstance(w, QuantizedWeight) else w[a:b].astype(np.float32)
        if not np.allclose(eff, ref[a:b], rtol=0, atol=tol):
            return False
    return True


def _requantize(bits_per_weight: float, ref: np.ndarray, table: bool):
    """Off its grid: 8-bit symmetric blocks for a table, else 4-bit blocks (with the exact float minimum)
    for a type of at most 4.5 bits per weight, 8-bit blocks for wider ones."""
    if table:
        return quantize_symmetric_int8(ref, 32)
    if bits_per_weight <= 4.5:
        return quantize_asymmetric(ref, 4, 32, correct=True)
    return quantize_asymmetric(ref, 8, 32, correct=False)
