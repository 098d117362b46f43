"""Exact statistics of a keep mask: kept 4-neighbours, and what uniform random selection would give.

Pure numpy, no plotting, no I/O. The question KENviz asks is whether the kept entries of a matrix
cluster (more kept neighbours than chance), spread out (fewer) or look random. "Chance" is exact:

- every position (r, c) of an R x C matrix has d(r, c) 4-neighbours: 4 inside, 3 on an edge,
  2 in a corner (fewer when R or C is 1);
- if m of the N = R*C positions are kept uniformly at random without replacement, then given
  that a position of degree d is kept, the other m - 1 kept positions are a uniform sample of
  the N - 1 others, so its number of kept neighbours is hypergeometric(N - 1, m - 1, d);
- a kept position has degree d with probability count_d / N, hence
  P(j kept neighbours | kept) = sum_d count_d / N * C(m-1, j) C(N-m, d-j) / C(N-1, d).

Aggregation for display (a 14336 x 4096 matrix has more entries than a screen has pixels) is
separate: `block_sums` adds values over pixel blocks exactly; statistics are never computed on
the aggregated image.
"""
from __future__ import annotations

import math

import numpy as np

MAX_NEIGHBOURS = 4


def neighbour_counts(mask: np.ndarray) -> np.ndarray:
    """uint8 [R, C]: for every position, how many of its 4-neighbours are kept."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    cnt = np.zeros(m.shape, dtype=np.uint8)
    cnt[1:, :] += m[:-1, :]
    cnt[:-1, :] += m[1:, :]
    cnt[:, 1:] += m[:, :-1]
    cnt[:, :-1] += m[:, 1:]
    return cnt


def observed_histogram(mask: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """int64 [5]: number of kept entries with j = 0..4 kept 4-neighbours."""
    m = np.asarray(mask, dtype=bool)
    cnt = neighbour_counts(m) if counts is None else counts
    return np.bincount(cnt[m], minlength=MAX_NEIGHBOURS + 1).astype(np.int64)


def _axis_degrees(length: int) -> dict[int, int]:
    """{neighbours along this axis: how many indices}: 0 for a length-1 axis, else 1 at both ends, 2 inside."""
    if length <= 1:
        return {0: max(length, 0)}
    return {1: 2, 2: length - 2} if length > 2 else {1: 2}


def degree_counts(rows: int, cols: int) -> np.ndarray:
    """int64 [5]: number of positions of an R x C grid having d = 0..4 4-neighbours."""
    out = np.zeros(MAX_NEIGHBOURS + 1, dtype=np.int64)
    for a, na in _axis_degrees(rows).items():
        for b, nb in _axis_degrees(cols).items():
            out[a + b] += na * nb
    return out


def _hypergeom_pmf(population: int, successes: int, draws: int, j: int) -> float:
    """P(j successes in `draws` draws without replacement), exact integer arithmetic until the end."""
    if j < 0 or j > draws or j > successes or draws - j > population - successes:
        return 0.0
    num = math.comb(successes, j) * math.comb(population - successes, draws - j)
    return num / math.comb(population, draws)


def expected_pmf(rows: int, cols: int, kept: int) -> np.ndarray:
    """float64 [5]: P(a kept entry has j kept 4-neighbours) under uniform random selection of
    `kept` of the rows*cols positions (exact; sums to 1 when kept >= 1)."""
    n = rows * cols
    if not 0 <= kept <= n:
        raise ValueError(f"kept={kept} outside [0, {n}]")
    pmf = np.zeros(MAX_NEIGHBOURS + 1, dtype=np.float64)
    if kept == 0:
        return pmf
    for d, count in enumerate(degree_counts(rows, cols)):
        if count == 0:
            continue
        w = count / n
        for j in range(d + 1):
            pmf[j] += w * _hypergeom_pmf(n - 1, kept - 1, d, j)
    return pmf


def neighbour_summary(observed: np.ndarray, pmf: np.ndarray) -> dict:
    """Observed vs expected: means, their ratio (> 1: kept entries cluster), total variation distance."""
    kept = int(observed.sum())
    j = np.arange(len(observed))
    obs_frac = observed / kept if kept else np.zeros(len(observed))
    obs_mean = float((j * obs_frac).sum())
    exp_mean = float((j * pmf).sum())
    return {
        "observed_hist": [int(x) for x in observed],
        "observed_fraction": [float(x) for x in obs_frac],
        "expected_fraction": [float(x) for x in pmf],
        "observed_mean": obs_mean,
        "expected_mean": exp_mean,
        "clustering_ratio": obs_mean / exp_mean if exp_mean > 0 else None,
        "tv_distance": float(0.5 * np.abs(obs_frac - pmf).sum()) if kept else None,
    }


def block_edges(length: int, factor: int) -> np.ndarray:
    """Start indices of the pixel blocks of an axis (the last block may be shorter)."""
    return np.arange(0, length, factor, dtype=np.int64)


def block_sums(values: np.ndarray, row_factor: int, col_factor: int, row0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sums of `values` (rows row0.. of the matrix) over pixel blocks of row_factor x col_factor.

    Returns (block_row_indices, sums [len(block_row_indices), ceil(C / col_factor)]), float64 for
    float input and int64 otherwise (bool counts): the chunk may start and end inside a block
    row, and adding each chunk's sums into an accumulator at those indices gives the exact sums
    of the whole matrix. Rows are added with one strided pass per row phase (no temporary copy of
    the chunk in the accumulator's dtype), which keeps a 14336 x 4096 mask cheap."""
    r, c = values.shape
    acc_dtype = np.float64 if values.dtype.kind == "f" else np.int64
    if r == 0:
        return np.zeros(0, np.int64), np.zeros((0, -(-c // col_factor)), acc_dtype)
    if values.dtype == bool:
        values = values.view(np.uint8)
    first = row0 // row_factor
    last = (row0 + r - 1) // row_factor
    acc = np.zeros((last - first + 1, c), dtype=acc_dtype)
    for phase in range(min(row_factor, r)):
        # local rows phase, phase + f, ... are matrix rows f apart: consecutive block rows
        rows = values[phase::row_factor]
        b0 = (row0 + phase) // row_factor - first
        acc[b0:b0 + rows.shape[0]] += rows
    acc = np.add.reduceat(acc, block_edges(c, col_factor), axis=1)
    return np.arange(first, last + 1, dtype=np.int64), acc


def display_factor(rows: int, cols: int, max_pixels: int) -> int:
    """Entries per pixel side so that the image fits max_pixels on its longer side (1 = exact)."""
    return max(1, -(-max(rows, cols) // max(1, max_pixels)))
