"""ken_dist.checkpoints.inventory: header-only inventory, offline HF cache resolution, corrupt-header
errors, row reads that touch only their rows, and base/fine-tune matching."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import make_finetune, make_hf_cache, make_tiny_bert, make_tiny_llama

import ken_dist.checkpoints.reads as ckpt_mod
from ken_dist.checkpoints.inventory import Checkpoint, TensorInfo, open_checkpoint
from ken_dist.checkpoints.reads import read_rows, read_tensor
from ken_dist.errors import KenError
from ken_dist.job.match import PRESETS, match_checkpoints, parse_prefix_map

FIX = "re-download or re-save it"


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    m = {
        "llama": make_tiny_llama(d / "llama"),
        "llama_bf16": make_tiny_llama(d / "llama_bf16", dtype=torch.bfloat16, shard_bytes=20_000),
        "bert": make_tiny_bert(d / "bert"),
    }
    m["ft_llama"] = make_finetune(m["llama"], d / "ft_llama", seed=1)
    m["ft_llama_bf16"] = make_finetune(m["llama_bf16"], d / "ft_llama_bf16", seed=2,
                                       shard_bytes=20_000)
    m["ft_llama_cls"] = make_finetune(m["llama"], d / "ft_llama_cls", seed=3, head_class=True)
    m["ft_bert"] = make_finetune(m["bert"], d / "ft_bert", seed=4, model="bert")
    m["ft_bert_cls"] = make_finetune(m["bert"], d / "ft_bert_cls", seed=5, model="bert",
                                     head_class=True)
    return m


# ------------------------------------------------------------------------------ inventory

def _keys(path):
    with safe_open(path, framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                for k in f.keys()}


def test_inventory_single_file_fp32(models):
    ck = open_checkpoint(models["llama"])
    assert ck.root == models["llama"] and ck.revision is None
    assert ck.files == (os.path.join(models["llama"], "model.safetensors"),)
    expected = _keys(ck.files[0])
    assert {n: (i.shape, i.dtype) for n, i in ck.tensors.items()} == expected
    q = ck.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert (q.shape, q.dtype, q.is_float, q.nbytes, q.row_geometry) == ((32, 32), "F32", True,
                                                                        32 * 32 * 4, (32, 32))
    k = ck.tensors["model.layers.1.self_attn.k_proj.weight"]
    assert k.shape == (16, 32)  # 2 kv heads
    assert ck.tensors["model.norm.weight"].row_geometry == (1, 32)


def test_inventory_sharded_bf16_matches_index(models):
    root = models["llama_bf16"]
    ck = open_checkpoint(root)
    assert len(ck.files) >= 2 and all(os.path.isabs(f) for f in ck.files)
    wmap = json.load(open(os.path.join(root, "model.safetensors.index.json")))["weight_map"]
    assert set(ck.tensors) == set(wmap)
    for name, info in ck.tensors.items():
        assert info.dtype == "BF16" and info.file == os.path.join(root, wmap[name])
        assert info.nbytes == 2 * torch.Size(info.shape).numel()
    assert set(ck.tensors) == set(open_checkpoint(models["llama"]).tensors)


def test_inventory_reads_only_headers(models, monkeypatch):
    import builtins

    import ken_dist.checkpoints.header as hdr
    opened, read = [], []

    def counting_open(path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)
        real_read = f.read
        f.read = lambda n=-1: read.append(len(b := real_read(n))) or b
        return f

    monkeypatch.setattr(ckpt_mod, "_pread_into", lambda *a, **k: opened.append(a))
    monkeypatch.setattr(hdr, "open", counting_open, raising=False)
    ck = open_checkpoint(models["llama_bf16"])
    assert ck.tensors and opened == []
    assert sum(read) == sum(h.data_start for h in ck.headers)  # 8 + N per file, no data


def test_single_file_path_and_lone_safetensors(models, tmp_path):
    ck = open_checkpoint(os.path.join(models["llama"], "model.safetensors"))
    assert ck.root == models["llama"] and len(ck.tensors) == 21
    shutil.copy(os.path.join(models["llama"], "model.safetensors"),
                tmp_path / "weights.safetensors")
    assert open_checkpoint(tmp_path).files == (str(tmp_path / "weights.safetensors"),)
    shutil.copy(tmp_path / "weights.safetensors", tmp_path / "other.safetensors")
    with pytest.raises(KenError, match="several candidate checkpoints.*other.safetensors"):
        open_checkpoint(tmp_path)


def test_pickle_only_and_empty_dirs(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(KenError, match="no .safetensors files found"):
        open_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(KenError, match=r"pytorch_model\.bin.*does not read pickle.*safetensors"):
        open_checkpoint(tmp_path)
    with pytest.raises(KenError, match="does not read pickle"):
        open_checkpoint(tmp_path / "pytorch_model.bin")
    with pytest.raises(KenError, match="no such file or directory"):
        open_checkpoint(tmp_path / "nope")


def test_revision_with_local_path_is_an_error(models):
    with pytest.raises(KenError, match="repo ids only"):
        open_checkpoint(models["llama"], revision="main")


# ------------------------------------------------------------------------------ HF cache

@pytest.fixture
def no_network(monkeypatch):
    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: attempts.append(a))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield attempts
    assert attempts == [], "resolution must never touch the network"


def test_hf_cache_resolution_offline(models, tmp_path, monkeypatch, no_network):
    cache = tmp_path / "hub"
    snap_a = make_hf_cache(cache, "org/tiny", models["llama"], commit="a" * 40)
    snap_b = make_hf_cache(cache, "org/tiny", models["llama_bf16"], commit="b" * 40, ref="v2")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    ck = open_checkpoint("org/tiny")
    assert (ck.source, ck.root, ck.revision) == ("org/tiny", snap_a, "a" * 40)
    assert ck.tensors["model.norm.weight"].dtype == "F32"
    local = open_checkpoint(models["llama"])
    assert ck.identity()["files"] == local.identity()["files"]  # same bytes, same identity
    for kw in ({"revision": "b" * 40}, {"revision": "v2"}):
        ckb = open_checkpoint("org/tiny", **kw)
        assert ckb.revision == "b" * 40 and ckb.root == snap_b and len(ckb.files) >= 2
        assert ckb.tensors["model.norm.weight"].dtype == "BF16"
    assert open_checkpoint(f"org/tiny@{'b' * 40}").revision == "b" * 40
    t = ck.tensors["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(read_rows(t, 2, 5), load_file(t.file)[t.name][2:5])


def test_hf_home_is_respected(models, tmp_path, monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    make_hf_cache(tmp_path / "home" / "hub", "org/bert", models["bert"], commit="c" * 40)
    assert open_checkpoint("org/bert").revision == "c" * 40


@pytest.mark.parametrize("offline", ["1", None])
def test_hf_not_cached_says_how_to_get_it(models, tmp_path, monkeypatch, no_network, offline):
    if offline is None:  # local_files_only alone must keep it off the network
        monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(KenError, match=r"'org/missing' is not a local path and is not in the "
                                       r"local Hugging Face cache.*huggingface-cli download "
                                       r"org/missing.*local directory"):
        open_checkpoint("org/missing")
    make_hf_cache(tmp_path / "hub", "org/tiny", models["llama"], commit="a" * 40)
    with pytest.raises(KenError, match=f"revision '{'d' * 40}'.*cached snapshots: {'a' * 40}"
                                       f".*--revision {'d' * 40}"):
        open_checkpoint("org/tiny", revision="d" * 40)


def test_hf_snapshot_without_safetensors(tmp_path, monkeypatch, no_network):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"x")
    make_hf_cache(tmp_path / "hub", "org/old", src, commit="e" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(KenError, match="does not read pickle"):
        open_checkpoint("org/old")


# ------------------------------------------------------------------------------ corrupt headers

def _write(path, header, data: bytes, length=None):
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _t(dtype, shape, b, e):
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}


CORRUPT = {
    "length_beyond_file": (lambda p: _write(p, {"a": _t("F32", [2], 0, 8)}, b"\0" * 8, 10**6),
                           r"header length 1000000 is beyond the file size", None),
    "too_short": (lambda p: p.write_bytes(b"\x01\x00"), "too short", None),
    "not_json": (lambda p: _write(p, b"{not json", b""), "not valid JSON", None),
    "json_array": (lambda p: _write(p, b"[1, 2]", b""), "expected an object", None),
    "past_end": (lambda p: _write(p, {"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 8, 16)},
                                  b"\0" * 12), "point past the end of the file", "b"),
    "overlap": (lambda p: _write(p, {"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)},
                                 b"\0" * 12), "overlap tensor 'a'", "b"),
    "gap": (lambda p: _write(p, {"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)},
                             b"\0" * 12), "leave a gap of 4 bytes", "b"),
    "misordered": (lambda p: _write(p, {"a": _t("F32", [2], 8, 4)}, b"\0" * 8),
                   r"0 <= begin <= end", "a"),
    "wrong_byte_count": (lambda p: _write(p, {"a": _t("F32", [3], 0, 8)}, b"\0" * 8),
                         r"span 8 bytes but shape \[3\] x F32 needs 12", "a"),
    "unknown_dtype": (lambda p: _write(p, {"a": _t("F13", [2], 0, 8)}, b"\0" * 8),
                      "unknown dtype 'F13'", "a"),
    "trailing_bytes": (lambda p: _write(p, {"a": _t("F32", [1], 0, 4)}, b"\0" * 8),
                       "4 bytes after the last tensor", None),
    "bad_shape": (lambda p: _write(p, {"a": _t("F32", [-1], 0, 4)}, b"\0" * 4),
                  "not a list of non-negative integers", "a"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_header_names_file_and_fix(tmp_path, case):
    make, pattern, tensor = CORRUPT[case]
    path = tmp_path / f"{case}.safetensors"
    make(path)
    with pytest.raises(KenError, match=pattern) as err:
        open_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and FIX in msg
    if tensor:
        assert f"tensor {tensor!r}" in msg
    with pytest.raises(Exception):  # safetensors rejects it too: we are never more lenient
        with safe_open(str(path), framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]


def test_valid_handmade_header_roundtrip(tmp_path):
    """Zero-size tensors and __metadata__ are fine; the writer and our parser agree."""
    path = tmp_path / "ok.safetensors"
    save_file({"e": torch.zeros(0, 3), "s": torch.tensor(2.5), "i": torch.arange(6)},
              str(path), metadata={"format": "pt"})
    ck = open_checkpoint(path)
    assert {n: (i.shape, i.dtype) for n, i in ck.tensors.items()} == _keys(str(path))
    assert ck.tensors["s"].row_geometry == (1, 1) and ck.tensors["e"].row_geometry == (0, 3)
    assert not ck.tensors["i"].is_float


def test_corrupt_shard_and_stale_index(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models["llama_bf16"], root)
    index = json.load(open(root / "model.safetensors.index.json"))
    shard = sorted(set(index["weight_map"].values()))[1]
    data = (root / shard).read_bytes()
    (root / shard).write_bytes(data[:-10])  # truncated download
    with pytest.raises(KenError, match=re.escape(shard) + ".*past the end of the file"):
        open_checkpoint(root)
    (root / shard).unlink()
    with pytest.raises(KenError, match=f"lists shard '{re.escape(shard)}' which is missing"):
        open_checkpoint(root)
    (root / shard).write_bytes(data)
    index["weight_map"]["model.extra.weight"] = shard
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KenError, match=r"out of sync.*listed but missing: model\.extra\.weight"):
        open_checkpoint(root)


def test_identity_is_cheap_and_changes_with_checkpoint(models, tmp_path):
    a = open_checkpoint(models["llama"]).identity()
    assert json.loads(json.dumps(a)) == a
    assert a == open_checkpoint(models["llama"]).identity()
    assert a["files"][0]["name"] == "model.safetensors"
    assert len(a["files"][0]["header_sha256"]) == 64
    other = make_tiny_llama(tmp_path / "other", dtype=torch.bfloat16)
    assert open_checkpoint(other).identity()["files"] != a["files"]


# ------------------------------------------------------------------------------ reading

class _Recorder:
    """Wraps checkpoint._pread_into to record the byte ranges each read asks for."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = ckpt_mod._pread_into

        def recording(path, buf, offset):
            self.calls.append((path, offset, buf.size))
            return real(path, buf, offset)

        monkeypatch.setattr(ckpt_mod, "_pread_into", recording)


@pytest.mark.parametrize("key", ["llama", "llama_bf16"])
def test_read_rows_exact_and_only_those_rows(models, monkeypatch, key):
    ck = open_checkpoint(models[key])
    info = ck.tensors["model.layers.1.mlp.down_proj.weight"]  # [32, 64]
    full = load_file(info.file)[info.name]
    rec = _Recorder(monkeypatch)
    for a, b in [(0, 32), (3, 4), (5, 17), (31, 32), (7, 7)]:
        rows = read_rows(info, a, b)
        assert rows.dtype == full.dtype and rows.shape == (b - a, 64)
        assert torch.equal(rows.view(torch.int16 if full.dtype == torch.bfloat16 else torch.int32),
                           full[a:b].view(torch.int16 if full.dtype == torch.bfloat16
                                          else torch.int32))  # bit-equal
    start = next(h.data_start for h in ck.headers if h.path == info.file) + info.data_offsets[0]
    row_bytes = 64 * info.itemsize
    assert rec.calls == [(info.file, start + a * row_bytes, (b - a) * row_bytes)
                         for a, b in [(0, 32), (3, 4), (5, 17), (31, 32)]]  # those rows' bytes, nothing else
    with pytest.raises(KenError, match=r"rows \[30, 33\) are outside its 32 rows"):
        read_rows(info, 30, 33)


def test_read_rows_1d_scalar_and_rank3(tmp_path):
    path = tmp_path / "t.safetensors"
    w3 = torch.randn(5, 3, 4, dtype=torch.float64)
    tensors = {"w3": w3, "b": torch.randn(7).to(torch.bfloat16), "s": torch.tensor(1.5),
               "ids": torch.arange(10).reshape(2, 5)}
    save_file(tensors, str(path))
    ck = open_checkpoint(path)
    assert torch.equal(read_rows(ck.tensors["b"], 0, 1), tensors["b"].reshape(1, 7))
    assert torch.equal(read_rows(ck.tensors["s"], 0, 1), torch.tensor([[1.5]]))
    assert torch.equal(read_rows(ck.tensors["ids"], 1, 2), tensors["ids"][1:2])
    for name, t in tensors.items():
        got = read_tensor(ck.tensors[name])
        assert got.dtype == t.dtype and torch.equal(got, t)

    @settings(max_examples=30, deadline=None)
    @given(st.integers(0, 5), st.integers(0, 5))
    def rows_of_rank3(a, b):
        a, b = min(a, b), max(a, b)
        assert torch.equal(read_rows(ck.tensors["w3"], a, b), w3.reshape(5, 12)[a:b])

    rows_of_rank3()


def test_read_rows_detects_changed_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(path))
    info = open_checkpoint(path).tensors["w"]
    save_file({"w": torch.zeros(4, 2)}, str(path))
    with pytest.raises(KenError, match="changed during the job"):
        read_rows(info, 0, 2)
    path.unlink()
    with pytest.raises(KenError, match=re.escape(str(path))):
        read_rows(info, 0, 2)


# ------------------------------------------------------------------------------ matching

def test_match_default_finetune(models):
    base, ft = open_checkpoint(models["llama"]), open_checkpoint(models["ft_llama"])
    ms = match_checkpoints(base, ft)
    assert [m.name for m in ms] == list(ft.tensors)
    whole = {m.name: (m.base_name, m.reason) for m in ms if m.action == "whole"}
    assert whole == {"score.weight": (None, "only in fine-tune")}
    assert all(m.base_name == m.name for m in ms if m.action == "prune") and len(ms) == 22


def test_match_missing_tensor_and_ignore(models):
    base, ft = open_checkpoint(models["llama"]), open_checkpoint(models["ft_llama_cls"])
    with pytest.raises(KenError, match=r"missing in fine-tune: 'lm_head\.weight'") as err:
        match_checkpoints(base, ft)
    msg = str(err.value)
    assert models["llama"] in msg and models["ft_llama_cls"] in msg  # both sources named
    assert r"--ignore-missing '^lm_head\.'" in msg
    ms = match_checkpoints(base, ft, ignore_missing=[r"^lm_head\."])
    assert {m.name for m in ms if m.action == "whole"} == {"score.weight"}


def test_match_prefix_hint_and_prefix_map(models):
    base, ft = open_checkpoint(models["bert"]), open_checkpoint(models["ft_bert_cls"])
    with pytest.raises(KenError, match=r"use --map-prefix 'bert\.='") as err:
        match_checkpoints(base, ft)
    assert "... and 19 more" in str(err.value) and "ignore-missing" not in str(err.value)
    for pm in ({"bert.": ""}, ["bert.="]):
        ms = match_checkpoints(base, ft, prefix_map=pm)
        by = {m.name: m for m in ms}
        assert by["bert.encoder.layer.0.attention.self.query.weight"].base_name == \
            "encoder.layer.0.attention.self.query.weight"
        assert {n for n, m in by.items() if m.action == "whole"} == {"classifier.weight",
                                                                     "classifier.bias"}
    with pytest.raises(KenError, match=r"--map-prefix '=bert\.'"):  # the other direction
        match_checkpoints(ft, base)


def test_match_dtype_mismatch(models):
    base, ft = open_checkpoint(models["llama"]), open_checkpoint(models["ft_llama_bf16"])
    with pytest.raises(KenError, match=r"dtype mismatch: 'model\.embed_tokens\.weight' is BF16 "
                                       r"in the fine-tune but F32 in the base"):
        match_checkpoints(base, ft)


def _fake(source, spec: dict[str, tuple[tuple, str]]) -> Checkpoint:
    """A Checkpoint from names -> (shape, dtype) without files: matching reads headers only."""
    t = {n: TensorInfo(n, shape, dtype, f"/x/{source}.safetensors", (0, 0))
         for n, (shape, dtype) in spec.items()}
    return Checkpoint(source, "/x", None, (f"/x/{source}.safetensors",), t)


LLAMA_NAMES = {f"model.layers.0.{p}.weight": ((8, 8), "BF16") for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.up_proj", "mlp.down_proj", "input_layernorm")}


def test_match_shape_mismatch_and_all_problems_in_one_error():
    base = _fake("base", {**LLAMA_NAMES, "lm_head.weight": ((4, 8), "BF16")})
    ft_spec = dict(LLAMA_NAMES)
    ft_spec["model.layers.0.mlp.up_proj.weight"] = ((8, 9), "BF16")
    ft_spec["model.layers.0.mlp.down_proj.weight"] = ((8, 8), "F16")
    with pytest.raises(KenError) as err:
        match_checkpoints(base, _fake("ft", ft_spec), include=["("], preset="nope")
    msg = str(err.value)
    assert "fine-tune 'ft' does not match base 'base': 5 problem(s)" in msg
    for part in ("invalid include regex '('", "unknown preset 'nope'; known presets: all, "
                 "attention-only", "missing in fine-tune: 'lm_head.weight'",
                 "shape mismatch: 'model.layers.0.mlp.up_proj.weight' is [8, 9] in the "
                 "fine-tune but [8, 8] in the base",
                 "dtype mismatch: 'model.layers.0.mlp.down_proj.weight' is F16"):
        assert part in msg


def test_match_many_problems_are_truncated():
    base = _fake("base", {f"w{i}.weight": ((2, 2), "F32") for i in range(30)})
    with pytest.raises(KenError, match=r"30 problem\(s\)(.|\n)*\.\.\. and 10 more"):
        match_checkpoints(base, _fake("ft", {}))


def test_match_whole_reasons_and_selection():
    spec = {**LLAMA_NAMES, "pos_ids": ((1, 8), "I64"), "mask": ((8,), "BOOL"),
            "logit_scale": ((), "F32"), "empty": ((0, 8), "F32")}
    base, ft = _fake("base", spec), _fake("ft", spec)
    reasons = {m.name: m.reason for m in match_checkpoints(base, ft) if m.action == "whole"}
    assert reasons == {"pos_ids": "not a float tensor", "mask": "not a float tensor",
                       "logit_scale": "scalar", "empty": "empty"}
    ms = {m.name: m for m in match_checkpoints(base, ft)}
    assert ms["empty"].reason == "empty"
    assert ms["model.layers.0.mlp.up_proj.weight"].action == "prune"
    ms = {m.name: m for m in match_checkpoints(base, ft, preset="attention-only",
                                               exclude=[r"o_proj"])}
    pruned = {n for n, m in ms.items() if m.action == "prune"}
    assert pruned == {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"}
    assert ms["model.layers.0.mlp.up_proj.weight"].reason == "excluded"
    ms = match_checkpoints(base, ft, include=[r"mlp\."])
    assert {m.name for m in ms if m.action == "prune"} == {"model.layers.0.mlp.up_proj.weight",
                                                           "model.layers.0.mlp.down_proj.weight"}
    with pytest.raises(KenError, match="leaves none of the .* float tensors to prune"):
        match_checkpoints(base, ft, include=["no_such_tensor"])


@pytest.mark.parametrize("name,attn", [
    ("model.layers.3.self_attn.q_proj.weight", True),
    ("model.layers.3.self_attn.o_proj.weight", True),
    ("model.layers.3.self_attn.q_proj.bias", False),
    ("model.layers.3.mlp.down_proj.weight", False),
    ("bert.encoder.layer.0.attention.self.query.weight", True),
    ("encoder.layer.0.attention.output.dense.weight", True),
    ("encoder.layer.0.attention.output.LayerNorm.weight", False),
    ("encoder.layer.0.output.dense.weight", False),
    ("transformer.h.0.attn.c_attn.weight", True),
    ("transformer.h.0.attn.c_proj.weight", True),
    ("transformer.h.0.mlp.c_proj.weight", False),
    ("gpt_neox.layers.0.attention.query_key_value.weight", True),
    ("transformer.h.0.self_attention.dense.weight", True),
    ("encoder.block.0.layer.0.SelfAttention.k.weight", True),
    ("model.decoder.layers.0.self_attn.out_proj.weight", True),
    ("backbone.layers.0.mixer.out_proj.weight", False),
    ("distilbert.transformer.layer.0.attention.q_lin.weight", True),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", True),
])
def test_attention_only_preset(name, attn):
    assert any(re.search(p, name) for p in PRESETS["attention-only"]) == attn


def test_parse_prefix_map():
    assert parse_prefix_map(["bert.=", "model.=base."]) == {"bert.": "", "model.": "base."}
    assert parse_prefix_map(None) == {} and parse_prefix_map({"a.": "b."}) == {"a.": "b."}
    with pytest.raises(KenError, match="FINETUNE_PREFIX=BASE_PREFIX"):
        parse_prefix_map(["bert."])


# ------------------------------------------------------------------------------ fixtures

def test_tiny_models_are_deterministic_and_perturbed(models, tmp_path):
    a = load_file(os.path.join(models["llama"], "model.safetensors"))
    same = load_file(os.path.join(make_tiny_llama(tmp_path / "again"), "model.safetensors"))
    other = load_file(os.path.join(make_tiny_llama(tmp_path / "s1", seed=1), "model.safetensors"))
    assert all(torch.equal(a[k], same[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"],
                           other["model.layers.0.self_attn.q_proj.weight"])
    ft = load_file(os.path.join(models["ft_llama"], "model.safetensors"))
    assert set(ft) == set(a) | {"score.weight"}
    d = (ft["model.layers.0.mlp.up_proj.weight"] - a["model.layers.0.mlp.up_proj.weight"]).abs()
    assert 0.003 < d.median() < 0.02 and d.max() > 0.04  # small noise plus some large deltas
    again = make_finetune(models["llama"], tmp_path / "ft_again", seed=1)
    assert all(torch.equal(ft[k], v) for k, v in
               load_file(os.path.join(again, "model.safetensors")).items())
    cfg = json.load(open(os.path.join(models["ft_llama"], "config.json")))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 2
