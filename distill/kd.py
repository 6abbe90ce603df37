"""Knowledge distillation of a student against its teacher, on CPU or across processes.

Loss per token (mean over the tokens of the optimizer step):

- ``kl``: KL(teacher ‖ student) of the next-token distributions at temperature T,
  times T² (Hinton et al.) so its gradients keep their scale when T changes;
- ``ce``: cross-entropy on the data, only on sequences of real text (the user's
  ``--data``), never on text the teacher wrote;
- ``hidden``: optional MSE between the student's hidden state after block j and
  the teacher's after the block j was copied from, divided by the teacher's mean
  square (the student's last block is left out: HF applies the final norm there).

Teacher logits are computed on the fly, or once for the whole data set and cached
on disk as the top-k log-probabilities per position (``teacher_topk``). With the
cache the KL is that of the two distributions coarsened to the teacher's k tokens
plus one bucket for the rest; it is a lower bound of the full KL and equals it when
the rest holds no mass.

Order and state: the sequence drawn at position p of the run is ``perm(epoch)[p mod N]``
with a permutation seeded by (seed, epoch), so the data order is a function of the
step; a checkpoint holds the weights, the optimizer and scheduler state, the RNG
states and the history, written to a temporary file, fsynced and renamed over the
previous one. ``resume`` loses at most ``checkpoint_every`` steps and reaches the same
weights as an uninterrupted run.

Several processes (``torchrun`` or ``torch.multiprocessing``, gloo on CPU) split each
step's sequences between them; DistributedDataParallel averages the gradients, each
rank's loss is scaled so that the average is the one-process gradient.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jishi.errors import JishiError

CHECKPOINT = "checkpoint.pt"


@dataclass
class KDConfig:
    steps: int = 200
    batch_size: int = 8  # sequences per optimizer step, all processes together
    grad_accum: int = 1  # micro-batches per step
    seq_len: int = 256
    learning_rate: float = 2e-4
    warmup: float = 0.05
    weight_decay: float = 0.0
    temperature: float = 2.0
    kl_weight: float = 1.0
    ce_weight: float = 0.5  # on real text only
    hidden_weight: float = 0.0
    teacher_topk: int | None = None  # cache the teacher's top-k log-probs on disk instead of running it each step
    bf16: bool = False
    eval_every: int = 25
    eval_windows: int = 4
    checkpoint_every: int = 25
    seed: int = 0
    qat_bits: int | None = None  # 4: fake-quantized int4 weights in every block's projections (STE)
    qat_block: int = 32
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.seq_len < 8:
            raise JishiError("steps, batch size and accumulation must be at least 1 and the sequence length at least 8")
        if self.batch_size % self.grad_accum:
            raise JishiError(f"the batch size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}")
        if self.temperature <= 0:
            raise JishiError("the temperature must be positive")
        if self.teacher_topk is not None and self.hidden_weight > 0:
            raise JishiError("the hidden-state loss needs the teacher on the fly; drop the teacher cache or the hidden loss")
        if self.qat_bits not in (None, 4):
            raise JishiError("quantization-aware distillation supports 4 bits")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            raise JishiError("evaluation and checkpoint intervals must be at least 1 step")


@dataclass
class KDResult:
    steps: int
    tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # {"step", "tokens", "loss", ...}
    evals: list[dict] = field(default_factory=list)  # {"step", "tokens", "kl", "nll"}


# -- losses -------------------------------------------------------------------------------------------------

def kl_full(teacher_logits, student_logits, temperature: float):
    """Sum over positions of KL(p_t ‖ p_s) at temperature T, times T²."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum() * temperature ** 2


def kl_topk(top_ids, top_logp, student_logits, temperature: float):
    """KL on the teacher's top-k tokens plus one bucket for the rest (see the module text)."""
    import torch
    import torch.nn.functional as F

    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_top = s.gather(-1, top_ids.long())
    t_top = top_logp.float()
    p_top = t_top.exp()
    rest_t = (1 - p_top.sum(-1)).clamp(min=1e-12)
    rest_s = (1 - s_top.exp().sum(-1)).clamp(min=1e-12)
    kl = (p_top * (t_top - s_top)).sum(-1) + rest_t * (torch.log(rest_t) - torch.log(rest_s))
    return kl.sum() * temperature ** 2


# -- quantization-aware training ----------------------------------------------------------------------------

QAT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fake_quant(w, bits: int = 4, block: int = 32):
    """``w`` (out × in) on the asymmetric block grid ``d·q + m`` that export/quant.py writes exactly
    (scale and minimum per block of ``block`` inputs, codes 0..2^bits−1, round half to even)."""
    import torch

    n, k = w.shape
    if k % block:
        raise JishiError(f"input size {k} is not a multiple of the block size {block}")
    qmax = (1 << bits) - 1
    wb = w.reshape(n, k // block, block)
    lo = wb.amin(dim=2, keepdim=True)
    hi = wb.amax(dim=2, keepdim=True)
    scale = (hi - lo) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((wb - lo) / safe), 0, qmax)
    return (scale * q + lo).reshape(n, k)


def enable_qat(model, bits: int = 4, block: int = 32) -> list:
    """Make every block projection compute with fake-quantized weights, the gradient passing
    straight through to the float weights (the state dict is unchanged). Returns the modules."""
    import types

    import torch.nn.functional as F

    def forward(self, x):
        w = self.weight
        wq = w + (fake_quant(w.detach(), self._qat_bits, self._qat_block) - w).detach()
        return F.linear(x, wq, self.bias)

    done = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in QAT_TARGETS and ".layers." in f".{name}":
            module._qat_bits, module._qat_block = bits, block
            module.forward = types.MethodType(forward, module)
            done.append(module)
    return done


def snap_to_grid(model, bits: int = 4, block: int = 32) -> int:
    """Replace the float weights of the QAT projections by their grid values; returns how many."""
    import torch

    n = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in QAT_TARGETS and ".layers." in f".{name}":
                module.weight.copy_(fake_quant(module.weight, bits, block))
                n += 1
    return n


# -- data order ---------------------------------------------------------------------------------------------

def step_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """The sequence indices of one optimizer step: a function of the step alone."""
    import torch

    out, cache = [], {}
    for p in range(step * batch, (step + 1) * batch):
        epoch = p // n
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.append(cache[epoch][p % n])
    return out


# -- checkpoints --------------------------------------------------------------------------------------------

def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename over ``path``, fsync the directory."""
    import torch

    from jishi.runtime.store import fsync_dir

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# -- the loop -----------------------------------------------------------------------------------------------

def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def init_distributed_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1), gloo on CPU. True if joined."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        return True
    return False


def teacher_topk_cache(teacher, seqs, k: int, path: Path, temperature: float, quiet: bool = True):
    """Top-k teacher log-probs (at the temperature) of every position of ``seqs``, memory-mapped
    from ``path`` (ids int32, log-probs float16; written once, atomically)."""
    import numpy as np
    import torch
    from tqdm import tqdm

    n, L = len(seqs), len(seqs[0])
    meta = path / "teacher_topk.json"
    want = {"sequences": n, "seq_len": L, "k": k, "temperature": temperature,
            "digest": _digest(seqs)}
    if not (meta.is_file() and json.loads(meta.read_text()) == want):
        path.mkdir(parents=True, exist_ok=True)
        ids_tmp, lp_tmp = path / ".topk_ids.tmp", path / ".topk_logp.tmp"
        ids = np.lib.format.open_memmap(ids_tmp, mode="w+", dtype=np.int32, shape=(n, L, k))
        lp = np.lib.format.open_memmap(lp_tmp, mode="w+", dtype=np.float16, shape=(n, L, k))
        with torch.no_grad(), tqdm(total=n, desc="Caching teacher top-k", disable=quiet, file=sys.stderr) as bar:
            for i in range(0, n, 4):
                x = torch.tensor(seqs[i:i + 4])
                logp = torch.log_softmax(teacher(input_ids=x, use_cache=False).logits.float() / temperature, -1)
                v, j = logp.topk(k, dim=-1)
                ids[i:i + 4], lp[i:i + 4] = j.numpy(), v.numpy().astype(np.float16)
                bar.update(len(x))
        ids.flush(), lp.flush()
        del ids, lp
        os.replace(ids_tmp, path / "topk_ids.npy")
        os.replace(lp_tmp, path / "topk_logp.npy")
        meta.write_text(json.dumps(want))
    return (np.load(path / "topk_ids.npy", mmap_mode="r"), np.load(path / "topk_logp.npy", mmap_mode="r"))


def _digest(seqs) -> str:
    import hashlib

    h = hashlib.sha256()
    for s in seqs:
        h.update(json.dumps(s).encode())
    return h.hexdigest()


def heldout_kl_nll(teacher, student, windows, bf16: bool = False) -> tuple[float, float]:
    """Mean per-token KL(teacher ‖ student) at T = 1 and the student's NLL on held-out windows."""
    import torch

    kl = nll = 0.0
    count = 0
    was = student.training
    student.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for w in windows:
            x = torch.tensor([w])
            t = teacher(input_ids=x, use_cache=False).logits[0, :-1].float()
            s = student(input_ids=x, use_cache=False).logits[0, :-1].float()
            kl += float(kl_full(t, s, 1.0))
            nll += float(torch.nn.functional.cross_entropy(s, x[0, 1:], reduction="sum"))
            count += len(w) - 1
    student.train(was)
    return kl / count, nll / count


def train(teacher, student, seqs: list[list[int]], real: list[bool], config: KDConfig, work: Path,
          layer_map: list[int] | None = None, eval_windows: list[list[int]] | None = None,
          resume: bool = False, stop_after: int | None = None, quiet: bool = False) -> KDResult:
    """Distil ``student`` towards ``teacher`` on fixed-length ``seqs``; checkpoints go to ``work``.

    ``layer_map[j]`` is the teacher block student block j came from (for the hidden loss).
    ``stop_after`` ends the run after that many steps of this call, as an interrupt would
    (a checkpoint is written only on its interval). In a process group every rank calls this
    with the same arguments; rank 0 writes checkpoints and evaluates.
    """
    import torch
    from tqdm import tqdm

    dist, rank, world = _dist()
    work = Path(work)
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    per_micro = config.batch_size // config.grad_accum
    if per_micro % world:
        raise JishiError(f"each micro-batch ({per_micro} sequences) must split evenly over {world} processes")
    if any(len(s) != config.seq_len for s in seqs):
        raise JishiError("every training sequence must have seq_len tokens")
    if config.qat_bits:
        enable_qat(student, config.qat_bits, config.qat_block)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    topk = None
    if config.teacher_topk:
        if rank == 0:
            teacher_topk_cache(teacher, seqs, config.teacher_topk, work / "teacher", config.temperature, quiet)
        if dist:
            dist.barrier()
        topk = teacher_topk_cache(teacher, seqs, config.teacher_topk, work / "teacher", config.temperature)

    student.train()
    model = student
    if dist:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student, broadcast_buffers=False)
    params = [p for p in student.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    warm = max(1, round(config.steps * config.warmup))

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to a tenth
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, config.steps - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    step, tokens, history, evals = 0, 0, [], []
    ckpt = work / CHECKPOINT
    if resume and ckpt.is_file():
        state = load_checkpoint(ckpt)
        if state["config"] != _config_key(config) or state["data"] != _digest(seqs):
            raise JishiError(f"the checkpoint in {work} was made with other settings or data; "
                             "run again without --resume (or with the same settings)")
        student.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_tuple(state["py_rng"]))
        step, tokens, history, evals = state["step"], state["tokens"], state["history"], state["evals"]
    elif resume and not quiet and rank == 0:
        print(f"No checkpoint in {work}: starting from step 0", file=sys.stderr)

    def evaluate():
        if eval_windows and rank == 0:
            kl, nll = heldout_kl_nll(teacher, student, eval_windows, config.bf16)
            evals.append({"step": step, "tokens": tokens, "kl": round(kl, 5), "nll": round(nll, 5)})
            return kl
        return None

    if step == 0 and not evals:
        evaluate()
    global_tokens = config.batch_size * (config.seq_len - 1)
    t0, tokens0, ran = time.time(), tokens, 0
    bar = tqdm(total=config.steps, initial=step, desc="Distilling", unit="step", disable=quiet or rank != 0,
               file=sys.stderr)
    try:
        while step < config.steps and (stop_after is None or ran < stop_after):
            rows = step_indices(step, config.batch_size, len(seqs), config.seed)
            parts = {"kl": 0.0, "ce": 0.0, "hidden": 0.0}
            for m in range(config.grad_accum):
                mine = rows[m * per_micro:(m + 1) * per_micro][rank::world]
                ids = torch.tensor([seqs[i] for i in mine])
                is_real = torch.tensor([real[i] for i in mine])
                sync = m == config.grad_accum - 1
                ctx = model.no_sync() if dist and not sync else _Null()
                with ctx:
                    loss, got = _micro_loss(model, teacher, ids, is_real, mine, topk, config, layer_map)
                    # Sum over this rank's tokens / the step's tokens, times world: DDP's mean over ranks
                    # then gives the one-process gradient.
                    (loss * world / global_tokens).backward()
                for key, v in got.items():
                    parts[key] += v
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            ran += 1
            tokens += config.batch_size * config.seq_len
            if dist:  # the logged loss is the whole step's, summed over ranks
                vals = torch.tensor([parts["kl"], parts["ce"], parts["hidden"]], dtype=torch.float64)
                dist.all_reduce(vals)
                parts = dict(zip(("kl", "ce", "hidden"), vals.tolist()))
            entry = {"step": step, "tokens": tokens, **{k: round(v / global_tokens, 5) for k, v in parts.items()}}
            entry["loss"] = round(config.kl_weight * entry["kl"] + config.ce_weight * entry["ce"]
                                  + config.hidden_weight * entry["hidden"], 5)
            history.append(entry)
            post = {"loss": f"{entry['loss']:.3f}", "tok/s": f"{(tokens - tokens0) / max(time.time() - t0, 1e-9):.0f}"}
            if step % config.eval_every == 0 or step == config.steps:
                kl = evaluate()
                if kl is not None:
                    post["heldout_kl"] = f"{kl:.3f}"
            bar.set_postfix(post)
            bar.update(1)
            if step % config.checkpoint_every == 0 or step == config.steps:
                if rank == 0:
                    atomic_save(_state(student, optim, sched, step, tokens, history, evals, config, seqs), ckpt)
                if dist:
                    dist.barrier()
    finally:
        bar.close()
    return KDResult(step, tokens, time.time() - t0, history, evals)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _micro_loss(model, teacher, ids, is_real, rows, topk, config: KDConfig, layer_map):
    import torch
    import torch.nn.functional as F

    want_hidden = config.hidden_weight > 0 and layer_map is not None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        out = model(input_ids=ids, use_cache=False, output_hidden_states=want_hidden)
        t_out = None
        if topk is None:
            with torch.no_grad():
                t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=want_hidden)
    s_logits = out.logits[:, :-1].float()
    V = s_logits.shape[-1]
    got = {}
    if topk is None:
        kl = kl_full(t_out.logits[:, :-1].reshape(-1, V), s_logits.reshape(-1, V), config.temperature)
    else:
        top_ids = torch.from_numpy(topk[0][rows][:, :-1].copy())
        top_lp = torch.from_numpy(topk[1][rows][:, :-1].astype("float32"))
        kl = kl_topk(top_ids.reshape(-1, top_ids.shape[-1]), top_lp.reshape(-1, top_lp.shape[-1]),
                     s_logits.reshape(-1, V), config.temperature)
    loss = config.kl_weight * kl
    got["kl"] = float(kl.detach())
    if config.ce_weight and bool(is_real.any()):
        ce = F.cross_entropy(s_logits[is_real].reshape(-1, V), ids[is_real][:, 1:].reshape(-1), reduction="sum")
        loss = loss + config.ce_weight * ce
        got["ce"] = float(ce.detach())
    if want_hidden:
        h = 0.0
        pairs = list(enumerate(layer_map))[:-1]
        for j, ti in pairs:
            s_h, t_h = out.hidden_states[j + 1].float(), t_out.hidden_states[ti + 1].float()
            h = h + ((s_h - t_h) ** 2).mean(-1).sum() / (t_h ** 2).mean().clamp(min=1e-12)
        if pairs:
            h = h * (ids.shape[1] - 1) / ids.shape[1] / len(pairs)  # per position, like the KL
            loss = loss + config.hidden_weight * h
            got["hidden"] = float(h.detach())
    return loss, got


def _config_key(config: KDConfig) -> dict:
    d = asdict(config)
    for k in ("eval_every", "eval_windows", "checkpoint_every"):
        d.pop(k)
    return d


def _state(student, optim, sched, step, tokens, history, evals, config, seqs) -> dict:
    import torch

    return {"model": student.state_dict(), "optim": optim.state_dict(), "sched": sched.state_dict(),
            "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(), "step": step, "tokens": tokens,
            "history": history, "evals": evals, "config": _config_key(config), "data": _digest(seqs)}


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
