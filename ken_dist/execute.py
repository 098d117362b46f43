"""Run one work unit: read its rows from the files, select, write the part. No Ray here, so a
unit runs the same in a Ray actor, in a test, or in a debugger."""
from __future__ import annotations

import time

from ken_dist.checkpoint import read_rows, read_tensor
from ken_dist.errors import KenError, NonFiniteRowError
from ken_dist.kernel import STRATEGIES, select
from ken_dist.plan import WorkUnit
from ken_dist.store import Store


def process_unit(unit: WorkUnit, store: Store, device: str | None = None) -> dict:
    """Select and store one block; returns the store's block record plus timings."""
    t0 = time.perf_counter()
    if unit.action == "whole":
        record = store.write_whole(unit.finetune, unit.tensor, read_tensor(unit.ft_info))
        record["seconds"] = time.perf_counter() - t0
        return record
    values = read_rows(unit.ft_info, unit.row_start, unit.row_end)
    base = None
    if STRATEGIES[unit.params.strategy].needs_base:
        base = read_rows(unit.base_info, unit.row_start, unit.row_end)
    t_read = time.perf_counter()
    rows = values.to(device) if device not in (None, "cpu") else values
    try:
        mask = select(unit.params.strategy, rows, base, k=unit.params.k, keep=unit.params.keep,
                      seed=unit.seed, row_offset=unit.row_start, compat=unit.params.compat, device=device)
    except NonFiniteRowError as exc:
        row = unit.row_start + exc.row
        raise KenError(f"{unit.ft_info.file}: tensor {unit.tensor!r} row {row} holds NaN or infinity; "
                       "KEN needs finite weights (the fine-tune is corrupt or overflowed: re-export it)") from None
    except KenError as exc:
        raise KenError(f"{unit.ft_info.file}: tensor {unit.tensor!r}: {exc}") from None
    t_select = time.perf_counter()
    record = store.write_block(unit.finetune, unit.tensor, unit.row_start, unit.row_end, mask.cpu(), values)
    record["seconds"] = time.perf_counter() - t0
    record["read_seconds"] = t_read - t0
    record["select_seconds"] = t_select - t_read
    return record
