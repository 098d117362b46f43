"""A model-budget strategy's job against its block-budget twin, side by side on one generated pair.

    python benchmarks/model_budget.py                       # 477M-parameter bf16 pair (e2e.py's default shape)
    python benchmarks/model_budget.py --hidden 2560 --intermediate 6912 --layers 4 --vocab 24000 \\
        --heads 20 --kv-heads 4 --workdir /tmp/ken-mb398   # the 398M pair of docs/performance.md
    python benchmarks/model_budget.py --stages 4            # + where one block's time goes, in process
    git archive v0 | tar -x -C /tmp/v0 && python benchmarks/model_budget.py --baseline-code /tmp/v0   # vs a release

What it measures (all on the same generated fine-tune, benchmarks/make_checkpoint.py's generator):
- jobs: `run_job` with --block-strategy and --model-strategy (and, with --baseline-code DIR, the
  model strategy again with the ken_dist checked out at DIR), each in a fresh process on a private
  local Ray with --workers actors, --rounds rounds with the order rotated every round: wall time of
  each model job / the block job, and the passes' own times (scoring, selection) from run_job's
  timings, with the progress lines on spilled candidates.
- store: with --baseline-code, every block of the model store is compared with the baseline's:
  same budget, same part bytes (sha256), and the same rebuilt tensors.
- memory (--memory): peak RSS growth of one unit on the largest block, each in its own process:
  the scoring pass with its spill, the selection from that spill, the block strategy's unit.
- stages (--stages N): on the N largest blocks, in this process, one thread: read (fine-tune +
  base), score, histogram, top-`budget` mask, part write: what each pass of a two-pass model job
  costs.

Results also go to WORKDIR/model_budget.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

DEFAULT_SHAPE = dict(hidden=2048, intermediate=5632, layers=8, vocab=16000, heads=16, kv_heads=16)


def _job(args, strategy: str, store: str):
    from ken_dist.job.plan import PruneParams
    from ken_dist.job.spec import FineTuneEntry, JobSpec

    params = PruneParams(strategy=strategy, keep=args.keep, values=args.values)
    return JobSpec(base=args.base, store=store, block_bytes=args.block_bytes,
                   finetunes=(FineTuneEntry("ft", args.ft, None, params),))


def stages(args) -> dict:
    """Seconds per stage over the N largest blocks, one thread, in this process."""
    import numpy as np

    from ken_dist.checkpoints.dtypes import to_float32
    from ken_dist.checkpoints.reads import read_rows_array
    from ken_dist.job.plan import plan_finetune
    from ken_dist.kernel import block_scores
    from ken_dist.kernel.strategies.budget import score_histogram
    from ken_dist.kernel.strategies.registry import block_top_mask
    from ken_dist.store.protocol import Store

    job = _job(args, args.model_strategy, "/nonexistent")
    spec = job.open_finetunes()[0]
    plan = plan_finetune(job.open_base(), spec, block_bytes=job.block_bytes)
    units = sorted((u for u in plan.units if u.action == "prune"), key=lambda u: -u.elements)[:args.stages]
    tot = dict.fromkeys(("read", "score", "histogram", "mask", "write"), 0.0)
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        store = Store(os.path.join(scratch, "s"), create=True)
        store.begin("ft", params=spec.params.as_dict(), base_identity={}, finetune_identity={},
                    tensors=plan.tensors)
        for u in units:
            t0 = time.perf_counter()
            ft = read_rows_array(u.ft_info, u.row_start, u.row_end)
            base = read_rows_array(u.base_info, u.row_start, u.row_end)
            t1 = time.perf_counter()
            scores = block_scores(spec.params.strategy, to_float32(ft, u.ft_info.dtype),
                                  to_float32(base, u.base_info.dtype))
            t2 = time.perf_counter()
            score_histogram(scores)
            t3 = time.perf_counter()
            mask = block_top_mask(scores, int(round(args.keep * scores.size)))
            t4 = time.perf_counter()
            store.write_block("ft", u.tensor, u.row_start, u.row_end, mask, ft, u.ft_info.dtype,
                              codec=spec.params.codec, base=base)
            t5 = time.perf_counter()
            for k, a, b in (("read", t0, t1), ("score", t1, t2), ("histogram", t2, t3), ("mask", t3, t4),
                            ("write", t4, t5)):
                tot[k] += b - a
        store.close()
    elements = sum(u.elements for u in units)
    return {"blocks": len(units), "elements": elements, **{k: round(v, 3) for k, v in tot.items()},
            "dtype": units[0].ft_info.dtype if units else None, "scores_dtype": str(np.float64)}


def child_memory(args) -> dict:
    """Peak RSS growth (ru_maxrss) of one unit on the largest block: the scoring pass with its
    spill (--child-memory score), the selection from that spill (select), or the block strategy's
    whole unit (block); in this process."""
    import resource
    from dataclasses import replace

    from ken_dist.job import execute
    from ken_dist.job.plan import plan_finetune
    from ken_dist.store.protocol import Store

    model = args.child_memory != "block"
    job = _job(args, args.model_strategy if model else args.block_strategy, args.child_store)
    spec = job.open_finetunes()[0]
    plan = plan_finetune(job.open_base(), spec, block_bytes=job.block_bytes)
    unit = max((u for u in plan.units if u.action == "prune"), key=lambda u: u.elements)
    store = Store(args.child_store, create=True)
    if args.child_memory != "select":
        store.begin("ft", params=spec.params.as_dict(), base_identity={}, finetune_identity={}, tensors=plan.tensors)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.child_memory == "score":
        record = execute.score_unit(unit, store)
    else:
        record = execute.process_unit(replace(unit, budget=round(args.keep * unit.elements)) if model else unit, store)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"unit": args.child_memory, "elements": unit.elements, "peak_growth": grew,
            "bytes_per_entry": round(grew / unit.elements, 1), "from_spill": record.get("from_spill"),
            "spill_bytes": record.get("spill_bytes")}


def memory(args) -> dict:
    """child_memory for the scoring unit, the selection from its spill and the block strategy's unit."""
    store = tempfile.mkdtemp(dir=args.workdir)
    out = {}
    try:
        for kind in ("score", "select", "block"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", kind, "--child-store",
                   os.path.join(store, "model" if kind != "block" else "block"), "--ckpt", os.path.dirname(args.base),
                   "--workdir", args.workdir, "--keep", str(args.keep), "--values", args.values,
                   "--block-bytes", str(args.block_bytes), "--dtype", args.dtype,
                   *[x for k in DEFAULT_SHAPE for x in (f"--{k.replace('_', '-')}", str(args.shape[k]))]]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"memory child {kind} failed:\n{done.stdout}\n{done.stderr}")
            out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(store, ignore_errors=True)
    return out


def compare_stores(reference: str, store: str) -> dict:
    """Same blocks, budgets and part bytes (sha256) as the reference store, and the same rebuilt tensors."""
    import torch

    from ken_dist.store.protocol import Store
    from ken_dist.subnetwork.view import open_subnetwork

    ref, new = Store(reference).manifest("ft"), Store(store).manifest("ft")
    blocks = same_bytes = same_budget = 0
    for name, t in ref["tensors"].items():
        for a, b in zip(t["blocks"], new["tensors"][name]["blocks"]):
            blocks += 1
            same_bytes += a["sha256"] == b["sha256"] and a["bytes"] == b["bytes"]
            same_budget += a.get("budget") == b.get("budget")
    tensors = same_tensors = 0
    with open_subnetwork(reference, "ft") as r, open_subnetwork(store, "ft") as n:
        for name in ref["tensors"]:
            tensors += 1
            same_tensors += torch.equal(r.get_tensor(name), n.get_tensor(name))
    return {"blocks": blocks, "same_part_bytes": same_bytes, "same_budget": same_budget,
            "tensors": tensors, "same_tensors": same_tensors,
            "same_budget_summary": ref.get("budget") == new.get("budget")}


def child_job(args) -> dict:
    """One run_job on a private local Ray, in this (child) process: wall time, timings, progress notes."""
    import ray

    from ken_dist.runtime import run_job

    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        log = io.StringIO()
        t0 = time.perf_counter()
        result = run_job(_job(args, args.child_strategy, args.child_store), workers=args.workers, overwrite=True,
                         stream=log)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    notes = [line for line in log.getvalue().splitlines() if "candidates" in line]
    return {"wall": round(wall, 3), **result.timings, "notes": notes}


def run_child(args, kind: str, strategy: str, code: str) -> dict:
    """child_job with the ken_dist found at `code` (a checkout), from a fresh process started in
    `code`: Ray's workers put the driver's working directory first on their path."""
    env = dict(os.environ, PYTHONPATH=code)
    cmd = [sys.executable, os.path.abspath(__file__), "--child-strategy", strategy,
           "--child-store", os.path.abspath(os.path.join(args.workdir, f"store-{kind}")),
           "--ckpt", os.path.abspath(os.path.dirname(args.base)), "--workdir", os.path.abspath(args.workdir), "--keep", str(args.keep), "--values", args.values,
           "--block-bytes", str(args.block_bytes), "--workers", str(args.workers), "--dtype", args.dtype,
           *[x for k in DEFAULT_SHAPE for x in (f"--{k.replace('_', '-')}", str(args.shape[k]))]]
    for _ in range(3):  # a private Ray may time out starting on a loaded machine: start it again
        done = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True)
        if "timed out during startup" not in done.stderr:
            break
    if done.returncode:
        raise SystemExit(f"{kind} job failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def jobs(args) -> dict:
    """--rounds rounds of the contenders, the order rotated each round."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    contenders = [("block", args.block_strategy, here), ("model", args.model_strategy, here)]
    if args.baseline_code:
        contenders.append(("model-baseline", args.model_strategy, os.path.abspath(args.baseline_code)))
    out: dict = {kind: [] for kind, _, _ in contenders}
    for r in range(args.rounds):
        k = r % len(contenders)
        for kind, strategy, code in contenders[k:] + contenders[:k]:
            res = run_child(args, kind, strategy, code)
            out[kind].append(res)
            print(f"round {r + 1} {kind} ({strategy}): {res['wall']:.2f} s " +
                  ", ".join(f"{t} {res[t]}" for t in ("startup_seconds", "scoring_seconds", "selection_seconds")
                            if t in res) + "".join(f"\n    {n}" for n in res["notes"]), flush=True)
    walls = {kind: sum(x["wall"] for x in v) for kind, v in out.items()}
    out["ratio"] = {kind: round(w / walls["block"], 3) for kind, w in walls.items() if kind != "block"}
    out["ratio_per_round"] = {kind: [round(m["wall"] / b["wall"], 3) for b, m in zip(out["block"], out[kind])]
                              for kind in out["ratio"]}
    if args.baseline_code:
        out["store_vs_baseline"] = compare_stores(os.path.join(args.workdir, "store-model-baseline"),
                                                  os.path.join(args.workdir, "store-model"))
    return out


def main(argv=None) -> int:
    from ken_dist.cli.commands import byte_size

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/ken-model-budget")
    p.add_argument("--ckpt", default=None, help="an existing pair (base/ and finetune/) instead of WORKDIR/ckpt")
    for k in DEFAULT_SHAPE:
        p.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, default=None)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--values", default="raw", help="value codec of both jobs")
    p.add_argument("--block-bytes", type=byte_size, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="block/model pairs, alternating order")
    p.add_argument("--block-strategy", default="lowrank-delta-block")
    p.add_argument("--model-strategy", default="lowrank-delta-model")
    p.add_argument("--stages", type=int, default=0, help="per-stage timing on the N largest blocks")
    p.add_argument("--no-jobs", action="store_true", help="only the per-stage timing")
    p.add_argument("--baseline-code", default=None,
                   help="a checkout of another ken_dist (e.g. the release before a change): its model job joins "
                        "the rotation, and its store is compared with this one's")
    p.add_argument("--memory", action="store_true", help="peak RSS of a scoring unit, a selection from its "
                   "spill and a block-strategy unit on the largest block")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    p.add_argument("--child-strategy", help=argparse.SUPPRESS)
    p.add_argument("--child-store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    from ken_dist.job.plan import DEFAULT_BLOCK_BYTES
    from ken_dist.testing.synthetic import LlamaShape, write_pair

    args.block_bytes = args.block_bytes or DEFAULT_BLOCK_BYTES
    fields = dict(DEFAULT_SHAPE)
    fields.update({k: getattr(args, k) for k in DEFAULT_SHAPE if getattr(args, k) is not None})
    os.makedirs(args.workdir, exist_ok=True)
    ckpt = args.ckpt or os.path.join(args.workdir, "ckpt")
    marker = os.path.join(ckpt, "shape.json")
    want = {"shape": fields, "dtype": args.dtype}
    if not (os.path.exists(marker) and json.load(open(marker)) == want):
        if args.ckpt:
            print(f"{ckpt} holds another shape than asked ({marker})", file=sys.stderr)
            return 2
        shutil.rmtree(ckpt, ignore_errors=True)
        shape = LlamaShape(**fields)
        t = time.perf_counter()
        write_pair(ckpt, shape, dtype=args.dtype)
        with open(marker, "w") as f:
            json.dump(want, f)
        print(f"generated {shape.parameters():,}-parameter {args.dtype} pair in {time.perf_counter() - t:.1f} s")
    args.base, args.ft = os.path.join(ckpt, "base"), os.path.join(ckpt, "finetune")
    args.shape = fields
    if args.child_strategy:
        print(json.dumps(child_job(args)))
        return 0
    if args.child_memory:
        print(json.dumps(child_memory(args)))
        return 0
    res: dict = {"shape": fields, "dtype": args.dtype, "keep": args.keep, "values": args.values,
                 "workers": args.workers, "block_bytes": args.block_bytes,
                 "strategies": [args.block_strategy, args.model_strategy],
                 "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.stages:
        res["stages"] = stages(args)
        s = res["stages"]
        print(f"stages over the {s['blocks']} largest blocks ({s['elements']:,} entries), seconds: "
              + ", ".join(f"{k} {s[k]}" for k in ("read", "score", "histogram", "mask", "write")), flush=True)
    if args.memory:
        res["memory"] = memory(args)
        for kind, m in res["memory"].items():
            print(f"peak RSS growth, {kind} unit on the largest block ({m['elements']:,} entries): "
                  f"{m['peak_growth'] / 2**20:.0f} MiB ({m['bytes_per_entry']} bytes per entry)", flush=True)
    if not args.no_jobs:
        res["jobs"] = jobs(args)
        j = res["jobs"]
        for kind, ratio in j["ratio"].items():
            print(f"{kind} / block wall ({args.model_strategy} / {args.block_strategy}), {args.workers} workers: "
                  f"{ratio} (per round {j['ratio_per_round'][kind]})")
        if "store_vs_baseline" in j:
            print(f"model store vs the baseline code's: {j['store_vs_baseline']}")
    with open(os.path.join(args.workdir, "model_budget.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
