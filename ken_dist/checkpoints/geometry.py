"""Row geometry: what a "row" of a tensor is, everywhere in ken_dist (selection spec, store format).

KEN selects within rows. A 2-D tensor [r, n] has r rows of n; a 1-D tensor [n] is one row; a
tensor of rank >= 3 has shape[0] rows of prod(shape[1:]); a 0-D tensor is one row of one entry.
"""
from __future__ import annotations


def row_geometry(shape) -> tuple[int, int]:
    """(rows, row_len) of a tensor of this shape."""
    shape = [int(s) for s in shape]
    if not shape:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    rest = 1
    for s in shape[1:]:
        rest *= s
    return shape[0], rest
