"""Value codecs and index coding of store format 2; format 1 stores still read bit for bit."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from store_helpers import PARAMS, identity, make_checkpoints, plan_for, same_bits

import ken_dist.store.protocol as protocol
from ken_dist.checkpoints.dtypes import storage_dtype, to_float32
from ken_dist.errors import KenError, StoreError
from ken_dist.store.codecs import parse_codec, widen
from ken_dist.store.parts import block_rows, encode_block, part_bytes
from ken_dist.store.protocol import Store
from ken_dist.subnetwork.view import Subnetwork, open_subnetwork

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "v1_store")
LOSSY = ["int8", "int4", "int2", "sign", "int4-g3"]
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _special_rows(dtype: str, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask, fine-tuned bits, base bits) [6, 40]: a normal row, a row keeping one entry, a row
    keeping everything, a row keeping nothing, a row of +-0 and one of subnormals."""
    r, n = 6, 40
    base = rng.normal(size=(r, n))
    ft = base + rng.normal(scale=0.05, size=(r, n))
    tiny = {"BF16": 1e-39, "F16": 3e-6, "F32": 1e-39, "F64": 1e-310}[dtype]  # subnormal in each dtype
    base[4], ft[4] = 0.0, -0.0
    base[4, ::2], ft[4, 1::2] = -0.0, 0.0
    base[5], ft[5] = rng.normal(size=n) * tiny, rng.normal(size=n) * tiny
    mask = rng.random((r, n)) < 0.4
    mask[1] = False
    mask[1, 7] = True
    mask[2] = True
    mask[3] = False

    def bits(x):
        t = torch.from_numpy(x).to(DTYPES[dtype])
        return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy() \
            .view(storage_dtype(dtype))

    return mask, bits(ft), bits(base)


def _decode(table, stats, n, dtype, base, row_start, lo=None, hi=None):
    out = {}
    for first, keep, values in block_rows(table, n, dtype, row_start, row_start + base.shape[0], lo, hi,
                                          codec=stats.get("values", "raw"), index=stats.get("index", "mask"),
                                          base_rows=lambda a, b: base[a - row_start: b - row_start]):
        out[first] = (keep, values.view(storage_dtype(dtype)))
    return out


def _reference(table, stats, n, dtype, base, mask):
    """The format's rebuilding rule written out entry by entry, independently of parts.py:
    codes from the packed bytes, scales from the bf16 bits, base + m * s, rounded to the dtype."""
    spec = parse_codec(stats["values"])
    top = (1 << spec.bits) - 1
    vals = table.column("values").to_pylist()
    scales = table.column("scales").to_pylist()
    ct = np.float64 if dtype == "F64" else np.float32
    out = []
    for i in range(mask.shape[0]):
        js = np.flatnonzero(mask[i])
        row_scales = [float(np.array([int.from_bytes(scales[i][2 * g: 2 * g + 2], "little") << 16],
                                     np.uint32).view(np.float32)[0]) for g in range(len(scales[i]) // 2)]
        for rank, j in enumerate(js):
            bit = rank * spec.bits
            code = (vals[i][bit // 8] >> (bit % 8)) & top
            s = row_scales[rank // spec.group if spec.group else 0]
            b = ct(to_float32(base[i, j: j + 1], dtype)[0]) if dtype != "F64" else base[i, j]
            delta = ct(2 * code - top) * ct(s)
            v = torch.tensor([float(ct(b + delta))], dtype=torch.float64 if dtype == "F64" else torch.float32)
            out.append(v.to(DTYPES[dtype]))
    return torch.cat(out) if out else torch.zeros(0, dtype=DTYPES[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("codec", ["raw", *LOSSY])
def test_codec_round_trip_on_special_rows(dtype, codec):
    rng = np.random.default_rng(hash((dtype, codec)) % 2**32)
    mask, ft, base = _special_rows(dtype, rng)
    n = mask.shape[1]
    table, stats = encode_block(10, mask, ft, codec=parse_codec(codec), base=base, dtype=dtype)
    table = pq.read_table(pa.BufferReader(part_bytes(table)))
    rows = _decode(table, stats, n, dtype, base, 10)
    keep = np.concatenate([rows[f][0] for f in sorted(rows)])
    values = np.concatenate([rows[f][1] for f in sorted(rows)])
    assert np.array_equal(keep, mask)
    if codec == "raw":
        assert "values" not in stats
        assert np.array_equal(values.view(np.uint8), ft[mask].view(np.uint8))  # bit for bit
        return
    assert stats["values"] == codec
    got = torch.from_numpy(values.view({2: np.int16, 4: np.int32, 8: np.int64}[values.itemsize]).copy())
    want = _reference(table, stats, n, dtype, base, mask)
    assert torch.equal(got.view(want.dtype).view(got.dtype), want.view(got.dtype))  # exactly the format's rule
    # how good: the error relative to the delta on the normal rows, exact on the row of +-0
    g = widen(values, dtype).astype(np.float64)
    f, b = (widen(x, dtype).astype(np.float64)[mask] for x in (ft, base))
    normal = np.repeat(np.arange(mask.shape[0]), mask.sum(1)) % 3 != 1  # rows 0 and 2 (1 keeps one entry)
    normal &= np.repeat(np.arange(mask.shape[0]), mask.sum(1)) < 3
    rel = np.sqrt(((g - f)[normal] ** 2).mean() / ((f - b)[normal] ** 2).mean())
    assert rel < {"int8": 0.02, "int4": 0.15, "int4-g3": 0.15, "int2": 0.5, "sign": 0.8}[codec], rel
    zeros = np.repeat(np.arange(mask.shape[0]), mask.sum(1)) == 4
    assert np.all(g[zeros] == 0)
    if codec == "sign":
        d = f - b
        assert np.all(np.sign(g - b)[normal & (d != 0)] == np.sign(d)[normal & (d != 0)])
    # decoding a sub-range yields the same rows
    sub = _decode(table, stats, n, dtype, base, 10, 12, 15)
    assert sorted(sub) == [12] and np.array_equal(sub[12][1], np.concatenate([rows[f][1] for f in sorted(rows)])
                                                   [mask[:2].sum(): mask[:5].sum()])


def test_sign_scale_is_mean_abs_delta_per_row_and_group():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(3, 64)).astype(np.float32)
    ft = (base + rng.normal(scale=0.1, size=base.shape)).astype(np.float32)
    mask = np.ones_like(base, bool)
    for codec, group in (("sign", 64), ("sign-g16", 16)):
        table, stats = encode_block(0, mask, ft, codec=parse_codec(codec), base=base, dtype="F32")
        scales = np.frombuffer(b"".join(table.column("scales").to_pylist()), "<u2")
        d = np.abs(ft.astype(np.float64) - base).reshape(-1, group).mean(axis=1)
        want = (torch.tensor(d, dtype=torch.float32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
        assert np.array_equal(scales, want)


def test_lloyd_fit_beats_max_scaling():
    """The fitted scale's error is below that of the plain max|d| / (2^b - 1) rounding."""
    rng = np.random.default_rng(4)
    base = np.zeros((1, 4096), np.float32)
    ft = rng.standard_t(3, size=(1, 4096)).astype(np.float32)  # heavy tails: max scaling wastes levels
    mask = np.ones_like(ft, bool)
    for codec, bits in (("int4", 4), ("int2", 2)):
        table, stats = encode_block(0, mask, ft, codec=parse_codec(codec), base=base, dtype="F32")
        (_, vals), = _decode(table, stats, 4096, "F32", base, 0).values()
        top = (1 << bits) - 1
        s = np.abs(ft).max() / top
        naive = np.clip(2 * np.floor(ft / s / 2) + 1, -top, top) * s
        assert ((vals - ft[0]) ** 2).mean() < 0.8 * ((naive - ft) ** 2).mean()


def test_lossy_codec_refuses_nan_naming_the_tensor(tmp_path):
    store, ft, base = _toy_store(tmp_path, {"values": "int4"})
    values = ft["w"].clone()
    values[1, 3] = float("nan")
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[1, 3] = True
    with pytest.raises(StoreError, match="'w' rows.*NaN or infinite.*--values raw"):
        store.write_block("ft", "w", 0, 4, mask, values, codec="int4", base=base["w"])
    with pytest.raises(KenError, match="pass base="):
        store.write_block("ft", "w", 0, 4, mask, ft["w"], codec="int4")
    rec = store.write_block("ft", "w", 0, 4, mask, values)  # raw stores NaN byte for byte
    assert "values" not in rec


def test_overflowing_rebuild_falls_back_to_raw():
    base = np.array([[65504.0, 65504.0]], np.float16)
    ft = np.array([[65504.0, 60000.0]], np.float16)  # sign: s = 2752, and 65504 + 2752 is past float16's max
    table, stats = encode_block(0, np.ones((1, 2), bool), ft, codec=parse_codec("sign"), base=base, dtype="F16")
    assert "values" not in stats and table.column_names == ["row", "mask", "values"]


def test_fp8_and_integer_dtypes_keep_raw_values():
    assert not parse_codec("int4").applies_to("F8_E4M3") and parse_codec("int4").applies_to("BF16")
    with pytest.raises(ValueError, match="unknown value codec 'int3'"):
        parse_codec("int3")
    with pytest.raises(ValueError, match="unknown value codec"):
        parse_codec("raw-g4")


@pytest.mark.parametrize("keep", [0.005, 0.02, 0.3])
def test_index_coding_picks_the_smaller(keep):
    rng = np.random.default_rng(5)
    r, n = 256, 4096
    mask = rng.random((r, n)) < keep
    mask[0] = False
    ft = rng.integers(0, 2**16, size=(r, n), dtype=np.uint16)
    table, stats = encode_block(0, mask, ft, dtype="BF16")
    other_kind = "mask" if stats.get("index") == "positions" else "positions"
    forced = {"mask": ["row", "mask", "values"], "positions": ["row", "positions", "values"]}
    # size of the other choice: the same table with the other index column
    if other_kind == "positions":
        from ken_dist.store.parts import _index_list
        other = pa.table({"row": table.column("row"), "positions": _index_list(mask, mask.sum(1)),
                          "values": table.column("values")})
    else:
        from ken_dist.store.parts import _binary
        packed = np.packbits(mask, axis=1, bitorder="little").reshape(-1)
        other = pa.table({"row": table.column("row"),
                          "mask": _binary(np.arange(r + 1, dtype=np.int64) * (n // 8), packed),
                          "values": table.column("values")})
    assert table.column_names == forced[stats.get("index", "mask")]
    assert len(part_bytes(table)) <= len(part_bytes(other))
    assert (stats.get("index") == "positions") == (keep < 0.1)
    rows = _decode(pq.read_table(pa.BufferReader(part_bytes(table))), stats, n, "BF16", ft, 0)
    assert np.array_equal(np.concatenate([rows[f][0] for f in sorted(rows)]), mask)
    assert np.array_equal(np.concatenate([rows[f][1] for f in sorted(rows)]), ft[mask])
    if keep < 0.1:  # near the information bound log2 C(n, k)
        bound = sum(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                    for k in mask.sum(1).tolist()) / math.log(2) / 8
        index_bytes = len(part_bytes(pa.table({"positions": table.column("positions")})))
        assert index_bytes < 1.35 * bound


def test_damaged_position_list_is_refused():
    mask = np.random.default_rng(6).random((2, 8000)) < 0.01
    table, stats = encode_block(0, mask, np.ones((2, 8000), np.float32), dtype="F32")
    assert stats["index"] == "positions"
    swapped = table.column("positions").to_pylist()
    swapped[1][0], swapped[1][1] = swapped[1][1], swapped[1][0]
    bad = pa.table({"row": table.column("row"), "positions": pa.array(swapped, pa.list_(pa.int64())),
                    "values": table.column("values")})
    with pytest.raises(ValueError, match="not increasing within their rows"):
        list(block_rows(bad, 8000, "F32", 0, 2, index="positions"))
    with pytest.raises(ValueError, match="columns"):
        list(block_rows(table, 8000, "F32", 0, 2, index="mask"))


def _toy_store(tmp_path, extra_params=None):
    base, ft, bdir, fdir = make_checkpoints(tmp_path, {"w": ((4, 10), torch.float32)})
    store = Store(tmp_path / "store", create=True)
    store.begin("ft", params={**PARAMS, **(extra_params or {})}, base_identity=identity(bdir),
                finetune_identity=identity(fdir), tensors=plan_for(ft, 4))
    return store, ft, base


def test_v1_store_reads_bit_for_bit_and_raw_parts_are_written_identically(tmp_path):
    root = tmp_path / "v1"
    shutil.copytree(FIXTURE, root)
    expected = load_file(str(root / "expected.safetensors"))
    with open_subnetwork(root / "store", "tiny", base=str(root / "base")) as sub:
        assert sub.manifest()["format_version"] == 1
        for name, want in expected.items():
            assert same_bits(sub.get_tensor(name), want), name
        # the v1 parts, re-encoded by today's writer from their own masks and values, are the same bytes
        store = Store(root / "store")
        for name, t in sub.manifest()["tensors"].items():
            if t["action"] != "prune":
                continue
            for block in t["blocks"]:
                (first, keep, vals), = list(sub.kept(name, block["row_start"], block["row_end"]))
                full = load_file(str(root / "ft" / "model.safetensors"))[name].reshape(t["rows"], t["row_len"])
                table, stats = encode_block(first, keep, full[block["row_start"]: block["row_end"]])
                data = bytes(part_bytes(table))
                assert "values" not in stats and "index" not in stats
                assert data == open(store.resolve(block["file"]), "rb").read(), block["file"]


def test_a_v1_only_reader_refuses_a_v2_store_with_upgrade(tmp_path, monkeypatch):
    store, ft, base = _toy_store(tmp_path, {"values": "int4"})
    mask = torch.rand(4, 10, generator=torch.Generator().manual_seed(0)) < 0.5
    store.commit("ft", [store.write_block("ft", "w", 0, 4, mask, ft["w"], codec="int4", base=base["w"])])
    manifest = store.finalize("ft", summary={})
    assert manifest["format_version"] == 2 and manifest["tensors"]["w"]["blocks"][0]["values"] == "int4"
    assert json.load(open(os.path.join(store.root, "ken_store.json")))["format_version"] == 1
    monkeypatch.setattr(protocol, "FORMAT_VERSION", 1)
    reader = Store(store.root)  # the layout is unchanged: a v1 reader opens the store ...
    with pytest.raises(KenError, match="format_version 2.*upgrade ken_dist"):
        reader.manifest("ft")  # ... and refuses the version 2 fine-tune


def test_raw_store_stays_version_1_and_low_keep_raw_becomes_version_2(tmp_path):
    store, ft, base = _toy_store(tmp_path)
    dense = torch.ones(4, 10, dtype=torch.bool)
    store.commit("ft", [store.write_block("ft", "w", 0, 4, dense, ft["w"])])
    assert store.finalize("ft", summary={})["format_version"] == 1
    store2 = Store(tmp_path / "store2", create=True)
    big = torch.randn(64, 4096)
    one = torch.rand(64, 4096, generator=torch.Generator().manual_seed(2)) < 0.01
    nowhere = {"source": None, "root": str(tmp_path / "no-checkpoint"), "revision": None, "files": []}
    store2.begin("ft", params=PARAMS, base_identity=nowhere, finetune_identity=nowhere,
                 tensors={"w": {"shape": [64, 4096], "dtype": "F32", "action": "prune", "rows": 64, "row_len": 4096,
                                "base_name": "w", "blocks": [[0, 64]]}})
    rec = store2.write_block("ft", "w", 0, 64, one, big)
    assert rec["index"] == "positions"
    store2.commit("ft", [rec])
    assert store2.finalize("ft", summary={})["format_version"] == 2


@pytest.mark.parametrize("codec", ["int4", "sign"])
def test_view_rows_slices_and_kept_agree_for_a_lossy_store(tmp_path, codec):
    base, ft, bdir, fdir = make_checkpoints(tmp_path, {"w": ((9, 12), torch.bfloat16), "b": ((12,), torch.float32)})
    for t in (base, ft):  # finite values (random bits would hold NaN)
        for k in t:
            t[k].copy_(torch.randn(t[k].shape, generator=torch.Generator().manual_seed(len(k))))
    ft = {k: (base[k].float() + 0.01 * torch.randn(base[k].shape)).to(base[k].dtype) for k in base}
    from safetensors.torch import save_file
    save_file(base, os.path.join(bdir, "model.safetensors"))
    save_file(ft, os.path.join(fdir, "model.safetensors"))
    plan = plan_for(ft, 4)
    store = Store(tmp_path / "store", create=True)
    store.begin("ft", params={**PARAMS, "values": codec}, base_identity=identity(bdir),
                finetune_identity=identity(fdir), tensors=plan)
    records = []
    for name, t in plan.items():
        values, b = ft[name].reshape(t["rows"], -1), base[name].reshape(t["rows"], -1)
        mask = torch.rand(values.shape, generator=torch.Generator().manual_seed(1)) < 0.5
        for a, e in t["blocks"]:
            records.append(store.write_block("ft", name, a, e, mask[a:e], values[a:e], codec=codec, base=b[a:e]))
    store.commit("ft", records)
    store.finalize("ft", summary={})
    with open_subnetwork(tmp_path / "store", "ft", base=bdir) as sub:
        w = sub.get_tensor("w")
        assert w.dtype == torch.bfloat16 and not same_bits(w, ft["w"])
        assert (w.float() - ft["w"].float()).abs().max() < 0.1
        assert same_bits(sub.get_slice("w")[3:7], w[3:7])
        assert same_bits(sub.get_tensor("b"), sub.get_slice("b")[:])
    # KENviz reads the same decoder: its kept entries are the mask, its delta the rebuilt values' delta
    from ken_dist.viz import load_matrix

    view = load_matrix(tmp_path / "store", "ft", "w", base=bdir, delta=True)
    kept_mask = torch.zeros(9, 12, dtype=torch.bool)
    for first, keep, _ in Subnetwork(tmp_path / "store", "ft", bdir).kept("w"):
        kept_mask[first: first + keep.shape[0]] = torch.from_numpy(keep)
    assert np.array_equal(view.mask, kept_mask.numpy())
    assert view.stats["kept"] == int(kept_mask.sum()) and view.factor == 1
    rebuilt_delta = torch.where(kept_mask, w.float() - base["w"].float(), 0.0).numpy()
    assert np.allclose(view.value_sum, rebuilt_delta, rtol=0, atol=1e-7)


@pytest.mark.usefixtures("local_ray")
def test_pipeline_with_a_lossy_codec_loads_everywhere_and_resumes(tmp_path, capsys):
    """--values int4 through the CLI: manifest, materialize, load_model (apply), swap agree; a
    deleted part is rewritten on resume to the same bytes; another codec is another setting."""
    from tiny_models import make_finetune, make_tiny_bert

    from ken_dist import ken_select
    from ken_dist.checkpoints.inventory import open_checkpoint
    from ken_dist.checkpoints.reads import read_tensor
    from ken_dist.cli import main as cli_main
    from ken_dist.subnetwork.inject import swap
    from ken_dist.subnetwork.load_model import load_model

    base = make_tiny_bert(tmp_path / "base", dtype=torch.bfloat16, seed=1)
    ft = make_finetune(base, tmp_path / "ft", seed=2, model="bert", head_class=True)
    store = tmp_path / "store"
    cmd = ["prune", base, ft, "--store", str(store), "--keep", "0.25", "--block-bytes", "1000", "--quiet",
           "--map-prefix", "bert.="]
    assert cli_main([*cmd, "--name", "q", "--values", "int4"]) == 0
    assert cli_main([*cmd, "--name", "r"]) == 0
    out = capsys.readouterr().out
    assert "bits per parameter (values int4)" in out and "(values raw)" in out
    s = Store(store)
    m = s.manifest("q")
    assert m["format_version"] == 2 and m["params"]["values"] == "int4"
    assert s.manifest("r")["format_version"] == 1 and "values" not in s.manifest("r")["params"]
    pruned = {n: t for n, t in m["tensors"].items() if t["action"] == "prune"}
    assert all(b.get("values") == "int4" for t in pruned.values() for b in t["blocks"])

    b_ck, f_ck = open_checkpoint(base), open_checkpoint(ft)
    with open_subnetwork(store, "q") as sub:
        rebuilt = {n: sub.get_tensor(n) for n in sub.keys()}
    for name, t in pruned.items():
        fv, bv = read_tensor(f_ck.tensors[name]), read_tensor(b_ck.tensors[t["base_name"]])
        rows = fv.reshape(t["rows"], t["row_len"])
        mask = ken_select(rows, keep=0.25).reshape(fv.shape)
        got = rebuilt[name]
        assert same_bits(got[~mask], bv[~mask]), name  # every other entry is the base
        d = (fv.float() - bv.float())[mask]
        assert ((got.float() - fv.float())[mask] ** 2).mean() <= 0.05 * (d ** 2).mean() + 1e-12, name

    assert cli_main(["materialize", str(store), "--finetune", "q", "--out", str(tmp_path / "dense")]) == 0
    dense = open_checkpoint(tmp_path / "dense")
    for name, want in rebuilt.items():
        assert same_bits(read_tensor(dense.tensors[name]), want), name
    model = load_model(store, "q")
    state = model.state_dict()
    from transformers import AutoModelForSequenceClassification
    fresh = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "dense"))
    for k, v in fresh.state_dict().items():
        assert same_bits(state[k], v), k
    other = load_model(store, "r")
    swap(other, store, "r", "q")
    for k, v in fresh.state_dict().items():
        assert same_bits(other.state_dict()[k], v), k
    capsys.readouterr()

    # resume: a lost part is recomputed to the same bytes
    block = next(iter(pruned.values()))["blocks"][0]
    before = open(s.resolve(block["file"]), "rb").read()
    os.unlink(s.resolve(block["file"]))
    assert cli_main([*cmd, "--name", "q", "--values", "int4"]) == 0
    assert "reused" in capsys.readouterr().out
    assert open(s.resolve(block["file"]), "rb").read() == before
    # another codec for the same fine-tune is another setting
    assert cli_main([*cmd, "--name", "q", "--values", "sign"]) == 2
    assert "params.values: stored \"int4\", given \"sign\"" in capsys.readouterr().err


def test_job_file_values_per_job_and_per_finetune(tmp_path):
    from ken_dist.job.spec import load_job_file

    job = tmp_path / "job.yaml"
    job.write_text("base: b\nstore: s\nkeep: 0.1\nvalues: int4\nfinetunes:\n"
                   "  - {source: a}\n  - {source: c, values: sign-g64}\n  - {source: d, values: raw}\n")
    spec = load_job_file(job)
    assert [ft.params.values for ft in spec.finetunes] == ["int4", "sign-g64", "raw"]
    assert spec.finetunes[0].params.as_dict()["values"] == "int4" and "values" not in spec.finetunes[2].params.as_dict()
    job.write_text("base: b\nstore: s\nkeep: 0.1\nfinetunes:\n  - {source: a, values: int3}\n")
    with pytest.raises(KenError, match=r"finetunes\[0\].*unknown value codec 'int3'"):
        load_job_file(job)


def test_damaged_scales_are_refused():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(2, 16)).astype(np.float32)
    table, stats = encode_block(0, np.ones((2, 16), bool), base + 0.1, codec=parse_codec("int4"), base=base,
                                dtype="F32")
    for bad in (b"\x80\xff", b"\x80\x7f", b"\x00\x80"):  # NaN, inf, -0
        scales = pa.array([bad, table.column("scales").to_pylist()[1]], pa.binary())
        broken = table.set_column(3, "scales", scales)
        with pytest.raises(ValueError, match="negative or not finite"):
            list(block_rows(broken, 16, "F32", 0, 2, codec="int4", base_rows=lambda a, b: base[a:b]))
    with pytest.raises(ValueError, match="unknown value codec 'int5'"):
        list(block_rows(table, 16, "F32", 0, 2, codec="int5", base_rows=lambda a, b: base[a:b]))


@pytest.mark.parametrize("strategy", ["ken", "magnitude"])
def test_units_encode_the_same_on_the_numpy_and_torch_paths(tmp_path, strategy):
    """A lossy codec in process_unit: the unit reads the base rows itself when the strategy does
    not (ken), and the CPU (numpy) and GPU-code (torch) paths write the same part bytes."""
    from ken_dist.job import execute
    from ken_dist.job.plan import PruneParams
    from ken_dist.job.spec import FineTuneEntry, JobSpec
    from ken_dist.runtime.driver import plan_job
    from ken_dist.testing.synthetic import LlamaShape, write_pair

    base, ft = write_pair(tmp_path / "pair", LlamaShape(hidden=64, intermediate=96, layers=1, vocab=80, heads=4,
                                                        kv_heads=4), dtype="bf16")
    out = {}
    for device in (None, "torch"):
        job = JobSpec(base=str(base), store=str(tmp_path / f"s-{device}"), block_bytes=4096, finetunes=(
            FineTuneEntry("x", str(ft), None, PruneParams(strategy=strategy, keep=0.3, values="int4")),))
        b, (plan,) = plan_job(job)
        with Store(job.store, create=True) as s:
            s.begin("x", params=plan.spec.params.as_dict(), base_identity=b.identity(),
                    finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors)
            recs = [execute.process_unit(u, s, device) for u in plan.units]
        assert all(r.get("values") == "int4" for r in recs if r["tensor"] in plan.tensors
                   and plan.tensors[r["tensor"]]["action"] == "prune")
        out[device] = {(r["tensor"], r["row_start"]): r["sha256"] for r in recs}
    assert out[None] == out["torch"]
