"""A small retrieval check for the embeddings: questions matched to passages of Python's docs.

Each question (written here, in other words than its passage) should find its own passage
(the first 800 characters of a `pydoc_data.topics` entry) among all 24 by cosine
similarity. Reported: top-1 and top-3 accuracy for the bundle's embeddings, for a
word-overlap baseline (TF-IDF cosine over lower-cased words), and chance.

    python bench/retrieval.py bundles/smollm2-135m-instruct-gguf [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

QUESTIONS = {
    "assert": "How do I check a condition while debugging and stop if it is false?",
    "break": "How can I leave a loop early?",
    "class": "How do I define my own type of object?",
    "continue": "How do I skip to the next round of a loop?",
    "del": "How do I remove a name or an item from a list?",
    "for": "How do I repeat something for every item of a sequence?",
    "global": "How can a function change a variable at module level?",
    "if": "How do I run code only when a condition holds?",
    "import": "How do I use code from another module?",
    "lambda": "How do I write a small anonymous function in one expression?",
    "nonlocal": "How does a nested function rebind a variable of the enclosing function?",
    "pass": "What statement does nothing, as a placeholder?",
    "raise": "How do I signal an error myself?",
    "return": "How does a function hand a value back to its caller?",
    "try": "How do I handle an error so the program keeps going?",
    "while": "How do I repeat code as long as a condition is true?",
    "with": "How do I make sure a file is closed after I use it?",
    "function": "How do I define a function with parameters?",
    "numbers": "How are integer and floating point literals written?",
    "strings": "How do I write text in quotes, with escapes?",
    "slicings": "How do I take part of a sequence, from one index to another?",
    "comparisons": "How do I test whether one value is less than another?",
    "booleans": "How do and, or and not work?",
    "lists": "How do I write a list in square brackets?",
}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def tfidf(docs: list[str], queries: list[str]) -> np.ndarray:
    vocab = sorted({w for d in docs for w in words(d)})
    index = {w: i for i, w in enumerate(vocab)}
    df = Counter(w for d in docs for w in set(words(d)))
    idf = np.array([math.log((1 + len(docs)) / (1 + df[w])) + 1 for w in vocab])

    def vec(text):
        v = np.zeros(len(vocab))
        for w, c in Counter(words(text)).items():
            if w in index:
                v[index[w]] = c
        v *= idf
        return v / max(np.linalg.norm(v), 1e-12)

    return np.array([vec(q) for q in queries]) @ np.array([vec(d) for d in docs]).T


def accuracy(sim: np.ndarray) -> tuple[float, float]:
    ranks = np.argsort(-sim, axis=1)
    truth = np.arange(sim.shape[0])
    return float(np.mean(ranks[:, 0] == truth)), float(np.mean([t in r[:3] for t, r in zip(truth, ranks)]))


def main() -> None:
    import jishi
    from pydoc_data.topics import topics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--out", default=f"bench/results/retrieval-{time.strftime('%Y%m%d-%H%M')}.json")
    args = ap.parse_args()
    keys = list(QUESTIONS)
    passages = [topics[k][:800] for k in keys]
    questions = [QUESTIONS[k] for k in keys]
    m = jishi.load(args.bundle)
    rows = {}
    t = time.perf_counter()
    for pooling in ("mean", "last"):
        d, q = m.embed(passages, pooling=pooling), m.embed(questions, pooling=pooling)
        rows[f"jishi embed ({pooling} pooling)"] = accuracy(q @ d.T)
    seconds = time.perf_counter() - t
    rows["TF-IDF word overlap"] = accuracy(tfidf(passages, questions))
    rows["chance"] = (1 / len(keys), 3 / len(keys))
    for name, (top1, top3) in rows.items():
        print(f"{name:32s} top-1 {top1:.2f}  top-3 {top3:.2f}")
    out = {"bundle": args.bundle, "pairs": len(keys), "embed_seconds_all": round(seconds, 2),
           "results": {k: {"top1": round(a, 3), "top3": round(b, 3)} for k, (a, b) in rows.items()}}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
