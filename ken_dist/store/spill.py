"""Candidate spills of a model-budget job: what the scoring pass keeps of a block for its selection.

Why: a strategy of scope "model" scores every block before any block's budget is known
(ken_dist/kernel/strategies/budget.py). Instead of reading and scoring the block again once the
budget is known, the scoring pass writes the block's best-scored entries (whole score bins from
the top, budget.candidate_floor) to a spill file, and the selection pass builds the part from it
when the budget fits (ken_dist/job/execute.py).

The entries are grouped by score bin, highest bin first, flat position ascending within a group,
so that a budget needs only a prefix of the file: every group above the block's boundary whole,
and the exact float64 scores of the one group it cuts. Arrays, back to back in this order after
MAGIC and one JSON header line (little-endian):
    groups     int64    entries per group
    positions  uint32 or int64   flat positions in the block
    values     the fine-tune's storage bits at those positions
    base       the base's storage bits there (only when the value codec stores the delta)
    scores     float64, the strategy's scores there

A spill is an optimization, never the truth: it is published atomically (ken_dist.store.fs), its
header carries the identity of the block and parameters it was scored under and every array's
length, and `open_spill` answers None for a file that is absent, torn (size), foreign or stale,
so the caller reads and scores the block again. Like the checkpoint files the job reads, its
bytes carry no checksum.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ken_dist.store.fs import atomic_output

MAGIC = b"KENSPILL2\n"
ARRAYS = ("groups", "positions", "values", "base", "scores")
_HEADER_MAX = 1 << 20


@dataclass(frozen=True)
class Spill:
    groups: np.ndarray         # int64, entries per score bin, highest bin first
    positions: np.ndarray      # flat positions in the block, by group, ascending within one
    values: np.ndarray         # the fine-tune's storage bits at those positions
    base: np.ndarray | None    # the base's storage bits there (a codec that stores the delta), else None
    scores: np.ndarray         # float64 scores there

    @property
    def count(self) -> int:
        return int(self.positions.size)


def write_spill(path: str, identity: dict, spill: Spill) -> int:
    """Publish `spill` at `path` (atomically); returns its size in bytes. `identity` (JSON) is what
    open_spill must be given back to accept the file."""
    present = {k: np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<"), copy=False)
               for k in ARRAYS if (v := getattr(spill, k)) is not None}
    header = {"identity": identity, "arrays": {k: [v.dtype.str, int(v.size)] for k, v in present.items()}}
    head = MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "xb") as f:
        f.write(head)
        for v in present.values():
            f.write(memoryview(v).cast("B"))
    return len(head) + sum(v.nbytes for v in present.values())


class SpillReader:
    """An open spill file whose header matched: `groups` in memory, the other arrays read by slice."""

    def __init__(self, f, arrays: dict, start: int, groups: np.ndarray):
        self._f, self._arrays, self.groups = f, arrays, groups
        self._offsets, at = {}, start
        for k in ARRAYS:
            if k in arrays:
                self._offsets[k] = at
                at += arrays[k][0].itemsize * arrays[k][1]

    @property
    def count(self) -> int:
        return self._arrays["positions"][1]

    @property
    def has_base(self) -> bool:
        return "base" in self._arrays

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Entries [start, stop) of one array."""
        dtype = self._arrays[name][0]
        self._f.seek(self._offsets[name] + start * dtype.itemsize)
        return np.fromfile(self._f, dtype=dtype, count=stop - start)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_spill(path: str, identity: dict) -> SpillReader | None:
    """The spill at `path` if it is whole and was written for `identity`; None otherwise (absent,
    torn, another block or other parameters). An unreadable file is an OSError."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    try:
        reader = _check(f, identity)
    except BaseException:
        f.close()
        raise
    if reader is None:
        f.close()
    return reader


def _check(f, identity: dict) -> SpillReader | None:
    if f.read(len(MAGIC)) != MAGIC:
        return None
    try:
        header = json.loads(f.readline(_HEADER_MAX))
        if header["identity"] != identity:
            return None
        arrays = {k: (np.dtype(d), int(n)) for k, (d, n) in header["arrays"].items()}
    except (ValueError, TypeError, KeyError):
        return None
    required = {"groups", "positions", "values", "scores"}
    if not required <= set(arrays) <= set(ARRAYS) or \
            len({n for k, (_, n) in arrays.items() if k != "groups"}) != 1:
        return None
    start = f.tell()
    if os.fstat(f.fileno()).st_size - start != sum(d.itemsize * n for d, n in arrays.values()):
        return None
    groups = np.fromfile(f, dtype=arrays["groups"][0], count=arrays["groups"][1])
    if (groups < 0).any() or int(groups.sum()) != arrays["positions"][1]:
        return None
    return SpillReader(f, arrays, start, groups)
