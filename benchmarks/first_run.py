"""A new user's first `ken-dist demo`: seconds from the command to the end of its output.

    python benchmarks/first_run.py                      # this tree, 2 rounds
    python benchmarks/first_run.py --against 797d82f    # and an older commit, alternating

Each round runs, per tree: a first run (an empty numba cache directory, as on a new machine),
then a warm run (the cache the first run left). Trees alternate inside a round so that the
machine's load hits both alike. An older commit is exported with `git archive` into a temporary
directory and run from there (PYTHONPATH), so the installed package does not matter.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export(commit: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def demo(tree: Path, cache: Path, work: Path) -> tuple[float, float | None, str]:
    """(seconds from start to exit, the job's own seconds from its summary, the last line)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "NUMBA_CACHE_DIR": str(cache),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "ken_dist.cli", "demo", "--workdir", str(work)], cwd=tree, env=env,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"demo in {tree} failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    job = re.search(r"time: ([0-9.]+) s", run.stdout + run.stderr)
    return seconds, float(job.group(1)) if job else None, (run.stdout.strip().splitlines() or [""])[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--against", help="an older commit to time side by side (git archive)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ken-first-run-") as tmp:
        tmp = Path(tmp)
        trees = {"this tree": ROOT}
        if args.against:
            trees[args.against] = export(args.against, tmp / "old")
        rows = []
        for r in range(args.rounds):
            for label, tree in trees.items():
                cache = tmp / f"numba-{r}-{len(rows)}"
                for kind in ("first", "warm"):
                    secs, job, last = demo(tree, cache, tmp / f"work-{r}-{len(rows)}")
                    rows.append((r + 1, label, kind, secs, job))
                    print(f"round {r + 1} {label:>12} {kind:>5}: {secs:6.1f} s (job {job} s)  {last[-60:]}",
                          flush=True)
        print("\n| round | tree | run | command to summary (s) | job (s) |\n|---|---|---|---|---|")
        for r, label, kind, secs, job in rows:
            print(f"| {r} | {label} | {kind} | {secs:.1f} | {job} |")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
