"""The whole pipeline with one GPU actor: a generated Llama-shaped pair pruned by `run_job` on a
private local Ray whose cluster has num_gpus=1, then one layer checked against the kernel.

    python benchmarks/gpu_pipeline.py --device cuda                  # on a GPU node: 7B-shaped pair
    python benchmarks/gpu_pipeline.py --device cuda --preset 10b --workdir /nvme/gpu-e2e
    python benchmarks/gpu_pipeline.py --device cpu                   # anywhere: tiny shape, fake GPU

--device cuda: Ray sees the real GPU; the pool places one GPU actor (1 GPU + 1 CPU), which runs
the torch/CUDA path. --device cpu: the cluster *declares* num_gpus=1 (a fake resource), so the
same GPU placement, scheduling and store path run here; inside the actor torch sees no CUDA and
the actor falls back to the CPU kernel, which the script reports (device per worker, from the
job log). Either way the pruned layer must equal torch.where(ken_select(ft), ft, base) bit for
bit, with ken_select run in this process on --device (the torch path when cuda).

Reports: ray.init / run_job / shutdown seconds, rows/s and GB/s of fine-tune read, the device each
actor used, peak GPU memory (nvidia-smi, sampled) when there is a GPU, the in-process kernel on
the checked layer for comparison, and the store's size.
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

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

TINY = dict(hidden=512, intermediate=1376, layers=2, vocab=4096, heads=8, kv_heads=8)


class GpuMemory(threading.Thread):
    """Peak memory.used of GPU 0 from nvidia-smi, sampled every second (None without nvidia-smi)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = None, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                self.peak = max(self.peak or 0, int(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self.stop.wait(1.0)


def worker_devices(store: str) -> dict:
    """{pid: "device, GPUs Ray assigned"} of the last run, from the job log when this ken_dist writes one."""
    path = os.path.join(store, "jobs.jsonl")
    if not os.path.exists(path):
        return {}
    ends = [json.loads(line) for line in open(path) if '"end"' in line]
    return {pid: f"{w.get('device')}, gpu_ids {w.get('gpu_ids')}"
            for pid, w in (ends[-1].get("workers") or {}).items()} if ends else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--preset", help="ken_dist.testing.synthetic.PRESETS name (default: 7b on cuda, a tiny shape on cpu)")
    p.add_argument("--workdir", default="/tmp/ken-gpu-pipeline")
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    p.add_argument("--layer", type=int, default=0, help="layer whose tensors are checked")
    p.add_argument("--clean", action="store_true", help="delete the workdir at the end")
    args = p.parse_args(argv)

    import ray
    import torch

    from ken_dist import ken_select
    from ken_dist.checkpoints.inventory import open_checkpoint
    from ken_dist.checkpoints.reads import read_tensor
    from ken_dist.job.plan import PruneParams
    from ken_dist.job.spec import FineTuneEntry, JobSpec
    from ken_dist.runtime import run_job
    from ken_dist.subnetwork.inspect import inspect_store
    from ken_dist.subnetwork.view import open_subnetwork
    from ken_dist.testing.synthetic import PRESETS, LlamaShape, write_pair

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; use --device cpu to dry-run here")
    shape = PRESETS[args.preset or "7b"] if (args.preset or args.device == "cuda") else LlamaShape(**TINY)
    ckpt = os.path.join(args.workdir, "ckpt")
    marker = os.path.join(ckpt, "shape.json")
    if not (os.path.exists(marker) and json.load(open(marker)) == shape.__dict__):
        shutil.rmtree(ckpt, ignore_errors=True)
        t = time.perf_counter()
        write_pair(ckpt, shape, threads=min(8, os.cpu_count() or 1))
        json.dump(shape.__dict__, open(marker, "w"))
        print(f"generated a {shape.parameters() / 1e9:.2f}B-parameter bf16 pair in {time.perf_counter() - t:.0f} s",
              flush=True)
    base_dir, ft_dir = os.path.join(ckpt, "base"), os.path.join(ckpt, "finetune")
    store = os.path.join(args.workdir, "store")
    shutil.rmtree(store, ignore_errors=True)
    job = JobSpec(base=base_dir, store=store,
                  finetunes=(FineTuneEntry("ft", ft_dir, None, PruneParams(keep=args.keep)),))

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus or os.cpu_count(), num_gpus=1, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    t1 = time.perf_counter()
    gpu_mem = GpuMemory()
    if args.device == "cuda":
        gpu_mem.start()
    run_job(job, workers=1, overwrite=True, quiet=True)  # workers=1 on a cluster with a GPU: one GPU actor
    t2 = time.perf_counter()
    gpu_mem.stop.set()
    ray.shutdown()
    t3 = time.perf_counter()

    ft = open_checkpoint(ft_dir)
    rows = sum(i.row_geometry[0] for i in ft.tensors.values())
    ft_bytes = sum(os.path.getsize(f) for f in ft.files)
    devices = worker_devices(store)
    tot = inspect_store(store)["finetunes"]["ft"]["totals"]
    print(f"shape {shape}: {shape.parameters() / 1e9:.2f}B parameters, {ft_bytes / 1e9:.2f} GB fine-tune")
    print(f"ray.init {t1 - t0:.1f} s, run_job {t2 - t1:.1f} s ({rows / (t2 - t1):,.0f} rows/s, "
          f"{ft_bytes / (t2 - t1) / 1e9:.2f} GB/s of fine-tune), shutdown {t3 - t2:.1f} s")
    print(f"actors and the device they ran on: {devices or 'no job log in this ken_dist version'}"
          + ("" if args.device == "cuda" else "  (cpu: a fake GPU resource; the actor falls back to the CPU kernel)"))
    if gpu_mem.peak is not None:
        print(f"peak GPU memory used (nvidia-smi): {gpu_mem.peak / 1024:.1f} GiB")
    print(f"store {tot['bytes'] / 1e9:.3f} GB = {tot['vs_dense']:.3f} x dense, {tot['ratio']:.3f} x the information bound")

    # One layer, bit for bit against the kernel run here on the same device.
    base = open_checkpoint(base_dir)
    names = [n for n in ft.tensors if n.startswith(f"model.layers.{args.layer}.") and len(ft.tensors[n].shape) == 2]
    ok, kernel_s, kernel_rows = True, 0.0, 0
    with open_subnetwork(store, "ft") as sub:
        for name in names:
            f_t, b_t = read_tensor(ft.tensors[name]), read_tensor(base.tensors[name])
            rows_dev = f_t.to(args.device)
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            mask = ken_select(rows_dev, keep=args.keep, device=args.device)
            if args.device == "cuda":
                torch.cuda.synchronize()
            kernel_s += time.perf_counter() - t
            kernel_rows += f_t.shape[0]
            expected = torch.where(mask.cpu(), f_t, b_t)
            same = torch.equal(sub.get_tensor(name), expected)
            ok &= same
            print(f"  {name} {list(f_t.shape)}: {'bit-exact' if same else 'MISMATCH'}")
    print(f"layer {args.layer}: {'all bit-exact' if ok else 'MISMATCH'}; in-process kernel on {args.device}: "
          f"{kernel_rows / kernel_s:,.0f} rows/s on these {kernel_rows:,} rows")
    if args.clean:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
