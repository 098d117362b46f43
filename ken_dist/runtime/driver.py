"""The Ray driver: validate everything, skip what the store already holds, dispatch the rest to
an actor pool, commit each finished block to the store's journal, finalize.

The driver only moves descriptors and small records; actors read and write the data. A driver
killed at any moment (kill -9 included) loses at most the blocks in flight: the same command
resumes, reusing every committed block, and a finished job re-run is a no-op that does not even
start Ray. The private local Ray a driver starts shares its fate: Ray starts its processes with
PR_SET_PDEATHSIG on Linux, so they exit when the driver dies (elsewhere Ray's reaper process
does it). Faults inside the job (a worker killed, a node lost) are handled in pool.py.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import deque
from dataclasses import replace

import ray

from ken_dist.errors import ClusterError, KenError
from ken_dist.job.log import JobLog, peak_rss
from ken_dist.job.plan import FineTunePlan, WorkUnit, plan_finetune
from ken_dist.job.progress import Progress
from ken_dist.job.spec import JobSpec
from ken_dist.kernel import STRATEGIES
from ken_dist.kernel.strategies.budget import allocate, total_budget
from ken_dist.runtime.pool import WATCH_S, ActorPool, Slot, plan_slots
from ken_dist.runtime.warmup import NOTE as COMPILE_NOTE
from ken_dist.runtime.warmup import compile_if_needed
from ken_dist.store.protocol import Store

IN_FLIGHT_PER_ACTOR = 2
UNIT_ATTEMPTS = 4  # a unit whose actor died this many times under it fails the job
_BLOCK_SECONDS = ("seconds", "cpu_seconds", "read_seconds", "select_seconds")  # process_unit's timings


class JobResult(dict):
    """{fine-tune name: final manifest}, plus what this run did: blocks_run, blocks_reused and
    already_complete per fine-tune, the job log's job_id, and timings (see _timings)."""

    def __init__(self, manifests: dict, *, blocks_run: dict, blocks_reused: dict,
                 already_complete: set, job_id: str, timings: dict | None = None):
        super().__init__(manifests)
        self.timings = timings or {}
        self.blocks_run = blocks_run
        self.blocks_reused = blocks_reused
        self.already_complete = already_complete
        self.job_id = job_id


def plan_job(job: JobSpec) -> tuple[object, list[FineTunePlan]]:
    """Open and validate every checkpoint and cut the work, before anything is written. The
    base is opened and its headers validated once for all fine-tunes."""
    base = job.open_base()
    plans = [plan_finetune(base, spec, block_bytes=job.block_bytes, include=job.include,
                           exclude=job.exclude, preset=job.preset, prefix_map=job.prefix_map,
                           ignore_missing=job.ignore_missing)
             for spec in job.open_finetunes()]
    return base, plans


def connect(address: str | None, workers: int | None) -> bool:
    """Join `address` or start a private local Ray; True when we started it (and must stop it).

    The address a private Ray advertises is chosen by Ray when it is imported, from
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (0: loopback); ray.init has no argument for it (its
    `_node_ip_address` maps 127.0.0.1 back to the outward address). So keeping it on loopback is
    the caller's setting (`export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`), not this library's."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")  # set inside a Ray Job
    if address:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError, ray.exceptions.RayError) as exc:
            raise ClusterError(f"cannot join the Ray cluster at {address!r} ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); check the address (`ray status` "
                               "on the head), or omit --address to run on a private local Ray") from None
        return False
    ray.init(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    return True


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


def _where(unit: WorkUnit) -> str:
    return f"block {unit.tensor!r} rows {unit.row_start}:{unit.row_end} of fine-tune {unit.finetune!r}"


def _task_error(unit: WorkUnit, exc: BaseException, store: Store) -> KenError:
    """A unit's own failure (bad input, full disk): the job stops with a message naming it."""
    cause = _cause(exc)
    if isinstance(cause, KenError):
        return KenError(str(cause).splitlines()[0] if "\n" in str(cause) else str(cause))
    if isinstance(cause, OSError):
        where = f" ({cause.filename})" if cause.filename else ""
        return KenError(f"{_where(unit)}: cannot write its part file in the store {store.root}: "
                        f"{cause.strerror or cause}{where}; free space or fix permissions on the store's "
                        "file system, then rerun the same command (it resumes)")
    return KenError(f"{_where(unit)} failed: {type(cause).__name__}: {cause}")


class _Dispatch:
    """One run of the dispatch loop; keeps the counters the job log reports."""

    def __init__(self, store: Store, units: list[WorkUnit], progress: Progress, pool: ActorPool,
                 method: str = "run"):
        self.store, self.progress, self.pool = store, progress, pool
        self.method = method  # "run": select and commit blocks; "score": collect score histograms
        self.scores: dict = {}  # scoring pass: {(finetune, tensor, row_start, row_end): (bins, counts)}
        self.spills: dict = {}  # scoring pass: {finetune: {blocks, entries, bytes spilled; errors, the first one}}
        self.from_spill: dict = {}  # selection pass: {finetune: [blocks built from a spill, blocks read again]}
        self.todo = deque(units)
        self.pending: dict = {}  # ObjectRef -> (slot, unit)
        self.committed: set = set()
        self.attempts: dict = {}
        self.retries: list[dict] = []
        self.workers: dict = {}
        self.blocks_run: dict = {}
        self.first_submit: float | None = None  # when the first actor got work: start-up ends here
        self.last_result: float | None = None

    def run(self) -> None:
        """Until every unit is committed: give work to the ready actors, then wait for a result or
        an actor's start-up (whichever comes first; at most WATCH_S)."""
        while self.todo or self.pending:
            self._submit()
            waiting = list(self.pending) + self.pool.startups()  # never empty: retire() starts a replacement
            ready, _ = ray.wait(waiting, num_returns=1, timeout=WATCH_S)
            for ref in ready:
                if ref in self.pending:
                    self._collect(ref)
                else:
                    self.pool.started(ref)
            self.pool.check()

    def _submit(self) -> None:
        for slot in self.pool.ready():
            while self.todo and slot.inflight < IN_FLIGHT_PER_ACTOR:
                unit = self.todo.popleft()
                self.pending[getattr(slot.actor, self.method).remote(unit)] = (slot, unit)
                slot.inflight += 1
                if self.first_submit is None:
                    self.first_submit = time.time()

    def _collect(self, ref) -> None:
        slot, unit = self.pending.pop(ref)
        slot.inflight -= 1
        self.last_result = time.time()
        try:
            record = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise _task_error(unit, exc, self.store) from None
        except ray.exceptions.RayError as exc:  # worker or node died, OOM kill, lost object
            self._lost(slot, unit, exc)
            return
        key = (unit.finetune, *unit.key)
        if key in self.committed:
            return  # a duplicate result of a re-dispatched unit: committed once only
        if self.method == "score":
            self.scores[key] = (record["bins"], record["counts"])
            self._count_spill(unit.finetune, record)
            self.committed.add(key)
            self.progress.advance(unit.finetune, unit.elements)
            return
        worker = record.pop("worker", None) or {}
        if "from_spill" in record:
            self.from_spill.setdefault(unit.finetune, [0, 0])[0 if record["from_spill"] else 1] += 1
        self.store.commit(unit.finetune, [record])
        self.committed.add(key)
        self.blocks_run[unit.finetune] = self.blocks_run.get(unit.finetune, 0) + 1
        if worker.get("pid") is not None:
            self.add_workers([dict(worker, gpu_requested=slot.gpu)], blocks=1, record=record)
            slot.pid, slot.node = worker["pid"], worker.get("node")
        self.progress.advance(unit.finetune, unit.elements)

    def _count_spill(self, finetune: str, record: dict) -> None:
        c = self.spills.setdefault(finetune, {"blocks": 0, "entries": 0, "bytes": 0, "errors": 0, "error": None})
        if record.get("spill_error"):
            c["errors"] += 1
            c["error"] = c["error"] or record["spill_error"]
        elif record.get("spilled"):
            c["blocks"] += 1
            c["entries"] += record["spilled"]
            c["bytes"] += record["spill_bytes"]

    def add_workers(self, infos: list[dict], blocks: int = 0, record: dict | None = None) -> None:
        """Fold actors' info() into {pid: {node, device, gpu_ids, gpu_requested, blocks, peak_rss}},
        and a committed block's record into that worker's rows and seconds (wall, cpu, read, select):
        where an actor's time went, kept in the job log once finalize has dropped the journal."""
        for info in infos:
            w = self.workers.setdefault(str(info["pid"]), {"blocks": 0, "peak_rss": 0, "rows": 0,
                                                           **dict.fromkeys(_BLOCK_SECONDS, 0.0)})
            w.update({k: info.get(k) for k in ("node", "device", "gpu_ids", "gpu_requested")},
                     blocks=w["blocks"] + blocks, peak_rss=max(w["peak_rss"], info.get("peak_rss") or 0))
            if record is not None:
                w["rows"] += record["row_end"] - record["row_start"]
                for k in _BLOCK_SECONDS:
                    w[k] = round(w[k] + (record.get(k) or 0.0), 6)

    def _lost(self, slot: Slot, unit: WorkUnit, exc: BaseException) -> None:
        self.todo.appendleft(unit)
        if slot.killed:  # we retired it (stuck on a lost node): not the unit's fault
            return
        key = (unit.finetune, *unit.key)
        self.attempts[key] = self.attempts.get(key, 1) + 1
        self.retries.append({"tensor": unit.tensor, "rows": [unit.row_start, unit.row_end],
                             "finetune": unit.finetune, "error": type(exc).__name__})
        if self.attempts[key] > UNIT_ATTEMPTS:
            raise ClusterError(f"{_where(unit)}: its worker died {UNIT_ATTEMPTS} times ({type(exc).__name__}); "
                               "check node memory and the Ray logs (/tmp/ray/session_latest/logs)") from None
        self.pool.retire(slot, f"died running {unit.tensor} rows {unit.row_start}:{unit.row_end} "
                               f"({type(exc).__name__})")

    def cancel(self) -> None:
        """Drop the units still queued on the actors (a running one finishes; the pool is killed next)."""
        for ref in self.pending:
            ray.cancel(ref)  # force=True is refused for actor tasks


def _begin_all(store: Store, base, plans: list[FineTunePlan], overwrite: bool):
    """(units to run, {name: units reused}, names already complete, plans needing a scoring pass).

    A model-budget fine-tune (strategy scope "model") with budgets recorded for its block plan
    runs the blocks not committed under the same budget; without budgets it is scored first
    (see _score_and_budget) and every block runs."""
    todo: list[WorkUnit] = []
    reused: dict[str, list] = {}
    complete: set[str] = set()
    to_score: list[FineTunePlan] = []
    base_identity = base.identity()  # headers + a sample of the bytes: read once for all fine-tunes
    for plan in plans:
        name = plan.spec.name
        state = store.begin(name, params=plan.spec.params.as_dict(), base_identity=base_identity,
                            finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors,
                            overwrite=overwrite)
        if state == "complete":
            complete.add(name)
            reused[name] = list(plan.units)
            continue
        done = store.completed_blocks(name)
        units = plan.units
        if STRATEGIES[plan.spec.params.strategy].scope == "model":
            budgets = store.budgets(name)
            if budgets is None:
                to_score.append(plan)
                reused[name] = []
                continue
            units = [replace(u, budget=budgets.get(u.key)) for u in units]
        reusable = [u.key in done and done[u.key].get("budget") == u.budget for u in units]
        reused[name] = [u for u, ok in zip(units, reusable) if ok]
        todo.extend(u for u, ok in zip(units, reusable) if not ok)
    return todo, reused, complete, to_score


def _score_and_budget(store: Store, plans: list[FineTunePlan], pool: ActorPool, progress: Progress,
                      out: list) -> list:
    """Scoring pass of the model-budget fine-tunes on the pool (its _Dispatch appended to `out`),
    then each block's budget recorded in the store (ken_dist/kernel/strategies/budget.py); returns their units,
    budgets attached."""
    units = [u for p in plans for u in p.units if u.action == "prune"]
    progress.note(f"scoring pass ({', '.join(p.spec.name for p in plans)}: one keep budget per fine-tune): "
                  f"{len(units)} block(s)")
    t0 = time.time()
    scoring = _Dispatch(store, units, Progress({p.spec.name: sum(u.elements for u in p.units if u.action == "prune")
                                                for p in plans}, {p.spec.name: 0 for p in plans},
                                               quiet=progress.quiet, stream=progress.stream), pool, method="score")
    out.append(scoring)
    try:
        scoring.run()
    finally:
        scoring.cancel()
    budgeted = []
    for plan in plans:
        name, params = plan.spec.name, plan.spec.params
        prune = [u for u in plan.units if u.action == "prune"]
        total = total_budget([(u.rows, u.ft_info.row_geometry[1]) for u in prune], params.keep, params.k)
        budgets, summary = allocate({u.key: scoring.scores[(name, *u.key)] for u in prune}, total)
        store.set_budgets(name, budgets, summary)
        spilled = scoring.spills.get(name, {})
        progress.note(f"{name}: keeping {summary['total']:,} of {summary['elements']:,} entries across "
                      f"{len(prune)} block(s) (scored in {time.time() - t0:.1f} s); candidates of "
                      f"{spilled.get('blocks', 0)} block(s) kept for selection ({spilled.get('entries', 0):,} entries, "
                      f"{spilled.get('bytes', 0) / 2**20:.0f} MiB in the store's spill/)")
        if spilled.get("errors"):
            progress.note(f"{name}: could not keep the candidates of {spilled['errors']} block(s) "
                          f"({spilled['error']}); they are read and scored again")
        budgeted.extend(replace(u, budget=budgets.get(u.key)) for u in plan.units)
    return budgeted


def _store_error(store: Store, exc: OSError) -> KenError:
    return KenError(f"store {store.root}: {exc.strerror or exc} ({exc.filename or 'store file'}); free space or "
                    "fix permissions on its file system, then rerun the same command (it resumes)")


def _run_units(store: Store, todo: list[WorkUnit], to_score: list[FineTunePlan], progress: Progress, *,
               address, workers, placement: str, out: list) -> None:
    """Start or join Ray, score the model-budget fine-tunes, run the units on an actor pool; `out`
    receives the _Dispatch of each pass (scoring first, if any; for the log and the timings)."""
    kernel = None  # the compiled CPU kernel, compiled (once per machine) while Ray starts: warmup.py
    if any(STRATEGIES[u.params.strategy].compiled_kernel for u in todo):
        kernel = compile_if_needed()
    if kernel is not None:
        kernel.report_to(lambda: progress.note(COMPILE_NOTE),
                         lambda s: progress.note(f"the selection kernel compiled in {s:.1f} s; cached for the next "
                                                 "runs on this machine"))
    started = connect(address, workers)
    try:
        blocks = len(todo) + sum(len(p.units) for p in to_score)
        kinds = plan_slots(ray.cluster_resources(), workers, placement, blocks)
        pool = ActorPool(store.root, kinds, note=progress.note)
        progress.note(f"{sum(kinds)} GPU + {len(kinds) - sum(kinds)} CPU actor(s) "
                      f"({placement} placement), {blocks} block(s) to run")
        try:
            if to_score:
                todo = todo + _score_and_budget(store, to_score, pool, progress, out)
            dispatch = _Dispatch(store, todo, progress, pool)
            out.append(dispatch)
            try:
                dispatch.run()
            finally:
                dispatch.cancel()
                dispatch.add_workers(pool.describe())
            if kernel is not None and kernel.error is not None:  # the actors load it on their own; their units
                progress.note(f"the driver could not compile the selection kernel: {kernel.error}")  # raise it if real
            for name, (hits, again) in dispatch.from_spill.items():
                progress.note(f"{name}: {hits} block(s) selected from their spilled candidates, {again} read "
                              "and scored again (budget above the candidates kept, or no spill)")
        finally:
            pool.shutdown()
    finally:
        if kernel is not None:
            kernel.report_to()
            if not kernel.done:  # no actor on this machine needed it (GPUs, a cluster)
                kernel.stop()
        if started:
            ray.shutdown()


def run_job(job: JobSpec, *, address: str | None = None, workers: int | None = None,
            overwrite: bool = False, quiet: bool = False, stream=sys.stderr,
            placement: str | None = None) -> JobResult:
    """Prune every fine-tune of `job` into its store; returns a JobResult (manifests by name)."""
    t0 = time.time()
    placement = placement or job.placement
    base, plans = plan_job(job)
    try:
        store = Store(job.store, create=True)
    except OSError as exc:
        raise KenError(f"cannot create the store {job.store}: {exc.strerror or exc}; choose a writable "
                       "directory for --store") from None
    names = [p.spec.name for p in plans]
    log = JobLog(store.root, stream=stream)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(store.locked(names))
            todo, reused, complete, to_score = _begin_all(store, base, plans, overwrite)
            to_run = {n: sum(1 for u in todo if u.finetune == n) for n in names}
            to_run.update({p.spec.name: len(p.units) for p in to_score})
        except BaseException as exc:  # another run holds the lock, other settings, a full disk
            log.event("refused", error=f"{type(exc).__name__}: {exc}", finetunes=names, pid=os.getpid())
            if isinstance(exc, OSError):
                raise _store_error(store, exc) from None
            raise
        log.start(base=job.base, store=store.root, address=address, workers=workers, placement=placement,
                  block_bytes=job.block_bytes, finetunes={
                      p.spec.name: {"source": p.spec.checkpoint.source, "params": p.spec.params.as_dict(),
                                    "blocks": len(p.units), "blocks_reused": len(reused[p.spec.name]),
                                    "already_complete": p.spec.name in complete} for p in plans})
        progress = Progress({p.spec.name: sum(u.elements for u in p.units) for p in plans},
                            {n: sum(u.elements for u in us) for n, us in reused.items()},
                            quiet=quiet, stream=stream)
        for name in complete:
            progress.note(f"{name}: already complete in the store; nothing to do")
        partial = {n: len(us) for n, us in reused.items() if us and n not in complete}
        if partial:
            progress.note("resuming: " + ", ".join(f"{n}: {k} block(s) reused from an earlier run"
                                                   for n, k in partial.items()))
        ran: list[_Dispatch] = []
        try:
            if todo or to_score:
                _run_units(store, todo, to_score, progress, address=address, workers=workers,
                           placement=placement, out=ran)
            progress.close()
            manifests = {}
            for plan in plans:
                name = plan.spec.name
                manifests[name] = store.manifest(name) if name in complete else store.finalize(name, summary={
                    "blocks_run": to_run[name],
                    "blocks_reused": len(reused[name]), "seconds": round(time.time() - t0, 3)})
        except BaseException as exc:
            log.event("end", status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                      error=f"{type(exc).__name__}: {exc}", **_end_fields(_timings(t0, ran), names, ran, reused))
            if isinstance(exc, OSError):
                raise _store_error(store, exc) from None
            raise
        timings = _timings(t0, ran)
        log.event("end", status="ok" if any(to_run.values()) else "nothing to do",
                  **_end_fields(timings, names, ran, reused))
    return JobResult(manifests, blocks_run=to_run,
                     blocks_reused={n: len(us) for n, us in reused.items()}, already_complete=complete,
                     job_id=log.job_id, timings=timings)


def _timings(t0: float, ran: list[_Dispatch]) -> dict:
    """Where run_job's wall time went: start-up (validation, planning, Ray, actors starting: a
    fixed cost, about a second whatever the model size) until the first actor got work, then
    the passes (scoring, if any, and selection) from first dispatch to last result."""
    out = {"seconds": round(time.time() - t0, 3)}
    if ran and ran[0].first_submit is not None:
        out["startup_seconds"] = round(ran[0].first_submit - t0, 3)
    for d in ran:
        if d.first_submit is not None and d.last_result is not None:
            out[f"{'scoring' if d.method == 'score' else 'selection'}_seconds"] = round(d.last_result - d.first_submit, 3)
    return out


def _end_fields(timings: dict, names, ran: list[_Dispatch], reused: dict) -> dict:
    d = next((x for x in ran if x.method == "run"), None)
    run = d.blocks_run if d else {}
    return {**timings, "driver_peak_rss": peak_rss(),
            "finetunes": {n: {"blocks_run": run.get(n, 0), "blocks_reused": len(reused.get(n, []))}
                          for n in names},
            "workers": d.workers if d else {}, "retries": d.retries if d else [],
            "actors_replaced": d.pool.replaced if d else 0}
