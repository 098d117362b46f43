"""Time `ken-dist viz` on 7B-shaped matrices: generate a Llama-7B-shaped layer set, prune it, render it.

    python benchmarks/viz_speed.py                         # 2 layers of hidden 4096 / intermediate 14336
    python benchmarks/viz_speed.py --layers 1 --workdir /tmp/vizbench --delta

The pair is generated with ken_dist.testing.synthetic (bf16, 7 matrices per layer: q/o 4096x4096,
k/v 1024x4096 (8 KV heads), gate/up 14336x4096, down 4096x14336), pruned with KEN at --keep by
run_job on a private local Ray, then `ken-dist viz` is run as a user would (a subprocess) on
every layer matrix; the wall time of that command is what is reported. Generated files and the
store are reused when present (delete --workdir to start over).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--workdir", default="/tmp/ken-viz-bench")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--delta", action="store_true", help="also time --delta (reads the base)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ken_dist.job.plan import PruneParams
    from ken_dist.job.spec import FineTuneEntry, JobSpec
    from ken_dist.runtime import run_job
    from ken_dist.testing.synthetic import LlamaShape, write_pair

    root = Path(args.workdir)
    shape = LlamaShape(hidden=4096, intermediate=14336, layers=args.layers, vocab=1024, heads=32, kv_heads=8)
    if not (root / "finetune" / "config.json").exists():
        t0 = time.time()
        write_pair(root, shape, dtype="bf16")
        print(f"generated {shape.parameters() / 1e6:.0f}M-parameter bf16 pair in {time.time() - t0:.0f} s")
    store = root / "store"
    if not (store / "finetunes" / "sft" / "manifest.json").exists():
        t0 = time.time()
        job = JobSpec(base=str(root / "base"), store=str(store), include=(r"layers\.",),
                      finetunes=(FineTuneEntry("sft", str(root / "finetune"), None, PruneParams(keep=args.keep)),))
        run_job(job, workers=args.workers, overwrite=True, quiet=True)
        print(f"pruned with KEN at keep {args.keep} in {time.time() - t0:.0f} s")
    results = {}
    for delta in ([False, True] if args.delta else [False]):
        out = root / ("viz-delta" if delta else "viz")
        cmd = ["ken-dist", "viz", str(store), "--finetune", "sft", "--tensor", r"layers\.\d+\.(self_attn|mlp)\.",
               "--out", str(out), "--quiet"] + (["--delta"] if delta else [])
        t0 = time.time()
        subprocess.run(cmd, check=True)
        wall = time.time() - t0
        stats = json.loads((out / "stats.json").read_text())
        n = len(stats["matrices"])
        params = sum(m["entries"] for m in stats["matrices"])
        results["delta" if delta else "values"] = wall
        print(f"ken-dist viz{' --delta' if delta else ''}: {n} matrices ({params / 1e6:.0f}M entries, "
              f"largest {max((m['rows'], m['cols']) for m in stats['matrices'])}) in {wall:.1f} s wall "
              f"(command included: Python start, imports); figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
