"""Markdown table and plot of the quality benchmark from results/cells.jsonl (see run.py)."""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
from common import RESULTS

REFS = ("full fine-tune", "base + head")


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _spread(vals: list[float], pct: bool = True) -> str:
    m = 100 * np.mean(vals) if pct else np.mean(vals)
    if len(vals) == 1:
        return f"{m:.2f}"
    lo, hi = (100 * min(vals), 100 * max(vals)) if pct else (min(vals), max(vals))
    return f"{m:.2f} ({lo:.1f}-{hi:.1f})"


def aggregate(cells: list[dict]) -> tuple[dict, list[int]]:
    groups = defaultdict(list)
    for c in cells:
        groups[(c["strategy"], c.get("keep"), c.get("preset"))].append(c)
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
             "all-MiniLM-L6-v2 fine-tuned for sentence polarity (Pang & Lee, 3000 train / 1000 test), pruned "
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
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "summary.json").write_text(json.dumps({
        f"{s}|{k}|{p}": {"seeds": [c["seed"] for c in g], "accuracy": [c["accuracy"] for c in g],
                         "f1_weighted": [c["f1_weighted"] for c in g]}
        for (s, k, p), g in groups.items()}, indent=1))
    _plot(groups, strategies, keeps, seeds)
    write_explore_report()
    print("\n".join(lines))


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
    ax.set_title("MiniLM-L6 polarity: accuracy of the rebuilt subnetwork vs keep"
                 + (f"\nmean over {len(seeds)} seeds, bars = min-max" if len(seeds) > 1 else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(RESULTS / "accuracy_vs_keep.png", dpi=110)
    plt.close(fig)


def write_explore_report(path=None) -> None:
    """results/explore.md from results/explore.jsonl (explore.py's in-memory rule search)."""
    src = RESULTS / "explore.jsonl"
    if not src.exists():
        return
    runs = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    cells = json.loads((RESULTS / "summary.json").read_text()) if (RESULTS / "summary.json").exists() else {}
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
