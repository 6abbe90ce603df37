"""Llama 1–3.x (and SmolLM): RMSNorm, SwiGLU, rope with default / linear / llama3 scaling."""

from __future__ import annotations

from jishi.families.features import Features

NAME = "llama"
MODEL_TYPES = ("llama",)


def check(hf_config) -> None:
    pass


def qkv_bias(hf_config) -> bool:
    return bool(getattr(hf_config, "attention_bias", False))


def features(hf_config, head_dim: int) -> Features:
    return Features()
