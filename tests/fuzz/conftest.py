"""Fixtures of the fuzz suite, built once per session and copied per case (a few hundred KB).

- `toy`: a base/fine-tune pair of random bit patterns (NaN payloads, -0.0: the store must move
  bytes, not numbers) in bf16/f16/f32/int64, pruned into a store with two fine-tunes by the
  store's own writer (tests/store_helpers.py); its expected tensors are computed independently
  (base with the kept fine-tuned entries put back by torch indexing).
- `real`: a tiny synthetic Llama pair (finite bf16, also sharded with an index json) pruned by
  the real work units (ken_dist.job.execute.process_unit) in this process, with a copy left
  committed but not finalized (a driver killed just before its last step) for journal fuzzing.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # harness, mutations
sys.path.insert(0, str(Path(__file__).parent.parent))  # store_helpers, tiny_models

from store_helpers import expected, make_checkpoints, prune_into  # noqa: E402

from ken_dist.job.plan import PruneParams  # noqa: E402
from ken_dist.job.spec import FineTuneEntry, JobSpec  # noqa: E402
from ken_dist.testing.synthetic import LlamaShape, write_pair  # noqa: E402

TOY_TENSORS = {"a.weight": ((6, 10), torch.bfloat16), "b.weight": ((6, 10), torch.bfloat16),
               "c.weight": ((3, 2, 5), torch.float32), "n.weight": ((10,), torch.float16),
               "ids": ((4,), torch.int64)}
REAL_SHAPE = LlamaShape(hidden=16, intermediate=24, layers=1, vocab=32, heads=2, kv_heads=1)
REAL_KEEP, REAL_BLOCK_BYTES = 0.25, 256


def real_job(base: str, ft: str, store: str, **kw) -> JobSpec:
    params = PruneParams(strategy=kw.pop("strategy", "ken"), keep=REAL_KEEP)
    return JobSpec(base=base, finetunes=(FineTuneEntry("sft", ft, None, params),), store=store,
                   block_bytes=REAL_BLOCK_BYTES, **kw)


def real_argv(base: str, ft: str, store: str) -> list[str]:
    """The CLI twin of real_job."""
    return ["prune", base, ft, "--store", store, "--name", "sft", "--keep", str(REAL_KEEP),
            "--block-bytes", str(REAL_BLOCK_BYTES), "--quiet"]


def serial_units(store, todo, to_score, progress, **_):
    """Stand-in for runtime.driver._run_units: the same work units (execute.process_unit, what a
    Ray actor runs) one by one in this process, each committed as the driver commits it; no Ray,
    so a fuzz case costs milliseconds. Model-budget scoring needs the real pool."""
    from ken_dist.job.execute import process_unit

    assert not to_score, "the fuzz jobs use per-row strategies"
    for unit in todo:
        store.commit(unit.finetune, [process_unit(unit, store)])


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory):
    from ken_dist.job.execute import process_unit
    from ken_dist.runtime.driver import plan_job
    from ken_dist.store.protocol import Store
    from ken_dist.subnetwork.view import open_subnetwork

    root = tmp_path_factory.mktemp("fuzz-fixtures")
    # toy: two fine-tunes of one base, written by the store's own writer
    base, ft, bdir, fdir = make_checkpoints(str(root / "toy"), TOY_TENSORS)
    store = str(root / "toy" / "store")
    masks = prune_into(store, "ft", ft, bdir, fdir, keep=0.4)
    prune_into(store, "ft2", ft, bdir, fdir, keep=0.6, params={"k": None, "keep": 0.6, "strategy": "ken",
                                                             "compat": "index"})
    toy_expected = {name: expected(base, ft, masks, name) for name in ft}
    # real: a synthetic Llama pair (also sharded), pruned by the real work units
    rbase, rft = write_pair(root / "real", REAL_SHAPE, dtype="bf16")
    sbase, sft = write_pair(root / "sharded", REAL_SHAPE, dtype="bf16", shard_bytes=2048)
    pending = str(root / "real" / "pending")
    job = real_job(str(rbase), str(rft), pending)
    checkpoint, plans = plan_job(job)
    with Store(pending, create=True) as s:
        for plan in plans:
            s.begin(plan.spec.name, params=plan.spec.params.as_dict(), base_identity=checkpoint.identity(),
                    finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors)
            s.commit(plan.spec.name, [process_unit(u, s) for u in plan.units])
    done = str(root / "real" / "store")
    shutil.copytree(pending, done)
    with Store(done) as s:
        s.finalize("sft", summary={})
    with open_subnetwork(done, "sft") as sub:
        real_expected = {n: sub.get_tensor(n) for n in sub.keys()}
    os.environ.setdefault("KEN_FUZZ_TMP", str(root / "cases"))
    return {"toy_base": bdir, "toy_ft": fdir, "toy_store": store, "toy_expected": toy_expected,
            "toy_masks": masks, "real_base": str(rbase), "real_ft": str(rft), "real_store": done,
            "real_pending": pending, "real_expected": real_expected, "sharded_base": str(sbase),
            "sharded_ft": str(sft), "root": str(root), "cases": str(root / "cases")}
