"""Fuzz the checkpoints: safetensors files of base and fine-tune, and the shard index.

Oracle: ken_dist either refuses with a CheckpointError naming the file (and tensor), or every
tensor it reads is bit for bit what safetensors' own `safe_open` reads from the same file (an
independent parser); a harmless mutation (whitespace in the header) reads the original tensors.
Through the CLI (`ken-dist prune` on a mutated base or fine-tune) the job is refused before any
work with `ken-dist: error: ...` naming the file, or it succeeds and its store holds exactly
the tensors of a prune of the same weights written by safetensors itself.
"""
from __future__ import annotations

import json
import os
import shutil

from conftest import real_argv
from harness import (
    assert_cli_error,
    assert_ken_error,
    assert_writes_only_under,
    fuzz_settings,
    library_call,
    run_cli,
    same_bits,
    snapshot,
    workspace,
)
from hypothesis import given
from hypothesis import strategies as st
from mutations import json_text_mutation, safetensors_mutation

from ken_dist.checkpoints.inventory import open_checkpoint
from ken_dist.checkpoints.reads import read_tensor
from ken_dist.errors import CheckpointError


def read_all(path: str) -> dict:
    ckpt = open_checkpoint(path)
    return {name: read_tensor(info) for name, info in ckpt.tensors.items()}


def safetensors_reads(path: str) -> dict | None:
    """Every tensor as safetensors reads it, or None when safetensors refuses the file."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception:  # safetensors' own refusal (SafetensorError, ValueError, ...): that is the answer
        return None


def assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: tensor names differ: {sorted(set(got) ^ set(want))}"
    for name in want:
        assert same_bits(got[name], want[name]), f"{what}: tensor {name!r} differs"


@given(data=st.data(), which=st.sampled_from(["toy_ft", "toy_base", "real_ft"]))
@fuzz_settings(500)
def test_mutated_safetensors_reads_right_or_is_refused(fixtures, data, which):
    src = os.path.join(fixtures[which], "model.safetensors")
    with open(src, "rb") as f:
        original = f.read()
    desc, mutated, harmless = data.draw(safetensors_mutation(original), label="mutation")
    with workspace(fixtures["cases"]) as case:
        path = os.path.join(case, "model.safetensors")
        with open(path, "wb") as f:
            f.write(mutated)
        got, exc = library_call(read_all, path)
        if exc is not None:
            assert not harmless, f"{desc}: a harmless mutation was refused: {exc}"
            assert_ken_error(exc, (CheckpointError,), path)
            return
        ref = safetensors_reads(path)
        assert ref is not None, f"{desc}: ken_dist read a file that safetensors refuses"
        assert_same_tensors(got, ref, desc)
        if harmless:
            assert_same_tensors(got, safetensors_reads(src), desc)


def _write_index(case: str, fixtures, text) -> str:
    """The sharded fine-tune with its index replaced by `text`, or ("delete", shard): a shard removed."""
    ckpt = os.path.join(case, "sharded")
    shutil.copytree(fixtures["sharded_ft"], ckpt)
    if isinstance(text, tuple):
        os.unlink(os.path.join(ckpt, text[1]))
        return ckpt
    with open(os.path.join(ckpt, "model.safetensors.index.json"), "wb") as f:
        f.write(text)
    return ckpt


@st.composite
def index_mutation(draw, doc: dict):
    """Index-specific damage (a shard missing, a weight in two shards or moved, paths climbing
    out with '..' or absolute) besides generic JSON mutations."""
    wmap = doc["weight_map"]
    names, shards = sorted(wmap), sorted(set(wmap.values()))
    kind = draw(st.sampled_from(["json", "json", "moved", "escape", "drop", "extra", "shard-gone"]))
    if kind == "json":
        return draw(json_text_mutation(doc))
    if kind == "shard-gone":  # the index intact, one of its shard files deleted
        shard = draw(st.sampled_from(shards))
        return f"shard file {shard} deleted", ("delete", shard), False
    new = json.loads(json.dumps(doc))
    name = draw(st.sampled_from(names))
    if kind == "moved":
        shard = draw(st.sampled_from(shards))
        new["weight_map"][name] = shard
        return f"{name} listed in {shard}", json.dumps(new).encode(), shard == wmap[name]
    if kind == "escape":
        path = draw(st.sampled_from(["../" + wmap[name], "/etc/passwd", "../finetune/" + wmap[name],
                                     "./" + wmap[name], "sub/../" + wmap[name], "", "."]))
        new["weight_map"][name] = path
        return f"{name} in {path!r}", json.dumps(new).encode(), False
    if kind == "drop":
        del new["weight_map"][name]
        return f"{name} dropped from the index", json.dumps(new).encode(), False
    new["weight_map"]["not.in.any.shard"] = draw(st.sampled_from(shards))
    return "a tensor no shard holds", json.dumps(new).encode(), False


@given(data=st.data())
@fuzz_settings(400)
def test_mutated_shard_index_reads_right_or_is_refused(fixtures, data):
    with open(os.path.join(fixtures["sharded_ft"], "model.safetensors.index.json"), "rb") as f:
        doc = json.load(f)
    desc, text, harmless = data.draw(index_mutation(doc), label="mutation")
    want = read_all(fixtures["sharded_ft"])
    with workspace(fixtures["cases"]) as case:
        ckpt = _write_index(case, fixtures, text)
        before = snapshot(case)
        got, exc = library_call(read_all, ckpt)
        assert_writes_only_under(before, snapshot(case), [])
        if exc is not None:
            assert not harmless, f"{desc}: a harmless mutation was refused: {exc}"
            assert_ken_error(exc, (CheckpointError,), ckpt)
            return
        # accepted: the index must still describe exactly the shards' tensors
        assert_same_tensors(got, want, desc)


def _prune_with(fixtures, case: str, base: str, ft: str, monkeypatch) -> tuple[int, str, str]:
    import conftest

    from ken_dist.runtime import driver

    monkeypatch.setattr(driver, "_run_units", conftest.serial_units)
    return run_cli(real_argv(base, ft, os.path.join(case, "store")))


@given(data=st.data(), which=st.sampled_from(["base", "finetune"]))
@fuzz_settings(200)
def test_prune_of_a_mutated_checkpoint_refuses_or_prunes_those_weights(fixtures, data, which, monkeypatch):
    from safetensors.torch import save_file

    from ken_dist.subnetwork.view import open_subnetwork

    key = "real_base" if which == "base" else "real_ft"
    with open(os.path.join(fixtures[key], "model.safetensors"), "rb") as f:
        original = f.read()
    desc, mutated, harmless = data.draw(safetensors_mutation(original), label="mutation")
    with workspace(fixtures["cases"], base=fixtures["real_base"], finetune=fixtures["real_ft"]) as case:
        target = os.path.join(case, which, "model.safetensors")
        with open(target, "wb") as f:
            f.write(mutated)
        base, ft = os.path.join(case, "base"), os.path.join(case, "finetune")
        before = snapshot(case)
        rc, out, err = _prune_with(fixtures, case, base, ft, monkeypatch)
        assert_writes_only_under(before, snapshot(case), ["store"])
        if rc != 0:
            assert not harmless, f"{desc}: a harmless mutation was refused:\n{err}"
            assert_cli_error(rc, err, os.path.join(case, which))  # the file, or its checkpoint (a mismatch)
            return
        assert "Traceback" not in err, err
        weights = safetensors_reads(target)
        assert weights is not None, f"{desc}: pruned from a file that safetensors refuses"
        # the reference: the same weights written by safetensors itself, pruned the same way
        ref_dir = os.path.join(case, "ref")
        shutil.copytree(os.path.join(case, which), os.path.join(ref_dir, which))
        save_file(weights, os.path.join(ref_dir, which, "model.safetensors"))
        other = "finetune" if which == "base" else "base"
        shutil.copytree(os.path.join(case, other), os.path.join(ref_dir, other))
        rc2, _, err2 = _prune_with(fixtures, ref_dir, os.path.join(ref_dir, "base"),
                                   os.path.join(ref_dir, "finetune"), monkeypatch)
        assert rc2 == 0, err2
        with open_subnetwork(os.path.join(case, "store"), "sft") as got, \
                open_subnetwork(os.path.join(ref_dir, "store"), "sft") as want:
            assert_same_tensors({n: got.get_tensor(n) for n in got.keys()},
                                {n: want.get_tensor(n) for n in want.keys()}, desc)
