"""Where a KEN row's time goes, per row family: the CPU path's stages and its literal fix-ups.

    python benchmarks/kernel_stages.py [--rows 16] [--shapes 4096x2048] [--baseline REV] [--unlisted] [--families A,B]

For each family of benchmarks/kernel_speed.py: ms/row (this thread's CPU time, median of 3) of
the row's sort (radix), the density estimates (`density_estimates`), the visit order from them
(`_order_by_density`: roundings, open intervals, literal sums, the sort by rounded density;
revisions with `_visit_order_of` but without that split: both in the density column; before it:
`_rounded_density`, then `_visit_order`), the greedy match, the literal O(n) fix-ups per row (grid points whose
rounding, or since `_visit_order_of` whose order, the estimate's bound left open; since
2026-11-30 followed by the second looks per row in parentheses: points whose order the box
expansions summed at the point alone were asked to settle first), the grid points per
bandwidth (h / grid step) and the largest possible density 1/(h sqrt(2 pi)).
--baseline REV does the same for git revision REV's ken_numba.py; its fix-ups are counted by
its `_visit_order_of` where it has one, else by a copy of its `_rounded_density` whose
literal-sum branch also counts (the text of commit 671fadb and its predecessors; other
revisions print "-").
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["NUMBA_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
from kernel_speed import family_rows  # noqa: E402

from ken_dist.kernel import ken_cpu, ken_numba  # noqa: E402

LITERAL = "            out[j] = np.rint(exact_density(values, np.float64(grid[j]), h))\n    return out\n"


def load_revision(rev: str, count_fixups: bool):
    """git revision rev's ken_numba.py as a module; with count_fixups, its _rounded_density
    returns (densities, literal fix-ups) instead, or None where the text does not match."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:ken_dist/kernel/ken_numba.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout.replace("cache=True", "cache=False")
    if count_fixups:
        if LITERAL not in source or "    for j in range(k):\n        f = acc[j] / norm" not in source:
            return None
        source = (source.replace("        return out\n", "        return out, -1\n")
                  .replace("    for j in range(k):\n        f = acc[j] / norm",
                           "    fixups = 0\n    for j in range(k):\n        f = acc[j] / norm")
                  .replace(LITERAL, LITERAL.replace("    return out\n", "            fixups += 1\n    return out, fixups\n")))
    path = Path(tempfile.mkdtemp(prefix="ken_stages_")) / f"ken_numba_{'count' if count_fixups else 'rev'}.py"
    path.write_text(source)
    sys.path.insert(0, str(path.parent))
    import importlib

    return importlib.import_module(path.stem)


def visit_fixups(module):
    """Literal sums per row of a revision with `_visit_order_of` (its second value), and since
    2026-11-30 its second looks per row (its third) as "literal (looks)"."""
    def count(rows, sorted64, grids, h) -> str:
        runs = [module._visit_order_of(rows[i], sorted64[i], grids[i], h[i]) for i in range(rows.shape[0])]
        literal = f"{np.mean([run[1] for run in runs]):.1f}"
        return literal if len(runs[0]) < 3 else f"{literal} ({np.mean([run[2] for run in runs]):.1f})"
    return count


def stage_ms(fn, r: int) -> float:
    fn()
    times = []
    for _ in range(3):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return sorted(times)[1] / r * 1e3


def profile(module, fixups, rows: np.ndarray, k: int) -> list[str]:
    r = rows.shape[0]
    h = ken_cpu.bandwidths(rows)
    grids = ken_cpu.grids(rows, k)
    order = ken_cpu.sort_order(rows)
    ordered = [rows[i][order[i]] for i in range(r)]
    sorted64 = [v.astype(np.float64) for v in ordered]
    if hasattr(module, "_order_by_density"):
        estimates = [module.density_estimates(rows[i], sorted64[i], grids[i], h[i]) for i in range(r)]
        visits = [module._order_by_density(rows[i], grids[i], h[i], *estimates[i])[0] for i in range(r)]
        out = [stage_ms(lambda: [module.density_estimates(rows[i], sorted64[i], grids[i], h[i]) for i in range(r)], r),
               stage_ms(lambda: [module._order_by_density(rows[i], grids[i], h[i], *estimates[i]) for i in range(r)],
                        r)]
    elif hasattr(module, "_visit_order_of"):
        visits = [module._visit_order_of(rows[i], sorted64[i], grids[i], h[i])[0] for i in range(r)]
        out = [stage_ms(lambda: [module._visit_order_of(rows[i], sorted64[i], grids[i], h[i]) for i in range(r)], r),
               None]  # in the density column
    else:
        density = [module._rounded_density(rows[i], sorted64[i], grids[i], h[i]) for i in range(r)]
        visits = [module._visit_order(d) for d in density]
        out = [stage_ms(lambda: [module._rounded_density(rows[i], sorted64[i], grids[i], h[i]) for i in range(r)], r),
               stage_ms(lambda: [module._visit_order(d) for d in density], r)]
    out.insert(0, stage_ms(lambda: ken_cpu.sort_order(rows), r))  # today's sort, for every revision
    out.append(stage_ms(lambda: [module.greedy_match(ordered[i], order[i], grids[i], visits[i]) for i in range(r)], r))
    fix = fixups(rows, sorted64, grids, h) if fixups else None
    return ["-" if x is None else f"{x:.3f}" for x in out] + ["-" if fix is None else fix]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--shapes", default="4096x2048")
    parser.add_argument("--baseline", default=None, help="git revision whose ken_numba.py is profiled too")
    parser.add_argument("--families", default=None, help="comma list of family names (default: all listed)")
    parser.add_argument("--unlisted", action="store_true", help="also kernel_speed.py's unlisted families")
    args = parser.parse_args()
    wanted = None if args.families is None else set(args.families.split(","))
    kernels = {"today": (ken_numba, visit_fixups(ken_numba))}
    if args.baseline:
        counting = load_revision(args.baseline, count_fixups=True)

        def baseline_fixups(rows, sorted64, grids, h):
            return f"{np.mean([counting._rounded_density(rows[i], sorted64[i], grids[i], h[i])[1] for i in range(rows.shape[0])]):.1f}"
        module = load_revision(args.baseline, count_fixups=False)
        kernels[args.baseline] = (module, baseline_fixups if counting is not None
                                  else visit_fixups(module) if hasattr(module, "_visit_order_of") else None)
    print(f"{'n':>6} {'k':>5} {'code':>8} {'family':>15} {'sort':>6} {'density':>8} {'visit':>6} {'greedy':>7} "
          f"{'fix-ups/row (looks)':>19} {'h/step':>6} {'max density':>11}")
    for n, k in [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]:
        for name, rows in family_rows(args.rows, n, seed=n + k, unlisted=args.unlisted).items():
            if wanted is not None and name not in wanted:
                continue
            if isinstance(rows, str):
                print(f"{n:>6} {k:>5} {name}: {rows}")
                continue
            h = float(np.median(ken_cpu.bandwidths(rows)))
            step = float(np.median((rows.max(axis=1) - rows.min(axis=1)) / (k - 1)))
            for label, (module, fixups) in kernels.items():
                sort, density, visit, greedy, fix = profile(module, fixups, rows, k)
                print(f"{n:>6} {k:>5} {label:>8} {name:>15} {sort:>6} {density:>8} {visit:>6} {greedy:>7} {fix:>19} "
                      f"{h / step:>6.0f} {1 / (h * math.sqrt(2 * math.pi)):>11.3g}")


if __name__ == "__main__":
    main()
