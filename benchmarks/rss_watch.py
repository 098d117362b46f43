"""Run a command and report its process tree's peak memory, CPU, and the machine's other load.

    python benchmarks/rss_watch.py -- ken-dist prune BASE FT --store S --keep 0.25 --workers 2

Samples /proc every 0.2 s (see benchmarks/e2e.py's Sampler): peak RSS (VmHWM) of the command's
own process, of each selection actor and of Ray's processes, the peak of their sum (what the
machine had to hold at once), the tree's CPU seconds, and the CPU seconds other processes used
meanwhile. Prints a progress line every --every seconds and a JSON summary line at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import Sampler  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=float, default=60.0, help="seconds between progress lines")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command to run after --")
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    sampler = Sampler(proc.pid)
    sampler.start()
    while proc.poll() is None:
        try:
            proc.wait(timeout=args.every)
        except subprocess.TimeoutExpired:
            print(f"[rss_watch] {time.time() - t0:7.0f} s  sum of RSS peak so far {sampler.sum_peak / 2**30:.2f} GiB  "
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    wall = time.time() - t0
    out = sampler.finish()
    out.update(wall=wall, returncode=proc.returncode, command=cmd)
    print(f"[rss_watch] {wall:.0f} s wall, exit {proc.returncode}; peak RSS: driver {out['peak_driver'] / 2**30:.2f} GiB, "
          f"actors {[round(x / 2**30, 2) for x in out['peak_actors']]} GiB, largest other {out['peak_ray_max'] / 2**30:.2f} GiB, "
          f"sum {out['peak_sum'] / 2**30:.2f} GiB; CPU ours {out['cpu_ours']:.0f} s, others {out['cpu_others']:.0f} s",
          file=sys.stderr)
    print(json.dumps(out))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
