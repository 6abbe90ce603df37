"""Calibrated int4: GPTQ (Frantar et al., 2022) onto the asymmetric block grid MatMulNBits runs.

Round-to-nearest puts each weight on its block's grid independently. GPTQ quantizes
the columns (input features) of ``W`` one at a time and moves the rounding error of
each column onto the columns not yet quantized, weighted by the inverse Hessian
``H = Σ xᵀx`` of the layer's inputs on calibration text, so that the layer's *output*
on such inputs changes least. The grid is the one ``quant.py`` writes: per block of
``block`` inputs a float scale and minimum (chosen from the block's weights as they
are when GPTQ reaches it), codes 0..15, and the exact zero-point correction; blocks
tile the input dimension in order (no activation reordering), so the codes map onto
MatMulNBits blocks one to one.

Hessians are gathered in one pass of the float model over the calibration text (the
inputs each projection sees unquantized); the projections that share an input (q, k,
v; gate, up) share a Hessian.
"""

from __future__ import annotations

import numpy as np

from jishi.export.quant import QuantizedWeight, from_grid

# projection → the input it reads (those sharing one share a Hessian)
INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in",
            "qkv_proj": "attn_in", "gate_up_proj": "mlp_in"}  # fused (Phi-3)


def collect_hessians(model, batches) -> dict[str, "object"]:
    """``{"model.layers.{i}.{attn_in|o_in|mlp_in|down_in}": H}`` (float64 torch, k × k, mean of xᵀx per
    token) from running ``model`` on ``batches`` (LongTensors of token ids)."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(key):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]
        return fn

    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "o_proj", "gate_proj", "down_proj", "qkv_proj", "gate_up_proj") and ".layers." in f".{name}":
            layer = name.split(".layers.")[1].split(".")[0]
            hooks.append(module.register_forward_pre_hook(hook(f"model.layers.{layer}.{INPUT_OF[leaf]}")))
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: sums[k] / counts[k] for k in sums}


def hessian_key(weight_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` → ``model.layers.3.attn_in``."""
    parts = weight_name.split(".")
    return f"model.layers.{parts[2]}.{INPUT_OF[parts[4]]}"


def gptq_quantize(w: np.ndarray, hessian, bits: int = 4, block: int = 32, damp: float = 0.01,
                  lazy: int = 128) -> QuantizedWeight:
    """GPTQ of ``w`` (out × in) given the inputs' Hessian (in × in); returns MatMulNBits form."""
    import torch

    W = torch.tensor(np.asarray(w, dtype=np.float32), dtype=torch.float64)
    n, k = W.shape
    if k % block:
        raise ValueError(f"input size {k} is not a multiple of the block size {block}")
    H = torch.as_tensor(hessian, dtype=torch.float64).clone()
    qmax = (1 << bits) - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    lazy = block * max(1, lazy // block)
    codes = torch.zeros((n, k), dtype=torch.uint8)
    scales = torch.zeros((n, k // block), dtype=torch.float64)
    mins = torch.zeros((n, k // block), dtype=torch.float64)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        lo = scale = safe = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:  # the block's grid, from its weights as they are now
                grp = W1[:, i:i + block].float()
                lo = grp.amin(dim=1)
                scale = (grp.amax(dim=1) - lo) / qmax
                safe = torch.where(scale > 0, scale, torch.ones_like(scale))
                scales[:, col // block], mins[:, col // block] = scale.double(), lo.double()
            w_col = W1[:, i]
            q = torch.clamp(torch.round((w_col.float() - lo) / safe), 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            wq = (scale * q + lo).double()
            err = (w_col - wq) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return from_grid(codes.numpy(), scales.float().numpy(), mins.float().numpy(), bits, block)


def gptq_model(model, batches, bits: int = 4, block: int = 32, progress=None) -> dict[str, QuantizedWeight]:
    """GPTQ codes of every block projection of ``model``, by weight name."""
    from jishi.families import model_config, source_projections

    hessians = collect_hessians(model, batches)
    where = source_projections(model_config(model.config, 16))
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if len(parts) == 6 and parts[1] == "layers" and parts[4] in INPUT_OF and parts[5] == "weight":
            w = p.detach().float().numpy()
            # A fused projection's rows are its targets' (GPTQ treats each row alone, with the shared Hessian):
            # their codes go under the split names the graph reads.
            for target, (module, start, stop) in where.items():
                if module == parts[4]:
                    split = ".".join(parts[:4] + [f"{target}_proj", "weight"])
                    out[split] = gptq_quantize(w[start:stop], hessians[hessian_key(name)], bits, block)
                    if progress:
                        progress(1)
    return out


def output_error(w_hat: np.ndarray, w: np.ndarray, x: np.ndarray) -> float:
    """Relative Frobenius error of the layer's output ``x·Wᵀ`` when ``w`` is replaced by ``w_hat``."""
    return float(np.linalg.norm(x @ (w_hat - w).T) / np.linalg.norm(x @ w.T))
