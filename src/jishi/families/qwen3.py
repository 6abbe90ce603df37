"""Qwen3 (dense): no q/k/v biases, an RMSNorm on each head of q and k before rotary."""

from __future__ import annotations

from jishi.errors import BaseModelError
from jishi.families.features import Features

NAME = "qwen3"
MODEL_TYPES = ("qwen3",)


def check(hf_config) -> None:
    if getattr(hf_config, "num_experts", 0):
        raise BaseModelError("Qwen3 mixture-of-experts models (qwen3_moe) are not supported; use a dense Qwen3")


def qkv_bias(hf_config) -> bool:
    return bool(getattr(hf_config, "attention_bias", False))


def features(hf_config, head_dim: int) -> Features:
    return Features(qk_norm=True)
