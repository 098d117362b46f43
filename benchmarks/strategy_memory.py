"""Peak memory of one `select` call per strategy on one default-size block, side by side.

    python benchmarks/strategy_memory.py                     # 4096 x 8192 bf16 = one 64 MiB block
    python benchmarks/strategy_memory.py --rows 1024 --strategies ken lowrank-delta-model

Row-local strategies (ken, magnitude, ...) are given the block in chunks by the executor
(execute.SELECT_CHUNK_ELEMENTS), so their per-worker peak does not grow with --block-bytes;
block-level ones (lowrank-*) see the whole block at once. Each strategy runs in its own process;
the figure is the growth of peak RSS (ru_maxrss) over the inputs, which are built row group by row
group so that building them does not set the peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")


def child(strategy: str, rows: int, n: int, chunked: bool) -> dict:
    import resource

    import torch

    from ken_dist.job.execute import SELECT_CHUNK_ELEMENTS
    from ken_dist.kernel import STRATEGIES, select

    torch.manual_seed(0)
    base = torch.empty(rows, n, dtype=torch.bfloat16)
    ft = torch.empty(rows, n, dtype=torch.bfloat16)
    for a in range(0, rows, 256):
        b = torch.randn(min(256, rows - a), n) * 0.02
        base[a:a + 256] = b
        ft[a:a + 256] = b + torch.randn(b.shape) * 0.002
    select(strategy if STRATEGIES[strategy].scope != "model" else "magnitude", ft[:2], base[:2], keep=0.25)  # imports, JIT
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step = rows
    if chunked and STRATEGIES[strategy].scope == "row":
        step = max(1, SELECT_CHUNK_ELEMENTS["cpu"] // n)  # what the executor does
    for a in range(0, rows, step):
        kw = {"budget": (min(step, rows - a) * n) // 4} if STRATEGIES[strategy].scope == "model" else {"keep": 0.25}
        select(strategy, ft[a:a + step], base[a:a + step], row_offset=a, **kw)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"strategy": strategy, "growth": after - before, "entries": rows * n, "step": step}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--strategies", nargs="+", default=["ken", "magnitude", "ken-delta", "lowrank-delta",
                                                         "lowrank-delta-block", "magnitude-model",
                                                         "lowrank-delta-model"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.n, chunked=True)))
        return 0
    print(f"one block of {args.rows} x {args.n} bf16 ({args.rows * args.n * 2 / 2**20:.0f} MiB), keep 0.25; "
          "peak RSS growth of select, as the executor calls it")
    print(f"{'strategy':24s}{'rows per call':>14s}{'peak growth':>14s}{'bytes/entry':>13s}")
    for s in args.strategies:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", s, "--rows", str(args.rows),
                              "--n", str(args.n)], capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{s:24s}{r['step']:14d}{r['growth'] / 2**30:11.2f} GiB{r['growth'] / r['entries']:13.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
