"""The job log: one JSON line per event in STORE/jobs.jsonl, appended by the driver.

Why: a prune job on a cluster runs for hours and may be killed, resumed, or fail on one bad
tensor. The manifest says what the store holds; the job log says how it got there: who ran
what with which parameters and versions, how long it took, how many blocks were reused from
an earlier run, which workers ran (device, node, peak memory), and the error that stopped a
failed run. Readers of the store ignore it (docs/format.md); `read_job_log` parses it.

Events (every line has `event`, `job_id`, `time`):
    start  host, pid, argv, versions, base, store, finetunes {name: {source, params, blocks,
           blocks_reused, already_complete}}, address, workers, placement, block_bytes
    end    status ("ok", "failed", "interrupted", "nothing to do"), seconds, error (failed only),
           finetunes {name: {blocks_run, blocks_reused}}, driver_peak_rss, workers
           {pid: {node, device, gpu_ids, blocks, peak_rss}}, retries [...], actors_replaced
A start without an end is a run that was killed (kill -9, node loss of the driver).
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import socket
import sys
import uuid

from ken_dist.store.fs import append_jsonl, now, read_jsonl

LOG_NAME = "jobs.jsonl"


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux: ru_maxrss is KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib) * (1 if sys.platform == "darwin" else 1024)


def versions() -> dict:
    """Versions of what decides the result and the speed, for the log. From the installed
    packages' metadata: importing torch just to read its version would cost the driver torch's
    whole import time and memory."""
    out = {"python": platform.python_version()}
    for name, dist in (("ken_dist", "ken-dist"), ("torch", "torch"), ("numpy", "numpy"), ("numba", "numba"),
                       ("pyarrow", "pyarrow"), ("safetensors", "safetensors"), ("ray", "ray")):
        module = sys.modules.get(name)
        try:
            out[name] = getattr(module, "__version__", None) or importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


class JobLog:
    """Appends the events of one job run to STORE/jobs.jsonl. Logging never fails a job: an
    unwritable log (a full disk) is reported once on stderr and then skipped."""

    def __init__(self, store_root: str, *, stream=sys.stderr):
        self.path = os.path.join(store_root, LOG_NAME)
        self.job_id = uuid.uuid4().hex[:12]
        self.stream = stream
        self._broken = False

    def event(self, event: str, **fields) -> None:
        if self._broken:
            return
        record = {"event": event, "job_id": self.job_id, "time": now(), **fields}
        try:
            append_jsonl(self.path, record, default=str)  # a log line never fails on an odd value
        except OSError as exc:
            self._broken = True
            print(f"[ken-dist] warning: cannot append to the job log {self.path} ({exc}); "
                  "continuing without it", file=self.stream, flush=True)

    def start(self, **fields) -> None:
        self.event("start", host=socket.gethostname(), pid=os.getpid(), argv=list(sys.argv),
                   versions=versions(), **fields)


def read_job_log(store_root: str) -> list[dict]:
    """All events of STORE/jobs.jsonl in order (torn lines skipped)."""
    return [e for e in read_jsonl(os.path.join(os.fspath(store_root), LOG_NAME)) if isinstance(e, dict)]
