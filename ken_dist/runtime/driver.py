"""The Ray driver: validate everything, skip what the store already holds, dispatch the rest to
an actor pool, commit each finished block to the store's journal, finalize.

The driver only moves descriptors and small records; actors read and write the data. A driver
killed at any moment loses at most the blocks in flight: the same command resumes.
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque

import ray

from ken_dist.errors import KenError
from ken_dist.jobspec import JobSpec
from ken_dist.plan import FineTunePlan, WorkUnit, plan_finetune
from ken_dist.progress import Progress
from ken_dist.runtime.actors import make_actor
from ken_dist.store import Store

IN_FLIGHT_PER_ACTOR = 2
UNIT_ATTEMPTS = 4  # an actor that dies past Ray's own retries: the unit goes to another actor


def plan_job(job: JobSpec) -> tuple[object, list[FineTunePlan]]:
    """Open and validate every checkpoint and cut the work, before anything is written."""
    base = job.open_base()
    plans = [plan_finetune(base, spec, block_bytes=job.block_bytes, include=job.include,
                           exclude=job.exclude, preset=job.preset, prefix_map=job.prefix_map,
                           ignore_missing=job.ignore_missing)
             for spec in job.open_finetunes()]
    return base, plans


def _connect(address: str | None, workers: int | None) -> bool:
    """Join `address` or start a private local Ray; True when we started it (and must stop it)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")  # set inside a Ray Job
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        return False
    ray.init(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    return True


def _actor_count(workers: int | None) -> tuple[int, bool]:
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        return (min(workers, gpus) if workers else gpus), True
    return (workers or max(1, int(resources.get("CPU", 1)))), False


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


def _dispatch(store: Store, units: list[WorkUnit], workers: int | None, progress: Progress) -> None:
    n_actors, gpu = _actor_count(workers)
    n_actors = max(1, min(n_actors, len(units)))
    actors = [make_actor(str(store.path), gpu=gpu) for _ in range(n_actors)]
    progress.note(f"{n_actors} {'GPU' if gpu else 'CPU'} actor(s), {len(units)} block(s) to run")
    todo = deque(units)
    attempts: dict[tuple, int] = {}
    pending: dict = {}
    load = {i: 0 for i in range(n_actors)}
    try:
        while todo or pending:
            for i in range(n_actors):
                while todo and load[i] < IN_FLIGHT_PER_ACTOR:
                    unit = todo.popleft()
                    pending[actors[i].run.remote(unit)] = (i, unit)
                    load[i] += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i, unit = pending.pop(ref)
                load[i] -= 1
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = _cause(exc)
                    if isinstance(cause, KenError):
                        raise KenError(str(cause).splitlines()[0] if "\n" in str(cause) else str(cause)) from None
                    raise KenError(f"block {unit.tensor!r} rows {unit.row_start}:{unit.row_end} of "
                                   f"fine-tune {unit.finetune!r} failed: {type(cause).__name__}: {cause}") from None
                except ray.exceptions.RayActorError as exc:
                    key = (unit.finetune, *unit.key)
                    attempts[key] = attempts.get(key, 1) + 1
                    if attempts[key] > UNIT_ATTEMPTS:
                        raise KenError(f"block {unit.tensor!r} rows {unit.row_start}:{unit.row_end} of "
                                       f"fine-tune {unit.finetune!r}: worker died {UNIT_ATTEMPTS} times "
                                       f"({exc.__class__.__name__}); check node memory and logs") from None
                    progress.note(f"worker lost on {unit.tensor} rows {unit.row_start}:{unit.row_end}; retrying")
                    actors[i] = make_actor(str(store.path), gpu=gpu)
                    todo.appendleft(unit)
                    continue
                store.commit(unit.finetune, [record])
                progress.advance(unit.finetune, unit.elements)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        for actor in actors:
            ray.kill(actor)


def run_job(job: JobSpec, *, address: str | None = None, workers: int | None = None,
            overwrite: bool = False, quiet: bool = False, stream=sys.stderr) -> dict:
    """Prune every fine-tune of `job` into its store; returns the summary of each fine-tune."""
    t0 = time.time()
    base, plans = plan_job(job)
    store = Store(job.store, create=True)
    todo: list[WorkUnit] = []
    reused = {}
    with store.locked([p.spec.name for p in plans]):
        for plan in plans:
            name = plan.spec.name
            store.begin(name, params=plan.spec.params.as_dict(), base_identity=base.identity(),
                        finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors,
                        overwrite=overwrite)
            done = store.completed_blocks(name)
            reused[name] = [u for u in plan.units if u.key in done]
            todo.extend(u for u in plan.units if u.key not in done)
        progress = Progress({p.spec.name: sum(u.elements for u in p.units) for p in plans},
                            {n: sum(u.elements for u in us) for n, us in reused.items()},
                            quiet=quiet, stream=stream)
        if any(reused.values()):
            progress.note("resuming: " + ", ".join(f"{n}: {len(us)} block(s) already in the store"
                                                   for n, us in reused.items()))
        if todo:
            started = _connect(address, workers)
            try:
                _dispatch(store, todo, workers, progress)
            finally:
                if started:
                    ray.shutdown()
        progress.close()
        summaries = {}
        for plan in plans:
            name = plan.spec.name
            summaries[name] = store.finalize(name, summary={
                "blocks_run": sum(1 for u in todo if u.finetune == name),
                "blocks_reused": len(reused[name]),
                "seconds": round(time.time() - t0, 3),
            })
    return summaries
