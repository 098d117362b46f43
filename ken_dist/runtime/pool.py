"""The selection actor pool: how many actors of which kind, and keeping it working through
worker crashes, node loss and new nodes.

Placement policy (`placement`, decided once from the cluster's resources at job start):
- "mixed" (default): one GPU actor per GPU (1 GPU + 1 CPU each; it runs the torch/CUDA path,
  or the CPU path where torch sees no CUDA) plus one CPU actor per CPU left over. On a mixed
  cluster (GPU nodes + CPU-only nodes) every device works; units are pulled by whichever
  actor is free, so faster GPU actors simply take more of them.
- "gpu": GPU actors only (an error when the cluster has no GPU); CPUs are left to the GPUs'
  host-side work (reading rows, encoding parts).
- "cpu": CPU actors only, GPUs ignored.
`workers` caps the pool (GPU actors first).

Faults are seen through Ray's public signals only, no actor table. Every actor answers a
start-up call (`info`) once it is up; it gets work only then, so an actor still waiting for a
node (autoscaling, or a replacement on a full cluster) holds no units. Ray does not restart an
actor nor retry its tasks (actors.py): when its process or its node dies, the units it holds
fail with RayActorError (ActorDiedError), the driver re-dispatches them and `retire` starts a
fresh actor, which gets work once its start-up call answers, on any node, including nodes that
joined after the start. (A restartable actor would instead wait in RESTARTING for the lost
node's resources, which on a full cluster never come back, and its units with it.)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray

from ken_dist.errors import ClusterError, KenError
from ken_dist.job.spec import PLACEMENTS
from ken_dist.runtime.actors import make_actor

log = logging.getLogger(__name__)

WATCH_S = 1.0              # the dispatch loop wakes at least this often (results and start-ups wake it sooner)
NO_WORKER_TIMEOUT_S = 600.0
STARTUP_DEATHS_PER_SLOT = 3  # actors dying before they ever start, per pool slot, before the job gives up


def plan_slots(resources: dict, workers: int | None, placement: str, units: int) -> list[bool]:
    """Kinds of the actors to start (True = GPU actor) for the cluster's total resources."""
    if placement not in PLACEMENTS:
        raise KenError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if placement == "gpu" and gpus == 0:
        raise KenError("placement 'gpu' but the Ray cluster has no GPU; add GPU nodes or use "
                       "--placement mixed (or cpu)")
    n_gpu = 0 if placement == "cpu" else gpus
    n_cpu = 0 if placement == "gpu" else max(0, cpus - n_gpu)
    if workers:
        n_gpu = min(n_gpu, workers)
        n_cpu = workers - n_gpu if placement != "gpu" else 0
    if n_gpu + n_cpu == 0:
        n_cpu = 1  # a cluster with no CPU free yet (autoscaling): one actor waits for a node
    kinds = [True] * n_gpu + [False] * n_cpu
    return kinds[: max(1, units)]


@dataclass
class Slot:
    """One actor of the pool and what the driver knows about it."""
    index: int
    gpu: bool
    actor: object
    started: object = None  # the ObjectRef of its start-up call until that answers, then None
    node: str | None = None
    pid: int | None = None
    inflight: int = 0
    killed: bool = False

    @property
    def ready(self) -> bool:
        return self.started is None and not self.killed

    def label(self) -> str:
        return f"actor {self.index} ({'GPU' if self.gpu else 'CPU'}, pid {self.pid})"


class ActorPool:
    """Actors of one job; `ready()` lists those that may take work now. The dispatch loop waits on
    `startups()` beside its units and hands each answered start-up ref to `started()`."""

    def __init__(self, store_path: str, kinds: list[bool], *, note=lambda msg: None):
        self.store_path = store_path
        self.note = note
        self.slots: list[Slot] = []
        self.replaced = 0
        self._starting: dict = {}  # start-up ObjectRef -> Slot
        self._deaths_before_start = 0
        self._no_ready_since = time.monotonic()
        for gpu in kinds:
            self._add(gpu)
        self._max_deaths_before_start = STARTUP_DEATHS_PER_SLOT * max(1, len(kinds))

    @property
    def n_gpu(self) -> int:
        return sum(s.gpu for s in self.live())

    def live(self) -> list[Slot]:
        return [s for s in self.slots if not s.killed]

    def ready(self) -> list[Slot]:
        return [s for s in self.slots if s.ready]

    def startups(self) -> list:
        """Start-up refs of the actors not yet up (for ray.wait beside the units in flight)."""
        return list(self._starting)

    def _add(self, gpu: bool) -> Slot:
        slot = Slot(len(self.slots), gpu, make_actor(self.store_path, gpu=gpu))
        slot.started = slot.actor.info.remote()
        self._starting[slot.started] = slot
        self.slots.append(slot)
        return slot

    def started(self, ref) -> None:
        """An actor's start-up call answered: it takes work from now on, or it died first."""
        slot = self._starting.pop(ref, None)
        if slot is None:  # retired while starting
            return
        try:
            info = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if exc.actor_init_failed:
                raise ClusterError(f"a selection actor could not open the store {self.store_path} on its "
                                   f"node: {str(exc).splitlines()[-1]}; the store must be on storage every "
                                   "node mounts at the same path") from None
            self._deaths_before_start += 1
            if self._deaths_before_start > self._max_deaths_before_start:
                raise ClusterError(f"{self._deaths_before_start} selection actors died before they started "
                                   f"(last: {type(exc).__name__}); check node memory and the Ray logs "
                                   "(/tmp/ray/session_latest/logs)") from None
            self.retire(slot, f"died before it started ({type(exc).__name__})")
            return
        slot.started = None
        if not slot.killed:
            slot.pid, slot.node = info["pid"], info["node"]

    def retire(self, slot: Slot, reason: str) -> None:
        """Kill an actor for good (its pending units fail and are re-dispatched); replace it."""
        if slot.killed:
            return
        slot.killed = True
        if slot.started is not None:
            self._starting.pop(slot.started, None)
        ray.kill(slot.actor, no_restart=True)  # a dead actor is killed again without complaint
        self.replaced += 1
        self.note(f"{slot.label()} {reason}; its blocks go to the other actors and a new actor is started")
        self._add(slot.gpu)

    def check(self) -> None:
        """Give up when no actor has been up for NO_WORKER_TIMEOUT_S (no node can host one)."""
        now = time.monotonic()
        if self.ready():
            self._no_ready_since = now
        elif now - self._no_ready_since > NO_WORKER_TIMEOUT_S:
            raise ClusterError(f"no selection actor has been alive for {NO_WORKER_TIMEOUT_S:.0f} s: the Ray "
                               "cluster has no node that can host one (check `ray status`); rerun the same "
                               "command when it has, it resumes")

    def describe(self, timeout: float = 30.0) -> list[dict]:
        """info() of every ready actor (pid, node, device, GPU ids, peak RSS so far), for the log."""
        slots = self.ready()
        refs = [s.actor.info.remote() for s in slots]
        out = []
        for slot, ref in zip(slots, refs):
            try:
                info = ray.get(ref, timeout=timeout)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                log.warning("%s did not report its peak memory (%s); the job log's workers entry for it "
                            "keeps what its last block reported", slot.label(), type(exc).__name__)
                continue
            out.append(dict(info, gpu_requested=slot.gpu))
        return out

    def shutdown(self) -> None:
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
