"""Selection strategies beyond the paper's KEN and the two baselines (magnitude, random).

Registered on import (kernel/strategies/__init__.py imports this module), so every strategy here is
available to `select`, to job files (`strategy: ken-delta`) and to `ken-dist prune --strategy`.
All read the base rows (needs_base=True): what fine-tuning changed is the difference fine-tuned
minus base. `ken-delta` and `lowrank-delta` keep exactly min(k, n) entries per row like the
baselines; `lowrank-delta-block` keeps k * rows per block, the `*-model` ones a budget for the
whole fine-tune (scope, see registry.py).

Measured on a real fine-tune in benchmarks/quality/ (docs/quality.md):

- `ken-delta`: the KEN rule (shared/spec/ken-selection.md) run on the row of differences
  `fine-tuned - base` (float32) instead of on the fine-tuned values. KEN keeps entries where the
  values are dense; on the fine-tuned row the density is the pre-trained weight distribution, which
  says little about what fine-tuning did. On the delta row it keeps the typical changes plus the
  extremes (the grid's end points).
- `lowrank-delta`: beyond the paper. Fine-tuning deltas are strongly low-rank (on the MiniLM
  benchmark the rank-1 part holds 99% of the pooler's delta and 6-78% of each encoder matrix's),
  and the part outside a few directions is mostly optimizer noise. Magnitude keeps the largest
  |delta|, noise included. This rule denoises first: L = the rank-r part of the block's delta
  (r = LOWRANK_RANK = 4, deterministic randomized SVD), then keeps the k entries per row with the
  largest delta * L, i.e. the entries whose kept fine-tuned change contributes most to the
  low-rank signal (it is what maximizes <kept delta, L> per row). It reads the whole block, not
  one row: the planner keeps a tensor in one block up to --block-bytes (64 MiB), so the result is
  exactly the whole-tensor rule there; a tensor split into several blocks gets each block's own
  rank-r estimate (set --block-bytes above the largest tensor to avoid that). A 1-row block
  (a bias, a norm vector) is its own rank-1 part, so the rule is magnitude there.
- `lowrank-delta-block`: the same score, but the budget is the block's, not each row's: the
  k * rows entries of the block with the largest delta * L are kept, so rows (and, in an
  embedding matrix, tokens) that fine-tuning barely moved give their share to rows it moved a
  lot. Kept counts vary per row (the store records any count per row; kept_row_min/max show
  it); the block total is exact. On the benchmark it keeps the full fine-tune's accuracy within a
  point at keep 0.25 on average over three fine-tune seeds (magnitude: 2.4 points below).
- `lowrank-delta-model` and `magnitude-model`: one budget for the whole fine-tune (keep x all
  pruned entries), spent on the entries with the largest delta * L (L per block, as above) or
  |delta| anywhere in the model, so tensors that fine-tuning moved a lot keep more than a
  quarter of their entries and the rest less. The budget is split between blocks by a scoring
  pass before any block is selected (budget.py); `select` needs that block's `budget`.
  delta * L and delta * delta are both in units of delta squared, so scores of different
  tensors compare. Results on the benchmark: docs/quality.md.
"""
from __future__ import annotations

import numpy as np

from ken_dist.kernel.ken import ken_mask
from ken_dist.kernel.strategies.baselines import abs_delta
from ken_dist.kernel.strategies.registry import block_top_mask, register, top_k_mask

LOWRANK_RANK = 4  # chosen on seed 0 of benchmarks/quality (1, 4, 8, 32 tried), checked on seeds 1-2
_OVERSAMPLE = 8
_POWER_ITERS = 4
_SKETCH_SEED = 0x4B454E  # fixed: the sketch is part of the rule, not a user seed


def lowrank_part(delta: np.ndarray, rank: int = LOWRANK_RANK) -> np.ndarray:
    """The rank-`rank` part of `delta` [r, n] in float64 (exact when rank >= min(r, n) - oversampling).

    Randomized range finder with power iterations (Halko, Martinsson & Tropp 2011, alg. 4.4) on a
    fixed-seed Gaussian sketch: O(r n (rank + 8)) per pass instead of a full SVD's O(r n min(r, n)),
    about a second for a 14336 x 4096 block, and the same numbers on every run."""
    d = np.asarray(delta, dtype=np.float64)
    m, n = d.shape
    width = rank + _OVERSAMPLE
    if width >= min(m, n):
        if rank >= min(m, n):
            return d
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vt[:rank]
    omega = np.random.default_rng(_SKETCH_SEED).standard_normal((n, width))
    q, _ = np.linalg.qr(d @ omega)
    for _ in range(_POWER_ITERS):
        w, _ = np.linalg.qr(d.T @ q)
        q, _ = np.linalg.qr(d @ w)
    u, s, vt = np.linalg.svd(q.T @ d, full_matrices=False)
    return ((q @ u[:, :rank]) * s[:rank]) @ vt[:rank]


def _delta(rows: np.ndarray, base: np.ndarray) -> np.ndarray:
    """fine-tuned - base in float32 (both are float32 rows already, widened exactly)."""
    return np.subtract(rows, base, dtype=np.float32)


@register("ken-delta", needs_base=True, compiled_kernel=True)
def ken_delta(rows, base, k, *, seed, row_offset, compat, device):
    """KEN's KDE rule applied to the row of differences fine-tuned - base (exactly k per row)."""
    return ken_mask(_delta(rows, base), k, compat="index", device=device)


@register("lowrank-delta", needs_base=True, scope="block")
def lowrank_delta(rows, base, k, *, seed, row_offset, compat, device):
    """Top-k per row of delta * (rank-4 part of the block's delta): denoised magnitude (beyond the paper)."""
    if rows.shape[0] < 2:  # one row: its own rank-1 part, delta * delta = magnitude squared
        return top_k_mask(abs_delta(rows, base), k)
    return top_k_mask(lowrank_scores(rows, base), k)


def lowrank_scores(rows, base) -> np.ndarray:
    """delta * (rank-4 part of the block's delta), float64; delta * delta for a one-row block. In
    units of delta squared whatever the tensor, so scores of different tensors are comparable."""
    d = np.subtract(rows, base, dtype=np.float64)
    return d * d if d.shape[0] < 2 else d * lowrank_part(d)


@register("lowrank-delta-block", needs_base=True, scope="block")
def lowrank_delta_block(rows, base, k, *, seed, row_offset, compat, device):
    """The k*rows entries of the block with the largest delta * (rank-4 part of delta); per-row counts vary."""
    return block_top_mask(lowrank_scores(rows, base), k * rows.shape[0])


@register("lowrank-delta-model", needs_base=True, scope="model")
def lowrank_delta_model(rows, base):
    """One budget for the whole fine-tune, entries ranked by delta * (rank-4 part of their block's delta)."""
    return lowrank_scores(rows, base)


@register("magnitude-model", needs_base=True, scope="model")
def magnitude_model(rows, base):
    """One budget for the whole fine-tune, entries ranked by |fine-tuned - base| (global magnitude)."""
    return abs_delta(rows, base)
