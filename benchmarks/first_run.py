"""A new user's first `ken-dist demo`: seconds from the command to its summary and to its exit.

    python benchmarks/first_run.py                      # this tree, 2 rounds
    python benchmarks/first_run.py --against 42cdaba    # and an older commit, alternating

Each round runs, per tree: a first run (an empty numba cache directory, as on a new machine),
then a warm run (the cache the first run left). Trees alternate inside a round so that the
machine's load hits both alike. An older commit is exported with `git archive` into a temporary
directory and run from there (PYTHONPATH), so the installed package does not matter. Each row
carries the load average (1 min) read just before the run: absolute seconds mean something
only on an otherwise idle machine. The CPU seconds of all the demo's processes (Ray's included)
and of compiling the kernel alone (another empty cache) change less with the machine's load;
the last table is when each phase's line appeared.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export(commit: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# Where the time goes: when each of these lines first appears (the demo's stdout and stderr).
PHASES = [("pair written, Ray starting", r"^\[demo\] pruning"),
          ("compiling (said)", r"compiling the selection kernel"),
          ("Ray and actors up", r"GPU \+ \d+ CPU actor"),
          ("kernel compiled", r"selection kernel compiled in"),
          ("first block", r"^\[ken-dist\] +\d+\.\d%  1 blocks"),
          ("last block", r"^\[ken-dist\] 100\.0%"),
          ("summary", r"^store: .*time: [0-9.]+ s$"),
          ("checked", r"bit-exact vs in-memory KEN")]


def demo(tree: Path, cache: Path, work: Path) -> tuple[dict, float, float | None]:
    """({phase: seconds from start}, seconds to exit, the job's own seconds from its summary)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "NUMBA_CACHE_DIR": str(cache),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    seen, job, lines = {}, None, []
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ken_dist.cli", "demo", "--workdir", str(work)], cwd=tree,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cpu, stop = {}, threading.Event()
    poller = threading.Thread(target=_poll_cpu, args=(proc.pid, cpu, stop), daemon=True)
    poller.start()
    for line in proc.stdout:
        now = time.perf_counter() - t0
        lines.append(line.rstrip())
        for name, pattern in PHASES:
            if name not in seen and re.search(pattern, line.strip()):
                seen[name] = now
        found = re.search(r"^store: .*time: ([0-9.]+) s$", line.strip())
        job = float(found.group(1)) if found else job
    proc.wait()
    seconds = time.perf_counter() - t0
    stop.set()
    poller.join()
    if proc.returncode != 0 or "summary" not in seen:
        raise SystemExit(f"demo in {tree} failed ({proc.returncode}):\n" + "\n".join(lines[-30:]))
    return seen, seconds, job, sum(cpu.values())


def _poll_cpu(root: int, cpu: dict, stop: threading.Event) -> None:
    """CPU seconds of every process under `root` (Ray's included), read from /proc every 0.1 s
    into {pid: seconds}; a process's last 0.1 s before it exits is missed. Linux only."""
    tick = os.sysconf("SC_CLK_TCK")
    while not stop.is_set():
        parents = {}  # pid -> its children's pids
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:  # exited meanwhile
                    continue
                parents.setdefault(int(fields[1]), []).append(int(entry))
        todo = [root]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
            except OSError:
                pass  # exited: its last reading stands
            todo.extend(parents.get(pid, []))
        time.sleep(0.1)


def compile_seconds(tree: Path, cache: Path) -> float:
    """CPU seconds one process spends compiling the kernel into an empty numba cache."""
    code = ("import time; from ken_dist.kernel import ken_cpu; t = time.process_time(); assert ken_cpu.warm_up(); "
            "print(time.process_time() - t)")
    env = {**os.environ, "PYTHONPATH": str(tree), "NUMBA_CACHE_DIR": str(cache)}
    return float(subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True,
                                check=True).stdout)


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
                compiled = compile_seconds(tree, machine / "compile-alone")
                print(f"round {r + 1} {label:>12} compiling the kernel alone: {compiled:.1f} CPU s", flush=True)
                for kind in ("first", "warm"):
                    load = os.getloadavg()[0]
                    phases, secs, job, cpu = demo(tree, machine / "numba", tmp / f"work-{r}-{len(rows)}")
                    rows.append((r + 1, label, kind, phases, secs, job, load, cpu, compiled))
                    print(f"round {r + 1} {label:>12} {kind:>5}: summary {phases['summary']:5.1f} s, exit {secs:5.1f} s "
                          f"(job {job} s; {cpu:.1f} CPU s; load {load:.1f})", flush=True)
        print("\n| round | tree | run | command to summary (s) | command to exit (s) | job (s) | CPU s, all processes "
              "| kernel compile alone (CPU s) | load avg (1 min) |\n|---|---|---|---|---|---|---|---|---|")
        for r, label, kind, phases, secs, job, load, cpu, compiled in rows:
            print(f"| {r} | {label} | {kind} | {phases['summary']:.1f} | {secs:.1f} | {job} | {cpu:.1f} | {compiled:.1f} "
                  f"| {load:.1f} |")
        print("\nseconds from the command to each phase (round " + str(args.rounds) + "):\n\n| phase | "
              + " | ".join(f"{label} {kind}" for r, label, kind, *_ in rows if r == args.rounds) + " |\n|---|"
              + "---|" * sum(1 for row in rows if row[0] == args.rounds))
        for name, _ in [*PHASES, ("exit", None)]:
            cells = [(f"{row[4]:.1f}" if name == "exit" else f"{row[3][name]:.1f}" if name in row[3] else "-")
                     for row in rows if row[0] == args.rounds]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
