"""The model families jishi takes: one small module each, found by ``model_type``.

Read by the graph builder (export/) and by the torch side (distill/: loading, pruning,
fine-tuning), so it lives beside both and imports neither, nor torch or transformers.

Each family module has ``NAME`` (shown to users), ``MODEL_TYPES`` (the transformers
``model_type`` values it reads), ``check(hf_config)`` (refuse what it cannot export,
saying why) and ``features(hf_config, head_dim) -> Features``. What is common to all
(sizes, rope settings, sliding windows by layer) is read here. Adding a family is one
module here and its tests.
"""

from __future__ import annotations

from jishi.errors import BaseModelError
from jishi.families import gemma3, llama, mistral, phi3, qwen2, qwen3
from jishi.families.features import ACTIVATIONS, Features
from jishi.runtime.manifest import ModelConfig

FAMILIES = {t: module for module in (llama, mistral, qwen2, qwen3, gemma3, phi3) for t in module.MODEL_TYPES}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
DEFAULT_CONTEXT = 2048

__all__ = ["FAMILIES", "Features", "family_of", "model_config", "default_context", "supported", "features_of"]


def supported() -> str:
    """The families, as a user reads them in an error message."""
    names = dict.fromkeys(m.NAME for m in FAMILIES.values())
    return ", ".join(names)


def family_of(hf_config):
    """The family module of a transformers config, or a clear refusal."""
    model_type = getattr(hf_config, "model_type", None)
    if getattr(hf_config, "vision_config", None) is not None or model_type in MULTIMODAL:
        raise BaseModelError(
            f"this is a multimodal model ({model_type!r}, with a vision tower); jishi exports text decoders only. "
            f"Use its text-only checkpoint or GGUF (e.g. Gemma3ForCausalLM / gemma3_text), without the mmproj file. "
            f"Supported families: {supported()}"
        )
    module = FAMILIES.get(model_type)
    if module is None:
        raise BaseModelError(f"model family {model_type!r} is not supported by jishi's exporter; supported: {supported()}")
    return module


MULTIMODAL = ("gemma3", "llava", "qwen2_vl", "qwen2_5_vl", "mllama", "phi3_v", "phi4_multimodal", "idefics3", "smolvlm")


def default_context(hf_config) -> int:
    """min(2048, the model's positions): what a build uses when not told."""
    return min(DEFAULT_CONTEXT, int(getattr(hf_config, "max_position_embeddings", None) or DEFAULT_CONTEXT))


def model_config(hf_config, context: int | None = None) -> ModelConfig:
    """The manifest's model config of a transformers config, its features included."""
    family = family_of(hf_config)
    family.check(hf_config)
    context = default_context(hf_config) if context is None else context
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    scaling = _rope_scaling(hf_config)
    max_pos = getattr(hf_config, "max_position_embeddings", None) or context
    if context > max_pos:
        raise BaseModelError(f"context {context} is longer than the model's {max_pos} positions; pass a smaller context")
    feats = family.features(hf_config, head_dim)
    windows = tuple(w if w is not None and w < context else None for w in layer_windows(hf_config))
    feats = _replace(feats, layer_windows=windows)
    _check_features(feats, head_dim)
    uniform = {w for w in windows}
    return ModelConfig(
        family=family.NAME,
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
        attention_bias=family.qkv_bias(hf_config),
        rope_scaling=dict(scaling) if scaling else None,
        sliding_window=next(iter(uniform)) if len(uniform) == 1 else max(w for w in windows if w is not None),
        model_type=hf_config.model_type,
        features=feats.as_dict(),
    )


def features_of(cfg: ModelConfig) -> Features:
    """The features a manifest's config records (Llama's for a bundle written before they were)."""
    feats = Features.from_dict(cfg.features)
    if not feats.layer_windows:
        feats = _replace(feats, layer_windows=(cfg.sliding_window,) * cfg.num_layers)
    return feats


def layer_windows(hf_config) -> list[int | None]:
    """Each layer's sliding window: from ``layer_types`` where the config has them, else one for all."""
    window = getattr(hf_config, "sliding_window", None)
    n = hf_config.num_hidden_layers
    types = getattr(hf_config, "layer_types", None)
    if not window:
        return [None] * n
    if types:
        if len(types) != n:
            raise BaseModelError(f"the config lists {len(types)} layer_types for {n} layers; fix config.json")
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise BaseModelError(f"layer type {sorted(unknown)[0]!r} is not supported (jishi knows sliding_attention "
                                 "and full_attention)")
        return [int(window) if t == "sliding_attention" else None for t in types]
    return [int(window)] * n


def _rope_scaling(hf_config) -> dict | None:
    scaling = getattr(hf_config, "rope_scaling", None)
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "dynamic":
        raise BaseModelError("dynamic NTK rope scaling depends on the sequence length and is not supported")
    if kind not in ROPE_TYPES:
        raise BaseModelError(f"rope scaling {scaling!r} is not supported by jishi's exporter; supported: "
                             f"{', '.join(ROPE_TYPES)}")
    return scaling


def _check_features(f: Features, head_dim: int) -> None:
    if f.activation not in ACTIVATIONS:
        raise BaseModelError(f"activation {f.activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    rd = f.rotary_dim or head_dim
    # GroupQueryAttention rotates the first rotary_dim dimensions itself when its cos/sin
    # tables are at most head_dim/2 wide and a multiple of 8 (checked against onnxruntime 1.32).
    if rd > head_dim or rd % 2 or (rd < head_dim and (rd // 2) % 8):
        raise BaseModelError(f"a rotary dimension of {rd} in heads of {head_dim} is not supported (partial rotary "
                             "needs a rotary dimension that is a multiple of 16)")


def _replace(f: Features, **kw) -> Features:
    from dataclasses import replace

    return replace(f, **kw)
