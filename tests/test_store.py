"""The subnetwork store: bytes on disk, names, commit protocol, resume, locking, size."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_helpers import (
    PARAMS,
    identity,
    make_checkpoints,
    plan_for,
    random_bits,
    same_bits,
    write_all,
)

from ken_dist.checkpoints.dtypes import dtype_name
from ken_dist.errors import KenError
from ken_dist.store import parts
from ken_dist.store.fs import (
    append_jsonl,
    atomic_output,
    atomic_write,
    escape_name,
    read_jsonl,
    unescape_name,
)
from ken_dist.store.parts import apply_block, decode_whole, info_bound_bytes
from ken_dist.store.protocol import Store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def toy(tmp_path):
    tensors = {"w": ((6, 10), torch.bfloat16), "b": ((10,), torch.float16), "e": ((3, 2, 5), torch.float32),
               "ids": ((4,), torch.int64)}
    base, ft, bdir, fdir = make_checkpoints(tmp_path, tensors)
    return {"base": base, "ft": ft, "bdir": bdir, "fdir": fdir, "plan": plan_for(ft, 2),
            "store": str(tmp_path / "store")}


def begin(store, toy, name="ft", params=PARAMS, **kw):
    return store.begin(name, params=params, base_identity=identity(toy["bdir"]),
                finetune_identity=identity(toy["fdir"]), tensors=toy["plan"], **kw)


def reread(store, record, like):
    """Apply a written block onto zeros and return the block's rows."""
    table = store.read_part(record, record["tensor"])
    target = torch.zeros_like(like)
    apply_block(table, target, record["row_start"], record["row_end"], target_row0=record["row_start"])
    return target


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_block_round_trip_is_bit_exact(tmp_path, toy, dtype):
    store = Store(tmp_path / "s", create=True)
    begin(store, toy)
    gen = torch.Generator().manual_seed(3)
    values = random_bits((5, 37), dtype, gen)  # n not a multiple of 8: padding bits
    mask = torch.rand(5, 37, generator=gen) < 0.5
    mask[0] = False
    mask[1] = True
    rec = store.write_block("ft", "w", 10, 15, mask, values)
    assert rec["kept"] == int(mask.sum()) and rec["dtype"] == dtype_name(dtype)
    got = reread(store, rec, values)
    assert same_bits(got[mask], values[mask]) and not got[~mask].view(torch.uint8).any()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=st.integers(1, 6), n=st.integers(1, 70), p=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_block_round_trip_property(tmp_path, toy, r, n, p, seed):
    store = Store(tmp_path / "s", create=True)
    begin(store, toy)
    gen = torch.Generator().manual_seed(seed)
    values = random_bits((r, n), torch.bfloat16, gen)
    mask = torch.rand(r, n, generator=gen) < p
    rec = store.write_block("ft", "w", 0, r, mask, values)
    got = reread(store, rec, values)
    assert same_bits(got[mask], values[mask])
    assert rec["kept_row_min"] == int(mask.sum(1).min()) and rec["kept_row_max"] == int(mask.sum(1).max())


def test_same_block_twice_gives_the_same_file(tmp_path, toy):
    store = Store(tmp_path / "s", create=True)
    begin(store, toy)
    values = toy["ft"]["w"][:2]
    mask = torch.rand(values.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    a = store.write_block("ft", "w", 0, 2, mask, values)
    b = store.write_block("ft", "w", 0, 2, mask, values)
    assert a == b and os.path.getsize(store.resolve(a["file"])) == a["bytes"]
    assert not [f for f in os.listdir(os.path.dirname(store.resolve(a["file"]))) if f.endswith(".tmp")]


@pytest.mark.parametrize("shape,dtype", [((3, 4, 5), torch.bfloat16), ((7,), torch.int64), ((), torch.float32),
                                         ((4, 3), torch.bool), ((0, 5), torch.float16), ((5000,), torch.int8)])
def test_whole_tensor_round_trip(tmp_path, toy, monkeypatch, shape, dtype):
    monkeypatch.setattr(parts, "WHOLE_CHUNK_BYTES", 1000)  # several chunks and row groups
    store = Store(tmp_path / "s", create=True)
    begin(store, toy)
    gen = torch.Generator().manual_seed(1)
    values = random_bits(shape, dtype, gen) if dtype.is_floating_point else \
        torch.randint(0, 2, shape, generator=gen).to(dtype)
    rec = store.write_whole("ft", "t", values)
    got = decode_whole(store.read_part(rec, "t"), dtype, list(shape))
    assert same_bits(got, values)


HOSTILE = ["../../etc/x", "a/b", "..", ".", ".hidden", "/abs/path", "a\\..\\b", "ünï/cödé ✓", "x" * 1000,
           "%2E", "a\x00b", "~", "tensors", "manifest.json", "\ud800"]


def test_hostile_names_stay_inside_the_store(tmp_path, toy):
    root = tmp_path / "inside"
    root.mkdir()
    store = Store(root / "store", create=True)
    seen = set()
    for i, name in enumerate(HOSTILE):
        esc = escape_name(name)
        assert "/" not in esc and not esc.startswith(".") and len(esc.encode()) <= 200, name
        assert esc not in seen, name
        seen.add(esc)
        if "~" not in esc:
            assert unescape_name(esc) == name
        ft = name if i % 2 else f"ft{i}"
        store.begin(ft, params=PARAMS, base_identity={}, finetune_identity={}, tensors={})
        store.write_block(ft, name, 0, 1, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3))
        store.write_whole(ft, name, torch.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["base", "ft", "inside"]
    assert os.listdir(root) == ["store"]
    for dirpath, _, files in os.walk(root / "store"):
        for f in files:
            assert os.path.realpath(os.path.join(dirpath, f)).startswith(store.root + os.sep)
    assert sorted(store.finetunes()) == sorted(n if i % 2 else f"ft{i}" for i, n in enumerate(HOSTILE))
    with pytest.raises(KenError, match="outside the store"):
        store.resolve("../elsewhere")
    with pytest.raises(KenError, match="non-empty"):
        escape_name("")


def test_journal_survives_and_resume_skips_only_intact_parts(toy):
    store = Store(toy["store"], create=True)
    begin(store, toy)
    write_all(store, "ft", toy["ft"], toy["plan"], skip=2)  # the last two blocks never committed
    del store
    fresh = Store(toy["store"])  # as a new driver process would
    done = fresh.completed_blocks("ft")
    planned = [(t, a, b) for t, p in toy["plan"].items() for a, b in p["blocks"]]
    assert set(done) == set(planned[:-2])
    victim = done[("w", 0, 2)]
    os.unlink(fresh.resolve(victim["file"]))
    with open(fresh._journal("ft"), "ab") as f:
        f.write(b'{"tensor": "torn')  # a commit cut short by a kill
    assert ("w", 0, 2) not in fresh.completed_blocks("ft")
    rec = fresh.write_block("ft", "w", 0, 2, torch.ones(2, 10, dtype=torch.bool), toy["ft"]["w"][:2])
    fresh.commit("ft", [rec])
    assert ("w", 0, 2) in fresh.completed_blocks("ft")
    same_size_garbage = fresh.resolve(rec["file"])
    with open(same_size_garbage, "r+b") as f:
        f.seek(rec["bytes"] // 2)
        byte = f.read(1)[0]
        f.seek(rec["bytes"] // 2)
        f.write(bytes([byte ^ 0xFF]))
    assert ("w", 0, 2) in fresh.completed_blocks("ft")
    assert ("w", 0, 2) not in fresh.completed_blocks("ft", verify=True)


def test_jsonl_appends_whole_lines_after_a_torn_one_and_refuses_odd_values(tmp_path):
    """store.fs.append_jsonl/read_jsonl, the one JSONL rule (journal and job log): several
    records per fsync, a torn last line skipped and never glued to the next record, and no value
    silently turned into a string unless the caller asks (the job log does)."""
    path = str(tmp_path / "x.jsonl")
    append_jsonl(path, {"a": 1}, {"b": [2, 3]})
    with open(path, "ab") as f:
        f.write(b'{"torn": ')
    append_jsonl(path, {"c": 4})
    append_jsonl(path)  # nothing to append: nothing written
    assert read_jsonl(path) == [{"a": 1}, {"b": [2, 3]}, {"c": 4}]
    with pytest.raises(TypeError):
        append_jsonl(path, {"d": {1, 2}})
    append_jsonl(path, {"d": np.int64(5)}, default=str)
    assert read_jsonl(path)[-1] == {"d": "5"} and read_jsonl(str(tmp_path / "none.jsonl")) == []


def test_atomic_output_publishes_all_or_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "f.bin")
    atomic_write(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert open(path, "rb").read() == b"new" and os.listdir(tmp_path) == ["f.bin"]


def test_commit_survives_sigkill_and_the_lock_dies_with_the_process(toy):
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        from ken_dist.store.protocol import Store
        from store_helpers import PARAMS, identity, make_checkpoints, plan_for
        base, ft, bdir, fdir = make_checkpoints({os.path.join(os.path.dirname(toy['store']), 'killed')!r}, {{"w": ((6, 10), torch.bfloat16)}})
        s = Store({toy['store']!r}, create=True)
        s.begin("ft", params=PARAMS, base_identity=identity(bdir), finetune_identity=identity(fdir),
                tensors=plan_for(ft, 2))
        s.commit("ft", [s.write_block("ft", "w", 0, 2, torch.ones(2, 10, dtype=torch.bool), ft["w"][:2])])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    store = Store(toy["store"])
    assert set(store.completed_blocks("ft")) == {("w", 0, 2)}
    store.acquire("ft")  # the killed run's flock is gone


def test_begin_again_with_other_settings_names_the_difference(toy):
    store = Store(toy["store"], create=True)
    begin(store, toy)
    begin(store, toy)  # same settings: resume, no error
    with pytest.raises(KenError, match=r"params\.keep.*0\.4.*0\.25(.|\n)*--overwrite"):
        begin(store, toy, params=dict(PARAMS, keep=0.25))
    other = dict(identity(toy["bdir"]))
    other["files"] = [dict(other["files"][0], header_sha256="0" * 64)]
    with pytest.raises(KenError, match="base.files"):
        store.begin("ft", params=PARAMS, base_identity=other, finetune_identity=identity(toy["fdir"]),
                    tensors=toy["plan"])
    moved = dict(identity(toy["bdir"]), root="/somewhere/else", source="/somewhere/else")
    store.begin("ft", params=PARAMS, base_identity=moved, finetune_identity=identity(toy["fdir"]),
                tensors=toy["plan"])  # same files reached by another path: not a difference


def test_overwrite_clears_only_that_finetune(toy):
    store = Store(toy["store"], create=True)
    for name in ("ft", "keepme"):
        begin(store, toy, name=name)
        write_all(store, name, toy["ft"], toy["plan"])
    begin(store, toy, name="ft", params=dict(PARAMS, keep=0.1), overwrite=True)
    assert store.completed_blocks("ft") == {}
    assert store.manifest("ft")["params"]["keep"] == 0.1
    assert not os.path.exists(os.path.join(store._ft_dir("ft"), "tensors"))
    assert len(store.completed_blocks("keepme")) == sum(len(p["blocks"]) for p in toy["plan"].values())


def test_finalize_refuses_holes_and_then_completes(toy):
    store = Store(toy["store"], create=True)
    begin(store, toy)
    write_all(store, "ft", toy["ft"], toy["plan"], skip=1)
    last = [(t, a, b) for t, p in toy["plan"].items() for a, b in p["blocks"]][-1]
    with pytest.raises(KenError, match=rf"not complete; 1 block\(s\) missing(.|\n)*{last[0]} rows \[{last[1]}"):
        store.finalize("ft", summary={})
    assert store.manifest("ft")["complete"] is False
    write_all(store, "ft", toy["ft"], toy["plan"])
    m = store.finalize("ft", summary={"note": "done"})
    assert m["complete"] and m["summary"] == {"note": "done"}
    w = m["tensors"]["w"]
    assert w["kept"] == sum(b["kept"] for b in w["blocks"]) and all(len(b["sha256"]) == 64 for b in w["blocks"])
    for key in ("format_version", "created", "updated", "ken_dist_version", "base_identity", "finetune_identity",
                "params", "complete", "summary", "tensors"):
        assert key in m
    for key in ("shape", "dtype", "action", "rows", "row_len", "base_name", "kept", "bytes", "blocks"):
        assert key in w


def test_finalize_drops_the_journal_and_a_lost_part_is_all_that_runs_again(toy):
    """A complete fine-tune is its parts + manifest; when a part goes missing, the manifest's
    records stand in for the journal, so only that block is missing on resume."""
    store = Store(toy["store"], create=True)
    begin(store, toy)
    write_all(store, "ft", toy["ft"], toy["plan"])
    m = store.finalize("ft", summary={})
    ftdir = store._ft_dir("ft")
    assert not os.path.exists(store._journal("ft")) and sorted(os.listdir(ftdir)) == [".lock", "manifest.json",
                                                                                        "tensors"]
    planned = [(t, a, b) for t, p in toy["plan"].items() for a, b in p["blocks"]]
    lost = m["tensors"]["w"]["blocks"][1]
    os.unlink(store.resolve(lost["file"]))
    assert begin(store, toy) == "resume"
    assert set(store.completed_blocks("ft")) == set(planned) - {("w", lost["row_start"], lost["row_end"])}
    write_all(store, "ft", toy["ft"], toy["plan"])  # the same seed: the same parts
    again = store.finalize("ft", summary={})
    assert again["tensors"] == m["tensors"] and not os.path.exists(store._journal("ft"))


def test_a_changed_block_plan_resumes_and_old_parts_are_removed(toy):
    store = Store(toy["store"], create=True)
    begin(store, toy)
    write_all(store, "ft", toy["ft"], toy["plan"])
    toy["plan"] = plan_for(toy["ft"], 3)
    begin(store, toy)
    write_all(store, "ft", toy["ft"], toy["plan"])
    m = store.finalize("ft", summary={})
    files = {b["file"] for t in m["tensors"].values() for b in t["blocks"]}
    on_disk = set()
    for dirpath, _, names in os.walk(os.path.join(store._ft_dir("ft"), "tensors")):
        on_disk |= {os.path.relpath(os.path.join(dirpath, n), store.root) for n in names}
    assert on_disk == files


def test_a_second_run_on_the_same_finetune_is_refused(toy):
    first = Store(toy["store"], create=True)
    begin(first, toy)
    second = Store(toy["store"])
    with pytest.raises(KenError, match=rf"being written by another run \(pid {os.getpid()}"):
        begin(second, toy)
    begin(second, toy, name="other")  # other fine-tunes are not blocked
    write_all(first, "ft", toy["ft"], toy["plan"])
    first.finalize("ft", summary={})  # releases the lock
    begin(second, toy)
    second.close()
    with first.locked(["ft", "other"]):
        with pytest.raises(KenError, match="another run"):
            Store(toy["store"]).acquire("other")


def test_store_format_checks(tmp_path, toy):
    with pytest.raises(KenError, match="not a ken_dist store"):
        Store(tmp_path / "nothing")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(KenError, match="not empty"):
        Store(tmp_path / "busy", create=True)
    store = Store(toy["store"], create=True)
    begin(store, toy)
    path = os.path.join(store._ft_dir("ft"), "manifest.json")
    m = json.load(open(path))
    json.dump(dict(m, format_version=3), open(path, "w"))
    with pytest.raises(KenError, match="format_version 3.*upgrade ken_dist"):
        store.manifest("ft")
    marker = os.path.join(store.root, "ken_store.json")
    json.dump({"format": "ken-subnetwork", "format_version": 99}, open(marker, "w"))
    with pytest.raises(KenError, match="format_version 99.*upgrade ken_dist"):
        Store(toy["store"])


def test_write_block_rejects_bad_inputs_naming_the_tensor(toy):
    store = Store(toy["store"], create=True)
    with pytest.raises(KenError, match="was not begun"):
        store.write_block("ft", "w", 0, 2, torch.ones(2, 10, dtype=torch.bool), torch.ones(2, 10))
    begin(store, toy)
    with pytest.raises(KenError, match="'w'.*bool tensor"):
        store.write_block("ft", "w", 0, 2, torch.ones(2, 10), torch.ones(2, 10))
    with pytest.raises(KenError, match="'w'.*do not split into 3 rows"):
        store.write_block("ft", "w", 0, 3, torch.ones(2, 10, dtype=torch.bool), torch.ones(2, 10))
    with pytest.raises(KenError, match="'w'.*must tile"):
        bad = dict(toy["plan"], w=dict(toy["plan"]["w"], blocks=[[0, 2], [3, 6]]))
        store.begin("ft", params=PARAMS, base_identity={}, finetune_identity={}, tensors=bad)


@pytest.mark.parametrize("keep", [0.25, 0.5])
@pytest.mark.parametrize("kind", ["random bits", "normal"])
def test_storage_within_115_percent_of_the_information_bound(tmp_path, toy, keep, kind):
    """bf16 [512, 4096] with random masks: whole part file vs kept*2 + log2 C(n, kept)/8 per row."""
    store = Store(tmp_path / "s", create=True)
    begin(store, toy)
    gen = torch.Generator().manual_seed(7)
    values = random_bits((512, 4096), torch.bfloat16, gen) if kind == "random bits" else \
        torch.randn(512, 4096, generator=gen).to(torch.bfloat16)
    mask = torch.rand(512, 4096, generator=gen) < keep
    rec = store.write_block("ft", "w", 0, 512, mask, values)
    bound = info_bound_bytes(mask.sum(1).numpy(), 4096, 2)
    size = os.path.getsize(store.resolve(rec["file"]))
    assert abs(rec["bound_bytes"] - bound) < 1e-6 * bound
    assert size / bound <= 1.15, f"{kind} keep {keep}: {size} bytes, bound {bound:.0f}, ratio {size / bound:.4f}"


def test_information_bound_matches_exact_binomials():
    from math import comb, log2
    kept = np.array([0, 1, 5, 37, 40])
    exact = sum(k * 2 + log2(comb(40, int(k))) / 8 for k in kept)
    assert abs(info_bound_bytes(kept, 40, 2) - exact) < 1e-9 * exact


def test_part_layout_matches_the_format(toy):
    """Read a part with plain pyarrow, as a foreign reader would: schema, bit order, value order."""
    import pyarrow.parquet as pq
    store = Store(toy["store"], create=True)
    begin(store, toy)
    values = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 0] = mask[1, 9] = mask[1, 3] = True
    rec = store.write_block("ft", "w", 4, 6, mask, values)
    assert rec["file"] == "finetunes/ft/tensors/w/part-0000000004-0000000006.parquet"
    table = pq.read_table(store.resolve(rec["file"]))
    assert [str(t) for t in table.schema.types] == ["int32", "binary", "binary"]
    assert table.column_names == ["row", "mask", "values"]
    rows = table.to_pylist()
    assert [r["row"] for r in rows] == [4, 5]
    assert rows[0]["mask"] == bytes([0b00000001, 0]) and rows[1]["mask"] == bytes([0b00001000, 0b00000010])
    assert rows[0]["values"] == values[0, [0]].numpy().tobytes()
    assert rows[1]["values"] == values[1, [3, 9]].numpy().tobytes()
