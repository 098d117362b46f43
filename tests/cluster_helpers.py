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
    """The blocks committed so far by an unfinished run (finalize drops the journal)."""
    from ken_dist.store.protocol import Store

    return [(r["tensor"], r["row_start"], r["row_end"]) for r in Store(store_path).journal(finetune)]


def planned_blocks(store_path, finetune: str) -> int:
    from ken_dist.store.protocol import Store

    return sum(len(t["blocks"]) for t in Store(store_path).manifest(finetune)["tensors"].values())


def assert_committed_once(store_path, finetune: str, reused: int = 0) -> None:
    """The finished run committed each planned block not reused from an earlier run exactly once
    (its end event counts commits; a duplicate result of a re-dispatched unit is not one) and
    dropped the journal."""
    from ken_dist.job.log import read_job_log

    end = [e for e in read_job_log(store_path) if e["event"] == "end"][-1]
    assert end["finetunes"][finetune] == {"blocks_run": planned_blocks(store_path, finetune) - reused,
                                          "blocks_reused": reused}, end
    assert not os.path.exists(os.path.join(store_path, "finetunes", finetune, "journal.jsonl"))


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


def serial_model_reference(job, *, spill: bool) -> dict:
    """A job of one model-budget fine-tune run as the driver does, in this process, without Ray:
    score every block (spilling its candidates when `spill`), allocate, select, commit, finalize.
    Returns {block key: whether it was built from its spill}."""
    from dataclasses import replace

    from ken_dist.job.execute import process_unit, score_unit
    from ken_dist.kernel.strategies.budget import allocate, total_budget
    from ken_dist.runtime.driver import plan_job
    from ken_dist.store.protocol import Store

    base, (plan,) = plan_job(job)
    name, params = plan.spec.name, plan.spec.params
    prune = [u for u in plan.units if u.action == "prune"]
    with Store(job.store, create=True) as store:
        store.begin(name, params=params.as_dict(), base_identity=base.identity(),
                    finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors)
        scored = {u.key: score_unit(u, store if spill else None) for u in prune}
        assert all(("spilled" in r) == spill and "spill_error" not in r for r in scored.values())
        budgets, summary = allocate({k: (r["bins"], r["counts"]) for k, r in scored.items()},
                                    total_budget([(u.rows, u.ft_info.row_geometry[1]) for u in prune],
                                                 params.keep, params.k))
        store.set_budgets(name, budgets, summary)
        records = [process_unit(replace(u, budget=budgets.get(u.key)), store) for u in plan.units]
        store.commit(name, records)
        store.finalize(name, summary={})
    return {(r["tensor"], r["row_start"], r["row_end"]): r["from_spill"] for r in records if "from_spill" in r}


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


class FakeJobsAPI:
    """A stand-in for a Ray head's Jobs API on 127.0.0.1 (a thread, a free port) for the failures a
    real head gives only with effort: it answers the calls ray.job_submission.JobSubmissionClient
    makes (version check, package upload, submit, job info, stop) with the statuses a test sets, the
    way the dashboard does (401 without a token, 403 with a wrong one, 413 for a big upload, 404 for
    an unknown job), and records what it received: `seen` (method, path, Authorization header),
    `uploads` (bytes of each uploaded package) and `submitted` (the submit requests' JSON)."""

    def __init__(self, *, token=None, upload_status=200, job_status=200):
        import http.server
        import json
        import threading

        self.token, self.upload_status, self.job_status = token, upload_status, job_status
        self.seen, self.uploads, self.submitted = [], [], []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status, body):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization")
                fake.seen.append((self.command, self.path, auth))
                if fake.token is not None and auth is None:
                    return self._reply(401, "Unauthorized: Missing authentication token")
                if fake.token is not None and auth != f"Bearer {fake.token}":
                    return self._reply(403, "Forbidden: Invalid authentication token")
                if self.path == "/api/version":
                    return self._reply(200, {"version": "4", "ray_version": "2.60.0", "ray_commit": "x",
                                             "session_name": "fake"})
                if self.path.startswith("/api/packages/"):
                    if self.command == "GET":
                        return self._reply(404, "no such package")
                    fake.uploads.append(body)
                    if fake.upload_status == 413:
                        return self._reply(413, "Maximum request body size exceeded")
                    return self._reply(fake.upload_status, "")
                if self.path == "/api/jobs/" and self.command == "POST":
                    request = json.loads(body)
                    fake.submitted.append(request)
                    job_id = request.get("submission_id") or "raysubmit_fake"
                    return self._reply(200, {"job_id": job_id, "submission_id": job_id})
                if self.path.startswith("/api/jobs/"):
                    job_id = self.path.split("/")[3]
                    if fake.job_status == 404:
                        return self._reply(404, f"Job {job_id} does not exist")
                    if fake.job_status != 200:
                        return self._reply(fake.job_status, "Internal Server Error")
                    if self.path.endswith("/stop"):
                        return self._reply(200, {"stopped": True})
                return self._reply(404, "Not Found")

            do_GET = do_PUT = do_POST = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
