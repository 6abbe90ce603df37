"""Student construction: drop whole blocks (depth) and MLP channels (width) of a teacher.

Which blocks to keep is measured on calibration text (never the held-out text):

- ``influence``: 1 − cosine similarity between a block's input and output hidden
  states, averaged over tokens ("block influence", ShortGPT). A block that barely
  turns the residual stream is cheap to drop.
- ``skip-loss``: the loss the student would start with if that one block alone were
  skipped (its output replaced by its input): the mean KL from the full model's
  next-token distribution. Slower (one pass per block), closer to what is lost.
- ``even``: evenly spaced blocks, first and last included: the baseline.

Width pruning (Minitron-style) keeps, in every layer, the MLP channels with the
largest mean activation ``|silu(gate(x))·up(x)|`` at the input of ``down_proj``; the
kept count is a multiple of 32 so that int4 blocks still tile ``down_proj``. Head
pruning keeps, in every layer, the query heads whose attention output (their slice of
the input of ``o_proj``) has the largest mean L2 norm; the same number in every
key/value group, so grouped-query attention still maps each query head to its own
key/value head, and the key/value heads all stay.

The student starts from the teacher's weights: kept blocks, embeddings, final norm
and LM head are copied bit for bit; width-pruned projections are row/column slices.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from jishi.errors import JishiError

METHODS = ("influence", "skip-loss", "even")
WIDTH_MULTIPLE = 32


@dataclass(frozen=True)
class StudentPlan:
    layers: tuple[int, ...]  # teacher block indices kept, ascending
    method: str
    importance: tuple[float, ...] | None  # per teacher block, for the record
    intermediate_size: int | None = None  # new MLP width, None = unchanged
    channels: tuple[tuple[int, ...], ...] | None = field(default=None, repr=False)  # per kept layer
    num_heads: int | None = None  # query heads kept per layer, None = unchanged
    heads: tuple[tuple[int, ...], ...] | None = field(default=None, repr=False)  # per kept layer, teacher head indices

    def as_dict(self) -> dict:
        return {"layers": list(self.layers), "method": self.method,
                "importance": [round(v, 6) for v in self.importance] if self.importance else None,
                "intermediate_size": self.intermediate_size, "num_heads": self.num_heads}

    def selections(self) -> dict:
        """The kept channels and heads (for a checkpointed plan)."""
        return {"channels": [list(c) for c in self.channels] if self.channels else None,
                "heads": [list(h) for h in self.heads] if self.heads else None}

    @classmethod
    def from_dict(cls, d: dict) -> "StudentPlan":
        tup = lambda rows: tuple(tuple(r) for r in rows) if rows else None
        return cls(tuple(d["layers"]), d["method"], tuple(d["importance"]) if d.get("importance") else None,
                   d.get("intermediate_size"), tup(d.get("channels")), d.get("num_heads"), tup(d.get("heads")))


def _layers(model):
    return model.model.layers


def _hidden_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _output_of(out):
    return out[0] if isinstance(out, tuple) else out


def _run_hooked(model, batches, hooks) -> int:
    """Run the model over ``batches`` with ``hooks`` in place (removed after); the tokens seen."""
    import torch

    count = 0
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
                count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return count


def block_influence(model, batches) -> list[float]:
    """Mean over tokens of 1 − cos(input, output) of every block, on ``batches`` (LongTensors)."""
    import torch

    n = len(_layers(model))
    sums = [0.0] * n

    def hook(i):
        def fn(module, args, kwargs, out):
            x, y = _hidden_of(args, kwargs).float(), _output_of(out).float()
            sums[i] += float((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum())
        return fn

    count = _run_hooked(model, batches, [layer.register_forward_hook(hook(i), with_kwargs=True)
                                         for i, layer in enumerate(_layers(model))])
    return [s / count for s in sums]


def _logprobs(model, batches) -> list:
    import torch

    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1) for ids in batches]


def skip_loss_importance(model, batches) -> list[float]:
    """For each block, the distillation loss it would cost alone: the mean per-token KL from the
    full model's next-token distribution to that of the model with the block skipped. It is
    never negative (unlike the change of cross-entropy, which skipping a block of an untrained
    or over-fitted model can lower) and zero exactly for a block that changes nothing."""

    full = _logprobs(model, batches)
    tokens = sum(ids.numel() for ids in batches)
    out = []
    for layer in _layers(model):
        def skip(module, args, kwargs, result):
            x = _hidden_of(args, kwargs)
            return (x,) + tuple(result[1:]) if isinstance(result, tuple) else x

        h = layer.register_forward_hook(skip, with_kwargs=True)
        try:
            skipped = _logprobs(model, batches)
        finally:
            h.remove()
        kl = sum(float((f.exp() * (f - s)).sum()) for f, s in zip(full, skipped))
        out.append(max(kl, 0.0) / tokens)
    return out


def even_layers(total: int, keep: int) -> list[int]:
    """``keep`` evenly spaced indices of ``range(total)``, the first and the last included."""
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def select_layers(importance: list[float], keep: int) -> list[int]:
    """The ``keep`` most important blocks, in model order (ties: the earlier block)."""
    order = sorted(range(len(importance)), key=lambda i: (-importance[i], i))
    return sorted(order[:keep])


def layers_to_keep(total: int, layers: int | None = None, keep_ratio: float | None = None) -> int:
    if (layers is None) == (keep_ratio is None):
        raise JishiError("give either a number of layers to keep or a keep ratio, not both")
    if keep_ratio is not None:
        if not 0 < keep_ratio <= 1:
            raise JishiError(f"the keep ratio must be in (0, 1], got {keep_ratio}")
        layers = max(1, round(total * keep_ratio))
    if not 1 <= layers <= total:
        raise JishiError(f"cannot keep {layers} layers of a teacher with {total}; choose 1 to {total}")
    return layers


def width_importance(model, batches, mlp: bool = True, heads: bool = False) -> tuple[list | None, list | None]:
    """One pass over ``batches``: per layer, the mean |input of down_proj| of every MLP channel
    (float tensor, intermediate size) and the mean L2 norm of every query head's attention
    output (float tensor, heads); None for what is not asked."""
    hd = _head_dim(model.config)
    n = len(_layers(model))
    acc = {"mlp": [None] * n, "heads": [None] * n}

    def hook(kind, i):
        def fn(module, args):
            x = args[0].detach().float()
            if kind == "mlp":
                a = x.abs().reshape(-1, x.shape[-1]).sum(0)
            else:
                a = x.reshape(-1, x.shape[-1] // hd, hd).norm(dim=-1).sum(0)
            acc[kind][i] = a if acc[kind][i] is None else acc[kind][i] + a
        return fn

    hooks = []
    for i, layer in enumerate(_layers(model)):
        if mlp:
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook("mlp", i)))
        if heads:
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(hook("heads", i)))
    count = _run_hooked(model, batches, hooks)
    out = [[a / count for a in acc[k]] if want else None for k, want in (("mlp", mlp), ("heads", heads))]
    return out[0], out[1]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def heads_for(heads: int, kv_heads: int, ratio: float) -> int:
    """Query heads kept for ``ratio``: the same whole number in each key/value group, at least one."""
    if not 0 < ratio <= 1:
        raise JishiError(f"the head ratio must be in (0, 1], got {ratio}")
    group = heads // kv_heads
    return kv_heads * max(1, min(group, round(group * ratio)))


def pick_heads(scores, heads: int, kv_heads: int, keep: int) -> tuple[int, ...]:
    """The ``keep`` query heads to keep: the strongest ``keep / kv_heads`` of each group, in order."""
    group, per = heads // kv_heads, keep // kv_heads
    out = []
    for g in range(kv_heads):
        members = list(range(g * group, (g + 1) * group))
        out += sorted(sorted(members, key=lambda h: (-float(scores[h]), h))[:per])
    return tuple(out)


def width_for(intermediate: int, ratio: float) -> int:
    if not 0 < ratio <= 1:
        raise JishiError(f"the width ratio must be in (0, 1], got {ratio}")
    if ratio == 1:
        return intermediate
    width = max(WIDTH_MULTIPLE, int(round(intermediate * ratio / WIDTH_MULTIPLE)) * WIDTH_MULTIPLE)
    return min(width, intermediate)


def plan_student(model, batches, layers: int | None = None, keep_ratio: float | None = None,
                 width_ratio: float | None = None, method: str = "influence",
                 head_ratio: float | None = None) -> StudentPlan:
    """Measure on ``batches`` and choose the blocks (and MLP channels, and query heads) the student keeps."""
    if method not in METHODS:
        raise JishiError(f"unknown layer selection {method!r}; choose one of {', '.join(METHODS)}")
    total = len(_layers(model))
    keep = layers_to_keep(total, layers, keep_ratio)
    if method == "even":
        chosen, importance = even_layers(total, keep), None
    else:
        importance = block_influence(model, batches) if method == "influence" else skip_loss_importance(model, batches)
        chosen = select_layers(importance, keep)
    cfg = model.config
    width = cfg.intermediate_size if width_ratio is None else width_for(cfg.intermediate_size, width_ratio)
    nh, nkv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    keep_heads = nh if head_ratio is None else heads_for(nh, nkv, head_ratio)
    channels = heads = None
    if width < cfg.intermediate_size or keep_heads < nh:
        mlp_scores, head_scores = width_importance(model, batches, mlp=width < cfg.intermediate_size, heads=keep_heads < nh)
        if mlp_scores:
            channels = tuple(tuple(sorted(int(c) for c in mlp_scores[i].argsort(descending=True)[:width].tolist()))
                             for i in chosen)
        if head_scores:
            heads = tuple(pick_heads(head_scores[i], nh, nkv, keep_heads) for i in chosen)
    return StudentPlan(tuple(chosen), method, tuple(importance) if importance else None,
                       width if channels else None, channels, keep_heads if heads else None, heads)


def build_student(teacher, plan: StudentPlan):
    """A new model of the teacher's class with the plan's blocks (and channels), weights copied."""
    import torch

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(plan.layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in plan.layers]
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, len(plan.layers))
    if plan.intermediate_size:
        config.intermediate_size = plan.intermediate_size
    hd = _head_dim(teacher.config)
    if plan.num_heads:
        config.head_dim = hd  # no longer hidden size / heads
        config.num_attention_heads = plan.num_heads
    try:  # the student's config must read back as it will be saved (e.g. Phi-3 checks longrope factors
        type(config).from_dict(config.to_dict())  # against hidden size / heads, not head_dim)
    except ValueError as e:
        raise JishiError(f"the student's configuration would not load again ({e}); this model cannot lose query "
                         "heads: prune layers or MLP width only") from None
    torch.manual_seed(0)  # the fresh weights are all overwritten; keep construction deterministic anyway
    student = type(teacher)(config).to(torch.float32)
    source = teacher.state_dict()
    target = {}
    for key in student.state_dict():
        if key.startswith("model.layers."):
            _, _, j, rest = key.split(".", 3)
            j = int(j)
            value = source[f"model.layers.{plan.layers[j]}.{rest}"]
            if plan.channels is not None and rest.startswith("mlp."):
                idx = torch.tensor(plan.channels[j], dtype=torch.long)
                if rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                    value = value.index_select(0, idx)
                elif rest.startswith("mlp.gate_up_proj."):  # fused (Phi-3): gate rows, then up rows
                    value = value.index_select(0, torch.cat([idx, idx + teacher.config.intermediate_size]))
                elif rest == "mlp.down_proj.weight":
                    value = value.index_select(1, idx)
            if plan.heads is not None and rest.startswith(("self_attn.q_proj.", "self_attn.o_proj.", "self_attn.qkv_proj.")):
                rows = torch.tensor([h * hd + d for h in plan.heads[j] for d in range(hd)], dtype=torch.long)
                if rest.startswith("self_attn.qkv_proj."):  # fused (Phi-3): the kept query heads, every k and v row
                    q_rows = teacher.config.num_attention_heads * hd
                    rows = torch.cat([rows, torch.arange(q_rows, value.shape[0])])
                value = value.index_select(1 if rest == "self_attn.o_proj.weight" else 0, rows)
            target[key] = value
        else:
            target[key] = source[key]
    student.load_state_dict(target, strict=True)
    if student.config.tie_word_embeddings:
        student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    student.eval()
    return student


def calibration_batches(tokenizer, count: int = 4, seq_len: int = 256, offset: int = 0, text: str | None = None):
    """``count`` sequences of ``seq_len`` tokens of the calibration text (default: the text after the held-out
    part, ``jishi.heldout.calibration_text``), after skipping ``offset`` sequences. A text too short for them
    is a JishiError that says what to change."""
    import torch

    from jishi.heldout import calibration_text

    given = text is not None
    text = calibration_text() if text is None else text
    # Tokenize only what is needed: about 4 characters per token, with a margin.
    need = (offset + count) * seq_len
    chars = max(4 * need, 20_000)
    ids = tokenizer.encode(text[:chars], bos=False)
    while len(ids) < need and chars < len(text):
        chars *= 2
        ids = tokenizer.encode(text[:chars], bos=False)
    if count < 1 or seq_len < 1:
        raise JishiError(f"calibration needs at least one sequence of at least one token (asked for {count} of {seq_len})")
    if len(ids) < need:
        have = max(len(ids) - offset * seq_len, 0)
        raise JishiError(
            f"the calibration text has {have} tokens, fewer than the {count} sequences of {seq_len} tokens "
            f"({count * seq_len} tokens) calibration needs: "
            + ("give a longer calibration file (--calibration FILE) or ask for fewer sequences (--calibration-sequences N)"
               if given else "ask for fewer or shorter calibration sequences"))
    return [torch.tensor([ids[i * seq_len:(i + 1) * seq_len]]) for i in range(offset, offset + count)]


def describe_plan(plan: StudentPlan, total: int) -> str:
    dropped = [i for i in range(total) if i not in plan.layers]
    text = f"keep {len(plan.layers)} of {total} blocks ({plan.method}): drop {dropped}"
    if plan.intermediate_size:
        text += f"; MLP width {plan.intermediate_size}"
    if plan.num_heads:
        text += f"; {plan.num_heads} query heads"
    return text


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)

