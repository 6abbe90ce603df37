"""Gemma 3 (text): (1 + w) RMSNorms, sandwich norms around attention and MLP, QK-norm, GeGLU,
embeddings scaled by sqrt(hidden), q·k scaled by query_pre_attn_scalar, and local layers with a
sliding window and their own rope base (1e4) between global ones (1e6)."""

from __future__ import annotations

import math

from jishi.errors import BaseModelError
from jishi.families.features import Features

NAME = "gemma3"
MODEL_TYPES = ("gemma3_text",)
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "silu": "silu"}


def check(hf_config) -> None:
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise BaseModelError("this Gemma 3 config attends in both directions (an embedding model); jishi exports "
                             "causal decoders only")
    act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", None)
    if act not in _ACTIVATIONS:
        raise BaseModelError(f"Gemma 3 activation {act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")


def qkv_bias(hf_config) -> bool:
    return bool(getattr(hf_config, "attention_bias", False))


def features(hf_config, head_dim: int) -> Features:
    act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", None)
    return Features(
        norm_offset=1.0,
        qk_norm=True,
        pre_mlp_norm="pre_feedforward_layernorm",
        post_attention_norm="post_attention_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        activation=_ACTIVATIONS[act],
        attention_scale=float(hf_config.query_pre_attn_scalar) ** -0.5,
        embedding_scale=math.sqrt(hf_config.hidden_size),
        local_rope_theta=float(getattr(hf_config, "rope_local_base_freq", 0.0) or 0.0),
        attn_logit_softcap=float(getattr(hf_config, "attn_logit_softcapping", None) or 0.0),
        final_logit_softcap=float(getattr(hf_config, "final_logit_softcapping", None) or 0.0),
    )
