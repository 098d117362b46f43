"""Memory of a prune job is bounded by the block size, not the checkpoint size.

    python benchmarks/memory_bound.py                        # 3.8 GB bf16 fine-tune + base, cap 2 GiB
    python benchmarks/memory_bound.py --layers 2 --cap 1.5GiB --block-bytes 32MiB --keep-files

Generates a Llama-shaped bf16 base / fine-tune pair with ken_dist.testing.synthetic (streamed to disk:
generating it takes little memory), then runs `ken-dist prune` on a private local Ray inside a
memory cgroup capped well below the checkpoint size (cgroup v1 memory.limit_in_bytes or v2
memory.max; needs root, else the cap is skipped and only measured). Every process of the job
(driver, raylet, GCS, selection actors) is tagged through its environment and sampled from
/proc while it runs; at the end the report gives:
- each selection actor's peak RSS (VmHWM, from the job log STORE/jobs.jsonl) and the driver's,
- the peak of the summed RSS of all the job's processes (sampled every 0.2 s), of which anon
  (RssAnon: heap, not page cache of the memory-mapped checkpoint),
- the cgroup's peak usage (includes reclaimable page cache, so it sits near the cap),
next to the checkpoint sizes. Files are deleted afterwards unless --keep-files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ken_dist.cli.commands import byte_size  # noqa: E402
from ken_dist.job.log import read_job_log  # noqa: E402
from ken_dist.testing.synthetic import LlamaShape, write_pair  # noqa: E402

TAG = "KEN_BENCH_TAG"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Cgroup:
    """A child memory cgroup of ours with a hard limit (v1 or v2), or None where not allowed."""

    def __init__(self, limit: int):
        self.path, self.v2 = None, False
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
                break
            if hid == "0" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
                base, self.v2 = Path("/sys/fs/cgroup") / rel.lstrip("/"), True
        else:
            return
        path = base / f"ken-membench-{os.getpid()}"
        try:
            path.mkdir()
            (path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit))
            self.path = path
        except OSError as exc:
            print(f"[bench] no memory cgroup cap ({exc}); measuring only", flush=True)
            if path.exists():
                path.rmdir()

    def prefix(self) -> list[str]:
        """Shell words that move the child into the cgroup before it execs the job."""
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh"] if self.path else []

    def stats(self) -> dict:
        if not self.path:
            return {}
        read = lambda name: int((self.path / name).read_text().split()[0])  # noqa: E731
        if self.v2:
            return {"peak": read("memory.peak") if (self.path / "memory.peak").exists() else None,
                    "oom_kills": int(dict(line.split() for line in (self.path / "memory.events").read_text()
                                          .splitlines()).get("oom_kill", 0))}
        oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return {"peak": read("memory.max_usage_in_bytes"), "limit_hits": read("memory.failcnt"),
                "oom_kills": int(oom.get("oom_kill", 0))}

    def remove(self) -> None:
        if self.path:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.2)


def tagged(tag: str) -> list[int]:
    needle = f"{TAG}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def status_kib(pid: int, *fields: str) -> list[int]:
    out = dict.fromkeys(fields, 0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in out:
                out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return [out[f] for f in fields]


class Sampler(threading.Thread):
    """Peak of the summed VmRSS / RssAnon over all tagged processes."""

    def __init__(self, tag: str):
        super().__init__(daemon=True)
        self.tag, self.stop, self.peak_rss, self.peak_anon, self.procs = tag, threading.Event(), 0, 0, 0

    def run(self) -> None:
        while not self.stop.is_set():
            pids = tagged(self.tag)
            rss = anon = 0
            for pid in pids:
                r, a = status_kib(pid, "VmRSS", "RssAnon")
                rss, anon = rss + r, anon + a
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            self.procs = max(self.procs, len(pids))
            time.sleep(0.2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/ken-membench")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block-bytes", type=byte_size, default=64 * 2**20)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--cap", type=byte_size, default=2 * 2**30, help="memory cap of the whole job")
    ap.add_argument("--keep-files", action="store_true")
    args = ap.parse_args(argv)

    shape = LlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                       vocab=args.vocab, heads=32, kv_heads=32)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    need = int(2 * shape.parameters() * 2 * 1.2)  # bf16 base + fine-tune, + store and slack
    free = shutil.disk_usage(work).free
    if free < need + 2 * 2**30:
        raise SystemExit(f"{work}: {gib(free)} free, need about {gib(need)} + 2 GiB; use --workdir or fewer --layers")
    tag = uuid.uuid4().hex
    cgroup = Cgroup(args.cap)
    try:
        t0 = time.time()
        base, ft = write_pair(work / "pair", shape, dtype="bf16")
        gen_s = time.time() - t0
        ft_bytes, base_bytes = dir_bytes(ft), dir_bytes(base)
        print(f"[bench] pair written in {gen_s:.0f} s: fine-tune {gib(ft_bytes)}, base {gib(base_bytes)} "
              f"({shape.parameters() / 1e9:.2f} B params each)", flush=True)
        store = work / "store"
        cmd = [*cgroup.prefix(), sys.executable, "-m", "ken_dist.cli", "prune", str(base), str(ft), "--store",
               str(store), "--name", "bench", "--keep", str(args.keep), "--workers", str(args.workers),
               "--block-bytes", str(args.block_bytes), "--overwrite"]
        env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **{TAG: tag})
        sampler = Sampler(tag)
        sampler.start()
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        prune_s = time.time() - t0
        sampler.stop.set()
        sampler.join()
        for pid in tagged(tag):  # nothing of the job may outlive it
            os.kill(pid, 9)
        print(proc.stdout[-2000:], proc.stderr[-1500:] if proc.returncode else "", flush=True)
        ends = [e for e in read_job_log(store) if e.get("event") == "end"] if store.exists() else []
        end = ends[-1] if ends else {}
        report = {
            "command": " ".join(cmd), "returncode": proc.returncode, "status": end.get("status"),
            "finetune_bytes": ft_bytes, "base_bytes": base_bytes, "cap_bytes": args.cap if cgroup.path else None,
            "block_bytes": args.block_bytes, "workers": args.workers, "prune_seconds": round(prune_s, 1),
            "driver_peak_rss": end.get("driver_peak_rss"),
            "worker_peak_rss": {pid: w["peak_rss"] for pid, w in (end.get("workers") or {}).items()},
            "job_peak_rss_sum": sampler.peak_rss, "job_peak_anon_sum": sampler.peak_anon,
            "job_processes": sampler.procs, "cgroup": cgroup.stats(),
        }
        print(json.dumps(report, indent=1))
        print(f"\nfine-tune {gib(ft_bytes)} + base {gib(base_bytes)}; cap {gib(args.cap) if cgroup.path else 'none'}; "
              f"{args.workers} workers, blocks of {gib(args.block_bytes)}; {prune_s:.0f} s; status {end.get('status')}")
        for pid, rss in report["worker_peak_rss"].items():
            print(f"  worker pid {pid}: peak RSS {gib(rss)}")
        if report["driver_peak_rss"]:
            print(f"  driver: peak RSS {gib(report['driver_peak_rss'])}")
        print(f"  all {sampler.procs} processes of the job: peak summed RSS {gib(sampler.peak_rss)} "
              f"(anon {gib(sampler.peak_anon)})")
        if report["cgroup"]:
            print(f"  cgroup: peak usage incl. page cache {gib(report['cgroup']['peak'] or 0)}, "
                  f"OOM kills {report['cgroup']['oom_kills']}")
        return 0 if proc.returncode == 0 else 1
    finally:
        cgroup.remove()
        if not args.keep_files:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
