"""Write a stored subnetwork out as a dense Hugging Face model directory.

Why a hand-rolled safetensors writer: `safetensors.torch.save_file` wants every tensor of a
shard in memory at once; a 70B shard plan would need tens of GB. The format is simple (8-byte
little-endian header length, JSON header, raw data), so each shard's header is computed from
the manifest first and tensors are then streamed into it one at a time.

The directory appears atomically: everything is written into `<out_dir>.tmp` and renamed into
place at the end, so a crash never leaves a half model where a loader would pick it up.
"""
from __future__ import annotations

import json
import math
import os
import shutil

from ken_dist.checkpoints.dtypes import itemsize, torch_dtype
from ken_dist.checkpoints.header import encode_header
from ken_dist.errors import CheckpointError, InputError, KenError, StoreError
from ken_dist.store.fs import fsync_path
from ken_dist.store.parts import raw_bytes

_MARKER = ".ken-materialize-in-progress"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack",
                    ".onnx", ".gguf", ".index.json")


def plan_shards(tensors: dict, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in manifest order, each shard <= max_shard_bytes unless one tensor
    alone is larger (it then gets a shard of its own)."""
    shards, cur, size = [], [], 0
    for name, t in tensors.items():
        nbytes = math.prod(t["shape"]) * itemsize(t["dtype"])
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    if cur or not shards:
        shards.append(cur)
    return shards


def _header(tensors: dict, names: list[str]) -> tuple[bytes, list[str]]:
    """The safetensors header for `names` (widest dtypes first, as safetensors orders them, so
    every tensor starts aligned to its item size) and the data order."""
    order = sorted(names, key=lambda n: (-itemsize(tensors[n]["dtype"]), n))
    return encode_header([(n, tensors[n]["dtype"], tensors[n]["shape"]) for n in order], {"format": "pt"}), order


def _copy_side_files(src_root: str | None, dst: str, where: str) -> list[str]:
    """config.json, tokenizer and generation files (everything but weights) from the fine-tune."""
    if not src_root or not os.path.isdir(src_root):
        raise CheckpointError(f"fine-tune directory {src_root} (recorded as finetune_identity.root in {where}) is "
                              f"gone, so config.json and tokenizer files cannot be copied; restore it, or call "
                              f"materialize(..., finetune_root=DIR) with the fine-tune's files")
    copied = []
    for fn in sorted(os.listdir(src_root)):
        src = os.path.join(src_root, fn)
        if fn.startswith(".") or not os.path.isfile(src) or fn.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copyfile(src, os.path.join(dst, fn))  # follows HF-cache symlinks to the blobs
        copied.append(fn)
    return copied


def _write_all(sub, tensors: dict, root, tmp: str, max_shard_bytes: int):
    """Side files, shards and index into `tmp`; (copied, shard names, total bytes, weight map, groups)."""
    where = f"the manifest of fine-tune {sub.finetune!r} in store {sub.store.root}"
    copied = _copy_side_files(os.fspath(root) if root else None, tmp, where)
    groups = plan_shards(tensors, max_shard_bytes)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map, total = {}, 0
    for fname, group in zip(names, groups):
        header, order = _header(tensors, group)
        path = os.path.join(tmp, fname)
        with open(path, "wb") as f:
            f.write(header)
            for n in order:
                t = sub.get_tensor(n)
                want = tensors[n]
                if list(t.shape) != list(want["shape"]) or t.dtype != torch_dtype(want["dtype"]):
                    raise StoreError(f"tensor {n!r} rebuilt as {t.dtype} {list(t.shape)}, manifest says "
                                   f"{want['dtype']} {want['shape']}; the store is damaged")
                f.write(memoryview(raw_bytes(t)))
                total += t.numel() * t.element_size()
                weight_map[n] = fname
            f.flush()
            os.fsync(f.fileno())
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    return copied, names, total, weight_map, groups


def _discard(tmp: str, exc: BaseException) -> None:
    """Remove a refused run's partial output; if that fails too, say where it was left."""
    try:
        shutil.rmtree(tmp)
    except OSError as e:
        note = (f"; its partial output could not be removed ({e.strerror or e}) and is left at {tmp}: "
                f"delete it by hand")
        if isinstance(exc, KenError):
            exc.args = (f"{exc.args[0] if exc.args else exc}{note}",) + exc.args[1:]
        else:
            exc.add_note(note.lstrip("; "))


def materialize(store, finetune: str, out_dir, base=None, max_shard_bytes: int = 5 * 2**30, *,
                overwrite: bool = False, finetune_root=None) -> dict:
    """Write the pruned fine-tune as a dense HF directory loadable with from_pretrained.

    Every fine-tune tensor is written (pruned ones rebuilt from the base, whole ones as stored),
    one at a time, into model.safetensors or model-0000i-of-0000N.safetensors shards plus
    model.safetensors.index.json; side files come from the fine-tune's root (or finetune_root).
    Refuses a non-empty out_dir unless overwrite=True. Returns what was written."""
    from ken_dist.subnetwork.view import open_subnetwork

    if max_shard_bytes <= 0:
        raise InputError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out_dir = os.path.abspath(os.fspath(out_dir)).rstrip(os.sep)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or (os.listdir(out_dir) and not overwrite)):
        raise InputError(f"refusing to write into {out_dir}: it exists and is not an empty directory; "
                       f"pass overwrite=True (--overwrite) or choose another directory")
    tmp = out_dir + ".tmp"
    if os.path.exists(tmp):
        if not os.path.exists(os.path.join(tmp, _MARKER)):
            raise InputError(f"{tmp} exists and was not left by ken_dist; move it away and retry")
        shutil.rmtree(tmp)
    with open_subnetwork(store, finetune, base) as sub:
        manifest = sub.manifest()
        root = finetune_root if finetune_root is not None else (manifest["finetune_identity"] or {}).get("root")
        os.makedirs(tmp)
        open(os.path.join(tmp, _MARKER), "w").close()
        try:
            copied, names, total, weight_map, groups = _write_all(sub, manifest["tensors"], root, tmp,
                                                                  max_shard_bytes)
        except BaseException as exc:
            _discard(tmp, exc)
            raise
    os.unlink(os.path.join(tmp, _MARKER))
    fsync_path(tmp)
    old = None
    if os.path.exists(out_dir):
        if os.listdir(out_dir):
            old = f"{out_dir}.old-{os.getpid()}"
            os.rename(out_dir, old)
        else:
            os.rmdir(out_dir)
    os.rename(tmp, out_dir)
    fsync_path(os.path.dirname(out_dir) or ".")
    if old:
        shutil.rmtree(old)
    return {"out_dir": out_dir, "shards": names, "total_size": total, "tensors": len(weight_map),
            "copied": copied, "index": "model.safetensors.index.json" if len(groups) > 1 else None}
