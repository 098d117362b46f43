"""FP8 checkpoints (F8_E4M3 and F8_E5M2) through the whole product, bit for bit: the real prune
(run_job on a private local Ray: storage bits widened exactly for KEN, written untouched),
the store, the lazy view (get_tensor, get_slice), materialize (read back by safetensors
itself) and KENviz, each against what is computed here from the checkpoints in memory."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ken_dist import select
from ken_dist.checkpoints.geometry import row_geometry

KEEP = 0.3
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# name: (shape, dtype, in the base?)
TENSORS = {
    "model.layers.0.mlp.up.weight": ((24, 40), E4M3, True),
    "model.layers.0.attn.q.weight": ((16, 40), E5M2, True),
    "model.layers.0.experts.weight": ((3, 8, 5), E4M3, True),  # rank 3: 3 rows of 40
    "model.layers.0.norm.weight": ((40,), E5M2, True),  # one row
    "model.layers.0.mlp.up.scale": ((24, 1), E4M3, True),  # excluded below: stored whole
    "model.head.weight": ((5, 40), E5M2, False),  # only in the fine-tune: stored whole
    "model.embed.weight": ((12, 40), torch.bfloat16, True),  # FP8 beside a 16-bit tensor
}
WHOLE = {"model.layers.0.mlp.up.scale", "model.head.weight"}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The flat bits of `t` as same-size integers (one per element): compared and chosen as bits,
    never as numbers."""
    return t.contiguous().reshape(-1).view({1: torch.uint8, 2: torch.int16}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    from ken_dist.job.plan import PruneParams
    from ken_dist.job.spec import FineTuneEntry, JobSpec
    from ken_dist.runtime import run_job

    root = tmp_path_factory.mktemp("fp8")
    gen = torch.Generator().manual_seed(0)
    base, ft = {}, {}
    for name, (shape, dtype, in_base) in TENSORS.items():
        b = torch.randn(shape, generator=gen) * 0.05
        f = b + torch.randn(shape, generator=gen) * 0.02
        base[name], ft[name] = b.to(dtype), f.to(dtype)
        if not in_base:
            del base[name]
    for d, sd in (("base", base), ("ft", ft)):
        os.makedirs(root / d)
        save_file(sd, str(root / d / "model.safetensors"))
        (root / d / "config.json").write_text("{}")
    store = str(root / "store")
    job = JobSpec(base=str(root / "base"), store=store, block_bytes=200, exclude=(r"\.scale$",),
                  finetunes=(FineTuneEntry("fp8", str(root / "ft"), None, PruneParams(keep=KEEP)),))
    run_job(job, workers=1, quiet=True)
    return {"root": root, "store": store, "base": base, "ft": ft}


def expected(fp8, name: str) -> tuple[torch.Tensor, np.ndarray | None]:
    """(the tensor the subnetwork stands for, keep mask [rows, row_len] or None when whole),
    from the checkpoints in memory: KEN on the exactly widened values, base bits where pruned."""
    f = fp8["ft"][name]
    if name in WHOLE:
        return f, None
    rows, row_len = row_geometry(f.shape)
    b = fp8["base"][name]
    mask = select("ken", f.float().reshape(rows, row_len), b.float().reshape(rows, row_len), keep=KEEP)
    out = torch.where(mask.reshape(-1), bits(f), bits(b)).view(f.dtype).reshape(f.shape)
    return out, mask.numpy()


def test_the_store_plans_and_holds_fp8_as_fp8(fp8):
    from ken_dist.store.protocol import Store

    tensors = Store(fp8["store"]).manifest("fp8")["tensors"]
    assert {n: t["dtype"] for n, t in tensors.items()} == {
        n: {E4M3: "F8_E4M3", E5M2: "F8_E5M2", torch.bfloat16: "BF16"}[d] for n, (_, d, _) in TENSORS.items()}
    assert {n for n, t in tensors.items() if t["action"] == "whole"} == WHOLE
    assert len(tensors["model.layers.0.mlp.up.weight"]["blocks"]) > 1  # several parts per tensor
    for name, t in tensors.items():
        if name not in WHOLE:
            assert t["kept"] == int(expected(fp8, name)[1].sum()), name


def test_open_subnetwork_rebuilds_every_tensor_bit_for_bit(fp8):
    from ken_dist.subnetwork.view import open_subnetwork

    with open_subnetwork(fp8["store"], "fp8") as sub:
        assert sorted(sub.keys()) == sorted(TENSORS)
        for name in TENSORS:
            want, _ = expected(fp8, name)
            assert same_bits(sub.get_tensor(name), want), name
        name = "model.layers.0.mlp.up.weight"
        want, _ = expected(fp8, name)
        assert same_bits(sub.get_slice(name)[5:17], want[5:17])
        assert same_bits(sub.get_slice(name)[7], want[7])


def test_materialize_writes_fp8_that_safetensors_reads_back_bit_for_bit(fp8):
    from ken_dist.subnetwork.materialize import materialize

    out = fp8["root"] / "dense"
    info = materialize(fp8["store"], "fp8", out, max_shard_bytes=600)
    assert len(info["shards"]) > 1
    where = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(where) == sorted(TENSORS)
    for name, shard in where.items():
        with safe_open(str(out / shard), framework="pt") as f:
            got = f.get_tensor(name)
        assert same_bits(got, expected(fp8, name)[0]), name


def test_kenviz_reads_fp8_masks_and_values_exactly(fp8):
    from ken_dist.viz import load_matrix

    for name in ("model.layers.0.mlp.up.weight", "model.layers.0.attn.q.weight"):
        _, mask = expected(fp8, name)
        v = load_matrix(fp8["store"], "fp8", name)
        assert v.factor == 1 and np.array_equal(v.mask, mask), name
        ft = fp8["ft"][name].float().numpy()
        assert np.array_equal(v.value_image()[mask], ft[mask]), name
        d = load_matrix(fp8["store"], "fp8", name, delta=True)
        base = fp8["base"][name].float().numpy()
        assert np.array_equal(d.value_image()[mask], (ft - base)[mask]), name
