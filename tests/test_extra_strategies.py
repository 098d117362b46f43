"""Strategies of ken_dist/kernel/extra_strategies.py: registered, exactly k per row, defined by
their one-line rules (ken-delta is ken_select on fine-tuned - base)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ken_dist import KenError, STRATEGIES, ken_select, select

EXTRA = [name for name in STRATEGIES if name not in ("ken", "magnitude", "random")]


def _pair(r, n, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((r, n)).astype(np.float32) * 0.02
    ft = base + rng.standard_normal((r, n)).astype(np.float32) * 0.002
    ft[0] = base[0]                       # a row fine-tuning did not touch: delta all zero
    if r > 2:
        ft[2, : n // 3] += 0.05           # a row moved much further in part
    return ft.astype(dtype), base.astype(dtype)


def test_new_strategies_are_registered_and_need_the_base():
    assert "ken-delta" in STRATEGIES
    for name in EXTRA:
        assert STRATEGIES[name].needs_base
        ft, _ = _pair(3, 16, 0)
        with pytest.raises(KenError, match="needs base_rows"):
            select(name, ft, None, k=3)


@pytest.mark.parametrize("name", EXTRA)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 1), (7, 3), (64, 16), (64, 64), (64, 200), (384, 96)])
def test_exactly_k_per_row(name, n, k):
    ft, base = _pair(6, n, n * 1000 + k)
    mask = select(name, ft, base, k=k, row_offset=5, seed=3)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (6, n)
    assert mask.sum(dim=1).tolist() == [min(k, n)] * 6


@pytest.mark.parametrize("name", EXTRA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exactly_k_per_row_low_precision_and_keep(name, dtype):
    ft, base = _pair(5, 100, 7)
    ft_t, base_t = torch.from_numpy(ft).to(dtype), torch.from_numpy(base).to(dtype)
    mask = select(name, ft_t, base_t, keep=0.25)
    assert mask.sum(dim=1).tolist() == [25] * 5
    one = select(name, ft_t[1], base_t[1], keep=0.25)     # a 1-D tensor is one row
    assert torch.equal(one, mask[1])


@pytest.mark.parametrize("name", EXTRA)
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
