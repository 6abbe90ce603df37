"""PEFT LoRA adapters into onnxruntime's adapter format, added to a bundle."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from jishi.errors import AdapterError
from jishi.runtime.adapters import check_params
from jishi.runtime.bundle import open_bundle
from jishi.runtime.manifest import SIGNATURE

_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down|qkv|gate_up)_proj\.lora_([AB])"
                  r"(?:\.default)?\.weight$")


def read_peft(adapter_dir: str | Path, cfg=None) -> tuple[dict[str, np.ndarray], dict]:
    """A PEFT LoRA directory as our tensors (A: in × r; B: r × out, scaled) and its config.

    A LoRA on a fused projection (Phi-3's ``qkv_proj``, ``gate_up_proj``) becomes one per target
    it holds: the same A, and B's columns of that target (``cfg``, the bundle's config, says where)."""
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise AdapterError(f"{adapter_dir} is not a PEFT adapter directory (needs adapter_config.json and "
                           "adapter_model.safetensors)")
    try:
        config = json.loads(cfg_path.read_text())
        tensors = load_file(str(weights))
    except Exception as e:
        raise AdapterError(f"cannot read the adapter in {adapter_dir}: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{adapter_dir} is a {config.get('peft_type')} adapter; jishi supports LoRA")
    r, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    params: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterError(f"adapter tensor {key!r} is not a LoRA weight of a Llama-family projection")
        layer, module, which = m.groups()
        value = value.astype(np.float32)
        for target, (start, stop) in _targets_of(module + "_proj", cfg, adapter_dir).items():
            if which == "A":
                params[f"layers.{layer}.{target}.lora_A"] = np.ascontiguousarray(value.T)
            else:
                part = value.T if stop is None else value.T[:, start:stop]
                params[f"layers.{layer}.{target}.lora_B"] = np.ascontiguousarray(part * scale)
    return params, config


def _targets_of(module: str, cfg, adapter_dir) -> dict[str, tuple[int, int | None]]:
    """The targets a source module holds, with their output columns (None: the whole module)."""
    if module not in ("qkv_proj", "gate_up_proj"):
        return {module[: -len("_proj")]: (0, None)}
    if cfg is None:
        raise AdapterError(f"the adapter in {adapter_dir} adapts the fused projection {module}: add it to a bundle "
                           "of its model, whose config says how it splits")
    from jishi.families import source_projections

    found = {t: (a, b) for t, (m, a, b) in source_projections(cfg).items() if m == module}
    if not found:
        raise AdapterError(f"the adapter in {adapter_dir} adapts {module}, which this {cfg.family} model does not have")
    return found


def _model_name(text: str) -> str:
    """A model's name without organisation, file type or quantization tag: comparable across sources."""
    name = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower().replace("_", "-")
    name = re.sub(r"\.gguf$", "", name)
    return re.sub(r"(-gguf|-(q\d(-[0-9a-z]+)*|f16|f32|bf16|fp16|fp32|int4|int8))+$", "", name)


def check_base(adapter_dir: str | Path, config: dict, provenance: dict) -> str | None:
    """Refuse an adapter trained for another base; returns the base hash it records, if any.

    jishi's own adapters record the sha256 of the base they were trained on. For one made
    elsewhere, PEFT's ``base_model_name_or_path`` is compared where it is a model id
    (``org/name``) rather than a local path; shapes are checked later in any case.
    """
    base_sha = provenance.get("base_sha256")
    info_path = Path(adapter_dir) / "jishi_adapter.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError) as e:
            raise AdapterError(f"cannot read {info_path}: {e}") from None
        trained = info.get("base_sha256")
        if trained and base_sha and trained != base_sha:
            raise AdapterError(
                f"adapter {Path(adapter_dir).name} was trained on {info.get('base', 'another base')} "
                f"(sha256 {trained[:12]}…), but this bundle is built from {provenance.get('base')} "
                f"(sha256 {base_sha[:12]}…); train it again with `jishi finetune --base` on this bundle's base"
            )
        return trained
    named = config.get("base_model_name_or_path") or ""
    looks_like_id = re.fullmatch(r"[\w.-]+/[\w.-]+", named) and not Path(named).exists()
    if looks_like_id:
        ours = {_model_name(provenance.get(k) or "") for k in ("base", "base_source")} - {""}
        if ours and _model_name(named) not in ours:
            raise AdapterError(
                f"adapter {Path(adapter_dir).name} was made for {named}, but this bundle is built from "
                f"{provenance.get('base')}: an adapter only works on the base it was trained on"
            )
    return None


def grid_of(adapter_dir: str | Path) -> dict | None:
    """The int4 codes an adapter was trained against (``jishi_adapter.json``'s ``grid``), or None for an
    adapter trained on float weights."""
    info_path = Path(adapter_dir) / "jishi_adapter.json"
    if not info_path.is_file():
        return None
    try:
        grid = json.loads(info_path.read_text()).get("grid")
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read {info_path}: {e}") from None
    return grid if isinstance(grid, dict) else None


def check_grid(adapter_dir: str | Path, quantization: dict) -> None:
    """Refuse an adapter trained against int4 codes other than this bundle's: what it learnt is a correction
    of those very weights (``jishi.distill.grid_lora``)."""
    grid = grid_of(adapter_dir)
    if grid is None:
        return
    want, have = grid.get("codes_sha256"), quantization.get("codes_sha256")
    if want and want == have:
        return
    name = Path(adapter_dir).name
    how = (f"{grid.get('method', '?')}, block {grid.get('block', '?')}, {grid.get('zero_points', '?')} zero points"
           + (f", calibrated on {grid['calibration']}" if grid.get("calibration") else ""))
    found = (f"codes sha256 {have[:12]}…" if have else
             f"no record of its int4 codes (a {quantization.get('name', '?')} bundle"
             + (")" if quantization.get("name") != "int4" else ", built before codes were recorded)"))
    raise AdapterError(
        f"adapter {name} was trained against int4 codes sha256 {str(want)[:12]}… ({how}), and this bundle has "
        f"{found}: it corrects other weights than these. Build the bundle and its adapter together with "
        "`jishi build --base BASE --recover-steps N`, or train it again against this bundle's codes")


def add_adapter(bundle_dir: str | Path, name: str, adapter_dir: str | Path) -> Path:
    """Convert and add an adapter to a bundle (its signature is dropped until signed again)."""
    import onnxruntime as ort

    from jishi.export.bundle_writer import with_files, write_manifest

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise AdapterError(f"adapter name {name!r} must be letters, digits, '-', '_' or '.'")
    bundle_dir = Path(bundle_dir)
    bundle = open_bundle(bundle_dir)
    _not_installed(bundle)
    m = bundle.manifest
    if not m.merge_points:
        raise AdapterError("this bundle was built without merge points (--no-merge-points); rebuild it to add adapters, "
                           "or merge the adapter in at build time with --merge")
    params, config = read_peft(adapter_dir, m.config)
    named = config.get("base_model_name_or_path") or ""
    trained_on = check_base(adapter_dir, config, m.provenance)
    check_grid(adapter_dir, m.graph.quantization)
    # layers, targets and every shape are checked against this bundle (raises AdapterError)
    rank, targets = check_params(name, params, m.config, tuple(m.merge_points["targets"]))
    rel = f"adapters/{name}.onnx_adapter"
    out = bundle_dir / rel
    out.parent.mkdir(exist_ok=True)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in params.items()})
    tmp = out.with_name(out.name + ".tmp")
    fmt.export_adapter(str(tmp))
    os.replace(tmp, out)
    entry = {"name": name, "file": rel, "rank": rank, "alpha": config.get("lora_alpha"), "targets": list(targets),
             "base_sha256": trained_on or m.provenance.get("base_sha256"), "source": str(named or Path(adapter_dir).name)}
    adapters = [a for a in m.adapters if a["name"] != name] + [entry]
    (bundle_dir / SIGNATURE).unlink(missing_ok=True)
    write_manifest(bundle_dir, with_files(replace(m, adapters=adapters), bundle_dir))
    return out


def remove_adapter(bundle_dir: str | Path, name: str) -> None:
    from jishi.export.bundle_writer import with_files, write_manifest

    bundle_dir = Path(bundle_dir)
    bundle = open_bundle(bundle_dir)
    _not_installed(bundle)
    m = bundle.manifest
    entry = next((a for a in m.adapters if a["name"] == name), None)
    if entry is None:
        raise AdapterError(f"the bundle has no adapter {name!r}")
    (bundle_dir / entry["file"]).unlink(missing_ok=True)
    (bundle_dir / SIGNATURE).unlink(missing_ok=True)
    write_manifest(bundle_dir, with_files(replace(m, adapters=[a for a in m.adapters if a["name"] != name]), bundle_dir))



def _not_installed(bundle) -> None:
    """A model with delivered adapters is an installed version: immutable, and its manifest stays as signed."""
    if bundle.added:
        raise AdapterError(f"{bundle.root} holds delivered adapters ({', '.join(a.manifest.name for a in bundle.added)}): "
                           "it is an installed version, which is never changed in place; change the bundle it came from, "
                           "or deliver the adapter with `jishi pack BUNDLE --adapter NAME` and `jishi install`")
