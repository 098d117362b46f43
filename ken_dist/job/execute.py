"""Run one work unit: read its rows from the files, select, write the part. No Ray here, so a
unit runs the same in a Ray actor, in a test, or in a debugger.

On the CPU everything is numpy (blocks as storage bits, ken_dist/checkpoints/dtypes.py) and torch is never
imported, so a CPU actor starts sooner and holds less memory (measured: docs/performance.md).
A GPU device takes the torch path."""
from __future__ import annotations

import math
import shutil
import time

import numpy as np

from ken_dist.checkpoints.dtypes import storage_dtype, to_float32
from ken_dist.checkpoints.reads import read_rows, read_rows_array, read_tensor_array
from ken_dist.errors import KenError, NonFiniteRowError
from ken_dist.job.plan import WorkUnit
from ken_dist.kernel import STRATEGIES, block_scores, select, select_array
from ken_dist.kernel.strategies.budget import (
    bin_histogram,
    candidate_floor,
    keep_among_candidates,
    score_bins,
)
from ken_dist.store.protocol import Store
from ken_dist.store.spill import Spill, open_spill, write_spill

# Rows handed to the kernel per call. The kernel's temporaries are ~20x the bf16 bytes it is
# given (float32/float64 copies, sort indices, grids), so a 64 MiB block selected at once would
# cost a worker ~1.3 GB; in chunks of 4M entries it costs ~170 MB whatever --block-bytes is.
# Selection of scope "row" strategies is row by row (row i depends only on its values, seed and
# absolute index), so chunking gives the same mask; the others see the whole block at once (the
# low-rank rules hold ~40 bytes per entry then). GPUs get larger chunks: they need the batch
# (the torch path on the CPU, device "torch", keeps the CPU's).
SELECT_CHUNK_ELEMENTS = {"cpu": 1 << 22, "gpu": 1 << 25}


def _on_cpu(device) -> bool:
    return device in (None, "cpu")


def _select_in_chunks(unit: WorkUnit, rows, base, device):
    """The block's mask: numpy on the CPU (rows and base: storage bits, widened chunk by chunk),
    a CPU torch tensor from a GPU (rows and base: torch tensors, rows already on the device)."""
    cpu = _on_cpu(device)
    chunk = SELECT_CHUNK_ELEMENTS["cpu" if cpu or device == "torch" else "gpu"]
    step = max(1, chunk // max(1, rows.shape[1]))
    if STRATEGIES[unit.params.strategy].scope != "row":
        step = rows.shape[0]
    dtype = unit.ft_info.dtype
    masks = []
    for a in range(0, rows.shape[0], step):
        b = min(rows.shape[0], a + step)
        args = dict(k=unit.params.k, keep=unit.params.keep, seed=unit.seed, row_offset=unit.row_start + a,
                    compat=unit.params.compat, budget=unit.budget)
        try:
            if cpu:
                masks.append(select_array(unit.params.strategy, to_float32(rows[a:b], dtype),
                                          None if base is None else to_float32(base[a:b], unit.base_info.dtype),
                                          **args))
            else:
                masks.append(select(unit.params.strategy, rows[a:b], None if base is None else base[a:b],
                                    device=device, **args).cpu())
        except NonFiniteRowError as exc:
            raise NonFiniteRowError(str(exc), exc.row + a) from None
    if len(masks) == 1:
        return masks[0]
    if cpu:
        return np.concatenate(masks)
    import torch

    return torch.cat(masks)


def _nonfinite(unit: WorkUnit, exc: NonFiniteRowError) -> KenError:
    return KenError(f"{unit.ft_info.file}: tensor {unit.tensor!r} row {unit.row_start + exc.row} holds NaN or "
                    "infinity; KEN needs finite weights (the fine-tune is corrupt or overflowed: re-export it)")


def _codec_needs_base(unit: WorkUnit) -> bool:
    """Whether the unit's value codec stores the delta to the base (a lossy codec for this dtype)."""
    return unit.params.codec.applies_to(unit.ft_info.dtype)


def _needs_base(unit: WorkUnit, *, store: bool) -> bool:
    """Whether the unit reads the base rows: for its strategy, or (store=True) for a lossy value
    codec, which stores the delta to the base; read once in the unit either way."""
    return STRATEGIES[unit.params.strategy].needs_base or (store and _codec_needs_base(unit))


def _read_block(unit: WorkUnit, device=None, *, store: bool = False):
    """(values, base or None): numpy storage bits for the CPU, torch tensors for a GPU."""
    read = read_rows_array if _on_cpu(device) else read_rows
    values = read(unit.ft_info, unit.row_start, unit.row_end)
    base = None
    if _needs_base(unit, store=store):
        base = read(unit.base_info, unit.row_start, unit.row_end)
    return values, base


# Candidates a block keeps in the scoring pass (ken_dist/store/spill.py): whole score bins from the
# top until twice the block's even share of the budget (keep x entries, or min(k, n) per row), at
# most 2.5 shares (a bin that would pass that is left out). A block whose final budget is larger
# than what it kept is read and scored again. On the real fine-tune of docs/quality.md (keep 0.25)
# the budget gave no large tensor more than 1.9 shares (pooler 3.5, LayerNorms 2.2: small ones).
SPILL_SHARES = 2.0
SPILL_MAX_SHARES = 2.5
# Spills never take the space the parts need: none is written that would leave the store's file
# system with less free than this.
SPILL_RESERVE_BYTES = 1 << 30
SPILL_RESERVE_FRACTION = 0.05


def _spill_identity(unit: WorkUnit) -> dict:
    """What a spill must have been scored under to serve this unit."""
    return {"finetune": unit.finetune, "tensor": unit.tensor, "rows": [unit.row_start, unit.row_end],
            "row_len": unit.ft_info.row_geometry[1], "dtype": unit.ft_info.dtype,
            "base_dtype": unit.base_info.dtype if unit.base_info is not None else None,
            "params": unit.params.as_dict()}


def _share(unit: WorkUnit) -> float:
    """The block's even share of the fine-tune's budget (ken_dist.kernel.strategies.budget.total_budget)."""
    n = unit.ft_info.row_geometry[1]
    return unit.params.keep * unit.elements if unit.params.keep is not None else unit.rows * min(unit.params.k, n)


def _spill(unit: WorkUnit, store: Store, scores, bins, hist, values, base) -> dict:
    """Keep the block's best-scored entries for the selection pass; {"spilled": entries, "spill_bytes"}
    or {"spill_error": why} (a failed spill costs a second read, never the job)."""
    size = unit.elements
    want = min(size, math.ceil(SPILL_SHARES * _share(unit)))
    floor = candidate_floor(hist, want, max(want, min(size, math.floor(SPILL_MAX_SHARES * _share(unit)))))
    if floor is None or np.isnan(scores.min()):  # NaN has no place in the order: leave it to the full block
        return {"spilled": 0, "spill_bytes": 0}
    candidates = bins >= floor[0]
    occupied, counts = hist
    above = occupied >= floor[0]
    spill = Spill(size, occupied[above], counts[above], np.packbits(candidates, bitorder="little"),
                  np.compress(candidates, bins), np.compress(candidates, values.reshape(-1)),
                  np.compress(candidates, base.reshape(-1)) if _codec_needs_base(unit) else None,
                  np.compress(candidates, scores.reshape(-1)))
    try:
        disk = shutil.disk_usage(store.root)
        if disk.free - spill.nbytes < max(SPILL_RESERVE_BYTES, SPILL_RESERVE_FRACTION * disk.total):
            return {"spill_error": f"the store's file system would keep less than {SPILL_RESERVE_FRACTION:.0%} "
                                   f"or {SPILL_RESERVE_BYTES / 2**30:.0f} GiB free, left to the parts"}
        nbytes = write_spill(store.spill_path(unit.finetune, *unit.key), _spill_identity(unit), spill)
    except OSError as exc:
        return {"spill_error": f"{exc.strerror or exc} ({exc.filename or store.root})"}
    return {"spilled": spill.count, "spill_bytes": nbytes}


def score_unit(unit: WorkUnit, store: Store | None = None) -> dict:
    """Scoring pass of a model-budget strategy (ken_dist/kernel/strategies/budget.py): the block's
    score histogram, and with a `store`, its candidates spilled for the selection pass."""
    values, base = _read_block(unit, store=store is not None)
    try:
        scores = block_scores(unit.params.strategy, to_float32(values, unit.ft_info.dtype),
                              None if base is None else to_float32(base, unit.base_info.dtype))
    except NonFiniteRowError as exc:
        raise _nonfinite(unit, exc) from None
    bins = score_bins(scores)
    hist = bin_histogram(bins)
    out = {"bins": hist[0], "counts": hist[1]}
    if store is not None:
        out.update(_spill(unit, store, scores, bins, hist, values, base))
    return out


def _from_spill(unit: WorkUnit, store: Store):
    """(mask, values, base or None) of a budgeted block built from its spill, or None when there is
    no usable spill or the budget is above what it kept.

    The mask is block_top_mask of the whole block's scores (budget.keep_among_candidates: the
    candidates are a prefix of the block's order). The arrays hold the fine-tune's (and base's)
    bits at every candidate, zeros elsewhere: the part writer reads only kept entries, so the part
    is the one the full block gives, byte for byte."""
    spill = open_spill(store.spill_path(unit.finetune, *unit.key), _spill_identity(unit), unit.elements)
    if spill is None or unit.budget > spill.count or (spill.base is not None) != _codec_needs_base(unit):
        return None
    positions = np.flatnonzero(np.unpackbits(spill.candidates, count=unit.elements, bitorder="little").view(bool))
    if positions.size != spill.count:
        return None
    flags = keep_among_candidates(spill.bins, (spill.group_bins, spill.group_counts), unit.budget,
                                  lambda at: spill.scores[at])
    shape = (unit.rows, unit.ft_info.row_geometry[1])
    mask = np.zeros(unit.elements, dtype=bool)
    mask[positions[flags]] = True
    values = np.zeros(unit.elements, dtype=storage_dtype(unit.ft_info.dtype))
    values[positions] = spill.values  # a scatter by index: several times faster than np.place here
    base = None
    if spill.base is not None:
        base = np.zeros(unit.elements, dtype=storage_dtype(unit.base_info.dtype))
        base[positions] = spill.base
        base = base.reshape(shape)
    return mask.reshape(shape), values.reshape(shape), base


def process_unit(unit: WorkUnit, store: Store, device: str | None = None) -> dict:
    """Select and store one block on `device` (None/"cpu": numpy; "cuda...": torch on the GPU;
    "torch": the GPU code path on the CPU, for tests). Returns the store's block record plus
    timings: wall seconds (total, read, select) and cpu_seconds, this process's CPU time for the
    unit, which stays meaningful when other work shares the cores (benchmarks/e2e.py compares it
    with the kernel's)."""
    t0, c0 = time.perf_counter(), time.process_time()
    if unit.action == "whole":
        record = store.write_whole(unit.finetune, unit.tensor, read_tensor_array(unit.ft_info), unit.ft_info.dtype)
        record["seconds"] = time.perf_counter() - t0
        record["cpu_seconds"] = time.process_time() - c0
        return record
    spilled = _from_spill(unit, store) if unit.budget is not None else None
    if spilled is not None:
        mask, values, base = spilled
        t_read = t_select = time.perf_counter()
        numpy_bits = True
    else:
        values, base = _read_block(unit, device, store=True)
        t_read = time.perf_counter()
        select_base = base if STRATEGIES[unit.params.strategy].needs_base else None
        rows = values if _on_cpu(device) else values.to("cpu" if device == "torch" else device)
        try:
            mask = _select_in_chunks(unit, rows, select_base, device)
        except NonFiniteRowError as exc:
            raise _nonfinite(unit, exc) from None
        except KenError as exc:
            raise KenError(f"{unit.ft_info.file}: tensor {unit.tensor!r}: {exc}") from None
        t_select = time.perf_counter()
        numpy_bits = _on_cpu(device)
    record = store.write_block(unit.finetune, unit.tensor, unit.row_start, unit.row_end, mask, values,
                               unit.ft_info.dtype if numpy_bits else None, codec=unit.params.codec,
                               base=base)
    if unit.budget is not None:
        record["budget"] = unit.budget  # resume reuses the block only under the same budget
        record["from_spill"] = spilled is not None
    record["seconds"] = time.perf_counter() - t0
    record["cpu_seconds"] = time.process_time() - c0
    record["read_seconds"] = t_read - t0
    record["select_seconds"] = t_select - t_read
    return record
