"""Selection strategies behind one call shape, so baselines are compared on equal terms.

A strategy maps a float32 block [r, n] (and optionally the base block) to a keep mask. Its
`scope` says how far the mask of one entry looks and where the keep budget is spent:
- "row": row-local, exactly min(k, n) per row (KEN's reference-compat mode excepted); a block
  may be cut anywhere without changing the mask;
- "block": the mask of a row depends on the other rows of its planned block (a low-rank
  estimate, a budget of k * rows for the whole block), so the block is selected in one piece;
- "model": one budget for the whole fine-tune. The registered function returns *scores* (float64,
  larger = keep first, comparable across tensors); the mask of a block is its `budget` largest
  scores, the budgets coming from a scoring pass over every block first (budget.py).
Adding one is a function and a decorator: see `register`; the built-in ones live in
baselines.py (ken, magnitude, random) and delta.py (the delta-aware rules).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ken_dist.errors import InputError

# fn(rows32, base32_or_None, k, *, seed, row_offset, compat, device) -> numpy bool mask
StrategyFn = Callable[..., np.ndarray]


SCOPES = ("row", "block", "model")


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: StrategyFn              # mask function; for scope "model": fn(rows32, base32) -> scores
    needs_base: bool
    doc: str
    scope: str = "row"
    compiled_kernel: bool = False  # selects through KEN's numba kernel on the CPU (compiled on first use)


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, *, needs_base: bool = False, scope: str = "row", compiled_kernel: bool = False):
    """Decorator adding a strategy to the registry under `name` (scope: see the module docstring;
    compiled_kernel: it calls ken_mask, whose CPU path numba compiles once per machine)."""
    if scope not in SCOPES:
        raise InputError(f"strategy {name!r}: scope must be one of {', '.join(SCOPES)}, got {scope!r}")

    def wrap(fn: StrategyFn) -> StrategyFn:
        if name in STRATEGIES:
            raise InputError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = Strategy(name, fn, needs_base, (fn.__doc__ or "").strip().split("\n")[0], scope,
                                    compiled_kernel)
        return fn
    return wrap


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise InputError(f"unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}") from None


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Per-row mask of the k largest scores; ties go to the smaller index (stable)."""
    r, n = scores.shape
    mask = np.zeros((r, n), dtype=bool)
    if k >= n:
        mask[:] = True
        return mask
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def block_top_mask(scores: np.ndarray, total: int) -> np.ndarray:
    """Mask of the `total` largest scores of the whole block; ties go to the smaller flat index
    (row-major), as a stable sort would, in O(size) (argpartition + the tied values only)."""
    flat = scores.reshape(-1)
    mask = np.zeros(flat.shape, dtype=bool)
    if total >= flat.size:
        mask[:] = True
        return mask.reshape(scores.shape)
    if total <= 0:
        return mask.reshape(scores.shape)
    kth = np.partition(flat, flat.size - total)[flat.size - total]  # the total-th largest value
    above = flat > kth
    mask[above] = True
    need = total - int(above.sum())
    tied = np.flatnonzero(flat == kth)
    mask[tied[:need]] = True
    return mask.reshape(scores.shape)
