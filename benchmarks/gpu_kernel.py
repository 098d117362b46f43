"""KEN's torch path on a device: exactness on the golden rows, rows/s at LLM shapes, ratio to the CPU path.

    python benchmarks/gpu_kernel.py [--device cuda|cpu] [--rows N] [--cpu-rows M]
                                    [--shapes 4096x2048,14336x4096] [--dtype float32|bfloat16]

(a) Every golden row (shared/golden/ken_reference_v1.npz, or $KEN_GOLDEN) goes through
    ken_select on the device, index and reference masks; any mismatch exits with status 1.
(b) Rows/s of the torch path per shape: fine-tuned-weight-like rows (Gaussian, 0.2% outliers),
    one warm-up call, then one timed call on --rows rows, bracketed by torch.cuda.synchronize.
    A per-stage breakdown (bandwidth+grid, density, visit sort, greedy) of the first batch follows.
(c) Rows/s of the CPU (numba) path on the first --cpu-rows of the same rows, measured in the same
    run, the ratio, and a check that both paths give identical masks on those rows.

(d) Switching fine-tunes on the device (--switch 7b): a model of Llama-2-7B's shape with bf16
    parameters on the device and 8 resident fine-tunes (random kept entries at --switch-keep, in
    the Switcher's decoded form, on the device or with --switch-pinned in pinned host memory),
    cycling Switcher.use against the bare index_copy_ of the same entries (switch_speed.py's
    bare_scatter), both bracketed by torch.cuda.synchronize. The decoding (cold) path is
    measured on the CPU by switch_speed.py. --switch tiny runs the same code on a small shape.

On --device cpu the torch path runs on the CPU (the "torch" device of ken_select); use small
--rows there. Target on an H200: >= 100k rows/s at 4096x2048.
"""
from __future__ import annotations

import argparse
import collections
import os
import time
from pathlib import Path

import numpy as np
import torch

from ken_dist import ken_select
from ken_dist.kernel import ken_torch, ken_torch_density, ken_torch_greedy

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("KEN_GOLDEN", ROOT.parent / "shared" / "golden" / "ken_reference_v1.npz"))


def label(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_rows(r: int, n: int, seed: int, dtype: str, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = torch.randn((r, n), generator=gen, device=device) * 0.02
    outliers = torch.rand((r, n), generator=gen, device=device) < 0.002
    rows = torch.where(outliers, rows * 20, rows)
    if dtype == "bfloat16":
        rows = rows.to(torch.bfloat16).float()
    return rows


def check_golden(device: str) -> int:
    data = np.load(GOLDEN)
    groups = collections.defaultdict(list)
    for i in range(int(data["n_cases"])):
        groups[(data[f"values_{i}"].size, int(data[f"k_{i}"]))].append(i)
    bad = 0
    start = time.perf_counter()
    for (n, k), ids in groups.items():
        rows = torch.from_numpy(np.stack([data[f"values_{i}"] for i in ids]))
        mask = ken_select(rows, k=k, device=device).cpu().numpy()
        ref = ken_select(rows, k=k, compat="reference", device=device).cpu().numpy()
        for i, m, rm in zip(ids, mask, ref):
            greedy = data[f"greedy_{i}"]
            ok = m.sum() == min(k, n) and np.array_equal(rm, data[f"mask_{i}"])
            ok = ok and (not greedy.size or np.array_equal(np.flatnonzero(m), np.sort(greedy)))
            if not ok:
                bad += 1
                print(f"  golden row {i} (n={n}, k={k}, {data[f'family_{i}']}) differs")
    print(f"(a) golden rows, torch path on {label(device)}: {int(data['n_cases']) - bad}/{int(data['n_cases'])} exact "
          f"({time.perf_counter() - start:.1f} s)")
    return bad


def breakdown(x: torch.Tensor, k: int, device: str) -> str:
    """Seconds per stage of ken_torch.select_indices on one batch."""
    times = {}

    def stage(name, fn, *args):
        sync(device)
        t0 = time.perf_counter()
        out = fn(*args)
        sync(device)
        times[name] = time.perf_counter() - t0
        return out

    h = stage("bandwidth", ken_torch.bandwidths, x)
    g = stage("grid", ken_torch.grids, x, k)
    visit = stage("density and visit order", ken_torch_density.visit_order, x, g, h)
    stage("greedy", ken_torch_greedy.greedy_match, x, g, visit)
    total = sum(times.values())
    return ", ".join(f"{name} {t:.3f}s ({100 * t / total:.0f}%)" for name, t in times.items())


def bench_shape(n: int, k: int, args, device: str) -> None:
    x = make_rows(args.rows, n, seed=n + k, dtype=args.dtype, device="cuda" if device == "cuda" else "cpu")
    ken_select(x[: min(64, args.rows)], k=k, device=device)  # warm-up: allocator, kernels, caches
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    mask = ken_select(x, k=k, device=device)
    sync(device)
    seconds = time.perf_counter() - t0
    rate = args.rows / seconds
    batch = ken_torch._rows_per_batch(n, k, x.device)
    mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""
    print(f"(b) {n}x{k}: torch path on {label(device)}: {rate:,.1f} rows/s ({args.rows} rows in {seconds:.2f} s, "
          f"batches of <= {batch}{mem})")
    first = x[: min(args.rows, batch)]
    print(f"    stages on {first.shape[0]} rows: {breakdown(first, k, device)}")

    m = min(args.cpu_rows, args.rows)
    cpu_rows = x[:m].cpu().numpy()
    ken_select(cpu_rows[:2], k=k)  # numba compile / cache load
    t0 = time.perf_counter()
    cpu_mask = ken_select(cpu_rows, k=k)
    cpu_rate = m / (time.perf_counter() - t0)
    same = torch.equal(cpu_mask, mask[:m].cpu())
    print(f"(c) {n}x{k}: CPU path {cpu_rate:,.1f} rows/s on {m} rows (torch threads {torch.get_num_threads()}); "
          f"torch path on {label(device)} / CPU path = {rate / cpu_rate:.3g}x; masks identical: {same}")
    if not same:
        raise SystemExit(f"torch path on {device} differs from the CPU path at {n}x{k}")


def bench_switch(preset: str, device: str, keep: float, finetunes: int, cycles: int, pinned: bool) -> None:
    import statistics
    import tempfile

    from switch_speed import bare_scatter

    from ken_dist import Switcher
    from ken_dist.store.protocol import Store
    from ken_dist.subnetwork.switcher import Entries, Resident
    from ken_dist.testing.synthetic import PRESETS

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    model = torch.nn.Module()
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, shape in PRESETS[preset].tensors():
        model.register_parameter(name.replace(".", "_"), torch.nn.Parameter(
            torch.randn(shape, generator=gen, device=dev).to(torch.bfloat16), requires_grad=False))
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        switcher = Switcher(model, Store(tmp, create=True), pinned=pinned)
        for i in range(finetunes):  # what decode_finetune builds, drawn at random on the device
            tensors = {}
            for name, p in model.named_parameters():
                rows = p.reshape(p.shape[0], -1)
                chosen = torch.rand(rows.shape, generator=gen, device=dev) < keep
                values = torch.randn(int(chosen.sum()), generator=gen, device=dev).to(torch.bfloat16)
                tensors[name] = Entries.from_keep(chosen, values).to(dev, pinned=pinned and dev.type == "cuda")
            switcher._residents[f"task{i}"] = Resident(f"task{i}", tensors, stored_bytes=0)
        names = [f"task{i}" for i in range(finetunes)]
        switcher.use(names[0])
        for name in names[1:] + names[:1]:  # warm-up: allocates the saved-value and index buffers
            switcher.use(name)
        res, bare = [], []
        for _ in range(cycles):
            for name in names[1:] + names[:1]:
                prev = switcher._residents[switcher.active]
                sync(device)
                t0 = time.perf_counter()
                switcher.use(name)
                sync(device)
                res.append(time.perf_counter() - t0)
                bare.append(bare_scatter(model, prev, switcher._residents[name], sync=lambda: sync(device)))
        kept = statistics.median(r.entries for r in switcher._residents.values())
        where = "pinned host memory" if pinned and dev.type == "cuda" else str(dev)
        print(f"switch on {dev} ({preset}: {params / 1e6:,.0f}M bf16 params, {finetunes} fine-tunes resident in "
              f"{where}, keep {keep}, {kept / 1e6:.0f}M kept entries each): Switcher.use median "
              f"{statistics.median(res) * 1e3:.1f} ms, bare index_copy_ of the same entries "
              f"{statistics.median(bare) * 1e3:.1f} ms, ratio {statistics.median(res) / statistics.median(bare):.2f} "
              f"({len(res)} switches)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=None, help="rows timed per shape (default 131072 on cuda, 16 on cpu)")
    parser.add_argument("--cpu-rows", type=int, default=32, help="rows timed on the CPU path per shape")
    parser.add_argument("--shapes", default="4096x2048,14336x4096")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16: rows rounded to bf16 (repeated values, like bf16 checkpoints)")
    parser.add_argument("--skip-golden", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--switch", choices=["7b", "tiny", "none"], default=None,
                        help="(d) fine-tune switching at this shape (default 7b on cuda, tiny on cpu)")
    parser.add_argument("--switch-keep", type=float, default=0.25)
    parser.add_argument("--switch-finetunes", type=int, default=8)
    parser.add_argument("--switch-cycles", type=int, default=2)
    parser.add_argument("--switch-pinned", action="store_true", help="resident fine-tunes in pinned host memory")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is false")
    device = "cuda" if args.device == "cuda" else "torch"
    if args.rows is None:
        args.rows = 131072 if device == "cuda" else 16
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"device: {where}; torch {torch.__version__}; numpy {np.__version__}")
    failed = 0 if args.skip_golden else check_golden(device)
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        bench_shape(n, k, args, device)
    switch = args.switch or ("7b" if device == "cuda" else "tiny")
    if switch != "none":
        bench_switch(switch, device, args.switch_keep, args.switch_finetunes, args.switch_cycles, args.switch_pinned)
    if failed:
        raise SystemExit(f"{failed} golden rows differ on {device}")


if __name__ == "__main__":
    main()
