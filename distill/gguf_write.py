"""A torch Llama written as a GGUF file llama.cpp loads, at F32 (its exact weights) or F16.

So that llama.cpp's own quantizer can be run on a model jishi made (a pruned, distilled student) and its
figures stand beside jishi's on the very same weights. The shape metadata (block count, widths, heads,
rope) are written from the model's config; the tokenizer and the rest are copied from a reference GGUF of
the same vocabulary, such as the teacher's file (``LoadedBase.source``), since a student keeps its teacher's
tokenizer and jishi's directories hold none in llama.cpp's form.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jishi.errors import BaseModelError

ARCHITECTURES = {"LlamaForCausalLM": "llama"}  # transformers class → llama.cpp architecture
DTYPES = ("f32", "f16")
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# The reference's keys that describe the reference itself, not the model written.
NOT_COPIED = ("general.architecture", "general.alignment", "general.file_type", "general.quantization_version",
              "general.name", "general.size_label")


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for a transformers Llama parameter (``model.layers.3.mlp.up_proj.weight`` →
    ``blk.3.ffn_up.weight``)."""
    if name in TOP:
        return TOP[name]
    parts = name.split(".")
    if len(parts) > 4 and parts[:2] == ["model", "layers"] and parts[-1] == "weight" and ".".join(parts[3:-1]) in LAYER:
        return f"blk.{parts[2]}.{LAYER['.'.join(parts[3:-1])]}.weight"
    raise BaseModelError(f"the parameter {name} has no tensor in llama.cpp's llama layout; only plain Llama "
                         "weights (no biases, no extra modules) can be written to GGUF")


def check(model) -> str:
    """The llama.cpp architecture of ``model``, or a BaseModelError saying what can be written."""
    kind = type(model).__name__
    if kind not in ARCHITECTURES:
        raise BaseModelError(f"cannot write a {kind} to GGUF: only {', '.join(ARCHITECTURES)} is supported")
    c = model.config
    unsupported = [what for what, bad in (
        (f"rope scaling {c.rope_scaling}", c.rope_scaling is not None),
        ("attention biases", getattr(c, "attention_bias", False)), ("MLP biases", getattr(c, "mlp_bias", False)),
        (f"activation {c.hidden_act}", c.hidden_act != "silu")) if bad]
    if unsupported:
        raise BaseModelError(f"cannot write this {kind} to GGUF: {', '.join(unsupported)} (the writer knows plain "
                             "Llama: SiLU, no biases, unscaled rope)")
    return ARCHITECTURES[kind]


def rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """q or k rows in llama.cpp's order: it rotates adjacent pairs (2i, 2i+1) of each head where transformers
    rotates (i, i + d/2), so each head's two halves are interleaved (the inverse of transformers' reading,
    which ``gguf_load`` uses)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, reference: os.PathLike, out: os.PathLike, dtype: str = "f32", name: str | None = None) -> Path:
    """Write ``model`` (a transformers LlamaForCausalLM) to ``out`` at ``dtype`` ("f32", or "f16" for 2-D
    weights with norms kept F32, as llama.cpp's converter does), with the tokenizer of the GGUF ``reference``."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

    arch = check(model)
    if dtype not in DTYPES:
        raise BaseModelError(f"cannot write GGUF at {dtype!r}: choose one of {', '.join(DTYPES)}")
    reference, out = Path(reference), Path(out)
    reader = GGUFReader(reference)
    c = model.config
    field = reader.get_field("general.architecture")
    ref_arch = field.contents() if field is not None else None
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if ref_arch != arch or tokens is None or len(tokens.data) != c.vocab_size:
        raise BaseModelError(f"{reference} cannot lend its tokenizer: it is a {ref_arch} file with "
                             f"{0 if tokens is None else len(tokens.data)} tokens, the model a {arch} of "
                             f"{c.vocab_size}; pass the GGUF of the model's own tokenizer (its teacher's)")
    tensors = {}
    for hf, p in model.named_parameters():  # a tied head is the embedding's parameter, listed once
        w = p.detach().float().cpu().numpy()
        if hf.endswith(("q_proj.weight", "k_proj.weight")):
            w = rotary_rows(w, c.num_attention_heads if "q_proj" in hf else c.num_key_value_heads)
        tensors[gguf_name(hf)] = w.astype(np.float16 if dtype == "f16" and w.ndim == 2 else np.float32, copy=False)
    tmp = out.with_name(out.name + ".part")
    writer = GGUFWriter(tmp, arch)
    try:
        for field in reader.fields.values():
            if field.name.startswith(("GGUF.", f"{arch}.")) or field.name in NOT_COPIED:
                continue
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        writer.add_name(name or out.stem)
        writer.add_file_type(int(LlamaFileType.ALL_F32 if dtype == "f32" else LlamaFileType.MOSTLY_F16))
        writer.add_vocab_size(c.vocab_size)
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(c.rope_theta))
        writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
        for key, w in tensors.items():
            writer.add_tensor(key, w)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:  # after a failure: no half-written file under either name
        writer.close()
        tmp.unlink(missing_ok=True)
    return out
