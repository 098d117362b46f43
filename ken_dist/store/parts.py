"""Encode and decode the Parquet part files of a subnetwork store (format versions 1 and 2).

Kept apart from protocol.py (layout, journal, manifest, lock) so that every reader and the
writer share one definition of the bytes on disk: `_chunks` is the one reader and validator of a
pruned part; `block_rows` (keep masks, for the view, injection and export) and `block_bitmasks`
(the stored bitmask as it is, for the switcher) are its two outputs. Everything here is
pure: tables and arrays in, arrays and tables out, plus the information bound used to judge
the size. docs/format.md is the normative description.

A pruned block holds one Parquet row per tensor row:
    row    int32   absolute row index in the tensor
    mask   binary  the row's keep bitmask, ceil(n/8) bytes, little bit order
                   (bit j of byte b is entry 8*b + j), padding bits zero
      or positions list<int64> (format 2) the kept entries' positions in the part, (row - S) * n + j,
                   increasing: near log2 C(n, k) bits at low keep, where a bitmask is not
    values binary  raw: the kept values' bytes in the source dtype, in index order;
                   lossy codecs (format 2, codecs.py): the kept entries' b-bit codes, packed
    scales binary  (lossy codecs only) the row's bfloat16 scales, one per group
A whole tensor holds its raw bytes in chunks:
    offset int64   byte offset of the chunk in the tensor's raw bytes
    data   binary  the chunk (at most WHOLE_CHUNK_BYTES)
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ken_dist.checkpoints.dtypes import as_numpy, bits_word, dtype_name, itemsize, storage_dtype
from ken_dist.store.codecs import (
    RAW,
    RAW_CODEC,
    Codec,
    bf16_scale_bits,
    dequantize,
    fits,
    group_sizes,
    groups_per_row,
    pack_rows,
    parse_codec,
    quantize,
    scale_values,
    unpack_rows,
    widen,
)

WHOLE_CHUNK_BYTES = 16 * 2**20
_WHOLE_CHUNKS_PER_GROUP = 4

# Measured on bf16 [4096, 4096] blocks with random masks (docs/format.md, benchmarks/store_ratio.py):
# zstd level 1 squeezes the sparse bitmask at low keep and costs ~nothing at keep 0.5;
# dictionaries and statistics only add bytes to random binary data.
PARQUET_OPTIONS = dict(
    compression="zstd", compression_level=1, use_dictionary=False, write_statistics=False,
    column_encoding={"row": "DELTA_BINARY_PACKED"}, store_schema=False,
    data_page_size=1 << 20, write_page_index=False,
)
BLOCK_COLUMNS = ("row", "mask", "values")  # format 1, and format 2 with raw values and a bitmask
INDEX_KINDS = ("mask", "positions")
_INDEX_TYPE = pa.list_(pa.field("element", pa.int64(), nullable=False))
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


def info_bound_bytes(kept_per_row: np.ndarray, n: int, itemsize: int, code_bits: int = 0) -> float:
    """sum over rows of kept*itemsize + log2 C(n, kept)/8: what any encoding must spend (with
    code_bits > 0, kept*code_bits/8 for the values: the bound of a lossy codec's codes, scales aside)."""
    kept, rows = np.unique(np.asarray(kept_per_row, dtype=np.int64), return_counts=True)  # few distinct
    log2c = np.array([(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
                      for k in kept.tolist()], dtype=np.float64).reshape(-1)
    value_bytes = kept * code_bits / 8 if code_bits else kept * itemsize
    return float((rows * (value_bytes + np.maximum(log2c, 0) / 8)).sum())


def block_columns(index: str = "mask", codec: Codec = RAW_CODEC) -> tuple[str, ...]:
    """The columns of a pruned part with this index kind and value codec, in order."""
    return ("row", index, "values") + (("scales",) if codec.lossy else ())


def part_bytes(table: pa.Table) -> memoryview:
    """A part table as the bytes of its Parquet file (PARQUET_OPTIONS; delta-packed row and index)."""
    options = dict(PARQUET_OPTIONS)
    if "positions" in table.column_names:
        options["column_encoding"] = dict(options["column_encoding"], **{"positions.list.element": "DELTA_BINARY_PACKED"})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, **options)
    return memoryview(buf.getvalue())


def _index_list(m: np.ndarray, kept: np.ndarray) -> pa.Array:
    """Per row, the flat positions (row - first) * n + j of its kept entries: increasing over the part,
    so Parquet's delta packing stores each gap in about log2(gap) bits."""
    offsets = np.zeros(m.shape[0] + 1, np.int64)
    np.cumsum(kept, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.flatnonzero(m).astype(np.int64))) \
        .cast(pa.large_list(_INDEX_TYPE.value_field))


def _smaller_index(mask_column: pa.Array, m: np.ndarray, kept: np.ndarray) -> tuple[str, pa.Array]:
    """("mask", bitmask) or ("positions", position list), whichever makes the smaller Parquet column.
    A bitmask costs ~n/8 bytes a row whatever is kept; the list wins below a few percent."""
    if kept.sum() * 8 > m.size:  # above 1/8 kept the bitmask measured smaller every time (store_ratio.py)
        return "mask", mask_column
    listed = _index_list(m, kept)
    sizes = [len(part_bytes(pa.table({name: col}))) for name, col in (("mask", mask_column), ("positions", listed))]
    return ("positions", listed) if sizes[1] < sizes[0] else ("mask", mask_column)


def pack_codes(codes: np.ndarray, kept_per_row: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(byte offsets [r + 1], bytes) of b-bit codes listed row by row: each row's codes packed from
    the low bits of its first byte up (code i at bits [i b, (i + 1) b)), padded to a whole byte."""
    offsets = np.zeros(kept_per_row.size + 1, np.int64)
    np.cumsum(-(-kept_per_row * bits // 8), out=offsets[1:])
    return offsets, pack_rows(codes, kept_per_row, offsets, bits)


def unpack_codes(data: np.ndarray, offsets: np.ndarray, kept_per_row: np.ndarray, bits: int) -> np.ndarray:
    """The codes of pack_codes's bytes (offsets relative to data), row by row."""
    return unpack_rows(data, np.asarray(kept_per_row, np.int64), np.asarray(offsets, np.int64), bits)


def _lossy_columns(m: np.ndarray, values: np.ndarray, base, dtype: str, codec: Codec, kept: np.ndarray):
    """(values column, scales column) of a lossy codec; ValueError on a non-finite delta,
    OverflowError when a rebuilt value would overflow the dtype."""
    flat_mask = m.reshape(-1)
    ft_kept = np.compress(flat_mask, values.reshape(-1))
    base_kept = np.compress(flat_mask, as_numpy(base).reshape(-1))
    sizes = group_sizes(kept, codec.group)
    base_wide = widen(base_kept, dtype)
    codes, scale_bits = quantize(widen(ft_kept, dtype), base_wide, sizes, codec.bits)
    scales = scale_values(scale_bits)
    if base_wide.size and not fits(float(np.abs(base_wide).max()) + ((1 << codec.bits) - 1) * float(scales.max()), dtype):
        rebuilt = dequantize(codes, np.repeat(scales, sizes), base_kept, dtype, codec.bits)
        if not np.isfinite(widen(rebuilt, dtype)).all():
            raise OverflowError("a rebuilt value overflows the dtype")
    voffs, vbytes = pack_codes(codes, kept, codec.bits)
    soffs = np.zeros(kept.size + 1, np.int64)
    np.cumsum(groups_per_row(kept, codec.group) * 2, out=soffs[1:])
    return _binary(voffs, vbytes), _binary(soffs, scale_bits.astype("<u2").view(np.uint8))


def encode_block(row_start: int, mask, values, *, codec: Codec = RAW_CODEC, base=None,
                 dtype: str | None = None) -> tuple[pa.Table, dict]:
    """(table, stats) for rows [row_start, row_start + r) given [r, n] mask and values (numpy
    arrays, values in their storage bits, or torch tensors).

    A lossy `codec` needs `base` (the same rows of the base, storage bits) and `dtype` (the
    safetensors name); a tensor whose dtype the codec does not apply to, or whose rebuilt values
    would overflow it, is stored raw. stats carries `values` (the codec spec, when lossy) and
    `index` ("positions" when the position list was smaller than the bitmask)."""
    m = as_numpy(mask).astype(bool, copy=False)
    values = as_numpy(values)
    r, n = m.shape
    size = values.itemsize
    packed = np.packbits(m, axis=1, bitorder="little").reshape(-1)
    kept = m.sum(axis=1, dtype=np.int64)
    index, index_column = _smaller_index(
        _binary(np.arange(r + 1, dtype=np.int64) * ((n + 7) // 8), packed), m, kept)
    columns = {"row": pa.array(np.arange(row_start, row_start + r, dtype=np.int32)), index: index_column}
    if codec.lossy and dtype is not None and codec.applies_to(dtype):
        try:
            columns["values"], columns["scales"] = _lossy_columns(m, values, base, dtype, codec, kept)
        except OverflowError:
            codec = RAW_CODEC
    else:
        codec = RAW_CODEC
    if not codec.lossy:
        # np.compress over same-size words: much faster than bool-indexing bytes
        vals = np.compress(m.reshape(-1), raw_bytes(values).view(bits_word(size))).view(np.uint8)
        voffs = np.zeros(r + 1, np.int64)
        np.cumsum(kept * size, out=voffs[1:])
        columns["values"] = _binary(voffs, np.ascontiguousarray(vals))
    stats = {
        "kept": int(kept.sum()),
        "kept_row_min": int(kept.min()) if r else 0,
        "kept_row_max": int(kept.max()) if r else 0,
        "bound_bytes": info_bound_bytes(kept, n, size, codec.bits),
    }
    if codec.lossy:
        stats["values"] = codec.spec
    if index != "mask":
        stats["index"] = index
    return pa.table(columns), stats


def rescale_scales(table: pa.Table, multipliers) -> pa.Table:
    """The lossy part `table` with every scale of its row i multiplied by multipliers[i] (>= 0) and
    rounded to bfloat16; codes and index unchanged, so the part keeps its size and every reader
    rebuilds base + m * (the new scale). ValueError when the table has no scales, the count
    differs from its rows, or a product is negative, NaN or past bfloat16's range."""
    if "scales" not in table.column_names:
        raise ValueError("the part stores raw values; only a lossy codec's scales can be rescaled")
    mult = np.asarray(multipliers, np.float64).reshape(-1)
    if mult.size != table.num_rows:
        raise ValueError(f"{mult.size} multipliers for a part of {table.num_rows} rows")
    if not np.all(mult >= 0):  # also refuses NaN
        raise ValueError("a multiplier is negative or NaN")
    col = table.column("scales").combine_chunks()
    offsets, data = _binary_parts(col)
    bits = data.view("<u2")
    per_row = np.diff(offsets) // 2
    with np.errstate(over="ignore"):
        new = bf16_scale_bits(scale_values(bits).astype(np.float64) * np.repeat(mult, per_row))
    if np.any(new >= 0x7F80):
        raise ValueError("a rescaled scale overflows bfloat16")
    arr = _binary(offsets.astype(np.int64), new.astype("<u2").view(np.uint8))
    return table.set_column(table.schema.get_field_index("scales"), "scales", arr)


def _check_types(table: pa.Table, columns: tuple[str, ...]) -> None:
    """An integer first column, a list of integers for `positions`, binary for the others (a float
    or string column is not this format)."""
    for name in columns:
        typ = table.schema.field(name).type
        if name in ("row", "offset"):
            ok = pa.types.is_integer(typ)
        elif name == "positions":
            ok = (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_integer(typ.value_type)
        else:
            ok = pa.types.is_binary(typ) or pa.types.is_large_binary(typ)
        if not ok:
            raise ValueError(f"column {name!r} has type {typ}, which this format does not use")


def _binary_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets relative to the first value, data) of a binary array chunk, zero copy."""
    if arr.null_count:
        raise ValueError("null values")
    odt = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=odt)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None \
        else np.zeros(0, np.uint8)
    return offsets - offsets[0], data[offsets[0]: offsets[-1]]


def popcount_rows(packed: np.ndarray, n: int) -> np.ndarray:
    """Set bits per row of [m, ceil(n/8)] little-order bitmasks, ignoring padding bits past n."""
    if not hasattr(np, "bitwise_count"):  # numpy < 2
        return np.unpackbits(packed, axis=1, count=n, bitorder="little").sum(axis=1)
    if packed.shape[1] % 8 == 0 and packed.flags.c_contiguous:  # 8 bytes a count: 8x fewer to sum
        counts = np.bitwise_count(packed.view("<u8")).sum(axis=1, dtype=np.int64)
    else:
        counts = np.bitwise_count(packed).sum(axis=1, dtype=np.int64)
    if n % 8 and packed.shape[1]:
        counts -= np.bitwise_count(packed[:, -1] >> (n % 8)).astype(np.int64)
    return counts


def _row_positions(index_arr: pa.Array, m: int, n: int, pos0: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept per row, flat positions relative to this chunk's first row) of an index-list chunk,
    checked: increasing, and each row's inside that row."""
    if index_arr.null_count or index_arr.values.null_count:
        raise ValueError("null index entries")
    offsets = index_arr.offsets.to_numpy()
    flat = index_arr.values.to_numpy(zero_copy_only=False)[offsets[0]: offsets[-1]].astype(np.int64) - pos0 * n
    kept = np.diff(offsets).astype(np.int64)
    rows = np.repeat(np.arange(m, dtype=np.int64), kept)
    if flat.size and (np.any(np.diff(flat) <= 0) or np.any(flat // n != rows) or flat[0] < 0):
        raise ValueError("index positions are not increasing within their rows")
    return kept, flat


class _Chunk:
    """One validated Arrow chunk of a pruned part: rows [pos, pos + m), each row's kept count,
    its index (`packed` [m, ceil(n/8)] bitmask or `flat` positions relative to row pos) and its
    value (and scale) bytes with offsets relative to the chunk."""
    __slots__ = ("pos", "m", "kept", "packed", "flat", "voffs", "vdata", "soffs", "sdata")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    def keep(self, i0: int, i1: int, n: int) -> np.ndarray:
        """[i1 - i0, n] bool keep mask of chunk rows [i0, i1)."""
        if self.packed is not None:
            return np.unpackbits(self.packed[i0:i1], axis=1, count=n, bitorder="little").view(bool)
        keep = np.zeros((i1 - i0) * n, bool)
        e0, e1 = int(self.kept[:i0].sum()), int(self.kept[:i1].sum())
        keep[self.flat[e0:e1] - i0 * n] = True
        return keep.reshape(i1 - i0, n)

    def values(self, i0: int, i1: int, keep: np.ndarray | None, n: int, dtype: str, codec: Codec, base_rows):
        """The value bytes of chunk rows [i0, i1) in the tensor's dtype: a view for raw; rebuilt
        from the base rows under `keep` (that range's keep mask) for a lossy codec."""
        if not codec.lossy:
            return self.vdata[self.voffs[i0]: self.voffs[i1]]
        rows_kept = self.kept[i0:i1]
        codes = unpack_codes(self.vdata[self.voffs[i0]: self.voffs[i1]], self.voffs[i0: i1 + 1] - self.voffs[i0],
                             rows_kept, codec.bits)
        scales = scale_values(self.sdata[self.soffs[i0]: self.soffs[i1]].view("<u2"))
        base = np.compress(keep.reshape(-1), np.asarray(base_rows(self.pos + i0, self.pos + i1)).reshape(-1))
        rebuilt = dequantize(codes, np.repeat(scales, group_sizes(rows_kept, codec.group)),
                             base.astype(storage_dtype(dtype), copy=False), dtype, codec.bits)
        return rebuilt.view(np.uint8)


def _chunks(table: pa.Table, n: int, dtype: str, row_start: int, row_end: int, codec: Codec, index: str,
            base_rows):
    """Yield every chunk of a pruned part as a _Chunk, each validated before it is yielded and the
    row count checked at the end (see block_rows)."""
    expected = block_columns(index, codec)
    if index not in INDEX_KINDS or tuple(table.column_names) != expected:
        raise ValueError(f"columns {table.column_names}, expected {list(expected)} for values {codec.spec!r} "
                         f"and index {index!r}")
    _check_types(table, expected)
    if codec.lossy and base_rows is None:
        raise ValueError(f"values {codec.spec!r} are rebuilt from the base, and no base rows were given")
    size = itemsize(dtype)
    nbytes_row = (n + 7) // 8
    pos = row_start
    for chunk in zip(*(table.column(c).chunks for c in expected)):
        rows_arr, index_arr, vals_arr = chunk[:3]
        m = len(rows_arr)
        if m == 0:
            continue
        rows = rows_arr.to_numpy(zero_copy_only=False)
        if pos + m > row_end or not np.array_equal(rows, np.arange(pos, pos + m)):
            raise ValueError(f"rows are not {pos}..{min(pos + m, row_end) - 1} in order "
                             f"(block [{row_start}, {row_end}))")
        packed = flat = soffs = sdata = None
        if index == "mask":
            moffs, mdata = _binary_parts(index_arr)
            if not np.array_equal(np.diff(moffs), np.full(m, nbytes_row)):
                raise ValueError(f"mask length differs from ceil({n}/8) bytes")
            packed = mdata.reshape(m, nbytes_row)
            kept = popcount_rows(packed, n)
        else:
            kept, flat = _row_positions(index_arr, m, n, pos - row_start)
        voffs, vdata = _binary_parts(vals_arr)
        value_bytes = -(-kept * codec.bits // 8) if codec.lossy else kept * size
        if not np.array_equal(np.diff(voffs), value_bytes):
            raise ValueError("values length differs from the kept count")
        if codec.lossy:
            soffs, sdata = _binary_parts(chunk[3])
            if not np.array_equal(np.diff(soffs), groups_per_row(kept, codec.group) * 2):
                raise ValueError("scales length differs from the kept count's groups")
            if np.any(sdata.view("<u2") >= 0x7F80):  # sign bit set (negative) or all exponent bits (inf, NaN)
                raise ValueError("a scale is negative or not finite")
        yield _Chunk(pos=pos, m=m, kept=kept, packed=packed, flat=flat, voffs=voffs, vdata=vdata, soffs=soffs,
                     sdata=sdata)
        pos += m
    if pos != row_end:
        raise ValueError(f"holds rows {row_start}..{pos - 1}, expected {row_start}..{row_end - 1}")


def block_rows(table: pa.Table, n: int, dtype: str, row_start: int, row_end: int,
               lo: int | None = None, hi: int | None = None, *, codec: Codec | str = RAW, index: str = "mask",
               base_rows=None):
    """Yield (first_row, keep, values) for the part's rows that lie in [lo, hi): the one decoder of
    a pruned part, every format and codec.

    keep is a [m, n] bool numpy array, values the bytes (uint8 numpy) of the kept entries of those
    m rows in index order, in the tensor's dtype: copied for `raw`, rebuilt from the base for a
    lossy codec (codecs.py). `codec` and `index` are what the manifest's block records (absent:
    raw, mask); `base_rows(a, b)` gives rows [a, b) of the base as storage bits, needed by lossy
    codecs only. Every row of the part is validated, also those outside the range, so a damaged
    part is never half used. Raises ValueError (the caller names file and tensor) when the part
    disagrees with itself or with the block it claims to hold."""
    codec = parse_codec(codec) if isinstance(codec, str) else codec
    lo = row_start if lo is None else lo
    hi = row_end if hi is None else hi
    for c in _chunks(table, n, dtype, row_start, row_end, codec, index, base_rows):
        a, b = max(c.pos, lo), min(c.pos + c.m, hi)
        if a < b:
            keep = c.keep(a - c.pos, b - c.pos, n)
            yield a, keep, c.values(a - c.pos, b - c.pos, keep, n, dtype, codec, base_rows)


def block_bitmasks(table: pa.Table, n: int, dtype: str, row_start: int, row_end: int, *,
                   codec: Codec | str = RAW, index: str = "mask", base_rows=None):
    """Yield (first_row, packed, values) for every row of the part: block_rows' decoding (same
    validation, same values) with the keep mask as a [m, ceil(n/8)] little-order bitmask whose
    padding bits past n are zero, never unpacked for raw values. Why: a stored bitmask is already
    the compact form a resident fine-tune keeps (subnetwork/entries.py); unpacking it to one bool
    per entry and scanning it costs more than everything else the cold switch does. Position
    lists (format 2) are packed into one."""
    codec = parse_codec(codec) if isinstance(codec, str) else codec
    for c in _chunks(table, n, dtype, row_start, row_end, codec, index, base_rows):
        keep = c.keep(0, c.m, n) if codec.lossy or c.packed is None else None
        if c.packed is None:
            packed = np.packbits(keep, axis=1, bitorder="little")
        elif n % 8 and c.packed.shape[1]:
            packed = c.packed.copy()
            packed[:, -1] &= np.uint8((1 << (n % 8)) - 1)
        else:
            packed = c.packed
        yield c.pos, packed, c.values(0, c.m, keep, n, dtype, codec, base_rows)


def _as_ints(t) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor's bits as same-size integers (bits_word)."""
    return raw_bytes(t).view(bits_word(t.element_size()))


def put_kept(target, keep: np.ndarray, values, dtype=None) -> int:
    """target[keep] = values in place. target: a contiguous [m, n] tensor on any device; keep:
    [m, n] bool numpy; values: the kept entries in index order, as a tensor
    or as raw bytes (uint8 numpy) of `dtype` (default target's). On CPU with matching dtype the
    scatter runs on numpy flat indices over the bits, faster than torch's bool-mask indexing
    and without copying the values; otherwise values are converted and scattered with
    one index_copy_ on the target's device. Returns the entries written."""
    import torch

    idx = np.flatnonzero(keep)
    if not idx.size:
        return 0
    dtype = dtype or target.dtype
    flat = target.reshape(-1)
    if isinstance(values, np.ndarray):
        if target.device.type == "cpu" and dtype == target.dtype:
            _as_ints(flat)[idx] = values.view(bits_word(target.element_size()))
            return int(idx.size)
        values = torch.frombuffer(bytearray(values), dtype=dtype)
    if target.device.type == "cpu" and values.device.type == "cpu" and values.dtype == target.dtype:
        _as_ints(flat)[idx] = _as_ints(values.contiguous())
    else:
        flat.index_copy_(0, torch.from_numpy(idx).to(target.device), values.to(target.device, target.dtype))
    return int(idx.size)


def apply_block(table: pa.Table, target, row_start: int, row_end: int,
                target_row0: int = 0, **codec) -> int:
    """Overwrite kept entries of `target` (a [rows, n] tensor) in place; target row i is tensor
    row target_row0 + i. `codec`: block_rows's codec, index and base_rows, as the block records.

    Rows of the block outside the target are skipped, so a reader may rebuild any row range.
    Raises ValueError as block_rows does. Returns the number of entries written."""
    t_lo, t_hi = target_row0, target_row0 + target.shape[0]
    written = 0
    for first, keep, chunk in block_rows(table, target.shape[1], dtype_name(target.dtype), row_start, row_end,
                                         t_lo, t_hi, **codec):
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
