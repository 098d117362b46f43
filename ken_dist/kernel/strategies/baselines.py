"""The paper's rule and the two baselines every table compares it with.

`ken` is KEN itself (kernel/ken.py); `magnitude` keeps the largest |fine-tuned - base| per row
(task-vector magnitude); `random` is the control, seeded per row so any block split gives the
same mask.
"""
from __future__ import annotations

import numpy as np

from ken_dist.kernel.ken import ken_mask
from ken_dist.kernel.strategies.registry import register, top_k_mask


@register("ken", compiled_kernel=True)
def ken(rows, base, k, *, seed, row_offset, compat, device):
    """KEN: k fine-tuned values per row picked by the Gaussian KDE rule (the paper)."""
    return ken_mask(rows, k, compat=compat, device=device)


def abs_delta(rows, base) -> np.ndarray:
    """|fine-tuned - base| in float64 (exact for float32 inputs)."""
    return np.abs(np.subtract(rows, base, dtype=np.float64))


@register("magnitude", needs_base=True)
def magnitude(rows, base, k, *, seed, row_offset, compat, device):
    """Top-k of |fine-tuned - base| per row (task-vector magnitude)."""
    return top_k_mask(abs_delta(rows, base), k)


@register("random")
def random(rows, base, k, *, seed, row_offset, compat, device):
    """k entries per row uniformly at random; row i of a tensor depends only on (seed, i)."""
    r, n = rows.shape
    scores = np.empty((r, n), dtype=np.float64)
    for i in range(r):
        scores[i] = np.random.default_rng([seed, row_offset + i]).random(n)
    return top_k_mask(scores, k)
