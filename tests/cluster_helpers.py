"""Helpers for the runtime tests: tag processes to find (and kill) exactly the ones a test
started, a slow selection strategy that makes "mid-task" a wide window, and a serial reference
run that needs no Ray.

Tagging: a test puts KEN_TEST_TAG=<uuid> in the environment of what it starts; every process
spawned from there (Ray's gcs/raylet, worker processes, job drivers) inherits it, so
/proc/<pid>/environ tells ours from the other Ray instances sharing the machine."""
from __future__ import annotations

import os
import signal
import time
import uuid

TAG_VAR = "KEN_TEST_TAG"


def new_tag() -> str:
    return uuid.uuid4().hex


def tagged_pids(tag: str, name: str | None = None) -> list[int]:
    """Live processes (not zombies) whose environment holds KEN_TEST_TAG=tag (and whose
    command line contains `name`, if given)."""
    needle = f"{TAG_VAR}={tag}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            if name is not None:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if name.encode() not in f.read():
                        continue
        except OSError:
            continue
        out.append(int(entry))
    return out


def wait_gone(tag: str, timeout: float) -> list[int]:
    """Wait until no tagged process is left; returns those still alive at the timeout."""
    deadline = time.time() + timeout
    while True:
        left = tagged_pids(tag)
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)


def kill_tagged(tag: str) -> None:
    """SIGKILL every process of this tag (only those: never by name)."""
    for pid in tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def journal_keys(store_path, finetune: str) -> list[tuple]:
    from ken_dist.store.protocol import Store

    return [(r["tensor"], r["row_start"], r["row_end"]) for r in Store(store_path).journal(finetune)]


def serial_reference(job) -> None:
    """An uninterrupted run of `job` without Ray: the same plan, units run one by one in this
    process through execute.process_unit, committed and finalized as the driver does."""
    from ken_dist.job.execute import process_unit
    from ken_dist.runtime.driver import plan_job
    from ken_dist.store.protocol import Store

    base, plans = plan_job(job)
    with Store(job.store, create=True) as store:
        for plan in plans:
            name = plan.spec.name
            store.begin(name, params=plan.spec.params.as_dict(), base_identity=base.identity(),
                        finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors)
            store.commit(name, [process_unit(u, store) for u in plan.units])
            store.finalize(name, summary={})


def assert_same_store(a, b, finetune: str) -> None:
    """Every tensor bit-exact (open_subnetwork) and manifests equal minus timestamps/summary."""
    import json

    import torch

    from ken_dist.store.protocol import Store
    from ken_dist.subnetwork.view import open_subnetwork

    with open_subnetwork(a, finetune) as sa, open_subnetwork(b, finetune) as sb:
        assert sorted(sa.keys()) == sorted(sb.keys())
        for name in sa.keys():
            x, y = sa.get_tensor(name), sb.get_tensor(name)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)), name

    def strip(m):
        return json.loads(json.dumps({k: v for k, v in m.items() if k not in ("created", "updated", "summary")}))

    assert strip(Store(a).manifest(finetune)) == strip(Store(b).manifest(finetune))
