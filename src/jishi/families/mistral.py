"""Mistral: the Llama layout with one sliding window for every layer (when the config sets one)."""

from __future__ import annotations

from jishi.families.features import Features

NAME = "mistral"
MODEL_TYPES = ("mistral",)


def check(hf_config) -> None:
    pass


def qkv_bias(hf_config) -> bool:
    return False


def features(hf_config, head_dim: int) -> Features:
    return Features()
