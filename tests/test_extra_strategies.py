"""Strategies of ken_dist/kernel/strategies/delta.py: registered, exactly k per row, defined by
their one-line rules (ken-delta is ken_select on fine-tuned - base)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ken_dist import STRATEGIES, KenError, ken_select, select
from ken_dist.kernel import block_scores
from ken_dist.kernel.strategies.delta import LOWRANK_RANK, lowrank_part
from ken_dist.kernel.strategies.registry import block_top_mask, top_k_mask

EXTRA = [name for name in STRATEGIES if name not in ("ken", "magnitude", "random")]
PER_BLOCK = [name for name in EXTRA if STRATEGIES[name].scope != "model"]   # k or keep is enough
ROW_LOCAL = [name for name in EXTRA if STRATEGIES[name].scope == "row"]
BLOCK_BUDGET = {"lowrank-delta-block"}                                      # exactly k * rows per block
MODEL = [name for name in EXTRA if STRATEGIES[name].scope == "model"]


def _pair(r, n, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((r, n)).astype(np.float32) * 0.02
    ft = base + rng.standard_normal((r, n)).astype(np.float32) * 0.002
    ft[0] = base[0]                       # a row fine-tuning did not touch: delta all zero
    if r > 2:
        ft[2, : n // 3] += 0.05           # a row moved much further in part
    return ft.astype(dtype), base.astype(dtype)


def test_new_strategies_are_registered_and_need_the_base():
    assert {"ken-delta", "lowrank-delta", "lowrank-delta-block", "lowrank-delta-model",
            "magnitude-model"} <= set(STRATEGIES)
    assert [STRATEGIES[n].scope for n in ("ken", "ken-delta", "lowrank-delta", "lowrank-delta-block",
                                          "lowrank-delta-model")] == ["row", "row", "block", "block", "model"]
    for name in EXTRA:
        assert STRATEGIES[name].needs_base
        ft, _ = _pair(3, 16, 0)
        with pytest.raises(KenError, match="needs base_rows"):
            select(name, ft, None, k=3, budget=5)


@pytest.mark.parametrize("name", PER_BLOCK)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 1), (7, 3), (64, 16), (64, 64), (64, 200), (384, 96)])
def test_exactly_k_per_row(name, n, k):
    """Exactly min(k, n) per row; block-budget strategies: exactly min(k, n) * rows per block."""
    ft, base = _pair(6, n, n * 1000 + k)
    mask = select(name, ft, base, k=k, row_offset=5, seed=3)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (6, n)
    if name in BLOCK_BUDGET:
        assert int(mask.sum()) == 6 * min(k, n)
    else:
        assert mask.sum(dim=1).tolist() == [min(k, n)] * 6


@pytest.mark.parametrize("name", PER_BLOCK)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exactly_k_per_row_low_precision_and_keep(name, dtype):
    ft, base = _pair(5, 100, 7)
    ft_t, base_t = torch.from_numpy(ft).to(dtype), torch.from_numpy(base).to(dtype)
    mask = select(name, ft_t, base_t, keep=0.25)
    if name in BLOCK_BUDGET:
        assert int(mask.sum()) == 25 * 5
    else:
        assert mask.sum(dim=1).tolist() == [25] * 5
    one = select(name, ft_t[1], base_t[1], keep=0.25)     # a 1-D tensor is one row: exactly k
    assert int(one.sum()) == 25
    if name in ROW_LOCAL:
        assert torch.equal(one, mask[1])


@pytest.mark.parametrize("name", ROW_LOCAL)
def test_block_split_does_not_change_the_mask(name):
    ft, base = _pair(9, 50, 11)
    whole = select(name, ft, base, k=12, seed=4)
    parts = torch.cat([select(name, ft[a:b], base[a:b], k=12, seed=4, row_offset=a)
                       for a, b in ((0, 2), (2, 7), (7, 9))])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("k", [1, 5, 37, 100])
def test_ken_delta_is_ken_on_the_difference(k):
    ft, base = _pair(8, 100, k)
    got = select("ken-delta", ft, base, k=k)
    want = ken_select(ft - base, k)
    assert torch.equal(got, want)
    # and on bf16 checkpoints: the difference of the exactly widened values
    ft_b, base_b = torch.from_numpy(ft).bfloat16(), torch.from_numpy(base).bfloat16()
    got_b = select("ken-delta", ft_b, base_b, k=k)
    assert torch.equal(got_b, ken_select(ft_b.float() - base_b.float(), k))


def test_ken_delta_differs_from_ken_on_values():
    """Not a renamed KEN: on rows where fine-tuning moved a few entries far, the picks differ."""
    ft, base = _pair(8, 200, 1)
    assert not torch.equal(select("ken-delta", ft, base, k=20), ken_select(ft, 20))


def test_untouched_row_keeps_first_k():
    """A row fine-tuning did not change has a constant delta: the spec's equal-values rule keeps 0..k-1."""
    ft, base = _pair(3, 30, 2)
    mask = select("ken-delta", ft, base, k=4)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2, 3]


def _lowrank_pair(r, n, rank, noise, seed):
    """base + a rank-`rank` change with singular values 8, 4, 2, 1, ... (x 1e-3) + Gaussian noise."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((r, n)) * 0.02).astype(np.float32)
    u, _ = np.linalg.qr(rng.standard_normal((r, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    sv = 8.0 / 2.0 ** np.arange(rank) * np.sqrt(r * n) / 10
    signal = (u * sv) @ v.T * 1e-3
    ft = (base + signal + noise * 1e-3 * rng.standard_normal((r, n))).astype(np.float32)
    return ft, base


def _exact_lowrank(d, rank):
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


@pytest.mark.parametrize("shape", [(40, 30), (200, 64), (64, 300), (13, 13)])
def test_lowrank_part_matches_the_exact_svd(shape):
    ft, base = _lowrank_pair(*shape, rank=LOWRANK_RANK, noise=0.05, seed=sum(shape))
    d = ft.astype(np.float64) - base
    got, want = lowrank_part(d), _exact_lowrank(d, LOWRANK_RANK)
    assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)
    # no gap after rank 4 (pure noise): the subspace is ambiguous, but the approximation is near-optimal
    noise = np.random.default_rng(1).standard_normal(shape)
    approx = lowrank_part(noise)
    assert np.linalg.matrix_rank(approx) == min(LOWRANK_RANK, *shape)
    assert np.linalg.norm(noise - approx) <= 1.01 * np.linalg.norm(noise - _exact_lowrank(noise, LOWRANK_RANK))
    assert np.array_equal(lowrank_part(d), got)  # fixed sketch: the same numbers every call


def test_lowrank_delta_is_its_definition():
    """top-k per row of delta * (rank-4 part of the block's delta); on a single row, magnitude."""
    ft, base = _lowrank_pair(120, 80, rank=LOWRANK_RANK, noise=0.3, seed=5)
    d = ft.astype(np.float64) - base
    got = select("lowrank-delta", ft, base, k=20).numpy()
    assert np.array_equal(got, top_k_mask(d * lowrank_part(d), 20))
    assert np.array_equal(got, top_k_mask(d * _exact_lowrank(d, LOWRANK_RANK), 20))  # a clear spectral gap
    one = select("lowrank-delta", ft[7], base[7], k=20)
    assert torch.equal(one, select("magnitude", ft[7], base[7], k=20))


def test_lowrank_delta_prefers_signal_over_noise():
    """A rank-1 change shared by all rows (columns 0..19) plus isolated spikes (5 per row, larger than
    most signal entries, at random columns): lowrank-delta keeps the shared change, magnitude the spikes."""
    rng = np.random.default_rng(0)
    r, n, sig = 200, 100, 20
    base = (0.02 * rng.standard_normal((r, n))).astype(np.float32)
    u = rng.standard_normal(r)
    delta = np.zeros((r, n))
    delta[:, :sig] = np.outer(u, np.ones(sig)) * 1e-3
    for i in range(r):
        delta[i, rng.choice(np.arange(sig, n), 5, replace=False)] = 2.5e-3 * rng.choice([-1, 1], 5)
    ft = (base + delta).astype(np.float32)
    rows = np.abs(u) > 1                     # rows where the shared change is not tiny
    low = select("lowrank-delta", ft, base, k=sig).numpy()[rows]
    mag = select("magnitude", ft, base, k=sig).numpy()[rows]
    assert low[:, :sig].mean() > 0.95 and low[:, sig:].sum(axis=1).mean() < 1
    assert mag[:, sig:].sum(axis=1).mean() > 4


@pytest.mark.parametrize("total", [0, 1, 13, 100, 209, 210, 300])
def test_block_top_mask_is_a_stable_top_k_of_the_block(total):
    scores = np.random.default_rng(total).integers(0, 5, (30, 7)).astype(float)  # many ties
    want = np.zeros(scores.size, bool)
    want[np.argsort(-scores.ravel(), kind="stable")[:total]] = True
    assert np.array_equal(block_top_mask(scores, total).ravel(), want)


def test_lowrank_delta_block_is_its_definition():
    """The k*rows entries of the block with the largest delta * (rank-4 part); one row: magnitude."""
    ft, base = _lowrank_pair(120, 80, rank=LOWRANK_RANK, noise=0.3, seed=9)
    d = ft.astype(np.float64) - base
    got = select("lowrank-delta-block", ft, base, k=20).numpy()
    want = np.zeros(d.size, bool)
    want[np.argsort(-(d * lowrank_part(d)).ravel(), kind="stable")[:20 * 120]] = True
    assert np.array_equal(got.ravel(), want)
    assert torch.equal(select("lowrank-delta-block", ft[3], base[3], k=20), select("magnitude", ft[3], base[3], k=20))


def test_lowrank_delta_block_moves_budget_to_the_rows_that_changed():
    """Rows fine-tuning did not touch (as unseen tokens of an embedding matrix) give their share away."""
    ft, base = _lowrank_pair(100, 64, rank=2, noise=0.1, seed=4)
    ft[50:] = base[50:]                              # half the rows unchanged
    mask = select("lowrank-delta-block", ft, base, k=16).numpy()
    assert int(mask.sum()) == 100 * 16
    assert mask[50:].sum() == 0 and mask[:50].sum() == 100 * 16  # all of it goes to the changed rows


@pytest.mark.parametrize("name", MODEL)
def test_model_scope_keeps_the_budget_largest_scores(name):
    """Scope "model": select keeps the block's `budget` largest scores; no budget is an error that
    says where budgets come from."""
    ft, base = _lowrank_pair(60, 40, rank=2, noise=0.2, seed=3)
    scores = block_scores(name, ft, base)
    d = ft.astype(np.float64) - base
    want_scores = d * lowrank_part(d) if name == "lowrank-delta-model" else np.abs(d)
    assert np.array_equal(scores, want_scores)
    for budget in (0, 1, 37, 600, 2400):
        got = select(name, ft, base, budget=budget).numpy()
        assert np.array_equal(got, block_top_mask(want_scores, budget))
    with pytest.raises(KenError, match="whole fine-tune.*budget="):
        select(name, ft, base, keep=0.25)
    with pytest.raises(KenError, match="0..2400"):
        select(name, ft, base, budget=2401)
    with pytest.raises(KenError, match="scope 'row'"):
        block_scores("magnitude", ft, base)
