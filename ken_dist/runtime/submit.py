"""Run a prune job file as a Ray Job: submit, wait, status, logs, stop.

Why Ray Jobs rather than a driver on the laptop: the driver of a job that runs for hours must
not die with an SSH session or a closed lid. A Ray Job runs the driver (`ken-dist prune --job
FILE`) on the head node, where RAY_ADDRESS is set, so it joins the cluster (driver.connect).
Checkpoints and the store live on storage every node sees, so the job needs nothing from here
but the job file: by default only the job file is uploaded (a temporary directory holding just
it), never the directory it sits in, which may hold a checkpoint. `--working-dir DIR` ships DIR
instead, for code the cluster lacks. A killed or failed job is resumed by submitting it again.

Token authentication (Ray >= 2.60 enables it by default): the dashboard's HTTP API wants
`Authorization: Bearer <token>`. The token is taken from, in order: --token-file, the
RAY_AUTH_TOKEN variable, the file named by RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token (where
`ray start` / `ray get-auth-token --generate` put it). RAY_AUTH_MODE=disabled sends none.

Failures of the Jobs API are told apart by exception type and HTTP status, never by message
text: ray.job_submission raises AuthenticationError for 401/403, RuntimeError("Request failed
with status code N: ...") for other statuses (the number is parsed at that fixed position),
ConnectionError when the head does not answer; the log stream (aiohttp) raises ClientError
types carrying `.status`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ken_dist.errors import ClusterError, InputError

log = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
MAX_UPLOAD_BYTES = 100 * 1024**2  # the dashboard's request body limit (aiohttp client_max_size)
_STATUS_AT = (re.compile(r"Request failed with status code (\d{3}):"),  # JobSubmissionClient._raise_error
              re.compile(r"Version check returned (\d{3})\."))         # ... its version check


@dataclass(frozen=True)
class Token:
    """The token sent to the cluster (None: no header) and where it came from, for error messages."""
    value: str | None
    source: str


def auth_token(token_file: str | None = None) -> Token:
    """The cluster token from the first of the places listed in the module docstring."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return Token(None, "none (RAY_AUTH_MODE=disabled)")
    if token_file:
        return Token(_read_token(token_file, "--token-file"), f"--token-file {token_file}")
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(os.environ["RAY_AUTH_TOKEN"].strip(), "the RAY_AUTH_TOKEN variable")
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        return Token(_read_token(path, "RAY_AUTH_TOKEN_PATH"), f"RAY_AUTH_TOKEN_PATH={path}")
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return Token(default.read_text().strip(), str(default))
    return Token(None, "none found (no --token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")


def _read_token(path: str, what: str) -> str:
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise InputError(f"cannot read the Ray token file {path} ({what}): {exc.strerror}") from None
    if not token:
        raise InputError(f"the Ray token file {path} ({what}) is empty")
    return token


def _address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise InputError("give --address http://HEAD:8265 (the Ray dashboard of the cluster) or set RAY_ADDRESS")
    if "://" not in address:
        address = "http://" + address
    return address


class Jobs:
    """A JobSubmissionClient for one cluster, each call's failure turned into a ClusterError."""

    def __init__(self, address: str | None, token_file: str | None = None):
        from ray.job_submission import JobSubmissionClient

        self.address = _address(address)
        self.token = auth_token(token_file)
        headers = {"Authorization": f"Bearer {self.token.value}"} if self.token.value else None
        self.client = self.call(JobSubmissionClient, self.address, headers=headers)

    def call(self, fn, *args, job_id: str | None = None, upload: Path | None = None, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _api_errors() as exc:
            raise self.error(exc, job_id=job_id, upload=upload) from None

    def error(self, exc: BaseException, *, job_id: str | None = None, upload: Path | None = None) -> ClusterError:
        """The real cause of a failed Jobs API call, with its fix."""
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        status = http_status(exc)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        if isinstance(exc, AuthenticationError) or status in (401, 403):
            sent = f"the token from {self.token.source}" if self.token.value else f"no token: {self.token.source}"
            return ClusterError(f"the Ray cluster at {self.address} refused the request ({first}); it uses token "
                                f"authentication and ken-dist sent {sent}. Copy the head's token (on the head: "
                                "`ray get-auth-token`) to ~/.ray/auth_token, or pass --token-file FILE, or set "
                                "RAY_AUTH_TOKEN")
        if status == 413:
            what = (f"the working directory {upload} ({_tree_bytes(upload) / 2**20:.0f} MiB before compression)"
                    if upload else "the request")
            return ClusterError(f"the Ray head at {self.address} refused {what} as too large (HTTP 413; its "
                                f"dashboard accepts {MAX_UPLOAD_BYTES // 2**20} MiB); checkpoints and stores "
                                "belong on shared storage named in the job file, not in the upload: pass "
                                "--working-dir with a directory holding only code, or omit it to upload only "
                                "the job file")
        if status == 404:
            if job_id is not None:
                return ClusterError(f"no such Ray job {job_id!r} at {self.address}; list them with "
                                    "`ken-dist job list`")
            return ClusterError(f"{self.address} answered 404 ({first}): it is not the Ray dashboard of a "
                                "cluster with the Jobs API; give the head's dashboard address (default port 8265)")
        if status is not None and status >= 500:
            return ClusterError(f"the Ray head at {self.address} failed the request (HTTP {status}: {first}); see "
                                "the dashboard log on the head (/tmp/ray/session_latest/logs/dashboard*.log)")
        if status is not None:
            return ClusterError(f"the Ray Jobs API at {self.address} answered HTTP {status}: {first}")
        if isinstance(exc, (ConnectionError, requests.ConnectionError, requests.Timeout,
                            aiohttp.ClientConnectionError)):
            during = (f" while the working directory {upload} was being uploaded (the head may have dropped an "
                      "upload it found too large)" if upload else "")
            return ClusterError(f"cannot reach the Ray Jobs API at {self.address}{during} ({type(exc).__name__}: "
                                f"{first}); check that the head is up (`ray status` on it) and that this is its "
                                "dashboard address (default port 8265)")
        return ClusterError(f"the Ray Jobs API at {self.address} failed: {type(exc).__name__}: {first}")

    def info(self, job_id: str):
        return self.call(self.client.get_job_info, job_id, job_id=job_id)

    def state(self, job_id: str) -> str:
        return _state(self.info(job_id))


def _api_errors() -> tuple[type[BaseException], ...]:
    """What ray.job_submission raises when a call fails (see the module docstring)."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    return AuthenticationError, requests.RequestException, aiohttp.ClientError, ConnectionError, RuntimeError


def http_status(exc: BaseException) -> int | None:
    """The HTTP status a Jobs API failure carries, if any (see the module docstring)."""
    response = getattr(exc, "response", None)  # requests.HTTPError
    if response is not None and getattr(response, "status_code", None):
        return int(response.status_code)
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError (the log stream's handshake)
    if isinstance(status, int):
        return status
    if isinstance(exc, RuntimeError):
        for pattern in _STATUS_AT:
            match = pattern.match(str(exc))
            if match:
                return int(match.group(1))
    return None


def _state(info) -> str:
    return str(getattr(info.status, "value", info.status))


def _tree_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file() and not f.is_symlink())


def entrypoint(job_file: str, extra_args: list[str] | tuple = ()) -> str:
    """The command the cluster runs: the job file, relative to the uploaded working directory."""
    return shlex.join(["ken-dist", "prune", "--job", job_file, *extra_args])


@dataclass(frozen=True)
class Submission:
    job_id: str
    entrypoint: str
    uploaded: str  # what went to the cluster, in words


def submit(job_file: str, address: str | None, *, working_dir: str | None = None,
           submission_id: str | None = None, token_file: str | None = None,
           extra_args: list[str] | tuple = (), runtime_env: dict | None = None) -> Submission:
    """Validate JOB_FILE here, upload it alone (or `working_dir`, which must contain it) and start
    the job."""
    from ken_dist.job.spec import load_job_file

    job = load_job_file(job_file)  # a typo fails here, not on the cluster
    path = Path(job_file).resolve()
    jobs = Jobs(address, token_file)
    env = dict(runtime_env or {})
    if working_dir:
        root = Path(working_dir).resolve()
        if not root.is_dir():
            raise InputError(f"--working-dir {working_dir} is not a directory")
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            raise InputError(f"job file {job_file} is not inside the working directory {root}; it must be "
                             "uploaded with it: pass --working-dir DIR containing the job file") from None
        return _submit(jobs, root, rel, env, submission_id, extra_args, f"{root} (--working-dir)")
    if not os.path.isabs(job.store):
        raise InputError(f"job file {job_file}: store {job.store!r} is a relative path; on the cluster it would "
                         "land in the job's temporary working directory, out of the actors' reach. Give an "
                         "absolute path on storage every node mounts")
    with tempfile.TemporaryDirectory(prefix="ken-dist-submit-") as tmp:
        shutil.copyfile(path, Path(tmp) / path.name)
        return _submit(jobs, Path(tmp), path.name, env, submission_id, extra_args, f"the job file {path.name} only")


def _submit(jobs: Jobs, root: Path, rel: str, env: dict, submission_id, extra_args, uploaded: str) -> Submission:
    env.setdefault("working_dir", str(root))
    command = entrypoint(rel, extra_args)
    job_id = jobs.call(jobs.client.submit_job, entrypoint=command, submission_id=submission_id, runtime_env=env,
                        metadata={"ken_dist_job_file": rel}, upload=root)
    return Submission(job_id, command, uploaded)


def status(address: str | None, job_id: str, token_file: str | None = None) -> dict:
    info = Jobs(address, token_file).info(job_id)
    return {"job_id": job_id, "status": _state(info), "message": info.message, "entrypoint": info.entrypoint,
            "start_time": info.start_time, "end_time": info.end_time}


def logs(address: str | None, job_id: str, token_file: str | None = None) -> str:
    jobs = Jobs(address, token_file)
    return jobs.call(jobs.client.get_job_logs, job_id, job_id=job_id)


def stop(address: str | None, job_id: str, token_file: str | None = None) -> bool:
    jobs = Jobs(address, token_file)
    return bool(jobs.call(jobs.client.stop_job, job_id, job_id=job_id))


def list_jobs(address: str | None, token_file: str | None = None) -> list[dict]:
    jobs = Jobs(address, token_file)
    return [{"job_id": j.submission_id or j.job_id, "status": _state(j), "entrypoint": j.entrypoint}
            for j in jobs.call(jobs.client.list_jobs)]


def wait(address: str | None, job_id: str, *, token_file: str | None = None, timeout: float | None = None,
         poll: float = 2.0, stream=None) -> str:
    """Stream the job's logs to `stream` until it ends (tail_job_logs: each line once, as it is
    written; default sys.stdout); returns its final status. After `timeout` seconds a ClusterError
    says it still runs."""
    stream = stream or sys.stdout
    jobs = Jobs(address, token_file)
    deadline = None if timeout is None else time.monotonic() + timeout

    async def follow():
        async for chunk in jobs.client.tail_job_logs(job_id):
            stream.write(chunk)
            stream.flush()

    try:
        _run_async(asyncio.wait_for(follow(), timeout))
        streamed = True
    except TimeoutError:  # ours (timeout) or the stream's own (aiohttp.ServerTimeoutError)
        streamed = False
    except _api_errors() as exc:
        raise jobs.error(exc, job_id=job_id) from None
    while True:  # the stream ends when the job does; its state may lag by a moment
        state = jobs.state(job_id)
        if state in TERMINAL:
            return state
        if deadline is not None and time.monotonic() >= deadline:
            raise ClusterError(f"Ray job {job_id} still {state} after {timeout:g} s; it keeps running: "
                               f"`ken-dist job status {job_id}`, or stop it with `ken-dist job stop {job_id}`")
        if streamed:
            log.warning("the log stream of Ray job %s ended while it is %s; waiting for its end without its "
                        "further logs (`ken-dist job logs %s` shows them)", job_id, state, job_id)
            streamed = False
        time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))


def _run_async(coro):
    """asyncio.run, also from code that already runs an event loop (a notebook): then in a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # none running: the usual case
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
