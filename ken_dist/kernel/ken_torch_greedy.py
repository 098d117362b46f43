"""The KEN greedy match in torch: all rows of a block step through their k picks together.

The rule: grid points in visit order each take, among the entries not yet taken, the one
nearest in float32 distance |v - g|, the smallest original index among equal distances.

Design (for a GPU: big blocks of rows, no host synchronisation inside the loop). The loop runs
over the k visits; each step is a fixed sequence of about 45 small torch ops on [2r, ~3 sqrt(n)]
tensors, so the cost of a step hardly depends on the number of rows r: a block of 100k rows
costs about what one row costs in kernel launches. Per row, two copies of the row are kept:

- F: entries sorted by (value ascending, index ascending). The nearest untaken entry at or
  above g is the first alive entry at or after g's insertion position; among equal values it
  is the smallest index.
- B: entries sorted by (value descending, index ascending). The nearest untaken entry below g
  is the first alive entry at or after position n - (insertion position); among equal values
  it is again the smallest index.

Both searches are one "first alive at or after q" query, answered in O(sqrt n) without loops:
alive flags in chunks of C slots plus a live count per chunk; scan q's own chunk, and the first
chunk after it that has a live slot (a sentinel at the end of each copy is always alive). The
two copies are stacked as 2r rows and queried together.

float32 distances are monotone in the value on each side of g, so entries at equal distance
form a run. Equal values are handled exactly by the sort orders above. Distinct values at equal
float32 distance (float32 rounding merged them; rare) are detected by comparing with the next
distinct value on each side; a row where such a tie reaches the minimal distance is redone by
`greedy_full_scan`, the rule applied literally (O(n) per step), after the loop.
"""
from __future__ import annotations

import math

import torch

NO_ENTRY = torch.iinfo(torch.int32).max  # the "index" of the sentinels: larger than any real one


def chunk_size(n: int) -> int:
    """C, a power of two near sqrt(n): a query scans 2C slots and n/C chunk counts."""
    return 1 << max(3, math.ceil(math.log2(math.sqrt(n + 2))))


def _sorted_copy(x: torch.Tensor, descending: bool, width: int, fill: float):
    """One sorted copy, padded to `width` slots: slot n is an always-alive sentinel (value
    `fill`), the slots after it are dead padding. Returns (values, next distinct values,
    original indices (int32), sort order)."""
    r, n = x.shape
    dev = x.device
    sv, order = torch.sort(x, dim=1, descending=descending, stable=True)
    val = torch.full((r, width + 1), fill, dtype=torch.float32, device=dev)
    val[:, :n] = sv
    # the value of the next run of a different value (the sentinel's after the last run)
    pos = torch.arange(n + 1, dtype=torch.int64, device=dev).expand(r, n + 1)
    start = torch.ones((r, n + 1), dtype=torch.bool, device=dev)
    start[:, 1:n] = sv[:, 1:] != sv[:, :-1]
    first = torch.where(start, pos, n)
    suffix = torch.flip(torch.cummin(torch.flip(first, [1]), dim=1).values, [1])
    following = torch.cat([suffix[:, 1:], torch.full((r, 1), n, dtype=torch.int64, device=dev)], dim=1)
    nextval = torch.full((r, width), fill, dtype=torch.float32, device=dev)
    nextval[:, :n + 1] = val.gather(1, following)
    idx = torch.full((r, width), NO_ENTRY, dtype=torch.int32, device=dev)
    idx[:, :n] = order
    return val[:, :width], nextval, idx, order


def greedy_match(x: torch.Tensor, g: torch.Tensor, visit: torch.Tensor) -> torch.Tensor:
    """Picked original indices [r, k] (int64) in pick order. x: float32 [r, n]; g: float32 grids
    [r, k] (ascending); visit: grid indices [r, k] in visit order; k < n."""
    r, n = x.shape
    k = visit.shape[1]
    dev = x.device
    C = chunk_size(n)
    log_c = C.bit_length() - 1
    width = (n + 2 + C - 1) // C * C  # n entries, the sentinel, padding
    n_chunks = width // C
    R = 2 * r  # lane 2i: row i's F copy (entries >= g); lane 2i + 1: its B copy (entries < g)

    val_f, next_f, idx_f, order_f = _sorted_copy(x, False, width, math.inf)
    val_b, next_b, idx_b, order_b = _sorted_copy(x, True, width, -math.inf)
    # [2, R * width]: per slot its value and the next distinct value / its index and the offset
    # from its slot to the same entry's slot in the other copy of the row
    valnext = torch.stack([torch.stack([val_f, val_b], 1), torch.stack([next_f, next_b], 1)]).view(2, -1)
    rows = torch.arange(r, device=dev)[:, None]
    ramp = torch.arange(n, dtype=torch.int32, device=dev).expand(r, n)
    inv_f = torch.empty((r, n), dtype=torch.int32, device=dev)
    inv_b = torch.empty((r, n), dtype=torch.int32, device=dev)
    inv_f[rows, order_f] = ramp
    inv_b[rows, order_b] = ramp
    delta = torch.zeros((r, 2, width), dtype=torch.int32, device=dev)
    delta[:, 0, :n] = width + inv_b.gather(1, order_f) - ramp
    delta[:, 1, :n] = inv_f.gather(1, order_b) - width - ramp
    entdelta = torch.stack([torch.stack([idx_f, idx_b], 1), delta]).view(2, -1)
    del val_f, val_b, next_f, next_b, idx_f, idx_b, inv_f, inv_b, delta

    alive = torch.zeros((R, width), dtype=torch.bool, device=dev)
    alive[:, :n + 1] = True
    count = alive.view(R, n_chunks, C).sum(dim=2, dtype=torch.int32)
    alive = alive.view(R * n_chunks, C)

    # per visit step (rows contiguous in t): the query slot of every lane, [own chunk, (filled in
    # per step) first live chunk after it], and the grid value
    ins = torch.searchsorted(valnext[0].view(r, 2, width)[:, 0, :n].contiguous(), g.contiguous())
    ins = ins.gather(1, visit).to(torch.int32)
    query = torch.stack([ins, n - ins], dim=2).permute(1, 0, 2).reshape(k, R, 1).contiguous()
    chunks = torch.zeros((k, R, 2), dtype=torch.int32, device=dev)
    chunks[:, :, 0] = query[:, :, 0] >> log_c
    gq = g.gather(1, visit).t().contiguous()[:, None, :, None]

    base_slot = torch.arange(R, dtype=torch.int64, device=dev) * width
    base_chunk = (torch.arange(R, dtype=torch.int64, device=dev) * n_chunks)[:, None]
    lane_up = torch.arange(r, dtype=torch.int64, device=dev) * 2
    lane_down = lane_up + 1
    chunk_ids = torch.arange(n_chunks, dtype=torch.int32, device=dev)[None, :]
    in_chunk = torch.arange(C, dtype=torch.int32, device=dev)[None, None, :]
    minus_one = torch.full((2 * r,), -1, dtype=torch.int32, device=dev)
    big = torch.tensor(NO_ENTRY, dtype=torch.int32, device=dev)
    last_chunk = torch.tensor(n_chunks - 1, dtype=torch.int32, device=dev)
    picked = torch.empty((k, r), dtype=torch.int32, device=dev)
    dist = torch.empty((k, 2, r, 2), dtype=torch.float32, device=dev)  # |value - g|, |next - g|
    d_min = torch.empty((k, r), dtype=torch.float32, device=dev)
    taken = torch.empty((2, r), dtype=torch.int64, device=dev)
    alive_flat = alive.view(-1)
    count_flat = count.view(-1)
    for t in range(k):
        q = query[t]
        cc = chunks[t]
        # first alive slot at or after q, in every lane: q's own chunk, else the first live one after
        later = (count > 0) & (chunk_ids > cc[:, :1])
        torch.amin(torch.where(later, chunk_ids, last_chunk), dim=1, out=cc[:, 1])
        live = alive.index_select(0, (base_chunk + cc).view(-1)).view(R, 2 * C)
        slot = ((cc << log_c)[:, :, None] + in_chunk).view(R, 2 * C)
        found = torch.where(live & (slot >= q), slot, big).amin(dim=1)
        flat = base_slot + found
        dt = dist[t]
        torch.abs(valnext.index_select(1, flat).view(2, r, 2) - gq[t], out=dt)
        ent, off = entdelta.index_select(1, flat)
        e_up, e_down = ent.view(r, 2).unbind(1)
        d_up, d_down = dt[0].unbind(1)
        down = (d_down < d_up) | ((d_down == d_up) & (e_down < e_up))
        torch.minimum(d_up, d_down, out=d_min[t])
        lane = torch.where(down, lane_down, lane_up)
        torch.index_select(ent, 0, lane, out=picked[t])
        torch.index_select(flat, 0, lane, out=taken[0])
        torch.add(taken[0], off.index_select(0, lane), out=taken[1])
        alive_flat.index_fill_(0, taken.view(-1), False)
        count_flat.index_add_(0, taken.view(-1) >> log_c, minus_one)
    # a different value at the minimal distance right after a candidate: the tie may reach
    # entries the queries did not look at; such rows are redone by the literal scan
    flag = (dist[:, 1] == d_min[:, :, None]).any(dim=2).any(dim=0)
    picked = picked.t().long()
    bad = flag.nonzero(as_tuple=True)[0]
    if bad.numel():
        picked[bad] = greedy_full_scan(x[bad], g[bad], visit[bad])
    return picked


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
