"""Selection strategies beyond the paper's KEN and the two baselines (magnitude, random).

Registered on import (ken_dist/kernel/__init__.py imports this module), so every strategy here is
available to `select`, to job files (`strategy: ken-delta`) and to `ken-dist prune --strategy`.
Each keeps exactly min(k, n) entries per row, like the baselines, and reads the base rows
(needs_base=True): what fine-tuning changed is the difference fine-tuned minus base.

Measured on a real fine-tune in benchmarks/quality/ (README, "Quality"):

- `ken-delta`: the KEN rule (shared/spec/ken-selection.md) run on the row of differences
  `fine-tuned - base` (float32) instead of on the fine-tuned values. KEN keeps entries where the
  values are dense; on the fine-tuned row the density is the pre-trained weight distribution, which
  says little about what fine-tuning did. On the delta row it keeps the typical changes plus the
  extremes (the grid's end points).
"""
from __future__ import annotations

import numpy as np

from ken_dist.kernel.strategies import register


def _delta(rows: np.ndarray, base: np.ndarray) -> np.ndarray:
    """fine-tuned - base in float32 (both are float32 rows already, widened exactly)."""
    return np.subtract(rows, base, dtype=np.float32)


@register("ken-delta", needs_base=True)
def ken_delta(rows, base, k, *, seed, row_offset, compat, device):
    """KEN's KDE rule applied to the row of differences fine-tuned - base (exactly k per row)."""
    from ken_dist.kernel import ken_select

    return ken_select(_delta(rows, base), k, compat="index", device=device).cpu().numpy()
