"""Encode and decode the Parquet part files of a subnetwork store (format version 1).

Kept apart from `store.py` (layout, journal, manifest, lock) so that the loader and the
writer share one definition of the bytes on disk. Everything here is pure: tables and
tensors in, tensors and tables out, plus the information bound used to judge the size.

A pruned block holds one Parquet row per tensor row:
    row    int32   absolute row index in the tensor
    mask   binary  the row's keep bitmask, ceil(n/8) bytes, little bit order
                   (bit j of byte b is entry 8*b + j), padding bits zero
    values binary  raw bytes of the kept values in the source dtype, in index order
A whole tensor holds its raw bytes in chunks:
    offset int64   byte offset of the chunk in the tensor's raw bytes
    data   binary  the chunk (at most WHOLE_CHUNK_BYTES)
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ken_dist.checkpoints.dtypes import as_numpy

WHOLE_CHUNK_BYTES = 16 * 2**20
_WHOLE_CHUNKS_PER_GROUP = 4

# Measured on bf16 [4096, 4096] blocks with random masks (the README's Format section, benchmarks/store_ratio.py):
# zstd level 1 squeezes the sparse bitmask at low keep and costs ~nothing at keep 0.5;
# dictionaries and statistics only add bytes to random binary data.
PARQUET_OPTIONS = dict(
    compression="zstd", compression_level=1, use_dictionary=False, write_statistics=False,
    column_encoding={"row": "DELTA_BINARY_PACKED"}, store_schema=False,
    data_page_size=1 << 20, write_page_index=False,
)
BLOCK_COLUMNS = ("row", "mask", "values")
WHOLE_COLUMNS = ("offset", "data")


def raw_bytes(values) -> np.ndarray:
    """The bytes of a torch tensor or numpy array as a flat uint8 numpy view (no copy when
    already contiguous)."""
    return np.ascontiguousarray(as_numpy(values)).reshape(-1).view(np.uint8)


def _binary(offsets: np.ndarray, data: np.ndarray) -> pa.Array:
    """A pyarrow binary array over existing buffers, zero copy; large_binary past 2 GiB."""
    big = offsets[-1] > np.iinfo(np.int32).max
    offsets = offsets.astype(np.int64 if big else np.int32, copy=False)
    typ = pa.large_binary() if big else pa.binary()
    return pa.Array.from_buffers(typ, len(offsets) - 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def info_bound_bytes(kept_per_row: np.ndarray, n: int, itemsize: int) -> float:
    """sum over rows of kept*itemsize + log2 C(n, kept)/8: what any encoding must spend."""
    kept, rows = np.unique(np.asarray(kept_per_row, dtype=np.int64), return_counts=True)  # few distinct
    log2c = np.array([(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
                      for k in kept.tolist()], dtype=np.float64).reshape(-1)
    return float((rows * (kept * itemsize + np.maximum(log2c, 0) / 8)).sum())


def encode_block(row_start: int, mask, values) -> tuple[pa.Table, dict]:
    """(table, stats) for rows [row_start, row_start + r) given [r, n] mask and values (numpy
    arrays, values in their storage bits, or torch tensors)."""
    m = as_numpy(mask).astype(bool, copy=False)
    values = as_numpy(values)
    r, n = m.shape
    itemsize = values.itemsize
    packed = np.packbits(m, axis=1, bitorder="little").reshape(-1)
    nbytes_row = (n + 7) // 8
    kept = m.sum(axis=1, dtype=np.int64)
    word = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(itemsize)
    if word is not None:  # np.compress over same-size words: ~12x faster than bool-indexing bytes
        vals = np.compress(m.reshape(-1), raw_bytes(values).view(word)).view(np.uint8)
    else:
        vals = raw_bytes(values).reshape(r, n, itemsize)[m].reshape(-1)
    voffs = np.zeros(r + 1, np.int64)
    np.cumsum(kept * itemsize, out=voffs[1:])
    table = pa.table({
        "row": pa.array(np.arange(row_start, row_start + r, dtype=np.int32)),
        "mask": _binary(np.arange(r + 1, dtype=np.int64) * nbytes_row, packed),
        "values": _binary(voffs, np.ascontiguousarray(vals)),
    })
    stats = {
        "kept": int(kept.sum()),
        "kept_row_min": int(kept.min()) if r else 0,
        "kept_row_max": int(kept.max()) if r else 0,
        "bound_bytes": info_bound_bytes(kept, n, itemsize),
    }
    return table, stats


def _check_types(table: pa.Table, columns: tuple[str, ...]) -> None:
    """An integer first column and binary others (a float or string column is not this format)."""
    types = [table.schema.field(c).type for c in columns]
    if not pa.types.is_integer(types[0]) or not all(pa.types.is_binary(t) or pa.types.is_large_binary(t)
                                                   for t in types[1:]):
        raise ValueError(f"column types {[str(t) for t in types]}, expected an integer column then binary ones")


def _column_chunks(table: pa.Table, name: str):
    return table.column(name).chunks


def _binary_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets relative to the first value, data) of a binary array chunk, zero copy."""
    if arr.null_count:
        raise ValueError("null values")
    odt = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=odt)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None \
        else np.zeros(0, np.uint8)
    return offsets - offsets[0], data[offsets[0]: offsets[-1]]


def _popcount_rows(packed: np.ndarray, n: int) -> np.ndarray:
    """Set bits per row of [m, ceil(n/8)] little-order bitmasks, ignoring padding bits past n."""
    if not hasattr(np, "bitwise_count"):  # numpy < 2
        return np.unpackbits(packed, axis=1, count=n, bitorder="little").sum(axis=1)
    counts = np.bitwise_count(packed).sum(axis=1, dtype=np.int64)
    if n % 8 and packed.shape[1]:
        counts -= np.bitwise_count(packed[:, -1] >> (n % 8)).astype(np.int64)
    return counts


def block_rows(table: pa.Table, n: int, itemsize: int, row_start: int, row_end: int,
               lo: int | None = None, hi: int | None = None):
    """Yield (first_row, keep, values) for the part's rows that lie in [lo, hi).

    keep is a [m, n] bool numpy array, values the raw bytes (uint8 numpy) of the kept entries of
    those m rows in index order. Every row of the part is validated, also those outside the
    range, so a damaged part is never half used. Raises ValueError (the caller names file and
    tensor) when the part disagrees with itself or with the block it claims to hold."""
    if tuple(table.column_names) != BLOCK_COLUMNS:
        raise ValueError(f"columns {table.column_names}, expected {list(BLOCK_COLUMNS)}")
    _check_types(table, BLOCK_COLUMNS)
    lo = row_start if lo is None else lo
    hi = row_end if hi is None else hi
    nbytes_row = (n + 7) // 8
    pos = row_start
    for rows_arr, mask_arr, vals_arr in zip(*(table.column(c).chunks for c in BLOCK_COLUMNS)):
        m = len(rows_arr)
        if m == 0:
            continue
        rows = rows_arr.to_numpy(zero_copy_only=False)
        if pos + m > row_end or not np.array_equal(rows, np.arange(pos, pos + m)):
            raise ValueError(f"rows are not {pos}..{min(pos + m, row_end) - 1} in order "
                             f"(block [{row_start}, {row_end}))")
        moffs, mdata = _binary_parts(mask_arr)
        if not np.array_equal(np.diff(moffs), np.full(m, nbytes_row)):
            raise ValueError(f"mask length differs from ceil({n}/8) bytes")
        packed = mdata.reshape(m, nbytes_row)
        voffs, vdata = _binary_parts(vals_arr)
        if not np.array_equal(np.diff(voffs), _popcount_rows(packed, n) * itemsize):
            raise ValueError("values length differs from the mask's kept count")
        a, b = max(pos, lo), min(pos + m, hi)
        if a < b:
            i0, i1 = a - pos, b - pos
            keep = np.unpackbits(packed[i0:i1], axis=1, count=n, bitorder="little").view(bool)
            yield a, keep, vdata[voffs[i0]: voffs[i1]]
        pos += m
    if pos != row_end:
        raise ValueError(f"holds rows {row_start}..{pos - 1}, expected {row_start}..{row_end - 1}")


_SAME_SIZE_INT = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def _as_ints(t) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor's bits (bf16 has no numpy dtype; int16 does)."""
    return raw_bytes(t).view(_SAME_SIZE_INT[t.element_size()])


def kept_index(keep: np.ndarray) -> np.ndarray:
    """Flat indices of a [m, n] bool keep mask (an index array passes through)."""
    return keep if keep.dtype.kind in "iu" else np.flatnonzero(keep)


def put_kept(target, keep: np.ndarray, values, dtype=None) -> int:
    """target[keep] = values in place. target: a contiguous [m, n] tensor on any device; keep:
    [m, n] bool numpy (or its kept_index); values: the kept entries in index order, as a tensor
    or as raw bytes (uint8 numpy) of `dtype` (default target's). On CPU with matching dtype the
    scatter runs on numpy flat indices over the bits, about 8x faster than torch's bool-mask
    indexing and without copying the values; otherwise values are converted and scattered with
    one index_copy_ on the target's device. Returns the entries written."""
    import torch

    idx = kept_index(keep)
    if not idx.size:
        return 0
    dtype = dtype or target.dtype
    flat = target.reshape(-1)
    if isinstance(values, np.ndarray):
        if target.device.type == "cpu" and dtype == target.dtype:
            _as_ints(flat)[idx] = values.view(_SAME_SIZE_INT[target.element_size()])
            return int(idx.size)
        values = torch.frombuffer(bytearray(values), dtype=dtype)
    if target.device.type == "cpu" and values.device.type == "cpu" and values.dtype == target.dtype:
        _as_ints(flat)[idx] = _as_ints(values.contiguous())
    else:
        flat.index_copy_(0, torch.from_numpy(idx).to(target.device), values.to(target.device, target.dtype))
    return int(idx.size)


def take_kept(source, keep: np.ndarray):
    """source[keep] for a contiguous [m, n] CPU tensor (numpy flat indices, see put_kept)."""
    import torch

    return torch.from_numpy(_as_ints(source.contiguous())[kept_index(keep)]).view(source.dtype)


def apply_block(table: pa.Table, target, row_start: int, row_end: int,
                target_row0: int = 0) -> int:
    """Overwrite kept entries of `target` in place; target row i is tensor row target_row0 + i.

    Rows of the block outside the target are skipped, so a reader may rebuild any row range.
    Raises ValueError as block_rows does. Returns the number of entries written."""
    t_lo, t_hi = target_row0, target_row0 + target.shape[0]
    written = 0
    for first, keep, chunk in block_rows(table, target.shape[1], target.element_size(), row_start, row_end,
                                         t_lo, t_hi):
        if chunk.size:
            written += put_kept(target[first - t_lo: first - t_lo + keep.shape[0]], keep, chunk)
    return written


def write_whole_parquet(path: str, values) -> None:
    """Write a tensor's (or storage-bits array's) raw bytes to `path` in WHOLE_CHUNK_BYTES rows, one row group at a time."""
    data = raw_bytes(values)
    total = data.size
    starts = list(range(0, total, WHOLE_CHUNK_BYTES)) or [0]
    schema = pa.schema([("offset", pa.int64()), ("data", pa.binary())])
    with pq.ParquetWriter(path, schema, **{k: v for k, v in PARQUET_OPTIONS.items()
                                            if k != "column_encoding"}) as writer:
        if total == 0:
            writer.write_table(pa.table({"offset": pa.array([], pa.int64()),
                                         "data": pa.array([], pa.binary())}))
        for g in range(0, len(starts), _WHOLE_CHUNKS_PER_GROUP):
            group = starts[g: g + _WHOLE_CHUNKS_PER_GROUP]
            lo, hi = group[0], min(total, group[-1] + WHOLE_CHUNK_BYTES)
            if hi <= lo:
                continue
            offs = np.array([s - lo for s in group] + [hi - lo], dtype=np.int64)
            writer.write_table(pa.table({"offset": pa.array(np.array(group, np.int64)),
                                         "data": _binary(offs, data[lo:hi])}))


def decode_whole(table: pa.Table, dtype, shape: list[int]):
    """The tensor stored by write_whole_parquet, exact dtype and shape (ValueError if inconsistent)."""
    import torch

    if tuple(table.column_names) != WHOLE_COLUMNS:
        raise ValueError(f"columns {table.column_names}, expected {list(WHOLE_COLUMNS)}")
    _check_types(table, WHOLE_COLUMNS)
    numel = math.prod(shape)
    expected = numel * torch.empty(0, dtype=dtype).element_size()
    out = bytearray(expected)
    filled = 0
    for off_arr, data_arr in zip(table.column("offset").chunks, table.column("data").chunks):
        offsets = off_arr.to_numpy(zero_copy_only=False)
        doffs, data = _binary_parts(data_arr)
        for i, off in enumerate(offsets):
            chunk = data[doffs[i]: doffs[i + 1]]
            if off != filled or off + chunk.size > expected:
                raise ValueError(f"chunk at byte {off} (expected {filled}) leaves a gap, overlaps or "
                                 f"overruns the tensor's {expected} bytes")
            out[off: off + chunk.size] = chunk.tobytes()
            filled += chunk.size
    if filled != expected:
        raise ValueError(f"{filled} bytes stored, expected {expected} for shape {shape}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(out, dtype=dtype).reshape(shape)
