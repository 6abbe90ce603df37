"""A LoRA trained against a model's exact int4 weights, to win back what quantization lost.

An int4 bundle with merge points runs ``y = x·Ŵ + (x·A)·B·s``: ``Ŵ`` the int4 codes' values, the
adapter's ``A`` and ``B`` unrounded, in float (``runtime/adapters.py``). So a LoRA trained with the
student's weights replaced by those very values, frozen, learns a correction that reaches the bundle
exactly: no second rounding comes after it.

``on_grid`` makes that model: a copy of the float model whose block projections (and embedding and
LM head, where the bundle stores them on a grid too) hold the values given, as ``numpy`` arrays in the
Llama layout (the names ``jishi.export.from_torch.numpy_weights`` gives; a fused source projection
takes its targets' rows). ``train_on_grid`` adds PEFT LoRA on the projections the merge points cover
and trains it with the distillation loss of ``kd.py`` (KL from the teacher's next-token distribution
at temperature T, times T²) on calibration sequences, the teacher run alongside. PEFT starts ``B`` at
zero, so step 0 is the int4 model itself. ``save_grid_adapter`` writes the PEFT directory and
``jishi_adapter.json``, whose ``grid`` entry says which codes it was trained against; a bundle with
other codes refuses it (``jishi.export.adapters``).

Finding the codes is the exporter's job; this room sees only their values (``jishi.grid_recovery``
ties the two together for ``jishi build --recover-steps``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jishi.errors import JishiError

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the merge points' targets (runtime/adapters.py)


@dataclass(frozen=True)
class GridLoraConfig:
    steps: int = 100
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS
    learning_rate: float = 1e-3
    warmup: float = 0.05
    batch_size: int = 4
    seq_len: int = 256
    temperature: float = 1.0
    seed: int = 0
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.rank < 1 or self.alpha <= 0:
            raise JishiError("grid LoRA: steps, batch size, rank and alpha must be positive")
        if self.seq_len < 8:
            raise JishiError("grid LoRA: sequences need at least 8 tokens")
        if self.temperature <= 0 or self.learning_rate <= 0:
            raise JishiError("grid LoRA: the temperature and learning rate must be positive")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise JishiError(f"grid LoRA targets are some of {', '.join(TARGETS)}, not {', '.join(bad) or 'none'}")


@dataclass
class GridLoraResult:
    model: object  # the PEFT model (on the grid, with the trained LoRA)
    steps: int
    tokens: int
    seconds: float
    kl_before: float | None  # mean KL(teacher ‖ model) per token at T = 1 on the evaluation windows
    kl_after: float | None
    history: list[dict] = field(default_factory=list)


def on_grid(model, values: dict, cfg) -> object:
    """A deep copy of ``model`` whose weights named in ``values`` (numpy, Llama layout) take those values,
    every parameter frozen. ``cfg``: the model's ``ModelConfig`` (where fused projections hold their parts)."""
    import torch

    from jishi.families import source_projections

    grid = copy.deepcopy(model)
    params = dict(grid.named_parameters())
    where = source_projections(cfg)
    with torch.no_grad():
        for name, value in values.items():
            if name in params:
                target, rows = params[name], slice(None)
            else:  # a part of a fused projection: model.layers.i.self_attn.q_proj.weight → qkv_proj rows
                stem, module, leaf = name.rsplit(".", 2)
                t = module[: -len("_proj")] if module.endswith("_proj") else None
                if t not in where or leaf != "weight":
                    raise JishiError(f"the model has no weight {name} to put on the grid")
                src, a, b = where[t]
                target, rows = params[f"{stem}.{src}.{leaf}"], slice(a, b)
            v = torch.from_numpy(value).to(target.dtype)
            if tuple(target[rows].shape) != tuple(v.shape):
                raise JishiError(f"grid values for {name} have shape {tuple(v.shape)}, the model's {tuple(target[rows].shape)}")
            target[rows] = v
    for p in grid.parameters():
        p.requires_grad_(False)
    return grid.eval()


def mean_kl(teacher, model, windows, temperature: float = 1.0) -> float:
    """Mean per-token KL(teacher ‖ model) on ``windows`` (lists of token ids), at ``temperature``, times T²."""
    import torch

    from jishi.distill.kd import kl_full

    total, count = 0.0, 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            t = teacher(input_ids=x, use_cache=False).logits[0, :-1]
            s = model(input_ids=x, use_cache=False).logits[0, :-1]
            total += float(kl_full(t, s, temperature))
            count += len(w) - 1
    model.train(was)
    return total / max(count, 1)


def train_on_grid(teacher, grid_model, seqs: list[list[int]], cfg, config: GridLoraConfig | None = None,
                  eval_windows: list[list[int]] | None = None, quiet: bool = False, desc: str = "Grid LoRA") -> GridLoraResult:
    """Train a PEFT LoRA on ``grid_model`` (from ``on_grid``; its own weights stay frozen) towards ``teacher``'s
    next-token distributions on ``seqs`` (token id lists of ``config.seq_len``, calibration text: never the
    held-out text). ``eval_windows``: token windows the KL is measured on before and after."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from jishi.distill.kd import kl_full, step_indices
    from jishi.families import peft_modules

    config = config or GridLoraConfig()
    if not seqs:
        raise JishiError("grid LoRA needs training sequences")
    if any(len(s) != config.seq_len for s in seqs):
        raise JishiError(f"every grid LoRA training sequence must have {config.seq_len} tokens")
    torch.manual_seed(config.seed)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none",
                      target_modules=peft_modules(cfg, config.targets), task_type="CAUSAL_LM")
    model = get_peft_model(grid_model, lora)
    before = mean_kl(teacher, model, eval_windows) if eval_windows else None
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0, betas=(0.9, 0.95))
    warm = max(1, round(config.steps * config.warmup))

    def lr_at(step: int) -> float:  # linear warm-up, then cosine down to a tenth
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, config.steps - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    history: list[dict] = []
    per_step = config.batch_size * (config.seq_len - 1)
    t0, tokens = time.time(), 0
    model.train()
    with tqdm(total=config.steps, desc=desc, unit="step", disable=quiet, file=sys.stderr) as bar:
        for step in range(config.steps):
            ids = torch.tensor([seqs[i] for i in step_indices(step, config.batch_size, len(seqs), config.seed)])
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
            s_logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            V = s_logits.shape[-1]
            kl = kl_full(t_logits.reshape(-1, V), s_logits.reshape(-1, V), config.temperature)
            (kl / per_step).backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            tokens += ids.numel()
            history.append({"step": step + 1, "kl": round(float(kl.detach()) / per_step, 5)})
            bar.set_postfix(kl=f"{history[-1]['kl']:.4f}", tok_s=f"{tokens / max(time.time() - t0, 1e-9):.0f}")
            bar.update(1)
    seconds = time.time() - t0
    model.eval()
    after = mean_kl(teacher, model, eval_windows) if eval_windows else None
    return GridLoraResult(model, config.steps, tokens, seconds, before, after, history)


def save_grid_adapter(result: GridLoraResult, output: str | Path, info: dict) -> Path:
    """The trained LoRA as a PEFT directory plus ``jishi_adapter.json`` (``info``: base, base_sha256, the
    ``grid`` the codes came from with their digest, ...), written whole or not at all."""
    from jishi.distill.finetune import INFO_FILE, _check_output
    from jishi.runtime.store import swap_in

    output = Path(output)
    _check_output(output)
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        result.model.save_pretrained(str(staging), safe_serialization=True)
        (staging / "README.md").unlink(missing_ok=True)
        cfg_path = staging / "adapter_config.json"
        peft_cfg = json.loads(cfg_path.read_text())
        peft_cfg["base_model_name_or_path"] = info.get("base")
        cfg_path.write_text(json.dumps(peft_cfg, indent=2) + "\n")
        record = {**info, "training": {"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 1),
                                       "kl_before": _r(result.kl_before), "kl_after": _r(result.kl_after)}}
        (staging / INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
        swap_in(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def config_record(config: GridLoraConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


def _r(x):
    return None if x is None else round(x, 5)
