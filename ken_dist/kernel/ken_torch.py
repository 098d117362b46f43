"""The torch path of the KEN row-selection rule (shared/spec/ken-selection.md): any device, exact.

Same masks as the numba CPU path (ken_cpu.py / ken_numba.py), bit for bit, from torch ops only, batched
over rows so that one call keeps a GPU busy. The steps and where their exactness comes from:

1. Bandwidth: numpy's float32 `np.std` re-done in torch with numpy's own summation order
   (pairwise, 8 accumulators, blocks of at most 128; `_np_sum_f32`). Everything numpy rounds to
   float32 is rounded to float32 here at the same place.
2. Grid: numpy.linspace in float32, op for op (`grids`).
3. Rounded densities: a Hermite/Taylor fast Gauss transform in float64 with a rigorous error
   bound, and the literal float64 sum wherever the bound cannot decide the rounding
   (ken_torch_density).
4. Visit order: stable sort by rounded density, highest first.
5. Greedy match: a k-step loop over all rows at once, each step a fixed set of ~20 ops on
   O(sqrt n) slots per row, with an exact full-scan fallback for the rare rows whose float32
   distance ties it cannot settle in its windows (ken_torch_greedy).

Floating-point traps, and how they are avoided:
- Every float32 result numpy produces by one IEEE operation is produced here by one IEEE
  operation (float32 add/sub/mul), or by the same operation in float64 rounded once to float32
  (division, sqrt, the 1.06*s product). Rounding a float64 result of +,-,*,/,sqrt of float32
  inputs to float32 equals the float32 operation (53 >= 2*24 + 2: double rounding is innocuous),
  so both forms agree with numpy on every backend.
- Multiply and add stay separate torch ops (separate kernels in eager mode), never addcmul,
  torch.compile or a fused kernel: a GPU compiler may contract a*b+c into one FMA, which rounds
  once instead of twice and would move grid points by an ulp. numpy rounds twice.
- Divisions are by device tensors, never by Python scalars: on CUDA, `tensor / python_float`
  is computed as tensor * (1/x) (one extra rounding), which is not IEEE division.
- Subnormal float32 values are kept by torch's CPU and CUDA kernels by default, as by numpy;
  `torch.set_flush_denormal(True)` would break equality on rows holding subnormals.
"""
from __future__ import annotations

import functools

import torch

from ken_dist.kernel import ken_torch_density, ken_torch_greedy

PW_BLOCKSIZE = 128  # numpy's pairwise summation: leaves of at most 128 elements, 8 accumulators
SILVERMAN = 1.06


# ----------------------------------------------------------------------------- numpy's float32 sum
@functools.lru_cache(maxsize=128)
def _pairwise_plan(n: int):
    """The tree numpy's pairwise_sum builds for n >= 8 elements (it depends on n only).

    Returns (leaf_groups, levels, n_nodes, root): leaf_groups maps a leaf length m to
    (offsets, node ids); levels lists, by height, (parent ids, left ids, right ids).
    """
    leaves: dict[int, tuple[list[int], list[int]]] = {}
    internal: list[tuple[int, int, int, int]] = []  # (height, parent, left, right)
    counter = [0]

    def build(offset: int, m: int) -> tuple[int, int]:
        node = counter[0]
        counter[0] += 1
        if m <= PW_BLOCKSIZE:
            offs, ids = leaves.setdefault(m, ([], []))
            offs.append(offset)
            ids.append(node)
            return node, 0
        n2 = m // 2
        n2 -= n2 % 8
        left, hl = build(offset, n2)
        right, hr = build(offset + n2, m - n2)
        height = 1 + max(hl, hr)
        internal.append((height, node, left, right))
        return node, height

    root, top = build(0, n)
    groups = tuple((m, tuple(offs), tuple(ids)) for m, (offs, ids) in sorted(leaves.items()))
    levels = []
    for height in range(1, top + 1):
        rows = [t for t in internal if t[0] == height]
        levels.append(tuple(tuple(t[i] for t in rows) for i in (1, 2, 3)))
    return groups, tuple(levels), counter[0], root


@functools.lru_cache(maxsize=256)
def _plan_tensors(n: int, device: torch.device):
    groups, levels, n_nodes, root = _pairwise_plan(n)
    tgroups = []
    for m, offs, ids in groups:
        idx = (torch.tensor(offs, dtype=torch.int64)[:, None] + torch.arange(m)[None, :]).reshape(-1)
        tgroups.append((m, len(offs), idx.to(device), torch.tensor(ids, dtype=torch.int64, device=device)))
    tlevels = [tuple(torch.tensor(t, dtype=torch.int64, device=device) for t in lv) for lv in levels]
    return tgroups, tlevels, n_nodes, root


def _np_sum_f32(x: torch.Tensor) -> torch.Tensor:
    """np.add.reduce(x, axis=1) of a float32 [r, n] block, bit for bit: numpy's pairwise_sum
    (loops_utils.h.src) applied to each whole row, added to the identity 0.0."""
    r, n = x.shape
    if n < 8:
        res = torch.zeros(r, dtype=torch.float32, device=x.device)
        for i in range(n):
            res = res + x[:, i]
        return res
    groups, levels, n_nodes, root = _plan_tensors(n, x.device)
    vals = torch.empty((r, n_nodes), dtype=torch.float32, device=x.device)
    for m, count, idx, ids in groups:
        leaf = x.index_select(1, idx).view(r, count, m)
        acc = leaf[:, :, 0:8].clone()
        full = m - m % 8
        for i in range(8, full, 8):
            acc += leaf[:, :, i:i + 8]
        a = acc.unbind(2)
        res = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
        for i in range(full, m):
            res = res + leaf[:, :, i]
        vals.index_copy_(1, ids, res)
    for parents, lefts, rights in levels:
        vals.index_copy_(1, parents, vals.index_select(1, lefts) + vals.index_select(1, rights))
    return vals[:, root] + 0.0


def np_std_f32(x: torch.Tensor) -> torch.Tensor:
    """numpy.std(x, axis=1) of a float32 [r, n] block, bit for bit (numpy's _var: float32 sums,
    mean = sum / n, squared deviations, sum / n, sqrt; each rounded to float32 as numpy does)."""
    r, n = x.shape
    count = torch.full((r,), float(n), dtype=torch.float64, device=x.device)
    mean = (_np_sum_f32(x).double() / count).float()
    dev = x - mean[:, None]
    sq = dev * dev
    var = (_np_sum_f32(sq).double() / count).float()
    return var.double().sqrt().float()


# ----------------------------------------------------------------------------- bandwidth and grid
def bandwidths(x: torch.Tensor) -> torch.Tensor:
    """float64 h per row: float64(float32(1.06 * s)) * n**(-1/5), s numpy's float32 std."""
    n = x.shape[1]
    s = np_std_f32(x)
    # the product of two float32 values is exact in float64; one rounding to float32 follows
    hs = (s.double() * float(torch.tensor(SILVERMAN, dtype=torch.float32))).float()
    return hs.double() * (n ** (-1 / 5))


def degenerate_rows(h: torch.Tensor) -> torch.Tensor:
    """Rows with no density (s = 0 and friends), as ken_cpu.ken_masks decides them."""
    return ~((h > 0) & (2 * h * h > 0) & torch.isfinite(1 / h))


def grids(x: torch.Tensor, k: int) -> torch.Tensor:
    """numpy.linspace(min, max, k) of every row in float32, numpy's arithmetic (see ken_cpu.grids)."""
    r = x.shape[0]
    lo = x.amin(dim=1)
    hi = x.amax(dim=1)
    if k == 1:
        return lo[:, None].clone()
    div = torch.full((r,), float(k - 1), dtype=torch.float64, device=x.device)
    delta = hi - lo
    step = (delta.double() / div).float()
    ramp = torch.arange(k, dtype=torch.float32, device=x.device)[None, :]
    out = ramp * step[:, None]  # separate op from the add below: no FMA (see module doc)
    # numpy divides first when the step underflows to zero (gh-5437)
    under = (ramp.double() / div[:, None]).float() * delta[:, None]
    out = torch.where((step == 0)[:, None], under, out)
    out = out + lo[:, None]
    out[:, -1] = hi
    return out


# ----------------------------------------------------------------------------- masks
def _rows_per_batch(n: int, k: int, device: torch.device) -> int:
    """Rows per batch. On a GPU, as many as memory allows: the greedy's k steps cost about the
    same kernel launches for 1 row or 100k rows. About 40 bytes per value and 64 per grid point
    stay allocated through the greedy (ken_torch_greedy); the density stage works in chunks."""
    per_row = 40 * n + 64 * k + 4096
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = max(256 << 20, int(free * 0.45))
    else:
        budget = 512 << 20
    return int(max(1, budget // per_row))


def select_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Picked original indices [r, k] (in pick order) of a float32 block with 1 <= k < n."""
    r, n = x.shape
    h = bandwidths(x)
    degenerate = degenerate_rows(h)
    h = torch.where(degenerate, torch.ones_like(h), h)  # placeholder, overridden below
    g = grids(x, k)
    if k == 1:
        visit = torch.zeros((r, 1), dtype=torch.int64, device=x.device)
    else:
        visit = ken_torch_density.visit_order(x, g, h)
    picked = ken_torch_greedy.greedy_match(x, g, visit)
    first = torch.arange(k, dtype=torch.int64, device=x.device).expand(r, k)
    return torch.where(degenerate[:, None], first, picked)


def ken_masks(rows: torch.Tensor, k: int, reference: bool) -> torch.Tensor:
    """Keep masks [r, n] (bool, on rows.device) of finite float32 rows, 1 <= k (k >= n keeps all)."""
    if rows.dim() != 2:
        raise ValueError(f"ken_masks expects a 2-D [rows, n] block, got shape {tuple(rows.shape)}")
    x = rows.to(torch.float32).contiguous()
    r, n = x.shape
    if k >= n:  # every entry picked: the value mapping keeps every non-zero entry
        return (x != 0) if reference else torch.ones((r, n), dtype=torch.bool, device=x.device)
    mask = torch.zeros((r, n), dtype=torch.bool, device=x.device)
    batches = -(-r // _rows_per_batch(n, k, x.device))
    step = -(-r // batches)  # equal batches: each costs k loop steps whatever its size
    for a in range(0, r, step):
        block = mask[a:a + step]
        block.scatter_(1, select_indices(x[a:a + step], k), True)
        if reference:
            block.copy_(value_mask(x[a:a + step], block))
    return mask


def value_mask(x: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """The published code's mapping back by value (ken_cpu.value_mask): every entry equal to a picked
    value is kept, and entries equal to 0.0 count as not kept."""
    r, n = x.shape
    sv, order = torch.sort(x, dim=1, stable=True)
    start = torch.ones((r, n), dtype=torch.bool, device=x.device)
    start[:, 1:] = sv[:, 1:] != sv[:, :-1]
    block = torch.cumsum(start, dim=1) - 1
    hit = torch.zeros((r, n), dtype=torch.int32, device=x.device)
    hit.scatter_add_(1, block, picked.gather(1, order).to(torch.int32))
    keep_sorted = hit.gather(1, block) > 0
    out = torch.zeros_like(picked)
    out.scatter_(1, order, keep_sorted)
    return out & (x != 0)
