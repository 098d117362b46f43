"""End to end on a local Ray: prune tiny real checkpoints, materialize, compare with the kernel
run in memory (bit for bit) and with the in-memory pruned model (logits)."""

import pytest
import torch
from tiny_models import make_finetune, make_tiny_bert, make_tiny_llama

from ken_dist import ken_select
from ken_dist.checkpoints.inventory import open_checkpoint
from ken_dist.checkpoints.reads import read_tensor
from ken_dist.cli import main as cli_main
from ken_dist.subnetwork.inspect import inspect_store
from ken_dist.subnetwork.view import open_subnetwork

pytestmark = pytest.mark.usefixtures("local_ray")


def expected_tensors(base_dir, ft_dir, keep, prefix_map=None, compat="index"):
    """The pruned fine-tune computed in memory, tensor by tensor, from the spec's rule."""
    base, ft = open_checkpoint(base_dir), open_checkpoint(ft_dir)
    out = {}
    for name, info in ft.tensors.items():
        base_name = name
        for src, dst in (prefix_map or {}).items():
            if name.startswith(src):
                base_name = dst + name[len(src):]
        t = read_tensor(info)
        if base_name not in base.tensors or not t.is_floating_point():
            out[name] = t
            continue
        b = read_tensor(base.tensors[base_name])
        rows = t.reshape(1, -1) if t.dim() == 1 else t.reshape(t.shape[0], -1)
        mask = ken_select(rows, keep=keep, compat=compat).reshape(t.shape)
        out[name] = torch.where(mask, t, b)
    return out


CASES = [
    # model, dtype, shard bytes, fine-tune CLI options
    ("llama", torch.float32, None, ["--ignore-missing", r"^lm_head\."]),
    ("llama", torch.bfloat16, 20_000, ["--ignore-missing", r"^lm_head\."]),
    ("bert", torch.float32, 30_000, ["--map-prefix", "bert.="]),
    ("bert", torch.bfloat16, None, ["--map-prefix", "bert.="]),
]


@pytest.mark.parametrize("model, dtype, shard, options", CASES,
                         ids=["llama-fp32-single", "llama-bf16-sharded", "bert-fp32-sharded", "bert-bf16-single"])
def test_prune_materialize_equals_in_memory(tmp_path, model, dtype, shard, options, capsys):
    make = make_tiny_llama if model == "llama" else make_tiny_bert
    base = make(tmp_path / "base", dtype=dtype, seed=1, shard_bytes=shard)
    ft = make_finetune(base, tmp_path / "ft", seed=2, model=model, head_class=True, shard_bytes=shard)
    store = tmp_path / "store"
    keep = 0.25
    rc = cli_main(["prune", base, ft, "--store", str(store), "--keep", str(keep), "--name", "task",
                   "--block-bytes", "1000", "--quiet", *options])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "fine-tune 'task'" in summary and "information bound" in summary

    prefix_map = {"bert.": ""} if model == "bert" else None
    expected = expected_tensors(base, ft, keep, prefix_map)
    out = tmp_path / "dense"
    assert cli_main(["materialize", str(store), "--finetune", "task", "--out", str(out)]) == 0
    rebuilt = open_checkpoint(out)
    assert set(rebuilt.tensors) == set(expected)
    for name, want in expected.items():
        got = read_tensor(rebuilt.tensors[name])
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
    with open_subnetwork(store, "task") as sub:
        assert set(sub.keys()) == set(expected)
        name = next(n for n in expected if n.endswith("query.weight") or n.endswith("q_proj.weight"))
        assert torch.equal(sub.get_tensor(name), expected[name])

    # the dense directory loads with transformers and computes what the pruned model computes
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    # the same loading path from the unpruned fine-tune, then the in-memory pruned weights
    reference = AutoModelForSequenceClassification.from_pretrained(ft).eval()
    reference.load_state_dict(expected, strict=True)
    assert loaded.dtype == reference.dtype == dtype
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_reference_compat_and_magnitude_strategy(tmp_path, capsys):
    base = make_tiny_llama(tmp_path / "base", dtype=torch.bfloat16, seed=3)
    ft = make_finetune(base, tmp_path / "ft", seed=4)
    store = tmp_path / "store"
    assert cli_main(["prune", base, ft, "--store", str(store), "--k", "7", "--compat", "reference",
                     "--name", "ref", "--quiet"]) == 0
    b, f = open_checkpoint(base), open_checkpoint(ft)
    name = "model.layers.1.mlp.down_proj.weight"
    fb, bb = read_tensor(f.tensors[name]), read_tensor(b.tensors[name])
    want = torch.where(ken_select(fb, k=7, compat="reference"), fb, bb)
    with open_subnetwork(store, "ref") as sub:
        assert torch.equal(sub.get_tensor(name), want)

    assert cli_main(["prune", base, ft, "--store", str(store), "--k", "7", "--strategy", "magnitude",
                     "--name", "mag", "--quiet"]) == 0
    from ken_dist import select

    want = torch.where(select("magnitude", fb, bb, k=7), fb, bb)
    with open_subnetwork(store, "mag") as sub:
        assert torch.equal(sub.get_tensor(name), want)
    report = inspect_store(store)
    assert set(report["finetunes"]) == {"ref", "mag"}
    capsys.readouterr()


def test_validation_fails_before_any_work(tmp_path, capsys):
    base = make_tiny_llama(tmp_path / "base", seed=5)
    ft = make_finetune(base, tmp_path / "ft", seed=6, head_class=True)
    store = tmp_path / "store"
    rc = cli_main(["prune", base, ft, "--store", str(store), "--keep", "0.5", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "lm_head.weight" in err and "--ignore-missing" in err
    assert not store.exists() or not any(store.rglob("*.parquet"))
    rc = cli_main(["prune", base, ft, "--store", str(store), "--k", "0", "--quiet"])
    assert rc == 2 and "k must be >= 1" in capsys.readouterr().err
