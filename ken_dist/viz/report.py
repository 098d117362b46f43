"""`render`: every figure of a set of stored tensors into a directory, with a static index.html.

OUT/index.html           every figure with its caption and the per-matrix statistics table
OUT/stats.json           the same statistics, machine-readable
OUT/matrix/<T>.png       single matrix view per tensor
OUT/neighbours/<T>.png   neighbour map + histogram vs uniform random per tensor
OUT/layers/<K>.png       one matrix type across all its layers (types present in >= 2 layers)

Tensors are read one at a time; once a tensor's single figures are written only its pixel-block
sums are kept (not its mask), so memory stays bounded by the largest tensor.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import time
from collections import defaultdict

from ken_dist.errors import KenError
from ken_dist.store.fs import atomic_json, atomic_write
from ken_dist.subnetwork.view import open_subnetwork
from ken_dist.viz import figures
from ken_dist.viz.read import (
    DEFAULT_MAX_PIXELS,
    MatrixView,
    load_matrix,
    select_tensors,
)


def _file_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "tensor"
    return safe[:180]


def _caption_matrix(v: MatrixView) -> str:
    s = v.stats
    agg = "" if v.factor == 1 else (f" The matrix has more entries than the image has pixels: each pixel is a "
                                   f"{v.factor}x{v.factor} block, coloured by the mean of its kept values; the "
                                   f"right panel shows the kept fraction of each block.")
    return (f"{v.name} ({v.dtype} {v.shape}, viewed as {v.rows} x {v.cols}): kept entries coloured by "
            f"{v.value_kind}, pruned entries blank. {s['kept']:,} of {s['entries']:,} kept "
            f"({s['density']:.4f}).{agg}")


def _caption_neighbours(v: MatrixView) -> str:
    s = v.stats
    verdict = ("kept entries cluster (more kept neighbours than chance)" if s["clustering_ratio"] > 1.02 else
               "kept entries avoid each other (fewer kept neighbours than chance)" if s["clustering_ratio"] < 0.98
               else "neighbour counts are close to uniform random selection")
    return (f"{v.name}: number of kept 4-neighbours of each kept entry (map; "
            f"{'exact' if v.factor == 1 else f'mean per {v.factor}x{v.factor} block'}) and its histogram beside "
            f"the exact hypergeometric expectation for {s['kept']:,} entries kept uniformly at random in the "
            f"{v.rows} x {v.cols} matrix. Mean {s['observed_mean']:.3f} observed vs {s['expected_mean']:.3f} "
            f"random (ratio {s['clustering_ratio']:.3f}): {verdict}.")


def _stats_row(s: dict) -> str:
    kpr = s["kept_per_row"]
    obs = " / ".join(f"{x:.3f}" for x in s["observed_fraction"])
    exp = " / ".join(f"{x:.3f}" for x in s["expected_fraction"])
    cells = [s["tensor"], f"{s['rows']} x {s['cols']}", s["dtype"], f"{s['kept']:,}", f"{s['density']:.4f}",
             f"{kpr['min']} / {kpr['mean']:.1f} / {kpr['max']}", f"{s['observed_mean']:.3f}",
             f"{s['expected_mean']:.3f}", f"{s['clustering_ratio']:.3f}", f"{s['tv_distance']:.4f}", obs, exp]
    return "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


_HEAD = ["tensor", "matrix", "dtype", "kept", "density", "kept/row min/mean/max", "nbr mean", "random mean",
         "ratio", "TV dist", "P(j=0..4) observed", "P(j=0..4) random"]

_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1400px}figure{margin:1.2em 0;border-top:1px solid #ddd;
padding-top:.6em}img{max-width:100%}figcaption{font-size:.9em;color:#333;max-width:1100px}table{border-collapse:
collapse;font-size:.8em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}"""


def write_index(out: str, info: dict, views_stats: list[dict], figures_list: list[tuple[str, str, str]]) -> str:
    """index.html: header, statistics table, every figure with its caption."""
    p = info
    rows = "\n".join(_stats_row(s) for s in views_stats)
    figs = "\n".join(f'<figure id="{html.escape(fid)}"><img src="{html.escape(src)}" loading="lazy">'
                     f"<figcaption>{html.escape(cap)}</figcaption></figure>" for fid, src, cap in figures_list)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>KENviz: {html.escape(p['finetune'])}</title>
<style>{_CSS}</style></head><body>
<h1>KENviz: fine-tune {html.escape(p['finetune'])}</h1>
<p>store {html.escape(p['store'])}; params {html.escape(json.dumps(p['params']))}; tensor pattern
{html.escape(repr(p['pattern']))}; values: {html.escape(p['value_kind'])}; {len(views_stats)} matrices;
rendered in {p['seconds']:.1f} s. Statistics are exact (computed on the full masks); images of large matrices
aggregate pixel blocks. "nbr mean": mean number of kept 4-neighbours of a kept entry; "random mean": the same
under uniform random selection of as many entries (hypergeometric, exact); ratio &gt; 1 means kept entries
cluster.</p>
<h2>Per-matrix statistics</h2>
<table><tr>{''.join(f'<th>{h}</th>' for h in _HEAD)}</tr>
{rows}
</table>
<h2>Figures</h2>
{figs}
</body></html>
"""
    path = os.path.join(out, "index.html")
    atomic_write(path, doc.encode("utf-8"))
    return path


def render(store, finetune: str, pattern: str | None, out: str, **options) -> dict:
    """Write every KENviz figure for the tensors of `finetune` matching `pattern` (re.search) into `out`.

    Options: base, delta, max_pixels, single, layers, verify, progress (see _render). Returns
    {"index": path, "figures": [...], "stats": [...], "seconds": s}. A refused run (a corrupt
    part met halfway) removes `out` when it created it, so no half report is left behind."""
    created = not os.path.exists(out)
    try:
        return _render(store, finetune, pattern, out, **options)
    except BaseException:
        if created and os.path.isdir(out):
            shutil.rmtree(out)
        raise


def _render(store, finetune: str, pattern: str | None, out: str, *, base=None, delta: bool = False,
            max_pixels: int = DEFAULT_MAX_PIXELS, single: bool = True, layers: bool = True,
            verify: bool = True, progress=None) -> dict:
    t0 = time.time()
    sub = open_subnetwork(store, finetune, base, verify=verify)
    names = select_tensors(sub, pattern)
    if not names:
        avail = select_tensors(sub, None)
        raise KenError(f"no pruned matrix of fine-tune {finetune!r} matches {pattern!r}; "
                       f"{len(avail)} pruned matrices, e.g. {', '.join(avail[:3]) or 'none'}")
    os.makedirs(out, exist_ok=True)
    figs: list[tuple[str, str, str]] = []
    all_stats: list[dict] = []
    by_kind: dict[str, list[MatrixView]] = defaultdict(list)
    for i, name in enumerate(names):
        v = load_matrix(sub.store, finetune, name, delta=delta, max_pixels=max_pixels, subnetwork=sub)
        all_stats.append(v.stats)
        if single:
            fn = _file_name(name) + ".png"
            figures.save(figures.plot_matrix(v), os.path.join(out, "matrix", fn))
            figs.append((f"matrix-{name}", f"matrix/{fn}", _caption_matrix(v)))
            figures.save(figures.plot_neighbours(v), os.path.join(out, "neighbours", fn))
            figs.append((f"neighbours-{name}", f"neighbours/{fn}", _caption_neighbours(v)))
        v.mask = None  # the layer grid needs only the pixel-block sums
        if v.layer is not None:
            by_kind[v.kind].append(v)
        if progress:
            progress(f"[viz] {i + 1}/{len(names)} {name} ({time.time() - t0:.1f} s)")
    if layers:
        for kind, views in by_kind.items():
            if len(views) < 2:
                continue
            fn = _file_name(kind.replace("*", "L")) + ".png"
            figures.save(figures.plot_layers(views), os.path.join(out, "layers", fn))
            ratios = ", ".join(f"{v.layer}: {v.stats['clustering_ratio']:.3f}" for v in sorted(views, key=lambda v: v.layer))
            figs.append((f"layers-{kind}", f"layers/{fn}",
                         f"{kind} across {len(views)} layers: kept entries coloured by {views[0].value_kind} "
                         f"(mean of kept per pixel block), pruned blank, one colour scale. Observed/random "
                         f"kept-neighbour ratio per layer: {ratios}."))
    seconds = time.time() - t0
    info = {"store": str(sub.store.root), "finetune": finetune, "pattern": pattern, "params": sub.manifest()["params"],
            "value_kind": "delta (fine-tuned - base)" if delta else "fine-tuned value", "seconds": seconds}
    atomic_json(os.path.join(out, "stats.json"), {**info, "matrices": all_stats})  # whole or absent
    index = write_index(out, info, all_stats, figs)
    return {"index": index, "figures": [os.path.join(out, src) for _, src, _ in figs], "stats": all_stats,
            "seconds": time.time() - t0}
