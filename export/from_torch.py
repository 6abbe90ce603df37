"""Read a Hugging Face Llama-family torch model into what the graph writer needs.

Duck-typed on the model (``.config``, ``.state_dict()``, ``.model.rotary_emb``):
export/ never imports transformers itself.
"""

from __future__ import annotations

import numpy as np

from jishi.errors import BaseModelError
from jishi.runtime.manifest import ModelConfig

FAMILIES = ("llama", "mistral", "qwen2")


def model_config(hf_config, context: int) -> ModelConfig:
    family = getattr(hf_config, "model_type", None)
    if family not in FAMILIES:
        raise BaseModelError(
            f"model family {family!r} is not supported by jishi's exporter; supported: {', '.join(FAMILIES)}"
        )
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("default", "linear", "llama3", "dynamic", None):
        raise BaseModelError(f"rope scaling {scaling!r} is not supported by jishi's exporter")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "dynamic":
        raise BaseModelError("dynamic NTK rope scaling depends on the sequence length and is not supported")
    max_pos = getattr(hf_config, "max_position_embeddings", context)
    if context > max_pos:
        raise BaseModelError(f"context {context} is longer than the model's {max_pos} positions; pass a smaller context")
    window = getattr(hf_config, "sliding_window", None) if family != "llama" else None
    if family == "qwen2" and not getattr(hf_config, "use_sliding_window", False):
        window = None
    return ModelConfig(
        family=family,
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        context_length=context,
        rope_theta=float(getattr(hf_config, "rope_theta", 10000.0)),
        rms_norm_eps=float(hf_config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        attention_bias=family == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        rope_scaling=dict(scaling) if scaling else None,
        sliding_window=int(window) if window and window < context else None,
    )


def numpy_weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def rotary(model) -> tuple[np.ndarray, float]:
    """The model's own inverse frequencies and attention scaling (rope scaling applied by transformers)."""
    emb = model.model.rotary_emb
    return emb.inv_freq.detach().double().cpu().numpy(), float(getattr(emb, "attention_scaling", 1.0))
