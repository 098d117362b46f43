"""The KEN greedy match in torch: all rows of a block step through their k picks together.

The rule: grid points in visit order each take, among the entries not yet taken, the one
nearest in float32 distance |v - g|, the smallest original index among equal distances.

Design, for a GPU: one loop over the k visits, each step a fixed sequence of ~19 torch kernels
on [rows, ~4 sqrt(n)] tensors, no host synchronisation inside. A step's kernel launches cost the
same for 1 row or 200k rows, so big blocks amortise them; the bytes a step moves (~11 KB per
row at n = 4096) are what remains. Per row, two sorted copies of the row are kept:

- F: entries sorted by (value ascending, index ascending): from g's insertion slot on, the
  entries at or above g, nearest first, equal values by index.
- B: entries sorted by (value descending, index ascending): from slot n - (insertion slot) on,
  the entries below g, nearest first, equal values by index.

Each copy is cut into chunks of C slots with a live count per chunk. A lane's (row and copy's)
window is the chunk of its query slot plus the first later chunk that still has a live entry
(a sentinel at the end of each copy never dies); the chunks in between hold no live entry, so
the window holds the lane's nearest live entry. A taken entry's value is overwritten with +inf
(F) / -inf (B), so its distance is infinite and no alive mask is needed. The pick is the
smallest index among the window slots at the minimal distance of the row's two windows (slots
of the query chunk that lie on the other side of g are live candidates too, so they do no harm).

float32 distances are monotone along a lane, so all entries at the minimal distance (equal
values, or distinct values whose float32 distances rounded to the same number) form runs that
start in the windows. A run can go on past a window only if the slot right after the window is
at the minimal distance too; that is checked once after the loop, and those rows (rare) are
redone by `greedy_full_scan`, the rule applied literally (O(n) per step).
"""
from __future__ import annotations

import math

import torch

NO_ENTRY = torch.iinfo(torch.int32).max  # the "index" of the sentinels: larger than any real one
SETUP_ELEMS = 1 << 24  # values per setup slice (the sorts and their temporaries)


def chunk_size(n: int) -> int:
    """C, a power of two near sqrt(n/6): a step reads 4C window slots (about 50 bytes of work
    each) and scans 2n/C chunk counts (about 14 bytes each); this balances the two."""
    return 1 << max(3, round(math.log2(math.sqrt(n / 6 + 1))))


def _sorted_copy(x: torch.Tensor, descending: bool, fill: float, val_out, idx_out):
    """Write one sorted copy of the rows into [r, width] slices (values, original indices).
    Slot n is a sentinel (value `fill`, index NO_ENTRY), later slots padding of the same kind.
    Returns the sort order."""
    n = x.shape[1]
    sv, order = torch.sort(x, dim=1, descending=descending, stable=True)
    val_out.fill_(fill)
    val_out[:, :n] = sv
    idx_out.fill_(NO_ENTRY)
    idx_out[:, :n] = order
    return order


def _setup(x, g, visit, val, idx, slots, first_row, ins):
    """Fill the loop's per-row state for a slice of rows (see greedy_match)."""
    r, n = x.shape
    width = val.shape[-1]
    order_f = _sorted_copy(x, False, math.inf, val[:, 0], idx[:, 0])
    order_b = _sorted_copy(x, True, -math.inf, val[:, 1], idx[:, 1])
    # flat slot (in val.view(-1) of the whole block) of each original index, in F and in B
    rows = torch.arange(r, device=x.device)[:, None]
    ramp = torch.arange(n, dtype=torch.int64, device=x.device).expand(r, n)
    base = (torch.arange(first_row, first_row + r, dtype=torch.int64, device=x.device) * (2 * width))[:, None]
    slots[rows, 0, order_f] = base + ramp
    slots[rows, 1, order_b] = base + width + ramp
    # insertion slot of each grid point in F (the number of entries below it), in visit order
    ins.copy_(torch.searchsorted(val[:, 0, :n].contiguous(), g.contiguous()).gather(1, visit))


def greedy_match(x: torch.Tensor, g: torch.Tensor, visit: torch.Tensor) -> torch.Tensor:
    """Picked original indices [r, k] (int64) in pick order. x: float32 [r, n]; g: float32 grids
    [r, k] (ascending); visit: grid indices [r, k] in visit order; k < n."""
    r, n = x.shape
    k = visit.shape[1]
    dev = x.device
    if n >= 1 << 26:
        raise ValueError(f"rows of {n} values are too long for the torch greedy (at most 2**26 - 1)")
    C = chunk_size(n)
    log_c = C.bit_length() - 1
    width = (n + 2 + C - 1) // C * C  # n entries, the sentinel, padding
    n_chunks = width // C
    R = 2 * r  # lane 2i: row i's F copy (entries >= g); lane 2i + 1: its B copy (entries < g)

    val = torch.empty((r, 2, width), dtype=torch.float32, device=dev)
    idx = torch.empty((r, 2, width), dtype=torch.int32, device=dev)  # original index per slot
    slots = torch.empty((r, 2, n), dtype=torch.int64, device=dev)  # original index -> F, B slot
    ins = torch.empty((r, k), dtype=torch.int32, device=dev)
    step = max(1, SETUP_ELEMS // (n + k))
    for a in range(0, r, step):
        b = min(r, a + step)
        _setup(x[a:b], g[a:b], visit[a:b], val[a:b], idx[a:b], slots[a:b], a, ins[a:b])
    # the value in the slot after each chunk (the fill value after a lane's last chunk), as
    # the entries were before any was taken
    first_next = val.view(R, n_chunks, C)[:, :, 0].roll(-1, dims=1)
    first_next[:, -1] = val.view(R, width)[:, -1]
    val_flat = val.view(-1)
    val = val.view(R * n_chunks, C)
    idx = idx.view(R * n_chunks, C)
    count = torch.zeros((R, n_chunks), dtype=torch.int32, device=dev)
    count.view(R, -1)[:, : (n + 1) // C] = C
    count[:, (n + 1) // C] += (n + 1) % C  # entries and the sentinel are alive

    # per visit step t (rows contiguous in t): each lane's query chunk (the chunk of its
    # insertion slot); column 1 receives, per step, the first live chunk after it
    query = torch.stack([ins, n - ins], dim=2).permute(1, 0, 2).reshape(k, R)
    del ins
    chunks = torch.zeros((k, R, 2), dtype=torch.int16, device=dev)
    chunks[:, :, 0] = query >> log_c
    del query
    gq = g.gather(1, visit).t().contiguous()[:, :, None]

    base_chunk = (torch.arange(R, dtype=torch.int64, device=dev) * n_chunks)[:, None]
    chunk_ids = torch.arange(n_chunks, dtype=torch.int16, device=dev)[None, :]
    minus_one = torch.full((2 * r,), -1, dtype=torch.int32, device=dev)
    dead = torch.tensor([math.inf, -math.inf], dtype=torch.float32, device=dev).repeat(r)
    big = torch.tensor(NO_ENTRY, dtype=torch.int32, device=dev)
    last_chunk = torch.tensor(n_chunks - 1, dtype=torch.int16, device=dev)
    picked = torch.empty((k, r, 1), dtype=torch.int32, device=dev)
    d_min = torch.empty((k, r, 1), dtype=torch.float32, device=dev)
    taken = torch.empty((r, 2, 1), dtype=torch.int64, device=dev)
    flat = taken.view(-1)  # per row: its F slot, its B slot
    count_flat = count.view(-1)
    # views per step, made once (indexing inside the loop costs Python time on every step)
    steps = [(cc, cc[:, :1], cc[:, 1], gq_t, dmin_t, picked_t)
             for cc, gq_t, dmin_t, picked_t in zip(chunks.unbind(0), gq.unbind(0), d_min.unbind(0), picked.unbind(0))]
    for cc, query_chunk, next_chunk, gq_t, dmin_t, picked_t in steps:
        # each lane's window: its query chunk and the first chunk after it with a live slot (the
        # sentinel's chunk at the latest); the chunks in between hold no live entry
        later = (count > 0) & (chunk_ids > query_chunk)
        torch.amin(torch.where(later, chunk_ids, last_chunk), dim=1, out=next_chunk)
        window = (base_chunk + cc).view(-1)
        # Taken entries hold +-inf, so their distance is infinite. The windows hold each lane's
        # nearest live entry (and maybe live entries of the other side: harmless, they are
        # candidates too); distances grow along a lane, so every live entry at the minimal
        # distance is in the windows, unless a run goes on past a window (checked after the loop)
        d = (val.index_select(0, window).view(r, 4 * C) - gq_t).abs()
        dmin = torch.amin(d, dim=1, keepdim=True, out=dmin_t)
        key = torch.where(d == dmin, idx.index_select(0, window).view(r, 4 * C), big)
        pk = torch.amin(key, dim=1, keepdim=True, out=picked_t)
        torch.gather(slots, 2, pk.long()[:, None, :].expand(r, 2, 1), out=taken)
        val_flat.index_put_((flat,), dead)
        count_flat.index_add_(0, flat >> log_c, minus_one)
    # A run of entries at the minimal distance may go on past a window's end only if the slot
    # right after the window is at that distance too. Such rows (rare: float32 rounding merging
    # the distances of values across a chunk boundary) get the literal scan.
    flag = torch.zeros(r, dtype=torch.bool, device=dev)
    span = max(1, SETUP_ELEMS // R)
    for a in range(0, k, span):
        after = first_next.gather(1, chunks[a:a + span, :, 1].t().long()).t().view(-1, r, 2)
        flag |= ((after - gq[a:a + span]).abs() == d_min[a:a + span]).any(dim=2).any(dim=0)
    picked = picked[:, :, 0].t().long()
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
