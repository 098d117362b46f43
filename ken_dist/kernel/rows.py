"""Input checks shared by every selection path: k resolution, row shapes, widening to float32.

Kept apart from the algorithms so that every path rejects bad input with the same words,
before any work starts.
"""
from __future__ import annotations

import numbers

import numpy as np

from ken_dist.checkpoints.dtypes import is_torch_tensor
from ken_dist.errors import KenError, NonFiniteRowError


def resolve_k(n: int, k=None, keep=None) -> int:
    """The number of entries to keep in a row of length n: exactly one of k (int) or keep (fraction).

    k >= n is allowed and means "keep the whole row"; the returned value is min(k, n).
    """
    if (k is None) == (keep is None):
        raise KenError("give exactly one of k (entries kept per row) or keep (fraction kept, in (0, 1])")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise KenError(f"k must be an integer >= 1, got {k!r} ({type(k).__name__}); "
                           "use keep=FRACTION for a fraction of each row")
        if k <= 0:
            raise KenError(f"k must be >= 1, got {k}; k is the number of fine-tuned entries kept per row")
        return min(int(k), n)
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise KenError(f"keep must be a fraction in (0, 1], got {keep!r}")
    keep = float(keep)
    if not (0.0 < keep <= 1.0):
        raise KenError(f"keep must be a fraction in (0, 1], got {keep}; use k=N for a count per row")
    return min(n, max(1, round(keep * n)))


def as_float32_rows(rows, name: str = "rows"):
    """Widen a [r, n] (or [n]) float tensor/array to float32, keeping its kind (numpy or torch).

    bf16 and fp16 widen exactly, so selection on the widened rows is selection on the originals.
    """
    if is_torch_tensor(rows):
        import torch

        if not rows.is_floating_point():
            raise KenError(f"{name}: dtype {rows.dtype} is not a float type; integer and bool "
                           "tensors are never pruned (store them whole)")
        out = rows.to(torch.float32)
    else:
        arr = np.asarray(rows)
        if arr.dtype.kind != "f":
            raise KenError(f"{name}: dtype {arr.dtype} is not a float type; integer and bool "
                           "tensors are never pruned (store them whole)")
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if out.ndim not in (1, 2):
        raise KenError(f"{name}: expected a 2-D [rows, n] block (or one 1-D row), got shape "
                       f"{tuple(out.shape)}; flatten higher-rank tensors to tensor[i].flatten() rows")
    if out.shape[-1] == 0:
        raise KenError(f"{name}: rows are empty (shape {tuple(out.shape)}); nothing to select")
    return out


def check_finite(rows2d) -> None:
    """Raise NonFiniteRowError naming the first row with NaN or infinity."""
    if is_torch_tensor(rows2d):
        import torch

        bad = (~torch.isfinite(rows2d)).any(dim=1)
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise NonFiniteRowError(f"row {row} holds NaN or infinity; KEN needs finite weights "
                                    "(check the checkpoint for corruption or overflow)", row)
    else:
        bad = ~np.isfinite(rows2d).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise NonFiniteRowError(f"row {row} holds NaN or infinity; KEN needs finite weights "
                                    "(check the checkpoint for corruption or overflow)", row)
