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

__all__ = ["Entries", "compact_positions", "compactable", "walk", "walk_compacting", "PUT", "TAKE", "SWAP"]

ESCAPE = 255
PUT, TAKE, SWAP, NONE = 0, 1, 2, 3  # flat[p] = values; saved = flat[p]; both, saved read before the write; neither

_NOTHING, _NO_ESCAPES = np.zeros(0, np.uint8), np.zeros(0, np.int64)  # what a walk does not use
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
# other row lengths walk byte by byte, row by row. A bitmask walk can also record the gaps of the
# positions it visits (when gaps.size > 0): the cold switch turns a fresh fine-tune's bitmask into
# gaps in the same pass that writes it, and compact_positions is that walk visiting nothing (NONE).
# Both return (entries walked, escapes recorded); -1 entries: more than gaps holds. Per kept entry:
# save what is there (TAKE, SWAP), write its value (PUT, SWAP). What a walk does is decided once,
# before the loop (_flags, into locals), and the per-entry steps are written out in each loop, not
# called: numba compiled the per-entry tests, and the same steps as inlined helpers, up to 10x
# slower.
@numba.njit(cache=True, nogil=True, inline="always")
def _flags(mode, gaps):
    """(save what is there, write the value, room for gaps: 0 records none) for this walk."""
    return mode == TAKE or mode == SWAP, mode == PUT or mode == SWAP, gaps.size


@numba.njit(cache=True, nogil=True)
def _walk_words(flat, words, tail, values, saved, mode, gaps, escapes):
    """tail: the mask's last bytes as one zero-padded word (or none)."""
    take, put, room = _flags(mode, gaps)
    i = 0
    e = 0
    last = -1
    whole = words.size
    for w in range(whole + tail.size):
        x = words[w] if w < whole else tail[0]
        p0 = w * 64
        while x:
            p = p0 + np.int64(trailing_zeros(x))
            if room:
                if i >= room:
                    return -1, e
                g = p - last
                gaps[i] = min(g, ESCAPE)
                if g >= ESCAPE:
                    escapes[e] = g
                    e += 1
                last = p
            if take:
                saved[i] = flat[p]
            if put:
                flat[p] = values[i]
            x &= x - np.uint64(1)
            i += 1
    return i, e


@numba.njit(cache=True, nogil=True)
def _walk_rows(flat, mask, nb, n, values, saved, mode, gaps, escapes):
    take, put, room = _flags(mode, gaps)
    i = 0
    e = 0
    last = -1
    for r in range(mask.size // nb):
        for b in range(nb):
            x = np.int64(mask[r * nb + b])
            p0 = r * n + 8 * b
            while x:
                p = p0 + _LOWEST_BIT[x]
                if room:
                    if i >= room:
                        return -1, e
                    g = p - last
                    gaps[i] = min(g, ESCAPE)
                    if g >= ESCAPE:
                        escapes[e] = g
                        e += 1
                    last = p
                if take:
                    saved[i] = flat[p]
                if put:
                    flat[p] = values[i]
                x &= x - 1
                i += 1
    return i, e


@numba.njit(cache=True, nogil=True)
def _walk_gaps(flat, gaps, escapes, values, saved, mode):
    take, put, _ = _flags(mode, gaps[:0])
    p = -1
    e = 0
    for i in range(gaps.size):
        g = gaps[i]
        if g == ESCAPE:
            p += escapes[e]
            e += 1
        else:
            p += g
        if take:
            saved[i] = flat[p]
        if put:
            flat[p] = values[i]
    return gaps.size


def _split_words(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whole 64-bit little-endian words, no copy; the trailing bytes as one zero-padded word, or
    none) of a bitmask."""
    whole = mask.size // 8 * 8
    tail = np.zeros(8 if mask.size > whole else 0, np.uint8)
    tail[: mask.size - whole] = mask[whole:]
    return mask[:whole].view("<u8"), tail.view("<u8")


def _mask_walk(mask: np.ndarray, row_len: int, fb, vb, sb, mode: int, gaps, escapes) -> tuple[int, int]:
    """The compiled bitmask walk for rows of row_len entries (see the kernels)."""
    if row_len % 8 == 0:
        return _walk_words(fb, *_split_words(mask), vb, sb, mode, gaps, escapes)
    return _walk_rows(fb, mask, (row_len + 7) // 8, row_len, vb, sb, mode, gaps, escapes)


def _gap_buffers(kept: int, mask_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Room for the gaps of `kept` entries of a bitmask of mask_bytes bytes: a gap of 255 or more
    spans 255 positions, so at most 8 * mask_bytes / 255 + 1 escapes."""
    return np.empty(kept, np.uint8), np.empty(mask_bytes * 8 // ESCAPE + 1, np.int64)


def _smaller_form(packed: np.ndarray, gaps: np.ndarray, escapes: np.ndarray, n_esc: int) -> dict:
    """{"mask": packed} or {"gaps", "escapes"}, whichever costs fewer bytes."""
    if gaps.size + 8 * n_esc >= packed.size:
        return {"mask": packed}
    return {"gaps": gaps, "escapes": escapes[:n_esc].copy()}


def compact_positions(packed: np.ndarray, row_len: int, kept: int, counted: bool = False) -> dict:
    """The smaller resident form of a tensor's [rows * ceil(row_len/8)] bitmask (padding bits zero)
    with `kept` set bits: {"mask": packed} or {"gaps": uint8, "escapes": int64}. ValueError when
    the bitmask holds another number of entries (counted: the caller counted them already, so a
    bitmask that stays one is not counted again)."""
    nb = (row_len + 7) // 8
    if kept >= packed.size:  # gaps cost at least a byte per kept entry
        if counted:
            return {"mask": packed}
        entries = int(popcount_rows(packed.reshape(-1, nb), row_len).sum()) if packed.size else 0
        if entries != kept:
            raise ValueError(f"the bitmask holds {entries} entries, expected {kept}")
        return {"mask": packed}
    gaps, escapes = _gap_buffers(kept, packed.size)
    entries, n_esc = _mask_walk(packed, row_len, _NOTHING, _NOTHING, _NOTHING, NONE, gaps, escapes)
    if entries != kept:
        entries = entries if entries >= 0 else int(popcount_rows(packed.reshape(-1, nb), row_len).sum())
        raise ValueError(f"the bitmask holds {entries} entries, expected {kept}")
    return _smaller_form(packed, gaps, escapes, n_esc)


def bits(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor's bits as same-size unsigned integers (bf16:
    uint16), sharing its memory: writes through it change the tensor."""
    size = t.element_size()
    view = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size])
    return view.numpy().reshape(-1).view(bits_word(size))


def _checked(e: Entries, flat: torch.Tensor, mode: int, values, saved) -> int:
    """e's entry count, after checking that flat, values and saved fit it (ValueError)."""
    count = e.values.numel()
    if (mode != TAKE and values is None) or (mode != PUT and saved is None):
        raise ValueError("PUT and SWAP need values, TAKE and SWAP need saved")
    if e.mask is not None and e.mask.numel() // ((e.row_len + 7) // 8) * e.row_len != flat.numel():
        raise ValueError(f"a bitmask of {e.mask.numel()} bytes for rows of {e.row_len} does not fit a tensor of "
                         f"{flat.numel()} entries")
    for name, t in (("values", values), ("saved", saved)):
        if t is not None and (t.numel() < count or t.dtype != flat.dtype):
            raise ValueError(f"{name} holds {t.numel()} {t.dtype} entries, the walk needs {count} {flat.dtype}")
    return count


def _compiled(flat: torch.Tensor, values, saved, torch_ops: bool):
    """(flat, values, saved) as numpy views of their bits for the compiled walk, or None when it
    does not apply (another device, or torch_ops)."""
    if torch_ops or any(t is not None and t.device.type != "cpu" for t in (flat, values, saved)):
        return None
    fb = bits(flat)
    return fb, bits(values) if values is not None else fb[:0], bits(saved) if saved is not None else fb[:0]


def walk(e: Entries, flat: torch.Tensor, mode: int, values: torch.Tensor | None = None,
         saved: torch.Tensor | None = None, torch_ops: bool = False) -> int:
    """On flat tensor `flat` at e's positions: PUT values, TAKE into saved, or SWAP (both: saved
    gets what values replace). values and saved: flat tensors of flat's dtype holding at least
    e's entry count. The compiled walk on a CPU tensor unless torch_ops; torch ops otherwise.
    Returns the entries walked. The compiled walk checks no bound per entry: what it needs is
    checked here, and an Entries' positions lie inside the tensor by construction."""
    count = _checked(e, flat, mode, values, saved)
    if e.whole:
        if mode != PUT:
            saved[:count].copy_(flat)
        if mode != TAKE:
            flat.copy_(values[:count])
        return count
    arrays = _compiled(flat, values, saved, torch_ops)
    if arrays is not None:
        fb, vb, sb = arrays
        if e.mask is not None:
            return int(_mask_walk(e.mask.numpy(), e.row_len, fb, vb, sb, mode, _NOTHING, _NO_ESCAPES)[0])
        return int(_walk_gaps(fb, e.gaps.numpy(), e.escapes.numpy(), vb, sb, mode))
    index = e.positions(flat.device)
    if mode != PUT:
        torch.index_select(flat, 0, index, out=saved[:count])
    if mode != TAKE:
        flat.index_copy_(0, index, values[:count].to(flat.device, non_blocking=True))
    return count


def compactable(e: Entries) -> bool:
    """Whether e keeps its positions as a bitmask that its gaps might undercut (fewer kept entries
    than bitmask bytes): compact_positions' question, for an Entries built uncompacted."""
    return e.mask is not None and e.values.numel() < e.mask.numel()


def walk_compacting(e: Entries, flat: torch.Tensor, mode: int, values: torch.Tensor | None = None,
                    saved: torch.Tensor | None = None, torch_ops: bool = False) -> tuple[int, Entries]:
    """walk(), and e in its smaller form (compact_positions): (entries walked, e or its gaps
    form). Why: a fine-tune decoded for a switch is walked anyway; the compiled walk records the
    gaps in the same pass, where a pass of its own over the bitmask costs about as much again
    (torch ops: that separate pass, on the CPU)."""
    if not compactable(e):
        return walk(e, flat, mode, values, saved, torch_ops), e
    arrays = _compiled(flat, values, saved, torch_ops)
    if arrays is None:
        count = walk(e, flat, mode, values, saved, torch_ops)
        form = compact_positions(e.mask.cpu().numpy(), e.row_len, count)
        return count, Entries(e.values, e.row_len, **{k: torch.from_numpy(v).to(e.mask.device) for k, v in form.items()})
    count = _checked(e, flat, mode, values, saved)
    gaps, escapes = _gap_buffers(count, e.mask.numel())
    mask = e.mask.numpy()
    done, n_esc = _mask_walk(mask, e.row_len, *arrays, mode, gaps, escapes)
    if done != count:
        raise ValueError(f"the bitmask holds {'more than ' if done < 0 else ''}{max(done, count)} entries, "
                         f"expected {count}")
    form = _smaller_form(mask, gaps, escapes, n_esc)
    return count, Entries(e.values, e.row_len, **{k: torch.from_numpy(v) for k, v in form.items()})
