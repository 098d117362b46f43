"""`select`: KEN and every registered strategy behind one call shape (strategies/).

Row- and block-scope strategies return masks with k per row (or k * rows per block); model-scope
ones return scores, and the mask of a block is its `budget` largest (the budgets come from the
job's scoring pass, strategies/budget.py).
"""
from __future__ import annotations

import numpy as np

from ken_dist.checkpoints.dtypes import is_torch_tensor
from ken_dist.errors import InputError
from ken_dist.kernel.ken import as_torch_mask, check_compat, ken_mask_any
from ken_dist.kernel.rows import as_float32_rows, check_finite, resolve_k
from ken_dist.kernel.strategies import get_strategy
from ken_dist.kernel.strategies.registry import block_top_mask


def _block_arrays(strategy: str, rows, base_rows):
    """(strategy, float32 rows [r, n], float32 base or None, one_row) as numpy, validated."""
    strat = get_strategy(strategy)
    values = as_float32_rows(rows)
    one_row = values.ndim == 1
    arr = values.cpu().numpy() if is_torch_tensor(values) else values
    if one_row:
        arr = arr[None, :]
    base = None
    if strat.needs_base:
        if base_rows is None:
            raise InputError(f"strategy {strategy!r} needs base_rows (the pre-trained values of the same rows)")
        base = as_float32_rows(base_rows, "base_rows")
        base = base.cpu().numpy() if is_torch_tensor(base) else base
        base = base.reshape(arr.shape) if base.size == arr.size else base
        if base.shape != arr.shape:
            raise InputError(f"base_rows shape {tuple(base.shape)} does not match rows shape {tuple(arr.shape)}")
        base = np.ascontiguousarray(base)
    check_finite(arr)
    return strat, np.ascontiguousarray(arr), base, one_row


def select(strategy: str, rows, base_rows=None, *, k=None, keep=None, seed: int = 0,
           row_offset: int = 0, compat: str = "index", device=None, budget: int | None = None):
    """Keep mask (a torch bool tensor) from any registered strategy ('ken', 'magnitude', 'random',
    ...), same shape as rows.

    base_rows is required by strategies that compare against the pre-trained values.
    row_offset is the index of rows[0] in its tensor, so that seeded strategies give the same
    mask whatever the block split. budget: entries to keep in this block, for strategies of scope
    "model" only (one budget for the whole fine-tune; run_job computes each block's share).
    """
    return as_torch_mask(_select(strategy, rows, base_rows, k=k, keep=keep, seed=seed, row_offset=row_offset,
                             compat=compat, device=device, budget=budget))


def select_array(strategy: str, rows: np.ndarray, base_rows: np.ndarray | None = None, *, k=None, keep=None,
                 seed: int = 0, row_offset: int = 0, compat: str = "index", budget: int | None = None) -> np.ndarray:
    """select() on the CPU path with numpy in and out (float rows, a bool mask): never imports
    torch, which keeps the CPU selection actors light (ken_dist/job/execute.py)."""
    return _select(strategy, rows, base_rows, k=k, keep=keep, seed=seed, row_offset=row_offset,
                   compat=compat, device="cpu", budget=budget)


def _select(strategy, rows, base_rows, *, k, keep, seed, row_offset, compat, device, budget):
    if strategy == "ken":
        return ken_mask_any(rows, k, keep, compat, device)
    check_compat(compat)
    strat, arr, base, one_row = _block_arrays(strategy, rows, base_rows)
    if strat.scope == "model":
        if budget is None or isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) \
                or not 0 <= budget <= arr.size:
            raise InputError(f"strategy {strategy!r} spends one keep budget across the whole fine-tune: prune with "
                           f"`ken-dist prune` / run_job (a scoring pass gives every block its share), or pass "
                           f"budget= (entries to keep in this block, 0..{arr.size}), got {budget!r}")
        mask = block_top_mask(strat.fn(arr, base), int(budget))
    else:
        k = resolve_k(arr.shape[1], k, keep)
        mask = strat.fn(arr, base, k, seed=seed, row_offset=row_offset, compat=compat, device=device)
    return mask[0] if one_row else mask


def block_scores(strategy: str, rows, base_rows=None) -> np.ndarray:
    """Scores [r, n] (float64, larger = kept first) of a block under a strategy of scope "model"."""
    strat, arr, base, _ = _block_arrays(strategy, rows, base_rows)
    if strat.scope != "model":
        raise InputError(f"strategy {strategy!r} has scope {strat.scope!r}; only scope 'model' strategies have "
                       "whole-model scores")
    return strat.fn(arr, base)
