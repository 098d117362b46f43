"""A resident fine-tune's share of one model tensor in compact form, and the walks that write it.

Why compact: a resident kept entry as an int32 flat position + its value costs 6 bytes for bf16,
three times the ~2 bytes the store spends on it. The positions are kept instead in whichever of
two forms is smaller for the tensor:
  mask  the row-wise little-order bitmask the store itself holds (ceil(n/8) bytes a row, padding
        bits zero): 1/8 byte per entry of the tensor, so 0.5 byte per kept entry at keep 0.25;
  gaps  one uint8 per kept entry, the distance from the previous kept flat position (the first
        from -1); a distance of 255 or more is 255 here and its true value in `escapes`
        (int64, 8 bytes each, counted), so ~1 byte per kept entry below keep 1/8.
The values stay decoded in the model tensor's dtype (lossy codecs included: decoding is done
once, not per switch), on the tensor's device.

Why no int64 index array per switch: on the CPU a compiled walk (numba, no GIL, so tensors go in
parallel threads) reads the mask bytes or gaps in order and writes each value straight into the
tensor's memory (a numpy view of its bits: bf16 moves as uint16, never converted), or saves the
value it replaces, or both in one pass. On another device (CUDA) the same positions are expanded
with torch ops (shifts and nonzero of the mask, cumsum of the gaps) into a transient index for
one index_copy_ / index_select on the device; `torch_ops=True` runs that path on a CPU tensor,
which is how it is tested without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba.cpython.unsafe.numbers import trailing_zeros

from ken_dist.checkpoints.dtypes import bits_word
from ken_dist.store.parts import popcount_rows

__all__ = ["Entries", "compact_positions", "walk", "PUT", "TAKE", "SWAP"]

ESCAPE = 255
PUT, TAKE, SWAP = 0, 1, 2  # flat[p] = values; saved = flat[p]; both, saved read before the write

_LOWEST_BIT = np.array([((b & -b).bit_length() - 1) if b else 0 for b in range(256)], np.uint8)


@dataclass
class Entries:
    """One model tensor's share of a fine-tune: `values` (model dtype, flat) at the kept positions
    given by `mask` (uint8, [rows * ceil(row_len/8)]) or by `gaps` (uint8) + `escapes` (int64);
    neither: every entry of the tensor (a tensor stored whole)."""
    values: torch.Tensor
    row_len: int = 0
    mask: torch.Tensor | None = None
    gaps: torch.Tensor | None = None
    escapes: torch.Tensor | None = None

    @property
    def whole(self) -> bool:
        return self.mask is None and self.gaps is None

    @property
    def form(self) -> str:
        return "whole" if self.whole else "mask" if self.mask is not None else "gaps"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.mask, self.gaps, self.escapes)
                   if t is not None)

    def to(self, device, pinned: bool = False) -> Entries:
        """The same entries on `device` (pinned host memory instead when pinned)."""
        def move(t):
            if t is None:
                return None
            return t.cpu().pin_memory() if pinned else t.to(device)
        return Entries(move(self.values), self.row_len, move(self.mask), move(self.gaps), move(self.escapes))

    def positions(self, device) -> torch.Tensor:
        """The kept flat positions as an int64 tensor on `device`, by torch ops (the CUDA path)."""
        if self.mask is not None:
            nb = (self.row_len + 7) // 8
            m = self.mask.to(device).view(-1, nb)
            shifts = torch.arange(8, dtype=torch.uint8, device=device)
            bits = ((m.unsqueeze(-1) >> shifts) & 1).view(m.shape[0], nb * 8)[:, : self.row_len]
            return bits.reshape(-1).nonzero().view(-1)
        gaps = self.gaps.to(device, torch.int64)
        if self.escapes.numel():
            gaps[gaps == ESCAPE] = self.escapes.to(device)
        return gaps.cumsum_(0).sub_(1)

    @classmethod
    def from_keep(cls, keep: torch.Tensor, values: torch.Tensor) -> Entries:
        """Entries in mask form from a [rows, row_len] bool keep mask on any device (torch ops):
        for callers that draw masks on a device (benchmarks/gpu_kernel.py)."""
        rows, n = keep.shape
        nb = (n + 7) // 8
        padded = torch.zeros(rows, nb * 8, dtype=torch.uint8, device=keep.device)
        padded[:, :n] = keep
        weights = (1 << torch.arange(8, device=keep.device, dtype=torch.int32)).to(torch.uint8)
        mask = (padded.view(rows, nb, 8) * weights).sum(-1, dtype=torch.uint8).view(-1)
        return cls(values.reshape(-1), n, mask=mask)


# ---- compiled CPU walks -------------------------------------------------------------------------
# A row length that is a multiple of 8 leaves no padding bits: the bitmask is then one bit stream
# over the flat positions and is walked 64 bits at a time (one trailing-zero count per kept entry);
# other row lengths walk byte by byte, row by row.
@numba.njit(cache=True, nogil=True)
def _walk_words(flat, words, tail, values, saved, mode):
    i = 0
    for w in range(words.size):
        x = words[w]
        p0 = w * 64
        while x:
            _visit(flat, p0 + np.int64(trailing_zeros(x)), values, saved, i, mode)
            x &= x - np.uint64(1)
            i += 1
    for b in range(tail.size):
        i = _walk_byte(flat, np.int64(tail[b]), words.size * 64 + 8 * b, values, saved, i, mode)
    return i


@numba.njit(cache=True, nogil=True)
def _walk_rows(flat, mask, nb, n, values, saved, mode):
    i = 0
    for r in range(mask.size // nb):
        for b in range(nb):
            i = _walk_byte(flat, np.int64(mask[r * nb + b]), r * n + 8 * b, values, saved, i, mode)
    return i


@numba.njit(cache=True, nogil=True, inline="always")
def _visit(flat, p, values, saved, i, mode):
    """Kept entry i at flat position p: save what is there (TAKE, SWAP), write its value (PUT, SWAP)."""
    if mode != PUT:
        saved[i] = flat[p]
    if mode != TAKE:
        flat[p] = values[i]


@numba.njit(cache=True, nogil=True, inline="always")
def _walk_byte(flat, x, p0, values, saved, i, mode):
    """The kept entries of one mask byte x whose bit 0 is flat position p0, from entry i; next i."""
    while x:
        _visit(flat, p0 + _LOWEST_BIT[x], values, saved, i, mode)
        x &= x - 1
        i += 1
    return i


@numba.njit(cache=True, nogil=True)
def _walk_gaps(flat, gaps, escapes, values, saved, mode):
    p = -1
    e = 0
    for i in range(gaps.size):
        g = gaps[i]
        if g == ESCAPE:
            p += escapes[e]
            e += 1
        else:
            p += g
        _visit(flat, p, values, saved, i, mode)
    return gaps.size


@numba.njit(cache=True, nogil=True)
def _gap(p, last, i, e, gaps, escapes):
    """Record position p after `last` as gap i (escape e when it does not fit a byte); next e."""
    if i < gaps.size:
        g = p - last
        if g >= ESCAPE:
            gaps[i] = ESCAPE
            escapes[e] = g
            return e + 1
        gaps[i] = g
    return e


@numba.njit(cache=True, nogil=True)
def _gaps_of_words(words, tail, gaps, escapes):
    i = 0
    e = 0
    last = -1
    for w in range(words.size):
        x = words[w]
        while x:
            p = w * 64 + np.int64(trailing_zeros(x))
            x &= x - np.uint64(1)
            e = _gap(p, last, i, e, gaps, escapes)
            last = p
            i += 1
    for b in range(tail.size):
        x = np.int64(tail[b])
        while x:
            p = words.size * 64 + 8 * b + _LOWEST_BIT[x]
            x &= x - 1
            e = _gap(p, last, i, e, gaps, escapes)
            last = p
            i += 1
    return i, e


@numba.njit(cache=True, nogil=True)
def _gaps_of_rows(mask, nb, n, gaps, escapes):
    i = 0
    e = 0
    last = -1
    for r in range(mask.size // nb):
        for b in range(nb):
            x = np.int64(mask[r * nb + b])
            while x:
                p = r * n + 8 * b + _LOWEST_BIT[x]
                x &= x - 1
                e = _gap(p, last, i, e, gaps, escapes)
                last = p
                i += 1
    return i, e


def _split_words(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whole 64-bit little-endian words, trailing bytes) of a bitmask, no copy."""
    whole = mask.size // 8 * 8
    return mask[:whole].view("<u8"), mask[whole:]


def compact_positions(packed: np.ndarray, row_len: int, kept: int) -> dict:
    """The smaller resident form of a tensor's [rows * ceil(row_len/8)] bitmask (padding bits zero)
    with `kept` set bits: {"mask": packed} or {"gaps": uint8, "escapes": int64}. ValueError when
    the bitmask holds another number of entries."""
    nb = (row_len + 7) // 8
    if kept >= packed.size:  # gaps cost at least a byte per kept entry
        entries = int(popcount_rows(packed.reshape(-1, nb), row_len).sum()) if packed.size else 0
        if entries != kept:
            raise ValueError(f"the bitmask holds {entries} entries, expected {kept}")
        return {"mask": packed}
    # a gap of 255 or more spans 255 positions: at most numel / 255 + 1 of them
    gaps, escapes = np.empty(kept, np.uint8), np.empty(packed.size * 8 // ESCAPE + 1, np.int64)
    if row_len % 8 == 0:
        entries, n_esc = _gaps_of_words(*_split_words(packed), gaps, escapes)
    else:
        entries, n_esc = _gaps_of_rows(packed, nb, row_len, gaps, escapes)
    if entries != kept:
        raise ValueError(f"the bitmask holds {entries} entries, expected {kept}")
    if kept + 8 * n_esc >= packed.size:
        return {"mask": packed}
    return {"gaps": gaps, "escapes": escapes[:n_esc].copy()}


def bits(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor's bits as same-size unsigned integers (bf16:
    uint16), sharing its memory: writes through it change the tensor."""
    size = t.element_size()
    view = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size])
    return view.numpy().reshape(-1).view(bits_word(size))


def walk(e: Entries, flat: torch.Tensor, mode: int, values: torch.Tensor | None = None,
         saved: torch.Tensor | None = None, torch_ops: bool = False) -> int:
    """On flat tensor `flat` at e's positions: PUT values, TAKE into saved, or SWAP (both: saved
    gets what values replace). values and saved: flat tensors of flat's dtype holding at least
    e's entry count. The compiled walk on a CPU tensor unless torch_ops; torch ops otherwise.
    Returns the entries walked. The compiled walk checks no bound per entry: what it needs is
    checked here, and an Entries' positions lie inside the tensor by construction."""
    count = e.values.numel()
    if (mode != TAKE and values is None) or (mode != PUT and saved is None):
        raise ValueError("PUT and SWAP need values, TAKE and SWAP need saved")
    if e.mask is not None and e.mask.numel() // ((e.row_len + 7) // 8) * e.row_len != flat.numel():
        raise ValueError(f"a bitmask of {e.mask.numel()} bytes for rows of {e.row_len} does not fit a tensor of "
                         f"{flat.numel()} entries")
    for name, t in (("values", values), ("saved", saved)):
        if t is not None and (t.numel() < count or t.dtype != flat.dtype):
            raise ValueError(f"{name} holds {t.numel()} {t.dtype} entries, the walk needs {count} {flat.dtype}")
    if e.whole:
        if mode != PUT:
            saved[:count].copy_(flat)
        if mode != TAKE:
            flat.copy_(values[:count])
        return count
    if flat.device.type == "cpu" and not torch_ops and (values is None or values.device.type == "cpu") \
            and (saved is None or saved.device.type == "cpu"):
        fb = bits(flat)
        vb = bits(values) if values is not None else fb[:0]
        sb = bits(saved) if saved is not None else fb[:0]
        if e.mask is not None and e.row_len % 8 == 0:
            done = _walk_words(fb, *_split_words(e.mask.numpy()), vb, sb, mode)
        elif e.mask is not None:
            done = _walk_rows(fb, e.mask.numpy(), (e.row_len + 7) // 8, e.row_len, vb, sb, mode)
        else:
            done = _walk_gaps(fb, e.gaps.numpy(), e.escapes.numpy(), vb, sb, mode)
        return int(done)
    index = e.positions(flat.device)
    if mode != PUT:
        torch.index_select(flat, 0, index, out=saved[:count])
    if mode != TAKE:
        flat.index_copy_(0, index, values[:count].to(flat.device, non_blocking=True))
    return count
