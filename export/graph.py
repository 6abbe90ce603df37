"""Write a decoder (any family of jishi.families) as an ONNX graph made for onnxruntime on a CPU.

The graph is written node by node from the weights (no tracing), so that it
uses onnxruntime's fused contrib ops where they exist:

- ``GroupQueryAttention`` with rotary embedding inside it and a KV cache of
  fixed length (the context), which the runtime binds as both the past input
  and the present output of each layer: each step appends in place instead of
  copying the whole cache;
- ``SkipSimplifiedLayerNormalization`` for each residual add plus RMSNorm;
- ``MatMulNBits`` for int4 and int8 weights, q/k/v fused into one and gate/up
  into one, so a layer reads its input four times, not seven;
- the LM head only for the token rows asked for (``logits_index``, into the
  flattened batch·seq rows): the last one when generating, all when scoring.

Graph inputs: ``input_ids`` (batch × seq, int64), ``seqlens_k`` (batch, int32:
total length − 1), ``total_sequence_length`` (scalar int32), ``logits_index``
(n, int64) and ``past_key.{i}``/``past_value.{i}`` (batch × kv heads ×
context × head dim). Outputs: ``logits`` (n × vocab), ``hidden_states`` (the
final-norm hidden state of every token row, for embeddings; a run fetches it only
when asked) and ``present_key.{i}``/``present_value.{i}``.

Why one module of ~580 lines: the builder writes the graph top to bottom in the order the model
computes it (embedding, blocks, final norm, head), and its pieces (linear layers, norms, head) are
used only here; split apart, a reader would follow one forward pass across several files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jishi.errors import BaseModelError
from jishi.families import features_of
from jishi.export.quant import (QuantizedWeight, concat_outputs, quantize_asymmetric, quantize_symmetric_int8,
                               unpack_zero_points)
from jishi.runtime.manifest import ModelConfig

QUANTS = ("gguf", "int4", "int8", "fp16", "fp32")  # gguf: every tensor on its own GGUF grid (gguf_formats)
OPSET = 21
MS = "com.microsoft"


@dataclass(frozen=True)
class QuantRecipe:
    """How each kind of weight is stored; recorded in the manifest."""

    name: str  # gguf | int4 | int8 | fp16 | fp32
    block: int = 32  # gguf: the block of the zero-point corrections' side path (the smallest corrected block)
    accuracy_level: int = 4  # MatMulNBits: int8 activations (fastest on CPU)
    zero_point_correction: bool = True  # int4: keep float block minima exactly
    merge_points: bool = False  # LoRA inputs on every fused projection (see _Linear)
    # How the codes were found: "grid" (a GGUF's own), "rtn" (round to nearest on each block's min/max grid),
    # or a calibrated method of jishi.export.calibrate ("gptq", "awq", "awq-gptq"); a label only: the codes
    # arrive in build_decoder's ``prequantized``
    method: str = "rtn"
    head_bits: int = 8  # int4/int8: the embedding table and LM head (one copy of the codes when they are tied)
    reason: str = ""  # why this method (the manifest's ``method_reason``)

    def as_dict(self) -> dict:
        d = {"name": self.name}
        if self.name == "gguf":
            d.update(block=self.block, accuracy_level=self.accuracy_level, zero_point_correction=self.zero_point_correction)
        if self.name in ("int4", "int8"):
            head = f"int{self.head_bits}"
            d.update(block=self.block, accuracy_level=self.accuracy_level, lm_head=head, embedding=head)
            if self.name == "int4":
                d["zero_point_correction"] = self.zero_point_correction
        if self.name in ("gguf", "int4", "int8"):
            d["method"] = self.method
            if self.reason:
                d["method_reason"] = self.reason
        return d


@dataclass
class _Graph:
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    n: int = 0

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None, outputs=None, **attrs):
        self.n += 1
        base = name or f"{op_type.lower()}_{self.n}"
        outs = outputs or [f"{base}/out{i}" if n_out > 1 else f"{base}/out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs if n_out > 1 or outputs else outs[0]


def rope_caches(inv_freq: np.ndarray, context: int, attention_scaling: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables (context × head_dim/2) as GroupQueryAttention wants them."""
    pos = np.arange(context, dtype=np.float64)[:, None]
    angles = pos * inv_freq.astype(np.float64)[None, :]
    return (np.cos(angles) * attention_scaling).astype(np.float32), (np.sin(angles) * attention_scaling).astype(np.float32)


class _Linear:
    """Emits y = x·Wᵀ (+ b) + (x·A)·B for one (possibly fused) weight in the recipe's format.

    The low-rank side path ``(x·A)·B`` is one MatMul and one Gemm. For int4 it carries
    the zero-point correction (A = block-membership matrix S, B = Δ). With merge points,
    A and B are graph inputs (``lora.<name>.a``, ``lora.<name>.b``). B defaults to Δ (or a
    zero row where there is no correction); A has no default: the runtime binds S (or a
    zero column), one buffer shared by every layer. It binds ``[S | A_lora]`` and
    ``[Δ ; s·B_lora]`` to activate an adapter, at no cost in nodes.
    """

    def __init__(self, g: _Graph, recipe: QuantRecipe, prequantized: Mapping[str, QuantizedWeight] | None = None):
        self.g = g
        self.recipe = recipe
        self.prequantized = prequantized or {}  # int4 codes found by a calibrated method, by weight name
        self._shared: dict[str, str] = {}
        self.merge_inputs: list = []  # graph inputs for the merge points

    def __call__(self, x: str, weights: list[np.ndarray], name: str, bias: np.ndarray | None = None,
                 keys: list[str] | None = None) -> str:
        g, r = self.g, self.recipe
        w = np.concatenate(weights, axis=0) if len(weights) > 1 else weights[0]
        n, k = w.shape
        if r.name == "gguf":
            # taken out as the graph takes them: the proto holds their bytes now (a large base's peak memory)
            y, side = self._from_grids(x, [self.prequantized.pop(key) for key in keys], name)
        elif r.name in ("fp32", "fp16"):
            wt = np.ascontiguousarray(w.T)
            if r.name == "fp16":
                wname = g.init(f"{name}.weight", wt.astype(np.float16))
                wname = g.op("Cast", [wname], to=TensorProto.FLOAT, name=f"{name}/cast")
            else:
                wname = g.init(f"{name}.weight", wt.astype(np.float32))
            y = g.op("MatMul", [x, wname], name=f"{name}/matmul")
            side = None
        else:
            if r.name == "int4":
                pre = [self.prequantized.get(key) for key in (keys or [None] * len(weights))]
                if any(q is not None and (q.bits, q.block) != (4, r.block) for q in pre):
                    raise ValueError(f"calibrated codes for {name} are not 4-bit blocks of {r.block}")
                parts = [q if q is not None else quantize_asymmetric(p, 4, r.block, correct=r.zero_point_correction)
                         for p, q in zip(weights, pre)]
            else:
                parts = [quantize_asymmetric(p, 8, r.block, correct=False) for p in weights]
            qw = concat_outputs(parts) if len(parts) > 1 else parts[0]
            y = self._matmul_nbits(x, qw, name)
            side = (block_sum_matrix(qw.k, qw.block), qw.correction) if qw.correction is not None else None
        if bias is not None:
            y = g.op("Add", [y, g.init(f"{name}.bias", bias.astype(np.float32))], name=f"{name}/bias")
        if side is None and r.merge_points:
            side = (np.zeros((k, 1), np.float32), np.zeros((1, n), np.float32))
        if side is None:
            return y
        a, b = side
        if r.merge_points:
            # A has no stored default: the runtime binds one shared block-sum (or zero) matrix
            # to every A of the same size, so the layers do not each read their own copy.
            a_name, b_name = f"lora.{name}.a", f"lora.{name}.b"
            g.init(b_name, b)
            self.merge_inputs += [helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [k, f"rank.{name}"]),
                                  helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [f"rank.{name}", n])]
        else:
            a_name = self._block_sum_matrix(k, r.block)
            b_name = g.init(f"{name}.zp_correction", b)
        low = g.op("MatMul", [x, a_name], name=f"{name}/side_a")
        return g.op("Gemm", [low, b_name, y], name=f"{name}/side_b")

    def _from_grids(self, x: str, parts: list, name: str):
        """y for weights that arrive ready (a GGUF's own grids: ``QuantizedWeight`` or float arrays), and the
        side path of their zero-point corrections. Parts that share a form are fused into one MatMulNBits;
        different forms (q in Q4_K, v in Q6_K) get one op each and their outputs are concatenated."""
        g, r = self.g, self.recipe
        groups: list[list] = []
        for p in parts:
            form = (p.bits, p.block) if isinstance(p, QuantizedWeight) else ("float", p.dtype)
            if groups and groups[-1][0] == form:
                groups[-1][1].append(p)
            else:
                groups.append([form, [p]])
        outs = []
        for i, (form, members) in enumerate(groups):
            part = name if len(groups) == 1 else f"{name}.part{i}"
            if form[0] == "float":
                w = np.concatenate(members, axis=0) if len(members) > 1 else members[0]
                wname = g.init(f"{part}.weight", np.ascontiguousarray(w.T))
                if w.dtype == np.float16:
                    wname = g.op("Cast", [wname], to=TensorProto.FLOAT, name=f"{part}/cast")
                outs.append(g.op("MatMul", [x, wname], name=f"{part}/matmul"))
            else:
                outs.append(self._matmul_nbits(x, concat_outputs(members) if len(members) > 1 else members[0], part))
        y = outs[0] if len(outs) == 1 else g.op("Concat", outs, axis=-1, name=f"{name}/concat")
        if not r.zero_point_correction or all(not isinstance(p, QuantizedWeight) or p.correction is None for p in parts):
            return y, None  # no correction here: no side path (or, with merge points, a one-row zero B)
        k = parts[0].shape[1] if not isinstance(parts[0], QuantizedWeight) else parts[0].k
        deltas = []
        for p in parts:
            rows = p.shape[0] if not isinstance(p, QuantizedWeight) else p.n
            if isinstance(p, QuantizedWeight) and p.correction is not None:
                if p.block % r.block:
                    raise ValueError(f"{name}: a block of {p.block} cannot be corrected in blocks of {r.block}")
                deltas.append(np.repeat(p.correction, p.block // r.block, axis=0))  # the same shift on each sub-block
            else:
                deltas.append(np.zeros((k // r.block, rows), np.float32))
        return y, (block_sum_matrix(k, r.block), np.concatenate(deltas, axis=1))

    def _matmul_nbits(self, x: str, qw: QuantizedWeight, name: str) -> str:
        g, r = self.g, self.recipe
        inputs = [
            x,
            g.init(f"{name}.qweight", qw.packed),
            _scales(g, r, f"{name}.scales", qw.scales.reshape(-1)),
        ]
        if not qw.default_zero_points():  # else MatMulNBits' own default, 2^(bits-1): nothing stored
            inputs.append(g.init(f"{name}.qzeros", qw.zero_points))
        return g.op(
            "MatMulNBits", inputs, domain=MS, name=f"{name}/matmul",
            K=qw.k, N=qw.n, bits=qw.bits, block_size=qw.block, accuracy_level=r.accuracy_level,
        )

    def _block_sum_matrix(self, k: int, block: int) -> str:
        name = f"block_sums.{k}.{block}"
        if name not in self._shared:
            self._shared[name] = self.g.init(name, block_sum_matrix(k, block))
        return self._shared[name]


def block_sum_matrix(k: int, block: int) -> np.ndarray:
    """The 0/1 matrix (k × k/block) whose product with x sums x over each block."""
    return np.kron(np.eye(k // block, dtype=np.float32), np.ones((block, 1), np.float32))


def build_decoder(
    cfg: ModelConfig,
    weights: Mapping[str, np.ndarray],
    inv_freq: np.ndarray | None,
    recipe: QuantRecipe,
    attention_scaling: float = 1.0,
    progress: Callable[[int], None] | None = None,
    prequantized: Mapping[str, QuantizedWeight] | None = None,
    rope: Mapping[str, tuple[np.ndarray, float]] | None = None,
) -> onnx.ModelProto:
    """The decoder graph of ``cfg`` with ``weights`` (Hugging Face names in the Llama layout, numpy).

    What differs between families comes from ``cfg.features`` (``jishi.families``):
    norms, QK-norm, activation, scales, rotary dimension, windows per layer. ``rope`` holds
    the rotary tables by name (``global``, and ``local`` for windowed layers with their own
    base); without it, ``inv_freq`` and ``attention_scaling`` are the one table.
    ``prequantized`` maps weight names to int4 codes found elsewhere (GPTQ); those weights
    use them instead of round-to-nearest."""
    weights = _Tracked(weights)
    feats = features_of(cfg)
    g = _Graph()
    lin = _Linear(g, recipe, prequantized)
    hd, nh, nkv, H = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size

    def norm_weight(name: str) -> str:
        return g.init(name, weights[name].astype(np.float32) + np.float32(feats.norm_offset))

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["n_logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n_logits", cfg.vocab_size]),
               # the final-norm hidden state of every token row, fetched only for embeddings
               helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["rows", H])]
    kv_shape = ["batch", nkv, "max_context", hd]  # the runtime may allocate less than the build context
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", TensorProto.FLOAT, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", TensorProto.FLOAT, kv_shape))

    rope = dict(rope or {"global": (inv_freq, attention_scaling)})
    tables = {}
    for kind, (freqs, scaling) in rope.items():
        if 2 * len(freqs) != (feats.rotary_dim or hd):
            raise BaseModelError(f"the {kind} rotary table has {len(freqs)} frequencies, expected "
                                 f"{(feats.rotary_dim or hd) // 2}; the model's rope settings contradict its head size")
        cos, sin = rope_caches(freqs, cfg.context_length, scaling)
        stem = "rope" if kind == "global" else f"rope.{kind}"
        tables[kind] = (g.init(f"{stem}.cos", cos), g.init(f"{stem}.sin", sin))
    if "long" in tables:  # longrope: the long table once the sequence passes the original positions
        past = g.op("Greater", ["total_sequence_length", g.init("rope.long_after", np.array(feats.rope_long_after, np.int32))],
                    name="rope/is_long")
        tables["global"] = tuple(g.op("Where", [past, long, short], name=f"rope/pick_{i}")
                                 for i, (long, short) in enumerate(zip(tables.pop("long"), tables["global"])))

    embed = weights["model.embed_tokens.weight"]
    lm_head = embed if cfg.tie_word_embeddings else weights["lm_head.weight"]
    # The layers work on token rows (batch·seq × hidden): 2-D lets each zero-point
    # correction be one Gemm. Attention alone needs (batch, seq, features).
    head_codes = None
    if recipe.name == "gguf":
        head_codes = _ready_table(prequantized or {}, "model.embed_tokens.weight")
        ready = (prequantized or {}).get("model.embed_tokens.weight")
        if head_codes is None and isinstance(ready, QuantizedWeight):
            raise ValueError("the embedding's grid needs a zero-point correction; re-quantize it before the graph")
        if head_codes is None and ready is not None:
            embed = ready  # a float table, kept in its own precision
    elif recipe.name in ("int4", "int8"):
        head_codes = (quantize_symmetric_int8(embed, recipe.block) if recipe.head_bits == 8
                      else quantize_asymmetric(embed, 4, recipe.block, correct=False))
    rows = g.op("Reshape", [_embedding(g, recipe, embed, head_codes, cfg.tie_word_embeddings),
                            g.init("shape.rows", np.array([-1, H], np.int64))], name="embed/rows")
    if feats.embedding_scale != 1.0:
        rows = g.op("Mul", [rows, g.init("embed.scale", np.array(feats.embedding_scale, np.float32))], name="embed/scale")
    hidden = rows
    ids_shape = g.op("Shape", ["input_ids"], name="ids_shape")
    qkv_width = (nh + 2 * nkv) * hd
    qkv_shape = g.op("Concat", [ids_shape, g.init("shape.qkv", np.array([qkv_width], np.int64))], axis=0, name="qkv_shape")
    if feats.qk_norm:
        q_shape = g.op("Concat", [ids_shape, g.init("shape.q", np.array([nh * hd], np.int64))], axis=0, name="q_shape")
        kv_shape_t = g.op("Concat", [ids_shape, g.init("shape.kv", np.array([nkv * hd], np.int64))], axis=0, name="kv_shape")
        head_rows = g.init("shape.head_rows", np.array([-1, hd], np.int64))
        qkv_split = g.init("split.qkv", np.array([nh * hd, nkv * hd, nkv * hd], np.int64))
    attn_rows = g.init("shape.attn_rows", np.array([-1, nh * hd], np.int64))
    scale = feats.attention_scale or 1.0 / math.sqrt(hd)
    activation = ACTIVATIONS[feats.activation]

    def plain_norm(x: str, gamma: str, name: str) -> str:
        return g.op("SimplifiedLayerNormalization", [x, gamma], axis=-1, epsilon=cfg.rms_norm_eps, name=name)

    residual = None
    x = None
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        ln_in = norm_weight(p + "input_layernorm.weight")
        if residual is None:
            x = plain_norm(hidden, ln_in, f"layer{i}/ln_in")
            residual = hidden
        else:
            x, residual = _skip_norm(g, x, residual, ln_in, cfg, f"layer{i}/ln_in")

        a = p + "self_attn."
        bias = None
        if a + "q_proj.bias" in weights:
            bias = np.concatenate([weights[a + f"{t}_proj.bias"] for t in "qkv"])
        qkv = lin(x, [weights[a + f"{t}_proj.weight"] for t in "qkv"], f"layer{i}.attn.qkv", bias=bias,
                  keys=[a + f"{t}_proj.weight" for t in "qkv"])
        if feats.qk_norm:
            # RMSNorm over each head of q and k (rows × heads·hd → rows·heads × hd), before rotary.
            q, k, v = g.op("Split", [qkv, qkv_split], n_out=3, axis=-1, name=f"layer{i}/attn/split")
            qk = []
            for t, src, shape in (("q", q, q_shape), ("k", k, kv_shape_t)):
                heads = g.op("Reshape", [src, head_rows], name=f"layer{i}/attn/{t}_heads")
                normed = plain_norm(heads, norm_weight(a + f"{t}_norm.weight"), f"layer{i}/attn/{t}_norm")
                qk.append(g.op("Reshape", [normed, shape], name=f"layer{i}/attn/{t}_in"))
            attn_in = [*qk, g.op("Reshape", [v, kv_shape_t], name=f"layer{i}/attn/v_in")]
        else:
            attn_in = [g.op("Reshape", [qkv, qkv_shape], name=f"layer{i}/attn/in"), "", ""]
        window = feats.layer_windows[i] if i < len(feats.layer_windows) else None
        # A windowed layer keeps its own rope base even where the context is shorter than its window
        # (then the window masks nothing and is left out).
        cos, sin = tables["local" if window and "local" in tables else "global"]
        if window and window >= cfg.context_length:
            window = None
        extra = {"softcap": feats.attn_logit_softcap} if feats.attn_logit_softcap else {}
        attn, _, _ = g.op(
            "GroupQueryAttention",
            [*attn_in, f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_sequence_length", cos, sin],
            domain=MS, name=f"layer{i}/attn", outputs=[f"layer{i}/attn/out", f"present_key.{i}", f"present_value.{i}"],
            num_heads=nh, kv_num_heads=nkv, scale=scale, do_rotary=1, rotary_interleaved=0,
            # local_window_size = the config's sliding_window gives transformers' masks (checked on tiny Gemma 3
            # and Mistral models past the window).
            local_window_size=window if window else -1, **extra,
        )
        attn = g.op("Reshape", [attn, attn_rows], name=f"layer{i}/attn/rows")
        o = lin(attn, [weights[a + "o_proj.weight"]], f"layer{i}.attn.o", keys=[a + "o_proj.weight"])
        if feats.post_attention_norm:
            o = plain_norm(o, norm_weight(p + feats.post_attention_norm + ".weight"), f"layer{i}/ln_attn_out")

        x, residual = _skip_norm(g, o, residual, norm_weight(p + feats.pre_mlp_norm + ".weight"), cfg, f"layer{i}/ln_post")

        m = p + "mlp."
        gate_up = lin(x, [weights[m + "gate_proj.weight"], weights[m + "up_proj.weight"]], f"layer{i}.mlp.gate_up",
                      keys=[m + "gate_proj.weight", m + "up_proj.weight"])
        gate, up = g.op("Split", [gate_up], n_out=2, axis=-1, num_outputs=2, name=f"layer{i}/mlp/split")
        act = activation(g, gate, f"layer{i}/mlp/{feats.activation}")
        x = lin(g.op("Mul", [act, up], name=f"layer{i}/mlp/gated"), [weights[m + "down_proj.weight"]], f"layer{i}.mlp.down",
                keys=[m + "down_proj.weight"])
        if feats.post_mlp_norm:
            x = plain_norm(x, norm_weight(p + feats.post_mlp_norm + ".weight"), f"layer{i}/ln_mlp_out")
        if progress:
            progress(1)

    # The final norm (its output is also the embeddings' hidden states), then the LM head on the rows asked for.
    normed, _ = _skip_norm(g, x, residual, norm_weight("model.norm.weight"), cfg, "final_norm")
    g.op("Identity", [normed], name="hidden_states", outputs=["hidden_states"])
    picked = g.op("Gather", [normed, "logits_index"], axis=0, name="pick_rows")
    head_ready = None
    if recipe.name == "gguf" and not cfg.tie_word_embeddings:
        head_ready = (prequantized or {}).get("lm_head.weight")
    cap = feats.final_logit_softcap
    _lm_head(g, recipe, picked, lm_head, tied=cfg.tie_word_embeddings, tied_codes=head_codes, ready=head_ready,
             out="logits/raw" if cap else "logits")
    if cap:  # logits = cap · tanh(logits / cap)
        c = g.init("logits.softcap", np.array(cap, np.float32))
        capped = g.op("Tanh", [g.op("Div", ["logits/raw", c], name="softcap/div")], name="softcap/tanh")
        g.op("Mul", [capped, c], name="softcap/mul", outputs=["logits"])

    unused = sorted(k for k in set(weights) - weights.used if not k.endswith("rotary_emb.inv_freq")
                    and not k.endswith("rotary_emb_local.inv_freq")
                    and not (k == "lm_head.weight" and cfg.tie_word_embeddings))
    if unused:
        raise BaseModelError(
            f"the model has weights jishi's exporter does not handle ({', '.join(unused[:4])}"
            f"{', ...' if len(unused) > 4 else ''}); this variant of the {cfg.family} family is not supported"
        )
    graph = helper.make_graph(g.nodes, "jishi_decoder", inputs + lin.merge_inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    return model


def _silu(g: _Graph, x: str, name: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x], name=f"{name}/sigmoid")], name=name)


def _gelu_tanh(g: _Graph, x: str, name: str) -> str:
    # FastGelu is GELU's tanh approximation, as transformers' gelu_pytorch_tanh.
    return g.op("FastGelu", [x], domain=MS, name=name)


ACTIVATIONS = {"silu": _silu, "gelu_tanh": _gelu_tanh}


class _Tracked(dict):
    """The weights, remembering which were read: any left over means an unsupported layer part."""

    def __init__(self, *a):
        super().__init__(*a)
        self.used: set[str] = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)


def _skip_norm(g: _Graph, x: str, residual: str, gamma: str, cfg: ModelConfig, name: str) -> tuple[str, str]:
    out = [f"{name}/out", "", "", f"{name}/residual"]
    g.op("SkipSimplifiedLayerNormalization", [x, residual, gamma], domain=MS, name=name, outputs=out, epsilon=cfg.rms_norm_eps)
    return out[0], out[3]


def _scales(g: _Graph, recipe: QuantRecipe, name: str, scales: np.ndarray, out: str | None = None) -> str:
    """The float32 scales of a MatMulNBits / GatherBlockQuantized input. A GGUF's block scales are fp16
    values (Q4_0, Q5_0, Q8_0, Q4_1): stored as fp16, half the bytes, and widened by a Cast that
    onnxruntime folds into a float32 initializer when it loads the graph, so the op reads the very
    same values. Scales fp16 cannot hold exactly stay float32."""
    scales = np.asarray(scales, np.float32)
    if recipe.name == "gguf" and np.array_equal(scales.astype(np.float16).astype(np.float32), scales):
        half = g.init(f"{name}.fp16", scales.astype(np.float16))
        return g.op("Cast", [half], to=TensorProto.FLOAT, name=f"{name}/cast", outputs=[out or f"{name}/cast/out"])[0]
    return g.init(out or name, scales)


def _ready_table(prequantized: Mapping, key: str) -> QuantizedWeight | None:
    """The embedding's own grid when GatherBlockQuantized can read it (integer zero points, no correction)."""
    qw = prequantized.get(key)
    if isinstance(qw, QuantizedWeight) and qw.correction is None:
        return qw
    return None


def _float_dtype(recipe: QuantRecipe, table: np.ndarray):
    if recipe.name == "gguf":
        return np.float16 if table.dtype == np.float16 else np.float32
    return np.float16 if recipe.name == "fp16" else np.float32


def _embedding(g: _Graph, recipe: QuantRecipe, embed: np.ndarray, codes: QuantizedWeight | None, tied: bool) -> str:
    if codes is None:
        half = _float_dtype(recipe, embed) == np.float16
        table = g.init("model.embed_tokens.weight", embed.astype(np.float16 if half else np.float32))
        rows = g.op("Gather", [table, "input_ids"], axis=0, name="embed")
        return g.op("Cast", [rows], to=TensorProto.FLOAT, name="embed/cast") if half else rows
    # The codes in MatMulNBits' layout (vocab, blocks, bytes per block), which GatherBlockQuantized reads
    # along its last axis: a tied LM head then uses the very same initializer, one copy of the largest tensor.
    vocab, nb = codes.n, codes.k // codes.block
    if tied:  # one copy of the scales for both: the head's flat ones, shaped for the gather
        scales = g.op("Reshape", [_scales(g, recipe, "lm_head.scales", codes.scales.reshape(-1), out="lm_head.scales"),
                                  g.init("shape.embed_scales", np.array([vocab, nb, 1], np.int64))], name="embed/scales")
    else:
        scales = _scales(g, recipe, "model.embed_tokens.scales", codes.scales.reshape(vocab, nb, 1))
    inputs = [g.init("lm_head.qweight" if tied else "model.embed_tokens.qweight", codes.packed), "input_ids", scales]
    if not codes.default_zero_points():  # else GatherBlockQuantized's default, 2^(bits-1)
        inputs.append(g.init("model.embed_tokens.qzeros",
                             unpack_zero_points(codes.zero_points, codes.bits, vocab, nb).reshape(vocab, nb, 1)))
    return g.op("GatherBlockQuantized", inputs, domain=MS, name="embed", gather_axis=0, quantize_axis=2,
                block_size=codes.block, bits=codes.bits)


def _lm_head(g: _Graph, recipe: QuantRecipe, x: str, weight: np.ndarray, tied: bool,
             tied_codes: QuantizedWeight | None = None, ready=None, out: str = "logits") -> None:
    """``ready``: an untied head's own grid (gguf), a QuantizedWeight or a float array."""
    if recipe.name == "gguf" and not tied and isinstance(ready, np.ndarray):
        weight = ready
    floats = (recipe.name in ("fp32", "fp16") or (recipe.name == "gguf" and (
        tied_codes is None if tied else not isinstance(ready, QuantizedWeight))))
    if floats:
        half = (_float_dtype(recipe, weight) == np.float16) if recipe.name == "gguf" else recipe.name == "fp16"
        if tied:
            # Gemm with transB reads the embedding table as it is: one copy of the largest tensor.
            table = "model.embed_tokens.weight"
            if half:
                table = g.op("Cast", [table], to=TensorProto.FLOAT, name="lm_head/cast")
            g.op("Gemm", [x, table], transB=1, name="lm_head/gemm", outputs=[out])
            return
        wt = np.ascontiguousarray(weight.T)
        w = g.init("lm_head.weight", wt.astype(np.float16 if half else np.float32))
        if half:
            w = g.op("Cast", [w], to=TensorProto.FLOAT, name="lm_head/cast")
        g.op("MatMul", [x, w], name="lm_head/matmul", outputs=[out])
        return
    if tied:
        qw, packed = tied_codes, "lm_head.qweight"  # written by _embedding
    elif isinstance(ready, QuantizedWeight):
        qw = ready
        if qw.correction is not None:
            raise ValueError("the LM head's grid needs a zero-point correction; re-quantize it before the graph")
        packed = g.init("lm_head.qweight", qw.packed)
    else:
        qw = (quantize_symmetric_int8(weight, recipe.block) if recipe.head_bits == 8
              else quantize_asymmetric(weight, 4, recipe.block, correct=False))
        packed = g.init("lm_head.qweight", qw.packed)
    scales = "lm_head.scales" if tied else _scales(g, recipe, "lm_head.scales", qw.scales.reshape(-1))  # tied: by _embedding
    inputs = [x, packed, scales]
    if not qw.default_zero_points():
        inputs.append(g.init("lm_head.qzeros", qw.zero_points))
    g.op("MatMulNBits", inputs, domain=MS, name="lm_head/matmul", outputs=[out],
         K=qw.k, N=qw.n, bits=qw.bits, block_size=qw.block, accuracy_level=recipe.accuracy_level)


def save_model(model: onnx.ModelProto, path: Path, data_name: str | None = None) -> list[Path]:
    """Write the graph with its weights in one external data file beside it; returns both paths."""
    path = Path(path)
    data = path.with_name(data_name or path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data]


def constant_side_paths(graph_path: Path, out: Path, block: int) -> Path:
    """Write, beside a saved int4/gguf graph with merge points, the graph for requests with no adapter.

    There the side path carries the zero-point corrections, so it stays, with A and B as constants
    instead of inputs: A is one shared block-sum matrix per input size (stored in the graph file,
    41 KB and 295 KB for SmolLM2-135M), B the stored correction (the very bytes of the weights
    file, renamed ``<name>.zp_correction`` as in a build without merge points). onnxruntime then
    prepacks both; a graph input cannot be. Side paths with no correction (a one-row zero B, the
    runtime's sign of it) go, as ``strip_merge_points`` does. The logits are those of the
    merge-point graph with its default inputs bound, bit for bit (tests). Measured on SmolLM2-135M
    (bench/token_profile.py --paired, 2 threads): decode steps 0.90–0.99 of the inputs' form in six
    sittings (median 0.97), the same with 1 thread; a MatMul reading an input repacks it each run.
    """
    model = onnx.load(str(graph_path), load_external_data=False)
    g = model.graph
    a_rows = {v.name: v.type.tensor_type.shape.dim[0].dim_value for v in g.input if v.name.startswith("lora.")
              and v.name.endswith(".a")}
    b_rows = {t.name: t.dims[0] for t in g.initializer if t.name.startswith("lora.") and t.name.endswith(".b")}
    corrected = {b for b, rows in b_rows.items() if rows != 1}
    if not a_rows:
        raise ValueError(f"{graph_path.name} has no merge points")
    rename: dict[str, str] = {}
    shared: dict[str, np.ndarray] = {}
    keep = []
    for node in g.node:
        lora = [i for i in node.input if i.startswith("lora.")]
        if not lora:
            keep.append(node)
            continue
        b = lora[0][:-2] + ".b"  # side_a reads lora.<name>.a, side_b lora.<name>.b
        if b not in corrected:
            if node.op_type == "Gemm":
                rename[node.output[0]] = node.input[2]  # y + (x·A)·B  →  y
            continue
        if node.op_type == "MatMul":
            k = a_rows[lora[0]]
            name = f"block_sums.{k}.{block}"
            shared.setdefault(name, block_sum_matrix(k, block))
            node.input[1] = name
        else:
            node.input[1] = b.removeprefix("lora.").removesuffix(".b") + ".zp_correction"
        keep.append(node)
    _keep_nodes(g, keep, rename)
    inits = []
    for t in g.initializer:
        if t.name.startswith("lora."):
            if t.name not in corrected:
                continue
            t.name = t.name.removeprefix("lora.").removesuffix(".b") + ".zp_correction"
        inits.append(t)
    inits += [numpy_helper.from_array(m, name) for name, m in shared.items()]  # small: in the graph file itself
    del g.initializer[:]
    g.initializer.extend(inits)
    # Serialized as it is: its initializers keep their locations in the shared weights file.
    out.write_bytes(model.SerializeToString())
    return out


def _keep_nodes(g, keep: list, rename: dict[str, str]) -> None:
    """The graph ``g`` with only the nodes ``keep``, their inputs renamed through ``rename`` (a dropped
    node's output → what stands for it), and without the ``lora.*`` graph inputs."""
    for node in keep:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    del g.node[:]
    g.node.extend(keep)
    inputs = [v for v in g.input if not v.name.startswith("lora.")]
    del g.input[:]
    g.input.extend(inputs)


def strip_merge_points(graph_path: Path, out: Path) -> Path:
    """Write, beside a saved graph with merge points, the same graph without them.

    Where the side path exists only for the merge points (every format but int4, whose
    side path also carries the zero-point correction), it costs two nodes per projection.
    The copy drops those nodes, the ``lora.*`` inputs and their defaults, and reads the very
    same bytes of the weights file: the runtime serves plain requests from it and opens
    the graph with merge points only when an adapter is asked for.
    """
    model = onnx.load(str(graph_path), load_external_data=False)
    g = model.graph
    rename: dict[str, str] = {}
    keep = []
    for node in g.node:
        lora = [i for i in node.input if i.startswith("lora.")]
        if lora and node.op_type == "Gemm":
            rename[node.output[0]] = node.input[2]  # y + (x·A)·B  →  y
        elif not lora:
            keep.append(node)
    if not rename:
        raise ValueError(f"{graph_path.name} has no merge-point side paths to strip")
    _keep_nodes(g, keep, rename)
    inits = [t for t in g.initializer if not t.name.startswith("lora.")]
    del g.initializer[:]
    g.initializer.extend(inits)
    # Serialized as it is: its initializers keep their locations in the shared weights file.
    out.write_bytes(model.SerializeToString())
    return out
