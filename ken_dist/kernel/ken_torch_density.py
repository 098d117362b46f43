"""The grid points' visit order by rounded KDE density, batched over rows in torch, exact.

The spec's density is the literal float64 sum f(x) = sum_i exp(-(x - v_i)^2 / (2 h^2)) / (n h sqrt(2 pi)),
rounded half to even, and only the order of the roundings matters. So an estimate with a
rigorous error bound is enough wherever the bound keeps it away from a half-integer, or keeps
its possible roundings apart from every other point's; the remaining grid points are
recomputed by the literal float64 formula (`_literal_density`, chunked to bound memory).

The estimate is a fast Gauss transform (Hermite source moments -> Taylor target coefficients)
on boxes of width h, all in float64, all dense torch ops over [rows, boxes]:
  z = (x - min)/h; box b = floor(z + 1/2) (centre b, offset s = z - b, |s| <= 1/2);
  moments   M[b, p] = sum_{v in box b} s^p / p!                               (p < P)
  local     L[c, q] = sum_{|d| <= U} sum_p M[c + d, p] T[d, p, q]              (q < Q)
            T[d, p, q] = (-1)^q He_{p+q}(-d) exp(-d^2/2) / q!   (a constant table)
  estimate  S(x) = sum_q L[c, q] tau^q, target box c, offset tau = z_x - c.
This is exact algebra for exp(-(u + tau - s)^2 / 2) = sum_{p,q} s^p/p! tau^q/q! (-1)^q phi_{p+q}(u),
phi_m(u) = He_m(u) exp(-u^2/2), u = c - b, truncated to p < P, q < Q and |c - b| <= U.

Error bound (per source, in units of the kernel's maximum 1), with a = sqrt2*max|s|, b = sqrt2*max|tau|:
- truncation: Cramer's inequality |He_m(u)| exp(-u^2/4) <= K sqrt(m!) (K = 1.086435) and
  (p+q)! <= 2^(p+q) p! q! give |term(p,q)| <= K a^p/sqrt(p!) * b^q/sqrt(q!), so the dropped
  terms sum to at most K * (A_{>=P}(a) A_0(b) + A_0(a) A_{>=Q}(b)), A_{>=m}(a) = sum_{p>=m} a^p/sqrt(p!);
- far field: a source in a box |c - b| > U is at distance >= (U + 1 - max|s| - max|tau|) h;
- float64 rounding: every quantity is a sum of at most N = n + P(2U+3) + 2Q + 64 rounded
  operations on terms whose absolute values add up to at most G = K A_0(a) A_0(b) per source,
  so the rounding error is at most gamma_N * G per source (gamma_N = N u / (1 - N u)); the
  float64 offsets s and tau carry at most 2u(boxes + 2) of absolute error, times the kernel's
  slope exp(-1/2) <= 1.3;
- the literal float64 sum differs from the real-number density by at most (n + 32) 4u d0
  (d0 = 1/(h sqrt(2 pi)), the largest density), so a decided rounding is also the literal sum's.
With P = Q = 16 and U = 7 the bound is about 5e-9 * d0: almost every rounding is decided.
A rounding is decided where f - bound and f + bound round alike.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

SQRT_2PI = math.sqrt(2.0 * math.pi)
P_TERMS = 16  # source (Hermite) terms
Q_TERMS = 16  # target (Taylor) terms
U_NEAR = 7  # boxes within this distance interact through the expansion
CRAMER = 1.086436  # rounded up
U64 = 2.0 ** -53
# torch's literal sum (its own order, its exp) is within TORCH_SUM_ULPS * n + 16 units of
# roundoff (relative) of the spec's left-to-right sum: all terms are positive
TORCH_SUM_ULPS = 2
SERIES_TERMS = 64  # A_0 and the tails are summed to 64 terms, then bounded geometrically
# Work sizes: float64 elements per chunk (the expansion and the literal fix-up).
EXPANSION_ELEMS = {"cuda": 1 << 27, "cpu": 1 << 23}
LITERAL_ELEMS = {"cuda": 1 << 26, "cpu": 1 << 22}


def _elems(table: dict, device: torch.device) -> int:
    return table.get(device.type, table["cpu"])


@functools.lru_cache(maxsize=8)
def _table_cpu(p_terms: int, q_terms: int, u_near: int) -> torch.Tensor:
    """T[d + U, p, q] = (-1)^q He_{p+q}(-d) exp(-d^2/2) / q! for |d| <= U, in float64.

    He_m at an integer is an integer (integer coefficients), computed exactly with Python ints,
    so each entry carries only the roundings of float(), exp and the division (a few ulp)."""
    m_max = p_terms + q_terms - 2
    out = torch.empty((2 * u_near + 1, p_terms, q_terms), dtype=torch.float64)
    for d in range(-u_near, u_near + 1):
        y = -d
        he = [1, y]
        for m in range(1, m_max):
            he.append(y * he[m] - m * he[m - 1])
        e = math.exp(-0.5 * y * y)
        for p in range(p_terms):
            for q in range(q_terms):
                out[d + u_near, p, q] = (-1) ** q * (float(he[p + q]) * e) / math.factorial(q)
    return out


@functools.lru_cache(maxsize=16)
def _table_on(device: torch.device, p_terms: int, q_terms: int, u_near: int) -> torch.Tensor:
    return _table_cpu(p_terms, q_terms, u_near).to(device)


def _table(device: torch.device) -> torch.Tensor:
    return _table_on(device, P_TERMS, Q_TERMS, U_NEAR)


def _series_bounds(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper bounds of A_0(a) = sum_p a^p/sqrt(p!) and A_{>=m}(a), per row (inf if not finite)."""
    p = torch.arange(SERIES_TERMS, dtype=torch.float64, device=a.device)
    log_a = torch.log(a.clamp_min(1e-300))[:, None]
    terms = torch.exp(p[None, :] * log_a - 0.5 * torch.lgamma(p + 1)[None, :])
    terms = torch.where(a[:, None] > 0, terms, (p[None, :] == 0).to(torch.float64))
    # the rest: term SERIES_TERMS is term SERIES_TERMS-1 times a/sqrt(SERIES_TERMS), and each
    # later ratio a/sqrt(p+1) is at most a/sqrt(SERIES_TERMS + 1): a geometric bound
    ratio = a / math.sqrt(SERIES_TERMS + 1)
    rest = torch.where(ratio < 0.5, terms[:, -1] * (a / math.sqrt(SERIES_TERMS)) / (1 - ratio),
                       torch.full_like(a, math.inf))
    # 1 + 1e-12: the series is summed in float64 (64 positive terms)
    full = (terms.sum(dim=1) + rest) * (1 + 1e-12)
    tail = (terms[:, m:].sum(dim=1) + rest) * (1 + 1e-12)
    return full, tail


def _expansion(x64: torch.Tensor, lo: torch.Tensor, g64: torch.Tensor, h: torch.Tensor, nb: int):
    """Fast Gauss transform estimate S of sum_i exp(-(g - v_i)^2/(2h^2)) and its error bound."""
    r, n = x64.shape
    dev = x64.device
    z = (x64 - lo[:, None]) / h[:, None]
    box = torch.floor(z + 0.5).clamp_(0, nb - 1)
    s = z - box
    box = box.long()
    s_max = s.abs().amax(dim=1)

    moments = torch.zeros((P_TERMS, r, nb), dtype=torch.float64, device=dev)
    term = torch.ones_like(s)
    for p in range(P_TERMS):
        moments[p].scatter_add_(1, box, term)
        if p + 1 < P_TERMS:
            term = term * s / (p + 1)
    span = 2 * U_NEAR + 1
    padded = torch.zeros((r, nb + 2 * U_NEAR, P_TERMS), dtype=torch.float64, device=dev)
    padded[:, U_NEAR:U_NEAR + nb] = moments.permute(1, 2, 0)
    # every target box's 2U+1 source boxes side by side: one GEMM [r*nb, (2U+1)P] x [(2U+1)P, Q]
    near = padded.unfold(1, span, 1).permute(0, 1, 3, 2).reshape(r * nb, span * P_TERMS)
    local = (near @ _table(dev).reshape(span * P_TERMS, Q_TERMS)).view(r, nb, Q_TERMS)
    local = local.permute(2, 0, 1).contiguous()  # [Q, r, nb]

    zg = (g64 - lo[:, None]) / h[:, None]
    tbox = torch.floor(zg + 0.5).clamp_(0, nb - 1)
    tau = zg - tbox
    tbox = tbox.long()
    t_max = tau.abs().amax(dim=1)
    est = local[Q_TERMS - 1].gather(1, tbox)
    for q in range(Q_TERMS - 2, -1, -1):
        est = est * tau + local[q].gather(1, tbox)

    a = math.sqrt(2.0) * s_max * (1 + 1e-9)
    b = math.sqrt(2.0) * t_max * (1 + 1e-9)
    a_full, a_tail = _series_bounds(a, P_TERMS)
    b_full, b_tail = _series_bounds(b, Q_TERMS)
    trunc = CRAMER * (a_tail * b_full + a_full * b_tail)
    gap = (U_NEAR + 1) - s_max - t_max
    far = torch.where(gap > 0, torch.exp(-0.5 * gap.clamp_min(0) ** 2), torch.ones_like(gap))
    chain = n + P_TERMS * (2 * U_NEAR + 3) + 2 * Q_TERMS + 64
    gamma = chain * U64 / (1 - chain * U64)
    rounding = gamma * CRAMER * a_full * b_full + 2.6 * U64 * (nb + 2)
    err_sum = n * (trunc + far + rounding)
    return est, err_sum


def _literal_density(x: torch.Tensor, rows: torch.Tensor, pts: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The spec's float64 formula at (row, point) pairs, in ken_numba.exact_density's operation
    order per term; the sum over the row is torch's (pairwise/tree), not a left-to-right loop."""
    n = x.shape[1]
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=x.device)
    step = max(1, _elems(LITERAL_ELEMS, x.device) // n)
    for a in range(0, rows.shape[0], step):
        ri = rows[a:a + step]
        hv = h[ri]
        two_h2 = (2.0 * hv) * hv
        d = pts[a:a + step, None] - x[ri].double()
        total = torch.exp(-(d * d) / two_h2[:, None]).sum(dim=1)
        out[a:a + step] = total / ((n * hv) * SQRT_2PI)
    return out


def visit_order(x: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Grid indices [r, k] of float32 rows x at float32 grids g, bandwidths h (float64, all > 0),
    by rounded (half to even) KDE density, highest first, ties in ascending index: the order of
    the literal float64 sums' roundings.

    Only that order matters. Where the bound leaves a rounding undecided, the rounding lies in a
    small interval of integers; the literal sum is paid only where another point's interval meets
    it (ken_numba._order_by_density: the same rule), so rows with huge-integer densities (tiny
    bandwidths) stay fast."""
    r, n = x.shape
    k = g.shape[1]
    dev = x.device
    lo = x.amin(dim=1).double()
    hi = x.amax(dim=1).double()
    norm = (n * h) * SQRT_2PI
    d0 = 1.0 / (h * SQRT_2PI)
    nb_row = torch.floor((hi - lo) / h + 0.5) + 1
    # Samuelson: max - min <= 2 s sqrt(n), so boxes <= 2 sqrt(n) n^0.2 / 1.06 + 2; beyond a
    # generous cap (float32 std far from the true one) the row goes to the literal sum.
    cap = int(4 * math.sqrt(n) * n ** 0.2) + 64
    too_many = ~(nb_row <= cap)

    least = torch.empty((r, k), dtype=torch.float64, device=dev)  # every rounding still possible
    most = torch.empty((r, k), dtype=torch.float64, device=dev)
    unusable = torch.empty((r, k), dtype=torch.bool, device=dev)
    nb_all = int(torch.where(too_many, torch.ones_like(nb_row), nb_row).max().item())
    per_row = n * 6 + k * 6 + nb_all * (P_TERMS * (2 * U_NEAR + 4) + Q_TERMS * 2)
    step = max(1, _elems(EXPANSION_ELEMS, dev) // per_row)
    for a in range(0, r, step):
        sl = slice(a, a + step)
        nb = nb_all if step >= r else int(torch.where(too_many[sl], torch.ones_like(nb_row[sl]), nb_row[sl]).max().item())
        est, err_sum = _expansion(x[sl].double(), lo[sl], g[sl].double(), h[sl], nb)
        f = est / norm[sl, None]
        err = (err_sum / norm[sl] + (n + 32) * 4 * U64 * d0[sl])[:, None] + 8 * U64 * f.abs()
        # rounding is monotone; the bound widened for the float64 rounding of f -/+ err
        reach = err + 4 * 2 * U64 * (f.abs() + err)
        least[sl] = torch.round(f - reach)
        most[sl] = torch.round(f + reach)
        unusable[sl] = ~(torch.isfinite(f) & torch.isfinite(err) & ~too_many[sl, None])
    _settle_by_literal_sums(x, g, h, least, most, unusable)
    order = torch.sort(-least, dim=1, stable=True).indices
    open_ = least < most
    if not open_.any():
        return order
    # sweep by least, highest first: an interval meets another if the next one's least is within
    # it, or one of lower (or equal, earlier) least reaches it
    lo_s = least.gather(1, order)
    hi_s = most.gather(1, order)
    below = torch.flip(torch.cummax(torch.flip(hi_s, [1]), dim=1).values, [1])
    meets = torch.zeros_like(open_)
    meets[:, :-1] = lo_s[:, :-1] <= below[:, 1:]
    meets[:, 1:] |= lo_s[:, :-1] <= hi_s[:, 1:]
    if not _settle_by_literal_sums(x, g, h, least, most, open_ & torch.zeros_like(open_).scatter_(1, order, meets)):
        return order  # every open point keeps its least: it orders as its true rounding would
    return torch.sort(-least, dim=1, stable=True).indices


def _settle_by_literal_sums(x, g, h, least, most, where: torch.Tensor) -> bool:
    """least = most = the literal sum's rounding at the points `where`; whether there were any.

    torch sums the terms in its own order (and its exp may differ from libm's by an ulp or two),
    so its result is only near the spec's left-to-right sum (TORCH_SUM_ULPS); where that leaves
    the rounding open, the point is summed left to right on the CPU."""
    rows, cols = where.nonzero(as_tuple=True)
    if not rows.numel():
        return False
    dens = _literal_density(x, rows, g[rows, cols].double(), h)
    reach = (TORCH_SUM_ULPS * x.shape[1] + 16) * U64 * dens.abs() + 1e-300
    exact = torch.round(dens)
    unsure = (torch.round(dens - reach) != torch.round(dens + reach)) | ~torch.isfinite(dens)
    if unsure.any():
        from ken_dist.kernel import ken_numba

        for i in unsure.nonzero().flatten().tolist():
            r, c = int(rows[i]), int(cols[i])
            exact[i] = float(np.rint(ken_numba.exact_density(x[r].cpu().numpy(), float(g[r, c]), float(h[r]))))
    least[rows, cols] = exact
    most[rows, cols] = exact
    return True
