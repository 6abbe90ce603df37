"""LoRA fine-tuning of a base (or student) model on chat records, saved as a PEFT adapter.

Records are JSON lines: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (at least
one assistant turn) or ``{"prompt": ..., "response": ...}``. Each record is rendered by the
same chat template, through the same tokenizer, as the runtime renders a conversation, so
the adapter learns exactly the prompt it will be served with. The loss is on the
assistant's turns only (their text and the end-of-turn token), never on the prompt.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jishi.errors import AdapterError, BaseModelError, JishiError
from jishi.runtime.store import swap_in

TARGET_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                  "down": "down_proj"}
INFO_FILE = "jishi_adapter.json"  # what jishi records beside the PEFT files: base hash, data, evaluation


@dataclass
class FinetuneConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = tuple(TARGET_MODULES)
    epochs: float = 2.0
    learning_rate: float = 2e-4
    batch_size: int = 8
    max_length: int = 256
    dropout: float = 0.05
    heldout: float = 0.1  # fraction of the records kept out of training to evaluate on
    warmup: float = 0.06  # fraction of the steps with a rising learning rate
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        bad = [t for t in self.targets if t not in TARGET_MODULES]
        if bad:
            raise JishiError(f"unknown LoRA target {', '.join(bad)}; choose from {', '.join(TARGET_MODULES)}")
        if self.rank < 1 or self.alpha <= 0 or self.epochs <= 0 or self.batch_size < 1 or self.max_length < 16:
            raise JishiError("rank, alpha, epochs and batch size must be positive and max length at least 16")
        if not 0 <= self.heldout < 1:
            raise JishiError(f"heldout must be a fraction in [0, 1), got {self.heldout}")


def read_records(path: str | Path) -> list[list[dict]]:
    """Chat records of a JSONL file, each as a list of messages; errors name the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JishiError(f"cannot read the training data {path}: {e}") from None
    from jishi.distill.data import json_lines

    records = []
    for n, rec in json_lines(text, path.name):
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            messages = rec["messages"]
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
            messages = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
        else:
            raise JishiError(f"{path.name}, line {n}: a record needs \"messages\" (a list) or \"prompt\" and \"response\" (strings)")
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise JishiError(f"{path.name}, line {n}: each message needs string \"role\" and \"content\"")
        if not any(m["role"] == "assistant" for m in messages):
            raise JishiError(f"{path.name}, line {n}: the record has no assistant message to learn from")
        records.append(messages)
    if not records:
        raise JishiError(f"{path} holds no records")
    return records


def encode_record(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether the loss counts it.

    The text is cut at each assistant turn's boundaries and each piece is encoded on its
    own: the prompt pieces are then token for token what the runtime feeds, and the
    answer is what it should generate after them.
    """
    ids: list[int] = []
    train: list[bool] = []
    done = ""
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:j], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:j + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not upto.startswith(prompt):
            raise JishiError("the chat template does not render conversations as growing prefixes; "
                             "cannot tell the assistant's part apart")
        head = tokenizer.encode(prompt.after(len(done)), bos=False)
        answer = tokenizer.encode(upto.after(len(prompt)), bos=False)
        ids += head + answer
        train += [False] * len(head) + [True] * len(answer)
        done = upto
    return ids[:max_length], train[:max_length]


@dataclass
class FinetuneResult:
    output: Path
    train_records: int
    heldout_records: int
    steps: int
    tokens: int
    seconds: float
    heldout_loss_before: float | None
    heldout_loss_after: float | None
    history: list[dict] = field(default_factory=list)


def _batches(examples, batch_size: int, rng: random.Random):
    order = list(range(len(examples)))
    rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield [examples[k] for k in order[i:i + batch_size]]


def _collate(batch, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (x, train) in enumerate(batch):
        ids[row, :len(x)] = torch.tensor(x)
        mask[row, :len(x)] = 1
        t = torch.tensor(x)
        t[~torch.tensor(train)] = -100
        labels[row, :len(x)] = t
    return ids, mask, labels


def _loss(peft_model, ids, mask, labels):
    """Mean next-token NLL over the trained positions; the LM head runs only on those rows."""
    import torch

    causal = peft_model.get_base_model()
    hidden = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = causal.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep], reduction="sum"), int(keep.sum())


def evaluate_loss(peft_model, examples, pad_id: int, batch_size: int = 8) -> float | None:
    """Mean NLL (nats per answer token) on held-out examples."""
    import torch

    if not examples:
        return None
    was_training = peft_model.training
    peft_model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            loss, n = _loss(peft_model, *_collate(examples[i:i + batch_size], pad_id))
            total, count = total + float(loss), count + n
    peft_model.train(was_training)
    return total / max(count, 1)


def finetune(base, data: str | Path, output: str | Path, name: str | None = None, config: FinetuneConfig | None = None,
             quiet: bool = False) -> FinetuneResult:
    """Train a LoRA adapter on ``data`` and save it (PEFT format plus jishi's record) to ``output``.

    ``base`` is anything ``load_base`` takes, or a ``LoadedBase`` (its model gains LoRA layers).
    Nothing is left at ``output`` unless the run completes.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from jishi.distill.base import LoadedBase, load_base, sha256_file

    config = config or FinetuneConfig()
    output = Path(output)
    name = name or output.name
    _check_output(output)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)

    records = read_records(data)
    loaded = base if isinstance(base, LoadedBase) else load_base(base)
    tok = loaded.runtime_tokenizer()
    examples = [encode_record(tok, r, config.max_length) for r in records]
    examples = [e for e in examples if any(e[1])]
    if not examples:
        raise JishiError(f"no record of {data} keeps an assistant token within {config.max_length} tokens; raise --max-length")
    rng.shuffle(examples)
    n_held = round(len(examples) * config.heldout) if len(examples) >= 10 else 0
    heldout, train = examples[:n_held], examples[n_held:]
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.eos_token_ids[0]

    from jishi.families import model_config, peft_modules

    try:  # a fused projection (Phi-3's qkv_proj, gate_up_proj) is one PEFT module for its targets
        modules = peft_modules(model_config(loaded.model.config, 16), config.targets)
    except BaseModelError as e:
        raise JishiError(f"--targets: {e}") from None
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
                      target_modules=modules, task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    per_epoch = math.ceil(len(train) / config.batch_size)
    steps = max(1, round(per_epoch * config.epochs))
    warm = max(1, round(steps * config.warmup))

    def lr_at(step: int) -> float:  # linear warm-up, then cosine down to a tenth
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    before = evaluate_loss(model, heldout, pad_id)
    say(f"{len(train)} training and {len(heldout)} held-out records; {steps} steps of {config.batch_size}"
        + (f"; held-out loss before: {before:.3f}" if before is not None else ""))

    history: list[dict] = []
    t0, tokens, step = time.time(), 0, 0
    model.train()
    with tqdm(total=steps, desc=f"Training {name}", unit="step", disable=quiet, file=sys.stderr) as bar:
        while step < steps:
            for batch in _batches(train, config.batch_size, rng):
                ids, mask, labels = _collate(batch, pad_id)
                loss_sum, n = _loss(model, ids, mask, labels)
                (loss_sum / max(n, 1)).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optim.step()
                sched.step()
                optim.zero_grad(set_to_none=True)
                step += 1
                tokens += int(mask.sum())
                loss = loss_sum.item() / max(n, 1)
                history.append({"step": step, "loss": round(loss, 4)})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / (time.time() - t0):.0f}")
                bar.update(1)
                if step >= steps:
                    break
    after = evaluate_loss(model, heldout, pad_id)
    seconds = time.time() - t0
    if after is not None:
        say(f"Held-out loss (nats per answer token): {before:.3f} before, {after:.3f} after")

    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        (staging / "README.md").unlink(missing_ok=True)  # peft's model-card template: nothing of ours
        cfg_path = staging / "adapter_config.json"
        peft_cfg = json.loads(cfg_path.read_text())
        peft_cfg["base_model_name_or_path"] = loaded.name
        cfg_path.write_text(json.dumps(peft_cfg, indent=2) + "\n")
        info = {
            "name": name,
            "base": loaded.name,
            "base_sha256": loaded.source_sha256,
            "data": {"file": Path(data).name, "sha256": sha256_file(Path(data)), "records": len(records)},
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if k != "threads"},
            "training": {"steps": steps, "tokens": tokens, "seconds": round(seconds, 1)},
            "heldout": {"records": len(heldout), "loss_before": _r(before), "loss_after": _r(after)},
        }
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        swap_in(staging, output)  # an older one goes only once this is in place
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return FinetuneResult(output, len(train), len(heldout), steps, tokens, seconds, before, after, history)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _check_output(output: Path) -> None:
    """Refuse to replace a directory that is not an adapter: it may hold someone's work."""
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / "adapter_config.json").is_file())):
        raise AdapterError(f"{output} exists and is not an adapter directory; choose another output")
