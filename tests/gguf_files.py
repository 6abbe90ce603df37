"""Tiny Llama GGUF files whose blocks the test writes itself: chosen codes and scales per type.

Each encoder below packs codes and scales the way the GGUF format stores them and returns the
raw bytes with what a reader must find there: the codes (as MatMulNBits codes, 0..2^bits−1),
the per-block scales, and the per-block zero point (an integer) or float minimum.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Blocks:
    raw: np.ndarray  # (n, row bytes) uint8
    codes: np.ndarray  # (n, k) uint8
    scales: np.ndarray  # (n, k/block) float32
    block: int
    zero_point: int | None  # integer zero point, or None when ``minimum`` is
    minimum: np.ndarray | None = None  # (n, k/block) float32
    kind: str = ""  # the GGUF type name


def _half(rng, shape, lo=0.004, hi=0.012):
    return rng.uniform(lo, hi, shape).astype(np.float16)


def _h(x):
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape, 2)


def q8_0(rng, n, k):
    nb = k // 32
    d = _half(rng, (n, nb))
    q = rng.integers(-127, 128, (n, nb, 32)).astype(np.int8)
    raw = np.concatenate([_h(d), q.view(np.uint8)], axis=-1)
    return Blocks(raw.reshape(n, -1), (q.astype(np.int16) + 128).astype(np.uint8).reshape(n, k),
                  d.astype(np.float32), 32, 128)


def q4_0(rng, n, k):
    nb = k // 32
    d = _half(rng, (n, nb), 0.01, 0.03)
    c = rng.integers(0, 16, (n, nb, 32)).astype(np.uint8)
    qs = c[..., :16] | (c[..., 16:] << 4)
    raw = np.concatenate([_h(d), qs], axis=-1)
    return Blocks(raw.reshape(n, -1), c.reshape(n, k), d.astype(np.float32), 32, 8)


def q5_0(rng, n, k):
    nb = k // 32
    d = _half(rng, (n, nb), 0.005, 0.015)
    c = rng.integers(0, 32, (n, nb, 32)).astype(np.uint8)
    qh = ((c >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(-1).astype("<u4")
    qs = (c[..., :16] & 15) | ((c[..., 16:] & 15) << 4)
    raw = np.concatenate([_h(d), qh[..., None].view(np.uint8), qs], axis=-1)
    return Blocks(raw.reshape(n, -1), c.reshape(n, k), d.astype(np.float32), 32, 16)


def _k4_scales(sc, m):
    """Eight 6-bit scales and minimums into the 12 bytes of Q4_K / Q5_K."""
    b = np.zeros((*sc.shape[:-1], 12), np.uint8)
    b[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    b[..., 4:8] = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    b[..., 8:12] = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    return b


def _k_quant(rng, n, k, bits):
    nb = k // 256
    d, dmin = _half(rng, (n, nb), 1e-4, 4e-4), _half(rng, (n, nb), 1e-4, 4e-4)
    sc = rng.integers(1, 64, (n, nb, 8)).astype(np.uint8)
    m = rng.integers(0, 64, (n, nb, 8)).astype(np.uint8)
    c = rng.integers(0, 1 << bits, (n, nb, 256)).astype(np.uint8)
    low = (c & 15).reshape(n, nb, 4, 2, 32)
    qs = (low[..., 0, :] | (low[..., 1, :] << 4)).reshape(n, nb, 128)
    parts = [_h(d), _h(dmin), _k4_scales(sc, m)]
    if bits == 5:
        top = (c >> 4).reshape(n, nb, 8, 32)
        parts.append((top << np.arange(8, dtype=np.uint8)[:, None]).sum(-2).astype(np.uint8))
    raw = np.concatenate(parts + [qs], axis=-1)
    scale = (d.astype(np.float32)[..., None] * sc).reshape(n, -1)
    minimum = -(dmin.astype(np.float32)[..., None] * m).reshape(n, -1)
    return Blocks(raw.reshape(n, -1), c.reshape(n, k), scale, 32, None, minimum)


def q4_k(rng, n, k):
    return _k_quant(rng, n, k, 4)


def q5_k(rng, n, k):
    return _k_quant(rng, n, k, 5)


def q6_k(rng, n, k):
    nb = k // 256
    d = _half(rng, (n, nb), 2e-4, 6e-4)
    sc = rng.integers(-64, 64, (n, nb, 16)).astype(np.int8)
    sc[sc == 0] = 1
    c = rng.integers(0, 64, (n, nb, 256)).astype(np.uint8).reshape(n, nb, 2, 4, 32)  # half, quarter, l
    ql = np.stack([(c[..., 0, :] & 15) | ((c[..., 2, :] & 15) << 4), (c[..., 1, :] & 15) | ((c[..., 3, :] & 15) << 4)], -2)
    qh = sum(((c[..., i, :] >> 4) << (2 * i)) for i in range(4)).astype(np.uint8)
    raw = np.concatenate([ql.reshape(n, nb, 128), qh.reshape(n, nb, 64), sc.view(np.uint8), _h(d)], axis=-1)
    scale = (d.astype(np.float32)[..., None] * sc.astype(np.float32)).reshape(n, -1)
    return Blocks(raw.reshape(n, -1), c.reshape(n, k), scale, 16, 32)


ENCODERS = {"Q8_0": q8_0, "Q4_0": q4_0, "Q5_0": q5_0, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
# Each layer mixes types, as a Q4_K_M file does; v differs from q and k so q/k/v cannot be one MatMulNBits.
LAYER_TYPES = [
    {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_0",
     "ffn_gate": "Q4_0", "ffn_up": "Q5_K", "ffn_down": "Q8_0"},
    {"attn_q": "Q5_K", "attn_k": "Q5_K", "attn_v": "Q5_K", "attn_output": "Q6_K",
     "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"},
]


def write_tiny_gguf(path: Path, tokenizer, seed: int = 0, embedding: str = "Q8_0", layer_types=LAYER_TYPES,
                    raw_override: dict | None = None, license: str | None = None,
                    head_count_kv: int = KV_HEADS) -> dict[str, Blocks]:
    """A two-layer tied Llama GGUF at ``path`` with the tokenizer; returns each tensor's Blocks by GGUF name.
    ``head_count_kv`` is what the metadata claims (the weights always have KV_HEADS)."""
    import gguf

    rng = np.random.default_rng(seed)
    vocab_map = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab_map.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-gguf")
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(head_count_kv)
    if license:
        w.add_license(license)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab_map["<|im_start|>"])
    w.add_eos_token_id(vocab_map["<|im_end|>"])
    w.add_add_bos_token(False)
    blocks: dict[str, Blocks] = {}

    def quantized(name, kind, n, k):
        b = ENCODERS[kind](rng, n, k)
        b.kind = kind
        blocks[name] = b
        data = (raw_override or {}).get(name, b.raw)
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])

    def norm(name, size):
        w.add_tensor(name, rng.normal(1.0, 0.2, size).astype(np.float32))

    quantized("token_embd.weight", embedding, len(tokens), HIDDEN)
    hd = HIDDEN // HEADS
    shapes = {"attn_q": (HEADS * hd, HIDDEN), "attn_k": (KV_HEADS * hd, HIDDEN), "attn_v": (KV_HEADS * hd, HIDDEN),
              "attn_output": (HIDDEN, HEADS * hd), "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN),
              "ffn_down": (HIDDEN, INTER)}
    for i, types in enumerate(layer_types):
        norm(f"blk.{i}.attn_norm.weight", HIDDEN)
        for part, (n, k) in shapes.items():
            quantized(f"blk.{i}.{part}.weight", types[part], n, k)
        norm(f"blk.{i}.ffn_norm.weight", HIDDEN)
    norm("output_norm.weight", HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return blocks
