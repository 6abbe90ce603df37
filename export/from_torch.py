"""Read a Hugging Face decoder torch model into what the graph writer needs.

Duck-typed on the model (``.config``, ``.state_dict()``, ``.model.rotary_emb``):
export/ never imports transformers itself. What differs by family is read from the
features (``jishi.families``), never from the family's name.
"""

from __future__ import annotations

import numpy as np

from jishi.families import default_context, features_of
from jishi.families import model_config as _model_config
from jishi.runtime.manifest import ModelConfig


def model_config(hf_config, context: int | None = None) -> ModelConfig:
    """The manifest's config of a transformers config; ``context`` defaults to min(2048, positions)."""
    return _model_config(hf_config, context)


def numpy_weights(model, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """The state dict as float32 numpy, in the Llama layout: fused source projections
    (Phi-3's ``qkv_proj`` and ``gate_up_proj``) are split into their parts."""
    weights = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    cfg = cfg or model_config(model.config, default_context(model.config))
    return split_fused(weights, cfg)


def split_fused(weights: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    feats = features_of(cfg)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {}
    for key, w in weights.items():
        if feats.fused_qkv and key.endswith("self_attn.qkv_proj.weight"):
            stem = key[: -len("qkv_proj.weight")]
            for t, part in zip("qkv", np.split(w, [q, q + kv], axis=0)):
                out[f"{stem}{t}_proj.weight"] = np.ascontiguousarray(part)
        elif feats.fused_qkv and key.endswith("self_attn.qkv_proj.bias"):
            stem = key[: -len("qkv_proj.bias")]
            for t, part in zip("qkv", np.split(w, [q, q + kv])):
                out[f"{stem}{t}_proj.bias"] = np.ascontiguousarray(part)
        elif feats.fused_gate_up and key.endswith("mlp.gate_up_proj.weight"):
            stem = key[: -len("gate_up_proj.weight")]
            gate, up = np.split(w, 2, axis=0)
            out[f"{stem}gate_proj.weight"], out[f"{stem}up_proj.weight"] = np.ascontiguousarray(gate), np.ascontiguousarray(up)
        else:
            out[key] = w
    return out


def rotary(model) -> tuple[np.ndarray, float]:
    """The model's own inverse frequencies and attention scaling (rope scaling applied by transformers)."""
    return _table(model.model.rotary_emb, model.config, None)


def rope_tables(model, cfg: ModelConfig) -> dict[str, tuple[np.ndarray, float]]:
    """The rotary tables the graph uses: ``global`` always, ``local`` for models whose windowed
    layers have their own rope base (Gemma 3's ``rotary_emb_local``).

    Longrope (Phi-3/4) uses short factors up to the original positions and long ones beyond:
    for a context past them the graph gets both (``global`` short, ``long``) and switches on
    the sequence's length, as transformers does.
    """
    feats = features_of(cfg)
    tables = {"global": _table(model.model.rotary_emb, model.config, None)}
    if feats.rope_long_after:
        tables["long"] = _table(model.model.rotary_emb, model.config, cfg.context_length)
    local = getattr(model.model, "rotary_emb_local", None)
    if features_of(cfg).local_rope_theta and local is not None:
        tables["local"] = _table(local, getattr(local, "config", model.config), cfg.context_length)
    return tables


def _table(emb, config, context: int | None) -> tuple[np.ndarray, float]:
    """The frequencies for a sequence of ``context`` tokens (None: the short ones). Longrope's are
    computed afresh: a forward pass past the original positions swaps the module's own buffer."""
    inv_freq, scaling = emb.inv_freq, float(getattr(emb, "attention_scaling", 1.0))
    if getattr(emb, "rope_type", "default") == "longrope":
        inv_freq, scaling = emb.rope_init_fn(config, inv_freq.device, seq_len=context)
    return inv_freq.detach().double().cpu().numpy(), float(scaling)
