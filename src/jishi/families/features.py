"""What the graph builder needs to know about a model, whatever its family.

A family module (one per architecture in this package) reads a transformers config
and answers with these features; the graph builder reads only them, never the
family's name. They are recorded in the bundle manifest (``config.features``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class Features:
    # RMSNorm scales by (norm_offset + w): 0 for Llama, 1 for Gemma's (1 + w).
    norm_offset: float = 0.0
    # RMSNorm over each head of q and k before rotary (Qwen3, Gemma 3), weights self_attn.{q,k}_norm.
    qk_norm: bool = False
    # The layer's norms by weight name: the norm before the MLP, and the optional
    # "sandwich" norms on the attention and MLP outputs before their residual adds (Gemma).
    pre_mlp_norm: str = "post_attention_layernorm"
    post_attention_norm: str | None = None
    post_mlp_norm: str | None = None
    activation: str = "silu"  # the gate's: silu (SwiGLU) or gelu_tanh (GeGLU)
    # The source checkpoint stores q/k/v as one qkv_proj and gate/up as one gate_up_proj (Phi-3).
    fused_qkv: bool = False
    fused_gate_up: bool = False
    rotary_dim: int = 0  # dimensions of each head that rotate (partial rotary); 0: all of them
    attention_scale: float = 0.0  # the q·k scale; 0: 1/sqrt(head_dim)
    embedding_scale: float = 1.0  # the embedding rows are multiplied by it (Gemma: sqrt(hidden))
    # Per layer: its sliding window in tokens (attends to that many, itself included) or None.
    layer_windows: tuple = ()
    local_rope_theta: float = 0.0  # layers with a window use this rope base (Gemma 3); 0: the model's
    # longrope (Phi-3/4): short factors while the sequence is at most this long, long ones after; 0: one table
    rope_long_after: int = 0
    attn_logit_softcap: float = 0.0
    final_logit_softcap: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["layer_windows"] = list(self.layer_windows)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "Features":
        if not d:
            return cls()
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "layer_windows" in d:
            d["layer_windows"] = tuple(d["layer_windows"])
        return cls(**d)
