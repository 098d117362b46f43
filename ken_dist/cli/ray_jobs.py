"""`ken-dist submit` and `ken-dist job status|logs|stop|list`: prune jobs as Ray Jobs.

Kept out of cli.py so the prune/inspect verbs stay short; the work is in
ken_dist/runtime/submit.py (the only place that talks to the Ray Jobs API)."""
from __future__ import annotations

import argparse
import json
import sys

from ken_dist.errors import InputError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray dashboard of the cluster, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--token-file", help="file holding the cluster's auth token (default: $RAY_AUTH_TOKEN, "
                   "$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")


def cmd_submit(args) -> int:
    from ken_dist.runtime import submit

    extra = ["--overwrite"] if args.overwrite else []
    sent = submit.submit(args.job_file, args.address, working_dir=args.working_dir,
                         submission_id=args.submission_id, token_file=args.token_file, extra_args=extra)
    job_id = sent.job_id
    print(f"submitted Ray job {job_id}: {sent.entrypoint} (uploaded: {sent.uploaded})", flush=True)
    if not args.wait:
        print(f"follow it with `ken-dist job logs {job_id} --follow --address {args.address or '$RAY_ADDRESS'}`")
        return 0
    state = submit.wait(args.address, job_id, token_file=args.token_file, timeout=args.timeout)
    print(f"Ray job {job_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def cmd_job(args) -> int:
    from ken_dist.runtime import submit

    if args.action in ("status", "logs", "stop") and not args.job_id:
        raise InputError(f"`ken-dist job {args.action}` needs the job id printed by `ken-dist submit`")
    if args.action == "status":
        info = submit.status(args.address, args.job_id, args.token_file)
        print(json.dumps(info, indent=2) if args.json else f"{info['job_id']}: {info['status']} {info['message'] or ''}")
        return 0
    if args.action == "logs":
        if args.follow:
            state = submit.wait(args.address, args.job_id, token_file=args.token_file)
            return 0 if state == "SUCCEEDED" else 1
        sys.stdout.write(submit.logs(args.address, args.job_id, args.token_file))
        return 0
    if args.action == "stop":
        stopped = submit.stop(args.address, args.job_id, args.token_file)
        print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
        return 0
    jobs = submit.list_jobs(args.address, args.token_file)
    if args.json:
        print(json.dumps(jobs, indent=2))
    for j in [] if args.json else jobs:
        print(f"{j['job_id']:<40} {j['status']:<10} {j['entrypoint']}")
    return 0


def add_job_verbs(sub) -> None:
    """Add the `submit` and `job` verbs to ken-dist's subparsers."""
    p = sub.add_parser("submit", help="run a YAML job file on a Ray cluster as a Ray Job",
                       description="Validate JOB_FILE here, upload it (alone, or with --working-dir) to the "
                       "cluster and run `ken-dist prune --job JOB_FILE` there as a Ray Job. Paths in the job "
                       "file must be valid on the cluster (shared storage). Submitting again resumes.")
    p.add_argument("job_file", help="YAML job file (see jobs/example_job.yaml)")
    _common(p)
    p.add_argument("--working-dir", help="directory uploaded as the job's working directory, holding the job file "
                   "(e.g. code the cluster lacks; default: the job file alone)")
    p.add_argument("--submission-id", help="id for the Ray job (default: generated)")
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends; exit 0 only on success")
    p.add_argument("--timeout", type=float, help="with --wait: give up waiting after this many seconds")
    p.add_argument("--overwrite", action="store_true", help="pass --overwrite to the prune")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("job", help="status, logs, stop or list of Ray Jobs started by `ken-dist submit`")
    p.add_argument("action", choices=["status", "logs", "stop", "list"])
    p.add_argument("job_id", nargs="?", help="the id printed by `ken-dist submit`")
    _common(p)
    p.add_argument("--follow", action="store_true", help="logs: keep following until the job ends")
    p.add_argument("--json", action="store_true", help="status/list: machine-readable output")
    p.set_defaults(func=cmd_job)
