"""The pure selection kernel: rows in, keep masks out. No file I/O, no Ray.

`ken_select` is KEN itself (shared/spec/ken-selection.md); `select` puts KEN and the
baselines behind one call shape through the strategy registry.
"""
from __future__ import annotations

import numpy as np

from ken_dist.dtypes import is_torch_tensor
from ken_dist.errors import KenError
from ken_dist.kernel import ken
from ken_dist.kernel.rows import as_float32_rows, check_finite, resolve_k
from ken_dist.kernel.strategies import STRATEGIES, block_top_mask, get_strategy, register

COMPAT_MODES = ("index", "reference")


def _check_compat(compat: str) -> bool:
    if compat not in COMPAT_MODES:
        raise KenError(f"compat must be 'index' (exactly k per row) or 'reference' (the published "
                       f"code's value-based mask), got {compat!r}")
    return compat == "reference"


def _path_for(rows, device) -> str:
    """'cpu' (numba) or 'torch': an explicit non-CPU device, or rows living on one, mean torch."""
    if device is None:
        if is_torch_tensor(rows) and rows.device.type != "cpu":
            return "torch"
        return "cpu"
    if isinstance(device, str) and device in ("cpu", "torch"):  # "torch": its path on the CPU (tests)
        return device
    import torch

    return "cpu" if torch.device(device).type == "cpu" else "torch"


def _to_torch(mask):
    if isinstance(mask, np.ndarray):
        import torch

        return torch.from_numpy(mask)
    return mask


def ken_select(rows, k=None, *, keep=None, compat: str = "index", device=None):
    """KEN keep mask (a torch bool tensor) of a [r, n] block (or one [n] row) of fine-tuned
    values, same shape.

    Exactly one of k (entries per row) or keep (fraction, k = max(1, round(keep*n))).
    compat="index" keeps exactly min(k, n) entries per row; compat="reference" returns the
    published code's value-based mask. device: None or "cpu" for the compiled CPU path, a torch
    device such as "cuda" for the torch path ("torch" runs the torch path on the CPU).
    """
    return _to_torch(_ken_mask(rows, k, keep, compat, device))


def ken_mask(rows, k, *, compat: str = "index", device=None) -> np.ndarray:
    """ken_select's mask as a numpy array on the host, whichever path computed it."""
    mask = _ken_mask(rows, k, None, compat, device)
    return mask if isinstance(mask, np.ndarray) else mask.cpu().numpy()


def _ken_mask(rows, k, keep, compat: str, device):
    """KEN mask: numpy from the CPU path (no torch involved for numpy rows), torch from the torch path."""
    reference = _check_compat(compat)
    values = as_float32_rows(rows)
    n = values.shape[-1]
    k = resolve_k(n, k, keep)
    path = _path_for(rows, device)
    one_row = values.ndim == 1
    if one_row:
        values = values[None, :]
    if path == "cpu":
        arr = values.cpu().numpy() if is_torch_tensor(values) else values
        check_finite(arr)
        mask = ken.ken_masks(np.ascontiguousarray(arr), k, reference)
    else:
        import torch

        from ken_dist.kernel import ken_torch

        dev = torch.device("cpu") if device == "torch" else (torch.device(device) if device is not None else values.device)
        t = torch.as_tensor(values).to(dev)
        check_finite(t)
        mask = ken_torch.ken_masks(t, k, reference)
    return mask[0] if one_row else mask


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
            raise KenError(f"strategy {strategy!r} needs base_rows (the pre-trained values of the same rows)")
        base = as_float32_rows(base_rows, "base_rows")
        base = base.cpu().numpy() if is_torch_tensor(base) else base
        base = base.reshape(arr.shape) if base.size == arr.size else base
        if base.shape != arr.shape:
            raise KenError(f"base_rows shape {tuple(base.shape)} does not match rows shape {tuple(arr.shape)}")
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
    return _to_torch(_select(strategy, rows, base_rows, k=k, keep=keep, seed=seed, row_offset=row_offset,
                             compat=compat, device=device, budget=budget))


def select_array(strategy: str, rows: np.ndarray, base_rows: np.ndarray | None = None, *, k=None, keep=None,
                 seed: int = 0, row_offset: int = 0, compat: str = "index", budget: int | None = None) -> np.ndarray:
    """select() on the CPU path with numpy in and out (float rows, a bool mask): never imports
    torch, which keeps the CPU selection actors light (ken_dist/execute.py)."""
    return _select(strategy, rows, base_rows, k=k, keep=keep, seed=seed, row_offset=row_offset,
                   compat=compat, device="cpu", budget=budget)


def _select(strategy, rows, base_rows, *, k, keep, seed, row_offset, compat, device, budget):
    if strategy == "ken":
        return _ken_mask(rows, k, keep, compat, device)
    _check_compat(compat)
    strat, arr, base, one_row = _block_arrays(strategy, rows, base_rows)
    if strat.scope == "model":
        if budget is None or isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) \
                or not 0 <= budget <= arr.size:
            raise KenError(f"strategy {strategy!r} spends one keep budget across the whole fine-tune: prune with "
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
        raise KenError(f"strategy {strategy!r} has scope {strat.scope!r}; only scope 'model' strategies have "
                       "whole-model scores")
    return strat.fn(arr, base)


__all__ = ["ken_select", "ken_mask", "select", "select_array", "block_scores", "register", "STRATEGIES", "resolve_k", "COMPAT_MODES"]


@register("ken")
def _ken_strategy(rows, base, k, *, seed, row_offset, compat, device):
    """KEN: k fine-tuned values per row picked by the Gaussian KDE rule (the paper)."""
    return ken_mask(rows, k, compat=compat, device=device)


from ken_dist.kernel import extra_strategies  # noqa: E402,F401  (registers ken-delta and others)
