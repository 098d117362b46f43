"""Run one work unit: read its rows from the files, select, write the part. No Ray here, so a
unit runs the same in a Ray actor, in a test, or in a debugger.

On the CPU everything is numpy (blocks as storage bits, ken_dist/checkpoints/dtypes.py) and torch is never
imported, so a CPU actor starts sooner and holds less memory (measured: docs/performance.md).
A GPU device takes the torch path."""
from __future__ import annotations

import time

import numpy as np

from ken_dist.checkpoints.dtypes import to_float32
from ken_dist.checkpoints.reads import read_rows, read_rows_array, read_tensor_array
from ken_dist.errors import KenError, NonFiniteRowError
from ken_dist.job.plan import WorkUnit
from ken_dist.kernel import STRATEGIES, block_scores, select, select_array
from ken_dist.kernel.strategies.budget import score_histogram
from ken_dist.store.protocol import Store

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


def _needs_base(unit: WorkUnit, *, store: bool) -> bool:
    """Whether the unit reads the base rows: for its strategy, or (store=True) for a lossy value
    codec, which stores the delta to the base; read once in the unit either way."""
    return STRATEGIES[unit.params.strategy].needs_base or (
        store and unit.params.codec.applies_to(unit.ft_info.dtype))


def _read_block(unit: WorkUnit, device=None, *, store: bool = False):
    """(values, base or None): numpy storage bits for the CPU, torch tensors for a GPU."""
    read = read_rows_array if _on_cpu(device) else read_rows
    values = read(unit.ft_info, unit.row_start, unit.row_end)
    base = None
    if _needs_base(unit, store=store):
        base = read(unit.base_info, unit.row_start, unit.row_end)
    return values, base


def score_unit(unit: WorkUnit) -> dict:
    """Scoring pass of a model-budget strategy (ken_dist/kernel/strategies/budget.py): the block's score histogram."""
    values, base = _read_block(unit)
    try:
        scores = block_scores(unit.params.strategy, to_float32(values, unit.ft_info.dtype),
                              None if base is None else to_float32(base, unit.base_info.dtype))
    except NonFiniteRowError as exc:
        raise _nonfinite(unit, exc) from None
    bins, counts = score_histogram(scores)
    return {"bins": bins, "counts": counts}


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
    record = store.write_block(unit.finetune, unit.tensor, unit.row_start, unit.row_end, mask, values,
                               unit.ft_info.dtype if _on_cpu(device) else None, codec=unit.params.codec,
                               base=base)
    if unit.budget is not None:
        record["budget"] = unit.budget  # resume reuses the block only under the same budget
    record["seconds"] = time.perf_counter() - t0
    record["cpu_seconds"] = time.process_time() - c0
    record["read_seconds"] = t_read - t0
    record["select_seconds"] = t_select - t_read
    return record
