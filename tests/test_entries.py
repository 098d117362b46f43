"""The compact resident positions (subnetwork/entries.py): both forms give exactly the kept
positions, the compiled CPU walks and the torch-op path (what a CUDA model runs) write and save
the same bits, and the memory a form reports is every byte it holds, escapes included."""
import numpy as np
import pytest
import torch

from ken_dist.subnetwork.entries import PUT, SWAP, TAKE, Entries, compact_positions, walk, walk_compacting


def make(keep_p: float, rows: int, n: int, seed: int, dtype=torch.bfloat16, long_gaps: bool = False):
    gen = np.random.default_rng(seed)
    keep = gen.random((rows, n)) < keep_p
    if long_gaps:  # whole empty rows: gaps of hundreds of entries, which need escapes
        keep[1:-1:2] = False
    packed = np.packbits(keep, axis=1, bitorder="little").reshape(-1)
    values = torch.randn(int(keep.sum()), generator=torch.Generator().manual_seed(seed)).to(dtype)
    form = compact_positions(packed, n, int(keep.sum()))
    e = Entries(values, n, **{k: torch.from_numpy(v) for k, v in form.items()})
    return keep, e


@pytest.mark.parametrize("keep_p, rows, n, long_gaps, form", [
    (0.3, 9, 37, False, "mask"),     # n not a multiple of 8: padding bits per row
    (0.25, 5, 64, False, "mask"),
    (0.05, 12, 101, False, "gaps"),
    (0.02, 40, 333, True, "gaps"),   # escapes, walked byte by byte
    (0.02, 40, 320, True, "gaps"),   # escapes, walked 64 bits at a time
    (0.0, 3, 16, False, "gaps"),     # nothing kept
])
def test_both_forms_hold_exactly_the_kept_positions(keep_p, rows, n, long_gaps, form):
    keep, e = make(keep_p, rows, n, seed=rows + n, long_gaps=long_gaps)
    assert e.form == form
    want = np.flatnonzero(keep)
    assert np.array_equal(e.positions("cpu").numpy(), want)
    if long_gaps:
        assert e.escapes.numel() > 0
    extra = {"mask": e.mask, "gaps": e.gaps, "escapes": e.escapes}
    assert e.nbytes == e.values.numel() * 2 + sum(t.numel() * t.element_size() for t in extra.values()
                                                  if t is not None)
    if form == "gaps":
        assert e.nbytes - e.values.numel() * 2 == want.size + 8 * e.escapes.numel() < (n + 7) // 8 * rows


@pytest.mark.parametrize("torch_ops", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("keep_p, long_gaps", [(0.3, False), (0.03, True)])
@pytest.mark.parametrize("n", [300, 320])
def test_walks_put_take_and_swap_bit_for_bit(torch_ops, dtype, keep_p, long_gaps, n):
    rows = 24
    keep, e = make(keep_p, rows, n, seed=7, dtype=dtype, long_gaps=long_gaps)
    flat = torch.randn(rows * n, generator=torch.Generator().manual_seed(1)).to(dtype)
    idx = torch.from_numpy(np.flatnonzero(keep))
    before = flat.clone()

    saved = torch.empty(e.values.numel() + 3, dtype=dtype)  # larger than needed, as reused buffers are
    assert walk(e, flat, TAKE, saved=saved, torch_ops=torch_ops) == idx.numel()
    assert torch.equal(saved[: idx.numel()], before[idx]) and torch.equal(flat, before)

    saved2 = torch.empty(e.values.numel(), dtype=dtype)
    assert walk(e, flat, SWAP, values=e.values, saved=saved2, torch_ops=torch_ops) == idx.numel()
    want = before.clone()
    want[idx] = e.values
    assert torch.equal(saved2, before[idx]) and torch.equal(flat, want)

    assert walk(e, flat, PUT, values=saved2, torch_ops=torch_ops) == idx.numel()
    assert torch.equal(flat.view(torch.uint8), before.view(torch.uint8))


def test_from_keep_builds_the_mask_form_with_torch_ops():
    keep = torch.rand(7, 45, generator=torch.Generator().manual_seed(3)) < 0.4
    values = torch.randn(int(keep.sum())).to(torch.bfloat16)
    e = Entries.from_keep(keep, values)
    packed = np.packbits(keep.numpy(), axis=1, bitorder="little").reshape(-1)
    assert e.form == "mask" and np.array_equal(e.mask.numpy(), packed)
    assert torch.equal(e.positions("cpu"), keep.reshape(-1).nonzero().view(-1))


def test_a_bitmask_that_miscounts_is_refused():
    packed = np.array([0b1011, 0, 0, 0, 0, 0, 0, 0], np.uint8)
    with pytest.raises(ValueError, match="holds 3 entries, expected 2"):
        compact_positions(packed, 64, 2)


@pytest.mark.parametrize("codec", ["raw", "int4"])
@pytest.mark.parametrize("keep_p, n", [(0.01, 8000), (0.3, 37)])
def test_part_bitmasks_decode_like_block_rows(codec, keep_p, n):
    """parts.block_bitmasks gives block_rows' keep mask packed (padding bits zero, position lists of
    format 2 packed too) and the same value bytes, for raw and lossy values."""
    from ken_dist.store.parts import block_bitmasks, block_rows, encode_block

    gen = torch.Generator().manual_seed(n)
    base = torch.randn(6, n, generator=gen)
    ft = base + 0.01 * torch.randn(6, n, generator=gen)
    keep = torch.rand(6, n, generator=gen) < keep_p
    table, stats = encode_block(4, keep, ft, codec=__import__("ken_dist.store.codecs", fromlist=["x"]).parse_codec(
        codec), base=base, dtype="F32")
    index = stats.get("index", "mask")
    if keep_p == 0.01:
        assert index == "positions"
    kw = dict(codec=stats.get("values", "raw"), index=index, base_rows=lambda a, b: base[a - 4: b - 4].numpy())
    rows = list(block_rows(table, n, "F32", 4, 10, **kw))
    packed = list(block_bitmasks(table, n, "F32", 4, 10, **kw))
    assert [r[0] for r in rows] == [p[0] for p in packed]
    for (_, k, v), (_, p, w) in zip(rows, packed):
        assert np.array_equal(np.packbits(k, axis=1, bitorder="little"), p) and np.array_equal(v, w)
        assert np.unpackbits(p, axis=1, bitorder="little")[:, n:].sum() == 0


@pytest.mark.parametrize("torch_ops", [False, True])
@pytest.mark.parametrize("mode", [PUT, TAKE, SWAP])
@pytest.mark.parametrize("keep_p, rows, n, long_gaps", [
    (0.05, 12, 101, False),  # gaps win, rows walked byte by byte (padding bits)
    (0.02, 40, 320, True),   # gaps with escapes, 64 bits at a time
    (0.1, 5, 8, False),      # 5 mask bytes: only the zero-padded tail word
    (0.02, 3, 2000, True),   # an escape across a whole empty row
    (0.11, 9, 64, False),    # just under 1/8 kept: compactable, either form
    (0.3, 9, 37, False),     # above 1/8: not compactable, the walk alone
    (0.0, 3, 16, False),     # nothing kept
])
def test_walk_compacting_walks_like_walk_and_compacts_like_compact_positions(torch_ops, mode, keep_p, rows, n,
                                                                              long_gaps):
    """The cold switch's walk over a fresh bitmask: the same bits written and saved as walk() over
    the compacted entries, and the same smaller form as compact_positions, escapes included."""
    keep, compacted = make(keep_p, rows, n, seed=rows * n, long_gaps=long_gaps)
    packed = np.packbits(keep, axis=1, bitorder="little").reshape(-1)
    fresh = Entries(compacted.values, n, mask=torch.from_numpy(packed))
    start = torch.randn(rows * n, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    count = compacted.values.numel()
    values = compacted.values if mode != TAKE else None
    flat_a, saved_a = start.clone(), torch.zeros(count, dtype=torch.bfloat16)
    flat_b, saved_b = start.clone(), torch.zeros(count, dtype=torch.bfloat16)
    done, got = walk_compacting(fresh, flat_a, mode, values=values, saved=saved_a if mode != PUT else None,
                                torch_ops=torch_ops)
    assert done == walk(compacted, flat_b, mode, values=values, saved=saved_b if mode != PUT else None) == count
    assert torch.equal(flat_a.view(torch.int16), flat_b.view(torch.int16))
    assert torch.equal(saved_a.view(torch.int16), saved_b.view(torch.int16))
    assert got.form == compacted.form
    for field in ("mask", "gaps", "escapes"):
        a, b = getattr(got, field), getattr(compacted, field)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), field
    assert torch.equal(got.positions("cpu"), torch.from_numpy(np.flatnonzero(keep)))


def test_walk_compacting_refuses_a_bitmask_with_more_entries_than_values():
    packed = np.array([0b1011, 0, 0, 0, 0, 0, 0, 0], np.uint8)
    e = Entries(torch.ones(2, dtype=torch.bfloat16), 64, mask=torch.from_numpy(packed))
    with pytest.raises(ValueError, match="holds more than 2 entries"):
        walk_compacting(e, torch.zeros(64, dtype=torch.bfloat16), PUT, values=e.values)
