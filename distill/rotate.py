"""A model that computes exactly what another does, with weights on no quantization grid.

Every base this project can fetch arrives as a GGUF whose 4-bit weights sit on their file's own
block grid, so a re-quantization of them (or of a student pruned from them) meets a grid it
can find again. Most models users bring do not: a Hugging Face fp16/bf16 checkpoint, a merged
fine-tune. To measure quantization on such weights without another download, the residual
stream is turned by a random orthogonal matrix ``R`` (H × H):

- the embedding becomes ``E·R``, so the residual ``x`` becomes ``x·R``;
- RMSNorm keeps a vector's RMS, so ``norm(x·R) = norm(x)·R`` once its gain ``γ`` is folded into
  the linears that read it (``W ← W·diag(γ)·R``, gain set to 1): q/k/v, gate/up and the LM head;
- the linears that write the residual turn back: ``W_o ← Rᵀ·W_o``, ``W_down ← Rᵀ·W_down``.

The logits are the same (to float rounding); every weight that touches the residual is a dense
mix of the old ones, on no grid. The LM head is untied from the embedding (the final norm's gain
is folded into one and not the other). Pre-norm families only (Llama, Mistral, Qwen2, Qwen3): a
family that normalizes a block's *output* (Gemma 2/3) has no gain to fold there and is refused.
"""

from __future__ import annotations

from jishi.errors import JishiError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def random_rotation(size: int, seed: int = 0):
    """A random orthogonal matrix (float64), from the QR decomposition of a Gaussian one."""
    import torch

    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # signs fixed so the draw is uniform over rotations


def rotate_residual(model, seed: int = 0):
    """Turn ``model``'s residual stream by a random rotation (in place; returns the model)."""
    import torch

    kind = getattr(model.config, "model_type", None)
    if kind not in FAMILIES:
        raise JishiError(f"rotating the residual stream needs a pre-norm family ({', '.join(FAMILIES)}); "
                         f"{kind} normalizes block outputs, whose gains cannot be folded into a linear")
    hidden = model.config.hidden_size
    R = random_rotation(hidden, seed)

    def read(linear, gain):  # a linear reading the normalized residual: W·diag(γ)·R
        w = linear.weight.data.double()
        linear.weight.data = ((w * gain[None, :]) @ R).to(linear.weight.dtype)

    def write(linear):  # a linear adding to the residual: Rᵀ·W (and its bias turned the same way)
        linear.weight.data = (R.T @ linear.weight.data.double()).to(linear.weight.dtype)
        if linear.bias is not None:
            linear.bias.data = (linear.bias.data.double() @ R).to(linear.bias.dtype)

    with torch.no_grad():
        inner = model.model
        head_gain = inner.norm.weight.data.double().clone()
        lm_head = model.lm_head.weight.data.double().clone()
        emb = inner.embed_tokens.weight
        emb.data = (emb.data.double() @ R).to(emb.dtype)
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            gain = layer.input_layernorm.weight.data.double()
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                read(lin, gain)
            layer.input_layernorm.weight.data.fill_(1.0)
            write(attn.o_proj)
            gain = layer.post_attention_layernorm.weight.data.double()
            for lin in (mlp.gate_proj, mlp.up_proj):
                read(lin, gain)
            layer.post_attention_layernorm.weight.data.fill_(1.0)
            write(mlp.down_proj)
        inner.norm.weight.data.fill_(1.0)
        # untied: the head gets the final gain and the rotation, the embedding the rotation alone
        model.lm_head.weight = torch.nn.Parameter(((lm_head * head_gain[None, :]) @ R).to(emb.dtype))
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = []
    return model
