"""The suite's margin rule (tests/margins.py) itself: what it lets through and what it stops."""

from __future__ import annotations

import numpy as np
import pytest
from margins import assert_argmax_agrees, assert_greedy_agrees, assert_wide, top2_margins


def test_top2_margins_per_row():
    rows = np.array([[0.0, 3.0, 1.0], [5.0, 5.0, -1.0]])
    np.testing.assert_allclose(top2_margins(rows), [2.0, 0.0])


def test_argmax_may_differ_only_at_a_near_tie():
    ref = np.array([[0.0, 3.0, 1.0], [1.0, 1.05, 0.0]])  # margins 2.0 and 0.05
    flipped_near_tie = np.array([[0.0, 3.1, 1.0], [1.1, 1.0, 0.0]])
    assert assert_argmax_agrees(flipped_near_tie, ref, bound=0.1) == 0.5
    flipped_wide = np.array([[0.0, 1.0, 3.0], [1.0, 1.05, 0.0]])
    with pytest.raises(AssertionError, match="step 0: token 2 instead of 1 where the reference's top-2 margin is 2"):
        assert_argmax_agrees(flipped_wide, ref, bound=0.1)


def test_greedy_sequences_may_part_only_at_a_near_tie():
    assert assert_greedy_agrees([1, 2, 9, 9], [1, 2, 3, 4], [2.0, 2.0, 0.01, 2.0], bound=0.1) == 2
    with pytest.raises(AssertionError, match="token 1 differs"):
        assert_greedy_agrees([1, 5, 3], [1, 2, 3], [2.0, 2.0, 2.0], bound=0.1)
    with pytest.raises(AssertionError):
        assert_greedy_agrees([1, 2], [1, 2, 3], [2.0, 2.0, 2.0], bound=0.1)


def test_exact_text_needs_every_step_wider_than_the_bound():
    assert_wide([2.0, 1.6, 3.0], bound=1.5)
    with pytest.raises(AssertionError, match="near-tie at step 1"):
        assert_wide([2.0, 0.08, 3.0], bound=1.5)
