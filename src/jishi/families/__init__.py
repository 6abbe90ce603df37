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
    windows = tuple(layer_windows(hf_config))  # as configured: a window past the context masks nothing (graph.py)
    feats = _replace(feats, layer_windows=windows,
                     rope_long_after=feats.rope_long_after if feats.rope_long_after < context else 0)
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


def source_projections(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """Each LoRA target (q, k, v, o, gate, up, down) → (its module's name in the source checkpoint,
    the first and past-the-last output row of the target in that module's weight).

    Split projections are whole modules; fused ones (Phi-3's ``qkv_proj``, ``gate_up_proj``)
    hold several targets, one after another."""
    feats = features_of(cfg)
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    out = {"o": ("o_proj", 0, cfg.hidden_size), "down": ("down_proj", 0, cfg.hidden_size)}
    if feats.fused_qkv:
        out.update(q=("qkv_proj", 0, q), k=("qkv_proj", q, q + kv), v=("qkv_proj", q + kv, q + 2 * kv))
    else:
        out.update(q=("q_proj", 0, q), k=("k_proj", 0, kv), v=("v_proj", 0, kv))
    if feats.fused_gate_up:
        out.update(gate=("gate_up_proj", 0, inter), up=("gate_up_proj", inter, 2 * inter))
    else:
        out.update(gate=("gate_proj", 0, inter), up=("up_proj", 0, inter))
    return out


def peft_modules(cfg: ModelConfig, targets) -> list[str]:
    """The source modules PEFT adapts for these targets; a fused module needs all of its targets."""
    where = source_projections(cfg)
    modules = list(dict.fromkeys(where[t][0] for t in targets))
    for module in modules:
        members = [t for t, (m, _, _) in where.items() if m == module]
        if len(members) > 1 and not set(members) <= set(targets):
            raise BaseModelError(f"this {cfg.family} model stores {', '.join(members)} as one projection ({module}): "
                                 f"adapt all of them or none")
    return modules
