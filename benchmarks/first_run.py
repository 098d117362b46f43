"""A new user's first `ken-dist demo`: seconds from the command to its summary and to its exit.

    python benchmarks/first_run.py                      # this tree, 2 rounds
    python benchmarks/first_run.py --against 42cdaba    # and an older commit, alternating

Each round runs, per tree: a first run (an empty numba cache directory, as on a new machine),
then a warm run (the cache the first run left). Trees alternate inside a round so that the
machine's load hits both alike. An older commit is exported with `git archive` into a temporary
directory and run from there (PYTHONPATH), so the installed package does not matter. Each row
carries the load average (1 min) read just before the run: absolute seconds mean something
only on an otherwise idle machine.
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


SUMMARY = re.compile(r"^store: .*time: ([0-9.]+) s$")


def demo(tree: Path, cache: Path, work: Path) -> tuple[float, float, float | None, str]:
    """(seconds from start to the summary's last line, to exit, the job's own seconds from its
    summary, the last line). The demo's stdout is read as it comes; its stderr goes to a file."""
    env = {**os.environ, "PYTHONPATH": str(tree), "NUMBA_CACHE_DIR": str(cache),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    summary_at, job, lines = None, None, []
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "ken_dist.cli", "demo", "--workdir", str(work)], cwd=tree,
                                env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        for line in proc.stdout:
            lines.append(line.rstrip())
            found = SUMMARY.match(line.strip())
            if found:
                summary_at, job = time.perf_counter() - t0, float(found.group(1))
        proc.wait()
        seconds = time.perf_counter() - t0
        err.seek(0)
        if proc.returncode != 0 or summary_at is None:
            raise SystemExit(f"demo in {tree} failed ({proc.returncode}):\n" + "\n".join(lines[-20:])
                             + "\n" + err.read()[-2000:])
    return summary_at, seconds, job, (lines or [""])[-1]


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
                machine = tmp / f"machine-{r}-{len(rows)}"  # a new machine: an empty numba cache
                for kind in ("first", "warm"):
                    load = os.getloadavg()[0]
                    summary, secs, job, last = demo(tree, machine / "numba", tmp / f"work-{r}-{len(rows)}")
                    rows.append((r + 1, label, kind, summary, secs, job, load))
                    print(f"round {r + 1} {label:>12} {kind:>5}: summary {summary:5.1f} s, exit {secs:5.1f} s "
                          f"(job {job} s; load {load:.1f})  {last[-50:]}", flush=True)
        print("\n| round | tree | run | command to summary (s) | command to exit (s) | job (s) | load avg (1 min) |"
              "\n|---|---|---|---|---|---|---|")
        for r, label, kind, summary, secs, job, load in rows:
            print(f"| {r} | {label} | {kind} | {summary:.1f} | {secs:.1f} | {job} | {load:.1f} |")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
