"""`jishi build --recover-steps N`: a LoRA trained against the bundle's own int4 codes.

The build finds the int4 codes (GPTQ by default, ``jishi.export.calibrate``); this puts a copy of the
float model on exactly those values (the block projections from the codes, the embedding and LM head
on the grid the graph stores them on), trains a LoRA on the merge points' projections to follow the
float model (or a teacher) on calibration text (``jishi.distill.grid_lora``), and writes it as a PEFT
adapter whose record holds the codes' digest. The build then writes its graph from those same codes
and adds the adapter, so what the LoRA learnt runs unchanged at run time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from jishi.errors import JishiError

ADAPTER_NAME = "recover"
RECOVER_METHODS = ("rtn", "gptq")  # AWQ folds scales into the norms and has no merge points
EVAL_WINDOWS = 2  # held-out windows the KL is measured on before and after (measurement only)
MAX_SEQUENCES = 512  # training sequences cut from the calibration text at most (steps cycle over them)


def projection_names(cfg) -> list[str]:
    from jishi.export.calibrate import READERS

    return [f"model.layers.{i}.{r}.weight" for i in range(cfg.num_layers) for rs in READERS.values() for r in rs]


def block_codes(cfg, weights: dict, block: int, exact_zero_points: bool, calibrated: dict | None = None) -> dict:
    """The int4 codes of every block projection as the graph writes them: the calibrated ones given, else round
    to nearest (the graph's own call for a weight with no codes)."""
    from jishi.export.quant import quantize_asymmetric

    calibrated = calibrated or {}
    return {name: calibrated[name] if name in calibrated else
            quantize_asymmetric(weights[name], 4, block, correct=exact_zero_points) for name in projection_names(cfg)}


def grid_values(cfg, weights: dict, codes: dict, block: int, head_bits: int) -> dict[str, np.ndarray]:
    """What an int4 bundle computes with, as float arrays: the codes' values for the block projections, and the
    embedding (and an untied LM head) on the grid the graph stores them on."""
    from jishi.export.quant import quantize_asymmetric, quantize_symmetric_int8

    def head(w):
        return (quantize_symmetric_int8(w, block) if head_bits == 8
                else quantize_asymmetric(w, 4, block, correct=False)).dequantize()

    values = {name: qw.dequantize() for name, qw in codes.items()}
    values["model.embed_tokens.weight"] = head(weights["model.embed_tokens.weight"])
    if not cfg.tie_word_embeddings:
        values["lm_head.weight"] = head(weights["lm_head.weight"])
    return values


def training_sequences(tokenizer, text: str, count: int, seq_len: int) -> list[list[int]]:
    """Up to ``count`` sequences of ``seq_len`` tokens from the calibration text (never the held-out text)."""
    need = count * seq_len
    chars = max(4 * need, 20_000)
    ids = tokenizer.encode(text[:chars], bos=False)
    while len(ids) < need and chars < len(text):
        chars *= 2
        ids = tokenizer.encode(text[:chars], bos=False)
    seqs = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:count]
    if not seqs:
        raise JishiError(f"the calibration text is shorter than one {seq_len}-token sequence: give a longer one")
    return seqs


def recover(base, cfg, weights: dict, codes: dict, grid: dict, output: str | Path, config=None, head_bits: int = 8,
            teacher=None, text: str | None = None, quiet: bool = False) -> tuple[Path, dict]:
    """Train the grid LoRA of ``base`` (a LoadedBase) against ``codes`` (every block projection's QuantizedWeight)
    and save it to ``output``; returns the directory and the record of the run. ``grid``: how the codes were made
    (method, block, zero points, calibration, codes_sha256). ``teacher``: a LoadedBase sharing the tokenizer, else
    the float model itself."""
    from jishi.distill.grid_lora import GridLoraConfig, config_record, on_grid, save_grid_adapter, train_on_grid
    from jishi.heldout import calibration_text, heldout_text, windows

    config = config or GridLoraConfig()
    text = calibration_text() if text is None else text
    tok = base.runtime_tokenizer()
    seq_len = min(config.seq_len, cfg.context_length)
    if seq_len != config.seq_len:
        from dataclasses import replace

        config = replace(config, seq_len=seq_len)
    seqs = training_sequences(tok, text, min(config.steps * config.batch_size, MAX_SEQUENCES), seq_len)
    held = windows(tok.encode(heldout_text(), bos=False), seq_len)[:EVAL_WINDOWS]
    grid_model = on_grid(base.model, grid_values(cfg, weights, codes, grid["block"], head_bits), cfg)
    t_model = base.model if teacher is None else teacher.model
    result = train_on_grid(t_model, grid_model, seqs, cfg, config, eval_windows=held, quiet=quiet,
                           desc="Training the LoRA on the int4 grid")
    info = {"name": ADAPTER_NAME, "base": base.name, "base_sha256": base.source_sha256, "grid": grid,
            "teacher": "the float model itself" if teacher is None else teacher.name,
            "data": f"calibration text, {len(seqs)} sequences of {seq_len} tokens",
            "config": config_record(config)}
    path = save_grid_adapter(result, output, info)
    record = {"adapter": ADAPTER_NAME, "steps": result.steps, "tokens": result.tokens,
              "seconds": round(result.seconds, 1), "rank": config.rank,
              "heldout_kl_before": _r(result.kl_before), "heldout_kl_after": _r(result.kl_after)}
    if not quiet and result.kl_before is not None:
        print(f"Held-out KL to the float model: {result.kl_before:.4f} on the int4 grid, {result.kl_after:.4f} with the "
              f"LoRA ({result.steps} steps)", file=sys.stderr)
    del grid_model, result
    return path, record


def _r(x):
    return None if x is None else round(x, 5)
