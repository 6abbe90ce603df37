"""The held-out text every quality figure of this project is measured on.

The first 20,000 characters of Python's own ``pydoc_data.topics`` (joined in key
order): it ships with Python, so every machine has the same text. Calibration
and distillation use the text after it, never this.
"""

from __future__ import annotations

HELDOUT_CHARS = 20_000
WINDOW = 512


def _topics_text() -> str:
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


def heldout_text() -> str:
    return _topics_text()[:HELDOUT_CHARS]


def calibration_text() -> str:
    return _topics_text()[HELDOUT_CHARS:]


def windows(ids: list[int], size: int = WINDOW) -> list[list[int]]:
    """Non-overlapping windows of ``size`` tokens; the last, partial one is dropped."""
    return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)]
