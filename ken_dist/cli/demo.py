"""`ken-dist demo`: the whole product on an embedded default, end to end, in about a minute.

Generates a small Llama-shaped bf16 base and fine-tune, prunes the fine-tune with KEN on a
private local Ray, prints the store summary, rebuilds a dense checkpoint from the store and
checks one tensor against the kernel run in memory.

The demo owns its private Ray: it starts it while another thread writes the pair, and stops it
while it rebuilds and checks, so a new user waits for neither (the kernel's compilation on a
machine's first run overlaps both: ken_dist/runtime/warmup.py).
"""
from __future__ import annotations

import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ken_dist.testing.shapes import LlamaShape

DEMO_SHAPE = LlamaShape(hidden=256, intermediate=688, layers=4, vocab=2048, heads=8, kv_heads=4)


def run_demo(workdir: str | None = None, *, keep: float = 0.25, workers: int | None = None) -> int:
    import ray

    from ken_dist.cli.summary import print_summary
    from ken_dist.job.plan import PruneParams
    from ken_dist.job.spec import FineTuneEntry, JobSpec
    from ken_dist.runtime import run_job
    from ken_dist.runtime.driver import connect

    root = Path(workdir or tempfile.mkdtemp(prefix="ken-dist-demo-"))
    print(f"[demo] writing a {DEMO_SHAPE.parameters() / 1e6:.1f}M-parameter bf16 Llama-shaped pair under {root}")
    with ThreadPoolExecutor(1) as pool:
        pair = pool.submit(_write_pair, root)
        print(f"[demo] pruning at keep={keep} with KEN on a local Ray")
        t0 = time.time()
        started = connect(None, workers)  # in this thread: Ray's processes end with the thread that started them
        stopping = None
        try:
            base_dir, ft_dir = pair.result()
            store = root / "store"
            job = JobSpec(base=str(base_dir), store=str(store), block_bytes=256 * 1024,
                          finetunes=(FineTuneEntry("demo-sft", str(ft_dir), None, PruneParams(keep=keep)),))
            run_job(job, workers=workers, overwrite=True)
            print_summary(str(store), ["demo-sft"], time.time() - t0)
            if started:
                stopping = threading.Thread(target=ray.shutdown, name="ray-shutdown")
                stopping.start()
            return _rebuild_and_check(root, base_dir, ft_dir, keep)
        finally:
            if stopping is not None:
                stopping.join()
            elif started:
                ray.shutdown()


def _write_pair(root: Path):
    from ken_dist.testing.synthetic import write_pair  # imports torch: in the writer's thread, while Ray starts

    return write_pair(root, DEMO_SHAPE, dtype="bf16", shard_bytes=4 * 2**20)


def _rebuild_and_check(root: Path, base_dir, ft_dir, keep: float) -> int:
    """Rebuild the dense checkpoint from the store; compare one tensor, read from the store and
    from the rebuilt checkpoint, with KEN run here in memory on the kernel's torch path (the
    rule implemented a second way)."""
    import torch

    from ken_dist.checkpoints.inventory import open_checkpoint
    from ken_dist.checkpoints.reads import read_tensor
    from ken_dist.kernel import ken_select
    from ken_dist.subnetwork.materialize import materialize
    from ken_dist.subnetwork.view import open_subnetwork

    out = root / "materialized"
    materialize(root / "store", "demo-sft", out, overwrite=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    base_t = read_tensor(open_checkpoint(base_dir).tensors[name])
    ft_t = read_tensor(open_checkpoint(ft_dir).tensors[name])
    expected = torch.where(ken_select(ft_t, keep=keep, device="torch"), ft_t, base_t)
    with open_subnetwork(root / "store", "demo-sft") as sub:
        got = sub.get_tensor(name)
    rebuilt = read_tensor(open_checkpoint(out).tensors[name])
    ok = torch.equal(got, expected) and torch.equal(rebuilt, expected)
    print(f"[demo] dense checkpoint rebuilt at {out}; {name} bit-exact vs in-memory KEN: {ok}")
    return 0 if ok else 1
