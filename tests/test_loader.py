"""Reading subnetworks back: bit-exact rebuild, base checks, damage detection, dense export."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from store_helpers import (
    PARAMS,
    expected,
    identity,
    make_checkpoints,
    plan_for,
    prune_into,
    same_bits,
    write_all,
)

from ken_dist.errors import KenError
from ken_dist.store.protocol import Store
from ken_dist.subnetwork.inspect import inspect_store
from ken_dist.subnetwork.materialize import materialize
from ken_dist.subnetwork.view import open_subnetwork

TENSORS = {
    "layers.0.attn.q.weight": ((6, 10), torch.bfloat16),
    "layers.0.attn.q.bias": ((10,), torch.float16),
    "layers.0.mlp.experts": ((3, 4, 5), torch.float32),
    "layers.0.norm": ((9,), torch.bfloat16),
    "position_ids": ((1, 8), torch.int64),
    "scale": ((), torch.float32),
}


@pytest.fixture
def pruned(tmp_path):
    base, ft, bdir, fdir = make_checkpoints(tmp_path, TENSORS)
    store = str(tmp_path / "store")
    masks = prune_into(store, "ft", ft, bdir, fdir)
    return {"base": base, "ft": ft, "bdir": bdir, "fdir": fdir, "store": store, "masks": masks,
            "tmp": tmp_path}


def test_get_tensor_is_bit_exact_for_every_tensor(pruned):
    with open_subnetwork(pruned["store"], "ft") as sub:
        assert sorted(sub.keys()) == sorted(TENSORS)
        for name in sub.keys():
            want = expected(pruned["base"], pruned["ft"], pruned["masks"], name)
            assert same_bits(sub.get_tensor(name), want), name
        meta = sub.metadata()
        assert meta["format"] == "ken-subnetwork" and json.loads(meta["params"]) == PARAMS
        assert all(isinstance(v, str) for v in meta.values())
        with pytest.raises(KenError, match="no tensor 'nope'"):
            sub.get_tensor("nope")


def test_get_slice_reads_row_ranges(pruned):
    with open_subnetwork(pruned["store"], "ft") as sub:
        for name in ("layers.0.attn.q.weight", "layers.0.mlp.experts", "layers.0.attn.q.bias"):
            want = expected(pruned["base"], pruned["ft"], pruned["masks"], name)
            sl = sub.get_slice(name)
            assert sl.get_shape() == list(want.shape)
            keys = [slice(1, 4), slice(0, 1), slice(2, None), 1, -1] + ([(slice(1, 3), slice(0, 2))] if want.dim() > 1 else [])
            for key in keys:
                assert same_bits(sl[key], want[key]), (name, key)


def test_base_moved_needs_base_argument(pruned):
    moved = str(pruned["tmp"] / "moved_base")
    shutil.move(pruned["bdir"], moved)
    with pytest.raises(KenError, match="base checkpoint not found.*pass base="):
        open_subnetwork(pruned["store"], "ft")
    with open_subnetwork(pruned["store"], "ft", base=moved) as sub:
        name = "layers.0.attn.q.weight"
        assert same_bits(sub.get_tensor(name), expected(pruned["base"], pruned["ft"], pruned["masks"], name))


def test_a_different_base_is_refused(pruned):
    other, *_ = make_checkpoints(pruned["tmp"] / "other", dict(TENSORS, extra=((2,), torch.float32)))
    with pytest.raises(KenError, match="not the one fine-tune 'ft' was pruned against.*header sha256"):
        open_subnetwork(pruned["store"], "ft", base=str(pruned["tmp"] / "other" / "base"))


def test_missing_and_corrupt_parts_name_file_and_tensor(pruned):
    store = Store(pruned["store"])
    name = "layers.0.attn.q.weight"
    block = store.manifest("ft")["tensors"][name]["blocks"][1]
    path = store.resolve(block["file"])
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with open_subnetwork(store, "ft") as sub:
        with pytest.raises(KenError, match=rf"{path}.*{name}.*corrupt"):
            sub.get_tensor(name)
        assert sub.get_tensor("layers.0.norm") is not None  # other tensors still load
    os.unlink(path)
    with open_subnetwork(store, "ft") as sub:
        with pytest.raises(KenError, match=rf"{path}.*{name}.*missing"):
            sub.get_tensor(name)


def test_incomplete_finetune_is_not_opened(pruned):
    ft, plan = pruned["ft"], plan_for(pruned["ft"])
    with Store(pruned["store"]) as store:
        store.begin("half", params=PARAMS, base_identity=identity(pruned["bdir"]),
                    finetune_identity=identity(pruned["fdir"]), tensors=plan)
        write_all(store, "half", ft, plan, skip=3)
    with pytest.raises(KenError, match="'half' is incomplete.*rerun"):
        open_subnetwork(pruned["store"], "half")


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 150])
def test_materialize_writes_a_dense_directory(pruned, max_shard_bytes):
    out = pruned["tmp"] / "dense"
    info = materialize(pruned["store"], "ft", out, max_shard_bytes=max_shard_bytes)
    files = sorted(os.listdir(out))
    assert "config.json" in files and "tokenizer_config.json" in files
    assert not [f for f in files if f.startswith(".")] and not os.path.exists(f"{out}.tmp")
    if max_shard_bytes > 1000:
        assert info["shards"] == ["model.safetensors"] and "model.safetensors.index.json" not in files
        where = dict.fromkeys(TENSORS, "model.safetensors")
    else:
        assert len(info["shards"]) > 2
        index = json.load(open(out / "model.safetensors.index.json"))
        where = index["weight_map"]
        assert sorted(where) == sorted(TENSORS) and set(where.values()) == set(info["shards"])
        assert index["metadata"]["total_size"] == info["total_size"]
    for name, fname in where.items():
        with safe_open(str(out / fname), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert same_bits(f.get_tensor(name), expected(pruned["base"], pruned["ft"], pruned["masks"], name))


def test_materialize_refuses_a_non_empty_directory_unless_overwrite(pruned):
    out = pruned["tmp"] / "dense"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(KenError, match="not an empty directory.*overwrite"):
        materialize(pruned["store"], "ft", out)
    assert (out / "precious.txt").exists()
    materialize(pruned["store"], "ft", out, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").exists()


def test_inspect_store_reports_sizes(pruned):
    report = inspect_store(pruned["store"])
    json.dumps(report)
    ft = report["finetunes"]["ft"]
    assert ft["complete"]
    q = ft["tensors"]["layers.0.attn.q.weight"]
    mask = pruned["masks"]["layers.0.attn.q.weight"]
    assert q["kept"] == int(mask.sum()) and q["params"] == 60 and q["dense_bytes"] == 120
    assert q["kept_per_row"]["min"] == int(mask.sum(1).min()) and q["kept_per_row"]["max"] == int(mask.sum(1).max())
    assert q["ratio"] == pytest.approx(q["bytes"] / q["bound_bytes"], rel=1e-2)  # bound is rounded to 0.1 byte
    assert ft["totals"]["kept"] == sum(t["kept"] for t in ft["tensors"].values())
    assert ft["tensors_pruned"] == 4 and ft["tensors_whole"] == 2
    assert ft["kept_params"] == sum(int(m.sum()) for m in pruned["masks"].values())
    assert ft["stored_bytes"] == ft["totals"]["bytes"] and ft["bound_ratio"] > 1


def test_materialized_model_loads_with_from_pretrained(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base_model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    bdir, fdir = tmp_path / "base", tmp_path / "ft"
    base_model.save_pretrained(bdir)
    with torch.no_grad():
        for p in base_model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    base_model.save_pretrained(fdir)

    def load(d):
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    base, ft = load(bdir), load(fdir)
    masks = prune_into(tmp_path / "store", "llama", ft, str(bdir), str(fdir), keep=0.3, block_rows=16)
    out = tmp_path / "dense"
    materialize(tmp_path / "store", "llama", out, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists() and (out / "generation_config.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    state = model.state_dict()
    for name in ft:
        assert same_bits(state[name], expected(base, ft, masks, name)), name
