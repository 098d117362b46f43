"""Generated Llama-shaped base / fine-tune checkpoint pairs of any size, streamed to disk.

Used by the demo, the tests and the benchmarks: nothing is downloaded, and a 10B pair can be
written with a few hundred MB of memory because each safetensors shard is written header first,
then tensor by tensor in row chunks (the format is a JSON header followed by raw bytes).
The fine-tune is the base plus a realistic perturbation: a small dense delta on every weight,
and a few rows per matrix moved much further (as task-specific fine-tuning does).

Determinism and consistency: the values of a tensor depend only on (seed, tensor name, group of
ROW_GROUP rows): each group draws its base values, then its delta, from one generator seeded by
those three. The fine-tune is computed from the base *as stored* (rounded to the file's dtype):
fine-tune = dtype(dtype(base) + delta). So `ft - base` read back from the two files is the
delta rounded once, and writing the fine-tune alone (`write_checkpoint(finetune=True)`) gives the
same bytes as writing it together with its base (`write_pair`).

Speed: each group of rows seeds one torch generator (torch's CPU randn outpaces numpy's normals),
the casts run in place, and `write_pair` draws each base value once for both files (what this
replaced and the measured rates: docs/performance.md, "Generating a checkpoint pair"). The values therefore
depend on torch's CPU random stream (stable across torch releases in practice; regenerate the
pair rather than keep generated files across upgrades). `threads` > 1 generates chunks in
parallel (torch's random fills and casts release the GIL); writes stay in order.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ken_dist.checkpoints.dtypes import itemsize, torch_dtype
from ken_dist.checkpoints.geometry import row_geometry
from ken_dist.checkpoints.header import encode_header
from ken_dist.errors import KenError
from ken_dist.testing.shapes import DTYPES, PRESETS, LlamaShape  # noqa: F401  (the generator's names)

CHUNK_ELEMENTS = 8 * 2**20
ROW_GROUP = 64  # rows drawn from one seeded generator; chunks hold whole groups
MOVED_FRACTION = 0.05  # rows of a matrix the fine-tune moves 10x further


def _group_seed(seed: int, key: int, group: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}:{group}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _chunk(name: str, shape: tuple[int, ...], start: int, stop: int, seed: int, dtype: str,
           finetune: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(base, fine-tune or None) rows [start, stop) of a tensor in the file dtype, [stop-start, row_len].

    start must be a multiple of ROW_GROUP and stop one too, or the tensor's last row."""
    rows, row_len = row_geometry(shape)
    if start % ROW_GROUP or (stop % ROW_GROUP and stop != rows) or not 0 <= start < stop <= rows:
        raise KenError(f"synthetic rows [{start}, {stop}) of {name!r}: chunks must hold whole groups "
                       f"of {ROW_GROUP} rows")
    key = zlib.crc32(name.encode())
    base = torch.empty((stop - start, row_len), dtype=torch.float32)
    delta = torch.empty_like(base) if finetune else None
    gen = torch.Generator()
    for g0 in range(start, stop, ROW_GROUP):
        g1 = min(stop, g0 + ROW_GROUP)
        gen.manual_seed(_group_seed(seed, key, g0 // ROW_GROUP))
        torch.randn((g1 - g0, row_len), generator=gen, out=base[g0 - start: g1 - start])
        if finetune:
            d = delta[g0 - start: g1 - start]
            torch.randn((g1 - g0, row_len), generator=gen, out=d)
            d[torch.rand(g1 - g0, generator=gen) < MOVED_FRACTION] *= 10
    if name.endswith("norm.weight"):
        base.mul_(0.05).add_(1.0)
    else:
        base.mul_(0.02)
    base_t = base.to(torch_dtype(DTYPES[dtype]))
    if not finetune:
        return base_t, None
    ft = base_t.to(torch.float32, copy=True)  # the base as the file holds it
    ft.add_(delta.mul_(0.002))
    return base_t, ft.to(torch_dtype(DTYPES[dtype]))


def tensor_rows(name: str, shape: tuple[int, ...], start: int, stop: int, *, seed: int = 0,
                dtype: str = "bf16", finetune: bool = False) -> torch.Tensor:
    """Rows [start, stop) of a generated tensor exactly as the files hold them (any range)."""
    rows, _ = row_geometry(shape)
    a = start - start % ROW_GROUP
    b = min(rows, -(-stop // ROW_GROUP) * ROW_GROUP)
    base, ft = _chunk(name, shape, a, b, seed, dtype, finetune)
    return (ft if finetune else base)[start - a: stop - a]


def _tasks(tensors) -> list[tuple[str, tuple[int, ...], int, int]]:
    out = []
    for name, shape in tensors:
        rows, row_len = row_geometry(shape)
        step = max(ROW_GROUP, CHUNK_ELEMENTS // row_len // ROW_GROUP * ROW_GROUP)
        out += [(name, shape, a, min(rows, a + step)) for a in range(0, rows, step)]
    return out


def _header(tensors, dtype: str) -> bytes:
    return encode_header([(name, DTYPES[dtype], shape) for name, shape in tensors])


def _write_shard(paths: dict[str, Path], tensors, dtype: str, seed: int, pool: ThreadPoolExecutor | None,
                 progress: Callable[[int], None] | None) -> None:
    """Write one shard to each of paths ({"base": p} and/or {"finetune": p}) in one pass."""
    head = _header(tensors, dtype)
    want_ft = "finetune" in paths
    tmps = {kind: p.with_name(p.name + ".tmp") for kind, p in paths.items()}
    files = {kind: open(t, "wb") for kind, t in tmps.items()}
    try:
        for f in files.values():
            f.write(head)
        jobs = (lambda task=task: _chunk(*task, seed, dtype, want_ft) for task in _tasks(tensors))
        if pool is None:
            results = (job() for job in jobs)
        else:
            results = _ordered(pool, jobs, ahead=2 * pool._max_workers)
        for base_t, ft_t in results:
            for kind, t in (("base", base_t), ("finetune", ft_t)):
                if kind in files:
                    files[kind].write(t.contiguous().view(torch.uint8).numpy())
            if progress is not None:
                progress(base_t.numel() * base_t.element_size() * len(files))
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    for kind, p in paths.items():
        tmps[kind].replace(p)


def _ordered(pool: ThreadPoolExecutor, jobs, ahead: int):
    """Results of jobs in order, at most `ahead` computed ahead of the writer (bounded memory)."""
    window: deque = deque()
    for job in jobs:
        window.append(pool.submit(job))
        if len(window) >= ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def _shard_layout(shape: LlamaShape, dtype: str, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, current, size = [], [], 0
    for name, tshape in shape.tensors():
        nbytes = int(np.prod(tshape)) * itemsize(DTYPES[dtype])
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tshape))
        size += nbytes
    shards.append(current)
    return shards


def _write(outs: dict[str, Path], shape: LlamaShape, dtype: str, seed: int, shard_bytes: int,
           threads: int, progress: Callable[[int], None] | None) -> None:
    if dtype not in DTYPES:
        raise KenError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if shard_bytes <= 0:
        raise KenError(f"shard_bytes must be positive, got {shard_bytes}")
    for out in outs.values():
        out.mkdir(parents=True, exist_ok=True)
    shards = _shard_layout(shape, dtype, shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        for fname, tensors in zip(names, shards):
            _write_shard({kind: out / fname for kind, out in outs.items()}, tensors, dtype, seed, pool, progress)
    finally:
        if pool is not None:
            pool.shutdown()
    for out in outs.values():
        if len(shards) > 1:
            weight_map = {name: fname for fname, tensors in zip(names, shards) for name, _ in tensors}
            total = sum(int(np.prod(s)) * itemsize(DTYPES[dtype]) for _, s in shape.tensors())
            (out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (out / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))


def write_checkpoint(out: str | Path, shape: LlamaShape, *, dtype: str = "bf16", seed: int = 0,
                     finetune: bool = False, shard_bytes: int = 5 * 10**9, threads: int = 1,
                     progress: Callable[[int], None] | None = None) -> Path:
    """Write one checkpoint (base or fine-tune of `seed`) as HF-style safetensors shards + config."""
    out = Path(out)
    _write({"finetune" if finetune else "base": out}, shape, dtype, seed, shard_bytes, threads, progress)
    return out


def write_pair(root: str | Path, shape: LlamaShape, *, dtype: str = "bf16", seed: int = 0,
               shard_bytes: int = 5 * 10**9, threads: int = 1,
               progress: Callable[[int], None] | None = None) -> tuple[Path, Path]:
    """A base and its fine-tune under root/base and root/finetune, written in one pass."""
    root = Path(root)
    base, ft = root / "base", root / "finetune"
    _write({"base": base, "finetune": ft}, shape, dtype, seed, shard_bytes, threads, progress)
    return base, ft
