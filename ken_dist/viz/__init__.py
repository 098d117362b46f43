"""KENviz: see which entries a subnetwork kept, and whether they cluster, straight from the store.

Command line: `ken-dist viz STORE --finetune NAME --tensor PATTERN --out DIR [--delta]` writes
every figure and OUT/index.html. In a notebook:

    from ken_dist import viz
    v = viz.load_matrix("store", "my-sft", "model.layers.0.mlp.down_proj.weight")   # lazy, one tensor
    v.stats                        # exact: kept, density, neighbour histogram vs uniform random
    viz.plot_matrix(v)             # matplotlib Figures, shown inline
    viz.plot_neighbours(v)
    viz.plot_layers([viz.load_matrix("store", "my-sft", f"model.layers.{i}.mlp.down_proj.weight") for i in range(4)])
    viz.render("store", "my-sft", r"mlp\\.down_proj", "out/")  # everything + index.html

Statistics (ken_dist.viz.stats) are pure numpy and importable without matplotlib.
"""
from __future__ import annotations

from ken_dist.viz.read import MatrixView, load_matrix, select_tensors
from ken_dist.viz.stats import (
    degree_counts,
    expected_pmf,
    neighbour_counts,
    neighbour_summary,
    observed_histogram,
)

__all__ = ["MatrixView", "load_matrix", "select_tensors", "degree_counts", "expected_pmf", "neighbour_counts",
           "neighbour_summary", "observed_histogram", "plot_matrix", "plot_neighbours", "plot_layers", "render"]


def __getattr__(name):  # matplotlib is imported only when a figure is asked for
    if name in ("plot_matrix", "plot_neighbours", "plot_layers", "save"):
        from ken_dist.viz import figures
        return getattr(figures, name)
    if name == "render":
        from ken_dist.viz.report import render
        return render
    raise AttributeError(name)
