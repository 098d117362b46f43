"""Run a prune job file as a Ray Job: submit, wait, status, logs, stop.

Why Ray Jobs rather than a driver on the laptop: the driver of a job that runs for hours must
not die with an SSH session or a closed lid. A Ray Job runs the driver (`ken-dist prune --job
FILE`) on the head node, where RAY_ADDRESS is set, so it joins the cluster (driver._connect);
the job file travels in the uploaded working directory; checkpoints and the store live on
storage every node sees. A killed or failed job is resumed by submitting it again.

Token authentication (Ray >= 2.60 enables it by default): the dashboard's HTTP API wants
`Authorization: Bearer <token>`. The token is taken from, in order: --token-file, the
RAY_AUTH_TOKEN variable, the file named by RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token (where
`ray start` / `ray get-auth-token --generate` put it). RAY_AUTH_MODE=disabled sends none.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path

from ken_dist.errors import KenError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def auth_token(token_file: str | None = None) -> str | None:
    """The cluster token from the places listed in the module docstring, or None."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if token_file:
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise KenError(f"cannot read the Ray token file {token_file}: {exc.strerror}") from None
        if not token:
            raise KenError(f"the Ray token file {token_file} is empty")
        return token
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if candidate and Path(candidate).expanduser().is_file():
            token = Path(candidate).expanduser().read_text().strip()
            if token:
                return token
    return None


def _address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise KenError("give --address http://HEAD:8265 (the Ray dashboard of the cluster) or set RAY_ADDRESS")
    if "://" not in address:
        address = "http://" + address
    return address


def client(address: str | None, token_file: str | None = None):
    """A JobSubmissionClient for the cluster, with the token header when there is a token."""
    from ray.job_submission import JobSubmissionClient

    address = _address(address)
    token = auth_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:
        raise _client_error(address, exc) from None


def _client_error(address: str, exc: Exception) -> KenError:
    text = str(exc)
    status = re.search(r"\b(401|403)\b", text.replace(address, ""))  # not a port number that holds "401"
    if "Authentication" in text or status:
        return KenError(f"the Ray cluster at {address} refused the request ({text.splitlines()[0]}); it uses "
                        "token authentication: copy its token (on the head: `ray get-auth-token`) to "
                        "~/.ray/auth_token, or pass --token-file FILE, or set RAY_AUTH_TOKEN")
    return KenError(f"cannot reach the Ray Jobs API at {address} ({type(exc).__name__}: {text.splitlines()[0] if text else ''}); "
                    "check that the head is up (`ray status` on it) and that this is its dashboard "
                    "address (default port 8265)")


def _call(address: str | None, what, *args, **kwargs):
    try:
        return what(*args, **kwargs)
    except KenError:
        raise
    except Exception as exc:
        text = str(exc)
        if "does not exist" in text or "404" in text:
            raise KenError(f"no such Ray job: {text.splitlines()[0]}; list them with `ken-dist job list`") from None
        raise _client_error(_address(address), exc) from None


def entrypoint(job_file: str, extra_args: list[str] | tuple = ()) -> str:
    """The command the cluster runs: the job file, relative to the uploaded working directory."""
    return shlex.join(["ken-dist", "prune", "--job", job_file, *extra_args])


def submit(job_file: str, address: str | None, *, working_dir: str | None = None,
           submission_id: str | None = None, token_file: str | None = None,
           extra_args: list[str] | tuple = (), runtime_env: dict | None = None) -> str:
    """Validate JOB_FILE here, upload its directory (or working_dir) and start the job; returns its id."""
    from ken_dist.job.spec import load_job_file

    load_job_file(job_file)  # a typo fails here, not on the cluster
    path = Path(job_file).resolve()
    root = Path(working_dir).resolve() if working_dir else path.parent
    if not root.is_dir():
        raise KenError(f"--working-dir {working_dir} is not a directory")
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise KenError(f"job file {job_file} is not inside the working directory {root}; it must be "
                       "uploaded with it: pass --working-dir DIR containing the job file") from None
    env = dict(runtime_env or {})
    env.setdefault("working_dir", str(root))
    c = client(address, token_file)
    return _call(address, c.submit_job, entrypoint=entrypoint(rel.as_posix(), extra_args),
                 submission_id=submission_id, runtime_env=env,
                 metadata={"ken_dist_job_file": rel.as_posix()})


def status(address: str | None, job_id: str, token_file: str | None = None) -> dict:
    info = _call(address, client(address, token_file).get_job_info, job_id)
    return {"job_id": job_id, "status": str(getattr(info.status, "value", info.status)),
            "message": info.message, "entrypoint": info.entrypoint,
            "start_time": info.start_time, "end_time": info.end_time}


def logs(address: str | None, job_id: str, token_file: str | None = None) -> str:
    return _call(address, client(address, token_file).get_job_logs, job_id)


def stop(address: str | None, job_id: str, token_file: str | None = None) -> bool:
    return bool(_call(address, client(address, token_file).stop_job, job_id))


def list_jobs(address: str | None, token_file: str | None = None) -> list[dict]:
    jobs = _call(address, client(address, token_file).list_jobs)
    return [{"job_id": j.submission_id or j.job_id, "status": str(getattr(j.status, "value", j.status)),
             "entrypoint": j.entrypoint} for j in jobs]


def wait(address: str | None, job_id: str, *, token_file: str | None = None, timeout: float | None = None,
         poll: float = 2.0, stream=sys.stdout) -> str:
    """Follow the job's logs on `stream` until it ends; returns its final status."""
    c = client(address, token_file)
    shown, t0 = 0, time.time()
    while True:
        info = _call(address, c.get_job_info, job_id)
        text = _call(address, c.get_job_logs, job_id) or ""
        if len(text) > shown:
            stream.write(text[shown:])
            stream.flush()
            shown = len(text)
        state = str(getattr(info.status, "value", info.status))
        if state in TERMINAL:
            return state
        if timeout is not None and time.time() - t0 > timeout:
            raise KenError(f"Ray job {job_id} still {state} after {timeout:.0f} s; it keeps running: "
                           f"`ken-dist job status {job_id}`, or stop it with `ken-dist job stop {job_id}`")
        time.sleep(poll)
