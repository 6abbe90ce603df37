"""Torch-side reference figures: the teacher's log-probabilities and top-1 choices."""

from __future__ import annotations

import numpy as np


def reference_stats(model, windows: list[list[int]], progress=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """For each window: log p of tokens 2..n (float64) and the argmax at every position."""
    import torch

    logps, tops = [], []
    with torch.no_grad():
        for win in windows:
            logits = model(torch.tensor([win])).logits[0]
            # log p in float64, a few rows at a time: a large vocabulary makes a window's float64 copy gigabytes
            logz = torch.cat([torch.logsumexp(logits[a:a + 32].double(), dim=-1) for a in range(0, len(win), 32)])
            picked = logits[torch.arange(len(win) - 1), torch.tensor(win[1:])].double()
            logps.append((picked - logz[:-1]).numpy())
            tops.append(logits.argmax(-1).numpy())
            if progress:
                progress(1)
    return logps, tops
