"""The shape of a model from whatever names it (bundle, installed name, HF directory, GGUF, known base),
and the device profile a command means, for the planner."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from jishi.errors import JishiError


def model_shape(spec: str):
    """A ``ModelShape`` for the planner; reads only configs and manifests, never the weights."""
    from jishi.devices.plan import ModelShape
    from jishi.runtime.bundle import open_bundle
    from jishi.runtime.model import resolve_bundle

    path = Path(spec)
    if (path / "config.json").is_file():
        c = json.loads((path / "config.json").read_text())
        c = c.get("text_config") or c  # a multimodal config holds its decoder's (the build refuses it, saying why)
        heads = c["num_attention_heads"]
        return ModelShape(path.name, c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], heads,
                          c.get("num_key_value_heads", heads), c.get("head_dim") or c["hidden_size"] // heads,
                          c["vocab_size"], bool(c.get("tie_word_embeddings", True)),  # transformers omits its default, True
                          int4_correction=False)  # off-grid weights: int4 onto integer zero points
    if path.suffix == ".gguf" or (not path.exists() and spec.lower() in known_bases()):
        from jishi.distill.base import load_config_only

        return load_config_only(spec)
    m = open_bundle(resolve_bundle(spec), verify_hashes=False).manifest
    q = m.graph.quantization or {}
    shape = ModelShape.from_config(m.name, m.config)
    return replace(shape, int4_correction=bool(q.get("zero_point_correction", True)))


def known_bases() -> dict:
    """The known base models, or none on a runtime-only install."""
    try:
        from jishi.distill.base import KNOWN_BASES
    except ImportError:
        return {}
    return KNOWN_BASES


def profile_for(device: str):
    """A profile by id, or the closest profile to this machine for 'detect'."""
    from jishi.devices.detect import best_profile, detect
    from jishi.devices.profiles import get_profile

    if device != "detect":
        return get_profile(device)
    profile = best_profile(detect())
    if profile is None:
        raise JishiError("no device profile matches this machine; pass --device (see `jishi devices`)")
    return profile
