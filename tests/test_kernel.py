"""The CPU selection path against the golden rows, the literal oracle, and the spec's properties."""
import math

import numpy as np
import oracle
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from row_families import KINDS
from row_families import row as _row

from ken_dist import KenError, ken_select, select
from ken_dist.errors import NonFiniteRowError
from ken_dist.kernel import ken_cpu, ken_numba


def test_golden_index_sets_and_reference_masks(golden):
    for case in golden:
        v, k = case["values"], case["k"]
        mask = ken_select(v[None, :], k=k).numpy()[0]
        assert mask.sum() == min(k, v.size), case["i"]
        if case["greedy"].size:
            assert np.array_equal(np.flatnonzero(mask), np.sort(case["greedy"])), case["i"]
        ref = ken_select(v[None, :], k=k, compat="reference").numpy()[0]
        assert np.array_equal(ref, case["mask"]), case["i"]


def test_golden_pick_order(golden):
    """The greedy visits grid points in the same order as the published code (debug aid)."""
    for case in golden:
        v, k, expected = case["values"], case["k"], case["greedy"]
        if not expected.size or k >= v.size:
            continue
        rows = v[None, :]
        h = ken_cpu.bandwidths(rows)[0]
        g = ken_cpu.grids(rows, k)[0]
        order = ken_cpu.sort_order(rows)[0]
        visit = ken_numba._visit_order_of(v, v[order].astype(np.float64), g, h)[0]
        picked = ken_numba.greedy_match(v[order], order, g, visit)
        assert np.array_equal(picked, expected), case["i"]


def test_oracle_reproduces_small_golden_rows(golden):
    """The oracle itself is checked against the published code where it is fast enough."""
    for case in golden:
        v, k = case["values"], case["k"]
        if v.size * k > 40_000:
            continue
        if case["greedy"].size and k < v.size:
            assert oracle.greedy_indices(v, k) == list(case["greedy"])
        assert np.array_equal(oracle.reference_mask(v, k), case["mask"])




DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@settings(max_examples=80, deadline=None)
@given(kind=st.sampled_from(KINDS), n=st.integers(2, 300), kfrac=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31), dtype=st.sampled_from(sorted(DTYPES)))
def test_fast_path_equals_oracle(kind, n, kfrac, seed, dtype):
    """Any float dtype in; the oracle sees the exact float32 widening of the same values."""
    rng = np.random.default_rng(seed)
    row = torch.from_numpy(_row(kind, n, rng).astype(np.float32)).to(DTYPES[dtype])
    v = row.float().numpy()
    k = max(1, round(kfrac * n))
    assert np.array_equal(ken_select(row, k=k).numpy(), oracle.index_mask(v, k))
    assert np.array_equal(ken_select(row, k=k, compat="reference").numpy(), oracle.reference_mask(v, k))


def _literal_visit_order(v, g, h):
    return ken_numba._visit_order(np.array([np.rint(ken_numba.exact_density(v, np.float64(x), h)) for x in g]))


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31), k=st.sampled_from([64, 300, 700]),
       scale=st.sampled_from([1.0, 1e-4, 1e-7]))
def test_fast_visit_order_equals_literal_sums_on_long_rows(kind, seed, k, scale):
    """Rows long enough for the Hermite expansion: the visit order equals the one of the literal
    sums' roundings, also where the densities are huge integers (small scales)."""
    rng = np.random.default_rng(seed)
    v = (_row(kind, 1500, rng) * scale).astype(np.float32)[None, :]
    h = ken_cpu.bandwidths(v)[0]
    g = ken_cpu.grids(v, k)[0]
    order = ken_cpu.sort_order(v)[0]
    fast = ken_numba._visit_order_of(v[0], v[0][order].astype(np.float64), g, h)[0]
    assert np.array_equal(fast, _literal_visit_order(v[0], g, h))


def test_visit_order_on_grids_finer_than_float32_spacing():
    """0.01 + 1e-7 noise: float32 steps of 9e-10 give the values ~200 levels, and a 1024-point
    grid repeats its points (equal float32 x: equal densities, tied in index order), at densities
    ~1e7 whose roundings the bound leaves open: the order equals the literal sums' and needs
    almost none of them (each run of equal grid points is settled as one)."""
    rng = np.random.default_rng(11)
    v = (0.01 + rng.standard_normal(2048) * 1e-7).astype(np.float32)
    rows = v[None, :]
    h = ken_cpu.bandwidths(rows)[0]
    order = ken_cpu.sort_order(rows)[0]
    g = ken_cpu.grids(rows, 1024)[0]
    assert (np.diff(g) == 0).sum() > 200
    fast, literal, _ = ken_numba._visit_order_of(v, v[order].astype(np.float64), g, h)
    assert np.array_equal(fast, _literal_visit_order(v, g, h))
    assert literal <= 4, literal


@pytest.mark.parametrize("scale", [1e-9, 1e-11, 1e-20])
def test_visit_order_settles_near_equal_huge_densities_by_a_second_look(scale):
    """Mirrored tiny rows: the densities at mirrored grid points are huge near-equal integers whose
    roundings the interpolated estimate cannot separate, so their order is settled by second
    looks (the box expansions summed at the point), and where even those cannot separate them
    (the largest densities), by literal sums; the order equals the literal one. At 1e-9 the second
    look alone settles them; plain tiny rows of the same scale need almost none."""
    rng = np.random.default_rng(7)
    half = rng.standard_normal(1024) * scale
    for v, mirrored in ((np.concatenate([half, -half]).astype(np.float32), True),
                        ((rng.standard_normal(2048) * scale).astype(np.float32), False)):
        rows = v[None, :]
        h = ken_cpu.bandwidths(rows)[0]
        order = ken_cpu.sort_order(rows)[0]
        for k in (64, 700, 1024):
            g = ken_cpu.grids(rows, k)[0]
            fast, literal, looks = ken_numba._visit_order_of(v, v[order].astype(np.float64), g, h)
            assert np.array_equal(fast, _literal_visit_order(v, g, h)), (scale, mirrored, k)
            assert literal <= looks
            if mirrored and k > 64:
                assert looks > 0, (scale, k)
                assert (literal == 0) == (scale == 1e-9), (scale, k, literal)
                if scale == 1e-11:  # the second look's bound: ~0.2 units of these densities
                    assert literal < looks / 4, (literal, looks)
            if not mirrored:
                assert looks <= 2, looks


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31), shape=st.sampled_from([(4000, 12), (1500, 64),
                                                                                        (2000, 900), (4096, 2048)]),
       scale=st.sampled_from([1.0, 1e-3, 1e3, 1e-6]))
def test_density_bound_holds_and_rarely_needs_the_literal_sum(kind, seed, shape, scale):
    """The fast density's rigorous bound really bounds it, on every family and at every scale,
    and is tight enough that the literal O(n) fix-up is rare (it decides the rounding otherwise);
    so does the second look's, tighter.
    (4000, 12) mostly takes the direct sum (more occupied boxes than grid points), the others the nodes;
    relative to the largest density the bound is the same at every scale (the second look's
    tighter still where that density is large: more moments), so fix-ups stay rare even where
    densities are huge."""
    n, k = shape
    rng = np.random.default_rng(seed)
    v = (_row(kind, n, rng) * scale).astype(np.float32)[None, :]
    h = ken_cpu.bandwidths(v)[0]
    if not (h > 0 and 2 * h * h > 0):
        return
    g = ken_cpu.grids(v, k)[0]
    order = ken_cpu.sort_order(v)[0]
    estimate, bound, expansion = ken_numba.density_estimates(v[0], v[0][order].astype(np.float64), g, h)
    exact = np.array([ken_numba.exact_density(v[0], np.float64(x), h) for x in g])
    assert np.all(np.abs(estimate - exact) <= bound)
    d0 = 1 / (h * np.sqrt(2 * np.pi))  # the largest possible density: the bound scales with it
    # the expansion's own terms (~5e-10), plus float64 positions: a few ulp of |v| / h
    # (near-constant rows)
    own = 1e-9
    assert bound.max() <= (own + 1e-14 * np.abs(v).max() / h) * d0
    undecided = (bound >= 0.25) | (np.abs(estimate - np.floor(estimate) - 0.5) <= bound)
    assert undecided.sum() <= 2 + 4 * k * bound.max(), (undecided.sum(), bound.max())
    # the second look (the box expansions summed at the point alone) holds too, and is tighter:
    # the expansion's own terms and roundings (~4e-11 of d0, ~1e-11 with LOOK_TERMS)
    if expansion.moments.shape[1] > 1:
        second = np.array([ken_numba._direct_estimate(expansion, np.float64(x)) for x in g])
        assert np.all(np.abs(second[:, 0] - exact) <= second[:, 1])
        own = 1.5e-11 if d0 > ken_numba.PRECISE_ABOVE else 6e-11
        assert second[:, 1].max() <= (own + 1e-14 * np.abs(v).max() / h) * d0, second[:, 1].max() / d0


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["gauss", "outliers", "laplace", "uniform", "clustered", "bimodal"]),
       scale=st.sampled_from([1.0, 1e-7, 1e-9, 1e3]), n=st.integers(2, 1500), seed=st.integers(0, 2**31))
def test_literal_sum_skipping_negligible_terms_equals_every_term_summed(kind, scale, n, seed):
    """exact_density skips terms too small to change its running sum; the sum of every term in
    row order, in its own arithmetic (d * d / (2 h^2), Python's math.exp), must be bit for bit
    the same, at grid points in the bulk, in the tails and far outside the row."""
    rng = np.random.default_rng(seed)
    v = (_row(kind, n, rng) * scale).astype(np.float32)
    h = ken_cpu.bandwidths(v[None, :])[0]
    if not (h > 0 and 2 * h * h > 0):
        return
    lo, hi = float(v.min()), float(v.max())
    points = np.concatenate([np.linspace(lo, hi, 40), [lo - 50 * h, hi + 9 * h, hi + 40 * h]])
    two_h2 = 2.0 * float(h) * float(h)
    for x in points.astype(np.float32).astype(np.float64).tolist():
        total = 0.0
        for vi in v.astype(np.float64).tolist():
            d = x - vi
            total += math.exp(-((d * d) / two_h2))
        want = total / (n * float(h) * math.sqrt(2.0 * math.pi))
        got = ken_numba.exact_density(v, x, h)
        assert got == want or (got != got and want != want), (x, got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_equals_its_float32_widening(dtype):
    rng = np.random.default_rng(3)
    t = torch.from_numpy(rng.standard_normal((6, 700)).astype(np.float32) * 0.05).to(dtype)
    for k in (1, 50, 350, 699):
        assert torch.equal(ken_select(t, k=k), ken_select(t.float(), k=k))
        assert torch.equal(ken_select(t, k=k, compat="reference"), ken_select(t.float(), k=k, compat="reference"))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), r=st.integers(1, 12), n=st.integers(2, 400),
       kfrac=st.floats(0.0, 1.0), cuts=st.lists(st.integers(0, 12), max_size=4))
def test_block_split_invariance_and_exact_k(seed, r, n, kfrac, cuts):
    rng = np.random.default_rng(seed)
    rows = (rng.standard_normal((r, n)) * 0.02).astype(np.float32)
    k = max(1, round(kfrac * n))
    whole = ken_select(rows, k=k)
    assert (whole.sum(dim=1) == min(k, n)).all()
    bounds = sorted({0, r, *[c for c in cuts if c <= r]})
    parts = [ken_select(rows[a:b], k=k) for a, b in zip(bounds, bounds[1:]) if b > a]
    assert torch.equal(torch.cat(parts), whole)


def test_k_at_least_n_keeps_whole_row():
    rows = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    assert ken_select(rows, k=10).all()
    assert ken_select(rows, k=1000).all()
    assert ken_select(rows, keep=1.0).all()


def test_all_equal_row_keeps_first_k():
    rows = np.full((2, 9), 0.5, dtype=np.float32)
    mask = ken_select(rows, k=4).numpy()
    assert mask[:, :4].all() and not mask[:, 4:].any()


def test_keep_fraction_resolves_k():
    rows = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
    assert ken_select(rows, keep=0.25).sum(dim=1).tolist() == [2, 2]  # round(2.5) = 2
    assert ken_select(rows, keep=0.01).sum(dim=1).tolist() == [1, 1]  # at least one


@pytest.mark.parametrize("kwargs, pattern", [
    ({"k": 0}, "k must be >= 1"),
    ({"k": -3}, "k must be >= 1"),
    ({"k": 2.5}, "k must be an integer"),
    ({"k": True}, "k must be an integer"),
    ({"keep": 0.0}, r"keep must be a fraction in \(0, 1\]"),
    ({"keep": 1.5}, r"keep must be a fraction in \(0, 1\]"),
    ({}, "exactly one of k"),
    ({"k": 2, "keep": 0.5}, "exactly one of k"),
    ({"k": 2, "compat": "nope"}, "compat must be"),
])
def test_bad_arguments_raise_ken_error(kwargs, pattern):
    rows = np.ones((2, 8), dtype=np.float32)
    with pytest.raises(KenError, match=pattern):
        ken_select(rows, **kwargs)


def test_non_finite_row_named():
    rows = np.zeros((4, 8), dtype=np.float32)
    rows[2, 5] = np.nan
    with pytest.raises(NonFiniteRowError, match="row 2 holds NaN or infinity") as info:
        ken_select(rows, k=2)
    assert info.value.row == 2
    rows[2, 5] = np.inf
    with pytest.raises(KenError, match="row 2"):
        ken_select(rows, k=2)


def test_integer_rows_refused():
    with pytest.raises(KenError, match="not a float type"):
        ken_select(np.ones((2, 4), dtype=np.int64), k=1)


def test_baseline_strategies():
    rng = np.random.default_rng(0)
    ft = rng.standard_normal((5, 40)).astype(np.float32)
    base = ft + rng.standard_normal((5, 40)).astype(np.float32) * 0.1
    mag = select("magnitude", ft, base, k=7)
    delta = np.abs(ft - base)
    assert (mag.sum(dim=1) == 7).all()
    for i in range(5):
        kept = delta[i][mag[i].numpy()]
        dropped = delta[i][~mag[i].numpy()]
        assert kept.min() >= dropped.max()
    r1 = select("random", ft, k=9, seed=4)
    assert (r1.sum(dim=1) == 9).all()
    assert torch.equal(r1, select("random", ft, k=9, seed=4))
    assert not torch.equal(r1, select("random", ft, k=9, seed=5))
    # seeded per row: a block starting at row 2 reproduces rows 2.. of the whole
    assert torch.equal(select("random", ft[2:], k=9, seed=4, row_offset=2), r1[2:])
    assert torch.equal(select("ken", ft, k=7), ken_select(ft, k=7))
    with pytest.raises(KenError, match="needs base_rows"):
        select("magnitude", ft, k=3)
    with pytest.raises(KenError, match="unknown strategy 'nope'"):
        select("nope", ft, k=3)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 600), rows=st.integers(1, 4), seed=st.integers(0, 2**31),
       pool=st.sampled_from(["normal", "few", "specials", "one bit", "bf16", "coarse"]))
def test_sort_order_is_value_then_index(n, rows, seed, pool):
    """The radix sort against np.lexsort: ties in index order, -0.0 with 0.0, infinities and
    subnormals in place, constant and one-entry rows, values that differ in single bits at
    the digits' edges (a digit every key shares is skipped: one that varies in one bit is not),
    and values whose low bits are zero in every entry (bf16, multiples of 1/8: shifted out)."""
    rng = np.random.default_rng(seed)
    if pool == "normal":
        v = rng.standard_normal((rows, n)).astype(np.float32) * np.float32(0.02)
    elif pool == "bf16":
        v = (rng.standard_normal((rows, n)).astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    elif pool == "coarse":
        v = (rng.integers(-40, 40, (rows, n)) / 8).astype(np.float32) * np.float32(rng.choice([1.0, -0.0]))
    elif pool == "one bit":
        edges = rng.choice(np.array([0, 10, 11, 21, 22], np.uint32), 2, replace=False)  # digit edges
        flip = rng.choice(edges, (rows, n))
        v = (np.uint32(rng.integers(0x3F000000, 0x40000000)) ^ (np.uint32(1) << flip)).view(np.float32)
    elif pool == "few":
        v = rng.choice(np.array([-1.5, -0.0, 0.0, 2.0, 1e-3], np.float32), (rows, n))
    else:
        v = rng.choice(np.array([-np.inf, np.inf, -0.0, 0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0], np.float32),
                       (rows, n))
    got = ken_cpu.sort_order(v)
    for i in range(rows):
        want = np.lexsort((np.arange(n), v[i] + np.float32(0.0)))  # + 0.0 turns -0.0 into 0.0
        assert np.array_equal(got[i], want)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 3000), top=st.sampled_from([0.0, 2.0, 50.0, 1e5, 1e12, 2.0**51, 1e30]),
       seed=st.integers(0, 2**31), shape=st.sampled_from(["random", "bumps", "steps", "tails", "crowded"]))
def test_visit_order_is_numpy_stable_argsort(k, top, seed, shape):
    """Every branch (one radix pass for small density ranges, more for wider keys, a pass
    skipped where every key shares its digit, the merge sort for keys too wide to pack),
    on random keys, on the monotone runs of real densities along a grid with plateaus of ties,
    on many small tied keys beside huge ones (a tiny row's tails), and on keys crowding the top."""
    rng = np.random.default_rng(seed)
    if shape == "random":
        density = np.rint(rng.uniform(0, top, k))
    elif shape == "tails":
        density = np.where(rng.random(k) < 0.6, rng.integers(0, 3, k), np.rint(rng.uniform(0, top, k))) * 1.0
    elif shape == "crowded":
        density = np.rint(top * (1 - rng.uniform(0, 1e-4, k)))
    else:
        x = np.linspace(-4, 4, k)
        centres = rng.uniform(-3, 3, rng.integers(1, 4))
        bumps = sum(np.exp(-0.5 * ((x - c) / rng.uniform(0.3, 2)) ** 2) for c in centres)
        density = np.rint(bumps / bumps.max() * top)
        if shape == "steps":
            density = np.floor(density / max(1.0, top / 20)) * max(1.0, top / 20)
    assert np.array_equal(ken_numba._visit_order(density), np.argsort(-density, kind="stable"))


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 600), changes=st.integers(0, 600), levels=st.sampled_from([3, 50, 10**9]),
       seed=st.integers(0, 2**31))
def test_reorder_after_second_looks_equals_sorting_again(k, changes, levels, seed):
    """After second looks raise some points' lo, _reorder (the rest kept in order, the changed
    merged in) gives what sorting every point again gives: by lo, highest first, ties in index
    order, also with many ties and with every point changed."""
    rng = np.random.default_rng(seed)
    lo = rng.integers(0, levels, k).astype(np.float64)
    order = ken_numba._visit_order(lo)
    changed = np.zeros(k, dtype=bool)
    changed[rng.choice(k, min(changes, k), replace=False)] = True
    lo[changed] += rng.integers(0, 3, int(changed.sum()))
    assert np.array_equal(ken_numba._reorder(order, lo, changed), np.argsort(-lo, kind="stable"))


def _merged_grid_positions(sorted_values, grid):
    """The first sorted position whose value is >= each grid point, by one merge (the spec's
    nearest-value search starts there)."""
    out, p = [], 0
    for g in grid:
        while p < sorted_values.size and sorted_values[p] < g:
            p += 1
        out.append(p)
    return np.array(out)


@settings(max_examples=80, deadline=None)
@given(kind=st.sampled_from(KINDS), n=st.integers(2, 3000), kfrac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31),
       scale=st.sampled_from([1.0, 1e-30, 1e30]), offset=st.sampled_from([0.0, 1.0, -3e4]),
       grid=st.sampled_from(["linspace", "moved", "values", "swapped"]))
def test_grid_positions_equal_a_merge(kind, n, kfrac, seed, scale, offset, grid):
    """The arithmetic cell guess and its steps against a plain merge: linspace grids of any row
    (points equal in float32 where the step is below the values' spacing, near-constant rows far
    from 0), one grid point moved onto a value (a guess misses: steps, and the >= edge), grid
    points all on values (guesses miss by far: the step budget runs out and the merge takes
    over), and two points out of order (the merge's guard)."""
    rng = np.random.default_rng(seed)
    v = (_row(kind, n, rng) * scale + offset).astype(np.float32)
    k = max(4, round(kfrac * n))
    g = ken_cpu.grids(v[None, :], k)[0]
    if grid == "moved":
        u = rng.choice(v)
        g[np.argmin(np.abs(g - u))] = u  # its neighbours stay on either side: still ascending
    elif grid == "values":
        g = np.sort(rng.choice(v, k))
    elif grid == "swapped":
        j = rng.integers(1, k - 2)
        g[[j, j + 1]] = g[[j + 1, j]]
    sorted_values = np.sort(v)
    assert np.array_equal(ken_numba._grid_positions(sorted_values, g), _merged_grid_positions(sorted_values, g))


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(KINDS + ["lognormal", "exponential"]), n=st.integers(200, 3000),
       kfrac=st.floats(0.05, 0.95), seed=st.integers(0, 2**31), visit=st.sampled_from(["density", "random", "index"]))
def test_greedy_match_equals_the_rule_on_long_rows(kind, n, kfrac, seed, visit):
    """The bitmap of alive values and its hints past dead stretches against the oracle's greedy,
    on rows long enough for many dead words: skewed and heavy-tailed rows (a tail swept grid point by grid point), repeats
    (entry by entry) and ties (runs), in the density's visit order, a random one and the grid's
    own (every search crossing what the ones before it took)."""
    rng = np.random.default_rng(seed)
    v = _row(kind, n, rng).astype(np.float32)
    k = max(2, round(kfrac * n))
    rows = v[None, :]
    g = ken_cpu.grids(rows, k)[0]
    order = ken_cpu.sort_order(rows)[0]
    if visit == "density":
        order_of_grid = ken_numba._visit_order_of(v, v[order].astype(np.float64), g, ken_cpu.bandwidths(rows)[0])[0]
    elif visit == "random":
        order_of_grid = rng.permutation(k)
    else:
        order_of_grid = np.arange(k)
    picked = ken_numba.greedy_match(v[order], order, g, order_of_grid)
    assert list(picked) == oracle.greedy_picks(v, g, order_of_grid)
