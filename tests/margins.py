"""The suite's rule for comparing tokens chosen from logits that other kernels compute a little differently.

Quantized graphs round differently on AVX2, AVX-512 VNNI and ARM (int8 activations inside MatMulNBits),
and batched rows round differently from single ones. So a quantized output is never asserted as exact
text. Instead:

- ``bound`` is how far the gap between two logits may move from the reference to the graph under test
  (at most twice the largest logit difference; each test states how its bound was measured);
- teacher-forced logits are compared row by row: the chosen token (argmax) must be the reference's at every
  step, except where the reference's top-1/top-2 margin is below ``bound``: there either token may win;
- greedy sequences may part only at such a step, and the test checks that margin;
- an exact text is asserted only where the reference's margin is wider than ``bound`` at every step of it,
  which ``assert_wide`` checks first.
"""

from __future__ import annotations

import numpy as np


def top2_margins(logits: np.ndarray) -> np.ndarray:
    """The gap between the largest and second-largest logit of each row."""
    rows = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    top = np.partition(rows, -2, axis=-1)[:, -2:]
    return top[:, 1] - top[:, 0]


def assert_argmax_agrees(got: np.ndarray, reference: np.ndarray, bound: float) -> float:
    """Teacher-forced rows: the same argmax wherever the reference's margin is at least ``bound``.

    Returns the share of rows whose argmax agrees (1.0 when every row does)."""
    got, reference = np.atleast_2d(got), np.atleast_2d(reference)
    assert got.shape == reference.shape, (got.shape, reference.shape)
    margins = top2_margins(reference)
    a, b = got.argmax(-1), reference.argmax(-1)
    for step in np.flatnonzero(a != b):
        assert margins[step] < bound, (f"step {step}: token {a[step]} instead of {b[step]} where the reference's "
                                       f"top-2 margin is {margins[step]:.3g} (bound {bound:.3g})")
    return float((a == b).mean())


def assert_greedy_agrees(got: list[int], expected: list[int], margins, bound: float) -> int:
    """Greedy sequences: equal, or parted at a step where the reference's margin is below ``bound``.

    Returns how many leading tokens agree."""
    for step, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            assert margins[step] < bound, (f"token {step} differs ({a} vs {b}) with a reference top-2 margin of "
                                           f"{margins[step]:.3g} (bound {bound:.3g})")
            return step
    assert len(got) == len(expected), (len(got), len(expected))
    return len(got)


def assert_wide(margins, bound: float, what: str = "the reference") -> None:
    """Before asserting an exact text from a quantized graph: every step of it must be far from a tie."""
    margins = np.asarray(margins, dtype=np.float64)
    worst = int(np.argmin(margins))
    assert margins[worst] > bound, (f"{what} has a near-tie at step {worst} (top-2 margin {margins[worst]:.3g} "
                                    f"<= {bound:.3g}): its exact text depends on the CPU's rounding; "
                                        "choose another prompt or compare with assert_greedy_agrees")
