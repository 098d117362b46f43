"""Rows/s of every KEN selection path and of the literal test oracle, side by side, one thread.

    python benchmarks/kernel_speed.py [--rows 64] [--oracle-rows 1] [--paths cpu,torch]

Rows are Gaussian with a few outliers (fine-tuned weight-like); every path is timed on the same
rows after a warm-up (numba compilation excluded), and its masks are checked equal to the CPU
path's. The ratio column is path rows/s divided by oracle rows/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import oracle  # noqa: E402

from ken_dist import ken_select  # noqa: E402
from ken_dist.kernel.ken_cpu import sort_order  # noqa: E402

SHAPES = [(4096, 2048), (4096, 512), (768, 384), (14336, 4096)]


def make_rows(r: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((r, n)) * 0.02
    outliers = rng.random((r, n)) < 0.002
    rows[outliers] *= 20
    return rows.astype(np.float32)


def time_path(rows: np.ndarray, k: int, device: str) -> tuple[float, torch.Tensor]:
    ken_select(rows[:2], k=k, device=device)  # warm-up: compile / allocate
    start = time.perf_counter()
    mask = ken_select(rows, k=k, device=device)
    return rows.shape[0] / (time.perf_counter() - start), mask


def numpy_sort_order(rows: np.ndarray) -> np.ndarray:
    """The CPU path's sort stage before the radix sort: (value key << 32 | index) uint64 keys
    sorted by numpy, kept here as the baseline it is measured against."""
    bits = rows.view(np.uint32).copy()
    bits[bits == 0x80000000] = 0
    bits ^= (bits.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    keys = (bits.astype(np.uint64) << np.uint64(32)) | np.arange(rows.shape[1], dtype=np.uint64)[None, :]
    keys.sort(axis=1)
    return (keys & np.uint64(0xFFFFFFFF)).view(np.int64)


def sort_stage(rows: np.ndarray) -> tuple[float, float]:
    """(us per row) of the radix sort_order and of the numpy baseline, same rows, results checked equal."""
    sort_order(rows[:2])  # compiled
    t0 = time.perf_counter()
    radix = sort_order(rows)
    t1 = time.perf_counter()
    baseline = numpy_sort_order(rows)
    t2 = time.perf_counter()
    if not np.array_equal(radix, baseline):
        raise SystemExit("radix sort_order disagrees with the numpy baseline")
    return (t1 - t0) / rows.shape[0] * 1e6, (t2 - t1) / rows.shape[0] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="rows timed per shape for the fast paths")
    parser.add_argument("--oracle-rows", type=int, default=1, help="rows timed per shape for the oracle (0: skip it)")
    parser.add_argument("--paths", default="cpu,torch", help="comma list of: cpu, torch")
    parser.add_argument("--shapes", default=None, help="e.g. 4096x2048,768x384 (default: the four standard shapes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    paths = [p for p in args.paths.split(",") if p]

    print(f"one thread; {args.rows} rows per fast path, {args.oracle_rows} per oracle; numpy {np.__version__}, torch {torch.__version__}")
    header = f"{'n':>6} {'k':>5} {'path':>8} {'rows/s':>11} {'ms/row':>9} {'x oracle':>9}"
    print(header)
    print("-" * len(header))
    for n, k in shapes:
        rows = make_rows(args.rows, n, seed=n + k)
        oracle_rate = oracle_mask = None
        if args.oracle_rows:  # 0: skip the oracle (minutes per row at n = 28672)
            start = time.perf_counter()
            for v in rows[: args.oracle_rows]:
                oracle_mask = oracle.index_mask(v, k)
            oracle_rate = args.oracle_rows / (time.perf_counter() - start)
            print(f"{n:>6} {k:>5} {'oracle':>8} {oracle_rate:>11.2f} {1e3 / oracle_rate:>9.2f} {1.0:>9.1f}")
        reference = None
        for path in paths:
            device = "cpu" if path == "cpu" else "torch"
            rate, mask = time_path(rows, k, device)
            if reference is None:
                reference = mask
                if oracle_mask is not None and not np.array_equal(mask[args.oracle_rows - 1].numpy(), oracle_mask):
                    raise SystemExit(f"{path} path disagrees with the oracle at ({n}, {k})")
            elif not torch.equal(mask, reference):
                raise SystemExit(f"{path} path disagrees with the cpu path at ({n}, {k})")
            ratio = f"{rate / oracle_rate:>9.0f}" if oracle_rate else f"{'-':>9}"
            print(f"{n:>6} {k:>5} {path:>8} {rate:>11.1f} {1e3 / rate:>9.3f} {ratio}")
        if "cpu" in paths:
            radix_us, numpy_us = sort_stage(rows)
            print(f"{'':>12} sort stage of the cpu path: radix {radix_us:.1f} us/row, numpy uint64 sort (before) "
                  f"{numpy_us:.1f} us/row: {numpy_us / radix_us:.2f}x")


if __name__ == "__main__":
    main()
