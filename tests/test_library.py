"""The store as a library: lazy row access, transformers injection, fine-tune swapping, checkpoint
sources, inspect, and the errors that must never become a silently wrong tensor.

Two stores are pruned once per module on a private local Ray: a bf16 Llama base with two
fine-tunes that add a classification head (score.weight, stored whole), and an fp32 BERT base
with two BertForSequenceClassification fine-tunes (a `bert.` prefix mapped at prune time)."""
import hashlib
import json
import os
import shutil
import warnings

import pytest
import ray
import torch
import transformers
from store_helpers import corrupt_part
from tiny_models import make_finetune, make_hf_cache, make_tiny_bert, make_tiny_llama

import ken_dist
from ken_dist import KenError, load_model, materialize, open_subnetwork
from ken_dist.cli import main as cli_main
from ken_dist.errors import StoreError
from ken_dist.job.plan import PruneParams
from ken_dist.job.spec import FineTuneEntry, JobSpec
from ken_dist.store.protocol import Store
from ken_dist.subnetwork.inject import resolve_names

IDS = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ken_dist.runtime import run_job

    root = tmp_path_factory.mktemp("library")
    out = {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        for model, dtype, options in (("llama", torch.bfloat16, {}),
                                      ("bert", torch.float32, {"prefix_map": {"bert.": ""}})):
            make = make_tiny_llama if model == "llama" else make_tiny_bert
            base = make(root / model / "base", dtype=dtype, seed=0)
            fts = {name: make_finetune(base, root / model / name, seed=seed, model=model,
                                       head_class=(model == "bert"))
                   for name, seed in (("a", 1), ("b", 2))}
            store = str(root / model / "store")
            job = JobSpec(base=base, store=store, block_bytes=1000, **options,
                          finetunes=tuple(FineTuneEntry(n, p, None, PruneParams(keep=0.3)) for n, p in fts.items()))
            run_job(job, quiet=True)
            out[model] = {"base": base, "store": store, "root": root / model, **fts}
    finally:
        ray.shutdown()
    return out


def dense(stores, model, ft):
    """The materialized fine-tune loaded by transformers: what every other path must equal."""
    s = stores[model]
    out = s["root"] / f"dense-{ft}"
    if not out.exists():
        materialize(s["store"], ft, out)
    cls = transformers.LlamaForSequenceClassification if model == "llama" else transformers.BertForSequenceClassification
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(out).eval()


def same_weights(m1, m2) -> list[str]:
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    return [k for k in s1 if s1[k].dtype != s2[k].dtype or not torch.equal(s1[k], s2[k])]


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def quiet_load(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the llama fine-tunes keep lm_head.weight, unused by the classifier
        return load_model(*args, **kwargs)


# ---------------------------------------------------------------------------- load_model

@pytest.mark.parametrize("model", ["llama", "bert"])
def test_load_model_equals_the_materialized_checkpoint(stores, model):
    got = quiet_load(stores[model]["store"], "a")
    want = dense(stores, model, "a")
    assert type(got) is type(want) and got.ken_subnetwork["finetune"] == "a"
    assert same_weights(got, want) == []
    assert torch.equal(logits(got), logits(want))


def test_load_model_warns_about_stored_tensors_the_class_lacks(stores):
    with pytest.warns(UserWarning, match="no tensor for 1 stored tensor.*'lm_head.weight'"):
        load_model(stores["llama"]["store"], "a")
    with pytest.raises(KenError, match="lm_head.weight"):
        load_model(stores["llama"]["store"], "a", strict=True)


def test_load_model_with_another_class_maps_the_prefix(stores):
    """BertModel has no `bert.` prefix and no classifier: the encoder still gets the fine-tune."""
    s = stores["bert"]
    with pytest.warns(UserWarning, match="classifier"):
        got = load_model(s["store"], "a", model_class=transformers.BertModel)
    dense(stores, "bert", "a")
    want = transformers.BertModel.from_pretrained(s["root"] / "dense-a")
    assert same_weights(got, want) == []


def test_load_model_refuses_parameters_left_random(stores):
    """BertForMaskedLM's prediction head is neither in the BertModel base nor in the store."""
    store = stores["bert"]["store"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KenError, match=r"cls\.predictions\..*random.*allow_random_init=True"):
            load_model(store, "a", model_class=transformers.BertForMaskedLM)
        m = load_model(store, "a", model_class=transformers.BertForMaskedLM, allow_random_init=True)
    assert torch.equal(m.bert.encoder.layer[1].output.dense.weight,
                       dense(stores, "bert", "a").bert.encoder.layer[1].output.dense.weight)


def test_load_model_with_device_map(stores):
    got = quiet_load(stores["llama"]["store"], "a", device_map="cpu")
    assert same_weights(got, dense(stores, "llama", "a")) == []


# ---------------------------------------------------------------------------- apply / swap

def file_digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_swap_is_a_fresh_load_bit_for_bit_and_back(stores, model):
    s = stores[model]
    base_file = os.path.join(s["base"], "model.safetensors")
    before = file_digest(base_file)
    m = quiet_load(s["store"], "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = ken_dist.swap(m, s["store"], "a", "b")
        assert report["finetune"] == "b" and report["entries"] > 0 and report["restored"] > 0
        assert same_weights(m, quiet_load(s["store"], "b")) == []
        assert torch.equal(logits(m), logits(dense(stores, model, "b")))
        ken_dist.swap(m, s["store"], "b", "a", workers=1)
    assert same_weights(m, dense(stores, model, "a")) == []
    assert file_digest(base_file) == before  # transformers maps the base copy-on-write; writes stay in memory


def test_a_model_in_another_dtype_gets_converted_values(stores):
    """bf16 store, float32 model: the conversion path (index_copy_) instead of the bitwise one."""
    s = stores["llama"]
    m = quiet_load(s["store"], "a", dtype=torch.float32)
    want = dense(stores, "llama", "b").to(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ken_dist.swap(m, s["store"], "a", "b")
    assert m.dtype == torch.float32 and same_weights(m, want) == []


def test_apply_on_a_base_model_and_the_guards(stores):
    s = stores["llama"]
    config = transformers.AutoConfig.from_pretrained(s["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = transformers.LlamaForSequenceClassification.from_pretrained(s["base"], config=config)
        ken_dist.apply(m, s["store"], "b")
    assert same_weights(m, dense(stores, "llama", "b")) == []
    with pytest.raises(KenError, match=r"holds fine-tune 'b' .*not 'a'; call swap\(model, store, 'b', 'a'\)"):
        ken_dist.apply(m, s["store"], "a")
    with pytest.raises(KenError, match="holds fine-tune 'b' .*not 'a'; it already holds the target"):
        ken_dist.swap(m, s["store"], "a", "b")


def test_swap_refuses_fine_tunes_of_different_bases(stores, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(stores["llama"]["store"], store)
    path = store / "finetunes" / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["base_identity"]["files"][0]["sample_sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    m = quiet_load(store, "a")
    with pytest.raises(KenError, match="'a' and 'b' were pruned against different base"):
        ken_dist.swap(m, store, "a", "b")


def test_offloaded_parameters_are_refused(stores):
    config = transformers.AutoConfig.from_pretrained(stores["llama"]["a"])
    with torch.device("meta"):
        m = transformers.LlamaForSequenceClassification(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KenError, match="meta device.*materialize"):
            ken_dist.apply(m, stores["llama"]["store"], "a")


def test_tied_weights_are_written_once():
    class Stub:
        finetune = "stub"
        _entries = {"model.embed_tokens.weight": {"base_name": "model.embed_tokens.weight"},
                    "lm_head.weight": {"base_name": "lm_head.weight"}}

        def keys(self):
            return list(self._entries)

        def entry(self, name):
            return self._entries[name]

    config = transformers.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=64, tie_word_embeddings=True)
    m = transformers.LlamaForCausalLM(config)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert resolve_names(m, Stub()) == {"model.embed_tokens.weight": "model.embed_tokens.weight"}


# ---------------------------------------------------------------------------- lazy rows

class Reads:
    """Counts part files read and checkpoint bytes read (every checkpoint read goes through
    checkpoint._pread_into)."""

    def __init__(self, monkeypatch):
        import ken_dist.checkpoints.reads as ckpt
        self.parts, self.base_bytes = [], 0
        real_read_part, real_pread = Store.read_part, ckpt._pread_into
        reads = self

        def read_part(store, block, tensor, **kw):
            reads.parts.append(block["file"])
            return real_read_part(store, block, tensor, **kw)

        def pread_into(path, buf, offset):
            reads.base_bytes += buf.size
            return real_pread(path, buf, offset)

        monkeypatch.setattr(Store, "read_part", read_part)
        monkeypatch.setattr(ckpt, "_pread_into", pread_into)


def test_one_row_reads_one_block_and_one_base_row(stores, monkeypatch):
    s = stores["llama"]
    name = "model.embed_tokens.weight"  # [128, 32] bf16 in 9 blocks of 15 rows
    want = dense(stores, "llama", "a").state_dict()[name]
    with open_subnetwork(s["store"], "a") as sub:
        blocks = sub.entry(name)["blocks"]
        assert len(blocks) > 4
        sl = sub.get_slice(name)
        assert sl.get_shape() == [128, 32] and sl.get_dtype() == "BF16"
        reads = Reads(monkeypatch)
        row = sl[70:71]
        assert torch.equal(row, want[70:71])
        assert reads.parts == [b["file"] for b in blocks if b["row_start"] <= 70 < b["row_end"]]
        assert reads.base_bytes == 32 * 2  # one row of the base, not the tensor
        reads.parts.clear()
        reads.base_bytes = 0
        b0 = blocks[1]
        assert torch.equal(sl[b0["row_end"] - 1: b0["row_end"] + 1, 3:5], want[b0["row_end"] - 1: b0["row_end"] + 1, 3:5])
        assert len(reads.parts) == 2 and reads.base_bytes == 2 * 32 * 2
        assert torch.equal(sl[-1], want[-1]) and torch.equal(sub.get_tensor(name), want)
        assert json.loads(sub.metadata()["params"])["keep"] == 0.3


# ---------------------------------------------------------------------------- checkpoint sources

def test_base_as_hf_repo_id_or_single_file(stores, tmp_path, monkeypatch):
    s = stores["llama"]
    cache = tmp_path / "hub"
    snapshot = make_hf_cache(cache, "tiny/llama-base", s["base"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "model.layers.1.mlp.up_proj.weight"
    with open_subnetwork(s["store"], "a") as sub:
        want = sub.get_tensor(name)
    for base in ("tiny/llama-base", f"tiny/llama-base@{os.path.basename(snapshot)}"):
        with open_subnetwork(s["store"], "a", base=base) as sub:
            assert sub.base_checkpoint.root == snapshot and torch.equal(sub.get_tensor(name), want)
    with pytest.raises(KenError, match="'tiny/absent'.*not in the local Hugging Face cache"):
        open_subnetwork(s["store"], "a", base="tiny/absent")
    single = tmp_path / "elsewhere" / "weights.safetensors"
    single.parent.mkdir()
    shutil.copyfile(os.path.join(s["base"], "model.safetensors"), single)
    with open_subnetwork(s["store"], "a", base=single) as sub:
        assert torch.equal(sub.get_tensor(name), want)
    reference = dense(stores, "llama", "a")
    for base in ("tiny/llama-base", str(single)):
        assert same_weights(quiet_load(s["store"], "a", base=base), reference) == []
    out = tmp_path / "dense"
    materialize(s["store"], "a", out, base="tiny/llama-base")
    assert (out / "model.safetensors").exists()

    # a store whose recorded base path is gone but whose recorded source is the repo id
    store = tmp_path / "store"
    shutil.copytree(s["store"], store)
    path = store / "finetunes" / "a" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["base_identity"].update(root=str(tmp_path / "gone"), source="tiny/llama-base",
                                     revision=os.path.basename(snapshot))
    path.write_text(json.dumps(manifest))
    with open_subnetwork(store, "a") as sub:
        assert sub.base_checkpoint.root == snapshot and torch.equal(sub.get_tensor(name), want)


# ---------------------------------------------------------------------------- errors

@pytest.fixture
def store_copy(stores, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(stores["llama"]["store"], store)
    return store


@pytest.mark.parametrize("where, version", [("ken_store.json", 2), ("finetunes/a/manifest.json", 3)])
def test_a_newer_format_version_is_refused(store_copy, where, version):
    path = store_copy / where
    doc = json.loads(path.read_text())
    doc["format_version"] = version
    path.write_text(json.dumps(doc))
    with pytest.raises(KenError, match=rf"{where.split('/')[-1]} has format_version {version}.*upgrade ken_dist"):
        open_subnetwork(store_copy, "a")
    with pytest.raises(KenError, match=f"format_version {version}"):
        load_model(store_copy, "a")


def test_a_base_with_other_weights_or_headers_is_refused(stores, tmp_path):
    s = stores["llama"]
    same_arch = make_tiny_llama(tmp_path / "other", dtype=torch.bfloat16, seed=7)  # same header, other values
    with pytest.raises(KenError, match="not the one fine-tune 'a' was pruned against.*same header but other "
                                      "tensor bytes"):
        open_subnetwork(s["store"], "a", base=same_arch)
    with pytest.raises(KenError, match="same header but other tensor bytes"):
        load_model(s["store"], "a", base=same_arch)
    fp32 = make_tiny_llama(tmp_path / "fp32", dtype=torch.float32, seed=0)
    with pytest.raises(KenError, match="model.safetensors differs .*header sha256"):
        open_subnetwork(s["store"], "a", base=fp32)


def test_a_missing_part_names_file_and_tensor(store_copy):
    name = "model.layers.0.self_attn.q_proj.weight"
    block = Store(store_copy).manifest("a")["tensors"][name]["blocks"][0]
    path = Store(store_copy).resolve(block["file"])
    os.unlink(path)
    with open_subnetwork(store_copy, "a") as sub:
        with pytest.raises(KenError, match=rf"part file {path} of tensor '{name}' is missing.*rerun"):
            sub.get_slice(name)[0:1]
    with pytest.raises(KenError, match=rf"{path}.*{name}.*missing"):
        quiet_load(store_copy, "a")



def test_a_corrupt_part_fails_the_swap_before_any_write(store_copy):
    """swap decodes the whole target before writing: the model keeps fine-tune a, untouched."""
    name = "model.layers.1.mlp.down_proj.weight"
    path = corrupt_part(store_copy, "b", name)
    m = quiet_load(store_copy, "a")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(StoreError, match=rf"{path}.*{name}.*corrupt"):
        ken_dist.swap(m, store_copy, "a", "b", workers=1)
    assert m.ken_subnetwork["finetune"] == "a"
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())

# ---------------------------------------------------------------------------- inspect

def test_inspect_per_tensor_detail_and_json(stores, capsys):
    store = stores["llama"]["store"]
    assert cli_main(["inspect", store, "--finetune", "a", "--tensor", r"layers\.0\.self_attn\.q_proj"]) == 0
    out = capsys.readouterr().out
    assert "format version 1" in out and "kept/row min/mean/max" in out
    line = next(ln for ln in out.splitlines() if "q_proj" in ln)
    assert "10/10.0/10" in line and "prune" in line  # keep 0.3 of 32 entries -> 10 per row
    assert cli_main(["inspect", store, "--tensor", "score", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["finetunes"]) == {"a", "b"}
    score = report["finetunes"]["a"]["tensors"]["score.weight"]
    assert list(report["finetunes"]["a"]["tensors"]) == ["score.weight"]
    assert score["action"] == "whole" and score["kept_fraction"] == 1.0 and score["ratio"] > 0
    assert cli_main(["inspect", store, "--finetune", "nope"]) == 2
    assert "no fine-tune 'nope'" in capsys.readouterr().err
