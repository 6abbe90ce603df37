"""Phi-3 and Phi-4-mini: q/k/v stored as one qkv_proj and gate/up as one gate_up_proj, partial
rotary (Phi-4-mini rotates 3/4 of each head), longrope scaling, a sliding window on every layer."""

from __future__ import annotations

from jishi.families.features import Features

NAME = "phi3"
MODEL_TYPES = ("phi3",)


def check(hf_config) -> None:
    pass


def qkv_bias(hf_config) -> bool:
    return False


def features(hf_config, head_dim: int) -> Features:
    factor = float(getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0)
    rotary = int(head_dim * factor)
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    longrope = scaling.get("rope_type", scaling.get("type")) == "longrope"
    return Features(fused_qkv=True, fused_gate_up=True, rotary_dim=0 if rotary == head_dim else rotary,
                    rope_long_after=int(hf_config.original_max_position_embeddings) if longrope else 0)
