"""Stores written by earlier releases keep loading bit for bit.

tests/data/store_v1_135f4ab/ was written by ken_dist at commit 135f4ab (before the package moved
into layers): a tiny bf16 Llama pair (base/, finetune/), a store with three fine-tunes (ken index
mode, ken reference mode, magnitude-model with a model budget) and expected.json, the sha256 of
every tensor as that release's loader rebuilt it. The manifests name the base where it was then
(/tmp/fx/v1/base), so the base is passed as moved, as a user would after copying a store.

tests/data/store_v2_b4d9403/ was written by ken_dist at commit b4d9403 (the release before
`fit-scales` rewrote lossy parts; tests/data/make_v2_fixture.py says how): three format-2
fine-tunes with lossy values (sign-g8, int4, and sign at keep 0.005 with position lists) of a
tiny bf16 / fp32 / fp16 pair, and the sha256 of every tensor as that release rebuilt it.
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
FIXTURE_V2 = Path(__file__).parent / "data" / "store_v2_b4d9403"
EXPECTED_V2 = json.loads((FIXTURE_V2 / "expected.json").read_text())["expected_sha256"]


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


@pytest.fixture
def old_v2_store(tmp_path):
    shutil.copytree(FIXTURE_V2, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _v2_tensors(root, finetune: str) -> dict:
    with ken_dist.open_subnetwork(root / "store", finetune, base=root / "base") as sub:
        return {name: _sha(sub.get_tensor(name)) for name in sub.keys()}


@pytest.mark.parametrize("finetune", sorted(EXPECTED_V2))
def test_a_lossy_store_of_the_release_before_fit_scales_rebuilds_bit_for_bit(old_v2_store, finetune):
    m = Store(old_v2_store / "store").manifest(finetune)
    blocks = [b for t in m["tensors"].values() if t["action"] == "prune" for b in t["blocks"]]
    assert m["format_version"] == 2 and all(b["values"] == m["params"]["values"] for b in blocks)
    if finetune == "low-sign":
        assert any(b.get("index") == "positions" for b in blocks)  # the fixture holds position lists
    assert _v2_tensors(old_v2_store, finetune) == EXPECTED_V2[finetune]


def test_rescaling_the_release_before_by_one_rewrites_its_parts_and_keeps_every_tensor(old_v2_store):
    """Today's rewrite of lossy parts (fit-scales' Store.rescaling), on parts that release wrote,
    with every multiplier 1: new part files, the same tensors bit for bit."""
    import numpy as np

    from ken_dist.store.parts import rescale_scales

    store = Store(old_v2_store / "store")
    for finetune in sorted(EXPECTED_V2):
        m = store.manifest(finetune)
        with store.rescaling(finetune) as rw:
            for name, t in m["tensors"].items():
                for b in t["blocks"]:
                    if "values" in b:
                        table = store.read_part(b, name)
                        rw.write(name, b["row_start"], b["row_end"], rescale_scales(table, np.ones(table.num_rows)))
            rw.commit({"note": "multipliers 1"})
        after = store.manifest(finetune)
        assert all(b["file"].endswith("-fit1.parquet") for t in after["tensors"].values() for b in t["blocks"]
                   if "values" in b)
        assert _v2_tensors(old_v2_store, finetune) == EXPECTED_V2[finetune]
