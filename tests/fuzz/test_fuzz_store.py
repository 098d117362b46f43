"""Fuzz the store: ken_store.json, manifest.json, part and whole Parquet files.

Oracle: `ken-dist inspect` and `ken-dist materialize` (run in process) either refuse with
`ken-dist: error: ...` naming the store file (inspect still shows the fine-tunes it can read),
or succeed with exactly the expected tensors: those computed independently from the fixture's
base, fine-tune and masks. Nothing is written outside the output directory and no `OUT.tmp`
is left behind. Parts are also read with the sha256 check off (verify=False): the result must
then equal an independent decoding of the damaged part (pyarrow + numpy, docs/format.md's
rules), or, where that decoding finds the part inconsistent, a StoreError naming it.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
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
from mutations import byte_mutation, json_text_mutation

from ken_dist.checkpoints.dtypes import itemsize, torch_dtype
from ken_dist.errors import CheckpointError, StoreError

MANIFEST = "finetunes/ft/manifest.json"


def _manifest(store: str, ft: str = "ft") -> dict:
    with open(os.path.join(store, "finetunes", ft, "manifest.json")) as f:
        return json.load(f)


def read_dense_dir(out: str) -> dict:
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


def check_materialize(fixtures, case: str, store: str, desc: str, harmless: bool, *must_name: str) -> int:
    """Run `ken-dist materialize`; assert the oracle; return the exit code."""
    out = os.path.join(case, "out")
    before = snapshot(fixtures["root"])
    rc, stdout, err = run_cli(["materialize", store, "--finetune", "ft", "--out", out])
    rel = os.path.relpath(out, fixtures["root"])
    assert_writes_only_under(before, snapshot(fixtures["root"]), [rel])
    assert not os.path.exists(out + ".tmp"), f"{desc}: {out}.tmp left behind (rc {rc}):\n{err}"
    if rc != 0:
        assert not harmless, f"{desc}: a harmless mutation was refused:\n{err}"
        assert not os.path.exists(out), f"{desc}: refused, yet {out} exists"
        assert_cli_error(rc, err)
        assert any(name in err for name in must_name), f"{desc}: the message names none of {must_name}:\n{err}"
        return rc
    assert "Traceback" not in err, err
    got = read_dense_dir(out)
    want = fixtures["toy_expected"]
    assert sorted(got) == sorted(want), desc
    for name in want:
        assert same_bits(got[name], want[name]), f"{desc}: materialize wrote a wrong {name!r}"
    assert os.path.exists(os.path.join(out, "tokenizer_config.json")), desc
    return rc


def check_inspect(store: str, desc: str, broken_file: str | None, harmless: bool, variants) -> None:
    """inspect shows every fine-tune it can read; a refusal names the damaged file."""
    for extra in variants:
        rc, out, err = run_cli(["inspect", store, *extra])
        assert "Traceback" not in err, f"{desc}: inspect {extra}:\n{err}"
        if rc == 0:
            if not extra:
                assert "fine-tune 'ft2' [complete]" in out, f"{desc}:\n{out}"
            continue
        assert not harmless, f"{desc}: a harmless mutation was refused:\n{err}"
        assert_cli_error(rc, err)
        if broken_file is not None and broken_file.endswith("manifest.json"):
            # one damaged fine-tune never hides the other
            if not extra:
                assert "fine-tune 'ft2' [complete]" in out and "UNREADABLE" in out, f"{desc}:\n{out}\n{err}"
            if extra == ["--json"]:
                report = json.loads(out)
                assert "error" not in report["finetunes"]["ft2"], desc
            assert store in err, f"{desc}: {err}"
        elif broken_file is not None:
            assert broken_file in err, f"{desc}: the message does not name {broken_file}:\n{err}"


INSPECT_VARIANTS = [[[]], [["--json"]], [["--finetune", "ft2"]], [[], ["--json"]]]


@st.composite
def manifest_mutation(draw, doc: dict):
    """Manifest-specific damage besides generic JSON mutations: a block's `file` pointed at
    another part, at the base checkpoint, out of the store, or at a directory."""
    if draw(st.integers(0, 3)):
        return draw(json_text_mutation(doc))
    new = json.loads(json.dumps(doc))
    if draw(st.booleans()):  # another shape of the same row geometry: only the base can tell.
        # Pruned tensors only: a whole tensor's part holds bytes, not its shape, and format v1
        # does not checksum the manifest, so [4] -> [1, 4] of a whole tensor is undetectable
        # (docs/reliability.md, Limits).
        name = draw(st.sampled_from(sorted(n for n, t in new["tensors"].items() if t["action"] == "prune")))
        t = new["tensors"][name]
        shape = draw(st.sampled_from([[t["rows"], t["row_len"]], [t["rows"], 1, t["row_len"]], [t["rows"] * t["row_len"]]]))
        same = shape == t["shape"]
        t["shape"] = shape
        return f"tensors[{name!r}].shape -> {shape}", json.dumps(new).encode(), same
    blocks = [(n, i) for n, t in new["tensors"].items() for i in range(len(t["blocks"]))]
    name, i = draw(st.sampled_from(blocks))
    files = sorted({b["file"] for t in new["tensors"].values() for b in t["blocks"]})
    target = draw(st.sampled_from(files + ["finetunes/ft", "finetunes/ft2/manifest.json", "../base/model.safetensors",
                                           "/etc/hostname", "finetunes/../../x.parquet", "ken_store.json"]))
    same = target == new["tensors"][name]["blocks"][i]["file"]
    new["tensors"][name]["blocks"][i]["file"] = target
    return f"tensors[{name!r}].blocks[{i}].file -> {target!r}", json.dumps(new).encode(), same


@given(data=st.data(), which=st.sampled_from(["ken_store.json", MANIFEST, MANIFEST]))
@fuzz_settings(400)
def test_mutated_store_json_is_refused_or_rebuilds_bit_for_bit(fixtures, data, which):
    src = os.path.join(fixtures["toy_store"], which)
    with open(src) as f:
        doc = json.load(f)
    strategy = manifest_mutation(doc) if which == MANIFEST else json_text_mutation(doc)
    desc, text, harmless = data.draw(strategy, label="mutation")
    with workspace(fixtures["cases"], store=fixtures["toy_store"]) as case:
        store = os.path.join(case, "store")
        target = os.path.join(store, which)
        with open(target, "wb") as f:
            f.write(text)
        check_inspect(store, desc, target, harmless, data.draw(st.sampled_from(INSPECT_VARIANTS), label="inspect"))
        check_materialize(fixtures, case, store, desc, harmless, store, fixtures["toy_base"], fixtures["toy_ft"])


# ---- parts ---------------------------------------------------------------------------------------

def _parts(fixtures) -> list[tuple[str, int]]:
    m = _manifest(fixtures["toy_store"])
    return [(n, i) for n, t in m["tensors"].items() for i in range(len(t["blocks"]))]


@st.composite
def table_mutation(draw, table: pa.Table, whole: bool):
    """A structurally damaged but well-formed Parquet table: rows reordered, dropped, repeated or
    renumbered; a mask or values cell one byte short or long; a column renamed, retyped, nulled,
    dropped or added; columns swapped."""
    cols = {c: table.column(c).to_pylist() for c in table.column_names}
    names = list(cols)
    n = table.num_rows
    kinds = ["rename", "swap", "drop-col", "extra-col", "null", "retype"]
    if n:
        kinds += ["reverse", "drop-row", "dup-row", "cell-short", "cell-long", "renumber"]
    kind = draw(st.sampled_from(kinds))
    types = {c: table.schema.field(c).type for c in names}
    i = draw(st.integers(0, max(0, n - 1)))
    if kind == "reverse":
        cols = {c: v[::-1] for c, v in cols.items()}
    elif kind == "drop-row":
        cols = {c: v[:i] + v[i + 1:] for c, v in cols.items()}
    elif kind == "dup-row":
        cols = {c: v[: i + 1] + v[i:] for c, v in cols.items()}
    elif kind in ("cell-short", "cell-long"):
        c = draw(st.sampled_from([c for c in names if pa.types.is_binary(types[c])]))
        cell = cols[c][i]
        cols[c][i] = cell[:-1] if kind == "cell-short" and cell else cell + b"\x01"
        kind += f" ({c}[{i}])"
    elif kind == "renumber":
        c = names[0]
        cols[c][i] = cols[c][i] + draw(st.sampled_from([1, -1, 7, -(2**31), 2**31 - 1]))
        types[c] = pa.int64()  # the renumbered value may not fit the original int32
        kind += f" ({c}[{i}])"
    elif kind == "rename":
        c = draw(st.sampled_from(names))
        cols = {(k + "_" if k == c else k): v for k, v in cols.items()}
        types = {(k + "_" if k == c else k): v for k, v in types.items()}
    elif kind == "swap":
        cols = dict(reversed(list(cols.items())))
    elif kind == "drop-col":
        c = draw(st.sampled_from(names))
        cols.pop(c)
    elif kind == "extra-col":
        cols["extra"] = [0] * n
        types["extra"] = pa.int8()
    elif kind == "null" and n:
        c = draw(st.sampled_from(names))
        cols[c][i] = None
        kind += f" ({c}[{i}])"
    elif kind == "retype":
        c = draw(st.sampled_from(names))
        new_type = draw(st.sampled_from([pa.int64(), pa.int16(), pa.float64(), pa.string(), pa.large_binary()]))
        try:
            arr = pa.array(cols[c], types[c]).cast(new_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            arr = pa.array(cols[c], types[c])
        table = pa.table({k: (arr if k == c else pa.array(v, types.get(k))) for k, v in cols.items()})
        return f"{kind} {c} -> {new_type}", table
    return kind, pa.table({k: pa.array(v, types.get(k)) for k, v in cols.items()})


def _reference_block(path: str, t: dict, block: dict, base_rows: torch.Tensor):
    """The rows a damaged block part stands for, decoded here without ken_dist (pyarrow, numpy):
    None when the part breaks docs/format.md's rules."""
    try:
        table = pq.read_table(path)
        names = table.column_names  # a flipped bit in the footer can make a name invalid UTF-8
    except Exception:  # pyarrow refuses the file: that is the answer
        return None
    if names != ["row", "mask", "values"]:
        return None
    a, b, n = block["row_start"], block["row_end"], t["row_len"]
    size = itemsize(t["dtype"])
    col = {c: table.column(c) for c in table.column_names}
    if any(col[c].null_count for c in col) or not pa.types.is_integer(col["row"].type):
        return None
    if not all(pa.types.is_binary(col[c].type) or pa.types.is_large_binary(col[c].type) for c in ("mask", "values")):
        return None
    rows, masks, values = (col[c].to_pylist() for c in ("row", "mask", "values"))
    if rows != list(range(a, b)):
        return None
    out = base_rows.clone()
    flat = out.reshape(b - a, n)
    for r, (m, v) in enumerate(zip(masks, values)):
        if len(m) != (n + 7) // 8:
            return None
        keep = np.unpackbits(np.frombuffer(m, np.uint8), count=n, bitorder="little").astype(bool)
        if len(v) != int(keep.sum()) * size:
            return None
        if keep.any():
            vals = torch.frombuffer(bytearray(v), dtype=out.dtype)
            flat[r, torch.from_numpy(keep)] = vals
    return out


def _reference_whole(path: str, t: dict):
    try:
        table = pq.read_table(path)
        names = table.column_names
    except Exception:  # pyarrow refuses the file: that is the answer
        return None
    if names != ["offset", "data"] or any(table.column(c).null_count for c in table.column_names):
        return None
    if not pa.types.is_integer(table.column("offset").type) or not (
            pa.types.is_binary(table.column("data").type) or pa.types.is_large_binary(table.column("data").type)):
        return None
    raw, pos = b"", 0
    for off, chunk in zip(table.column("offset").to_pylist(), table.column("data").to_pylist()):
        if off != pos:
            return None
        raw += chunk
        pos += len(chunk)
    numel = int(np.prod(t["shape"])) if t["shape"] else 1
    if len(raw) != numel * itemsize(t["dtype"]):
        return None
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype(t["dtype"])).reshape(t["shape"]) if raw else \
        torch.empty(t["shape"], dtype=torch_dtype(t["dtype"]))


@given(data=st.data(), verify=st.booleans())
@fuzz_settings(400)
def test_mutated_part_is_refused_or_read_as_it_decodes(fixtures, data, verify):
    from ken_dist.checkpoints.inventory import open_checkpoint
    from ken_dist.checkpoints.reads import read_tensor
    from ken_dist.subnetwork.view import open_subnetwork

    name, i = data.draw(st.sampled_from(_parts(fixtures)), label="part")
    t = _manifest(fixtures["toy_store"])["tensors"][name]
    block = t["blocks"][i]
    src = os.path.join(fixtures["toy_store"], block["file"])
    with open(src, "rb") as f:
        original = f.read()
    if data.draw(st.booleans(), label="structural"):
        desc, table = data.draw(table_mutation(pq.read_table(src), t["action"] == "whole"), label="table")
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        mutated = buf.getvalue().to_pybytes()
    else:
        desc, mutated = data.draw(byte_mutation(original), label="bytes")
    with workspace(fixtures["cases"], store=fixtures["toy_store"]) as case:
        store = os.path.join(case, "store")
        part = os.path.join(store, block["file"])
        with open(part, "wb") as f:
            f.write(mutated)
        if verify:  # the CLI, sha256 checked: only the unchanged bytes pass
            rc = check_materialize(fixtures, case, store, desc, mutated == original, part)
            assert rc != 0 or mutated == original, f"{desc}: a changed part passed the sha256 check"
            return
        sub = open_subnetwork(store, "ft", verify=False)
        got, exc = library_call(sub.get_tensor, name)
        if t["action"] == "whole":
            ref = _reference_whole(part, t)
        else:
            base = read_tensor(open_checkpoint(fixtures["toy_base"]).tensors[t["base_name"]])
            rows = base.reshape(t["rows"], t["row_len"])[block["row_start"]: block["row_end"]]
            ref_rows = _reference_block(part, t, block, rows)
            ref = None
            if ref_rows is not None:
                ref = fixtures["toy_expected"][name].clone().reshape(t["rows"], t["row_len"])
                ref[block["row_start"]: block["row_end"]] = ref_rows
                ref = ref.reshape(t["shape"])
        if ref is None:
            assert exc is not None, f"{desc}: a part that breaks the format was read without complaint"
            assert_ken_error(exc, (StoreError, CheckpointError), part)
        else:
            assert exc is None, f"{desc}: a part that decodes fine was refused: {exc}"
            assert same_bits(got, ref), f"{desc}: tensor {name!r} differs from the part's own decoding"


# ---- named regressions (the cases) ----------------------------------------------------------

def test_inspect_reports_the_other_finetunes_when_a_manifest_is_not_json(fixtures):
    with workspace(fixtures["cases"], store=fixtures["toy_store"]) as case:
        store = os.path.join(case, "store")
        manifest = os.path.join(store, MANIFEST)
        with open(manifest, "w") as f:
            f.write('{"format": "ken-subnetwork", "tensors": {')
        rc, out, err = run_cli(["inspect", store])
        assert_cli_error(rc, err, manifest)
        assert "fine-tune 'ft2' [complete]" in out and "fine-tune 'ft' [UNREADABLE]" in out, out
        rc, out, err = run_cli(["inspect", store, "--json"])
        assert rc == 2 and "Traceback" not in err
        report = json.loads(out)
        assert manifest in report["finetunes"]["ft"]["error"] and "error" not in report["finetunes"]["ft2"]


def test_refused_materialize_leaves_no_temporary_output(fixtures):
    m = _manifest(fixtures["toy_store"])
    last = list(m["tensors"])[-1]  # written last: the shards before it are on disk when it fails
    with workspace(fixtures["cases"], store=fixtures["toy_store"]) as case:
        store = os.path.join(case, "store")
        part = os.path.join(store, m["tensors"][last]["blocks"][0]["file"])
        with open(part, "r+b") as f:
            f.write(b"garbage")
        out = os.path.join(case, "out")
        rc, _, err = run_cli(["materialize", store, "--finetune", "ft", "--out", out])
        assert_cli_error(rc, err, part)
        assert not os.path.exists(out) and not os.path.exists(out + ".tmp"), os.listdir(case)


def test_refused_viz_leaves_no_half_report(fixtures):
    m = _manifest(fixtures["toy_store"])
    with workspace(fixtures["cases"], store=fixtures["toy_store"]) as case:
        store = os.path.join(case, "store")
        part = os.path.join(store, m["tensors"]["b.weight"]["blocks"][-1]["file"])  # after a.weight's figures
        with open(part, "r+b") as f:
            f.write(b"garbage")
        out = os.path.join(case, "viz")
        rc, _, err = run_cli(["viz", store, "--finetune", "ft", "--out", out, "--quiet"])
        assert_cli_error(rc, err, part)
        assert not os.path.exists(out), sorted(os.listdir(out))
