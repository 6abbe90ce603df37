"""Distillation data: the user's text files, or text the teacher writes itself.

``--data`` takes plain text files (each one document) and JSON lines files whose
records hold a ``text`` string or chat ``messages`` (rendered with the chat
template the runtime uses). That text is real, so cross-entropy on it is used
besides the KL to the teacher.

Without ``--data`` the teacher answers a built-in set of prompts (greedy for
some, sampled for the others), so the default needs no file and no network. The
generations are cached on disk by the teacher's hash and the settings, so a
second run (or a resume) reads them back. Only KL is trained on them: their
tokens are the teacher's own, so cross-entropy on them adds nothing.

Nothing here may overlap the held-out text (the first 20,000 characters of
``pydoc_data.topics``): data files are checked for long passages of it, and the
calibration text leaves out the lines it shares with it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from jishi.errors import JishiError

PROMPTS = (
    "Explain how plants make food from sunlight.",
    "Give three tips for storing grain so that it stays dry.",
    "Write a short story about a girl who finds a lost goat.",
    "What is the difference between weather and climate?",
    "How do I keep chickens healthy in hot weather?",
    "Explain fractions to a ten-year-old with an example.",
    "Write a polite email asking a supplier to deliver seeds next week.",
    "Why do we need to wash our hands before eating?",
    "Describe the water cycle in simple words.",
    "List five things a classroom needs at the start of the year.",
    "How does a solar panel produce electricity?",
    "Write a Python function that returns the largest number in a list.",
    "What should I do if my laptop battery drains quickly?",
    "Summarise the causes of soil erosion and how to prevent it.",
    "Explain what a noun and a verb are, with examples.",
    "Give a simple recipe for vegetable soup.",
    "How can a small farm save water during a dry season?",
    "What is photosynthesis? Answer in two sentences.",
    "Write a poem about the rain on a tin roof.",
    "Explain why the sky is blue.",
    "How do vaccines help the body fight disease?",
    "Give advice to a student who is nervous before an exam.",
    "What are the main parts of a computer and what do they do?",
    "Explain how to calculate the area of a rectangle.",
    "Describe a healthy breakfast and why it matters.",
    "How do bees help farmers?",
    "Write instructions for planting maize seeds.",
    "What is the difference between a virus and bacteria?",
    "Explain what a spreadsheet is used for.",
    "Tell me about the history of writing in a few sentences.",
    "How can I fix a bicycle chain that keeps slipping?",
    "Explain the rules of a simple game children can play outside.",
    "What is electricity? Explain it to a beginner.",
    "Give three ways to reduce waste at school.",
    "Write a short dialogue between a shopkeeper and a customer.",
    "How do I know when fruit is ripe?",
    "Explain what percent means with an example.",
    "What causes thunder and lightning?",
    "How should medicines be stored at home?",
    "Write a thank-you note to a teacher.",
    "Explain how a map shows distances.",
    "What do cows need to produce good milk?",
    "Describe how to make compost from kitchen scraps.",
    "Why is reading every day good for children?",
    "How does the heart pump blood around the body?",
    "Explain what an ecosystem is.",
    "What are good habits for keeping a computer safe from viruses?",
    "Write a short speech for the opening of a village library.",
)
SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class Document:
    ids: list[int]
    real: bool  # written by people (cross-entropy applies), not by the teacher



def json_lines(text: str, name: str):
    """(line number, record) for each non-blank line of a JSONL text; a bad line is named."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise JishiError(f"{name}, line {n}: not JSON ({e.msg})") from None

def read_documents(files, tokenizer) -> list[Document]:
    """Token ids of every document in ``files`` (plain text or JSON lines)."""
    docs: list[Document] = []
    for f in files:
        path = Path(f)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise JishiError(f"cannot read the distillation data {path}: {e}") from None
        check_disjoint_from_heldout(text, path.name)
        if path.suffix in (".jsonl", ".json"):
            for n, rec in json_lines(text, path.name):
                if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    ids = tokenizer.encode(rec["text"], bos=False)
                elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                    msgs = rec["messages"]
                    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                               for m in msgs):
                        raise JishiError(f"{path.name}, line {n}: each message needs string \"role\" and \"content\"")
                    ids = tokenizer.encode(tokenizer.apply_chat_template(msgs, add_generation_prompt=False), bos=False)
                else:
                    raise JishiError(f"{path.name}, line {n}: a record needs \"text\" (a string) or \"messages\" (a list)")
                docs.append(Document(ids, True))
        else:
            docs.append(Document(tokenizer.encode(text, bos=False), True))
    if not docs or not any(d.ids for d in docs):
        raise JishiError(f"the distillation data ({', '.join(str(f) for f in files)}) holds no text")
    return docs


@functools.lru_cache(maxsize=1)
def _heldout_probes(probe: int = 80) -> tuple[str, ...]:
    """Passages of the held-out text, less any the calibration text still holds.

    The calibration text leaves out the lines it shares with the held-out text (see
    ``jishi.heldout``), so this is every 80-character passage but boilerplate that
    pydoc_data.topics repeats in pieces shorter than a line.
    """
    from jishi.heldout import calibration_text, heldout_text

    held, calib = heldout_text(), calibration_text()
    pieces = (held[s:s + probe] for s in range(0, len(held) - probe, probe))
    return tuple(p for p in pieces if p.strip() and p not in calib)


def check_disjoint_from_heldout(text: str, where: str, allowed: int = 2) -> None:
    """Refuse data that holds passages found only in the held-out text: figures on it would be meaningless."""
    hits = sum(1 for p in _heldout_probes() if p in text)
    if hits > allowed:
        raise JishiError(f"{where} contains the held-out evaluation text (pydoc_data.topics, first 20,000 "
                         f"characters; {hits} passages of it): remove those passages; the text jishi calibrates on, "
                         f"jishi.heldout.calibration_text(), is free of them")


def teacher_documents(loaded, count: int | None = None, max_new_tokens: int = 192, batch: int = 8,
                      cache: Path | None = None, quiet: bool = False, seed: int = 0) -> list[Document]:
    """The teacher's answers to the built-in prompts, as whole chat transcripts, cached on disk.

    Even-numbered prompts are answered greedily, odd ones sampled (temperature 0.8, top-p 0.95).
    """
    prompts = list(PROMPTS[:count] if count else PROMPTS)
    key = hashlib.sha256(json.dumps([loaded.source_sha256 or loaded.source, prompts, max_new_tokens, seed, SYSTEM]).encode())
    cache = Path(cache) if cache else _default_cache() / f"teacher-{key.hexdigest()[:20]}.jsonl"
    tok = loaded.runtime_tokenizer()
    if cache.is_file():
        answers = [json.loads(line)["answer"] for line in cache.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(answers) == len(prompts):
            return [_transcript(tok, p, a) for p, a in zip(prompts, answers)]
    answers = _generate(loaded, prompts, max_new_tokens, batch, quiet, seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for p, a in zip(prompts, answers):
            f.write(json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, cache)
    return [_transcript(tok, p, a) for p, a in zip(prompts, answers)]


def _default_cache() -> Path:
    from jishi.distill.base import cache_dir

    return cache_dir() / "distill-data"


def _transcript(tok, prompt: str, answer: str) -> Document:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer}]
    if tok.info.chat_template:
        return Document(tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False), bos=False), False)
    return Document(tok.encode(prompt + "\n" + answer, bos=False), False)


def _generate(loaded, prompts, max_new_tokens, batch, quiet, seed) -> list[str]:
    import torch
    from tqdm import tqdm

    tok = loaded.runtime_tokenizer()
    model = loaded.model
    pad = loaded.tokenizer.pad_token_id
    if pad is None:
        pad = loaded.eos_token_ids[0] if loaded.eos_token_ids else 0
    eos = set(loaded.eos_token_ids)
    answers = [""] * len(prompts)
    gen = torch.Generator().manual_seed(seed)
    with tqdm(total=len(prompts), desc="Teacher writing distillation text", unit="answer", disable=quiet, file=sys.stderr) as bar:
        for start in range(0, len(prompts), batch):
            group = list(range(start, min(start + batch, len(prompts))))
            encoded = []
            for i in group:
                msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompts[i]}]
                text = tok.apply_chat_template(msgs, add_generation_prompt=True) if tok.info.chat_template else prompts[i] + "\n"
                encoded.append(tok.encode(text))
            width = max(len(e) for e in encoded)
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for r, e in enumerate(encoded):  # left padding: every row ends where generation starts
                ids[r, width - len(e):] = torch.tensor(e)
                mask[r, width - len(e):] = 1
            out = [[] for _ in group]
            done = [False] * len(group)
            sampled = torch.tensor([i % 2 == 1 for i in group])
            with torch.no_grad():
                position = (mask.cumsum(-1) - 1).clamp(min=0)
                res = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
                past = res.past_key_values
                logits = res.logits[:, -1].float()
                for _ in range(max_new_tokens):
                    nxt = _pick(logits, sampled, gen)
                    for r, t in enumerate(nxt.tolist()):
                        if not done[r]:
                            if t in eos:
                                done[r] = True
                            else:
                                out[r].append(t)
                    if all(done):
                        break
                    mask = torch.cat([mask, torch.ones((len(group), 1), dtype=torch.long)], dim=1)
                    position = position[:, -1:] + 1
                    res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=position,
                                past_key_values=past, use_cache=True)
                    past = res.past_key_values
                    logits = res.logits[:, -1].float()
            for r, i in enumerate(group):
                answers[i] = tok.decode(out[r]).strip()
            bar.update(len(group))
    return answers


def _pick(logits, sampled, gen):
    import torch

    greedy = logits.argmax(-1)
    probs = torch.softmax(logits / 0.8, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < 0.95
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)[:, 0]
    drawn = order.gather(1, choice[:, None])[:, 0]
    return torch.where(sampled, drawn, greedy)


def chunk(docs: list[Document], seq_len: int, sep: int | None) -> tuple[list[list[int]], list[bool]]:
    """Fixed-length training sequences: each kind (real, generated) packed end to end, separated by
    ``sep``; the last partial sequence of a kind is dropped (or, if it is the only one, padded by
    repetition, so that a tiny data file still trains)."""
    seqs: list[list[int]] = []
    real: list[bool] = []
    for kind in (True, False):
        stream: list[int] = []
        for d in docs:
            if d.real == kind and d.ids:
                stream += d.ids + ([sep] if sep is not None else [])
        if not stream:
            continue
        if len(stream) < seq_len:
            stream = (stream * (seq_len // len(stream) + 1))[:seq_len]
        for i in range(0, len(stream) - seq_len + 1, seq_len):
            seqs.append(stream[i:i + seq_len])
            real.append(kind)
    if not seqs:
        raise JishiError("no training sequence could be made from the data")
    return seqs, real
