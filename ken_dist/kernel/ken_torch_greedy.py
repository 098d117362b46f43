"""The KEN greedy match in torch: all rows of a block step through their k picks together.

The rule: grid points in visit order each take, among the entries not yet taken, the one
nearest in float32 distance |v - g|, the smallest original index among equal distances.

The loop runs over the k visits; each step is a fixed sequence of about twenty torch ops on
[rows, ~2S] tensors, with no host synchronisation, so a GPU runs a whole block of rows per
kernel launch. The state per row is a *compacted* array of the row's distinct values (blocks of
equal values, ascending), each with a pointer to its next untaken entry:

- Entries of equal value are at equal distance from every grid point, so a block is always
  entered at its smallest untaken original index: a block is a queue (its entries sorted by
  index) and the greedy picks blocks. A block dies when its queue is empty.
- Every S steps the live blocks are compacted (dead ones dropped). Between compactions at most S
  blocks die, so the nearest live block on each side of a grid point lies within S + 1 slots of
  the point's insertion position: a window of 2S + 2 slots around it holds the answer.
- float32 distances are monotone in the value on each side of g, so equal-distance ties form a
  contiguous run of blocks. The window resolves every tie inside it by smallest index. A tie
  that could reach past the window (the slot just outside has the minimal distance too: only
  when float32 rounding merges the distances of many distinct values) flags the row, and
  flagged rows are redone by `greedy_full_scan`, the rule applied literally (O(n) per step).
"""
from __future__ import annotations

import math

import torch

BIG = torch.iinfo(torch.int64).max  # key of a non-candidate slot
NO_ENTRY = BIG // 2  # "index" of an exhausted block's next entry: larger than any real index


def window_half_width(n: int) -> int:
    """S: compaction costs O(n) every S steps, a step costs O(S); sqrt(n)/2 balances them."""
    return int(min(64, max(8, round(math.sqrt(n) / 2))))


def greedy_match(x: torch.Tensor, g: torch.Tensor, visit: torch.Tensor, s_half: int | None = None) -> torch.Tensor:
    """Picked original indices [r, k] in pick order. x: float32 [r, n]; g: float32 grids [r, k]
    (ascending); visit: grid indices [r, k] in visit order; k < n."""
    r, n = x.shape
    k = visit.shape[1]
    dev = x.device
    S = window_half_width(n) if s_half is None else s_half
    pad = S + 2
    width = pad + n + pad  # slots; one more column (index `width`) is a scatter dump

    sv, order = torch.sort(x, dim=1, stable=True)
    start = torch.ones((r, n), dtype=torch.bool, device=dev)
    start[:, 1:] = sv[:, 1:] != sv[:, :-1]
    block = torch.cumsum(start, dim=1) - 1
    end = torch.ones((r, n), dtype=torch.bool, device=dev)
    end[:, :-1] = start[:, 1:]
    pos = torch.arange(n, dtype=torch.int64, device=dev).expand(r, n)

    val = torch.full((r, width + 1), math.inf, dtype=torch.float32, device=dev)
    val[:, :pad] = -math.inf
    nxt = torch.zeros((r, width + 1), dtype=torch.int64, device=dev)  # next untaken sorted position
    stop = torch.zeros((r, width + 1), dtype=torch.int64, device=dev)  # end of the block's run
    dump = torch.full_like(block, width)
    val.scatter_(1, torch.where(start, block + pad, dump), sv)
    nxt.scatter_(1, torch.where(start, block + pad, dump), pos)
    stop.scatter_(1, torch.where(end, block + pad, dump), pos + 1)
    nxt[:, width] = 0
    stop[:, width] = 0
    index_of = torch.cat([order, torch.full((r, 1), NO_ENTRY, dtype=torch.int64, device=dev)], dim=1)

    # insertion slot of every grid point (first block >= g), in visit order
    slot = pad + torch.searchsorted(val[:, pad:pad + n].contiguous(), g.contiguous())
    slot = slot.gather(1, visit)
    gv = g.gather(1, visit)

    offs = torch.arange(-(S + 2), S + 2, dtype=torch.int64, device=dev)[None, :]
    # The two outermost window slots are never picked: they stand for everything beyond the
    # window. They count as candidates with a negative key, so that a distance tie with them
    # (a tie run that may continue outside) yields a negative pick, which flags the row.
    outer = torch.zeros((1, 2 * S + 4), dtype=torch.bool, device=dev)
    outer[:, [0, -1]] = True
    outer_key = outer.long() * (NO_ENTRY + 1)  # index - outer_key < 0 on outer slots
    inf = torch.tensor(math.inf, dtype=torch.float32, device=dev)
    big = torch.tensor(BIG, dtype=torch.int64, device=dev)
    picked = torch.empty((r, k), dtype=torch.int64, device=dev)
    for t in range(k):
        if t and t % S == 0:
            val, nxt, stop, slot = _compact(val, nxt, stop, slot, pad, width)
        wpos = slot[:, t:t + 1] + offs
        wnxt = nxt.gather(1, wpos)
        alive = (wnxt < stop.gather(1, wpos)) | outer
        dm = torch.where(alive, (val.gather(1, wpos) - gv[:, t:t + 1]).abs(), inf)
        dmin = dm.amin(dim=1, keepdim=True)
        # A dead slot is a candidate only if dmin is infinite (float32 overflow), and then the
        # outer slots are too: the row is flagged.
        key = torch.where(dm == dmin, index_of.gather(1, wnxt) - outer_key, big)
        pk = key.amin(dim=1, keepdim=True)
        picked[:, t:t + 1] = pk
        # advance the picked block's queue: the window is written back whole (no argmin: on the
        # CPU, torch's min/argmin over a dim opens a parallel region per call)
        nxt.scatter_(1, wpos, wnxt + (key == pk))
    bad = (picked < 0).any(dim=1).nonzero(as_tuple=True)[0]
    if bad.numel():
        picked[bad] = greedy_full_scan(x[bad], g[bad], visit[bad])
    return picked


def _compact(val, nxt, stop, slot, pad, width):
    """Drop dead blocks (keeping order) and move every grid point's insertion slot with them."""
    live = nxt[:, :width] < stop[:, :width]
    count = torch.cumsum(live, dim=1)
    dest = torch.where(live, pad - 1 + count, width)
    before = count - live.long()  # live blocks strictly before each slot
    val2 = torch.full_like(val, math.inf)
    val2[:, :pad] = -math.inf
    nxt2 = torch.zeros_like(nxt)
    stop2 = torch.zeros_like(stop)
    val2.scatter_(1, dest, val[:, :width])
    nxt2.scatter_(1, dest, nxt[:, :width])
    stop2.scatter_(1, dest, stop[:, :width])
    nxt2[:, width] = 0
    stop2[:, width] = 0
    return val2, nxt2, stop2, pad + before.gather(1, slot)


def greedy_full_scan(x: torch.Tensor, g: torch.Tensor, visit: torch.Tensor) -> torch.Tensor:
    """The greedy rule applied literally: every step scans the whole row (O(n k) per row)."""
    r, n = x.shape
    k = visit.shape[1]
    gv = g.gather(1, visit)
    alive = torch.ones((r, n), dtype=torch.bool, device=x.device)
    idx = torch.arange(n, dtype=torch.int64, device=x.device)[None, :]
    inf = torch.tensor(math.inf, dtype=torch.float32, device=x.device)
    picked = torch.empty((r, k), dtype=torch.int64, device=x.device)
    for t in range(k):
        d = torch.where(alive, (x - gv[:, t:t + 1]).abs(), inf)
        dmin = d.amin(dim=1, keepdim=True)
        pk = torch.where(alive & (d == dmin), idx, n).amin(dim=1, keepdim=True)
        picked[:, t:t + 1] = pk
        alive.scatter_(1, pk, False)
    return picked
