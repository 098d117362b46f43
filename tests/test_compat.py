"""Stores written by earlier releases keep loading bit for bit.

tests/data/store_v1_135f4ab/ was written by ken_dist at commit 135f4ab (before the package moved
into layers): a tiny bf16 Llama pair (base/, finetune/), a store with three fine-tunes (ken index
mode, ken reference mode, magnitude-model with a model budget) and expected.json, the sha256 of
every tensor as that release's loader rebuilt it. The manifests name the base where it was then
(/tmp/fx/v1/base), so the base is passed as moved, as a user would after copying a store.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import ken_dist
from ken_dist.store.protocol import Store

FIXTURE = Path(__file__).parent / "data" / "store_v1_135f4ab"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())["expected_sha256"]


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def old_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("v1")
    shutil.copytree(FIXTURE, root, dirs_exist_ok=True)
    return root


@pytest.mark.parametrize("finetune", sorted(EXPECTED))
def test_a_store_of_an_earlier_release_rebuilds_bit_for_bit(old_store, finetune):
    with ken_dist.open_subnetwork(old_store / "store", finetune, base=old_store / "base") as sub:
        assert sorted(sub.keys()) == sorted(EXPECTED[finetune])
        got = {name: _sha(sub.get_tensor(name)) for name in sub.keys()}
    assert got == EXPECTED[finetune]


def test_an_earlier_release_store_materializes_and_inspects(old_store, tmp_path):
    out = tmp_path / "dense"
    ken_dist.materialize(old_store / "store", "mm", out, base=old_store / "base",
                         finetune_root=old_store / "finetune")
    from ken_dist.checkpoints.inventory import open_checkpoint
    from ken_dist.checkpoints.reads import read_tensor

    ckpt = open_checkpoint(out)
    assert {n: _sha(read_tensor(i)) for n, i in ckpt.tensors.items()} == EXPECTED["mm"]
    report = ken_dist.inspect_store(old_store / "store")
    assert set(report["finetunes"]) == set(EXPECTED) and all(f["complete"] for f in report["finetunes"].values())
    assert Store(old_store / "store").manifest("mm")["format_version"] == 1
