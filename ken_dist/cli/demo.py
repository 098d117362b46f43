"""`ken-dist demo`: the whole product on an embedded default, end to end, in about a minute.

Generates a small Llama-shaped bf16 base and fine-tune, prunes the fine-tune with KEN on a
private local Ray, prints the store summary, rebuilds a dense checkpoint from the store and
checks one tensor against the kernel run in memory.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ken_dist.testing.synthetic import LlamaShape, write_pair

DEMO_SHAPE = LlamaShape(hidden=256, intermediate=688, layers=4, vocab=2048, heads=8, kv_heads=4)


def run_demo(workdir: str | None = None, *, keep: float = 0.25, workers: int | None = None) -> int:
    from ken_dist.checkpoints.inventory import open_checkpoint
    from ken_dist.checkpoints.reads import read_tensor
    from ken_dist.cli.summary import print_summary
    from ken_dist.job.plan import PruneParams
    from ken_dist.job.spec import FineTuneEntry, JobSpec
    from ken_dist.kernel import ken_select
    from ken_dist.runtime import run_job
    from ken_dist.subnetwork.materialize import materialize
    from ken_dist.subnetwork.view import open_subnetwork

    root = Path(workdir or tempfile.mkdtemp(prefix="ken-dist-demo-"))
    print(f"[demo] writing a {DEMO_SHAPE.parameters() / 1e6:.1f}M-parameter bf16 Llama-shaped pair under {root}")
    base_dir, ft_dir = write_pair(root, DEMO_SHAPE, dtype="bf16", shard_bytes=4 * 2**20)
    store = root / "store"
    job = JobSpec(base=str(base_dir), store=str(store), block_bytes=256 * 1024,
                  finetunes=(FineTuneEntry("demo-sft", str(ft_dir), None, PruneParams(keep=keep)),))
    print(f"[demo] pruning at keep={keep} with KEN on a local Ray")
    t0 = time.time()
    run_job(job, workers=workers, overwrite=True)
    print_summary(str(store), ["demo-sft"], time.time() - t0)

    out = root / "materialized"
    materialize(store, "demo-sft", out, overwrite=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    base_t = read_tensor(open_checkpoint(base_dir).tensors[name])
    ft_t = read_tensor(open_checkpoint(ft_dir).tensors[name])
    # the kernel's torch path: the rule implemented a second way, and no wait for numba to
    # finish compiling on a machine's first run (ken_dist/runtime/warmup.py)
    expected = torch.where(ken_select(ft_t, keep=keep, device="torch"), ft_t, base_t)
    with open_subnetwork(store, "demo-sft") as sub:
        got = sub.get_tensor(name)
    rebuilt = read_tensor(open_checkpoint(out).tensors[name])
    ok = torch.equal(got, expected) and torch.equal(rebuilt, expected)
    print(f"[demo] dense checkpoint rebuilt at {out}; {name} bit-exact vs in-memory KEN: {ok}")
    return 0 if ok else 1
