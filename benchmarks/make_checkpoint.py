"""Write a generated Llama-shaped base / fine-tune pair (HF-style safetensors shards + index).

    python benchmarks/make_checkpoint.py --preset 10b --out /tmp/ck10b            # base + finetune
    python benchmarks/make_checkpoint.py --hidden 1024 --intermediate 2752 --layers 8 \\
        --vocab 8192 --heads 16 --kv-heads 16 --dtype bf16 --shard-bytes 5GB --out /tmp/ck
    python benchmarks/make_checkpoint.py --preset 7b --only finetune --out /tmp/ck7b

Streamed: memory stays at a few chunks of 8M elements (~100 MB per thread) whatever the size.
The fine-tune is written from the base values as the base file stores them (see
ken_dist/testing/synthetic.py), and `--only base|finetune` writes exactly the bytes the pair would.
Shards are cut at --shard-bytes (default 5 GB, as Hugging Face's save_pretrained does).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from ken_dist.checkpoints.dtypes import itemsize
from ken_dist.cli.commands import byte_size
from ken_dist.testing.synthetic import DTYPES, PRESETS, LlamaShape, write_checkpoint, write_pair


def shape_from_args(args) -> LlamaShape:
    shape = PRESETS[args.preset] if args.preset else LlamaShape()
    fields = {f: getattr(args, f) for f in ("hidden", "intermediate", "layers", "vocab", "heads", "kv_heads")
              if getattr(args, f) is not None}
    if fields:
        shape = LlamaShape(**{**shape.__dict__, **fields})
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise SystemExit(f"hidden {shape.hidden} must be a multiple of heads {shape.heads}, "
                         f"and heads a multiple of kv-heads {shape.kv_heads}")
    return shape


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named shape; explicit flags override its fields")
    for flag in ("hidden", "intermediate", "layers", "vocab", "heads", "kv-heads"):
        p.add_argument(f"--{flag}", type=int, dest=flag.replace("-", "_"))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--shard-bytes", type=byte_size, default=5 * 10**9, help="max bytes per shard (default 5GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="generator threads (default 1; writes stay ordered)")
    p.add_argument("--only", choices=("pair", "base", "finetune"), default="pair",
                   help="pair (default): OUT/base and OUT/finetune in one pass; base/finetune: OUT itself")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="write even if the disk would be left nearly full")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)  # parallelism is per chunk (--threads); intra-op threads only spin here
    shape = shape_from_args(args)
    params = shape.parameters()
    files = 2 if args.only == "pair" else 1
    need = params * itemsize(DTYPES[args.dtype]) * files
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    print(f"{shape}\n{params:,} parameters ({params / 1e9:.2f} B), {args.dtype}: "
          f"{need / 1e9:.2f} GB to write, {free / 1e9:.1f} GB free under {out}", flush=True)
    if need > free - 2 * 10**9 and not args.force:
        raise SystemExit(f"not enough disk: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free "
                         f"(keeping 2 GB spare); free space or pass --force")
    done = [0, time.time()]
    t0 = time.time()

    def progress(nbytes: int) -> None:
        done[0] += nbytes
        if time.time() - done[1] >= 10 or done[0] >= need:
            done[1] = time.time()
            rate = done[0] / max(1e-9, time.time() - t0)
            print(f"  {100 * done[0] / need:5.1f}%  {done[0] / 1e9:7.2f} GB  {rate / 1e6:6.0f} MB/s  "
                  f"ETA {(need - done[0]) / max(rate, 1):5.0f} s", file=sys.stderr, flush=True)

    kw = dict(dtype=args.dtype, seed=args.seed, shard_bytes=args.shard_bytes, threads=args.threads,
              progress=progress)
    cpu0 = time.process_time()
    if args.only == "pair":
        base, ft = write_pair(out, shape, **kw)
        where = f"{base} and {ft}"
    else:
        where = str(write_checkpoint(out, shape, finetune=args.only == "finetune", **kw))
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {where}: {need / 1e9:.2f} GB in {wall:.1f} s ({need / wall / 1e6:.0f} MB/s, "
          f"{params * files / wall / 1e6:.0f} M params/s; CPU {time.process_time() - cpu0:.1f} s); "
          f"peak RSS {peak:.2f} GiB; {len(os.listdir(out / 'base' if args.only == 'pair' else out))} files per checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
