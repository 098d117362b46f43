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
pure (numpy, and numba for the encoder's per-entry loops and the bit packing); parts.py puts the
codes and scales into the part's columns.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numba
import numpy as np

from ken_dist.checkpoints.dtypes import storage_dtype, to_float32

RAW = "raw"
LOSSY_BITS = {"int8": 8, "int4": 4, "int2": 2, "sign": 1}
LOSSY_DTYPES = ("BF16", "F16", "F32", "F64")  # others (fp8) keep raw values
_LLOYD_ROUNDS = 3
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


_LARGEST = {"BF16": 3.3895313892515355e38, "F16": 65504.0, "F32": float(np.finfo(np.float32).max),
            "F64": float(np.finfo(np.float64).max)}


def fits(magnitude: float, dtype: str) -> bool:
    """Whether |base| + |delta| <= `magnitude` surely rebuilds to a finite value of the dtype
    (with a margin for the rounding of the product m * s)."""
    return magnitude <= 0.999 * _LARGEST[dtype]


def bf16_scale_bits(s: np.ndarray) -> np.ndarray:
    """Scales (float64, >= 0) as bfloat16 bits, rounded to nearest even."""
    return narrow(s.astype(np.float32), "BF16")


def scale_values(bits: np.ndarray) -> np.ndarray:
    """float32 scales of stored bfloat16 bits."""
    return to_float32(bits.astype(np.uint16, copy=False), "BF16")


def groups_per_row(kept_per_row: np.ndarray, group: int) -> np.ndarray:
    """Scales each row stores: ceil(kept / group), or 1 for a row with kept entries when group is 0."""
    kept_per_row = np.asarray(kept_per_row, np.int64)
    return np.minimum(kept_per_row, 1) if group == 0 else -(-kept_per_row // group)


def group_sizes(kept_per_row: np.ndarray, group: int) -> np.ndarray:
    """Entries of each group, groups in order (row by row): a row's kept entries in index order cut
    into groups of `group` (0: the whole row), the last one shorter. Rows keeping nothing have none."""
    kept_per_row = np.asarray(kept_per_row, np.int64)
    if group == 0:
        return kept_per_row[kept_per_row > 0]
    per_row = groups_per_row(kept_per_row, group)
    sizes = np.full(int(per_row.sum()), group, np.int64)
    last = np.cumsum(per_row)[per_row > 0] - 1
    sizes[last] = kept_per_row[per_row > 0] - (per_row[per_row > 0] - 1) * group
    return sizes


@numba.njit(cache=True, nogil=True, inline="always")
def _nearest_odd(ratio, top):
    """The odd integer nearest `ratio`, clipped to [-top, top]; a tie (an even ratio) goes up."""
    return min(max(2.0 * np.floor(ratio / 2.0) + 1.0, -top), top)


@numba.njit(cache=True, nogil=True)
def _fit_scales(ft, base, sizes, bits, rounds):
    """(scale of each group, float64; index of the first non-finite delta or -1). One pass per
    group for the start, `rounds` Lloyd passes for b > 1 (the module docstring)."""
    top = float((1 << bits) - 1)
    scales = np.zeros(sizes.size, np.float64)
    a = 0
    for g in range(sizes.size):
        b = a + sizes[g]
        total, biggest = 0.0, 0.0
        for i in range(a, b):
            d = np.float64(ft[i]) - np.float64(base[i])
            if not np.isfinite(d):
                return scales, i
            total += abs(d)
            biggest = max(biggest, abs(d))
        s = total / (b - a) if bits == 1 else biggest / top
        for _ in range(rounds if bits > 1 else 0):
            if s <= 0.0:
                break
            num, den = 0.0, 0.0
            for i in range(a, b):
                d = np.float64(ft[i]) - np.float64(base[i])
                m = _nearest_odd(d / s, top)
                num += d * m
                den += m * m
            s = abs(num) / den
        scales[g] = s
        a = b
    return scales, -1


@numba.njit(cache=True, nogil=True)
def _codes(ft, base, sizes, scales, bits):
    """The code of each entry for its group's stored (rounded) scale: the nearest level."""
    top = float((1 << bits) - 1)
    out = np.empty(ft.size, np.uint8)
    a = 0
    for g in range(sizes.size):
        s = np.float64(scales[g])
        for i in range(a, a + sizes[g]):
            d = np.float64(ft[i]) - np.float64(base[i])
            m = _nearest_odd(d / s, top) if s > 0.0 else 1.0
            out[i] = np.uint8((m + top) / 2.0)
        a += sizes[g]
    return out


@numba.njit(cache=True, nogil=True)
def pack_rows(codes, kept_per_row, offsets, bits):
    """parts.pack_codes's bytes (compiled: one pass, no per-entry temporaries)."""
    out = np.zeros(offsets[-1], np.uint8)
    i = 0
    for r in range(kept_per_row.size):
        for j in range(kept_per_row[r]):
            bit = j * bits
            out[offsets[r] + bit // 8] |= np.uint8(codes[i] << (bit % 8))
            i += 1
    return out


@numba.njit(cache=True, nogil=True)
def unpack_rows(data, kept_per_row, offsets, bits):
    """The codes of pack_rows's bytes."""
    out = np.empty(kept_per_row.sum(), np.uint8)
    mask = (1 << bits) - 1
    i = 0
    for r in range(kept_per_row.size):
        for j in range(kept_per_row[r]):
            bit = j * bits
            out[i] = (data[offsets[r] + bit // 8] >> (bit % 8)) & mask
            i += 1
    return out


def quantize(ft: np.ndarray, base: np.ndarray, sizes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8, scale bf16 bits uint16 per group) of the kept entries' deltas ft - base (values
    in the compute dtype, row by row in index order; `sizes` from group_sizes). ValueError names
    the first entry whose delta is not finite."""
    s, bad = _fit_scales(ft, base, sizes, bits, _LLOYD_ROUNDS)
    if bad >= 0:
        raise ValueError(f"kept entry {int(bad)} (in index order) has a NaN or infinite fine-tuned or base value, "
                         "which a lossy value codec cannot store; use --values raw for this fine-tune")
    scale_bits = bf16_scale_bits(s)
    stored = scale_values(scale_bits)
    if not np.isfinite(stored).all():
        raise ValueError("a delta is too large for a bfloat16 scale; use --values raw for this fine-tune")
    return _codes(ft, base, sizes, stored, bits), scale_bits


def dequantize(codes: np.ndarray, scales: np.ndarray, base_bits: np.ndarray, dtype: str, bits: int) -> np.ndarray:
    """Storage bits of the rebuilt kept values: narrow(widen(base) + float(2c - (2^b - 1)) * s) with
    `scales` the float32 scale of each entry's group (the normative rule; docs/format.md)."""
    ct = _compute_dtype(dtype)
    m = (2 * codes.astype(np.int32) - ((1 << bits) - 1)).astype(ct)
    delta = m * scales.astype(ct)
    return narrow(widen(base_bits, dtype) + delta, dtype)
