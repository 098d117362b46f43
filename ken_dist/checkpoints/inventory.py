"""Checkpoints as inventories: where each tensor lives, read from headers only.

Why: planning a job over a multi-GB checkpoint must not read its weights. `open_checkpoint`
resolves what the user gave (a directory, one .safetensors file, or a Hugging Face repo id
looked up OFFLINE in the local HF cache), validates every header (see header.py)
and returns a `Checkpoint` listing each tensor's file, dtype, shape and byte range. Workers
then read just their row block with `read_rows` (reads.py), straight from the file, so tensor bytes never
pass through the driver. `match_checkpoints` (ken_dist.job.match) checks base against fine-tune before
any work. No pickle checkpoint is ever loaded: they can run code when unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from ken_dist.checkpoints.geometry import row_geometry
from ken_dist.checkpoints.header import (
    CORRUPT_FIX,
    DTYPE_BITS,
    FLOAT_DTYPES,
    FileHeader,
    read_header,
)
from ken_dist.errors import CheckpointError

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
        """(num_rows, row_len): KEN selects within rows (ken_dist.checkpoints.geometry)."""
        return row_geometry(self.shape)


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
            raise CheckpointError(f"revision {revision!r} applies to Hugging Face repo ids only, but "
                           f"{source!r} is a local path; drop the revision")
        if os.path.isdir(path):
            return _from_dir(source, path, None, hint="")
        return _from_file(source, path)
    if _looks_like_path(source):
        raise CheckpointError(f"{source}: no such file or directory; pass a directory holding "
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
        raise CheckpointError(f"{source!r} is neither an existing local path nor a valid Hugging Face "
                       f"repo id ('org/name'); check the spelling") from e
    except LocalEntryNotFoundError as e:
        rev = f" at revision {revision!r}" if revision else ""
        repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
        cached = sorted(os.listdir(os.path.join(repo_dir, "snapshots"))) if os.path.isdir(
            os.path.join(repo_dir, "snapshots")) else []
        have = f" (cached snapshots: {', '.join(cached)})" if cached else ""
        flag = f" --revision {revision}" if revision else ""
        raise CheckpointError(
            f"{source!r}: repo {repo_id!r}{rev} is not a local path and is not in the local "
            f"Hugging Face cache {cache}{have}; ken_dist never downloads. On a machine with "
            f"network run `huggingface-cli download {repo_id}{flag}` (or `hf download "
            f"{repo_id}{flag}`) and copy the cache here (or point HF_HUB_CACHE / HF_HOME at "
            f"it), or pass a local directory holding the .safetensors files") from e
    except (OSError, ValueError) as e:  # what snapshot_download documents, e.g. an unreadable cache directory
        raise CheckpointError(f"{source!r}: cannot look up repo {repo_id!r} in the local Hugging Face "
                       f"cache {cache} ({type(e).__name__}: {e}); check that directory, or "
                       f"pass a local directory holding the .safetensors files") from e


def _from_file(source: str, path: str) -> Checkpoint:
    root = os.path.dirname(path)
    if path.endswith(".index.json"):
        return _from_index(source, root, path, None)
    if path.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(_pickle_message(path, [os.path.basename(path)]))
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: not a .safetensors file; pass a safetensors file, a directory "
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
        raise CheckpointError(f"{root}: several candidate checkpoints ({', '.join(shown)}) and no "
                       f"model.safetensors(.index.json); pass the .safetensors file (or index "
                       f"json) you mean")
    if len(files) == 1:
        return _build(source, root, revision, files)
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(_pickle_message(root, pickles))
    raise CheckpointError(f"{root}: no .safetensors files found (source {source!r}){hint}")


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
        raise CheckpointError(f"{index}: cannot read the shard index ({e}); {CORRUPT_FIX}") from e
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
        raise CheckpointError(f"{index}: no 'weight_map' object of tensor -> shard file (or it is empty); "
                              f"{CORRUPT_FIX}")
    shards = []
    for rel in dict.fromkeys(wmap.values()):
        path = os.path.normpath(os.path.join(root, rel))
        if os.path.isabs(rel) or not path.startswith(os.path.join(root, "")):
            raise CheckpointError(f"{index}: shard {rel!r} lies outside {root}; {CORRUPT_FIX}")
        if not os.path.exists(path):
            raise CheckpointError(f"{index}: lists shard {rel!r} which is missing from {root}; the "
                           f"download looks incomplete; re-download or re-save it")
        shards.append(path)
    unlisted = _unlisted_shards(wmap.values())
    if unlisted:
        raise CheckpointError(f"{index}: lists no tensor of shard(s) {', '.join(unlisted[:5])} although its "
                              f"shards are numbered as one set; the index is damaged or out of date; "
                              f"{CORRUPT_FIX}")
    ckpt = _build(source, root, revision, sorted(shards))
    listed = {n: os.path.normpath(os.path.join(root, r)) for n, r in wmap.items()}
    stray = [f"{n} (in {os.path.basename(i.file)})" for n, i in ckpt.tensors.items()
             if listed.get(n) != i.file]
    absent = [f"{n} (index says {os.path.basename(p)})" for n, p in listed.items()
              if n not in ckpt.tensors]
    if stray or absent:
        bad = (["not where the index says: " + s for s in stray]
               + ["listed but missing: " + s for s in absent])
        raise CheckpointError(f"{index}: index out of sync with its shards ({len(bad)} tensors: "
                       f"{'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); {CORRUPT_FIX}")
    return ckpt


_SHARD_NAME = re.compile(r"(.*)-(\d+)-of-(\d+)\.safetensors")


def _unlisted_shards(listed) -> list[str]:
    """Shards of a numbered set (`model-00002-of-00004.safetensors`) that the index never names:
    the tensors of a shard dropped from the index would otherwise vanish without a word."""
    listed, missing = set(listed), []
    for rel in sorted(listed):
        m = _SHARD_NAME.fullmatch(rel)
        if m:
            width, total = len(m.group(2)), int(m.group(3))
            missing += [name for i in range(1, total + 1)
                        if (name := f"{m.group(1)}-{i:0{width}d}-of-{m.group(3)}.safetensors") not in listed]
    return sorted(set(missing))


def _build(source: str, root: str, revision: str | None, files: list[str]) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    headers = []
    for path in files:
        h = read_header(path)
        headers.append(h)
        for e in sorted(h.entries, key=lambda e: e.data_offsets):
            if e.name in tensors:
                raise CheckpointError(f"{path}: tensor {e.name!r} also appears in "
                               f"{tensors[e.name].file}; {CORRUPT_FIX}")
            tensors[e.name] = TensorInfo(e.name, e.shape, e.dtype, path, e.data_offsets)
    return Checkpoint(source, root, revision, tuple(files), tensors, tuple(headers))
