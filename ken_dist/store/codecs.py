"""Value codecs of a subnetwork store (format version 2): how the kept entries' values are stored.

`raw` copies the fine-tuned bits (bit-exact; format version 1 stores only this). The lossy codecs
store the kept *delta* d = fine-tuned - base, quantized to b bits with one scale s per group of
kept entries: a code c in [0, 2^b) stands for the odd multiple m = 2c - (2^b - 1) of s, so the
levels are +-s, +-3s, ... +-(2^b - 1)s. Odd multiples (no zero level) because a kept entry was
kept for having moved: a zero level would waste one of 2 or 4 levels on the entries least worth
storing; with b = 1 this is BitDelta's representation (sign of d times one scale).

Why the scales are fitted rather than copied from max|d|: for fixed codes the squared error of a
group is least at s = sum(d m) / sum(m^2), and for fixed s the nearest level is best, so the
encoder alternates the two (Lloyd's algorithm, monotone in the error), starting from
s = max|d| / (2^b - 1). For b = 1 the first fit is exact: s = mean |d| (BitDelta's scale). The
scale is then rounded to bfloat16 (the exponent range of float32, so no tensor's deltas under-
or overflow it; 8 bits of precision cost < 0.4% of a step) and the codes are chosen once more
for the rounded scale, so they are the nearest levels of the scale actually stored.

Rebuilding (normative, docs/format.md "Value codecs"): in float64 for F64 tensors and float32
otherwise, delta = float(m) * s and value = base + delta, each one IEEE operation rounded to
nearest even, then converted to the tensor dtype rounding to nearest even. Everything here is
numpy and pure; parts.py packs the codes and scales into the part's columns.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ken_dist.checkpoints.dtypes import storage_dtype, to_float32

RAW = "raw"
LOSSY_BITS = {"int8": 8, "int4": 4, "int2": 2, "sign": 1}
LOSSY_DTYPES = ("BF16", "F16", "F32", "F64")  # others (fp8) keep raw values
_LLOYD_ROUNDS = 4
_SPEC = re.compile(r"(raw|int8|int4|int2|sign)(?:-g([1-9][0-9]*))?")


@dataclass(frozen=True)
class Codec:
    """A value codec: `name` (raw, int8, int4, int2, sign) and `group`, the kept entries per
    scale in index order within a row (0: one scale per row)."""
    name: str = RAW
    group: int = 0

    @property
    def bits(self) -> int:
        return LOSSY_BITS.get(self.name, 0)

    @property
    def lossy(self) -> bool:
        return self.name != RAW

    @property
    def spec(self) -> str:
        return self.name + (f"-g{self.group}" if self.group else "")

    def applies_to(self, dtype: str) -> bool:
        """Whether a tensor of this dtype is stored with this codec (raw otherwise)."""
        return self.lossy and dtype in LOSSY_DTYPES


RAW_CODEC = Codec()


def parse_codec(spec) -> Codec:
    """'raw', 'int8', 'int4', 'int2', 'sign', each lossy one optionally '-gG' (G kept entries per
    scale, e.g. 'int4-g64'); ValueError with the choices otherwise."""
    m = _SPEC.fullmatch(str(spec)) if isinstance(spec, str) else None
    if not m or (m.group(1) == RAW and m.group(2)):
        raise ValueError(f"unknown value codec {spec!r}; choose raw (exact, the default), int8, int4, int2 or "
                         "sign, a lossy one optionally with -gG for one scale per G kept entries (e.g. int4-g64)")
    return Codec(m.group(1), int(m.group(2) or 0))


def _compute_dtype(dtype: str):
    return np.float64 if dtype == "F64" else np.float32


def widen(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Values of storage bits in the codec's compute dtype (exact)."""
    return bits.astype(np.float64) if dtype == "F64" else to_float32(bits, dtype)


def narrow(values: np.ndarray, dtype: str) -> np.ndarray:
    """Storage bits of finite compute-dtype values, rounded to nearest even (overflow gives +-inf)."""
    if dtype == "BF16":
        u = np.ascontiguousarray(values, np.float32).view(np.uint32)
        return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    with np.errstate(over="ignore"):
        return values.astype(storage_dtype(dtype))


def bf16_scale_bits(s: np.ndarray) -> np.ndarray:
    """Scales (float64, >= 0) as bfloat16 bits, rounded to nearest even."""
    return narrow(s.astype(np.float32), "BF16")


def scale_values(bits: np.ndarray) -> np.ndarray:
    """float32 scales of stored bfloat16 bits."""
    return to_float32(bits.astype(np.uint16, copy=False), "BF16")


def rank_in_row(kept_per_row: np.ndarray) -> np.ndarray:
    """For kept entries listed row by row, each one's position among its row's kept entries."""
    kept_per_row = np.asarray(kept_per_row, np.int64)
    first = np.repeat(np.cumsum(kept_per_row) - kept_per_row, kept_per_row)
    return np.arange(first.size, dtype=np.int64) - first


def groups_per_row(kept_per_row: np.ndarray, group: int) -> np.ndarray:
    """Scales each row stores: ceil(kept / group), or 1 for a row with kept entries when group is 0."""
    kept_per_row = np.asarray(kept_per_row, np.int64)
    return np.minimum(kept_per_row, 1) if group == 0 else -(-kept_per_row // group)


def group_index(kept_per_row: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(group of each kept entry, groups per row) for kept entries listed row by row in index
    order; a row's entries are cut into groups of `group` (0: the whole row), the last shorter."""
    kept_per_row = np.asarray(kept_per_row, np.int64)
    per_row = groups_per_row(kept_per_row, group)
    first_group = np.repeat(np.cumsum(per_row) - per_row, kept_per_row)
    rank = rank_in_row(kept_per_row)
    return first_group + (rank // group if group else 0), per_row


def _nearest_odd(ratio: np.ndarray, top: int) -> np.ndarray:
    """The odd integer nearest each ratio, clipped to [-top, top]; a tie (an even ratio) goes up."""
    return np.clip(2.0 * np.floor(ratio / 2.0) + 1.0, -top, top)


def quantize(delta: np.ndarray, groups: np.ndarray, n_groups: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8, scale bf16 bits uint16 [n_groups]) of float64 deltas; see the module docstring.
    `groups` gives each delta's group; entries of a group are contiguous and groups in order."""
    top = (1 << bits) - 1
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if delta.size else np.zeros(0, np.int64)
    present = groups[starts]

    def per_group(values, reduce):
        out = np.zeros(n_groups, np.float64)
        if delta.size:
            out[present] = reduce.reduceat(values, starts)
        return out

    mag = np.abs(delta)
    if bits == 1:
        s = per_group(mag, np.add) / np.maximum(np.bincount(groups, minlength=n_groups), 1)
    else:
        s = per_group(mag, np.maximum) / top
        for _ in range(_LLOYD_ROUNDS):
            m = _nearest_odd(delta / np.where(s > 0, s, 1.0)[groups], top)
            den = per_group(m * m, np.add)
            s = np.where(den > 0, np.abs(per_group(delta * m, np.add)) / np.where(den > 0, den, 1.0), 0.0)
    scale_bits = bf16_scale_bits(s)
    if not np.isfinite(scale_values(scale_bits)).all():
        raise ValueError("a delta is too large for a bfloat16 scale")
    stored = scale_values(scale_bits).astype(np.float64)[groups]
    m = _nearest_odd(delta / np.where(stored > 0, stored, 1.0), top)
    return ((m + top) // 2).astype(np.uint8), scale_bits


def dequantize(codes: np.ndarray, scales: np.ndarray, base_bits: np.ndarray, dtype: str, bits: int) -> np.ndarray:
    """Storage bits of the rebuilt kept values: narrow(widen(base) + float(2c - (2^b - 1)) * s) with
    `scales` the float32 scale of each entry's group (the normative rule; docs/format.md)."""
    ct = _compute_dtype(dtype)
    m = (2 * codes.astype(np.int32) - ((1 << bits) - 1)).astype(ct)
    delta = m * scales.astype(ct)
    return narrow(widen(base_bits, dtype) + delta, dtype)


def kept_delta(ft_bits: np.ndarray, base_bits: np.ndarray, dtype: str) -> np.ndarray:
    """fine-tuned - base of kept entries in float64; ValueError naming the first non-finite one."""
    delta = widen(ft_bits, dtype).astype(np.float64) - widen(base_bits, dtype).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(delta))
    if bad.size:
        raise ValueError(f"kept entry {int(bad[0])} (in index order) has a NaN or infinite fine-tuned or base "
                         "value, which a lossy value codec cannot store; use --values raw for this fine-tune")
    return delta
