"""The torch path of KEN (ken_dist.kernel.ken_torch): golden rows, numpy-exact arithmetic, and
equality with the CPU (numba) path. Runs on the CPU ("torch" device); the CUDA variants run
where torch.cuda.is_available()."""
import collections

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from row_families import KINDS
from row_families import row as _row

from ken_dist import ken_select
from ken_dist.kernel import (
    ken_cpu,
    ken_numba,
    ken_torch,
    ken_torch_density,
    ken_torch_greedy,
)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (torch.cuda.is_available() is false)")
DEVICES = ["torch", pytest.param("cuda", marks=[needs_cuda, pytest.mark.gpu])]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The torch path's greedy runs ~35 tiny ops per step; on a small shared CPU, OpenMP worker
    threads only add synchronisation cost to them."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _groups(golden):
    groups = collections.defaultdict(list)
    for case in golden:
        groups[(case["values"].size, case["k"])].append(case)
    return groups


@pytest.mark.parametrize("device", DEVICES)
def test_golden_index_sets_and_reference_masks(golden, device):
    """Every golden row, batched by (n, k), through ken_select on the torch path."""
    for (n, k), cases in _groups(golden).items():
        rows = np.stack([c["values"] for c in cases])
        mask = ken_select(rows, k=k, device=device).cpu().numpy()
        ref = ken_select(rows, k=k, compat="reference", device=device).cpu().numpy()
        for case, m, rm in zip(cases, mask, ref):
            assert m.sum() == min(k, n), case["i"]
            if case["greedy"].size:
                assert np.array_equal(np.flatnonzero(m), np.sort(case["greedy"])), case["i"]
            assert np.array_equal(rm, case["mask"]), case["i"]


def test_golden_pick_order(golden):
    """Same visit order and picks as the published code, pick by pick (densities, sort, greedy)."""
    for (n, k), cases in _groups(golden).items():
        cases = [c for c in cases if c["greedy"].size and k < n]
        if not cases or n * k > 800_000:
            continue
        rows = torch.from_numpy(np.stack([c["values"] for c in cases]))
        picked = ken_torch.select_indices(rows, k).numpy()
        for case, p in zip(cases, picked):
            assert np.array_equal(p, case["greedy"]), case["i"]


# ----------------------------------------------------------------------------- numpy arithmetic
LENGTHS = sorted({*range(2, 140), 255, 256, 257, 383, 384, 385, 1000, 1023, 1024, 1025, 4095, 4096,
                  4097, 8191, 8192, 8193, 12345, 14336, 16383, 16384, 16385, 20000})


@pytest.mark.parametrize("scale", [1e-3, 1.0, 3e4])
def test_std_bit_equal_to_numpy(scale):
    rng = np.random.default_rng(int(scale * 1000) % 2**31)
    for n in LENGTHS:
        rows = rng.standard_normal((3, n)) * scale + rng.choice([0.0, 1.0, 100.0 * scale], (3, 1))
        if n % 3 == 0:
            rows = rng.standard_t(2, (3, n)) * scale
        rows = rows.astype(np.float32)
        got = ken_torch.np_std_f32(torch.from_numpy(rows)).numpy()
        expect = np.std(rows, axis=1)
        assert np.array_equal(got.view(np.uint32), expect.view(np.uint32)), n
        assert np.array_equal(expect, np.array([np.std(v) for v in rows])), n
        total = ken_torch._np_sum_f32(torch.from_numpy(rows)).numpy()
        assert np.array_equal(total.view(np.uint32), np.add.reduce(rows, axis=1).view(np.uint32)), n


def test_bandwidths_and_grids_equal_numpy():
    rng = np.random.default_rng(7)
    blocks = [(rng.standard_normal((4, n)) * s).astype(np.float32)
              for n, s in [(2, 1.0), (9, 0.02), (768, 0.05), (4096, 3.0), (777, 1e-20)]]
    blocks.append(np.array([[0.0, 1e-45, 0.0, 1e-45]], dtype=np.float32))  # step underflows
    blocks.append((1000 + rng.standard_normal((2, 50)) * 1e-4).astype(np.float32))
    for rows in blocks:
        t = torch.from_numpy(rows)
        assert np.array_equal(ken_torch.bandwidths(t).numpy(), ken_cpu.bandwidths(rows))
        for k in sorted({1, 2, 3, rows.shape[1] - 1, 1000, 4095}):
            got = ken_torch.grids(t, k).numpy()
            assert np.array_equal(got.view(np.uint32), ken_cpu.grids(rows, k).view(np.uint32)), (rows.shape, k)
            if rows.shape[0] == 1 and k > 1:
                assert np.array_equal(got[0], np.linspace(rows[0].min(), rows[0].max(), k))


# ----------------------------------------------------------------------------- density
def _literal_visit_order(v, g, h):
    dens = np.array([np.rint(ken_numba.exact_density(v, np.float64(x), h)) for x in g])
    return np.argsort(-dens, kind="stable")


@pytest.mark.parametrize("terms,torch_sum_ulps", [(16, 2), (3, 2), (3, 1e13)])
def test_visit_order_equals_the_literal_sums_order(terms, torch_sum_ulps, monkeypatch):
    """With the shipped expansion, with one so short that most points need the literal sum, and
    then with torch's literal sums trusted so little that each is redone left to right on the CPU;
    on tiny and mirrored tiny rows too, whose densities are huge near-equal integers."""
    monkeypatch.setattr(ken_torch_density, "P_TERMS", terms)
    monkeypatch.setattr(ken_torch_density, "Q_TERMS", terms)
    monkeypatch.setattr(ken_torch_density, "TORCH_SUM_ULPS", torch_sum_ulps)
    rng = np.random.default_rng(terms)
    half = rng.standard_normal(750) * 1e-9
    rows = np.stack([rng.standard_normal(1500) * 0.02, rng.standard_t(2, 1500) * 0.01,
                     np.where(rng.random(1500) < 0.5, -1, 1) * 0.05 + rng.standard_normal(1500) * 0.005,
                     rng.integers(-3, 4, 1500) * 0.25, rng.standard_normal(1500) * 1e-8,
                     np.concatenate([half, -half])]).astype(np.float32)
    t = torch.from_numpy(rows)
    h = ken_torch.bandwidths(t)
    for k in (2, 64, 700):
        g = ken_torch.grids(t, k)
        got = ken_torch_density.visit_order(t, g, h).numpy()
        for i in range(rows.shape[0]):
            assert np.array_equal(got[i], _literal_visit_order(rows[i], g[i].numpy(), float(h[i]))), (i, k)


# ----------------------------------------------------------------------------- torch == CPU path


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), n=st.integers(2, 2000), kfrac=st.floats(0.0, 1.0),
       r=st.integers(1, 4), seed=st.integers(0, 2**31))
@example(kind="gauss", n=2000, kfrac=0.5, r=3, seed=1)
@example(kind="cauchy", n=1999, kfrac=0.97, r=2, seed=2)
@example(kind="bf16", n=1536, kfrac=0.3, r=4, seed=3)
@example(kind="outliers", n=2000, kfrac=0.8, r=2, seed=4)
@example(kind="zeros", n=1024, kfrac=0.25, r=2, seed=5)
def test_torch_path_equals_cpu_path(kind, n, kfrac, r, seed):
    rng = np.random.default_rng(seed)
    rows = np.stack([_row(kind, n, rng) for _ in range(r)]).astype(np.float32)
    k = max(1, round(kfrac * n))
    got = ken_select(rows, k=k, device="torch")
    assert torch.equal(got, ken_select(rows, k=k))
    assert (got.sum(dim=1) == min(k, n)).all()


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from(KINDS), n=st.integers(2, 400), kfrac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_reference_compat_equals_cpu_path(kind, n, kfrac, seed):
    rng = np.random.default_rng(seed)
    rows = np.stack([_row(kind, n, rng) for _ in range(2)]).astype(np.float32)
    k = max(1, round(kfrac * n))
    assert torch.equal(ken_select(rows, k=k, compat="reference", device="torch"),
                       ken_select(rows, k=k, compat="reference"))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), r=st.integers(1, 10), n=st.integers(2, 300),
       kfrac=st.floats(0.0, 1.0), cuts=st.lists(st.integers(0, 10), max_size=4))
def test_block_split_invariance_and_exact_k(seed, r, n, kfrac, cuts):
    rng = np.random.default_rng(seed)
    rows = (rng.standard_normal((r, n)) * 0.02).astype(np.float32)
    k = max(1, round(kfrac * n))
    whole = ken_select(rows, k=k, device="torch")
    assert (whole.sum(dim=1) == min(k, n)).all()
    bounds = sorted({0, r, *[c for c in cuts if c <= r]})
    parts = [ken_select(rows[a:b], k=k, device="torch") for a, b in zip(bounds, bounds[1:]) if b > a]
    assert torch.equal(torch.cat(parts), whole)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(KINDS), n=st.integers(3, 300), kfrac=st.floats(0.0, 0.99), seed=st.integers(0, 2**31))
def test_greedy_equals_literal_scan_for_any_visit_order(kind, n, kfrac, seed):
    """The chunked greedy against the literal O(n k) scan, for arbitrary visit orders."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.stack([_row(kind, n, rng) for _ in range(3)]).astype(np.float32))
    k = min(n - 1, max(1, round(kfrac * n)))
    g = ken_torch.grids(x, k)
    visit = torch.from_numpy(np.stack([rng.permutation(k) for _ in range(3)]))
    assert torch.equal(ken_torch_greedy.greedy_match(x, g, visit), ken_torch_greedy.greedy_full_scan(x, g, visit))


def test_float32_distance_ties(monkeypatch):
    """Distinct values at the same float32 distance: the smallest index among them wins. Runs of
    them inside the search windows are resolved there; runs crossing a window's end send the
    row to the literal scan. Both stay exact."""
    calls = []
    scan = ken_torch_greedy.greedy_full_scan
    monkeypatch.setattr(ken_torch_greedy, "greedy_full_scan", lambda *a: calls.append(1) or scan(*a))
    rng = np.random.default_rng(0)
    for trial in range(40):
        # runs of adjacent float32 values far from the negative values: their float32 distances
        # from grid points among the negative values collapse in groups of up to 2**j
        m = int(rng.integers(2, 8)) if trial % 2 else int(rng.integers(40, 120))
        n = m + int(rng.integers(8, 60))
        base = np.float32(2.0 ** -int(rng.integers(0, 7)))
        cluster = base + np.arange(m, dtype=np.float32) * np.spacing(base)
        v = np.concatenate([cluster, -rng.uniform(0.5, 4.0, n - m)]).astype(np.float32)
        rng.shuffle(v)
        k = int(rng.integers(1, n))
        for compat in ("index", "reference"):
            assert torch.equal(ken_select(v, k=k, compat=compat, device="torch"), ken_select(v, k=k, compat=compat))
    assert calls  # the fallback was exercised


@pytest.mark.parametrize("name", ["huge", "subnormal", "offset", "two_levels", "one_outlier", "constant"])
def test_extreme_rows_equal_cpu_path(name):
    rng = np.random.default_rng(1)
    rows = {
        "huge": rng.standard_normal((2, 300)) * 1e30,  # std overflows: h = inf, all densities 0
        "subnormal": rng.standard_normal((2, 300)) * 1e-40,
        "offset": 1000 + rng.standard_normal((2, 300)) * 1e-4,
        "two_levels": np.where(rng.random((2, 300)) < 0.5, 1.0, 1 + 2**-23),
        "one_outlier": np.r_[np.zeros(299), 5.0][None].repeat(2, 0),
        "constant": np.full((2, 300), 0.25),
    }[name].astype(np.float32)
    for k in (1, 7, 150, 299, 300, 400):
        for compat in ("index", "reference"):
            with np.errstate(over="ignore"):
                expect = ken_select(rows, k=k, compat=compat)
            assert torch.equal(ken_select(rows, k=k, compat=compat, device="torch"), expect), (k, compat)


def test_edge_cases():
    rows = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    assert ken_select(rows, k=10, device="torch").all() and ken_select(rows, k=99, device="torch").all()
    flat = np.full((2, 6), 0.5, dtype=np.float32)
    assert ken_select(flat, k=4, device="torch")[:, :4].all() and not ken_select(flat, k=4, device="torch")[:, 4:].any()
    one = ken_select(rows[0], k=3, device="torch")
    assert one.shape == (10,) and torch.equal(one, ken_select(rows[0], k=3))
    half = torch.from_numpy(rows).to(torch.bfloat16)
    assert torch.equal(ken_select(half, k=4, device="torch"), ken_select(half.float(), k=4))


# ----------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.gpu
@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(KINDS), n=st.integers(2, 3000), kfrac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_cuda_equals_cpu_path(kind, n, kfrac, seed):
    rng = np.random.default_rng(seed)
    rows = np.stack([_row(kind, n, rng) for _ in range(8)]).astype(np.float32)
    k = max(1, round(kfrac * n))
    for compat in ("index", "reference"):
        got = ken_select(torch.from_numpy(rows).cuda(), k=k, compat=compat)
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), ken_select(rows, k=k, compat=compat))
