"""KEN's public entry: a keep mask for a block of rows, on the CPU (numba) or torch path.

The CPU path (ken_cpu.py, ken_numba.py) takes numpy and never imports torch; the torch path
(ken_torch*.py) runs the same rule batched on a GPU. Both reproduce shared/spec/ken-selection.md
bit for bit; which one runs follows `device` or where the rows live.
"""
from __future__ import annotations

import numpy as np

from ken_dist.checkpoints.dtypes import is_torch_tensor
from ken_dist.errors import InputError
from ken_dist.kernel import ken_cpu
from ken_dist.kernel.rows import as_float32_rows, check_finite, resolve_k

COMPAT_MODES = ("index", "reference")


def check_compat(compat: str) -> bool:
    if compat not in COMPAT_MODES:
        raise InputError(f"compat must be 'index' (exactly k per row) or 'reference' (the published "
                       f"code's value-based mask), got {compat!r}")
    return compat == "reference"


def _path_for(rows, device) -> str:
    """'cpu' (numba) or 'torch': an explicit non-CPU device, or rows living on one, mean torch."""
    if device is None:
        if is_torch_tensor(rows) and rows.device.type != "cpu":
            return "torch"
        return "cpu"
    if isinstance(device, str) and device in ("cpu", "torch"):  # "torch": its path on the CPU (tests)
        return device
    import torch

    return "cpu" if torch.device(device).type == "cpu" else "torch"


def as_torch_mask(mask):
    if isinstance(mask, np.ndarray):
        import torch

        return torch.from_numpy(mask)
    return mask


def ken_select(rows, k=None, *, keep=None, compat: str = "index", device=None):
    """KEN keep mask (a torch bool tensor) of a [r, n] block (or one [n] row) of fine-tuned
    values, same shape.

    Exactly one of k (entries per row) or keep (fraction, k = max(1, round(keep*n))).
    compat="index" keeps exactly min(k, n) entries per row; compat="reference" returns the
    published code's value-based mask. device: None or "cpu" for the compiled CPU path, a torch
    device such as "cuda" for the torch path ("torch" runs the torch path on the CPU).
    """
    return as_torch_mask(ken_mask_any(rows, k, keep, compat, device))


def ken_mask(rows, k, *, compat: str = "index", device=None) -> np.ndarray:
    """ken_select's mask as a numpy array on the host, whichever path computed it."""
    mask = ken_mask_any(rows, k, None, compat, device)
    return mask if isinstance(mask, np.ndarray) else mask.cpu().numpy()


def ken_mask_any(rows, k, keep, compat: str, device):
    """KEN mask: numpy from the CPU path (no torch involved for numpy rows), torch from the torch path."""
    reference = check_compat(compat)
    values = as_float32_rows(rows)
    n = values.shape[-1]
    k = resolve_k(n, k, keep)
    path = _path_for(rows, device)
    one_row = values.ndim == 1
    if one_row:
        values = values[None, :]
    if path == "cpu":
        arr = values.cpu().numpy() if is_torch_tensor(values) else values
        check_finite(arr)
        mask = ken_cpu.ken_masks(np.ascontiguousarray(arr), k, reference)
    else:
        import torch

        from ken_dist.kernel import ken_torch

        dev = torch.device("cpu") if device == "torch" else (torch.device(device) if device is not None else values.device)
        t = torch.as_tensor(values).to(dev)
        check_finite(t)
        mask = ken_torch.ken_masks(t, k, reference)
    return mask[0] if one_row else mask
