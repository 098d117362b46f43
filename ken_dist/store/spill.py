"""Candidate spills of a model-budget job: what the scoring pass keeps of a block for its selection.

Why: a strategy of scope "model" scores every block before any block's budget is known
(ken_dist/kernel/strategies/budget.py). Instead of reading and scoring the block again once the
budget is known, the scoring pass writes the block's best-scored entries (whole score bins from
the top, see budget.candidate_floor) to a spill file: their flat positions in the block
(ascending), exact float64 scores, fine-tuned storage bits and, when the value codec stores the
delta, the base's. The selection pass builds the part from it when the budget fits.

A spill is an optimization, never the truth: it is published atomically (ken_dist.store.fs), carries
the identity of the block and parameters it was scored under, its array sizes and a CRC32 of its
bytes, and `read_spill` answers None for anything absent, torn, foreign or stale, so the caller
reads and scores the block again. Layout (little-endian): MAGIC, one JSON header line, then the
arrays back to back in the order of ARRAYS.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass

import numpy as np

from ken_dist.store.fs import atomic_output

MAGIC = b"KENSPILL1\n"
ARRAYS = ("positions", "scores", "values", "base")
_HEADER_MAX = 1 << 16


@dataclass(frozen=True)
class Spill:
    positions: np.ndarray      # flat positions in the block, ascending
    scores: np.ndarray         # float64, the strategy's scores at those positions
    values: np.ndarray         # the fine-tune's storage bits at those positions
    base: np.ndarray | None    # the base's storage bits there (a codec that stores the delta), else None

    @property
    def count(self) -> int:
        return int(self.positions.size)


def _crc(arrays) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"), crc)
    return crc


def write_spill(path: str, identity: dict, spill: Spill) -> int:
    """Publish `spill` at `path` (atomically); returns its size in bytes. `identity` (JSON) is what
    read_spill must be given back to accept the file."""
    arrays = {"positions": spill.positions, "scores": spill.scores, "values": spill.values, "base": spill.base}
    present = {k: np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<"), copy=False)
               for k, v in arrays.items() if v is not None}
    header = {"identity": identity, "crc32": _crc(present.values()),
              "arrays": {k: [v.dtype.str, int(v.size)] for k, v in present.items()}}
    head = MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "xb") as f:
        f.write(head)
        for v in present.values():
            f.write(memoryview(v).cast("B"))
    return len(head) + sum(v.nbytes for v in present.values())


def read_spill(path: str, identity: dict) -> Spill | None:
    """The spill at `path` if it is whole and was written for `identity`; None otherwise (absent,
    torn, damaged, another block or other parameters). An unreadable file is an OSError."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        if f.read(len(MAGIC)) != MAGIC:
            return None
        line = f.readline(_HEADER_MAX)
        try:
            header = json.loads(line)
            if header["identity"] != identity:
                return None
            shapes = {k: (np.dtype(d), int(n)) for k, (d, n) in header["arrays"].items()}
        except (ValueError, TypeError, KeyError):
            return None
        if not {"positions", "scores", "values"} <= set(shapes) <= set(ARRAYS) or \
                len({n for _, n in shapes.values()}) != 1:
            return None
        size = os.fstat(f.fileno()).st_size
        if size - f.tell() != sum(d.itemsize * n for d, n in shapes.values()):
            return None
        arrays = {}
        for k in ARRAYS:
            if k in shapes:
                d, n = shapes[k]
                arrays[k] = np.fromfile(f, dtype=d, count=n)
    if _crc(arrays.values()) != header.get("crc32"):
        return None
    return Spill(arrays["positions"], arrays["scores"], arrays["values"],
                 arrays.get("base"))
