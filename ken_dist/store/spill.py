"""Candidate spills of a model-budget job: what the scoring pass keeps of a block for its selection.

Why: a strategy of scope "model" scores every block before any block's budget is known
(ken_dist/kernel/strategies/budget.py). Instead of reading and scoring the block again once the
budget is known, the scoring pass writes the block's best-scored entries (whole score bins from
the top, budget.candidate_floor) to a spill file, and the selection pass builds the part from it
when the budget fits (ken_dist/job/execute.py). Arrays, back to back after MAGIC and one JSON
header line (little-endian), the per-candidate ones in the block's flat order:
    group_bins, group_counts   uint16, int64: the sparse histogram of the candidates' score bins
    candidates  uint8      which entries of the block are candidates, a bitmask (little bit order)
    bins        uint16     each candidate's score bin
    values      the fine-tune's storage bits
    base        the base's storage bits (only when the value codec stores the delta)
    scores      float64, the strategy's exact scores (used only in the bin a budget ends in)
At 1/4 kept that is about 6 bytes per entry of the block for a bf16 fine-tune (candidates are
about half of it: ken_dist/job/execute.py, SPILL_SHARES).

A spill is an optimization, never the truth: it is published atomically (ken_dist.store.fs) but
not fsync'ed (gigabytes of temporaries would otherwise wait on the disk; the page cache holds
them, and most are deleted before they reach it), so its header carries a CRC32 of its arrays as
well as the identity of the block and parameters it was scored under and every array's length.
`open_spill` answers None for a file that is absent, torn, damaged (after a power cut, say),
foreign or stale, so the caller reads and scores the block again.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass

import numpy as np

from ken_dist.store.fs import atomic_output

MAGIC = b"KENSPILL3\n"
ARRAYS = ("group_bins", "group_counts", "candidates", "bins", "values", "base", "scores")
_PER_CANDIDATE = ("bins", "values", "base", "scores")
_HEADER_MAX = 1 << 20


@dataclass(frozen=True)
class Spill:
    size: int                   # entries in the block
    group_bins: np.ndarray
    group_counts: np.ndarray
    candidates: np.ndarray      # packed bitmask of the candidates, (size + 7) // 8 bytes
    bins: np.ndarray
    values: np.ndarray
    base: np.ndarray | None
    scores: np.ndarray

    @property
    def count(self) -> int:
        return int(self.bins.size)

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays (the file adds a header of a few hundred bytes)."""
        return sum(v.nbytes for k in ARRAYS if (v := getattr(self, k)) is not None)


def _crc32(arrays) -> int:
    crc = 0
    for v in arrays:
        crc = zlib.crc32(memoryview(np.ascontiguousarray(v)).cast("B"), crc)
    return crc


def write_spill(path: str, identity: dict, spill: Spill) -> int:
    """Publish `spill` at `path` (atomically); returns its size in bytes. `identity` (JSON) is what
    open_spill must be given back to accept the file."""
    present = {k: np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<"), copy=False)
               for k in ARRAYS if (v := getattr(spill, k)) is not None}
    header = {"identity": identity, "size": int(spill.size), "crc32": _crc32(present.values()),
              "arrays": {k: [v.dtype.str, int(v.size)] for k, v in present.items()}}
    head = MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_output(path, durable=False) as tmp, open(tmp, "xb") as f:
        f.write(head)
        for v in present.values():
            f.write(memoryview(v).cast("B"))
    return len(head) + sum(v.nbytes for v in present.values())


def open_spill(path: str, identity: dict, size: int) -> Spill | None:
    """The spill at `path` if it is whole and was written for `identity` and a block of `size`
    entries; None otherwise (absent, torn, damaged, another block or other parameters). Its arrays
    map the file read-only. An unreadable file is an OSError."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        if f.read(len(MAGIC)) != MAGIC:
            return None
        try:
            header = json.loads(f.readline(_HEADER_MAX))
            if header["identity"] != identity or header["size"] != size:
                return None
            arrays = {k: (np.dtype(d), int(n)) for k, (d, n) in header["arrays"].items()}
        except (ValueError, TypeError, KeyError):
            return None
        start = f.tell()
        file_size = os.fstat(f.fileno()).st_size
    if not set(ARRAYS) - {"base"} <= set(arrays) <= set(ARRAYS) \
            or len({arrays[k][1] for k in _PER_CANDIDATE if k in arrays}) != 1 \
            or arrays["candidates"][1] != (size + 7) // 8 or arrays["group_bins"][1] != arrays["group_counts"][1] \
            or file_size - start != sum(d.itemsize * n for d, n in arrays.values()):
        return None
    out, at = {}, start
    for k in ARRAYS:
        if k in arrays:
            d, n = arrays[k]
            out[k] = np.memmap(path, dtype=d, mode="r", offset=at, shape=(n,)) if n else np.empty(0, d)
            at += d.itemsize * n
    if _crc32(out.values()) != header.get("crc32"):
        return None
    spill = Spill(size=size, base=out.get("base"), **{k: v for k, v in out.items() if k != "base"})
    return spill if int(np.asarray(spill.group_counts).sum()) == spill.count else None
