"""Selection actors: each opens the files itself and handles whole work units, so tensor bytes
never pass through the driver or the object store. Ray neither restarts an actor nor retries its
tasks: the pool (pool.py) replaces a dead actor and the driver re-dispatches its units, one
mechanism for a killed worker and a lost node alike. A unit's write is atomic and idempotent, so
a unit run twice cannot corrupt the store."""
from __future__ import annotations

import os

import ray

from ken_dist.job.execute import process_unit, score_unit
from ken_dist.job.log import peak_rss
from ken_dist.kernel import STRATEGIES
from ken_dist.runtime.warmup import load_kernel
from ken_dist.store.protocol import Store


class SelectionActor:
    def __init__(self, store_path: str, want_gpu: bool):
        self.store = Store(store_path)
        self.device = "cpu"  # CPU actors never import torch
        if want_gpu:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.kernel_loaded = False  # the compiled CPU kernel, loaded by the first unit that needs it

    def info(self) -> dict:
        """Who this worker is, for the job log: pid, node, device, GPUs Ray assigned, peak RSS."""
        return {"pid": os.getpid(), "device": self.device, "node": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "peak_rss": peak_rss()}

    def run(self, unit) -> dict:
        """The unit's block record, plus `worker` (info(), taken after the unit: peak RSS so far)."""
        if self.device == "cpu" and not self.kernel_loaded and STRATEGIES[unit.params.strategy].compiled_kernel:
            load_kernel()  # waits while another process on this machine compiles it (warmup.py)
            self.kernel_loaded = True
        record = process_unit(unit, self.store, device=self.device)
        record["worker"] = self.info()
        return record

    def score(self, unit) -> dict:
        """The unit's score histogram (scoring pass of a model-budget strategy, ken_dist/kernel/strategies/budget.py),
        its candidates spilled to the store for the selection pass (ken_dist/store/spill.py)."""
        return score_unit(unit, self.store)


def make_actor(store_path: str, *, gpu: bool):
    cls = ray.remote(SelectionActor)
    return cls.options(num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0, max_task_retries=0).remote(store_path, gpu)
