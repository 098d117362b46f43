"""What a work unit costs beyond the kernel, in one process, side by side and interleaved.

benchmarks/e2e.py compares run_job with the kernel measured minutes apart; on a VM whose speed
drifts by 10-25% from one minute to the next (measured here: the same kernel pass took 44.1 s,
then 35.1 s three minutes later) that comparison can show an overhead the pipeline does not
have. This runs, alternately in the same process and on the same units:
  unit     execute.process_unit: pread the rows, widen, select in chunks, encode, Parquet, fsync
  kernel   read_rows (torch) + select on the whole block, as e2e's kernel pass does
and prints each round's CPU seconds and their ratio.

    python benchmarks/e2e.py --workers 1 --skip-kernel        # writes the checkpoint pair
    python benchmarks/unit_cost.py --workdir /tmp/ken-e2e --units 20 --rounds 2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from ken_dist.checkpoints.reads import read_rows
from ken_dist.job.execute import process_unit
from ken_dist.job.plan import PruneParams
from ken_dist.job.spec import FineTuneEntry, JobSpec
from ken_dist.kernel import select
from ken_dist.runtime.driver import plan_job
from ken_dist.store.protocol import Store


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/ken-e2e", help="benchmarks/e2e.py's workdir (its ckpt/ pair)")
    ap.add_argument("--units", type=int, default=20, help="the largest N units of the plan")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", type=float, default=0.25)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ckpt = os.path.join(args.workdir, "ckpt")
    with tempfile.TemporaryDirectory() as tmp:
        job = JobSpec(base=os.path.join(ckpt, "base"), store=os.path.join(tmp, "store"),
                      finetunes=(FineTuneEntry("x", os.path.join(ckpt, "finetune"), None, PruneParams(keep=args.keep)),))
        base, (plan,) = plan_job(job)
        store = Store(job.store, create=True)
        store.begin("x", params=plan.spec.params.as_dict(), base_identity=base.identity(),
                    finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors)
        units = [u for u in plan.units if u.action == "prune"][: args.units]
        process_unit(units[-1], store)  # compiled kernel loaded
        rows = sum(u.rows for u in units)
        print(f"{len(units)} units, {rows:,} rows of {job.finetunes[0].source}; CPU seconds, one thread")
        for r in range(args.rounds):
            c = time.process_time()
            for u in units:
                process_unit(u, store)
            unit = time.process_time() - c
            c = time.process_time()
            for u in units:
                select("ken", read_rows(u.ft_info, u.row_start, u.row_end), keep=args.keep, seed=u.seed,
                       row_offset=u.row_start)
            kernel = time.process_time() - c
            print(f"round {r + 1}: unit {unit:.2f} s, kernel {kernel:.2f} s: unit / kernel = {unit / kernel:.3f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
