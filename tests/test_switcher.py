"""The resident Switcher: after any sequence of switches the model is bit for bit the stored
fine-tune (as load_model builds it), base() is bit for bit the base, and a bad part changes nothing.

Stores are written without Ray (store_helpers.prune_into: random masks, which exercise the
switcher exactly as KEN's would): a bf16 Llama base with four fine-tunes that add a classifier
head (score.weight, stored whole, the base lacks it), and a Llama with tied embeddings."""
import json
import os
import random
import shutil
import threading
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from store_helpers import corrupt_part, prune_into, same_bits
from tiny_models import LLAMA, _load_dir, make_finetune, make_tiny_llama

import ken_dist
from ken_dist import Switcher, load_model
from ken_dist.errors import InputError, StoreError

TASKS = ("a", "b", "c", "d")


def prune_all(root, base, fts: dict, keep: float, codec: str = "raw") -> str:
    store = str(root / f"store-{codec}")
    base_names = set(_load_dir(base))
    for i, (name, path) in enumerate(fts.items()):
        prune_into(store, name, _load_dir(path), base, path, keep=keep, block_rows=7, seed=10 + i,
                   base_names=base_names, codec=codec, params={"strategy": "random", "keep": keep, "values": codec})
    return store


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fine-tunes keep lm_head.weight, unused by the classifier
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("switch")
    base = make_tiny_llama(root / "base", dtype=torch.bfloat16, seed=0)
    fts = {name: make_finetune(base, root / name, seed=i + 1) for i, name in enumerate(TASKS)}
    store = prune_all(root, base, fts, keep=0.3)
    want = {name: {k: v.clone() for k, v in quiet(load_model, store, name).state_dict().items()} for name in TASKS}
    return {"root": root, "base": base, "store": store, "want": want, **fts}


def state(model) -> dict:
    return model.state_dict()


def differs(model, want: dict) -> list[str]:
    got = state(model)
    assert got.keys() == want.keys()
    return [k for k in got if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]


def base_differs(model, base_dir: str) -> list[str]:
    """Model tensors that differ from the base checkpoint's (tensors the base lacks are skipped)."""
    base = load_file(f"{base_dir}/model.safetensors")
    got = state(model)
    return [k for k in base if k in got and not torch.equal(got[k], base[k])]


def test_random_switches_with_evictions_equal_load_model(heads):
    model = quiet(load_model, heads["store"], "a")
    one = None
    switcher = quiet(Switcher, model, heads["store"])
    assert switcher.active == "a"
    one = switcher.memory()["finetunes"]["a"]["bytes"]
    switcher = quiet(Switcher, model, heads["store"], budget_bytes=int(one * 1.5))  # room for ~1 more
    rng = random.Random(0)
    sequence = [rng.choice(TASKS) for _ in range(14)] + ["b", "b", "a"]
    cold_seen = 0
    for step, name in enumerate(sequence):
        report = quiet(switcher.use, name)
        cold_seen += report["cold"]
        assert switcher.active == name and model.ken_subnetwork["finetune"] == name
        assert differs(model, heads["want"][name]) == [], f"after step {step}: use({name!r})"
        assert len(switcher.resident()) <= 2
        if step % 5 == 4:
            switcher.base()
            assert switcher.active is None and not hasattr(model, "ken_subnetwork")
            assert base_differs(model, heads["base"]) == []
    assert cold_seen > len(TASKS)  # evicted fine-tunes came back through the cold path
    switcher.base()
    assert base_differs(model, heads["base"]) == []
    assert differs(model, heads["want"]["a"]) != []  # the base is not a fine-tune: the check can fail


def test_a_plain_from_pretrained_base_and_its_head(heads):
    """No record on the model: it holds the base; base() puts back even the head's initial
    values (the base has no head, so that is what the model held before)."""
    config = transformers.AutoConfig.from_pretrained(heads["a"])
    model = quiet(transformers.LlamaForSequenceClassification.from_pretrained, heads["base"], config=config)
    before = {k: v.clone() for k, v in state(model).items()}
    switcher = Switcher(model, heads["store"], budget_bytes=0)
    assert switcher.active is None
    for name in ("c", "a", "c", "d"):
        report = quiet(switcher.use, name)
        assert report["cold"] and differs(model, heads["want"][name]) == []
        assert switcher.resident() == [name]  # budget 0: only the active one stays
    switcher.base()
    assert differs(model, before) == []


def test_a_model_in_float32_gets_converted_values(heads):
    model = quiet(load_model, heads["store"], "b", dtype=torch.float32)
    switcher = quiet(Switcher, model, heads["store"])
    quiet(switcher.use, "d")
    want = {k: v.to(torch.float32) for k, v in heads["want"]["d"].items()}
    assert model.dtype == torch.float32 and differs(model, want) == []


def test_a_corrupt_part_leaves_the_model_in_its_task(heads, tmp_path):
    import shutil
    store = tmp_path / "store"
    shutil.copytree(heads["store"], store)
    name = "model.layers.1.mlp.up_proj.weight"
    path = corrupt_part(store, "c", name)
    model = quiet(load_model, store, "a")
    switcher = quiet(Switcher, model, store)
    quiet(switcher.use, "b")
    before = {k: v.clone() for k, v in state(model).items()}
    with pytest.raises(StoreError, match=rf"{path}.*{name}.*corrupt"):
        quiet(switcher.use, "c")
    assert switcher.active == "b" and model.ken_subnetwork["finetune"] == "b"
    assert differs(model, before) == [] and "c" not in switcher.resident()
    quiet(switcher.use, "d")  # still usable
    assert differs(model, heads["want"]["d"]) == []


def test_changes_behind_its_back_are_refused(heads):
    model = quiet(load_model, heads["store"], "a")
    switcher = quiet(Switcher, model, heads["store"])
    quiet(ken_dist.swap, model, heads["store"], "a", "b")
    with pytest.raises(InputError, match="records fine-tune 'b' but this Switcher put 'a'"):
        switcher.use("c")
    with pytest.raises(InputError, match="budget_bytes"):
        Switcher(model, heads["store"], budget_bytes=-1)


def test_concurrent_switches_end_in_a_consistent_task(heads):
    model = quiet(load_model, heads["store"], "a")
    switcher = quiet(Switcher, model, heads["store"], budget_bytes=None)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(6):
                quiet(switcher.use, rng.choice(TASKS))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert differs(model, heads["want"][switcher.active]) == []


def test_tied_weights(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ken_dist.subnetwork.load_model import quiet_transformers
    config = LlamaConfig(**{**LLAMA, "tie_word_embeddings": True})
    torch.manual_seed(0)
    with quiet_transformers():
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    base = str(tmp_path / "base")
    assert json.load(open(f"{base}/config.json"))["tie_word_embeddings"]
    fts = {name: make_finetune(base, tmp_path / name, seed=i + 1, add_head=False) for i, name in enumerate("xy")}
    store = prune_all(tmp_path, base, fts, keep=0.25)
    want = {n: {k: v.clone() for k, v in load_model(store, n).state_dict().items()} for n in fts}
    model = load_model(store, "x")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    switcher = Switcher(model, store, budget_bytes=0)
    for name in ("y", "x", "y", "y"):
        switcher.use(name)
        assert differs(model, want[name]) == []
    switcher.base()
    assert base_differs(model, base) == []


def test_a_manifest_that_miscounts_a_part_is_refused(heads, tmp_path):
    """Parts decode straight into arrays sized by the manifest's kept counts; a count that
    disagrees with the part is an error, not a short or overrun array."""
    import shutil
    store = tmp_path / "store"
    shutil.copytree(heads["store"], store)
    path = store / "finetunes" / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    for delta in (1, -1):
        manifest["tensors"][name]["blocks"][0]["kept"] += delta
        path.write_text(json.dumps(manifest))
        model = quiet(load_model, store, "a")
        switcher = quiet(Switcher, model, store)
        with pytest.raises(StoreError, match=rf"{name}.*another number of kept entries"):
            quiet(switcher.use, "b")
        assert differs(model, heads["want"]["a"]) == []
        manifest["tensors"][name]["blocks"][0]["kept"] -= delta


def test_a_lossy_format_2_store_switches_bit_for_bit_like_load_model(heads):
    """Values stored with a lossy codec (format 2) reach the switcher through the same decoder as
    load_model: switching equals loading, and base() still restores the base exactly."""
    store = prune_all(heads["root"], heads["base"], {n: heads[n] for n in ("a", "b")}, keep=0.3, codec="int4")
    assert json.load(open(f"{store}/finetunes/a/manifest.json"))["format_version"] == 2
    _, want = switch_a_b_like_load_model(store, heads["base"])
    assert differs_from(want["a"], heads["want"]["a"])  # the codec did change values


def switch_a_b_like_load_model(store: str, base_dir) -> tuple:
    """Switch a model loaded as fine-tune a to b, a, b, checking each against load_model, then
    back to the base; (switcher, {name: load_model's state dict})."""
    want = {n: {k: v.clone() for k, v in quiet(load_model, store, n).state_dict().items()} for n in ("a", "b")}
    model = quiet(load_model, store, "a")
    switcher = quiet(Switcher, model, store)
    for name in ("b", "a", "b"):
        quiet(switcher.use, name)
        assert differs(model, want[name]) == []
    switcher.base()
    assert base_differs(model, base_dir) == []
    return switcher, want


def differs_from(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_the_torch_op_path_a_cuda_model_takes_switches_bit_for_bit(heads):
    """The same switches through the torch-op path (positions expanded on the device, index ops),
    run on the CPU: the code a GPU model runs is tested here."""
    model = quiet(load_model, heads["store"], "b")
    switcher = quiet(Switcher, model, heads["store"], budget_bytes=0)
    switcher._torch_ops = True
    for name in ("c", "a", "a", "d", "b"):
        quiet(switcher.use, name)
        assert differs(model, heads["want"][name]) == []
    switcher.base()
    assert base_differs(model, heads["base"]) == []


def test_low_keep_becomes_gaps_and_memory_counts_every_byte(heads):
    """At keep 0.02 the switcher keeps one-byte gaps (the rows here are too short for the store's
    position lists; tests/test_entries.py decodes those), at keep 0.3 the stored bitmask. Either way a switch equals load_model,
    and a resident fine-tune's bytes are exactly its arrays' (values, mask or gaps, escapes)."""
    store = str(heads["root"] / "store-low")
    base_names = set(_load_dir(heads["base"]))
    for i, name in enumerate(("a", "b")):
        prune_into(store, name, _load_dir(heads[name]), heads["base"], heads[name], keep=0.02, block_rows=7,
                   seed=30 + i, base_names=base_names, params={"strategy": "random", "keep": 0.02})
    switcher, _ = switch_a_b_like_load_model(store, heads["base"])
    low = switcher.memory()["finetunes"]["b"]
    assert low["forms"]["gaps"] > 0
    high = quiet(Switcher, quiet(load_model, heads["store"], "a"), heads["store"])
    assert high.memory()["finetunes"]["a"]["forms"]["mask"] > 0
    for sw in (switcher, high):
        for res in sw._residents.values():
            arrays = [t for e in res.tensors.values() for t in (e.values, e.mask, e.gaps, e.escapes) if t is not None]
            assert res.nbytes == sum(t.numel() * t.element_size() for t in arrays) > 0


def plain_model(tensors: dict) -> tuple[torch.nn.Module, dict]:
    """A bare module holding these tensors as buffers, and the name map from stored names to them."""
    model = torch.nn.Module()
    names = {k: k.replace(".", "_") for k in tensors}
    for k, t in tensors.items():
        model.register_buffer(names[k], t.clone())
    return model, names


def holds_bits(model, names: dict, want: dict) -> list[str]:
    got = dict(model.named_buffers())
    return [k for k, t in want.items() if not same_bits(got[names[k]], t)]


def cold_switches_like_the_lazy_view(store: str, base_tensors: dict, finetunes, base=None) -> None:
    """Cold switches (nothing resident: each decoded, then compacted by the walk that writes it)
    equal the lazy view bit for bit, leave each fine-tune in the form load() gives, and base()
    restores the base."""
    want = {}
    for name in finetunes:
        with ken_dist.open_subnetwork(store, name, base=base) as sub:
            want[name] = {k: sub.get_tensor(k) for k in sub.keys()}
    model, names = plain_model(base_tensors)
    switcher = Switcher(model, store, budget_bytes=0, name_map=names, base=base)
    warm_model, _ = plain_model(base_tensors)
    warm = Switcher(warm_model, store, name_map=names, base=base)
    for name in [*finetunes, None, finetunes[0], None]:  # None: the base (which drops every resident)
        if name is None:
            switcher.base()
            assert holds_bits(model, names, base_tensors) == []
            continue
        assert switcher.use(name)["cold"]
        assert holds_bits(model, names, want[name]) == []
        got, loaded = switcher._residents[name], warm.load(name)
        assert got.compact and loaded.compact and got.tensors.keys() == loaded.tensors.keys()
        for target, e in got.tensors.items():
            for field in ("values", "mask", "gaps", "escapes"):
                a, b = getattr(e, field), getattr(loaded.tensors[target], field)
                assert (a is None) == (b is None) and (a is None or same_bits(a, b)), (name, target, field)


@pytest.mark.parametrize("codec", ["raw", "int8", "int4-g64", "int2", "sign"])
@pytest.mark.parametrize("keep", [0.03, 0.3])
def test_cold_switches_compact_in_their_walk_for_every_codec_and_index(tmp_path, codec, keep):
    """Both index kinds (wide rows at keep 0.03 are stored as position lists, kept as gaps; keep
    0.3 as bitmasks), every value codec, rows of a multiple of 8 entries and not."""
    gen = torch.Generator().manual_seed(3)
    base = {"w.weight": torch.randn(48, 4096, generator=gen).to(torch.bfloat16),
            "u.weight": torch.randn(20, 333, generator=gen), "s.steps": torch.arange(5)}
    bdir = tmp_path / "base"
    bdir.mkdir()
    save_file(base, str(bdir / "model.safetensors"))
    (bdir / "config.json").write_text(json.dumps({"model_type": "toy"}))
    store = str(tmp_path / "store")
    for i, name in enumerate(("x", "y")):
        ft = {k: (v + 0.01 * torch.randn(v.shape, generator=gen).to(v.dtype)) if v.is_floating_point() else v + i
              for k, v in base.items()}
        fdir = tmp_path / name
        fdir.mkdir()
        save_file(ft, str(fdir / "model.safetensors"))
        (fdir / "config.json").write_text(json.dumps({"model_type": "toy"}))
        prune_into(store, name, ft, str(bdir), str(fdir), keep=keep, block_rows=16, seed=40 + i, codec=codec,
                   params={"strategy": "random", "keep": keep, "values": codec})
    blocks = [b for t in json.load(open(f"{store}/finetunes/x/manifest.json"))["tensors"].values()
              for b in t["blocks"]]
    assert any(b.get("index") == "positions" for b in blocks) == (keep < 0.1)
    cold_switches_like_the_lazy_view(store, base, ["x", "y"])


def test_cold_switches_of_a_version_1_store(tmp_path):
    """A store written by the version 1 code (tests/data/v1_store) switches in cold bit for bit."""
    root = tmp_path / "v1"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "data", "v1_store"), root)
    base = load_file(str(root / "base" / "model.safetensors"))
    cold_switches_like_the_lazy_view(str(root / "store"), base, ["tiny"], base=str(root / "base"))
    model, names = plain_model(base)
    quiet(Switcher(model, str(root / "store"), name_map=names, base=str(root / "base")).use, "tiny")
    assert holds_bits(model, names, load_file(str(root / "expected.safetensors"))) == []


def test_a_cold_switch_asks_the_kernel_for_its_parts_ahead_in_decode_order(heads, monkeypatch):
    """The disk and the decoding overlap: before the parts are decoded, a background thread asks
    for each of the fine-tune's part files once (posix_fadvise WILLNEED), in the order the
    decoding threads take them; a file that cannot be opened is left to the reader's own error."""
    import ken_dist.store.fs as fs
    asked, advised = [], threading.Event()

    def fadvise(fd, offset, length, advice):
        assert (offset, length, advice) == (0, 0, os.POSIX_FADV_WILLNEED)
        asked.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(fs.os, "posix_fadvise", fadvise)
    model = quiet(load_model, heads["store"], "a")
    switcher = Switcher(model, heads["store"], budget_bytes=0)
    asked.clear()  # the Switcher decoded "a" (the task the model holds) for its base values
    done = threading.Thread.start

    def start(thread):
        done(thread)
        if thread.name == "ken-prefetch":
            thread.join()
            advised.set()

    monkeypatch.setattr(threading.Thread, "start", start)
    quiet(switcher.use, "b")
    assert advised.is_set()
    manifest = json.load(open(f"{heads['store']}/finetunes/b/manifest.json"))
    parts = [os.path.realpath(os.path.join(heads["store"], b["file"]))
             for name, t in manifest["tensors"].items() if t["action"] == "prune" and name in model.state_dict()
             for b in sorted(t["blocks"], key=lambda b: b["row_start"])]
    assert sorted(asked) == sorted(parts) and len(parts) > 1  # each once
    for t in manifest["tensors"].values():  # a tensor's parts in row order, as the threads take them
        mine = [os.path.realpath(os.path.join(heads["store"], b["file"])) for b in t["blocks"]]
        assert [p for p in asked if p in mine] == [p for p in parts if p in mine]
    assert differs(model, heads["want"]["b"]) == []
    asked.clear()
    fs.prefetch([parts[0] + ".gone", parts[1]])  # a missing file: skipped, the next one still asked
    assert asked == [parts[1]]
