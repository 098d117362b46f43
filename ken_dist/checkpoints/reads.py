"""Row reads straight from safetensors files, at the byte offsets of their headers.

Why pread and not a memory map or safetensors: a worker reads just its row block, the header is
re-read and checked on every read (a file replaced during a job must not feed wrong bytes), and
the numpy path needs no torch, which keeps CPU actors light.
"""
from __future__ import annotations

import os

import numpy as np

from ken_dist.checkpoints.dtypes import from_storage_bits, storage_dtype
from ken_dist.checkpoints.header import CORRUPT_FIX, read_header
from ken_dist.checkpoints.inventory import TensorInfo
from ken_dist.errors import CheckpointError

READ_CHUNK_BYTES = 256 * 2**20  # one pread at most (Linux caps a single read near 2 GiB)


def _data_start(info: TensorInfo, what: str) -> int:
    """Offset of the file's data section, after checking the file still holds the tensor where,
    and as, the plan saw it (a file replaced during a job must not feed wrong bytes)."""
    try:
        header = read_header(info.file)
    except CheckpointError as e:
        raise CheckpointError(f"{info.file}: cannot read {what} of tensor {info.name!r}: the file changed or broke "
                       f"since it was inventoried ({e}); restart the job") from None
    entry = next((e for e in header.entries if e.name == info.name), None)
    if entry is None:
        raise CheckpointError(f"{info.file}: tensor {info.name!r} is no longer in the file; the "
                       f"file changed during the job; restart it")
    if (entry.shape, entry.dtype, entry.data_offsets) != (info.shape, info.dtype, info.data_offsets):
        raise CheckpointError(f"{info.file}: tensor {info.name!r} is now {entry.dtype} {list(entry.shape)} at bytes "
                       f"{list(entry.data_offsets)}, but was {info.dtype} {list(info.shape)} at "
                       f"{list(info.data_offsets)} when the checkpoint was opened; the file changed during "
                       f"the job; restart it")
    return header.data_start


def _pread_into(path: str, buf: np.ndarray, offset: int) -> None:
    """Fill the uint8 array `buf` with the file's bytes from `offset` (CheckpointError if the file ends)."""
    view = memoryview(buf)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open to read ({e.strerror or e}); check the file and its permissions") from e
    try:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done: done + READ_CHUNK_BYTES]], offset + done)
            if got == 0:
                raise CheckpointError(f"{path}: file ended {len(view) - done} bytes early; {CORRUPT_FIX}")
            done += got
    finally:
        os.close(fd)


def read_rows_array(info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as a numpy array [stop-start, row_len] of the tensor's storage bits
    (ken_dist.checkpoints.dtypes: the numpy dtype where one exists, bf16/fp8 as same-size unsigned ints).

    Reads exactly those rows' bytes with pread, at the offsets of the header (re-read and
    checked each call); needs no torch, which is what keeps CPU actors light."""
    rows, row_len = info.row_geometry
    if not (0 <= start <= stop <= rows):
        raise CheckpointError(f"{info.file}: tensor {info.name!r}: rows [{start}, {stop}) are outside "
                       f"its {rows} rows (shape {list(info.shape)})")
    out = np.empty((stop - start, row_len), dtype=storage_dtype(info.dtype))
    if out.size:
        data_start = _data_start(info, f"rows [{start}, {stop})")
        _pread_into(info.file, out.reshape(-1).view(np.uint8),
                    data_start + info.data_offsets[0] + start * row_len * info.itemsize)
    return out


def read_rows(info: TensorInfo, start: int, stop: int):
    """Rows [start, stop) as a 2-D torch tensor [stop-start, row_len] in the ORIGINAL dtype
    (read_rows_array's bytes, viewed as the tensor's dtype)."""
    return from_storage_bits(read_rows_array(info, start, stop), info.dtype)


def read_tensor_array(info: TensorInfo) -> np.ndarray:
    """The whole tensor's storage bits, in its shape (for tensors stored whole)."""
    return read_rows_array(info, 0, info.row_geometry[0]).reshape(info.shape)


def read_tensor(info: TensorInfo):
    """The whole tensor as a torch tensor, original dtype and shape."""
    return from_storage_bits(read_tensor_array(info), info.dtype)
