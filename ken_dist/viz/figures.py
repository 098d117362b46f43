"""KENviz figures. Each function returns a `matplotlib.figure.Figure` built directly, without
pyplot: importing or plotting selects no backend and registers no figure, so a notebook's
backend stays what the user chose (a returned Figure still shows inline), and no display is
needed. `save` writes a PNG (Figure.savefig renders with Agg).

- plot_matrix:     kept entries coloured by value (fine-tuned, or delta), pruned entries blank;
                   for large matrices each pixel is a block: mean of the kept values, plus a
                   second panel with the kept fraction of each block.
- plot_neighbours: for every kept entry the number of kept 4-neighbours (a map), and the
                   histogram of those counts beside the exact expectation under uniform random
                   selection at the same density.
- plot_layers:     one matrix type across all layers, one panel per layer, shared colour scale.
"""
from __future__ import annotations

import math
import os

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from ken_dist.store.fs import atomic_output
from ken_dist.viz.read import MatrixView

VALUE_CMAP = "RdBu_r"
DPI = 110


def _value_limit(images) -> float:
    vals = np.concatenate([np.abs(im[np.isfinite(im)]).ravel() for im in images]) if images else np.zeros(0)
    if vals.size == 0:
        return 1.0
    lim = float(np.quantile(vals, 0.99))
    return lim if lim > 0 else float(vals.max() or 1.0)


def _cmap(name: str):
    return colormaps[name].with_extremes(bad="white")  # pruned (NaN) entries stay blank


def _extent(v: MatrixView):
    return (0, v.cols, v.rows, 0)  # axes in matrix indices whatever the pixel block


def _axes_inches(img_rows: int, img_cols: int, *, lo: float = 2.4, hi: float = 8.5) -> tuple[float, float]:
    """Axes size showing the image at about one screen pixel per image pixel (DPI), within [lo, hi]."""
    return (min(hi, max(lo, img_cols / DPI)), min(hi, max(lo * 0.8, img_rows / DPI)))


def _block_note(v: MatrixView) -> str:
    return "each pixel = one entry" if v.factor == 1 else f"each pixel = {v.factor}x{v.factor} entries"


def plot_matrix(v: MatrixView, *, title: str | None = None):
    """Kept entries coloured by value (v.value_kind), pruned entries blank."""
    agg = v.factor > 1
    img = v.value_image()
    w, h = _axes_inches(*img.shape)
    panels = 2 if agg else 1
    fig = Figure(figsize=(panels * (w + 1.6), h + 1.3), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)
    lim = _value_limit([img])
    ax = axes[0, 0]
    im = ax.imshow(img, cmap=_cmap(VALUE_CMAP), vmin=-lim, vmax=lim, interpolation="nearest",
                   extent=_extent(v), aspect="auto")
    fig.colorbar(im, ax=ax, shrink=0.85, label=v.value_kind + (" (mean of kept)" if agg else ""))
    ax.set_title(("kept values; pruned blank" if not agg else "mean kept value per block") + f"\n{_block_note(v)}",
                 fontsize=9)
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    if agg:
        ax = axes[0, 1]
        im = ax.imshow(v.kept_fraction_image(), cmap="viridis", vmin=0, vmax=min(1.0, max(2 * v.stats["density"], 1e-9)),
                       interpolation="nearest", extent=_extent(v), aspect="auto")
        fig.colorbar(im, ax=ax, shrink=0.85, label="kept fraction")
        ax.set_title(f"kept fraction per block (overall {v.stats['density']:.3f})\n{_block_note(v)}", fontsize=9)
        ax.set_xlabel("column")
    fig.suptitle(title or f"{v.name}  {v.dtype} {v.shape}", fontsize=10)
    return fig


def plot_neighbours(v: MatrixView, *, title: str | None = None):
    """Map of kept-neighbour counts and their histogram vs the uniform-random expectation."""
    img = v.neighbour_image()
    w, h = _axes_inches(*img.shape)
    fig = Figure(figsize=(w + 1.8 + 5.0, max(h, 3.2) + 1.3), layout="constrained")
    axes = fig.subplots(1, 2, width_ratios=[w + 1.8, 5.0])
    ax = axes[0]
    if v.factor == 1:
        disc = ListedColormap(colormaps["viridis"](np.linspace(0, 1, 5))).with_extremes(bad="white")
        im = ax.imshow(img, cmap=disc, norm=BoundaryNorm(np.arange(-0.5, 5.5), 5), interpolation="nearest",
                       extent=_extent(v), aspect="auto")
        fig.colorbar(im, ax=ax, shrink=0.85, ticks=range(5), label="kept 4-neighbours (pruned blank)")
    else:
        im = ax.imshow(img, cmap=_cmap("viridis"), vmin=0, vmax=4, interpolation="nearest", extent=_extent(v),
                       aspect="auto")
        fig.colorbar(im, ax=ax, shrink=0.85, label="mean kept 4-neighbours of kept entries")
    ax.set_title(f"kept 4-neighbours of each kept entry\n{_block_note(v)}", fontsize=9)
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    ax = axes[1]
    s = v.stats
    j = np.arange(5)
    ax.bar(j - 0.2, s["observed_fraction"], width=0.4, label=f"observed (mean {s['observed_mean']:.3f})", color="C0")
    ax.bar(j + 0.2, s["expected_fraction"], width=0.4, label=f"uniform random (mean {s['expected_mean']:.3f})",
           color="C1", alpha=0.8)
    ax.set_xticks(j)
    ax.set_xlabel("kept 4-neighbours")
    ax.set_ylabel("fraction of kept entries")
    ratio = s["clustering_ratio"]
    ax.set_title(f"density {s['density']:.3f}: observed/random mean = {ratio:.3f}\n"
                 f"total variation distance {s['tv_distance']:.4f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(title or f"{v.name}  {v.dtype} {v.shape}", fontsize=10)
    return fig


def plot_layers(views: list[MatrixView], *, max_pixels: int = 256, title: str | None = None):
    """One matrix type across layers: mean kept value per block, shared scale, one panel per layer."""
    if not views:
        raise ValueError("no matrices to plot")
    views = sorted(views, key=lambda v: (v.layer if v.layer is not None else -1, v.name))
    coarse = []
    for v in views:
        f = max(v.factor, -(-max(v.rows, v.cols) // max_pixels))
        f = -(-f // v.factor) * v.factor
        coarse.append(v.coarsen(f) if f != v.factor else v)
    images = [c.value_image() for c in coarse]
    lim = _value_limit(images)
    n = len(views)
    ir, ic = images[0].shape
    scale = 2.6 / max(ir, ic, 1)  # inches per image pixel: the longer panel side is 2.6 in
    pw, ph = max(1.5, ic * scale), max(0.8, ir * scale)
    ncol = max(1, min(n, int(13.0 // (pw + 0.35))))  # figure at most ~14 in wide
    nrow = math.ceil(n / ncol)
    fig = Figure(figsize=(pw * ncol + 1.8, (ph + 0.55) * nrow + 0.8), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False)
    im = None
    for i, (v, c, img) in enumerate(zip(views, coarse, images)):
        ax = axes[i // ncol, i % ncol]
        im = ax.imshow(img, cmap=_cmap(VALUE_CMAP), vmin=-lim, vmax=lim, interpolation="nearest",
                       extent=_extent(c), aspect="auto")
        layer = v.layer if v.layer is not None else v.name
        ax.set_title(f"layer {layer}\nnbr ratio {v.stats['clustering_ratio']:.2f}", fontsize=7)
        ax.tick_params(labelsize=6)
    for i in range(n, nrow * ncol):
        axes[i // ncol, i % ncol].axis("off")
    cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    cb.set_label(views[0].value_kind + " (mean of kept)", fontsize=8)
    fig.suptitle(title or f"{views[0].kind}\n{n} layers; {_block_note(coarse[0])}; pruned blank", fontsize=9)
    return fig


def save(fig: Figure, path: str) -> str:
    """Write `fig` as a PNG at `path` (directories created); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path) as tmp:  # whole or absent: a killed run never leaves a cut image
        fig.savefig(tmp, dpi=DPI, format="png")
    return path
