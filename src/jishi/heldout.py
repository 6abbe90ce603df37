"""The held-out text every quality figure of this project is measured on.

The first 20,000 characters of Python's own ``pydoc_data.topics`` (joined in key
order): it ships with Python, so every machine has the same text. Calibration
and distillation use the text after it, never this: ``pydoc_data.topics`` repeats
itself (grammar rules and whole paragraphs shared by several topics; a third of the
held-out text's 80-character passages recur later), so the calibration text also
leaves out every line of 12 characters or more that the held-out text holds.
"""

from __future__ import annotations

import functools

HELDOUT_CHARS = 20_000
WINDOW = 512


def _topics_text() -> str:
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


def heldout_text() -> str:
    return _topics_text()[:HELDOUT_CHARS]


MIN_SHARED_LINE = 12


@functools.lru_cache(maxsize=1)
def calibration_text() -> str:
    text = _topics_text()
    held = {line.strip() for line in text[:HELDOUT_CHARS].split("\n") if len(line.strip()) >= MIN_SHARED_LINE}
    return "\n".join(line for line in text[HELDOUT_CHARS:].split("\n") if line.strip() not in held)


def windows(ids: list[int], size: int = WINDOW) -> list[list[int]]:
    """Non-overlapping windows of ``size`` tokens; the last, partial one is dropped."""
    return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)]


OVERLAP_CHARS = 80  # a calibration text may share no passage this long with the held-out text
_MIN_WORDY = 16  # ... counting only passages with at least this many letters or digits (not rules of "****")


@functools.lru_cache(maxsize=2)
def _heldout_passages(size: int) -> frozenset:
    held = heldout_text()
    return frozenset(held[i:i + size] for i in range(len(held) - size + 1))


def heldout_overlap(text: str, size: int = OVERLAP_CHARS) -> dict:
    """Every ``size``-character window of ``text`` (at every offset) looked up in the held-out text: how many
    were checked, how many occur there, how many separate passages they make and the first of them."""
    seen = _heldout_passages(size)
    hits = [i for i in range(len(text) - size + 1) if text[i:i + size] in seen
            and sum(c.isalnum() for c in text[i:i + size]) >= _MIN_WORDY]
    passages = sum(1 for j, i in enumerate(hits) if j == 0 or hits[j - 1] != i - 1)
    return {"window_chars": size, "windows": max(len(text) - size + 1, 0), "in_heldout": len(hits),
            "passages": passages, "first": text[hits[0]:hits[0] + size] if hits else None}
