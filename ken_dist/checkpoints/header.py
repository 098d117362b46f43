"""Read and validate one safetensors header without touching tensor bytes.

Why our own parser: the planner needs names, shapes, dtypes and byte offsets of every tensor in
checkpoints that may hold hundreds of GB, before any work starts, and it must reject a truncated
or tampered file with a message naming the file and tensor. `safe_open` would do the parsing,
but its errors name neither, and it maps the whole file. The format (from the safetensors
README): 8 bytes little-endian u64 N, then N bytes of JSON {name: {dtype, shape, data_offsets},
"__metadata__": {str: str}}, then the data section. Offsets are relative to the data section
and must tile it exactly (sorted, no gap, no overlap, last end == data length), as safetensors
itself requires; anything accepted here therefore also opens with `safe_open`.

`encode_header` is the one writer of that format (materialize's shards, the synthetic
generator): tensors stream into the data section in the order the header lists them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field

from ken_dist.errors import CheckpointError

CORRUPT_FIX = "the file looks truncated or corrupt; re-download or re-save it"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit

# Bits per element of every dtype safetensors writes. Sub-byte dtypes are listed so that the
# error says "not supported" rather than "unknown".
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# Dtypes whose rows are split and pruned. F8_E8M0 holds power-of-two block scales (MX formats),
# not weights, so it is stored whole like integers.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]  # relative to the data section, as in the file


@dataclass(frozen=True)
class FileHeader:
    """What one safetensors file says about itself; `data_start` = 8 + header length."""
    path: str
    size: int
    header_sha256: str  # sha256 of the 8 length bytes + the JSON header
    data_start: int
    entries: tuple[HeaderEntry, ...]
    metadata: dict = field(default_factory=dict, compare=False)


def _corrupt(path: str, what: str, tensor: str | None = None) -> CheckpointError:
    where = f"{path}: tensor {tensor!r}: " if tensor is not None else f"{path}: "
    return CheckpointError(f"{where}{what}; {CORRUPT_FIX}")


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: str) -> FileHeader:
    """Parse and validate the header of `path`; raise CheckpointError naming the file (and tensor)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise _corrupt(path, f"header length {n} is beyond the file size ({size} bytes)")
            if n > MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length {n} exceeds the safetensors limit of "
                                     f"{MAX_HEADER_BYTES} bytes")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror or e}); check the path and "
                       f"its permissions (a broken link in a Hugging Face cache means an "
                       f"incomplete download)") from e
    if len(raw) != n:
        raise _corrupt(path, f"file ended inside the {n}-byte header")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON ({e})") from e
    except _DuplicateKey as e:
        raise _corrupt(path, f"the header names {e.args[0]!r} twice (a JSON object with a repeated key)") from None
    if not isinstance(doc, dict):
        raise _corrupt(path, f"header is a JSON {type(doc).__name__}, expected an object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "header __metadata__ is not a JSON object of strings")
    data_len = size - 8 - n
    entries = [_entry(path, name, spec, data_len) for name, spec in doc.items()]
    _check_tiling(path, entries, data_len)
    sha = hashlib.sha256(head + raw).hexdigest()
    return FileHeader(path, size, sha, 8 + n, tuple(entries), dict(metadata))


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list) -> dict:
    """json object hook: a repeated key is an error (Python keeps the last value silently, and
    safetensors refuses the file), so a header cannot name one tensor twice."""
    doc = {}
    for key, value in pairs:
        if key in doc:
            raise _DuplicateKey(key)
        doc[key] = value
    return doc


def _entry(path: str, name: str, spec, data_len: int) -> HeaderEntry:
    if not isinstance(spec, dict):
        raise _corrupt(path, "header entry is not a JSON object", name)
    dtype, shape, offs = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointError(f"{path}: tensor {name!r}: unknown dtype {dtype!r} (known: "
                       f"{', '.join(sorted(DTYPE_BITS))}); {CORRUPT_FIX}, or upgrade ken_dist "
                       f"if this is a newer safetensors dtype")
    if DTYPE_BITS[dtype] % 8:
        raise CheckpointError(f"{path}: tensor {name!r}: dtype {dtype} packs values below one byte, "
                       f"which ken_dist cannot split into rows; dequantize the checkpoint to "
                       f"BF16/F16/F32 first")
    if not isinstance(shape, list) or not all(_int(d) and d >= 0 for d in shape):
        raise _corrupt(path, f"shape {shape!r} is not a list of non-negative integers", name)
    if (not isinstance(offs, list) or len(offs) != 2 or not all(_int(o) for o in offs)
            or not 0 <= offs[0] <= offs[1]):
        raise _corrupt(path, f"data_offsets {offs!r} is not [begin, end] with "
                             f"0 <= begin <= end", name)
    if offs[1] > data_len:
        raise _corrupt(path, f"data_offsets {offs} point past the end of the file (data "
                             f"section is {data_len} bytes)", name)
    expected = math.prod(shape) * DTYPE_BITS[dtype] // 8
    if offs[1] - offs[0] != expected:
        raise _corrupt(path, f"data_offsets {offs} span {offs[1] - offs[0]} bytes but shape "
                             f"{shape} x {dtype} needs {expected}", name)
    return HeaderEntry(name, dtype, tuple(shape), (offs[0], offs[1]))


def _check_tiling(path: str, entries: list[HeaderEntry], data_len: int) -> None:
    """Offsets must cover the data section exactly once, as safetensors requires."""
    prev, pos = None, 0
    for e in sorted(entries, key=lambda e: e.data_offsets):
        begin, end = e.data_offsets
        if begin < pos:
            raise _corrupt(path, f"data_offsets {list(e.data_offsets)} overlap tensor "
                                 f"{prev.name!r} {list(prev.data_offsets)}", e.name)
        if begin > pos:
            after = f"after tensor {prev.name!r}" if prev else "at the start of the data"
            raise _corrupt(path, f"data_offsets {list(e.data_offsets)} leave a gap of "
                                 f"{begin - pos} bytes {after}", e.name)
        prev, pos = e, end
    if pos != data_len:
        raise _corrupt(path, f"{data_len - pos} bytes after the last tensor are not described "
                             f"by the header")


def encode_header(tensors, metadata: dict | None = None) -> bytes:
    """The 8-byte length + JSON header of a file holding `tensors` ((name, dtype, shape), in data
    order, packed without gaps), padded with spaces to a multiple of 8 bytes as safetensors pads."""
    doc, offset = ({"__metadata__": dict(metadata)} if metadata else {}), 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
        doc[name] = {"dtype": dtype, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
