"""Qwen2 / Qwen2.5: the Llama layout with biases on q, k and v; sliding windows by layer type."""

from __future__ import annotations

from jishi.families.features import Features

NAME = "qwen2"
MODEL_TYPES = ("qwen2",)


def check(hf_config) -> None:
    pass


def qkv_bias(hf_config) -> bool:
    return True


def features(hf_config, head_dim: int) -> Features:
    return Features()
