"""One keep budget for a whole fine-tune (strategies of scope "model"), computed in two passes.

Why: a per-row or per-block budget keeps k entries even where fine-tuning changed nothing (most
rows of an embedding matrix) and too few where it changed a lot. A model budget keeps the
`total` best-scored entries of the whole fine-tune instead. Blocks are selected independently on
many workers, so the driver first needs every block's share:

1. scoring pass: each worker scores one block and returns a histogram of its scores over 65536
   bins ordered like the scores (the top 16 bits of the float32 score, made sortable), sparse:
   only occupied bins travel (a few thousand per block at most);
2. the driver sums the histograms, finds the bin where the running count from the top reaches
   `total`, and gives each block every entry above that bin plus a share of the boundary bin
   (proportional to its entries there, largest remainders first, ties by block order);
3. selection pass: each block keeps its `budget` largest scores.

The result is exactly `total` entries; every entry scored above the boundary bin is kept and
none below it; within the boundary bin (scores equal to 8 bits of mantissa) the split between
blocks is proportional instead of by exact score. Scores are deterministic, so the selection
pass recomputes exactly the scores the scoring pass binned.
"""
from __future__ import annotations

import numpy as np

BINS = 1 << 16


def score_bins(scores: np.ndarray) -> np.ndarray:
    """Bin (uint16) of each score; a larger score never gets a smaller bin."""
    with np.errstate(over="ignore"):  # beyond float32: +-inf, still in order
        s32 = (np.asarray(scores, dtype=np.float64) + 0.0).astype(np.float32)  # + 0.0 turns -0 into +0
    bits = s32.reshape(-1).view(np.uint32)
    key = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    return (key >> np.uint32(16)).astype(np.uint16)


def score_histogram(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sparse histogram of a block's scores: (occupied bins ascending, uint16; their counts, int64)."""
    counts = np.bincount(score_bins(scores), minlength=BINS)
    bins = np.flatnonzero(counts)
    return bins.astype(np.uint16), counts[bins].astype(np.int64)


def total_budget(rows_and_lengths, keep: float | None, k: int | None) -> int:
    """Entries to keep in the fine-tune, from its blocks' (rows, row length): round(keep x all
    entries), or min(k, n) per row summed."""
    if keep is not None:
        return int(round(keep * sum(rows * n for rows, n in rows_and_lengths)))
    return sum(rows * min(k, n) for rows, n in rows_and_lengths)


def allocate(hists: dict, total: int) -> tuple[dict, dict]:
    """{block key: (bins, counts)} and the fine-tune's total -> ({block key: budget}, summary).

    Budgets sum to min(total, all entries). The summary records the boundary bin and how many
    entries were taken from it, for the manifest."""
    keys = sorted(hists)
    overall = np.zeros(BINS, dtype=np.int64)
    for key in keys:
        bins, counts = hists[key]
        overall[bins] += counts
    elements = int(overall.sum())
    total = max(0, min(int(total), elements))
    if total in (0, elements):
        budgets = {key: (int(hists[key][1].sum()) if total else 0) for key in keys}
        return budgets, {"total": total, "elements": elements, "boundary_bin": None, "from_boundary": 0}
    from_top = np.cumsum(overall[::-1])
    idx = int(np.searchsorted(from_top, total))        # first position where the count reaches total
    boundary = BINS - 1 - idx
    above_all = int(from_top[idx - 1]) if idx else 0
    need = total - above_all                            # entries to take from the boundary bin (> 0)
    in_boundary = int(overall[boundary])
    budgets, shares, fractions = {}, {}, []
    for i, key in enumerate(keys):
        bins, counts = hists[key]
        above = int(counts[bins > boundary].sum())
        here = int(counts[bins == boundary].sum())
        shares[key], remainder = divmod(need * here, in_boundary)  # exact integer arithmetic
        fractions.append((-remainder, i, key))
        budgets[key] = above
    left = need - sum(shares.values())
    for _, _, key in sorted(fractions)[:left]:
        shares[key] += 1
    for key in keys:
        budgets[key] += shares[key]
    return budgets, {"total": total, "elements": elements, "boundary_bin": boundary, "from_boundary": need}
