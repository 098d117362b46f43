"""Selection strategies behind one call shape, so baselines are compared on equal terms.

A strategy maps a float32 block [r, n] (and optionally the base block) to a keep mask with
exactly min(k, n) entries per row (KEN's reference-compat mode excepted). Adding one is a
function and a decorator: see `register`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ken_dist.errors import KenError

# fn(rows32, base32_or_None, k, *, seed, row_offset, compat, device) -> numpy bool mask
StrategyFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: StrategyFn
    needs_base: bool
    doc: str


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, *, needs_base: bool = False):
    """Decorator adding a strategy to the registry under `name`."""
    def wrap(fn: StrategyFn) -> StrategyFn:
        if name in STRATEGIES:
            raise KenError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = Strategy(name, fn, needs_base, (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return wrap


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KenError(f"unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}") from None


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


@register("magnitude", needs_base=True)
def magnitude(rows, base, k, *, seed, row_offset, compat, device):
    """Top-k of |fine-tuned - base| per row (task-vector magnitude)."""
    return top_k_mask(np.abs(rows.astype(np.float64) - base.astype(np.float64)), k)


@register("random")
def random(rows, base, k, *, seed, row_offset, compat, device):
    """k entries per row uniformly at random; row i of a tensor depends only on (seed, i)."""
    r, n = rows.shape
    scores = np.empty((r, n), dtype=np.float64)
    for i in range(r):
        scores[i] = np.random.default_rng([seed, row_offset + i]).random(n)
    return top_k_mask(scores, k)
