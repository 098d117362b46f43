"""One keep budget for a whole fine-tune (strategies of scope "model"): a scoring pass, then a
selection that reads what the scoring pass kept.

Why: a per-row or per-block budget keeps k entries even where fine-tuning changed nothing (most
rows of an embedding matrix) and too few where it changed a lot. A model budget keeps the
`total` best-scored entries of the whole fine-tune instead. Blocks are selected independently on
many workers, so the driver first needs every block's share:

1. scoring pass: each worker scores one block and returns a histogram of its scores over 65536
   bins ordered like the scores (the top 16 bits of the float32 score, made sortable), sparse:
   only occupied bins travel (a few thousand per block at most). It also keeps the block's
   candidates, whole bins from the top (candidate_floor), in a spill file
   (ken_dist/store/spill.py, ken_dist/job/execute.py);
2. the driver sums the histograms, finds the bin where the running count from the top reaches
   `total`, and gives each block every entry above that bin plus a share of the boundary bin
   (proportional to its entries there, largest remainders first, ties by block order);
3. selection: each block keeps its `budget` largest scores (ties to the smaller flat index). When
   the budget fits in its candidates, the worker takes it from the spill (keep_among_candidates) without
   reading or scoring the block again; otherwise it reads and scores it again. Scores are
   deterministic and the candidates are a prefix of the block's order, so both give the same mask.

The result is exactly `total` entries; every entry scored above the boundary bin is kept and
none below it; within the boundary bin (scores equal to 8 bits of mantissa) the split between
blocks is proportional instead of by exact score.
"""
from __future__ import annotations

import numpy as np

from ken_dist.kernel.strategies.registry import block_top_mask

BINS = 1 << 16


def score_bins(scores: np.ndarray) -> np.ndarray:
    """Bin (uint16, flat) of each score; a larger score never gets a smaller bin.

    The bin is the top 16 bits of the float32 score made sortable as an unsigned integer (sign
    bit flipped for positives, every bit for negatives), computed on the high halves only."""
    with np.errstate(over="ignore"):  # beyond float32: +-inf, still in order; + 0.0 turns -0 into +0
        s32 = np.add(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, dtype=np.float32)
    high = s32.view(np.uint16)[1::2] if np.little_endian else s32.view(np.uint16)[0::2]
    negative = high >> np.uint16(15)
    return high ^ (negative * np.uint16(0x7FFF) | np.uint16(0x8000))


def bin_histogram(bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sparse histogram of score_bins' output: (occupied bins ascending, uint16; their counts, int64)."""
    counts = np.bincount(bins, minlength=BINS)
    occupied = np.flatnonzero(counts)
    return occupied.astype(np.uint16), counts[occupied].astype(np.int64)


def score_histogram(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sparse histogram of a block's scores: (occupied bins ascending, uint16; their counts, int64)."""
    return bin_histogram(score_bins(scores))


def candidate_floor(hist: tuple[np.ndarray, np.ndarray], want: int, cap: int) -> tuple[int, int] | None:
    """(lowest bin, entries from it up) of a block's candidates for a later selection: whole bins
    from the top until at least `want` entries, unless that passes `cap`, then one bin less.

    Whole bins make the candidates a prefix of the block's order (score descending, then flat index
    ascending): every candidate scores above every other entry, because a larger bin means a
    larger score. So any budget up to their count selects among them exactly what it selects
    among all the block's entries (block_top_mask on the candidates, kept in flat-index order).
    None when no bin fits (want <= 0, or the top bin alone passes `cap`)."""
    bins, counts = hist
    if want <= 0 or not bins.size:
        return None
    from_top = np.cumsum(counts[::-1])
    i = min(int(np.searchsorted(from_top, want)), from_top.size - 1)  # first bin reaching want (or the last)
    if from_top[i] > cap:
        i -= 1
    if i < 0:
        return None
    return int(bins[bins.size - 1 - i]), int(from_top[i])


def keep_among_candidates(bins: np.ndarray, groups: tuple[np.ndarray, np.ndarray], budget: int,
                          scores_at) -> np.ndarray:
    """Flags over a block's candidates (flat order; `bins` their score bins, `groups` the sparse
    histogram of those bins) of the block's `budget` largest scores, ties to the smaller position,
    as block_top_mask of the whole block gives (candidate_floor: the candidates are a prefix of
    its order). Every candidate above the bin the budget ends in is kept, and in that bin the
    largest scores: `scores_at(indices)` gives those candidates' scores, the only ones needed.
    Needs 0 <= budget <= len(bins)."""
    occupied, counts = groups
    from_top = np.cumsum(counts[::-1])
    i = min(int(np.searchsorted(from_top, budget)), from_top.size - 1)
    cut = occupied[occupied.size - 1 - i] if occupied.size else 0
    above = int(from_top[i - 1]) if i else 0
    flags = bins > cut
    if budget > above:
        in_cut = np.flatnonzero(bins == cut)
        flags[in_cut[block_top_mask(np.asarray(scores_at(in_cut)), budget - above)]] = True
    return flags


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
