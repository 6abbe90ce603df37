"""LoRA adapters at run time, bound into the bundle's merge points.

An adapter file (onnxruntime's ``.onnx_adapter`` format) holds, per layer ``i`` and
target ``t`` (q, k, v, o, gate, up, down), ``layers.{i}.{t}.lora_A`` (in × r) and
``layers.{i}.{t}.lora_B`` (r × out, its scale folded in). Each fused projection of the
graph has a side path ``(x·A)·B`` whose inputs default to the zero-point correction (int4)
or to zeros; activating an adapter binds ``[A_default | A_t ...]`` and
``[B_default ; B_t placed at t's output columns ...]``, so the graph adds exactly
``x·A_t·B_t`` for each target, with no extra nodes. A loaded adapter keeps only its
own tensors; those inputs are built when it becomes active.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jishi.errors import AdapterError
from jishi.runtime.manifest import ModelConfig

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS = {"attn.qkv": ("q", "k", "v"), "attn.o": ("o",), "mlp.gate_up": ("gate", "up"), "mlp.down": ("down",)}


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each target's weight."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, i), "up": (h, i), "down": (i, h)}


def _offsets(cfg: ModelConfig, group: str) -> dict[str, int]:
    shapes = target_shapes(cfg)
    out, at = {}, 0
    for t in GROUPS[group]:
        out[t] = at
        at += shapes[t][1]
    return out


def default_a_inputs(cfg: ModelConfig, merge_points: dict, b_rows: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """The A input of every merge point when no adapter uses it: one shared array per input size.

    int4 bundles: the 0/1 block-membership matrix of the zero-point correction; others: a
    zero column (their B default is a zero row). ``b_rows`` (B default's rows, by input name, as
    the graph stores them) picks per projection: a projection with no correction (a GGUF tensor
    whose zero point is an integer) has a one-row B and takes the zero column.
    """
    block = int(merge_points.get("block", 32))
    sums = merge_points.get("a_default") == "block_sums"
    shapes = target_shapes(cfg)
    shared: dict[int, np.ndarray] = {}
    out = {}
    for layer in range(cfg.num_layers):
        for group, targets in GROUPS.items():
            k = shapes[targets[0]][0]
            name = f"lora.layer{layer}.{group}"
            with_sums = sums and (b_rows or {}).get(f"{name}.b", k // block) != 1
            key = (k, with_sums)
            if key not in shared:
                shared[key] = (np.kron(np.eye(k // block, dtype=np.float32), np.ones((block, 1), np.float32)) if with_sums
                               else np.zeros((k, 1), np.float32))
            out[f"{name}.a"] = shared[key]
    return out


@dataclass
class Adapter:
    """A loaded adapter: its own tensors only (``layers.{i}.{t}.lora_A`` / ``lora_B``).

    The merge points' inputs are built from them when the adapter becomes active
    (``fused_inputs``), so each loaded adapter costs its own size and no more.
    """

    name: str
    params: dict[str, np.ndarray]
    rank: int
    targets: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.params.values())


def read_adapter_file(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as e:  # onnxruntime raises its own types for a bad file
        raise AdapterError(f"{path.name} is not a readable adapter file ({e}); copy or convert it again") from None
    # Copies: the arrays would otherwise point into memory the adapter object frees.
    out = {k: np.array(v.numpy(), copy=True) for k, v in params.items()}
    del params
    _return_freed_memory()
    return out


def _return_freed_memory() -> None:
    """Hand the file reader's freed buffer back to the OS (glibc keeps it otherwise, and each
    adapter loaded would then add twice its size to the resident memory)."""
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
            pass


def _model_order(key: str):
    """Sort key: layer, then target in model order, then A before B (unknown names last)."""
    parts = key.split(".")
    if len(parts) == 4 and parts[1].isdigit() and parts[2] in TARGETS:
        return (0, int(parts[1]), TARGETS.index(parts[2]), parts[3])
    return (1, 0, 0, key)


def check_params(name: str, params: dict[str, np.ndarray], cfg: ModelConfig,
                 merge_targets: tuple[str, ...] = TARGETS) -> tuple[int, tuple[str, ...]]:
    """Refuse tensors that do not fit this model and its merge points; the adapter's rank and targets."""
    shapes = target_shapes(cfg)
    seen: set[str] = set()
    ranks: set[int] = set()
    for key in sorted(params, key=_model_order):
        parts = key.split(".")
        if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in TARGETS or parts[3] not in ("lora_A", "lora_B"):
            raise AdapterError(f"adapter {name!r} holds a tensor {key!r} that is not a LoRA weight of this model family")
        layer, target = int(parts[1]), parts[2]
        if layer >= cfg.num_layers:
            raise AdapterError(f"adapter {name!r} has weights for layer {layer}, but the model has {cfg.num_layers} layers: "
                               "it was made for another base")
        if target not in merge_targets:
            raise AdapterError(f"adapter {name!r} targets {target}, which is not a merge point of this bundle "
                               f"(merge points: {', '.join(merge_targets)})")
        if parts[3] == "lora_B":
            continue
        a, b = params[key], params.get(f"layers.{layer}.{target}.lora_B")
        fan_in, fan_out = shapes[target]
        if b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != fan_in or b.shape[1] != fan_out or a.shape[1] != b.shape[0]:
            raise AdapterError(
                f"adapter {name!r}: layer {layer} {target} has shapes {getattr(a, 'shape', None)} and "
                f"{getattr(b, 'shape', None)}, expected ({fan_in}, r) and (r, {fan_out}): it was made for another base"
            )
        seen.add(target)
        ranks.add(a.shape[1])
    orphans = [k for k in params if k.endswith(".lora_B") and k[:-1] + "A" not in params]
    if orphans:
        raise AdapterError(f"adapter {name!r} has {orphans[0]} without its lora_A: the file is incomplete")
    if not seen:
        raise AdapterError(f"adapter {name!r} holds no LoRA weights")
    return max(ranks), tuple(t for t in TARGETS if t in seen)


def build_adapter(name: str, params: dict[str, np.ndarray], cfg: ModelConfig,
                  merge_targets: tuple[str, ...]) -> Adapter:
    rank, targets = check_params(name, params, cfg, merge_targets)
    return Adapter(name, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}, rank, targets)


def fused_inputs(adapter: Adapter, cfg: ModelConfig, defaults: dict[str, np.ndarray],
                 reuse: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The merge-point inputs that make the graph add ``x·A_t·B_t`` for each of the adapter's targets.

    Per fused projection: ``[A_default | A_t …]`` and ``[B_default ; B_t at t's output columns …]``
    (defaults: the int4 zero-point correction, or nothing where it is a zero column).
    Arrays of ``reuse`` with the right shape are written over instead of allocated (no new
    pages to fault in: a switch then costs the copy alone); they must not be in use elsewhere.
    """
    reuse = reuse or {}

    def array(name: str, shape: tuple[int, int], zero: bool) -> np.ndarray:
        old = reuse.get(name)
        if old is not None and old.shape == shape:
            if zero:
                old.fill(0.0)
            return old
        return np.zeros(shape, np.float32) if zero else np.empty(shape, np.float32)

    params = adapter.params
    inputs: dict[str, np.ndarray] = {}
    for layer in range(cfg.num_layers):
        for group, targets in GROUPS.items():
            present = [t for t in targets if f"layers.{layer}.{t}.lora_A" in params]
            if not present:
                continue
            a_name, b_name = f"lora.layer{layer}.{group}.a", f"lora.layer{layer}.{group}.b"
            if a_name not in defaults:
                raise AdapterError(f"this bundle has no merge point {a_name}; rebuild it with merge points")
            a_def, b_def = defaults[a_name], defaults[b_name]
            keep = not (a_def.shape[1] == 1 and not a_def.any() and not b_def.any())
            ranks = [params[f"layers.{layer}.{t}.lora_A"].shape[1] for t in present]
            lead = a_def.shape[1] if keep else 0
            a = array(a_name, (a_def.shape[0], lead + sum(ranks)), zero=False)  # every column is written
            b = array(b_name, (lead + sum(ranks), b_def.shape[1]), zero=True)
            if keep:
                a[:, :lead], b[:lead] = a_def, b_def
            offsets, row = _offsets(cfg, group), lead
            for t, r in zip(present, ranks):
                col = offsets[t]
                a[:, row:row + r] = params[f"layers.{layer}.{t}.lora_A"]
                lora_b = params[f"layers.{layer}.{t}.lora_B"]
                b[row:row + r, col:col + lora_b.shape[1]] = lora_b
                row += r
            inputs[a_name], inputs[b_name] = a, b
    return inputs
