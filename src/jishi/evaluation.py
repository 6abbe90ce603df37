"""``jishi eval``: models measured against a teacher on the same token windows, side by side.

A model is a bundle (run by the runtime, as it will be served) or a Hugging Face
directory / GGUF file / known base (run in torch, float32). For each: perplexity,
top-1 agreement and mean KL(teacher ‖ model) per token, non-embedding parameters,
size on disk and decode speed (greedy, one sequence, this machine's threads).

The text is the held-out text (pydoc_data.topics, first 20,000 characters) unless a
file is given; windows of ``window`` tokens, no BOS, the last partial one dropped.
The teacher runs once per window and every model is compared on its logits.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jishi.errors import JishiError


@dataclass
class Scored:
    label: str
    kind: str  # bundle | torch
    quant: str
    layers: int
    non_embedding_params: int
    size_bytes: int
    perplexity: float
    top1_agreement: float
    kl: float
    decode_tok_s: float | None

    def as_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - (np.log(np.exp(x - m).sum(-1, keepdims=True)) + m)


def _params_of(layers, hidden, heads, kv, hd, inter) -> int:
    per = hidden * heads * hd * 2 + hidden * kv * hd * 2 + 3 * hidden * inter + 2 * hidden
    return layers * per + hidden


class _Bundle:
    def __init__(self, path: Path, threads):
        from jishi.runtime.model import load

        self.model = load(path, threads=threads)
        m = self.model.manifest
        c = m.config
        self.label = path.name
        self.kind, self.quant = "bundle", m.graph.quantization.get("name", "?")
        if self.quant == "int4" and m.graph.quantization.get("method"):
            self.quant += "-" + m.graph.quantization["method"]
        self.layers = c.num_layers
        self.params = _params_of(c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size)
        self.size = self.model.bundle.size if hasattr(self.model, "bundle") else sum(f.size for f in m.files.values())
        self.vocab = c.vocab_size
        self.context = self.model.context

    def tokenizer(self):
        return self.model.tokenizer

    def logits(self, ids: list[int]) -> np.ndarray:
        self.model.engine.reset()
        return self.model.engine.feed(ids, all_logits=True)

    def decode_speed(self, prompt_ids: list[int], n: int) -> float:
        text = self.model.tokenizer.decode(prompt_ids)
        stream = self.model.stream(text, max_new_tokens=n, temperature=0)
        first = None
        count = 0
        for _ in stream:
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        done = stream.result.completion_tokens if getattr(stream, "result", None) else count
        return (done - 1) / (end - first) if first and done > 1 else float("nan")


class _Torch:
    def __init__(self, spec: str, loaded=None):
        from jishi.distill.base import load_base
        from jishi.distill.prune import non_embedding_params

        self.loaded = loaded or load_base(spec)
        self.model = self.loaded.model
        cfg = self.model.config
        self.label = Path(str(spec)).name
        self.kind, self.quant = "torch", "fp32"
        self.layers = cfg.num_hidden_layers
        self.params = non_embedding_params(self.model)
        src = Path(self.loaded.source)
        self.size = src.stat().st_size if src.is_file() else sum(p.stat().st_size for p in src.glob("*.safetensors"))
        self.vocab = cfg.vocab_size
        self.context = getattr(cfg, "max_position_embeddings", 2048)

    def tokenizer(self):
        return self.loaded.runtime_tokenizer()

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()

    def decode_speed(self, prompt_ids: list[int], n: int) -> float:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
            past, nxt = out.past_key_values, out.logits[0, -1].argmax()
            t0 = time.perf_counter()
            for _ in range(n - 1):
                out = self.model(input_ids=nxt.view(1, 1), past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[0, -1].argmax()
            return (n - 1) / (time.perf_counter() - t0)


def open_model(spec: str, threads=None):
    path = Path(spec)
    if (path / "manifest.json").is_file():
        return _Bundle(path, threads)
    if path.exists():
        return _Torch(spec)
    from jishi.distill.base import KNOWN_BASES

    if spec.lower() in KNOWN_BASES:
        return _Torch(spec)
    from jishi.runtime.model import resolve_bundle

    return _Bundle(resolve_bundle(spec), threads)  # an installed model's name, or an error that says so


def default_teacher(spec: str) -> str | None:
    """The teacher a student (directory or bundle) was distilled from, if it can be found here."""
    from jishi.distill.base import KNOWN_BASES

    path = Path(spec)
    rec = None
    if (path / "jishi_distill.json").is_file():
        rec = json.loads((path / "jishi_distill.json").read_text()).get("teacher")
    elif (path / "manifest.json").is_file():
        prov = json.loads((path / "manifest.json").read_text()).get("provenance", {})
        rec = (prov.get("distilled") or {}).get("teacher") or {"name": prov.get("base")}
    if not rec:
        return None
    if rec.get("path") and Path(rec["path"]).exists():
        return rec["path"]
    if rec.get("name") in KNOWN_BASES:
        return rec["name"]
    return None


def evaluate_models(specs: list[str], teacher: str | None = None, text: str | None = None, window: int = 512,
                    max_windows: int | None = None, decode_tokens: int = 64, threads=None, quiet: bool = False,
                    teacher_loaded=None) -> tuple[list[Scored], dict]:
    """Score every model in ``specs`` against ``teacher`` on ``text`` (default: the held-out text)."""
    from tqdm import tqdm

    from jishi.heldout import heldout_text, windows

    if not specs:
        raise JishiError("name at least one bundle or model directory to evaluate")
    if teacher_loaded is None:
        teacher = teacher or default_teacher(specs[0])
        if teacher is None:
            raise JishiError(f"cannot tell which teacher {specs[0]} was distilled from; pass --teacher BASE")
        t = _Torch(teacher)
    else:
        t = _Torch(teacher or teacher_loaded.source, loaded=teacher_loaded)
    models = [open_model(s, threads) for s in specs]
    tok = t.loaded.runtime_tokenizer()
    probe = heldout_text()[:2000]
    for m in models:
        why = None
        if m.vocab != t.vocab:
            why = f"a vocabulary of {m.vocab:,} tokens against {t.vocab:,}"
        elif m.tokenizer().encode(probe, bos=False) != tok.encode(probe, bos=False):
            why = "other token ids for the same text"
        if why:
            raise JishiError(f"{m.label} does not share the teacher {t.label}'s tokenizer ({why}), so the two cannot be "
                             "compared token by token: pass the model it was distilled from as --teacher, or compare "
                             "it with models of its own tokenizer")
    ids = tok.encode(heldout_text() if text is None else text, bos=False)
    size = min([window] + [m.context for m in models])
    wins = windows(ids, size)[:max_windows]
    if not wins:
        raise JishiError(f"the text has {len(ids)} tokens, fewer than one window of {size}")
    nll = np.zeros(len(models))
    agree = np.zeros(len(models))
    kl = np.zeros(len(models))
    teacher_nll, n = 0.0, 0
    with tqdm(total=len(wins) * (1 + len(models)), desc="Evaluating", disable=quiet, file=sys.stderr) as bar:
        for w in wins:
            tl = _log_softmax(t.logits(w))
            bar.update(1)
            tp, top = np.exp(tl), tl.argmax(-1)
            target = np.array(w[1:])
            teacher_nll -= tl[np.arange(len(w) - 1), target].sum()
            for j, m in enumerate(models):
                ml = _log_softmax(m.logits(w))
                nll[j] -= ml[np.arange(len(w) - 1), target].sum()
                agree[j] += float((ml.argmax(-1) == top).sum())
                kl[j] += float((tp * (tl - ml)).sum())
                bar.update(1)
            n += len(w)
    prompt = tok.encode("Once upon a time, in a village by the river,", bos=False)
    rows = []
    for j, m in enumerate(models):
        speed = m.decode_speed(prompt, decode_tokens) if decode_tokens > 1 else None
        rows.append(Scored(m.label, m.kind, m.quant, m.layers, m.params, m.size,
                           float(np.exp(nll[j] / (n - len(wins)))), agree[j] / n, kl[j] / n, speed))
    info = {"teacher": t.label, "teacher_perplexity": float(np.exp(teacher_nll / (n - len(wins)))),
            "windows": len(wins), "window": size,
            "text": "held-out (pydoc_data.topics, first 20000 characters)" if text is None else "given file"}
    return rows, info


def table(rows: list[Scored]) -> str:
    heads = ["model", "run by", "weights", "layers", "non-emb params", "size MB", "perplexity", "top-1 vs teacher",
             "KL vs teacher", "decode tok/s"]
    body = [[r.label, r.kind, r.quant, str(r.layers), f"{r.non_embedding_params / 1e6:.1f}M", f"{r.size_bytes / 1e6:.1f}",
             f"{r.perplexity:.2f}", f"{100 * r.top1_agreement:.1f}%", f"{r.kl:.4f}",
             "-" if r.decode_tok_s is None else f"{r.decode_tok_s:.0f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(b) for b in body])
