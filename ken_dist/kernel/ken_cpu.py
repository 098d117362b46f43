"""KEN selection on a block of rows: the parts that must be numpy's own arithmetic, then the
compiled per-row work (ken_numba), with the spec's edge cases decided here once for every path."""
from __future__ import annotations

import numpy as np

from ken_dist.kernel import ken_numba


def bandwidths(rows: np.ndarray) -> np.ndarray:
    """Silverman's rule as the published code computes it: numpy float32 std, float32 1.06*s,
    then float64 times n**(-1/5). np.std over axis 1 rounds exactly as np.std of each row."""
    n = rows.shape[1]
    s = np.std(rows, axis=1)
    return (np.float32(1.06) * s).astype(np.float64) * (n ** (-1 / 5))


def grids(rows: np.ndarray, k: int) -> np.ndarray:
    """numpy.linspace(min, max, k) of every row, float32, computed the way numpy computes it."""
    lo = rows.min(axis=1)
    hi = rows.max(axis=1)
    if k == 1:
        return lo[:, None].copy()
    delta = hi - lo
    step = delta / np.float32(k - 1)
    ramp = np.arange(k, dtype=np.float32)[None, :]
    out = ramp * step[:, None]
    zero_step = step == 0
    if zero_step.any():  # numpy divides first when the step underflows
        out[zero_step] = (ramp / np.float32(k - 1)) * delta[zero_step, None]
    out += lo[:, None]
    out[:, -1] = hi
    return out


def sort_order(rows: np.ndarray) -> np.ndarray:
    """Each row's indices sorted by (value, index), -0.0 equal to 0.0 (ken_numba.radix_sort_order)."""
    return ken_numba.radix_sort_order(np.ascontiguousarray(rows, dtype=np.float32).view(np.uint32))


def ken_masks(rows: np.ndarray, k: int, reference: bool) -> np.ndarray:
    """Keep masks [r, n] for finite float32 rows and 1 <= k (k >= n keeps whole rows)."""
    r, n = rows.shape
    h = bandwidths(rows)
    # s = 0 (all values equal) has no density: the spec keeps indices 0..k-1 there.
    degenerate = ~((h > 0) & (2 * h * h > 0))  # 2h^2 > 0 also keeps 1/h finite
    mask = np.zeros((r, n), dtype=bool)
    if k >= n:
        mask[:] = True
    else:
        mask[degenerate, :k] = True
        live = np.flatnonzero(~degenerate)
        if live.size:
            sub = np.ascontiguousarray(rows[live])
            mask[live] = ken_numba.select_block(sub, sort_order(sub), grids(sub, k), h[live], k)
    if reference:
        mask = value_mask(rows, mask)
    return mask


def _warm_up_block():
    """Two tiny rows with the argument types of real blocks (and long enough for every density
    branch), k, and their bandwidths and grids (numpy alone: nothing compiled)."""
    rows = np.stack([np.linspace(-1.0, 1.0, 512, dtype=np.float32) ** 3,
                     np.linspace(0.0, 1.0, 512, dtype=np.float32)])
    k = 200
    return rows, k, bandwidths(rows), grids(rows, k)


def compile_density() -> None:
    """Compile (or load) ken_numba.density_estimates alone, with select_block's argument types:
    one half of a compilation on two cores (runtime/warmup.py forks for it). The row is sorted by
    numpy: the radix sort is the other half's."""
    rows, _, h, grid = _warm_up_block()
    ken_numba.density_estimates(rows[0], np.sort(rows[0]).astype(np.float64), grid[0], h[0])


def compile_all_but_density() -> None:
    """Compile (or load) select_block's other callees: the other half (compile_density)."""
    rows, k, h, grid = _warm_up_block()
    order = sort_order(rows)
    ken_numba.greedy_match(rows[0][order[0]], order[0], grid[0], np.arange(k))
    ken_numba._merge_sort_descending(np.zeros(4))
    ken_numba._order_by_density(rows[0], grid[0], h[0], np.zeros(k), np.zeros(k),
                                ken_numba.no_expansion(h[0], rows.shape[1]))


def warm_up(on_compile=None, first=None) -> bool:
    """Compile the CPU path's numba code, or load it from numba's on-disk cache, by selecting on
    two tiny rows (the same argument types as real blocks, and rows long enough for every density
    branch). on_compile() is called once, just before the first real compilation: not at all when
    the cache serves everything. first(), if given, runs before that selection, its compilations
    heard too (runtime/warmup.py: half of them, while a fork compiles the other half). Returns
    whether anything was compiled.

    Why: a job's actors would otherwise each compile the same code at once on a new machine;
    run first (the driver does), the others load what this one cached."""
    from numba.core import event

    compiled = []

    class FirstCompile(event.Listener):
        def on_start(self, ev):
            if not compiled and on_compile is not None:
                on_compile()
            compiled.append(True)

        def on_end(self, ev):
            pass

    rows, k, _, _ = _warm_up_block()
    with event.install_listener("numba:compile", FirstCompile()):
        if first is not None:
            first()
        ken_masks(rows, k, False)
    return bool(compiled)


def value_mask(rows: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """The published code's mapping back by value: every entry equal to a picked value is
    kept, and entries equal to 0.0 revert to the base (count as not kept)."""
    out = np.zeros_like(picked)
    for i in range(rows.shape[0]):
        out[i] = np.isin(rows[i], rows[i][picked[i]]) & (rows[i] != 0)
    return out
