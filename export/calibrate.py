"""Calibrated int4 codes for a model: statistics of each layer's inputs on calibration text, then
GPTQ (``gptq.py``), activation-aware scaling (``awq.py``) or both, one decoder layer at a time.

The float model runs the calibration sequences once, layer by layer: the inputs of layer
``i`` are the float outputs of layer ``i − 1``, and each layer's projections see exactly
what they see in a full forward pass. Per layer and per input (the q/k/v input, the
o_proj input, the gate/up input, the down_proj input) this gathers ``H = mean xᵀx`` and
``mean |x|`` per channel, quantizes that layer's weights and lets its statistics go, so
only one layer's Hessians are in memory (a 1.5B model's down_proj Hessian alone is
0.6 GB in float64).

Methods (int4 codes; every one writes the same block grid, so nothing changes at run time):

- ``rtn``: round to nearest on each block's min/max grid (no calibration);
- ``gptq``: GPTQ, in input order, or by activation order with static groups (``act_order=True``);
- ``awq``: input scales searched per layer and folded into the norms, then round to nearest;
- ``awq-gptq``: the scales, then GPTQ on the scaled weights (with the inputs' Hessian scaled
  to match). ``α`` is searched with rounding (one GPTQ per ``α`` would cost the grid's size in
  GPTQ runs); GPTQ then runs with that ``α`` and with none, and the one whose output moves less
  is kept, so on the calibration inputs it is never worse than GPTQ alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jishi.export.gptq import ACT_ORDER, DAMP, gptq_quantize, hessian_error
from jishi.export.quant import QuantizedWeight, quantize_asymmetric, take_rows

METHODS = ("rtn", "gptq", "awq", "awq-gptq")
CALIBRATED = ("gptq", "awq", "awq-gptq")

# a projection module of the source checkpoint → the input it reads (those sharing one share its statistics)
INPUT_OF = {"q_proj": "attn_in", "qkv_proj": "attn_in", "o_proj": "o_in",
            "gate_proj": "mlp_in", "gate_up_proj": "mlp_in", "down_proj": "down_in"}
# each input → the weights (Llama layout, split) that read it
READERS = {"attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o_in": ("self_attn.o_proj",),
           "mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "down_in": ("mlp.down_proj",)}


@dataclass
class InputStats:
    hessian: np.ndarray  # float64 (k × k), mean of xᵀx per token
    mean_abs: np.ndarray  # float64 (k,), mean |x| per channel
    tokens: int


@dataclass
class Calibrated:
    codes: dict[str, QuantizedWeight]  # int4 codes by weight name (Llama layout)
    norms: dict[str, np.ndarray] = field(default_factory=dict)  # norm weights the scaling changed, by name
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # the input scales folded into each of those norms
    record: dict = field(default_factory=dict)  # what was done, for the manifest


def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError("calibration needs a decoder whose blocks are model.model.layers")
    return layers


def layer_statistics(model, batches):
    """For each decoder layer, in order: ``(i, {input: InputStats})`` on the calibration ``batches`` (LongTensors of
    token ids, all of one shape), the float model run one layer at a time."""
    import torch

    batches = list(batches)
    if not batches:
        raise ValueError("no calibration sequences")
    if len({tuple(b.shape) for b in batches}) != 1:
        raise ValueError("calibration sequences must all have one shape")
    layers = decoder_layers(model)
    arguments: dict[int, dict] = {}
    hidden: list = []

    class _Enough(Exception):
        pass

    def keep(i: int, stop: bool):
        def hook(module, args, kwargs):
            if i not in arguments:  # the same for every batch of one shape: masks, positions, rotary tables
                arguments[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == 0:
                hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
                if stop:
                    raise _Enough
        return hook

    with torch.no_grad():
        # the first batch through every layer, for each layer's arguments; the others up to layer 0 only
        hooks = [layer.register_forward_pre_hook(keep(i, False), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            model(input_ids=batches[0], use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        hook = layers[0].register_forward_pre_hook(keep(0, True), with_kwargs=True)
        try:
            for ids in batches[1:]:
                try:
                    model(input_ids=ids, use_cache=False)
                except _Enough:
                    pass
        finally:
            hook.remove()

        for i, layer in enumerate(layers):
            sums: dict[str, list] = {}

            def gather(key):
                def hook(module, args):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                    acc = sums.setdefault(key, [0.0, 0.0, 0])
                    acc[0] = acc[0] + x.T @ x
                    acc[1] = acc[1] + x.abs().sum(0)
                    acc[2] += x.shape[0]
                return hook

            hooks = [module.register_forward_pre_hook(gather(INPUT_OF[name.rsplit(".", 1)[-1]]))
                     for name, module in layer.named_modules() if name.rsplit(".", 1)[-1] in INPUT_OF]
            try:
                outs = []
                for x in hidden:
                    out = layer(x, **arguments[i])
                    outs.append(out[0] if isinstance(out, tuple) else out)
            finally:
                for h in hooks:
                    h.remove()
            hidden = outs
            yield i, {key: InputStats((h / n).numpy(), (a / n).numpy(), n) for key, (h, a, n) in sums.items()}


def quantize_group(w: np.ndarray, stats: InputStats, method: str, bits: int = 4, block: int = 32, damp: float = DAMP,
                   act_order: bool = ACT_ORDER, alphas=None, scalable: bool = True, exact_zero_points: bool = True):
    """The codes of ``w`` (the rows of every weight that reads one input, n × k) by ``method``, given that input's
    statistics: ``(QuantizedWeight, s, α)``, the codes in the basis of the inputs divided by ``s`` (None and None
    when nothing is scaled: a method without AWQ, or an input with no norm to fold scales into)."""
    from jishi.export import awq

    use_gptq, use_awq = method in ("gptq", "awq-gptq"), method in ("awq", "awq-gptq")

    def quantize(ws: np.ndarray, hs: np.ndarray) -> QuantizedWeight:
        if use_gptq:
            return gptq_quantize(ws, hs, bits, block, damp=damp, act_order=act_order,
                                 exact_zero_points=exact_zero_points)
        return quantize_asymmetric(ws, bits, block, correct=exact_zero_points)

    H = stats.hessian
    if not (use_awq and scalable):
        return quantize(w, H), None, None
    rtn = lambda ws, hs: quantize_asymmetric(ws, bits, block, correct=exact_zero_points).dequantize()  # noqa: E731
    _, alpha, _ = awq.search(w, H, stats.mean_abs, rtn, tuple(awq.ALPHAS if alphas is None else alphas))
    best = None
    for a in sorted({0.0, alpha}) if use_gptq else [alpha]:
        s = awq.channel_scales(stats.mean_abs, a)
        qw = quantize((w * s).astype(np.float32), H / np.outer(s, s))
        err = hessian_error(qw.dequantize() / s, w, H)
        if best is None or err < best[0]:
            best = (err, qw, s, a)
    return best[1], best[2], best[3]


def calibrate(model, cfg, weights: dict[str, np.ndarray], batches, method: str = "gptq", bits: int = 4, block: int = 32,
              damp: float = DAMP, act_order: bool = ACT_ORDER, alphas=None, progress=None,
              exact_zero_points: bool = True) -> Calibrated:
    """int4 codes for every block projection of ``model`` (``weights``: its numpy weights in the Llama layout,
    as the graph reads them, left unchanged) by ``method``; norms the scaling changed come back in ``norms``.
    ``exact_zero_points``: see ``gptq_quantize``."""
    from jishi.export import awq
    from jishi.families import features_of

    if method not in METHODS:  # rtn here: round-to-nearest with its layer output error measured
        raise ValueError(f"unknown int4 method {method!r}; one of {', '.join(METHODS)}")
    feats = features_of(cfg)
    norm_before = {"attn_in": "input_layernorm", "mlp_in": feats.pre_mlp_norm}
    out = Calibrated({})
    chosen: dict[str, list] = {"attn_in": [], "mlp_in": []}
    errors = []
    for i, stats in layer_statistics(model, batches):
        p = f"model.layers.{i}."
        for key, readers in READERS.items():
            names = [f"{p}{r}.weight" for r in readers]
            parts = [weights[n] for n in names]
            w = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
            qw, s, alpha = quantize_group(w, stats[key], method, bits, block, damp, act_order, alphas,
                                          scalable=key in norm_before, exact_zero_points=exact_zero_points)
            if s is not None:
                chosen[key].append(alpha)
                norm = f"{p}{norm_before[key]}.weight"
                out.norms[norm] = awq.fold_into_norm(weights[norm], s, feats.norm_offset)
                out.scales[norm] = s
            errors.append(hessian_error(qw.dequantize() if s is None else qw.dequantize() / s, w, stats[key].hessian))
            start = 0
            for name, part in zip(names, parts):
                out.codes[name] = take_rows(qw, start, start + part.shape[0]) if len(parts) > 1 else qw
                start += part.shape[0]
            if progress:
                progress(len(names))
    out.record = {"output_error": round(float(np.mean(errors)), 5),
                  "zero_points": "exact" if exact_zero_points else "integer"}
    if method in ("gptq", "awq-gptq"):
        out.record.update(damp=damp, act_order=act_order)
    if method in ("awq", "awq-gptq"):
        out.record["awq_alpha"] = {"attn_in": chosen["attn_in"], "mlp_in": chosen["mlp_in"]}
    return out
