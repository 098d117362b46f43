"""A slow, literal implementation of shared/spec/ken-selection.md, used only as a test oracle.

Every step is written as the spec states it (brute-force KDE, a linear scan per greedy pick,
deletion from a list), so that the fast paths can be checked against something obviously right.
"""
from __future__ import annotations

import math

import numpy as np


def bandwidth(v: np.ndarray) -> float:
    n = v.size
    s = np.std(v)  # numpy, float32 in, float32 out
    return float(np.float64(np.float32(1.06 * s))) * n ** (-1 / 5)


def grid(v: np.ndarray, k: int) -> np.ndarray:
    return np.linspace(v.min(), v.max(), k)  # float32 end points -> float32 grid


def rounded_density(v: np.ndarray, g: np.ndarray, h: float) -> np.ndarray:
    n = v.size
    vals = v.astype(np.float64)
    out = np.empty(g.size, dtype=np.float64)
    for j, x in enumerate(g.astype(np.float64)):
        total = 0.0
        for vi in vals:
            total += math.exp(-((x - vi) ** 2) / (2 * h * h))
        out[j] = total / (n * h * math.sqrt(2 * math.pi))
    return np.rint(out)


def greedy_indices(v: np.ndarray, k: int) -> list[int]:
    """The k picked original indices, in pick order."""
    v = np.asarray(v, dtype=np.float32)
    n = v.size
    if k >= n:
        return list(range(n))
    if np.all(v == v[0]):
        return list(range(k))
    h = bandwidth(v)
    g = grid(v, k)
    dens = rounded_density(v, g, h)
    order = sorted(range(k), key=lambda j: -dens[j])  # Python's sort is stable
    return greedy_picks(v, g, order)


def greedy_picks(v: np.ndarray, g: np.ndarray, order) -> list[int]:
    """The greedy itself: each grid point in `order` takes the remaining entry nearest to it in
    float32, the smallest index among equals (a scan of every remaining entry per pick, then its
    deletion)."""
    v = np.asarray(v, dtype=np.float32)
    remaining = np.arange(v.size)
    picked = []
    for j in order:
        d = np.abs(v[remaining] - g[j])  # float32 arithmetic
        pos = int(np.argmin(d))  # the first minimum: the smallest remaining index wins ties
        picked.append(int(remaining[pos]))
        remaining = np.delete(remaining, pos)
    return picked


def index_mask(v: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(np.asarray(v).size, dtype=bool)
    mask[greedy_indices(v, k)] = True
    return mask


def reference_mask(v: np.ndarray, k: int) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    picked_values = v[greedy_indices(v, k)]
    return np.isin(v, picked_values) & (v != 0)
