"""The generated checkpoints the demo and the benchmarks run on: streamed, sharded like Hugging
Face, deterministic, and with a fine-tune derived from the base exactly as the base file holds it."""
import filecmp
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch

from ken_dist.checkpoints.geometry import row_geometry
from ken_dist.checkpoints.inventory import open_checkpoint
from ken_dist.checkpoints.reads import read_rows, read_tensor
from ken_dist.errors import KenError
from ken_dist.testing.synthetic import (
    MOVED_FRACTION,
    PRESETS,
    ROW_GROUP,
    LlamaShape,
    _group_seed,
    tensor_rows,
    write_checkpoint,
    write_pair,
)

SHAPE = LlamaShape(hidden=128, intermediate=344, layers=2, vocab=200, heads=4, kv_heads=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return write_pair(root, SHAPE, shard_bytes=100_000)


def _rows(shape):
    return shape[0] if len(shape) > 1 else 1


def test_sharded_like_hugging_face(pair):
    base, ft = pair
    index = json.loads((ft / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == SHAPE.parameters() * 2
    ckpt = open_checkpoint(ft)
    assert {n: i.shape for n, i in ckpt.tensors.items()} == dict(SHAPE.tensors())
    assert all(i.dtype == "BF16" for i in ckpt.tensors.values())
    assert json.loads((base / "config.json").read_text())["num_key_value_heads"] == 2


def recipe(name: str, shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, delta) in float32 as the module docstring describes them, recomputed here as an
    oracle: per group of ROW_GROUP rows one torch generator seeded by (seed, name, group) draws
    the base, then the delta; MOVED_FRACTION of the rows move 10x further."""
    rows, row_len = row_geometry(shape)
    bases, deltas = [], []
    for g0 in range(0, rows, ROW_GROUP):
        n = min(rows, g0 + ROW_GROUP) - g0
        gen = torch.Generator().manual_seed(_group_seed(seed, zlib.crc32(name.encode()), g0 // ROW_GROUP))
        bases.append(torch.randn((n, row_len), generator=gen))
        d = torch.randn((n, row_len), generator=gen)
        d[torch.rand(n, generator=gen) < MOVED_FRACTION] *= 10
        deltas.append(d)
    base, delta = torch.cat(bases), torch.cat(deltas) * 0.002
    return (base * 0.05 + 1 if name.endswith("norm.weight") else base * 0.02), delta


def test_finetune_is_base_as_stored_plus_delta(pair):
    """fine-tune = bf16(bf16(base) + delta), checked against the recipe recomputed independently;
    the other plausible rule, bf16(base + delta) from the unrounded base, must differ from it
    somewhere, so this test tells the two apart."""
    base, ft = (open_checkpoint(d) for d in pair)
    moved_rows = unrounded_differs = 0
    for name, shape in SHAPE.tensors():
        b, f = read_tensor(base.tensors[name]), read_tensor(ft.tensors[name])
        want_base, delta = recipe(name, shape)
        assert torch.equal(b.reshape(want_base.shape), want_base.to(torch.bfloat16)), name
        want_ft = (want_base.to(torch.bfloat16).float() + delta).to(torch.bfloat16)
        assert torch.equal(f.reshape(want_ft.shape), want_ft), name
        unrounded_differs += int(((want_base + delta).to(torch.bfloat16) != want_ft).sum())
        if len(shape) == 2:
            moved_rows += int(((f.float() - b.float()).abs().mean(dim=1) > 0.008).sum())
    assert unrounded_differs > 0
    assert moved_rows > 0  # a few rows are moved 10x further


def test_alone_equals_pair_and_any_row_range(pair, tmp_path):
    base, ft = pair
    write_checkpoint(tmp_path / "ft", SHAPE, finetune=True, shard_bytes=100_000, threads=2)
    write_checkpoint(tmp_path / "base", SHAPE, shard_bytes=100_000)
    for name in os.listdir(ft):
        assert filecmp.cmp(ft / name, tmp_path / "ft" / name, shallow=False), name
        assert filecmp.cmp(base / name, tmp_path / "base" / name, shallow=False), name
    ckpt = open_checkpoint(ft)
    name, shape = "model.layers.1.mlp.gate_proj.weight", (344, 128)
    for a, b in ((0, 344), (3, 5), (ROW_GROUP - 1, ROW_GROUP + 2), (300, 344)):
        assert torch.equal(tensor_rows(name, shape, a, b, finetune=True), read_rows(ckpt.tensors[name], a, b))
    norm = "model.norm.weight"
    assert torch.equal(tensor_rows(norm, (128,), 0, 1).reshape(-1), read_tensor(open_checkpoint(base).tensors[norm]))


def test_other_seed_other_values_and_bad_dtype(tmp_path):
    a = tensor_rows("x.weight", (70, 16), 0, 70, seed=0)
    b = tensor_rows("x.weight", (70, 16), 0, 70, seed=1)
    assert not torch.equal(a, b)
    assert tensor_rows("x.weight", (70, 16), 0, 70, dtype="fp32").dtype == torch.float32
    with pytest.raises(KenError, match="dtype"):
        write_checkpoint(tmp_path / "x", SHAPE, dtype="int8")


def test_presets():
    assert abs(PRESETS["7b"].parameters() - 6.74e9) < 0.01e9
    assert abs(PRESETS["10b"].parameters() - 10.16e9) < 0.01e9


def test_make_checkpoint_cli(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_checkpoint.py"), "--hidden", "64",
                          "--intermediate", "96", "--layers", "1", "--vocab", "128", "--heads", "4", "--kv-heads", "4",
                          "--shard-bytes", "40KB", "--only", "finetune", "--out", str(tmp_path / "ft")],
                         capture_output=True, text=True, check=True)
    assert "wrote" in out.stdout
    ckpt = open_checkpoint(tmp_path / "ft")
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(read_tensor(ckpt.tensors[name]), tensor_rows(name, (64, 96), 0, 64, finetune=True))
    assert len(ckpt.files) > 1
