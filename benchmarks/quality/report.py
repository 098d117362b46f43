"""Markdown table and plot of the quality benchmark from results/cells.jsonl (see run.py)."""
from __future__ import annotations

import json
from collections import defaultdict

import common
import numpy as np
from common import RESULTS, task_description, task_suffix

REFS = ("full fine-tune", "base + head")


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _spread(vals: list[float], pct: bool = True) -> str:
    m = 100 * np.mean(vals) if pct else np.mean(vals)
    if len(vals) == 1:
        return f"{m:.2f}"
    lo, hi = (100 * min(vals), 100 * max(vals)) if pct else (min(vals), max(vals))
    return f"{m:.2f} ({lo:.1f}-{hi:.1f})"


def recipe(c: dict) -> str:
    """A cell's strategy with its value codec when not raw ("magnitude-model +int4")."""
    values = c.get("values", "raw")
    return c["strategy"] + ("" if values == "raw" else f" +{values}")


def bits_per_param(c: dict, finetune_params: int | None) -> tuple[float | None, bool]:
    """(bits per parameter, measured): cells from before the bits axis have only their part files'
    bytes: those are divided by the fine-tune's parameter count, manifest not counted."""
    if c.get("bits_per_param") is not None:
        return c["bits_per_param"], True
    if c.get("stored_bytes") and finetune_params:
        return 8 * c["stored_bytes"] / finetune_params, False
    return None, False


def aggregate(cells: list[dict]) -> tuple[dict, list[int]]:
    groups = defaultdict(list)
    for c in cells:
        groups[(recipe(c), c.get("keep"), c.get("preset"))].append(c)
    seeds = sorted({c["seed"] for c in cells})
    return groups, seeds


def write_report(cells: list[dict]) -> None:
    if not cells:
        print("no cells yet")
        return
    groups, seeds = aggregate(cells)
    full = [c for c in cells if c["strategy"] == "full fine-tune"]
    dense = full[0]["stored_bytes"] if full else None
    strategies = []
    for (s, _, p) in groups:
        if s not in REFS and (s, p) not in strategies:
            strategies.append((s, p))
    strategies.sort(key=lambda sp: sp[1] is not None)  # presets after the default (all tensors)
    keeps = sorted({k for (s, k, _) in groups if k is not None})
    lines = [f"# Quality benchmark results (seeds: {', '.join(map(str, seeds))})", "",
             f"all-MiniLM-L6-v2 fine-tuned for {task_description()}, pruned "
             "through run_job into a Parquet store and rebuilt with ken_dist.subnetwork.view. Accuracy and weighted F1 in %, "
             "mean over seeds with (min-max) when there is more than one. Stored bytes: all part files of the "
             "fine-tune in the store (the whole-stored classifier included); dense = the fine-tune's fp32 "
             "safetensors.", "", "## Accuracy (%) by strategy and keep fraction", ""]
    lines.append("| strategy | " + " | ".join(f"keep {k:g}" for k in keeps) + " |")
    lines.append("|---|" + "---|" * len(keeps))
    for ref in REFS:
        if (ref, None, None) in groups:
            v = _spread([c["accuracy"] for c in groups[(ref, None, None)]])
            lines.append(f"| *{ref}* | " + " | ".join(v for _ in keeps) + " |")
    for s, p in strategies:
        row = []
        for k in keeps:
            g = groups.get((s, k, p))
            row.append(_spread([c["accuracy"] for c in g]) if g else "-")
        lines.append(f"| {s}{' (' + p + ')' if p else ''} | " + " | ".join(row) + " |")
    full_by_seed = {c["seed"]: c["accuracy"] for c in full}
    lines += ["", "## Gap to the seed's own full fine-tune (accuracy points), per seed", "",
              "| strategy | keep | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
              "|---|---|" + "---|" * (len(seeds) + 1)]
    for s, p in strategies:
        for k in keeps:
            g = {c["seed"]: c for c in groups.get((s, k, p), [])}
            if not g:
                continue
            gaps = [100 * (g[sd]["accuracy"] - full_by_seed[sd]) if sd in g and sd in full_by_seed else None
                    for sd in seeds]
            have = [x for x in gaps if x is not None]
            lines.append(f"| {s}{' (' + p + ')' if p else ''} | {k:g} | "
                         + " | ".join("-" if x is None else f"{x:+.1f}" for x in gaps)
                         + f" | {np.mean(have):+.2f} |")
    lines += ["", "## Every cell", "",
              "| strategy | keep | seeds | accuracy % | weighted F1 % | stored MiB | vs dense | kept params |",
              "|---|---|---|---|---|---|---|---|"]
    for ref in REFS:
        g = groups.get((ref, None, None))
        if g:
            sb = g[0].get("stored_bytes")
            lines.append(f"| *{ref}* | - | {len(g)} | {_spread([c['accuracy'] for c in g])} | "
                         f"{_spread([c['f1_weighted'] for c in g])} | {_mib(sb)} | "
                         f"{'1.000' if sb else '-'} | - |")
    for s, p in strategies:
        for k in keeps:
            g = groups.get((s, k, p))
            if not g:
                continue
            sb = float(np.mean([c["stored_bytes"] for c in g]))
            kept = float(np.mean([c["kept_params"] / c["pruned_params"] for c in g]))
            lines.append(f"| {s}{' (' + p + ')' if p else ''} | {k:g} | {len(g)} | {_spread([c['accuracy'] for c in g])} | "
                         f"{_spread([c['f1_weighted'] for c in g])} | {_mib(sb)} | "
                         f"{sb / dense:.3f} | {kept:.3f} |" if dense else "| - |")
    lines += _pareto(cells, groups, strategies, keeps, seeds)
    (RESULTS / f"quality{task_suffix()}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"summary{task_suffix()}.json").write_text(json.dumps({
        f"{s}|{k}|{p}": {"seeds": [c["seed"] for c in g], "accuracy": [c["accuracy"] for c in g],
                         "f1_weighted": [c["f1_weighted"] for c in g]}
        for (s, k, p), g in groups.items()}, indent=1))
    _plot(groups, strategies, keeps, seeds)
    _plot_bits(cells, groups, strategies, keeps, seeds)
    if not task_suffix():
        write_explore_report()
    print("\n".join(lines))


def _finetune_params(cells: list[dict]) -> int | None:
    """The fine-tune's parameter count: as recorded, else its fp32 safetensors bytes / 4 (the header,
    ~0.02% of the file, counted as parameters) for cells from before the bits axis."""
    counted = [c["finetune_params"] for c in cells if c.get("finetune_params")]
    if counted:
        return counted[0]
    dense = [c["stored_bytes"] for c in cells if c["strategy"] == "full fine-tune" and c.get("stored_bytes")]
    return dense[0] // 4 if dense else None


def _points(cells, groups, strategies, keeps):
    """{(recipe, preset): [(keep, bits, measured, accuracies by seed)]} over the keep fractions."""
    n = _finetune_params(cells)
    out = {}
    for s, p in strategies:
        pts = []
        for k in keeps:
            g = groups.get((s, k, p))
            if not g:
                continue
            bits = [bits_per_param(c, n) for c in g]
            if any(b is None for b, _ in bits):
                continue
            pts.append((k, float(np.mean([b for b, _ in bits])), all(m for _, m in bits),
                        {c["seed"]: c["accuracy"] for c in g}))
        if pts:
            out[(s, p)] = sorted(pts, key=lambda t: t[1])
    return out


FITTED = {"current": ("lowrank-delta-model +sign-g64 +fit-scales", 0.25),
          "k0.1-sign": ("lowrank-delta-model +sign +fit-scales", 0.1), "bitdelta": ("bitdelta +fit-scales", 1.0)}


def _fitted_points() -> list[tuple]:
    """(recipe, None, keep, bits, measured, {seed: accuracy}) of each recipe of results/fit_scales.jsonl
    (fit_scales.py: the scales fitted, scored as stored) on this task, first calibration draw, the
    latest line per seed."""
    path = RESULTS / "fit_scales.jsonl"
    latest = {}
    for line in path.read_text().splitlines() if path.exists() else ():
        r = json.loads(line)
        if r.get("task") == common.TASK and not r.get("calib_draw") and r.get("candidate") in FITTED:
            latest[(r["candidate"], r["seed"])] = r
    out = []
    for cand, (name, keep) in FITTED.items():
        rs = [r for (c, _), r in sorted(latest.items()) if c == cand]
        if rs:
            out.append((name, None, keep, float(np.mean([r["bits_per_param"] for r in rs])), True,
                        {r["seed"]: r["full"] + r["gap_stored"] / 100 for r in rs}))
    return out


def _pareto(cells, groups, strategies, keeps, seeds) -> list[str]:
    """Accuracy against bits per parameter: every cell, the Pareto front marked, gaps per seed."""
    full = {c["seed"]: c["accuracy"] for c in cells if c["strategy"] == "full fine-tune"}
    pts = _points(cells, groups, strategies, keeps)
    flat = [(s, p, k, b, m, acc) for (s, p), ps in pts.items() for k, b, m, acc in ps] + _fitted_points()
    mean_acc = {id(t): float(np.mean(list(t[5].values()))) for t in flat}
    front = {id(t) for t in flat if not any(
        o[3] <= t[3] and mean_acc[id(o)] >= mean_acc[id(t)] and (o[3] < t[3] or mean_acc[id(o)] > mean_acc[id(t)])
        for o in flat)}
    lines = ["", "## Accuracy against bits per parameter (Pareto)", "",
             "bits/param = 8 x (part files + manifest) / the fine-tune's parameters (every tensor, the new "
             "classifier included); `*`: a cell from before the bits axis, part files only (its manifest, "
             "~0.01 bits/param, not counted). Gap: accuracy points to the seed's own full fine-tune. "
             "`+fit-scales`: the recipe with its scales fitted on 512 unlabeled texts, scored as stored "
             "(results/fit_scales.jsonl, fit_scales.py). "
             "**front**: no other cell has fewer bits and a higher mean accuracy.", "",
             "| recipe | keep | bits/param | accuracy % | " + " | ".join(f"gap s{sd}" for sd in seeds)
             + " | worst gap | front |", "|---|---|---|---|" + "---|" * (len(seeds) + 2)]
    for t in sorted(flat, key=lambda t: t[3]):
        s, p, k, b, m, acc = t
        gaps = [100 * (acc[sd] - full[sd]) if sd in acc and sd in full else None for sd in seeds]
        have = [g for g in gaps if g is not None]
        lines.append(f"| {s}{' (' + p + ')' if p else ''} | {k:g} | {b:.3f}{'' if m else '*'} | "
                     f"{100 * mean_acc[id(t)]:.2f} | " + " | ".join("-" if g is None else f"{g:+.1f}" for g in gaps)
                     + f" | {min(have):+.1f} | {'**front**' if id(t) in front else ''} |" if have else " | - | |")
    return lines


def _plot(groups, strategies, keeps, seeds) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    styles = {"full fine-tune": ("k", "--"), "base + head": ("gray", ":")}
    for ref, (color, ls) in styles.items():
        g = groups.get((ref, None, None))
        if g:
            m = 100 * np.mean([c["accuracy"] for c in g])
            ax.axhline(m, color=color, ls=ls, label=f"{ref} ({m:.1f})")
    for i, (s, p) in enumerate([sp for sp in strategies if sp[1] is None]):  # presets: tables only
        xs, ms, lo, hi = [], [], [], []
        for k in keeps:
            g = groups.get((s, k, p))
            if not g:
                continue
            acc = 100 * np.array([c["accuracy"] for c in g])
            xs.append(k)
            ms.append(acc.mean())
            lo.append(acc.mean() - acc.min())
            hi.append(acc.max() - acc.mean())
        if xs:
            ax.errorbar(xs, ms, yerr=[lo, hi] if len(seeds) > 1 else None, marker="o", capsize=3,
                        label=s + (f" ({p})" if p else ""), color=f"C{i}")
    ax.set_xlabel("keep fraction (of each row; of each block for -block, of the model for -model)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(keeps)
    ax.set_title(f"MiniLM-L6 {common.TASK}: accuracy of the rebuilt subnetwork vs keep"
                 + (f"\nmean over {len(seeds)} seeds, bars = min-max" if len(seeds) > 1 else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(RESULTS / f"accuracy_vs_keep{task_suffix()}.png", dpi=110)
    plt.close(fig)


def _plot_bits(cells, groups, strategies, keeps, seeds) -> None:
    """results/accuracy_vs_bits.png: one line per recipe over its keep fractions, references as lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = _points(cells, groups, strategies, keeps)
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(8.5, 5.5), layout="constrained")
    for ref, (color, ls) in {"full fine-tune": ("k", "--"), "base + head": ("gray", ":")}.items():
        g = groups.get((ref, None, None))
        if g:
            ax.axhline(100 * np.mean([c["accuracy"] for c in g]), color=color, ls=ls, label=ref)
    for i, ((s, p), ps) in enumerate(pts.items()):
        if p:
            continue
        ax.plot([b for _, b, _, _ in ps], [100 * np.mean(list(a.values())) for *_, a in ps], marker="o",
                ls="-" if all(m for _, _, m, _ in ps) else "--", color=f"C{i % 10}", label=s)
        for k, b, _, a in ps:
            ax.annotate(f"{k:g}", (b, 100 * np.mean(list(a.values()))), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")
    for j, (s, _, k, b, _, a) in enumerate(_fitted_points()):
        ax.plot([b], [100 * np.mean(list(a.values()))], marker="*", ms=11, ls="none", color=f"C{(j + 7) % 10}",
                label=s)
    ax.axvline(1.0, color="r", lw=0.8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("bits per fine-tuned parameter (everything stored; labels: keep)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MiniLM-L6 {common.TASK}: accuracy vs stored bits per parameter"
                 + (f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.savefig(RESULTS / f"accuracy_vs_bits{task_suffix()}.png", dpi=110)
    plt.close(fig)


def write_explore_report(path=None) -> None:
    """results/explore.md from results/explore.jsonl (explore.py's in-memory rule search)."""
    src = RESULTS / "explore.jsonl"
    if not src.exists():
        return
    runs = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    cells = json.loads((RESULTS / f"summary{task_suffix()}.json").read_text()) if (RESULTS / f"summary{task_suffix()}.json").exists() else {}
    full = dict(zip(cells.get("full fine-tune|None|None", {}).get("seeds", []),
                    cells.get("full fine-tune|None|None", {}).get("accuracy", [])))
    last = {}
    for r in runs:  # the latest run of each (rule, keep, whole, only, seed) wins
        last[(r["rule"], r["keep"], r.get("whole"), r.get("only"), r["seed"])] = r["accuracy"]
    table = defaultdict(dict)
    for (rule, keep, whole, only, seed), acc in last.items():
        table[(rule, keep, whole or "", only or "")][seed] = acc
    seeds = sorted({k[-1] for k in last})
    lines = ["# Rule search (explore.py, in memory: same masks as the pipeline, no store)", "",
             "Accuracy gap to each seed's own full fine-tune, in points; `-` = not run. `whole`: tensors "
             "left at their fine-tuned value (a diagnosis, not a rule). Prefix t = one budget per tensor, "
             "g = one budget for the whole model (the pipeline's `*-model` strategies since; gmag ~ "
             "magnitude-model, glowrank ~ lowrank-delta-model).", "",
             "| rule | keep | whole | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|---|---|" + "---|" * (len(seeds) + 1)]
    for (rule, keep, whole, only), accs in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        gaps = [100 * (accs[s] - full[s]) if s in accs and s in full else None for s in seeds]
        have = [g for g in gaps if g is not None]
        lines.append(f"| {rule} | {keep:g} | {whole.replace('|', '&#124;')} | "
                     + " | ".join("-" if g is None else f"{g:+.1f}" for g in gaps)
                     + f" | {np.mean(have):+.2f} |")
    (path or RESULTS / "explore.md").write_text("\n".join(lines) + "\n")
