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
from ken_dist.runtime.warmup import LOAD_GRACE_S, KernelWarmUp, cpu_device_for
from ken_dist.store.protocol import Store


def _import_torch() -> None:
    """Ahead of the first unit, while another process compiles the kernel: the units run on
    its torch path meanwhile (ken_dist/runtime/warmup.py)."""
    import torch  # noqa: F401


class SelectionActor:
    def __init__(self, store_path: str, want_gpu: bool):
        self.store = Store(store_path)
        self.device = "cpu"  # CPU actors import torch only for the kernel's torch path (warmup.py)
        if want_gpu:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.warm = KernelWarmUp(while_waiting=_import_torch) if self.device == "cpu" else None
        self.grace_s = LOAD_GRACE_S  # the first unit may wait this long for the cached kernel

    def info(self) -> dict:
        """Who this worker is, for the job log: pid, node, device, GPUs Ray assigned, peak RSS."""
        return {"pid": os.getpid(), "device": self.device, "node": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "peak_rss": peak_rss()}

    def run(self, unit) -> dict:
        """The unit's block record, plus `worker` (info(), taken after the unit: peak RSS so far)."""
        device = self.device
        if device == "cpu":
            device = cpu_device_for(STRATEGIES[unit.params.strategy], self.warm, self.grace_s)
            self.grace_s = 0.0
        record = process_unit(unit, self.store, device=device)
        record["kernel_path"] = device
        record["worker"] = self.info()
        return record

    def score(self, unit) -> dict:
        """The unit's score histogram (scoring pass of a model-budget strategy, ken_dist/kernel/strategies/budget.py),
        its candidates spilled to the store for the selection pass (ken_dist/store/spill.py)."""
        return score_unit(unit, self.store)


def make_actor(store_path: str, *, gpu: bool):
    cls = ray.remote(SelectionActor)
    return cls.options(num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0, max_task_retries=0).remote(store_path, gpu)
