"""Checkpoints as inventories: where each tensor lives, read from headers only.

Why: planning a job over a multi-GB checkpoint must not read its weights. `open_checkpoint`
resolves what the user gave (a directory, one .safetensors file, or a Hugging Face repo id
looked up OFFLINE in the local HF cache), validates every header (see safetensors_header.py)
and returns a `Checkpoint` listing each tensor's file, dtype, shape and byte range. Workers
then read just their row block with `read_rows`, straight from the file, so tensor bytes never
pass through the driver. `match_checkpoints` (match.py) checks base against fine-tune before
any work. No pickle checkpoint is ever loaded: they can run code when unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from ken_dist.dtypes import from_storage_bits, storage_dtype, torch_dtype  # noqa: F401  (torch_dtype: part of this API)
from ken_dist.errors import KenError
# Matching lives in its own module (one job each) but is part of this module's contract.
from ken_dist.match import PRESETS, TensorMatch, match_checkpoints, parse_prefix_map
from ken_dist.safetensors_header import (CORRUPT_FIX, DTYPE_BITS, FLOAT_DTYPES, FileHeader,
                                         read_header)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: enough to plan over it and read any rows of it."""
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: "BF16", "F16", "F32", "I64", "BOOL", ...
    file: str  # absolute path of the .safetensors file holding it
    data_offsets: tuple[int, int]  # byte range within the file's data section

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def itemsize(self) -> int:
        return DTYPE_BITS[self.dtype] // 8

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def row_geometry(self) -> tuple[int, int]:
        """(num_rows, row_len): KEN selects within rows; rank>=3 flattens trailing dims."""
        if len(self.shape) == 0:
            return (1, 1)
        if len(self.shape) == 1:
            return (1, self.shape[0])
        return (self.shape[0], math.prod(self.shape[1:]))


@dataclass(frozen=True)
class Checkpoint:
    source: str  # what the user gave (path or HF repo id)
    root: str  # resolved local directory holding the files (config.json etc.)
    revision: str | None  # HF commit hash when resolved from the HF cache
    files: tuple[str, ...]  # absolute paths of the .safetensors files
    tensors: dict[str, TensorInfo]
    headers: tuple[FileHeader, ...] = field(default=(), compare=False, repr=False)

    def identity(self) -> dict:
        """JSON-able fingerprint: cheap (headers + 64 KiB per file) yet differs for another checkpoint.

        `files` alone identifies the content; source/root/revision say where it came from, so
        compare `files` when the same checkpoint may be reached by another path or repo id.
        `sample_sha256` hashes a few KiB of tensor bytes: two checkpoints of one architecture
        (a base and its instruct tune) have equal headers, and a subnetwork rebuilt on the
        wrong one would be silently wrong."""
        headers = {h.path: h for h in self.headers}
        files = []
        for path in self.files:
            h = headers.get(path) or read_header(path)
            files.append({"name": os.path.relpath(path, self.root), "size": h.size,
                          "header_sha256": h.header_sha256,
                          "sample_sha256": sample_sha256(path, h.data_start, h.size)})
        return {"source": self.source, "root": self.root, "revision": self.revision,
                "files": files}


SAMPLE_WINDOWS, SAMPLE_BYTES = 16, 4096


def sample_sha256(path: str, data_start: int, size: int) -> str:
    """sha256 of SAMPLE_WINDOWS windows of SAMPLE_BYTES spread evenly over the data section
    (all of it when smaller): 64 KiB read per file, yet any re-trained weights change it."""
    span = size - data_start
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if span <= SAMPLE_WINDOWS * SAMPLE_BYTES:
            f.seek(data_start)
            h.update(f.read(span))
        else:
            step = (span - SAMPLE_BYTES) // (SAMPLE_WINDOWS - 1)
            for i in range(SAMPLE_WINDOWS):
                h.update(os.pread(f.fileno(), SAMPLE_BYTES, data_start + i * step))
    return h.hexdigest()


# ----------------------------------------------------------------------------- resolution

def open_checkpoint(source, revision: str | None = None) -> Checkpoint:
    """Inventory a checkpoint from its headers: a directory (model.safetensors, or an index
    json with shards, or exactly one *.safetensors), one .safetensors file, or an HF repo id
    ("org/name", "org/name@rev" or revision=...) resolved offline from the local HF cache."""
    source = os.fspath(source)
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.exists(path):
        if revision is not None:
            raise KenError(f"revision {revision!r} applies to Hugging Face repo ids only, but "
                           f"{source!r} is a local path; drop the revision")
        if os.path.isdir(path):
            return _from_dir(source, path, None, hint="")
        return _from_file(source, path)
    if _looks_like_path(source):
        raise KenError(f"{source}: no such file or directory; pass a directory holding "
                       f"*.safetensors files, a .safetensors file, or an HF repo id 'org/name'")
    repo_id, rev = source, revision
    if rev is None and "@" in source:
        repo_id, rev = source.rsplit("@", 1)
    snapshot = os.path.abspath(_resolve_hf(source, repo_id, rev))
    hint = (f"; on a machine with network run `hf download {repo_id} --include '*.safetensors' "
            f"'*.json'` (older: `huggingface-cli download {repo_id}`)")
    return _from_dir(source, snapshot, os.path.basename(snapshot), hint=hint)


def _looks_like_path(source: str) -> bool:
    return (source.startswith(("/", ".", "~")) or source.endswith((".safetensors", ".json"))
            or source.count("/") > 1 or os.sep != "/" and os.sep in source
            or source.endswith(PICKLE_SUFFIXES))


def hf_cache_dir() -> str:
    """The HF hub cache, read from the environment at call time (HF_HUB_CACHE, HF_HOME)."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return os.path.expanduser(env[var])
    if env.get("HF_HOME"):
        return os.path.join(os.path.expanduser(env["HF_HOME"]), "hub")
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def _resolve_hf(source: str, repo_id: str, revision: str | None) -> str:
    """Snapshot directory of repo_id@revision in the local cache; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hf_cache_dir()
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                 local_files_only=True,
                                 allow_patterns=["*.safetensors", "*.json"])
    except HFValidationError as e:
        raise KenError(f"{source!r} is neither an existing local path nor a valid Hugging Face "
                       f"repo id ('org/name'); check the spelling") from e
    except LocalEntryNotFoundError as e:
        rev = f" at revision {revision!r}" if revision else ""
        repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
        cached = sorted(os.listdir(os.path.join(repo_dir, "snapshots"))) if os.path.isdir(
            os.path.join(repo_dir, "snapshots")) else []
        have = f" (cached snapshots: {', '.join(cached)})" if cached else ""
        flag = f" --revision {revision}" if revision else ""
        raise KenError(
            f"{source!r}: repo {repo_id!r}{rev} is not a local path and is not in the local "
            f"Hugging Face cache {cache}{have}; ken_dist never downloads. On a machine with "
            f"network run `huggingface-cli download {repo_id}{flag}` (or `hf download "
            f"{repo_id}{flag}`) and copy the cache here (or point HF_HUB_CACHE / HF_HOME at "
            f"it), or pass a local directory holding the .safetensors files") from e
    except Exception as e:  # e.g. an unreadable cache directory
        raise KenError(f"{source!r}: cannot look up repo {repo_id!r} in the local Hugging Face "
                       f"cache {cache} ({type(e).__name__}: {e}); check that directory, or "
                       f"pass a local directory holding the .safetensors files") from e


def _from_file(source: str, path: str) -> Checkpoint:
    root = os.path.dirname(path)
    if path.endswith(".index.json"):
        return _from_index(source, root, path, None)
    if path.endswith(PICKLE_SUFFIXES):
        raise KenError(_pickle_message(path, [os.path.basename(path)]))
    if not path.endswith(".safetensors"):
        raise KenError(f"{path}: not a .safetensors file; pass a safetensors file, a directory "
                       f"or an HF repo id")
    return _build(source, root, None, [path])


def _from_dir(source: str, root: str, revision: str | None, hint: str) -> Checkpoint:
    single = os.path.join(root, "model.safetensors")
    if os.path.exists(single):  # transformers' own preference order
        return _build(source, root, revision, [single])
    names = sorted(os.listdir(root))  # not glob: a path may contain [ ] or *
    indexes = [os.path.join(root, n) for n in names if n.endswith(".safetensors.index.json")]
    default_index = os.path.join(root, "model.safetensors.index.json")
    if default_index in indexes:
        return _from_index(source, root, default_index, revision)
    if len(indexes) == 1:
        return _from_index(source, root, indexes[0], revision)
    files = [os.path.join(root, n) for n in names if n.endswith(".safetensors")]
    if len(indexes) > 1 or len(files) > 1:
        shown = [os.path.basename(p) for p in indexes or files]
        raise KenError(f"{root}: several candidate checkpoints ({', '.join(shown)}) and no "
                       f"model.safetensors(.index.json); pass the .safetensors file (or index "
                       f"json) you mean")
    if len(files) == 1:
        return _build(source, root, revision, files)
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise KenError(_pickle_message(root, pickles))
    raise KenError(f"{root}: no .safetensors files found (source {source!r}){hint}")


def _pickle_message(where: str, names: list[str]) -> str:
    return (f"{where}: holds only pickle checkpoints ({', '.join(names[:5])}); ken_dist does not "
            f"read pickle files (loading them can run code). Convert to safetensors first, on a "
            f"machine where you trust the file, e.g. `python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('DIR').save_pretrained('OUT')\"` "
            f"(use the model's own class), and pass OUT")


def _from_index(source: str, root: str, index: str, revision: str | None) -> Checkpoint:
    try:
        with open(index, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise KenError(f"{index}: cannot read the shard index ({e}); {CORRUPT_FIX}") from e
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise KenError(f"{index}: no 'weight_map' object of tensor -> shard file; {CORRUPT_FIX}")
    shards = []
    for rel in dict.fromkeys(wmap.values()):
        path = os.path.normpath(os.path.join(root, rel))
        if os.path.isabs(rel) or not path.startswith(os.path.join(root, "")):
            raise KenError(f"{index}: shard {rel!r} lies outside {root}; {CORRUPT_FIX}")
        if not os.path.exists(path):
            raise KenError(f"{index}: lists shard {rel!r} which is missing from {root}; the "
                           f"download looks incomplete; re-download or re-save it")
        shards.append(path)
    ckpt = _build(source, root, revision, sorted(shards))
    listed = {n: os.path.normpath(os.path.join(root, r)) for n, r in wmap.items()}
    stray = [f"{n} (in {os.path.basename(i.file)})" for n, i in ckpt.tensors.items()
             if listed.get(n) != i.file]
    absent = [f"{n} (index says {os.path.basename(p)})" for n, p in listed.items()
              if n not in ckpt.tensors]
    if stray or absent:
        bad = (["not where the index says: " + s for s in stray]
               + ["listed but missing: " + s for s in absent])
        raise KenError(f"{index}: index out of sync with its shards ({len(bad)} tensors: "
                       f"{'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); {CORRUPT_FIX}")
    return ckpt


def _build(source: str, root: str, revision: str | None, files: list[str]) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    headers = []
    for path in files:
        h = read_header(path)
        headers.append(h)
        for e in sorted(h.entries, key=lambda e: e.data_offsets):
            if e.name in tensors:
                raise KenError(f"{path}: tensor {e.name!r} also appears in "
                               f"{tensors[e.name].file}; {CORRUPT_FIX}")
            tensors[e.name] = TensorInfo(e.name, e.shape, e.dtype, path, e.data_offsets)
    return Checkpoint(source, root, revision, tuple(files), tensors, tuple(headers))


# ----------------------------------------------------------------------------- reading

READ_CHUNK_BYTES = 256 * 2**20  # one pread at most (Linux caps a single read near 2 GiB)


def _data_start(info: TensorInfo, what: str) -> int:
    """Offset of the file's data section, after checking the file still holds the tensor where,
    and as, the plan saw it (a file replaced during a job must not feed wrong bytes)."""
    try:
        header = read_header(info.file)
    except KenError as e:
        raise KenError(f"{info.file}: cannot read {what} of tensor {info.name!r}: the file changed or broke "
                       f"since it was inventoried ({e}); restart the job") from None
    entry = next((e for e in header.entries if e.name == info.name), None)
    if entry is None:
        raise KenError(f"{info.file}: tensor {info.name!r} is no longer in the file; the "
                       f"file changed during the job; restart it")
    if (entry.shape, entry.dtype, entry.data_offsets) != (info.shape, info.dtype, info.data_offsets):
        raise KenError(f"{info.file}: tensor {info.name!r} is now {entry.dtype} {list(entry.shape)} at bytes "
                       f"{list(entry.data_offsets)}, but was {info.dtype} {list(info.shape)} at "
                       f"{list(info.data_offsets)} when the checkpoint was opened; the file changed during "
                       f"the job; restart it")
    return header.data_start


def _pread_into(path: str, buf: np.ndarray, offset: int) -> None:
    """Fill the uint8 array `buf` with the file's bytes from `offset` (KenError if the file ends)."""
    view = memoryview(buf)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise KenError(f"{path}: cannot open to read ({e.strerror or e}); check the file and its permissions") from e
    try:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done: done + READ_CHUNK_BYTES]], offset + done)
            if got == 0:
                raise KenError(f"{path}: file ended {len(view) - done} bytes early; {CORRUPT_FIX}")
            done += got
    finally:
        os.close(fd)


def read_rows_array(info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as a numpy array [stop-start, row_len] of the tensor's storage bits
    (ken_dist.dtypes: the numpy dtype where one exists, bf16/fp8 as same-size unsigned ints).

    Reads exactly those rows' bytes with pread, at the offsets of the header (re-read and
    checked each call); needs no torch, which is what keeps CPU actors light."""
    rows, row_len = info.row_geometry
    if not (0 <= start <= stop <= rows):
        raise KenError(f"{info.file}: tensor {info.name!r}: rows [{start}, {stop}) are outside "
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


__all__ = ["TensorInfo", "Checkpoint", "open_checkpoint", "read_rows", "read_tensor", "read_rows_array",
           "read_tensor_array",
           "TensorMatch", "match_checkpoints", "parse_prefix_map", "PRESETS", "torch_dtype",
           "hf_cache_dir"]
