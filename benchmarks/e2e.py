"""End to end on one generated checkpoint, side by side: kernel alone vs the Ray pipeline.

    python benchmarks/e2e.py                                  # 477M-parameter bf16 pair (954 MB each), ~5 min
    python benchmarks/e2e.py --preset 7b --workers 2 --skip-kernel --workdir /big/disk
    python benchmarks/e2e.py --profile                        # + py-spy of every selection actor
    python benchmarks/e2e.py --skip-kernel --workers 2 --values int4 --rounds 2   # raw vs a codec, side by side

What it measures, all on the same generated fine-tune (benchmarks/make_checkpoint.py's generator):
- kernel: `select` (KEN) on exactly the pipeline's row blocks, in-process, one thread; reads untimed;
  then again in W processes at once (each on its share of the blocks, no Ray): the speed W cores of
  this machine give to the kernel alone, the pipeline's real ceiling (cores share caches, memory
  bandwidth and, on VMs, clocks: two kernels at once can each run slower than one alone).
- pipeline: `run_job` at each --workers count on a private local Ray (ray.init and shutdown timed
  apart from the job), each run from a cold page cache for the checkpoint's files.
- overhead: pipeline wall at W workers against kernel wall / W (target <= 1.3 at 2 workers), and,
  load-independent, the actors' CPU seconds against the kernel's CPU seconds.
- scaling: run_job wall at 1 worker / at 2 workers (target >= 1.8 on 2 cores), beside the same
  ratio for the kernel alone.
- reading: the fine-tune's bytes per pipeline second vs `cat` of the same files, cold (evicted with
  posix_fadvise(DONTNEED), which drops just these files and works without root) and warm.
- memory: peak RSS (VmHWM, sampled from /proc every 0.2 s) of the driver, each selection actor
  and Ray's own processes, and the peak of their sum.
- store: bytes vs the information bound (ken_dist.subnetwork.inspect.inspect_store).
- machine load: CPU seconds burnt by processes that are not ours during each run (/proc/stat minus
  our process tree), so that a missed target on a shared machine is visible as such.

- codec (--values CODEC): the same job with raw values and with CODEC, alternating (raw, codec,
  raw, codec, ... --rounds times) at the largest --workers count, each from a cold page cache:
  run_job wall and the actors' CPU seconds codec / raw (target <= 1.15), and the codec's store
  against the size it predicts (`predicted_bytes`): its layout before compression (bitmask, codes,
  scales; target <= 1), and the information bound of its codes and index plus the scales.

Each measured part runs in a child process (so the driver's peak RSS is the driver's own).
Results also go to WORKDIR/e2e.json.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SHAPE = dict(hidden=2048, intermediate=5632, layers=8, vocab=16000, heads=16, kv_heads=16)
TICK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- children
def _job(args, store: str):
    from ken_dist.job.plan import PruneParams
    from ken_dist.job.spec import FineTuneEntry, JobSpec

    params = PruneParams(keep=args.keep, values=args.child_values or "raw")
    return JobSpec(base=args.base, store=store, block_bytes=args.block_bytes,
                   finetunes=(FineTuneEntry("ft", args.ft, None, params),))


def child_kernel(args) -> dict:
    """select() on every planned block, in this process, one thread; reads are not timed."""
    import torch

    from ken_dist.checkpoints.reads import read_rows
    from ken_dist.job.plan import plan_finetune
    from ken_dist.kernel import STRATEGIES, select

    torch.set_num_threads(1)
    job = _job(args, "/nonexistent")
    base = job.open_base()
    plan = plan_finetune(base, job.open_finetunes()[0], block_bytes=job.block_bytes)
    units = [u for u in plan.units if u.action == "prune"]
    if args.part:  # "i/N": this process's share, balanced by entries (largest first to the lightest)
        i, n = map(int, args.part.split("/"))
        loads, mine = [0] * n, []
        for u in units:
            j = loads.index(min(loads))
            loads[j] += u.elements
            if j == i:
                mine.append(u)
        units = mine
    select("ken", torch.randn(4, 64), keep=0.25)  # load the compiled kernel first
    wall = cpu = 0.0
    rows = elements = 0
    for u in units:
        values = read_rows(u.ft_info, u.row_start, u.row_end)
        base_rows = read_rows(u.base_info, u.row_start, u.row_end) if STRATEGIES[u.params.strategy].needs_base else None
        t, c = time.perf_counter(), time.thread_time()
        select(u.params.strategy, values, base_rows, k=u.params.k, keep=u.params.keep, seed=u.seed,
               row_offset=u.row_start, compat=u.params.compat)
        wall += time.perf_counter() - t
        cpu += time.thread_time() - c
        rows += u.rows
        elements += u.elements
    return {"blocks": len(units), "rows": rows, "elements": elements, "wall": wall, "cpu": cpu}


def child_pipeline(args) -> dict:
    """ray.init, run_job, ray.shutdown, each timed; actor totals from the job log's end event."""
    import ray

    from ken_dist.job.log import read_job_log
    from ken_dist.runtime import run_job

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    t1 = time.perf_counter()
    result = run_job(_job(args, args.store), workers=args.workers, overwrite=True, quiet=True)
    t2 = time.perf_counter()
    ray.shutdown()
    t3 = time.perf_counter()
    end = [e for e in read_job_log(args.store) if e["event"] == "end"][-1]
    tot = collections.Counter()
    for w in end["workers"].values():  # what each actor's committed blocks recorded, summed by the driver
        tot.update({k: w[k] for k in ("seconds", "cpu_seconds", "read_seconds", "select_seconds", "rows", "blocks")})
    return {"ray_init": t1 - t0, "run_job": t2 - t1, "ray_shutdown": t3 - t2, "blocks": tot["blocks"],
            "startup": result.timings.get("startup_seconds"), "selection": result.timings.get("selection_seconds"),
            "actor_seconds": tot["seconds"], "actor_cpu": tot["cpu_seconds"], "actor_read": tot["read_seconds"],
            "actor_select": tot["select_seconds"], "rows": tot["rows"]}


# ----------------------------------------------------------------------------- process sampling
def _stat_cpu() -> float:
    """Busy CPU seconds of the whole machine so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / TICK


def _procs() -> dict[int, tuple[int, float]]:
    """{pid: (ppid, cpu seconds)} of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    s = f.read()
                fields = s[s.rindex(")") + 2:].split()
                out[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
            except (OSError, ValueError):
                pass
    return out


def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line[:5]] = int(line.split()[1]) * 1024
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            out["cmd"] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        pass
    return out


class Sampler(threading.Thread):
    """Peak RSS per process of a child's tree, peak of their sum, CPU of the tree, py-spy on actors."""

    def __init__(self, root: int, profile_dir: str | None = None):
        super().__init__(daemon=True)
        self.root, self.profile_dir = root, profile_dir
        self.peak: dict[int, dict] = {}
        self.cpu: dict[int, float] = {}
        self.sum_peak = 0
        self.spies: list[subprocess.Popen] = []
        self.spied: set[int] = set()
        self.stop = threading.Event()
        self.machine0 = _stat_cpu()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(0.2)

    def sample(self) -> None:
        procs = _procs()
        children = collections.defaultdict(list)
        for pid, (ppid, _) in procs.items():
            children[ppid].append(pid)
        tree, todo = [], [self.root]
        while todo:
            p = todo.pop()
            tree.append(p)
            todo += children.get(p, [])
        total = 0
        for pid in tree:
            st = _status(pid)
            if "VmRSS" not in st:
                continue
            total += st["VmRSS"]
            self.cpu[pid] = max(self.cpu.get(pid, 0.0), procs[pid][1])
            prev = self.peak.get(pid)
            if self.profile_dir and pid not in self.spied and "SelectionActor" in st.get("cmd", ""):
                self.spied.add(pid)
                out = os.path.join(self.profile_dir, f"spy_{pid}.txt")
                self.spies.append(subprocess.Popen(
                    ["py-spy", "record", "--pid", str(pid), "--rate", "50", "--format", "raw", "--nonblocking",
                     "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.peak[pid] = {"cmd": st.get("cmd", (prev or {}).get("cmd", "")),
                              "hwm": max(st.get("VmHWM", 0), (prev or {}).get("hwm", 0))}
        self.sum_peak = max(self.sum_peak, total)

    def finish(self) -> dict:
        self.stop.set()
        self.join()
        machine = _stat_cpu() - self.machine0
        ours = sum(self.cpu.values())
        for spy in self.spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.terminate()
        groups = {"driver": [], "actors": [], "ray": []}
        cpu = {"driver": 0.0, "actors": 0.0, "ray": 0.0}
        for pid, p in self.peak.items():
            kind = "driver" if pid == self.root else "actors" if "SelectionActor" in p["cmd"] else "ray"
            groups[kind].append(p["hwm"])
            cpu[kind] += self.cpu.get(pid, 0.0)
        return {"peak_driver": max(groups["driver"], default=0), "peak_actors": sorted(groups["actors"]),
                "peak_ray_max": max(groups["ray"], default=0), "peak_sum": self.sum_peak,
                "cpu_ours": ours, "cpu_others": max(0.0, machine - ours),
                "cpu_driver": cpu["driver"], "cpu_actors": cpu["actors"], "cpu_ray": cpu["ray"]}


def run_kernel_parallel(args, n: int) -> dict:
    """The kernel in n processes at once, each on its share of the blocks: what n cores of this
    machine give to the kernel alone (caches, memory bandwidth and clocks are shared)."""
    base = [sys.executable, os.path.abspath(__file__), "--child", "kernel", "--base", args.base, "--ft", args.ft,
            "--keep", str(args.keep), "--block-bytes", str(args.block_bytes)]
    procs = [subprocess.Popen(base + ["--part", f"{i}/{n}"], stdout=subprocess.PIPE, text=True) for i in range(n)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("parallel kernel child failed")
    return {"processes": n, "wall": max(o["wall"] for o in outs), "cpu": sum(o["cpu"] for o in outs),
            "rows": sum(o["rows"] for o in outs)}


def run_child(args, mode: str, extra: list[str], profile_dir: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--base", args.base, "--ft", args.ft,
           "--keep", str(args.keep), "--block-bytes", str(args.block_bytes), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid, profile_dir)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    mem = sampler.finish()
    if proc.returncode:
        raise SystemExit(f"{mode} child failed ({proc.returncode}): {' '.join(cmd)}")
    return {**json.loads(out.strip().splitlines()[-1]), **mem, "child_wall": wall}


# ----------------------------------------------------------------------------- reading
def evict(files: list[str]) -> None:
    """Drop these files from the page cache (dirty pages are written first)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cat_speed(files: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return sum(map(os.path.getsize, files)) / (time.perf_counter() - t)


def cached_fraction(files: list[str]) -> float | None:
    """Fraction of the files' bytes in the page cache (util-linux fincore), None if unavailable."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *files],
                             capture_output=True, text=True, check=True).stdout.split()
        return sum(map(int, out)) / sum(map(os.path.getsize, files))
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None


# ----------------------------------------------------------------------------- profile summary
PROFILE_BUCKETS = [  # first match wins, in this order
    ("kernel: sort_order (radix)", "sort_order"), ("kernel: bandwidths/grids (numpy)", "bandwidths"),
    ("kernel: bandwidths/grids (numpy)", "grids ("), ("kernel: widen + finite check", "as_float32_rows"),
    ("kernel: widen + finite check", "check_finite"), ("kernel: numba select_block", "ken_masks"),
    ("kernel: other", "ken_select"), ("store: encode (mask/values)", "encode_block"),
    ("store: parquet + zstd", "write_table"), ("store: fsync + rename", "atomic_write"),
    ("store: other", "write_block"), ("read rows", "read_rows"), ("process_unit other", "process_unit"),
]


def profile_summary(profile_dir: str) -> dict:
    counts, total = collections.Counter(), 0
    for path in glob.glob(os.path.join(profile_dir, "spy_*.txt")):
        with open(path) as f:
            for line in f:
                stack, _, n = line.rstrip().rpartition(" ")
                if not n.isdigit():
                    continue
                total += int(n)
                label = next((lab for lab, key in PROFILE_BUCKETS if key in stack),
                             "actor startup / ray (outside process_unit)")
                counts[label] += int(n)
    return {k: v / total for k, v in counts.most_common()} if total else {}


# ----------------------------------------------------------------------------- main
def _mb(x: float) -> str:
    return f"{x / 1e6:,.0f} MB"


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def main(argv=None) -> int:
    from ken_dist.cli.commands import byte_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/ken-e2e")
    p.add_argument("--preset", help="a shape from ken_dist.testing.synthetic.PRESETS instead of the default")
    for flag in ("hidden", "intermediate", "layers", "vocab", "heads", "kv-heads"):
        p.add_argument(f"--{flag}", type=int, dest=flag.replace("-", "_"))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--block-bytes", type=byte_size, default=None, help="work unit size (default: ken_dist's)")
    p.add_argument("--workers", default="1,2", help="comma list of worker counts to run (default 1,2)")
    p.add_argument("--skip-kernel", action="store_true", help="no in-process kernel pass")
    p.add_argument("--profile", action="store_true", help="py-spy every selection actor of the last run")
    p.add_argument("--clean", action="store_true", help="delete the workdir at the end")
    p.add_argument("--values", help="also run the job with this value codec beside raw (see the docstring)")
    p.add_argument("--rounds", type=int, default=2, help="raw/codec pairs with --values (default 2)")
    p.add_argument("--child", choices=("kernel", "pipeline"), help=argparse.SUPPRESS)
    p.add_argument("--child-values", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--ft", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        args.workers = int(args.workers.split(",")[0])
        out = child_kernel(args) if args.child == "kernel" else child_pipeline(args)
        print(json.dumps(out))
        return 0

    from ken_dist.job.plan import DEFAULT_BLOCK_BYTES
    from ken_dist.testing.synthetic import PRESETS, LlamaShape, write_pair

    args.block_bytes = args.block_bytes or DEFAULT_BLOCK_BYTES
    fields = dict(PRESETS[args.preset].__dict__) if args.preset else dict(DEFAULT_SHAPE)
    fields.update({k: getattr(args, k) for k in DEFAULT_SHAPE if getattr(args, k) is not None})
    shape = LlamaShape(**fields)
    os.makedirs(args.workdir, exist_ok=True)
    ckpt = os.path.join(args.workdir, "ckpt")
    marker = os.path.join(ckpt, "shape.json")
    want = {"shape": fields, "dtype": args.dtype}
    t = time.perf_counter()
    if not (os.path.exists(marker) and json.load(open(marker)) == want):
        shutil.rmtree(ckpt, ignore_errors=True)
        write_pair(ckpt, shape, dtype=args.dtype)
        with open(marker, "w") as f:
            json.dump(want, f)
        print(f"generated {shape.parameters():,}-parameter {args.dtype} pair in {time.perf_counter() - t:.1f} s",
              flush=True)
    args.base, args.ft = os.path.join(ckpt, "base"), os.path.join(ckpt, "finetune")
    files = sorted(glob.glob(os.path.join(args.ft, "*.safetensors")))
    ft_bytes = sum(map(os.path.getsize, files))
    res: dict = {"shape": fields, "dtype": args.dtype, "keep": args.keep, "block_bytes": args.block_bytes,
                 "params": shape.parameters(), "ft_bytes": ft_bytes, "cpus": os.cpu_count()}

    evict(files)
    res["cached_after_evict"] = cached_fraction(files)
    res["cat_cold"] = cat_speed(files)
    res["cat_warm"] = cat_speed(files)
    print(f"raw read of the fine-tune ({_mb(ft_bytes)}): cold {_mb(res['cat_cold'])}/s "
          f"(page cache after eviction: {res['cached_after_evict']}), warm {_mb(res['cat_warm'])}/s", flush=True)

    if not args.skip_kernel:
        res["kernel"] = run_child(args, "kernel", [])
        k = res["kernel"]
        print(f"kernel: {k['rows']:,} rows in {k['wall']:.1f} s wall / {k['cpu']:.1f} s CPU "
              f"(machine: {k['cpu_others']:.0f} CPU s used by others meanwhile)", flush=True)
    workers = [int(w) for w in str(args.workers).split(",") if w]
    if not args.skip_kernel and max(workers) > 1:
        res["kernel_parallel"] = kp = run_kernel_parallel(args, max(workers))
        print(f"kernel in {kp['processes']} processes at once: {kp['wall']:.1f} s wall (the slowest), "
              f"{kp['cpu']:.1f} s CPU", flush=True)
    if args.values:
        res["codec"] = run_codec_pairs(args, files, max(workers))
        report_codec(res["codec"])
        with open(os.path.join(args.workdir, "e2e.json"), "w") as f:
            json.dump(res, f, indent=1)
        return 0
    res["pipeline"] = {}
    for i, w in enumerate(workers):
        store = os.path.join(args.workdir, f"store-w{w}")
        shutil.rmtree(store, ignore_errors=True)
        evict(files)
        prof = os.path.join(args.workdir, f"profile-w{w}") if args.profile and i == len(workers) - 1 else None
        if prof:
            shutil.rmtree(prof, ignore_errors=True)
            os.makedirs(prof)
        r = run_child(args, "pipeline", ["--workers", str(w), "--store", store], prof)
        from ken_dist.subnetwork.inspect import inspect_store

        tot = inspect_store(store)["finetunes"]["ft"]["totals"]
        r["store"] = {k: tot[k] for k in ("bytes", "bound_bytes", "dense_bytes", "ratio", "vs_dense")}
        if prof:
            r["profile"] = profile_summary(prof)
        res["pipeline"][w] = r
        print(f"pipeline, {w} worker(s): run_job {r['run_job']:.1f} s (+ ray.init {r['ray_init']:.1f} s, "
              f"shutdown {r['ray_shutdown']:.1f} s); others used {r['cpu_others']:.0f} CPU s meanwhile", flush=True)

    report(res)
    with open(os.path.join(args.workdir, "e2e.json"), "w") as f:
        json.dump(res, f, indent=1)
    if args.clean:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


def predicted_bytes(manifest: dict, codec) -> tuple[float, float]:
    """What a codec's store should take, two ways, plus the tensors stored whole: (bound, layout).
    bound: per pruned block its information bound (codes and index, the manifest's bound_bytes)
    plus 2 bytes per scale (at most rows + kept / G); layout: the codec's arithmetic before any
    compression, a bitmask of ceil(n/8) bytes a row (the writer keeps a position list only when
    smaller), ceil(k b / 8) bytes of codes and the same scales."""
    bound = layout = 0.0
    for t in manifest["tensors"].values():
        for b in t["blocks"]:
            if t["action"] == "whole":
                bound += b["bytes"]
                layout += b["bytes"]
                continue
            rows = b["row_end"] - b["row_start"]
            scales = 2 * (rows + (b["kept"] / codec.group if codec.group else 0)) if b.get("values") else 0
            bound += b["bound_bytes"] + scales
            layout += rows * ((t["row_len"] + 7) // 8) + (b["kept"] * codec.bits + 7 * rows) / 8 + scales
    return bound, layout


def run_codec_pairs(args, files: list[str], w: int) -> dict:
    """run_job with raw and with --values alternately, from a cold page cache each time."""
    from ken_dist.store.codecs import parse_codec
    from ken_dist.store.protocol import Store
    from ken_dist.subnetwork.inspect import inspect_store

    codec = parse_codec(args.values)
    runs = {"raw": [], args.values: []}
    for i in range(args.rounds):
        for values in ("raw", args.values):
            store = os.path.join(args.workdir, f"store-{values}")
            shutil.rmtree(store, ignore_errors=True)
            evict(files)
            r = run_child(args, "pipeline", ["--workers", str(w), "--store", store, "--child-values", values])
            ft = inspect_store(store)["finetunes"]["ft"]
            r["stored_bytes"], r["bits_per_param"] = ft["stored_bytes"], ft["bits_per_param"]
            r["predicted_bound"], r["predicted_layout"] = predicted_bytes(Store(store).manifest("ft"), codec)
            runs[values].append(r)
            print(f"round {i + 1}, {values}: run_job {r['run_job']:.1f} s, actors {r['actor_cpu']:.1f} CPU s, "
                  f"others {r['cpu_others']:.0f} CPU s; store {_mb(r['stored_bytes'])}", flush=True)
    return {"workers": w, "codec": args.values, "runs": runs}


def report_codec(res: dict) -> None:
    raw, lossy = res["runs"]["raw"], res["runs"][res["codec"]]
    print(f"\n=== raw vs --values {res['codec']}, {res['workers']} worker(s), {len(raw)} alternating pair(s) ===")
    for i, (a, b) in enumerate(zip(raw, lossy)):
        print(f"pair {i + 1}: run_job {b['run_job'] / a['run_job']:.3f}x, actors' CPU {b['actor_cpu'] / a['actor_cpu']:.3f}x "
              f"(others used {a['cpu_others']:.0f} / {b['cpu_others']:.0f} CPU s)")
    wall = sum(b["run_job"] for b in lossy) / sum(a["run_job"] for a in raw)
    cpu = sum(b["actor_cpu"] for b in lossy) / sum(a["actor_cpu"] for a in raw)
    print(f"all pairs: run_job {wall:.3f}x, actors' CPU {cpu:.3f}x (target <= 1.15)")
    a, b = raw[-1], lossy[-1]
    print(f"store: raw {_mb(a['stored_bytes'])} ({a['bits_per_param']:.3f} bits/param), {res['codec']} "
          f"{_mb(b['stored_bytes'])} ({b['bits_per_param']:.3f} bits/param) = {b['stored_bytes'] / a['stored_bytes']:.3f}x raw; "
          f"{res['codec']} stored / predicted: {b['stored_bytes'] / b['predicted_layout']:.3f} of its layout "
          f"(bitmask + codes + scales; target <= 1), {b['stored_bytes'] / b['predicted_bound']:.3f} of its "
          "information bound + scales")


def report(res: dict) -> None:
    k, pipes = res.get("kernel"), res["pipeline"]
    rows = k["rows"] if k else next(iter(pipes.values()))["rows"]
    print(f"\n=== e2e: {res['params'] / 1e6:,.0f}M-parameter {res['dtype']} Llama-shaped pair "
          f"{res['shape']}, keep {res['keep']}, blocks of {res['block_bytes'] / 2**20:.0f} MiB, "
          f"{res['cpus']} CPUs ===")
    head = f"{'':36s}{'wall s':>8s}{'rows/s':>9s}{'MB/s':>8s}{'our CPU s':>11s}{'others CPU s':>14s}"
    print(head)
    print("-" * len(head))

    def line(label, sec, cpu, others):
        print(f"{label:36s}{sec:8.1f}{rows / sec:9.0f}{res['ft_bytes'] / sec / 1e6:8.1f}{cpu:11.1f}{others:14.0f}")

    kp = res.get("kernel_parallel")
    if k:
        line("kernel only (in-process, 1 thread)", k["wall"], k["cpu"], k["cpu_others"])
    if kp:
        line(f"kernel only, {kp['processes']} processes at once", kp["wall"], kp["cpu"], float("nan"))
    for w, r in pipes.items():
        line(f"pipeline {w}w: run_job", r["run_job"], r["actor_cpu"], float("nan"))
        line(f"pipeline {w}w: + ray.init, shutdown", r["ray_init"] + r["run_job"] + r["ray_shutdown"],
             r["cpu_ours"], r["cpu_others"])
    print(f"{'raw read (cat), cold / warm':36s}{'':17s}{res['cat_cold'] / 1e6:8.0f} / {res['cat_warm'] / 1e6:.0f} MB/s")
    print("(MB/s = fine-tune bytes read per second; our CPU = the actors' CPU inside units for run_job rows,\n"
          " the whole process tree for the + rows; others = CPU used by other processes on the machine)\n")
    for w, r in pipes.items():
        idle = r["run_job"] - r["actor_seconds"] / w
        msg = (f"{w} worker(s): actors busy {r['actor_seconds'] / w:.1f} s of run_job's {r['run_job']:.1f} s each "
               f"(startup, tail, gaps: {idle:.1f} s); cores the actors got: {r['actor_cpu'] / r['run_job']:.2f} of {w}")
        if r.get("startup") is not None:
            msg += (f"\n    run_job = start-up {r['startup']:.1f} s (validate, plan, actors start: "
                    f"a fixed cost) + selection {r['selection']:.1f} s (first block dispatched to last committed)"
                    f" + finalize {r['run_job'] - r['startup'] - r['selection']:.1f} s")
        if k:
            ideal = k["wall"] / w
            msg += (f"\n    overhead vs kernel/{w}: run_job {r['run_job'] / ideal:.2f}x (target <= 1.3 at 2)")
            if r.get("selection") is not None:
                msg += f", selection phase {r['selection'] / ideal:.2f}x"
            msg += (f", with ray init+shutdown {(r['run_job'] + r['ray_init'] + r['ray_shutdown']) / ideal:.2f}x; "
                    f"actor CPU / kernel CPU {r['actor_cpu'] / k['cpu']:.3f} (per-block cost beyond the kernel)")
            if kp and kp["processes"] == w:
                msg += (f"\n    vs the kernel in {w} processes at once (this machine's own {w}-core speed): run_job "
                        f"{r['run_job'] / kp['wall']:.2f}x, selection phase "
                        f"{(r.get('selection') or r['run_job']) / kp['wall']:.2f}x")
        print(msg)
    if 1 in pipes and 2 in pipes:
        a, b = pipes[1], pipes[2]
        msg = (f"scaling 1 -> 2 workers: run_job {a['run_job'] / b['run_job']:.2f}x (target >= 1.8)")
        if a.get("selection") and b.get("selection"):
            msg += f", selection phase {a['selection'] / b['selection']:.2f}x"
        msg += (f"; CPU per row at 2 workers / at 1: {b['actor_cpu'] / a['actor_cpu']:.3f} "
                f"(1.000 = the workers do not slow each other)")
        if k and kp and kp["processes"] == 2:
            msg += (f"\n    the kernel alone, 1 process -> 2 at once: {k['wall'] / kp['wall']:.2f}x "
                    f"(CPU per row {kp['cpu'] / k['cpu']:.3f}): the ceiling this machine sets")
        print(msg)
    for w, r in pipes.items():
        print(f"CPU s of the whole run, {w} worker(s): driver process {r['cpu_driver']:.1f} (ray.init included), "
              f"selection actors {r['cpu_actors']:.1f}, Ray's own processes {r['cpu_ray']:.1f}")
    for w, r in pipes.items():
        print(f"peak RSS, {w} worker(s): driver {_gib(r['peak_driver'])}, actors "
              f"{', '.join(_gib(x) for x in r['peak_actors'])}, largest other Ray process {_gib(r['peak_ray_max'])}, "
              f"all together {_gib(r['peak_sum'])}")
    s = next(iter(pipes.values()))["store"]
    print(f"store: {_mb(s['bytes'])} = {s['vs_dense']:.3f} x dense ({_mb(s['dense_bytes'])}), "
          f"{s['ratio']:.3f} x the information bound ({_mb(s['bound_bytes'])})")
    for w, r in pipes.items():
        if r.get("profile"):
            print(f"py-spy of the selection actors ({w} workers), share of samples:")
            for label, frac in r["profile"].items():
                print(f"  {100 * frac:5.1f}%  {label}")


if __name__ == "__main__":
    sys.exit(main())
