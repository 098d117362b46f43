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

Why a watchdog: Ray restarts a crashed actor process (max_restarts) and retries its task
(max_task_retries), which covers a killed worker. It does not cover a lost node: the actor
then waits in RESTARTING for resources that may never come back, and so would its units. So
the driver polls the actor table every `WATCH_S`: an actor that holds units and has not been
ALIVE for `RESTART_GRACE_S` is killed for good (its units fail with RayActorError and are
re-dispatched) and replaced by a fresh actor, which gets work only once it is ALIVE, on any
node, including nodes that joined after the start. The actor table is a Ray developer API
(ray._private.state); if it is unavailable the watchdog is off and Ray's own retries remain.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from ken_dist.errors import KenError
from ken_dist.job.spec import PLACEMENTS
from ken_dist.runtime.actors import make_actor

WATCH_S = 1.0
STARTUP_WATCH_S = 0.1      # while actors of a new pool are starting: give each work as soon as it is up
STARTUP_S = 60.0           # ... for at most this long (an actor waiting for a node does not need 10 Hz)
RESTART_GRACE_S = 20.0     # a crashed worker restarts (imports ken_dist) well within this
NO_WORKER_TIMEOUT_S = 600.0
_WAITING = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "RESTARTING")


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
    state: str = "PENDING_CREATION"
    node: str | None = None
    pid: int | None = None
    waiting_since: float = field(default_factory=time.monotonic)
    inflight: int = 0
    killed: bool = False


class ActorPool:
    """Actors of one job; `ready()` lists those that may take work now."""

    def __init__(self, store_path: str, kinds: list[bool], *, note=lambda msg: None):
        self.store_path = store_path
        self.note = note
        self.slots: list[Slot] = []
        self.replaced = 0
        self._last_watch = 0.0
        self._no_alive_since = self._started = time.monotonic()
        self._table = _actor_table_reader()
        for gpu in kinds:
            self._add(gpu)

    @property
    def n_gpu(self) -> int:
        return sum(s.gpu for s in self.live())

    def live(self) -> list[Slot]:
        return [s for s in self.slots if not s.killed]

    def _add(self, gpu: bool) -> Slot:
        slot = Slot(len(self.slots), gpu, make_actor(self.store_path, gpu=gpu))
        if self._table is None:
            slot.state = "ALIVE"  # no actor table: trust Ray to start it, as before
        self.slots.append(slot)
        return slot

    def ready(self) -> list[Slot]:
        return [s for s in self.live() if s.state == "ALIVE"]

    def poll_interval(self) -> float:
        """Seconds between actor-state polls: short while the pool's actors are coming up."""
        starting = time.monotonic() - self._started < STARTUP_S and len(self.ready()) < len(self.live())
        return STARTUP_WATCH_S if starting else WATCH_S

    def retire(self, slot: Slot, reason: str) -> None:
        """Kill an actor for good (its pending units fail and are re-dispatched); replace it."""
        if slot.killed:
            return
        slot.killed = True
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        self.replaced += 1
        self.note(f"actor {slot.index} ({'GPU' if slot.gpu else 'CPU'}, pid {slot.pid}) {reason}; "
                  "its blocks go to the other actors and a new actor is started")
        self._add(slot.gpu)

    def watch(self) -> None:
        """Poll actor states (at most every WATCH_S); retire actors stuck away from ALIVE."""
        now = time.monotonic()
        if self._table is None or now - self._last_watch < self.poll_interval():
            return
        self._last_watch = now
        try:
            table = self._table()
        except Exception:
            return  # GCS busy: try again next round
        for slot in self.live():
            info = table.get(slot.actor._actor_id.hex())
            if info is None:
                continue
            state = info.get("State", "ALIVE")
            if state != slot.state:
                slot.waiting_since = now
                slot.state = state
            if state == "ALIVE":
                slot.node = info.get("Address", {}).get("NodeID") or slot.node
                slot.pid = info.get("Pid") or slot.pid
            elif state in _WAITING and slot.inflight and now - slot.waiting_since > RESTART_GRACE_S:
                self.retire(slot, f"has been {state} for {now - slot.waiting_since:.0f} s "
                                  "(its node was probably lost)")
        if self.ready():
            self._no_alive_since = now
        elif now - self._no_alive_since > NO_WORKER_TIMEOUT_S:
            raise KenError(f"no selection actor has been alive for {NO_WORKER_TIMEOUT_S:.0f} s: the Ray "
                           "cluster has no node that can host one (check `ray status`); rerun the same "
                           "command when it has, it resumes")

    def describe(self, timeout: float = 30.0) -> list[dict]:
        """info() of every ALIVE actor (pid, node, device, GPU ids, peak RSS so far), for the log."""
        slots = self.ready()
        refs = [s.actor.info.remote() for s in slots]
        out = []
        for slot, ref in zip(slots, refs):
            try:
                info = ray.get(ref, timeout=timeout)
            except Exception:
                continue
            out.append(dict(info, gpu_requested=slot.gpu))
        return out

    def shutdown(self) -> None:
        for slot in self.slots:
            try:
                ray.kill(slot.actor)
            except Exception:
                pass


def _actor_table_reader():
    """A function returning {actor id hex: info} for this job's actors, or None if Ray lacks it."""
    try:
        from ray._private import state

        job_id = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        state.state.actor_table(None, job_id=job_id)  # probe once
    except Exception:
        return None
    return lambda: state.state.actor_table(None, job_id=job_id)
