"""The pure selection kernel: rows in, keep masks (or scores) out. No file I/O, no Ray.

`ken_select` is KEN itself (shared/spec/ken-selection.md, ken.py); `select` puts KEN, the
baselines and the delta-aware rules behind one call shape through the strategy registry
(selection.py, strategies/).
"""
from ken_dist.kernel.ken import COMPAT_MODES, ken_mask, ken_select
from ken_dist.kernel.rows import resolve_k
from ken_dist.kernel.selection import block_scores, select, select_array
from ken_dist.kernel.strategies import STRATEGIES, register

__all__ = ["ken_select", "ken_mask", "select", "select_array", "block_scores", "register", "STRATEGIES",
           "resolve_k", "COMPAT_MODES"]
