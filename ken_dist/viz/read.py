"""Read one stored tensor for KENviz: its exact keep mask and pixel-block sums of its kept values.

Reads through the subnetwork view, so KENviz trusts exactly what the loader trusts: parts are
checked against the manifest's sha256 and decoded with their row checks (`Subnetwork.kept`,
store/parts.py), and the base is the verified one (`Subnetwork.base_rows`, subnetwork/base.py).
Lazy like the loader: one block of one tensor at a time, and base rows only when the delta
(fine-tuned - base) is asked for. The kept fine-tuned values come straight from the parts'
`values` column: no reconstruction.

The mask is held whole (one byte per entry: 59 MB for 14336 x 4096) because the neighbour
statistics are exact; values are reduced to pixel-block sums as each block is read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ken_dist.checkpoints.dtypes import storage_dtype, to_float32, torch_dtype
from ken_dist.errors import KenError
from ken_dist.subnetwork.view import Subnetwork, open_subnetwork
from ken_dist.viz import stats as S

DEFAULT_MAX_PIXELS = 1024
_LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class MatrixView:
    """Everything the figures need about one tensor, viewed as a [rows, row_len] matrix."""
    name: str
    finetune: str
    shape: list[int]
    dtype: str
    rows: int
    cols: int
    mask: np.ndarray                      # bool [rows, cols], exact
    factor: int                           # entries per pixel side of the value/count images
    value_kind: str                       # "fine-tuned value" or "delta (fine-tuned - base)"
    value_sum: np.ndarray                 # float64 [R', C']: sum of kept values per pixel block
    kept_sum: np.ndarray                  # int64 [R', C']: kept entries per pixel block
    neighbour_sum: np.ndarray             # int64 [R', C']: sum of kept-neighbour counts of kept entries
    stats: dict = field(default_factory=dict)

    @property
    def layer(self) -> int | None:
        m = _LAYER.search("." + self.name + ".")
        return int(m.group(1)) if m else None

    @property
    def kind(self) -> str:
        """The matrix type: the name with its first layer number replaced by '*'."""
        return _LAYER.sub(".*.", "." + self.name + ".", count=1)[1:-1]

    def value_image(self) -> np.ndarray:
        """Mean kept value per pixel block; NaN where nothing is kept (blank in the figures)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.kept_sum > 0, self.value_sum / np.maximum(self.kept_sum, 1), np.nan)

    def kept_fraction_image(self) -> np.ndarray:
        sizes = np.outer(_block_sizes(self.rows, self.factor), _block_sizes(self.cols, self.factor))
        return self.kept_sum / sizes

    def neighbour_image(self) -> np.ndarray:
        """Mean number of kept 4-neighbours of the kept entries per pixel block; NaN where none kept."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.kept_sum > 0, self.neighbour_sum / np.maximum(self.kept_sum, 1), np.nan)

    def coarsen(self, factor: int) -> "MatrixView":
        """The same view at a coarser pixel block (a multiple of this one); stats unchanged."""
        if factor % self.factor:
            raise ValueError(f"factor {factor} is not a multiple of {self.factor}")
        q = factor // self.factor
        red = lambda a: np.add.reduceat(np.add.reduceat(a, S.block_edges(a.shape[0], q), axis=0),  # noqa: E731
                                        S.block_edges(a.shape[1], q), axis=1)
        return MatrixView(self.name, self.finetune, self.shape, self.dtype, self.rows, self.cols, self.mask,
                          factor, self.value_kind, red(self.value_sum), red(self.kept_sum),
                          red(self.neighbour_sum), self.stats)


def _block_sizes(length: int, factor: int) -> np.ndarray:
    edges = np.append(S.block_edges(length, factor), length)
    return np.diff(edges)


def _kept_rows(sub: Subnetwork, name: str, dtype: str, a: int, b: int, mask: np.ndarray) -> np.ndarray:
    """Rows [a, b) of pruned tensor `name`: fills mask[a:b] and returns the kept fine-tuned values
    as float32 [b - a, row_len], 0 where pruned (Subnetwork.kept does the reading and checking)."""
    dense = np.zeros((b - a, mask.shape[1]), np.float32)
    bits = storage_dtype(dtype)
    for first, keep, raw in sub.kept(name, a, b):
        i, j = first - a, first - a + keep.shape[0]
        mask[first: first + keep.shape[0]] = keep
        dense[i:j][keep] = to_float32(raw.view(bits), dtype)
    return dense


def load_matrix(store, finetune: str, tensor: str, *, base=None, delta: bool = False,
                max_pixels: int = DEFAULT_MAX_PIXELS, verify: bool = True,
                subnetwork: Subnetwork | None = None) -> MatrixView:
    """Read tensor `tensor` of fine-tune `finetune` from the store into a MatrixView.

    delta=True colours kept entries by fine-tuned - base (reads the base rows block by block; base=
    where the base checkpoint is now, if it moved). Tensors stored whole count as fully kept."""
    sub = subnetwork or open_subnetwork(store, finetune, base, verify=verify)
    t = sub.entry(tensor)
    rows, cols = int(t["rows"]), int(t["row_len"])
    if not torch_dtype(t["dtype"]).is_floating_point:
        raise KenError(f"tensor {tensor!r} is {t['dtype']}, not a float tensor; nothing to show")
    factor = S.display_factor(rows, cols, max_pixels)
    shape_img = (-(-rows // factor), -(-cols // factor))
    value_sum = np.zeros(shape_img, np.float64)
    mask = np.zeros((rows, cols), dtype=bool)
    if t["action"] == "whole":
        if delta:
            raise KenError(f"tensor {tensor!r} is stored whole (reason: {t.get('reason') or 'not pruned'}); it has "
                           f"no base to take a delta against")
        full = sub.get_tensor(tensor).reshape(rows, cols).to(torch.float32).numpy()
        mask[:] = True
        idx, sums = S.block_sums(full, factor, factor)
        value_sum[idx] += sums
    else:
        for block in sorted(t["blocks"], key=lambda blk: blk["row_start"]):
            a, b = block["row_start"], block["row_end"]
            vals = _kept_rows(sub, tensor, t["dtype"], a, b, mask)
            if delta:
                base_rows = sub.base_rows(tensor, a, b).to(torch.float32).numpy()
                vals = np.where(mask[a:b], vals - base_rows, 0.0).astype(np.float32)
            idx, sums = S.block_sums(vals, factor, factor, row0=a)
            value_sum[idx] += sums
    counts = S.neighbour_counts(mask)
    _, kept_sum = S.block_sums(mask, factor, factor)
    _, nb_sum = S.block_sums(np.where(mask, counts, 0).astype(np.uint8), factor, factor)
    observed = S.observed_histogram(mask, counts)
    del counts
    kept = int(mask.sum())
    per_row = mask.sum(axis=1)
    stats = {
        "tensor": tensor, "shape": list(t["shape"]), "dtype": t["dtype"], "action": t["action"],
        "rows": rows, "cols": cols, "entries": rows * cols, "kept": kept,
        "density": kept / (rows * cols),
        "kept_per_row": {"min": int(per_row.min()), "mean": float(per_row.mean()), "max": int(per_row.max())},
        "pixel_block": factor,
        **S.neighbour_summary(observed, S.expected_pmf(rows, cols, kept)),
    }
    kind = "delta (fine-tuned - base)" if delta else "fine-tuned value"
    return MatrixView(tensor, finetune, list(t["shape"]), t["dtype"], rows, cols, mask, factor, kind,
                      value_sum, kept_sum.astype(np.int64), nb_sum.astype(np.int64), stats)


def select_tensors(sub: Subnetwork, pattern: str | None, *, matrices_only: bool = True) -> list[str]:
    """Tensor names matching `pattern` (re.search), pruned float matrices (rows > 1) unless asked otherwise."""
    try:
        rx = re.compile(pattern) if pattern else None
    except re.error as e:
        raise KenError(f"--tensor {pattern!r} is not a valid regex: {e}") from None
    out = []
    for name, t in sub.manifest()["tensors"].items():
        if rx is not None and not rx.search(name):
            continue
        if matrices_only and (t["action"] != "prune" or t["rows"] < 2):
            continue
        out.append(name)
    return out
