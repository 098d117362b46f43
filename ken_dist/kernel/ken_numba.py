"""The fast CPU path of the KEN row-selection rule (shared/spec/ken-selection.md), compiled with numba.

Why numba: the rule is a per-row sequence of data-dependent loops (a greedy match with
deletions, a density evaluated only where it is needed); numpy cannot express them without
Python-level loops, and a C extension would need a compiler at install time. numba gives
compiled loops from a wheel, caches the machine code on disk, and keeps the code readable.

Cost per row (n values, k grid points), all exact:
- bandwidth and grid use numpy itself, vectorized over the block, so their float32 rounding is
  numpy's by construction;
- density: a truncated Hermite expansion of the Gaussian sum over boxes one bandwidth wide,
  evaluated on a lattice of a few nodes per bandwidth and interpolated to the grid points
  (O(n*P + nodes*T*P + k*M) instead of O(n*k)). Each estimate carries a rigorous error bound,
  mostly in units of the bandwidth and the largest density; only the order of the rounded
  densities matters, so where the bound leaves that order open (a rounding undecided and
  another point's possible roundings within reach) the point takes a second look (the box
  expansions summed there, without interpolation), and only where that too leaves it open the
  literal O(n) sum;
- greedy match: the row sorted once, the values still alive a bitmap searched a word at a time
  (with hints past long dead stretches), O(n + k) words read in practice after the sort.
"""
from __future__ import annotations

import math
from collections import namedtuple

import numba
import numpy as np
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros

SQRT_2PI = math.sqrt(2.0 * math.pi)
EPS = 2.0 ** -52
# Hermite expansion of each box of sources (boxes one bandwidth wide, P terms); a box is seen
# from points within T bandwidths of its sources; each grid point interpolates the M density
# nodes around it (D nodes per bandwidth). Truncations and interpolation remainder stay below
# ~5e-10 of the largest possible density d0, which decides the integer rounding almost
# everywhere while d0 is moderate. Rows of tiny magnitude have huge integer densities (d0 above
# PRECISE_ABOVE), and there the order of near-equal ones is often open: their boxes keep
# LOOK_TERMS moments, so that a second look at such a point (the expansions summed there,
# without interpolation, LOOK_WINDOW bandwidths around it) is good to ~1e-12 of d0; the nodes
# still use P and T.
P_TERMS, T_WINDOW, M_INTERP = 15, 7.2, 10
LOOK_TERMS, LOOK_WINDOW = 17, 8.5
PRECISE_ABOVE = 1e5
NODES_PER_H = 8
# Cramer's inequality: |He_n(x)| exp(-x^2/4) <= CRAMER * sqrt(n!) (constant rounded up).
CRAMER = 1.086436
# Added to every bound, in units of the largest density, beyond the terms it adds up.
SLACK = 1e-13
# Below this many kernel evaluations per row the literal sum is as cheap as the expansion.
BRUTE_FORCE_WORK = 32768
# exp(-q) for q >= NEGLIGIBLE_Q - log(S) is below S * 2^-56 (56 ln 2 = 38.8, rounded up): too
# small to change a float64 running sum S (exact_density).
NEGLIGIBLE_Q = 39.0
# Up to this many open roundings, each asks the sorted order (two binary searches and a look at
# the other open ones) whether another rounding meets it; beyond, one sweep over the order.
FEW_OPEN = 48
ALL_BITS = np.uint64(0xFFFFFFFFFFFFFFFF)  # (a word of the greedy's bitmap, all set)
# The greedy match walks runs of equal values when more than 1 / RUNS_ABOVE of a row's entries
# repeat one (bf16 values, zeros); below, entry by entry.
RUNS_ABOVE = 8

# What density_estimates leaves for a second look at one grid point (_direct_estimate): the box
# expansions and their error terms. moments[b, p], the boxes' expansions; envelope, _envelope's
# bounds around each box; start, width: box b's centre at start + b * width (width = h); reach:
# the boxes a point sees, in bandwidths (LOOK_WINDOW + the largest |s|); shift: positions are taken from the row's least value;
# norm = n h sqrt(2 pi); d0 = 1 / (h sqrt(2 pi)); local_err, position_err: in units of d0.
Expansion = namedtuple("Expansion", "moments envelope start width h reach shift norm local_err position_err d0 n")


@numba.njit(cache=True, nogil=True)
def no_expansion(h, n):
    """An Expansion of the right types and no boxes: where every bound is 0 (literal sums), and
    for compiling _order_by_density without density_estimates (ken_cpu.compile_all_but_density)."""
    none = np.zeros((1, 1), dtype=np.float64)
    return Expansion(none, none, 0.0, 1.0, h, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, n)


@numba.njit(cache=True, nogil=True)
def exact_density(values: np.ndarray, x: float, h: float) -> float:
    """The literal spec formula at one point: float64, sources in row order. A term adding
    nothing to the running sum is skipped without calling exp: exp(-q) below a quarter of the
    sum's last place leaves the float64 sum exactly as it is (round to nearest), and so does a
    term that underflows (q >= 746). Since the sum only grows, a bound on q taken from an
    earlier, smaller sum stays valid; it is refreshed each time the sum doubles. So a point
    pays exp only for the sources within ~9 bandwidths of it once the first of them is summed."""
    total = 0.0
    two_h2 = 2.0 * h * h
    cut = 746.0  # skip q >= cut
    limit = cut * two_h2 * (1.0 + 1e-12)  # d * d beyond it: q >= cut whatever the division's rounding
    refresh = 0.0
    for i in range(values.size):
        d = x - np.float64(values[i])
        dd = d * d
        if dd < limit:
            q = dd / two_h2
            if q < cut:
                total += math.exp(-q)
                if total > refresh:  # exp(-q) <= total * 2^-56 < a quarter ulp of total for q >= cut
                    cut = min(746.0, NEGLIGIBLE_Q - math.log(total))
                    limit = cut * two_h2 * (1.0 + 1e-12)
                    refresh = 2.0 * total
    return total / (values.size * h * SQRT_2PI)


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _run_moments(u, centre, inv_h, moments, b, s, power):
    """moments[b, p] += sum of s^p / p! over a run of box b's sources u, s = (u - centre) / h;
    returns max |s|. Reductions the compiler may reorder (fastmath reassoc: vector lanes), which
    _expansion_error's rounding term covers (any order). s and power: scratch, u's size."""
    smax = 0.0
    for i in range(u.size):
        s[i] = (u[i] - centre) * inv_h
        smax = max(smax, abs(s[i]))
        power[i] = 1.0
    terms = moments.shape[1]
    inv_fact = 1.0
    for p in range(0, terms, 4):  # four powers a pass: a quarter of the loads and stores of power
        t0 = t1 = t2 = t3 = 0.0
        for i in range(u.size):
            a0 = power[i]
            a1 = a0 * s[i]
            a2 = a1 * s[i]
            a3 = a2 * s[i]
            t0 += a0
            t1 += a1
            t2 += a2
            t3 += a3
            power[i] = a3 * s[i]
        for q, total in enumerate((t0, t1, t2, t3)):
            if p + q < terms:
                moments[b, p + q] += total * inv_fact
                inv_fact /= p + q + 1
    return smax


@numba.njit(cache=True, nogil=True)
def _axpy4(a0, a1, a2, a3, x0, x1, x2, x3, y):
    """y += a0 x0 + a1 x1 + a2 x2 + a3 x3 (a separate function: its array arguments let the loop
    vectorize). Four terms per load and store of y: adding them to y one at a time was bound by
    those stores. Each y[i] then sums its terms in a shallower tree than one at a time: within
    the same rounding bound."""
    for i in range(y.size):
        y[i] += a0 * x0[i] + a1 * x1[i] + a2 * x2[i] + a3 * x3[i]


@numba.njit(cache=True, nogil=True)
def _box_moments(sorted_values, start, width, h, nbox, terms):
    """A[b, p] = sum over box b's sources of s^p / p!, s = (u - centre_b) / h, centre_b =
    start + b * width (start <= every value); the largest |s| and each box's number of sources
    (the error bound needs both). The sources are sorted, so each box is a run of them (or two,
    where float64 rounding puts a value at a box's edge)."""
    n = sorted_values.size
    moments = np.zeros((nbox, terms), dtype=np.float64)
    s = np.empty(n, dtype=np.float64)
    power = np.empty(n, dtype=np.float64)
    population = np.zeros(nbox, dtype=np.int64)
    smax = 0.0
    inv_width = 1.0 / width
    inv_h = 1.0 / h
    first = 0
    while first < n:
        b = min(max(int((sorted_values[first] - start) * inv_width + 0.5), 0), nbox - 1)
        edge = start + (b + 0.5) * width  # box b takes the values below its upper edge
        last = first + 1
        while last < n and (sorted_values[last] < edge or b == nbox - 1):
            last += 1
        smax = max(smax, _run_moments(sorted_values[first:last], start + b * width, inv_h, moments, b,
                                      s[first:last], power[first:last]))
        population[b] += last - first
        first = last
    return moments, smax * (1.0 + 1e-12), population


@numba.njit(cache=True, nogil=True)
def _expansion_error(smax, most, terms):
    """Bound on |expansion - real-number sum| at a node, per source, in units of the largest
    density d0 = 1/(h sqrt(2 pi)): the Hermite remainder (Cramer, then a geometric tail) and
    float64 rounding (moments summed over <= `most` sources per box, P terms, table entries)
    bound each source's term by a multiple of its exp(-t^2/4), t its distance in bandwidths, so
    the bound is this times the envelope (_envelope). The sources beyond the window are the
    envelope's second part; SLACK, global, is added on top."""
    fact = 1.0
    for p in range(1, terms + 1):
        fact *= p
    ratio = smax / math.sqrt(terms + 1.0)
    remainder = CRAMER * smax ** terms / math.sqrt(fact) / (1.0 - ratio)
    return remainder + 4.0 * (most + 4 * terms + 64) * EPS


@numba.njit(cache=True, nogil=True)
def _envelope(population, n, margin, window, look_window):
    """Per box c, upper bounds of (1/n) sum_i exp(-t_i^2 / 4) over the sources i, and of
    (1/n) sum_i exp(-t_i^2 / 2) over the sources beyond `window` bandwidths (those the expansion
    leaves out), and beyond `look_window` (those a second look leaves out), t_i the distance in
    bandwidths from any position within `margin` bandwidths of box c's centre, beyond half a box
    (boxes one bandwidth wide; a source lies within `margin` of its own box's centre too: margin
    includes the largest |s|). All far below their global bounds (1 and exp(-window^2 / 2)) in a
    row's sparse regions, where the error bounds shrink with them."""
    nbox = population.size
    reach = int(math.ceil(margin + 13.0))  # beyond: exp(-13^2 / 4) < 5e-19 per source
    near = np.empty(reach + 1, dtype=np.float64)
    far = np.empty(reach + 1, dtype=np.float64)
    farther = np.empty(reach + 1, dtype=np.float64)
    for d in range(reach + 1):
        gap = max(0.0, d - margin)
        near[d] = math.exp(-0.25 * gap * gap)
        far[d] = math.exp(-0.5 * max(window, gap) ** 2)
        farther[d] = math.exp(-0.5 * max(look_window, gap) ** 2)
    # each occupied box adds to the boxes within reach (in ascending b at every c, as a sum over
    # b per c would add them): a sparse row's empty boxes (outliers far apart) cost nothing
    total = np.zeros(nbox, dtype=np.float64)
    outside = np.zeros(nbox, dtype=np.float64)
    beyond = np.zeros(nbox, dtype=np.float64)
    for b in range(nbox):
        if population[b]:
            for c in range(max(0, b - reach), min(nbox, b + reach + 1)):
                total[c] += population[b] * near[abs(b - c)]
                outside[c] += population[b] * far[abs(b - c)]
                beyond[c] += population[b] * farther[abs(b - c)]
    out = np.empty((3, nbox), dtype=np.float64)
    for c in range(nbox):
        out[0, c] = min(1.0, total[c] / n * (1.0 + 1e-12) + 1e-18)
        out[1, c] = outside[c] / n * (1.0 + 1e-12) + 1e-36
        out[2, c] = beyond[c] / n * (1.0 + 1e-12) + 1e-36
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _slope(w):
    """Bound on |f'| in units of d0 / h where the envelope's (1/n) sum exp(-t^2/4) is w:
    |t| exp(-t^2/2) <= min(exp(-1/2), sqrt(2/e) exp(-t^2/4)) for every t."""
    return min(math.exp(-0.5), math.sqrt(2.0 / math.e) * w)


@numba.njit(cache=True, nogil=True)
def _hermite_at(moments, b, t):
    """sum_p A[b, p] He_p(t) exp(-t^2/2): box b's expansion at offset t (in bandwidths)."""
    e = math.exp(-0.5 * t * t)
    he_prev = 1.0
    he = t
    total = moments[b, 0] + moments[b, 1] * t
    for p in range(1, moments.shape[1] - 1):
        he_next = t * he - p * he_prev
        he_prev = he
        he = he_next
        total += moments[b, p + 1] * he
    return total * e


@numba.njit(cache=True, nogil=True)
def density_estimates(values, sorted_values, grid, h):
    """(estimate, bound) of the KDE at each float32 grid point: |estimate - the spec's sum| <= bound.

    The sources' Hermite expansions (boxes one bandwidth wide) are evaluated on a lattice of
    NODES_PER_H nodes per bandwidth, through one table since nodes and box centres share the
    lattice; each grid point then interpolates its M nearest nodes (Lagrange form) and
    carries a rigorous bound: node error times the interpolation's Lebesgue constant at that
    point, the interpolation remainder (|w(x)| max|f^(M)| / M!), float64 rounding of positions,
    and the spec's own float64 sum's distance from the real-number one. Most terms are in units
    of the bandwidth and of the largest density d0 (the same at every row scale); since the
    rounding is to integers, rows with a large d0 keep more moments for second looks
    (PRECISE_ABOVE). With fewer grid points than occupied boxes, each grid point sums the box
    expansions directly; on small rows, and where h overflowed (the densities are then 0), the
    estimate is the literal sum (bound 0). Returns (estimates, bounds, the Expansion a second
    look needs: _direct_estimate).
    """
    n = values.size
    k = grid.size
    out = np.empty(k, dtype=np.float64)
    bound = np.zeros(k, dtype=np.float64)
    if k < 2 or n * k <= BRUTE_FORCE_WORK or not h < math.inf:
        for j in range(k):
            out[j] = exact_density(values, np.float64(grid[j]), h)
        return out, bound, no_expansion(h, n)  # bounds of 0: no second look is asked for

    d0 = 1.0 / (h * SQRT_2PI)  # the largest possible density
    terms, window, m_interp = P_TERMS, T_WINDOW, M_INTERP  # the nodes'
    kept = LOOK_TERMS if d0 > PRECISE_ABOVE else P_TERMS  # the moments' (second looks sum them all)
    norm = n * h * SQRT_2PI
    # positions are taken from the row's least value: the density only sees differences, and a
    # row far from 0 (near-constant, offset) keeps float64 positions as fine as its own spread
    lo = sorted_values[0]
    shifted = np.empty(n, dtype=np.float64)
    for i in range(n):
        shifted[i] = sorted_values[i] - lo
    span = shifted[n - 1]
    delta = h / NODES_PER_H
    half_m = m_interp // 2
    start = -half_m * delta  # node i sits at start + i * delta; box b's centre at node b * D
    n_nodes = int(math.floor(span / delta)) + m_interp + 2
    width = NODES_PER_H * delta
    nbox = (n_nodes - 1) // NODES_PER_H + 1
    moments, smax, population = _box_moments(shifted, start, width, h, nbox, kept)
    local_err = _expansion_error(smax, population.max(), terms)
    look_err = _expansion_error(smax, population.max(), kept)
    # float64 positions (shifts, start, centres, nodes, grid offsets) are off by a few ulp of the
    # row's spread; f moves by at most d0 / h per unit of position times (1/n) sum |t| exp(-t^2/2)
    # over the sources, t in bandwidths: at most exp(-1/2), and at most sqrt(2/e) times the
    # envelope's (1/n) sum exp(-t^2/4) (_slope: small in a row's sparse stretches).
    position_err = 8.0 * EPS * (span + 2.0 * width) / h

    occupied = 0
    for b in range(nbox):
        occupied += moments[b, 0] != 0.0
    # Nodes cost ~(2 T D + 1) P vectorized multiply-adds per occupied box, the direct sum ~(2 T + 1)
    # exp and Hermite recurrences per grid point: the direct sum only pays with more boxes than
    # grid points.
    if occupied > k:
        ex = Expansion(moments, _envelope(population, n, smax + 0.5, window, LOOK_WINDOW), start, width, h,
                       LOOK_WINDOW + smax, lo, norm, look_err, position_err, d0, n)
        for j in range(k):
            out[j], bound[j] = _direct_estimate(ex, np.float64(grid[j]))
        return out, bound, ex

    # Table of He_p(t) exp(-t^2/2) at node offsets t = d / D, |d| <= half.
    half = int(math.ceil((window + smax) * NODES_PER_H))
    table = np.empty((terms, 2 * half + 1), dtype=np.float64)
    for d in range(-half, half + 1):
        t = d / NODES_PER_H
        e = math.exp(-0.5 * t * t)
        he_prev = 1.0
        he = t
        table[0, d + half] = e
        table[1, d + half] = t * e
        for p in range(1, terms - 1):
            he_next = t * he - p * he_prev
            he_prev = he
            he = he_next
            table[p + 1, d + half] = he * e
    nodes = np.zeros(n_nodes, dtype=np.float64)
    a = np.zeros(4)  # four terms' coefficients; past the last term 0, on any row (exact zeros added)
    last = terms - 1
    for b in range(nbox):
        if moments[b, 0] == 0.0:
            continue
        centre = b * NODES_PER_H
        ilo = max(0, centre - half)
        ihi = min(n_nodes - 1, centre + half)
        off = half - centre
        lo_t, hi_t = ilo + off, ihi + 1 + off
        for p in range(0, terms, 4):  # four terms a pass: a quarter of the loads and stores of nodes
            for q in range(4):
                a[q] = moments[b, p + q] if p + q < terms else 0.0
            _axpy4(a[0], a[1], a[2], a[3], table[p, lo_t:hi_t], table[min(p + 1, last), lo_t:hi_t],
                   table[min(p + 2, last), lo_t:hi_t], table[min(p + 3, last), lo_t:hi_t], nodes[ilo:ihi + 1])

    # Lagrange form on M equispaced nodes 0..M-1: l_i(y) = c_i * prod_{j != i} (y - j), with
    # c_i = 1 / prod_{j != i} (i - j) = (-1)^(M-1-i) / (i! (M-1-i)!).
    coef = np.empty(m_interp, dtype=np.float64)
    for i in range(m_interp):
        c = 1.0
        for j in range(m_interp):
            if j != i:
                c /= i - j
        coef[i] = c
    fact = 1.0
    for i in range(1, m_interp + 1):
        fact *= i
    # |f^(M)| <= d0 * CRAMER * sqrt(M!) / h^M; node spacing delta = h / D.
    remainder_scale = CRAMER / math.sqrt(fact) / float(NODES_PER_H) ** m_interp
    z = np.empty(k, dtype=np.float64)
    for j in range(k):
        z[j] = (np.float64(grid[j]) - lo - start) / delta
    lebesgue = np.empty(k, dtype=np.float64)
    omega = np.empty(k, dtype=np.float64)
    _interpolate(nodes, z, coef, out, lebesgue, omega)
    # the nodes and positions a grid point's interpolation uses lie within (M/2 + 1) / D
    # bandwidths of it, and it within half a box of its box's centre
    envelope = _envelope(population, n, smax + 0.5 + (m_interp // 2 + 1) / NODES_PER_H, window, LOOK_WINDOW)
    for j in range(k):
        out[j] /= norm
        c = min(max(int(z[j] / NODES_PER_H + 0.5), 0), nbox - 1)
        w = envelope[0, c]
        bound[j] = d0 * (lebesgue[j] * (w * local_err + envelope[1, c] + SLACK + position_err * _slope(w)
                                        + 8.0 * m_interp * EPS)
                         + omega[j] * remainder_scale * w)
    for j in range(k):  # apart: this loop vectorizes
        bound[j] += _literal_error(out[j], bound[j], n, d0)
    # the envelope's margin covers the interpolation's nodes, a fortiori a point alone
    return out, bound, Expansion(moments, envelope, start, width, h, LOOK_WINDOW + smax, lo, norm, look_err,
                                 position_err, d0, n)


@numba.njit(cache=True, nogil=True, inline="always")
def _literal_error(estimate, bound, n, d0):
    """What widens a bound from the real-number sum to the spec's float64 one: n positive terms
    summed left to right are within (n - 1) u of their sum, each term's argument and exp within
    (4a + 2) u of e^-a (a e^-a <= 1/e), and the division two more roundings: (n + 3) u of the
    density plus 1.5 u of d0. (EPS = 2u: a factor two to spare.)"""
    return (n + 8) * EPS * (abs(estimate) + bound) + 2.0 * EPS * d0


@numba.njit(cache=True, nogil=True)
def _direct_estimate(ex, x):
    """(estimate, bound) of the density at float64 position x from the box expansions alone,
    summed there: no interpolation, so the bound is the expansion's own (~1e-12 of d0 against
    the interpolation's 2e-11 to 5e-10). A grid point's second look before the literal sum, and
    each point's estimate on rows with more boxes than grid points."""
    x = x - ex.shift
    moments = ex.moments
    nbox = moments.shape[0]
    z = (x - ex.start) / ex.width
    total = 0.0
    for b in range(max(0, int(math.ceil(z - ex.reach))), min(nbox - 1, int(math.floor(z + ex.reach))) + 1):
        if moments[b, 0] != 0.0:
            total += _hermite_at(moments, b, (x - (ex.start + b * ex.width)) / ex.h)
    estimate = total / ex.norm
    c = min(max(int(z + 0.5), 0), nbox - 1)
    w = ex.envelope[0, c]
    bound = ex.d0 * (w * ex.local_err + ex.envelope[2, c] + SLACK + ex.position_err * _slope(w))
    return estimate, bound + _literal_error(estimate, bound, ex.n, ex.d0)


@numba.njit(cache=True, nogil=True)
def _interpolate(nodes, z, coef, out, lebesgue, omega):
    """At each lattice position z[j], the Lagrange interpolant of the M = coef.size nodes around it
    (out), the Lebesgue function sum |l_i| there and |prod (z - node)|. Written power by power
    over all positions (prefix and suffix products of (y - i)), so that each step is one loop
    over the positions that vectorizes."""
    k = z.size
    m = coef.size
    first = np.empty(k, dtype=np.int64)
    y = np.empty(k, dtype=np.float64)
    top = nodes.size - m
    for j in range(k):
        first[j] = min(max(int(math.floor(z[j])) - m // 2 + 1, 0), top)
        y[j] = z[j] - first[j]
    prefix = np.empty((m + 1, k), dtype=np.float64)
    prefix[0, :] = 1.0
    for i in range(m):
        _scaled_shift(prefix[i], y, float(i), prefix[i + 1])
    suffix = np.ones(k, dtype=np.float64)
    value = np.empty(k, dtype=np.float64)
    out[:] = 0.0
    lebesgue[:] = 0.0
    for i in range(m - 1, -1, -1):
        _gather(nodes, first, i, value)
        _lagrange_term(coef[i], prefix[i], suffix, y, float(i), value, out, lebesgue)
    for j in range(k):
        omega[j] = abs(prefix[m, j])


@numba.njit(cache=True, nogil=True)
def _scaled_shift(a, y, c, out):
    """out = a * (y - c)."""
    for j in range(out.size):
        out[j] = a[j] * (y[j] - c)


@numba.njit(cache=True, nogil=True)
def _gather(nodes, first, i, value):
    """value[j] = nodes[first[j] + i]: apart, so that _lagrange_term's loop has no gather and
    vectorizes."""
    for j in range(value.size):
        value[j] = nodes[first[j] + i]


@numba.njit(cache=True, nogil=True)
def _lagrange_term(c, prefix, suffix, y, shift, value, out, lebesgue):
    """Adds node i's term c * prefix * suffix * its node's value and its |basis|; suffix *= y - i."""
    for j in range(out.size):
        basis = c * prefix[j] * suffix[j]
        out[j] += basis * value[j]
        lebesgue[j] += abs(basis)
        suffix[j] *= y[j] - shift


def _visit_order_of(values, sorted_values, grid, h):
    """density_estimates then _order_by_density, as select_block runs them (for tests and
    benchmarks: one call)."""
    return _order_by_density(values, grid, h, *density_estimates(values, sorted_values, grid, h))


@numba.njit(cache=True, nogil=True)  # apart from density_estimates: ken_cpu.warm_up compiles them side by side
def _order_by_density(values, grid, h, f, bound, ex):
    """The grid points in the greedy's visit order: by the spec's rounded (half to even) float64
    density, highest first, ties in ascending index; f, bound: density_estimates'.

    Only that order matters, not the roundings themselves. Where the estimate's bound decides a
    rounding, it is used. Elsewhere the rounding lies in a small interval of integers, and it
    matters only if another point's possible roundings meet that interval (their order, or their
    tie, is then open): only those points take a second look, the box expansions summed at the
    point alone (ex: density_estimates'), and the literal O(n) sum where that leaves it open. So
    rows whose densities are huge integers (tiny bandwidths: bounds wider than a unit) pay it
    only at near-equal densities. Returns (order, how many literal sums were paid, how many
    second looks: benchmarks/kernel_stages.py reports both)."""
    k = grid.size
    lo = np.empty(k, dtype=np.float64)  # every rounding still possible at each point
    hi = np.empty(k, dtype=np.float64)
    open_points = 0
    for j in range(k):
        if bound[j] == 0.0:  # the literal sum already
            lo[j] = hi[j] = np.rint(f[j])
        else:  # rounding is monotone; the bound widened for the float64 rounding of f -/+ bound
            reach = bound[j] + 4.0 * EPS * (abs(f[j]) + bound[j])
            lo[j] = max(np.rint(f[j] - reach), 0.0)  # densities are >= 0 (and counting sort needs it)
            hi[j] = np.rint(f[j] + reach)
            open_points += lo[j] < hi[j]
    order = _visit_order(lo)
    looks = literal = 0
    if open_points:
        changed = np.zeros(k, dtype=np.bool_)
        looks, literal = _settle_open(values, grid, h, lo, hi, order, open_points, ex, changed)
        if looks:
            order = _reorder(order, lo, changed)
    return order, literal, looks


@numba.njit(cache=True, nogil=True)
def _reorder(order, lo, changed):
    """`order` again after the points marked `changed` took a new lo: the others keep their
    order; the changed ones, sorted among themselves, are merged in (by lo, highest first, then
    index). One pass over the grid, where sorting it again took one to five radix passes."""
    k = order.size
    c = 0
    for j in range(k):
        c += changed[j]
    points = np.empty(c, dtype=np.int64)
    keys = np.empty(c, dtype=np.float64)
    c = 0
    for j in range(k):
        if changed[j]:
            points[c] = j
            keys[c] = lo[j]
            c += 1
    rank = _merge_sort_descending(keys)  # stable: equal lo stays in index order
    moved = np.empty(c, dtype=np.int64)  # (loops, not fancy indexing: numba compiles less)
    for a in range(c):
        moved[a] = points[rank[a]]
    out = np.empty(k, dtype=np.int64)
    t = a = 0
    for i in range(k):
        j = order[i]
        if changed[j]:
            continue
        while a < moved.size and (lo[moved[a]] > lo[j] or (lo[moved[a]] == lo[j] and moved[a] < j)):
            out[t] = moved[a]
            t += 1
            a += 1
        out[t] = j
        t += 1
    while a < moved.size:
        out[t] = moved[a]
        t += 1
        a += 1
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _settle_open(values, grid, h, lo, hi, order, open_points, ex, changed):
    """Narrows the interval of each open point (lo < hi) that meets another point's: first to the
    roundings the box expansions summed at the point allow (_direct_estimate: a bound 20-500x
    tighter than the interpolated one), then, if it still meets one, to the literal rounding
    (lo = hi); marks each point it narrows (and its twins) in `changed`. Returns (how many
    second looks, how many literal sums). Any other open point orders against every other point
    by its lo as by its true rounding: no other possible value lies in its interval. Grid points
    equal in float32 (a step below the values' spacing) have the same density: they tie, in
    index order, whatever it is, so only the first of each such run takes part ("twins" follow
    it). Candidates are found in `order` (the points by lo, highest first, equal lo in ascending
    index): up to FEW_OPEN open points each by two binary searches (is another lo in its
    interval?) and a look at the other open intervals (does one reach it from below?), so a tiny
    row's few open roundings cost O(log k) each, not passes over the grid; more by one sweep over
    `order` from its end. Each candidate is then compared with every interval just before its
    literal sum, so that a pair parted by its first member's sum (mirror points of a symmetric
    row) pays one sum, not two."""
    k = lo.size
    meets = np.zeros(k, dtype=np.bool_)
    if open_points <= FEW_OPEN:  # each open point asks the sorted order, not a sweep over it
        opens = np.empty(open_points, dtype=np.int64)
        m = 0
        for j in range(k):
            if lo[j] < hi[j] and not (j > 0 and grid[j] == grid[j - 1]):
                opens[m] = j
                m += 1
        candidates = 0
        for a in range(m):
            j = opens[a]
            run = 1  # j and its twins: their roundings lie in j's interval too
            while j + run < k and grid[j + run] == grid[j]:
                run += 1
            meets[j] = _rounded_within(lo, order, lo[j], hi[j]) > run
            for b in range(m):  # an open interval reaching j's from below
                i = opens[b]
                meets[j] = meets[j] or (lo[i] < lo[j] <= hi[i])
            candidates += meets[j]
        if not candidates:
            return 0, 0
    twin = np.zeros(k, dtype=np.bool_)
    for j in range(1, k):
        twin[j] = grid[j] == grid[j - 1]
    if open_points > FEW_OPEN:  # up `order` (its twins skipped), each point against those below it
        reach = -1.0  # the largest hi among the intervals of lower (or equal, earlier) lo
        below = 0  # the point just below, whose interval this one's lo may fall in (none: below_hi -1)
        below_hi = -1.0
        below_meets = False  # whether it meets one below it (stored once its neighbour above is seen)
        met = False
        for t in range(k - 1, -1, -1):
            j = order[t]
            if twin[j]:
                continue
            low = lo[j]
            joins = low <= below_hi  # (an interval that reaches a point further up reaches its
            meets[below] = below_meets or joins  # own neighbour first: met covers both)
            met |= joins
            below_meets = low <= reach
            reach = max(reach, hi[j])
            below = j
            below_hi = hi[j]
        meets[below] = below_meets
        if not met:
            return 0, 0
    settled = literal = 0
    for j in range(k):
        if meets[j] and lo[j] < hi[j] and _meets_another(lo, hi, twin, j):  # again: a narrowed
            f, bound = _direct_estimate(ex, np.float64(grid[j]))  # one may part them
            reach = bound + 4.0 * EPS * (abs(f) + bound)  # both intervals hold the rounding
            lo[j] = max(lo[j], np.rint(f - reach))
            hi[j] = min(hi[j], np.rint(f + reach))
            changed[j] = True
            settled += 1
            if lo[j] < hi[j] and _meets_another(lo, hi, twin, j):
                lo[j] = hi[j] = np.rint(exact_density(values, np.float64(grid[j]), h))
                literal += 1
    for j in range(1, k if settled else 0):
        if twin[j]:
            lo[j] = lo[j - 1]
            hi[j] = hi[j - 1]
            changed[j] = changed[j - 1]
    return settled, literal


@numba.njit(cache=True, nogil=True, inline="always")
def _rounded_within(lo, order, a, b):
    """How many points have lo in [a, b]: two binary searches in `order` (by lo, highest first)."""
    first = 0  # the first position whose lo <= b
    last = lo.size
    while first < last:
        mid = (first + last) // 2
        if lo[order[mid]] <= b:
            last = mid
        else:
            first = mid + 1
    end = first  # the first position whose lo < a
    last = lo.size
    while end < last:
        mid = (end + last) // 2
        if lo[order[mid]] < a:
            last = mid
        else:
            end = mid + 1
    return end - first


@numba.njit(cache=True, nogil=True, inline="always")
def _meets_another(lo, hi, twin, j):
    """Whether point j's interval meets another's (twins aside): k comparisons, against the
    literal sum's n exps."""
    for i in range(lo.size):
        if lo[i] <= hi[j] and lo[j] <= hi[i] and i != j and not twin[i]:
            return True
    return False


# The greedy's values still alive, a bitmap: bit q + 1 of `alive` (64 to a word) for sorted value
# q, bits 0 and m + 1 always set (the ends: -1 and m come back for "none"; no search passes them,
# so the bits beyond stay set too). A search reads the word it starts in and, past empty words,
# follows hints: ahead[w] (behind[w]) is a word beyond which (before which) every word up to it
# was empty when a search from w crossed them; words only empty, so a hint stays true, and a
# search from w leaves its farthest one there. Why not "next alive" links with path halving: a
# row's dense middle then walks chains of a few links per search, each a dependent load, where
# one word answers; the hints keep a long dead stretch (a skewed row's tail, swept grid point by
# grid point) from being scanned word by word again.


@numba.njit(cache=True, nogil=True, inline="always")
def _neighbours(alive, ahead, behind, p):
    """(the last value alive at a sorted position < p, -1 if none; the first alive at >= p, m if
    none), from one read of p's word: both usually lie in it."""
    b = p + 1
    w = b >> 6
    x = alive[w]
    upper = ALL_BITS << np.uint64(b & 63)
    above = x & upper
    below = x & ~upper
    wr = w
    while above == 0:
        wr = ahead[wr]
        above = alive[wr]
    wl = w
    while below == 0:
        wl = behind[wl]
        below = alive[wl]
    ahead[w] = max(ahead[w], wr)
    behind[w] = min(behind[w], wl)
    return (wl << 6) + 62 - leading_zeros(below), (wr << 6) + trailing_zeros(above) - 1


@numba.njit(cache=True, nogil=True, inline="always")
def _grid_positions(sorted_values, grid):
    """For each grid point, the first sorted position whose value is >= it (how many values lie
    below it). Why not just merge the two sorted sequences: where values and grid points
    interleave irregularly (most rows), the merge's branch is a coin toss at every step.
    Instead each value guesses its grid cell from the linspace grid's own arithmetic (guesses
    are monotone in the value), the last value guessing each cell gives each grid point a
    position, and each grid point steps it to where the values on either side of it say: a
    guess misses only for a value within a grid rounding of a cell's edge, or where grid points
    are equal in float32 (a step below the values' spacing), so a grid point takes at most a few
    steps, predictably none. For a grid out of order (linspace rounds monotonically, so only as
    a guard), of one point, or whose guesses miss by more steps than a merge takes (a grid not
    from linspace), the merge runs."""
    n = sorted_values.size
    k = grid.size
    lower = np.empty(k, dtype=np.int64)
    ascending = True
    for j in range(1, k):
        ascending &= grid[j - 1] <= grid[j]
    g0 = np.float64(grid[0])
    span = np.float64(grid[k - 1]) - g0
    if ascending and span > 0.0:
        scale = (k - 1) / span
        last = np.zeros(k + 1, dtype=np.int64)  # per guessed cell: 1 + its last sorted position
        for p in range(n):
            last[min(max(int((np.float64(sorted_values[p]) - g0) * scale) + 1, 0), k)] = p + 1
        below = 0
        budget = n + k  # a merge's steps (guesses that far off: a grid not from linspace)
        for j in range(k):
            below = max(below, last[j])
            g = grid[j]
            while budget > 0 and below > 0 and sorted_values[below - 1] >= g:
                below -= 1
                budget -= 1
            while budget > 0 and below < n and sorted_values[below] < g:
                below += 1
                budget -= 1
            lower[j] = below
        if budget > 0:
            return lower
    p = 0
    for j in range(k):
        while p < n and sorted_values[p] < grid[j]:
            p += 1
        lower[j] = p
    return lower


@numba.njit(cache=True, nogil=True)
def greedy_match(sorted_values, order, grid, visit):
    """Greedy nearest match of grid points (in `visit` order) to distinct row entries.

    sorted_values/order: the row sorted by (value, index). Returns the picked original indices in
    pick order. Distances are float32; ties go to the smallest original index.

    The match runs over the row's distinct values: entries of one value are alike but for their
    index, and the smallest alive index is always the one taken, so each value hands out its
    sorted run in order and dies when the run is spent. Rows with many equal values (bf16,
    zeros) then search and mark their distinct values only (more than 1 / RUNS_ABOVE of the
    entries repeat a value).
    """
    n = sorted_values.size
    k = visit.size
    # distinct values u[d], their runs [start[d], start[d + 1]) of sorted positions (written with
    # selects, not branches: run lengths are data, and mispredictions cost more than the work).
    # A row with few equal values (most float32 rows: a handful of repeats) is matched entry by
    # entry instead, each its own "value": equal entries tie in distance, and the tie walk takes
    # the smallest index among them, as a run would; the runs' pass over the row costs more.
    equal = 0
    for p in range(1, n):
        equal += sorted_values[p] == sorted_values[p - 1]
    ties = equal * RUNS_ABOVE > n
    u = sorted_values
    m = n
    start = np.empty(0, dtype=np.int64)
    if ties:
        u = np.empty(n, dtype=np.float32)
        start = np.empty(n + 1, dtype=np.int64)
        start[0] = 0
        u[0] = sorted_values[0]
        m = 1
        for p in range(1, n):
            start[m] = p
            u[m] = sorted_values[p]
            m += sorted_values[p] != sorted_values[p - 1]
        start[m] = n
        u = u[:m]
    taken = start.copy()  # the next sorted position each value hands out (with runs)
    lower = _grid_positions(u, grid)
    words = (m + 2 + 63) // 64  # the alive bitmap and its hints (_neighbours)
    alive = np.empty(words, dtype=np.uint64)
    ahead = np.empty(words, dtype=np.int64)
    behind = np.empty(words, dtype=np.int64)
    for w in range(words):  # (loops, not np.full / np.arange: numba compiles less)
        alive[w] = ALL_BITS
        ahead[w] = w + 1
        behind[w] = w - 1
    picked = np.empty(k, dtype=np.int64)
    inf = np.float32(np.inf)
    far = np.empty(m + 4, dtype=np.float32)  # u between two infinities either side: reads past
    far[0] = far[1] = far[m + 2] = far[m + 3] = inf  # an end need no branch
    for d in range(m):  # (a loop: a slice assignment compiles numba's shape checks)
        far[d + 2] = u[d]
    for t in range(k):
        j = visit[t]
        g = grid[j]
        pos = lower[j]
        left, right = _neighbours(alive, ahead, behind, pos)
        d_right = abs(far[right + 2] - g)
        d_left = abs(far[left + 2] - g)
        d_min = min(d_left, d_right)
        # Distinct values on one side can tie in float32 distance. Float32 distances are
        # monotone on each side, so the value next to each candidate (alive or not) tells
        # whether any further one can still tie; if one can, each side is walked while the
        # distance stays d_min. Otherwise the nearer candidate, or at equal distance the one of
        # smaller index, is chosen by selects: which side wins is a coin toss for a branch.
        if abs(far[right + 3] - g) == d_min or abs(far[left + 1] - g) == d_min:
            best = -1
            best_idx = n
            q = right
            while q < m and abs(u[q] - g) == d_min:
                i = order[taken[q] if ties else q]
                if i < best_idx:
                    best_idx = i
                    best = q
                if q + 1 >= m or abs(u[q + 1] - g) != d_min:
                    break
                q = _neighbours(alive, ahead, behind, q + 1)[1]
            q = left
            while q >= 0 and abs(u[q] - g) == d_min:
                i = order[taken[q] if ties else q]
                if i < best_idx:
                    best_idx = i
                    best = q
                if q == 0 or abs(u[q - 1] - g) != d_min:
                    break
                q = _neighbours(alive, ahead, behind, q)[0]
        else:
            r = min(right, m - 1)  # (past an end: any entry, never chosen)
            el = max(left, 0)
            i_right = order[taken[r] if ties else r]
            i_left = order[taken[el] if ties else el]
            go_right = d_right < d_left or (d_right == d_left and i_right < i_left)
            best = right if go_right else left
            best_idx = i_right if go_right else i_left
        picked[t] = best_idx
        dies = True  # an entry dies at its first pick
        if ties:
            taken[best] += 1
            dies = taken[best] == start[best + 1]
        if dies:
            b = best + 1
            alive[b >> 6] &= ~(np.uint64(1) << np.uint64(b & 63))
    return picked


@numba.njit(cache=True, nogil=True, inline="always")  # into select_block: one module less to compile
def _visit_order(density):
    """Grid indices by rounded density, highest first; ties keep ascending index.

    Rounded densities are non-negative integers: a stable LSD radix sort of (top - key), packed
    with the grid index into one uint64 (index in the low bits: one word moves per point, and
    the index comes back out of it), in as few passes as digits of up to 11 bits allow (fewer
    bits for a small grid; one pass is the counting sort), the digits balanced between them, a
    pass skipped when every key shares its digit. Why not buckets plus insertion: a tiny row's
    densities are huge and nearly all distinct, and where they are flat (a uniform row's top)
    they crowd a few buckets. Keys too wide to pack beside the index (densities of 2^52 and more
    at 4096 points: rows of std below ~1e-16) take the merge sort."""
    k = density.size
    top = 0.0
    for j in range(k):
        top = max(top, density[j])
    ib = 0  # bits of the grid index
    while (1 << ib) < k:
        ib += 1
    if not top < 2.0 ** (64 - ib):
        return _merge_sort_descending(density)
    t = np.uint64(top)
    digit, passes = _digits(t, min(11, max(4, ib)))
    packed = np.empty(k, np.uint64)
    spare = np.empty(k, np.uint64)
    counts = np.zeros((passes, 1 << digit), np.int64)
    low = np.uint64(ib)
    every = np.uint64(0xFFFFFFFFFFFFFFFF)  # the key bits set in every key, and in any
    some = np.uint64(0)
    for j in range(k):
        key = t - np.uint64(density[j])
        every &= key
        some |= key
        packed[j] = (key << low) | np.uint64(j)
    packed = _lsd_passes(packed, spare, counts, ib, digit, passes, every ^ some)
    order = np.empty(k, np.int64)
    index = np.uint64((1 << ib) - 1)
    for j in range(k):
        order[j] = np.int64(packed[j] & index)
    return order


@numba.njit(cache=True, nogil=True, inline="always")
def _digits(keys, most):
    """(digit, passes) for LSD passes over keys up to the bit length of `keys` (uint64): the
    fewest passes of at most `most` bits, their digits balanced (shorter histograms to sum); no
    pass (digit 1) for a length of 0."""
    width = 0
    while width < 64 and (keys >> np.uint64(width)) != np.uint64(0):
        width += 1
    passes = (width + most - 1) // most
    return ((width + passes - 1) // passes if passes else 1), passes


@numba.njit(cache=True, nogil=True, inline="always")
def _lsd_passes(packed, spare, counts, low, digit, passes, varying):
    """The passes of a stable LSD radix sort of uint64 words whose key lies above bit `low`,
    `digit` bits a pass (the visit order's and the row sort's). `varying`: the key bits that
    differ between words (the OR of the keys ^ their AND). A digit without one is shared by every
    word: neither counted nor passed. The others are counted each in a loop of its own: one loop
    feeding every histogram waited on counters that neighbours share (a row's alike exponents,
    a density's smooth top digits). counts: zeros, (passes, 2^digit). Returns the sorted words
    (packed or spare)."""
    n = packed.size
    size = 1 << digit
    m = np.uint64(size - 1)
    for p in range(passes):
        if not (varying >> np.uint64(digit * p)) & m:
            continue
        c = counts[p]
        shift = np.uint64(low + digit * p)
        for j in range(n):
            c[(packed[j] >> shift) & m] += 1
        total = 0
        for d in range(size):
            x = c[d]
            c[d] = total
            total += x
        for j in range(n):
            v = packed[j]
            d = (v >> shift) & m
            q = c[d]
            spare[q] = v
            c[d] = q + 1
        packed, spare = spare, packed
    return packed


@numba.njit(cache=True, nogil=True)
def _merge_sort_descending(keys):
    """Indices of keys, highest first, equal keys in ascending index (numpy's stable argsort of
    -keys, without compiling numba's own sort for this rare case)."""
    k = keys.size
    order = np.arange(k)
    spare = np.empty(k, dtype=np.int64)
    width = 1
    while width < k:
        for lo in range(0, k, 2 * width):
            mid = min(lo + width, k)
            hi = min(lo + 2 * width, k)
            a, b, t = lo, mid, lo
            while a < mid and b < hi:
                if keys[order[b]] > keys[order[a]]:
                    spare[t] = order[b]
                    b += 1
                else:
                    spare[t] = order[a]
                    a += 1
                t += 1
            while a < mid:
                spare[t] = order[a]
                a += 1
                t += 1
            while b < hi:
                spare[t] = order[b]
                b += 1
                t += 1
        order, spare = spare, order
        width *= 2
    return order


@numba.njit(cache=True, nogil=True)
def radix_sort_order(bits):
    """Each row's indices sorted by (value, index), -0.0 equal to 0.0, given the rows' float32
    bits as uint32 (numpy's view: numba's own view costs compile time): a stable LSD radix sort
    of order-preserving keys of the float32 bits (negatives: all bits flipped; positives: sign
    bit set), in passes of up to 11 bits over the bits that vary, a pass skipped when every key
    shares its digit. The low bits zero in every entry (16 in bf16 values widened to float32)
    are shifted out before the keys are made: flipped, they would vary between signs and cost a
    pass. Each key travels packed with its index in one uint64 (key above, index below: rows
    narrower than 2^32), one word moved per entry instead of a key and an index. Stability
    keeps equal values in index order; cheaper than numpy sorting (value << 32 | index) uint64
    keys (docs/performance.md)."""
    r, n = bits.shape
    out = np.empty((r, n), np.int64)
    packed = np.empty(n, np.uint64)
    spare = np.empty(n, np.uint64)
    counts = np.zeros((3, 2048), np.int64)
    high = np.uint64(32)
    index = np.uint64(0xFFFFFFFF)
    for i in range(r):
        bits_set = np.uint32(0)  # the magnitude bits set in any entry
        for j in range(n):
            bits_set |= bits[i, j]
        bits_set &= np.uint32(0x7FFFFFFF)
        zeros = 0  # low bits zero in every entry
        while zeros < 31 and not (bits_set >> np.uint32(zeros)) & np.uint32(1):
            zeros += 1
        cut = np.uint32(zeros)
        sign = np.uint32(0x80000000) >> cut  # the sign bit, once the zero bits are shifted out
        field = sign | (sign - np.uint32(1))
        every = field  # the key bits set in every entry, and in any
        some = np.uint32(0)
        for j in range(n):
            b = bits[i, j] >> cut
            if b == sign:  # -0.0
                b = np.uint32(0)
            if b & sign:
                b = ~b & field
            else:
                b = b | sign
            every &= b
            some |= b
            packed[j] = (np.uint64(b) << high) | np.uint64(j)
        varying = every ^ some
        digit, passes = _digits(np.uint64(varying), 11)
        for p in range(passes):
            for d in range(1 << digit):
                counts[p, d] = 0
        src = _lsd_passes(packed, spare, counts, 32, digit, passes, np.uint64(varying))
        for j in range(n):  # element by element: a slice copy compiles numba's shape-mismatch message
            out[i, j] = np.int64(src[j] & index)
    return out


@numba.njit(cache=True, nogil=True)
def select_block(rows, sort_order, grids, h, k):
    """Keep masks for a float32 block [r, n] whose rows are all non-degenerate, 2 <= k < n.

    sort_order[i]: row i's indices sorted by (value, index); grids[i]: its float32 grid;
    h[i]: its bandwidth. (The published code's value-based mask is built from these in numpy:
    ken_cpu.value_mask.)
    """
    r, n = rows.shape
    mask = np.zeros((r, n), dtype=np.bool_)
    sorted_values = np.empty(n, dtype=np.float32)
    sorted64 = np.empty(n, dtype=np.float64)
    for i in range(r):
        values = rows[i]
        order = sort_order[i]
        for p in range(n):  # a loop, not values[order]: numba's fancy indexing costs compile time
            sorted_values[p] = values[order[p]]
            sorted64[p] = sorted_values[p]
        estimate, bound, ex = density_estimates(values, sorted64, grids[i], h[i])
        picked = greedy_match(sorted_values, order, grids[i], _order_by_density(values, grids[i], h[i], estimate, bound, ex)[0])
        for t in range(k):
            mask[i, picked[t]] = True
    return mask
