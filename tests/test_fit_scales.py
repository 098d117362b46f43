"""fit-scales: rescaled parts decode as the codec defines them, the fit lowers the output error of
the model as stored, the rewrite is atomic (a killed fit leaves the fine-tune as it was), and bad
input gets a clear error."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from store_helpers import same_bits

from ken_dist.cli import main as cli_main
from ken_dist.store.codecs import parse_codec
from ken_dist.store.parts import block_rows, encode_block, rescale_scales
from ken_dist.store.protocol import Store
from ken_dist.subnetwork.view import open_subnetwork

pytestmark = pytest.mark.usefixtures("local_ray")


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 by torch (not by the code under test)."""
    return torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16).float().numpy()


def test_rescaled_part_rebuilds_base_plus_code_times_the_rescaled_scale():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 40)).astype(np.float32)
    ft = base + rng.normal(scale=0.01, size=base.shape).astype(np.float32)
    mask = rng.random(base.shape) < 0.3
    mask[3] = False  # a row keeping nothing
    mask[4] = True  # a row keeping everything
    codec = parse_codec("sign-g4")
    table, _ = encode_block(10, mask, ft, codec=codec, base=base, dtype="F32")
    mult = np.array([0.0, 1.0, 2.5, 7.0, 0.3, 1e-3])
    new = rescale_scales(table, mult)
    assert new.column("values").equals(table.column("values")) and new.column("mask").equals(table.column("mask"))

    def rows(t):
        return {first: (keep, values.view(np.float32))
                for first, keep, values in block_rows(t, 40, "F32", 10, 16, codec=codec, base_rows=lambda a, b: base[a - 10:b - 10])}
    old_rows, new_rows = rows(table), rows(new)
    first = next(iter(old_rows))
    keep, old_vals = old_rows[first]
    _, new_vals = new_rows[first]
    b = base[keep]
    old_delta = old_vals - b  # m * s exactly (|delta| and base well apart in magnitude: the sums are exact enough)
    row_of = np.repeat(np.arange(6), keep.sum(axis=1))
    group_pos = np.concatenate([np.arange(k) // 4 for k in keep.sum(axis=1)])
    for r in range(6):
        for g in np.unique(group_pos[row_of == r]):
            sel = (row_of == r) & (group_pos == g)
            s_old = np.abs(old_delta[sel]).max()
            s_new = _bf16(np.float32(_bf16(s_old)[()] * mult[r]))
            want = b[sel] + np.sign(old_delta[sel]) * s_new
            assert np.array_equal(new_vals[sel], want.astype(np.float32)), (r, g)
    with pytest.raises(ValueError, match="raw values"):
        rescale_scales(encode_block(0, mask, ft)[0], mult)
    with pytest.raises(ValueError, match="5 multipliers"):
        rescale_scales(table, mult[:5])
    with pytest.raises(ValueError, match="negative or NaN"):
        rescale_scales(table, np.where(mult == 1.0, np.nan, mult))
    with pytest.raises(ValueError, match="overflows bfloat16"):
        rescale_scales(table, np.full(6, 1e45))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny BERT classifier fine-tune pruned with 1-bit values, its tokenizer and texts."""
    from tiny_models import make_finetune, make_tiny_bert, save_tiny_tokenizer

    root = tmp_path_factory.mktemp("fit")
    base = make_tiny_bert(root / "base", seed=1)
    ft = make_finetune(base, root / "ft", seed=2, model="bert", head_class=True, scale=0.05)
    words = save_tiny_tokenizer(ft)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 20))) for _ in range(48)]
    (root / "texts.txt").write_text("\n".join(texts) + "\n")
    cmd = ["prune", base, ft, "--store", str(root / "store"), "--keep", "0.25", "--quiet", "--map-prefix", "bert.=",
           "--block-bytes", "1000"]
    assert cli_main([*cmd, "--name", "q", "--values", "sign"]) == 0
    assert cli_main([*cmd, "--name", "raw"]) == 0
    return {"root": root, "base": base, "ft": ft, "texts": texts, "cmd": cmd}


def _copy(pruned, tmp_path) -> str:
    dst = tmp_path / "store"
    shutil.copytree(pruned["root"] / "store", dst)
    return str(dst)


def _tensors(store, name="q") -> dict:
    with open_subnetwork(store, name) as sub:
        return {n: sub.get_tensor(n) for n in sub.keys()}


def _output_error(model, teacher, tok, texts) -> float:
    """Mean squared logit difference, computed plainly (one batch, no ken_dist code)."""
    enc = tok(texts, truncation=True, max_length=128, padding=True, return_tensors="pt")
    with torch.no_grad():
        return float(torch.mean((model(**enc).logits - teacher(**enc).logits) ** 2))


def test_fit_lowers_the_error_of_the_model_as_stored_and_keeps_its_size(pruned, tmp_path, capsys):
    from transformers import AutoTokenizer, BertForSequenceClassification

    from ken_dist.subnetwork.load_model import load_model
    store = _copy(pruned, tmp_path)
    before = _tensors(store)
    m0 = Store(store).manifest("q")
    tok = AutoTokenizer.from_pretrained(pruned["ft"])
    teacher = BertForSequenceClassification.from_pretrained(pruned["ft"]).eval()
    err0 = _output_error(load_model(store, "q").eval(), teacher, tok, pruned["texts"])

    texts = tmp_path / "texts.txt"
    shutil.copy(pruned["root"] / "texts.txt", texts)
    assert cli_main(["fit-scales", store, "--finetune", "q", "--texts", str(texts), "--steps", "30", "--lr", "0.05",
                     "--batch", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "output error against the teacher" in out.out and "step 30/30" in out.err

    assert cli_main(["inspect", store, "--finetune", "q"]) == 0
    assert "scales fitted (fit 1, " in capsys.readouterr().out
    s = Store(store)
    m1 = s.manifest("q")
    fit = m1["scale_fits"][-1]
    assert fit["fit"] == 1 and fit["texts"] == 48 and fit["steps"] == 30 and fit["teacher"] == os.path.realpath(pruned["ft"])
    model = load_model(store, "q").eval()
    err1 = _output_error(model, teacher, tok, pruned["texts"])
    assert err1 < 0.5 * err0, (err0, err1)
    assert abs(err1 - fit["loss_after"]) <= 1e-6 + 1e-3 * err1 and abs(err0 - fit["loss_before"]) <= 1e-6 + 1e-3 * err0

    # the same entries kept, every other entry the base's, the codes unchanged, the same size (to a few bytes)
    after = _tensors(store)
    changed = 0
    for name, t in m1["tensors"].items():
        if t["action"] == "whole":
            assert same_bits(after[name], before[name]), name
            continue
        old_blocks = {(b["row_start"], b["row_end"]): b for b in m0["tensors"][name]["blocks"]}
        for b in t["blocks"]:
            old = old_blocks[(b["row_start"], b["row_end"])]
            assert b["file"].endswith("-fit1.parquet") and b["kept"] == old["kept"]
            new_table, old_table = s.read_part(b, name), Store(pruned["root"] / "store").read_part(old, name)
            assert new_table.column_names == old_table.column_names
            for col in new_table.column_names:  # the kept entries and their codes as they were
                assert new_table.column(col).equals(old_table.column(col)) or col == "scales", (name, col)
            assert abs(b["bytes"] - old["bytes"]) <= 64
        changed += int((after[name] != before[name]).sum())
    assert changed > 0
    files = {str(p) for p in (tmp_path / "store" / "finetunes" / "q").rglob("*.parquet")}
    assert files == {s.resolve(b["file"]) for t in m1["tensors"].values() for b in t["blocks"]}  # old parts gone
    assert m1["totals"]["bytes"] == sum(os.path.getsize(f) for f in files)

    # materialize gives what load_model gives; a second fit is fit 2
    dense = tmp_path / "dense"
    assert cli_main(["materialize", store, "--finetune", "q", "--out", str(dense)]) == 0
    fresh = BertForSequenceClassification.from_pretrained(dense).state_dict()
    for k, v in model.state_dict().items():
        assert same_bits(fresh[k], v), k
    assert cli_main(["fit-scales", store, "--finetune", "q", "--texts", str(texts), "--steps", "2", "--quiet"]) == 0
    m2 = s.manifest("q")
    assert [f["fit"] for f in m2["scale_fits"]] == [1, 2]
    assert all(b["file"].endswith("-fit2.parquet") for t in m2["tensors"].values() for b in t["blocks"] if "values" in b)

    # prune again: complete, nothing to do, the fit stays; a lost part: pruned again, the fit is dropped
    capsys.readouterr()
    cmd = [*pruned["cmd"][:3], "--store", store, *pruned["cmd"][5:], "--name", "q", "--values", "sign"]
    assert cli_main(cmd) == 0 and "already complete" in capsys.readouterr().out
    assert s.manifest("q")["scale_fits"] == m2["scale_fits"]
    lossy = next(b for t in m2["tensors"].values() for b in t["blocks"] if "values" in b)
    os.unlink(s.resolve(lossy["file"]))
    assert cli_main(cmd) == 0
    m3 = s.manifest("q")
    assert "scale_fits" not in m3 and m3["complete"]
    again = _tensors(store)
    for name, t in before.items():
        assert same_bits(again[name], t), name  # the unfitted fine-tune, bit for bit


def test_a_killed_fit_leaves_the_fine_tune_as_it_was(pruned, tmp_path):
    store = _copy(pruned, tmp_path)
    manifest = (tmp_path / "store" / "finetunes" / "q" / "manifest.json").read_bytes()
    before = _tensors(store)
    texts = tmp_path / "texts.txt"
    shutil.copy(pruned["root"] / "texts.txt", texts)
    script = textwrap.dedent(f"""
        import os, sys
        import ken_dist.store.protocol as protocol
        def killed(path, obj):  # the moment before the new manifest would be written: kill -9
            os.kill(os.getpid(), 9)
        protocol.atomic_json = killed
        from ken_dist.cli import main
        sys.exit(main(["fit-scales", {store!r}, "--finetune", "q", "--texts", {str(texts)!r}, "--steps", "3", "--quiet"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "store" / "finetunes" / "q" / "manifest.json").read_bytes() == manifest
    orphans = list((tmp_path / "store").rglob("*-fit1.parquet"))
    assert orphans  # the new parts were written, and nothing points to them
    after = _tensors(store)
    for name, t in before.items():
        assert same_bits(after[name], t), name
    # the next fit cleans them up and completes
    assert cli_main(["fit-scales", store, "--finetune", "q", "--texts", str(texts), "--steps", "3", "--quiet"]) == 0
    s = Store(store)
    m = s.manifest("q")
    assert [f["fit"] for f in m["scale_fits"]] == [1]
    files = {str(p) for p in (tmp_path / "store" / "finetunes" / "q").rglob("*.parquet")}
    assert files == {s.resolve(b["file"]) for t in m["tensors"].values() for b in t["blocks"]}


def test_bad_input_gets_a_clear_error(pruned, tmp_path, capsys):
    from tiny_models import make_finetune

    store = _copy(pruned, tmp_path)
    texts = tmp_path / "texts.txt"
    shutil.copy(pruned["root"] / "texts.txt", texts)
    manifest = (tmp_path / "store" / "finetunes" / "q" / "manifest.json").read_bytes()

    def fails(*args) -> str:
        capsys.readouterr()
        assert cli_main(["fit-scales", store, *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.splitlines()[-1].startswith("ken-dist: error: ")
        return err.splitlines()[-1]

    assert "stores its kept values 'raw'" in fails("--finetune", "raw", "--texts", str(texts))
    assert "has no fine-tune 'nope'" in fails("--finetune", "nope", "--texts", str(texts))
    assert f"--texts {tmp_path / 'missing.txt'}: cannot read it" in fails(
        "--finetune", "q", "--texts", str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    assert "holds no text" in fails("--finetune", "q", "--texts", str(tmp_path / "empty.txt"))
    from tiny_models import BERT
    from transformers import BertConfig, BertModel
    wide = tmp_path / "wide-base"
    BertModel(BertConfig(**{**BERT, "hidden_size": 48})).save_pretrained(wide)
    teacher = make_finetune(wide, tmp_path / "wide-ft", seed=4, model="bert", head_class=True)
    shutil.copy(os.path.join(pruned["ft"], "vocab.txt"), teacher)
    err = fails("--finetune", "q", "--texts", str(texts), "--teacher", teacher)
    assert f"teacher {teacher}" in err and "pass --teacher DIR" in err
    assert (tmp_path / "store" / "finetunes" / "q" / "manifest.json").read_bytes() == manifest


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is false)")
def test_fit_on_cuda_lowers_the_error_of_the_model_as_stored(pruned, tmp_path):
    from transformers import AutoTokenizer, BertForSequenceClassification

    from ken_dist import fit_scales
    from ken_dist.subnetwork.load_model import load_model
    store = _copy(pruned, tmp_path)
    result = fit_scales(store, "q", pruned["texts"], steps=30, lr=0.05, batch=16, device="cuda")
    assert result["loss_after"] < 0.5 * result["loss_before"]
    tok = AutoTokenizer.from_pretrained(pruned["ft"])
    teacher = BertForSequenceClassification.from_pretrained(pruned["ft"]).eval()
    err = _output_error(load_model(store, "q").eval(), teacher, tok, pruned["texts"])
    assert abs(err - result["loss_after"]) <= 1e-5 + 1e-2 * err  # what the store rebuilds, on the CPU


def test_the_hooked_fit_equals_rebuilding_every_weight(tmp_path):
    """fit_multipliers never builds a Linear's or an Embedding's fitted weight; the oracle here
    builds every weight p + (a - 1) * delta and runs the model on them (functional_call): the
    same multipliers after a few Adam steps (tied input and output embeddings included)."""
    from tiny_models import LLAMA
    from transformers import LlamaConfig, LlamaForCausalLM

    from ken_dist.subnetwork.fit_scales import _loss, fit_multipliers
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(**{**LLAMA, "tie_word_embeddings": True})).eval()
    teacher = LlamaForCausalLM(LlamaConfig(**{**LLAMA, "tie_word_embeddings": True})).eval()
    for p in [*student.parameters(), *teacher.parameters()]:
        p.requires_grad_(False)
    names = dict(student.named_parameters())
    deltas = {n: torch.randn(p.shape[0], p[0].numel()) * 0.05 * (torch.rand(p.shape[0], p[0].numel()) < 0.3)
              for n, p in names.items()}
    enc = {"input_ids": torch.randint(5, 120, (12, 9)), "attention_mask": torch.ones(12, 9, dtype=torch.long)}
    enc["attention_mask"][3:, 6:] = 0
    got = fit_multipliers(student, teacher, enc, deltas, steps=4, lr=0.05, batch=5, seed=3)

    alphas = {n: torch.ones(d.shape[0], 1, requires_grad=True) for n, d in deltas.items()}
    opt = torch.optim.Adam(alphas.values(), lr=0.05)
    rng = np.random.default_rng(3)
    for _ in range(4):
        pick = torch.from_numpy(rng.choice(12, size=5, replace=False))
        state = {n: (names[n].view_as(d) + (alphas[n] - 1) * d).view(names[n].shape) for n, d in deltas.items()}
        loss = _loss(student, teacher, enc, pick, state)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(got) == set(alphas)
    for n, a in alphas.items():
        assert torch.allclose(got[n], a.detach(), atol=1e-5), n
    assert any(not torch.equal(a.detach(), torch.ones_like(a)) for a in alphas.values())


def test_tied_weights_stored_twice_get_the_same_multipliers(tmp_path):
    """A tied embedding / LM head stored under both names: the model holds one tensor, and both
    stored copies are rescaled alike, so a dense export rebuilds equal copies."""
    from safetensors.torch import load_file, save_file
    from tiny_models import LLAMA, _build, _save, save_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from ken_dist.subnetwork.load_model import load_model
    config = LlamaConfig(**{**LLAMA, "tie_word_embeddings": True})
    base = _save(_build(LlamaForCausalLM, config, 1), tmp_path / "base", torch.float32, None)
    ft = _save(_build(LlamaForCausalLM, config, 1), tmp_path / "ft", torch.float32, None)
    gen = torch.Generator().manual_seed(5)
    for d in (base, ft):
        path = os.path.join(d, "model.safetensors")
        state = load_file(path)
        if d == ft:
            state = {k: v + torch.randn(v.shape, generator=gen) * 0.05 for k, v in state.items()}
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file(state, path, metadata={"format": "pt"})
    words = save_tiny_tokenizer(ft)
    store = str(tmp_path / "store")
    assert cli_main(["prune", base, ft, "--store", store, "--keep", "0.25", "--values", "sign-g8", "--quiet",
                     "--block-bytes", "1000", "--name", "q"]) == 0
    m0 = Store(store).manifest("q")
    before = _tensors(store)
    assert same_bits(before["lm_head.weight"], before["model.embed_tokens.weight"])
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= {n for n, t in m0["tensors"].items() if t["action"] == "prune"}
    rng = np.random.default_rng(1)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(32)))
    assert cli_main(["fit-scales", store, "--finetune", "q", "--texts", str(texts), "--steps", "10", "--lr", "0.05",
                     "--quiet"]) == 0
    m1 = Store(store).manifest("q")
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert all(b["file"].endswith("-fit1.parquet") for b in m1["tensors"][name]["blocks"]), name
    after = _tensors(store)
    assert same_bits(after["lm_head.weight"], after["model.embed_tokens.weight"])
    assert not same_bits(after["lm_head.weight"], before["lm_head.weight"])  # the fit moved them, alike
    model = load_model(store, "q")
    assert same_bits(model.lm_head.weight.detach(), after["lm_head.weight"])


def test_a_job_files_fit_texts_fit_after_pruning_once(pruned, tmp_path, capsys):
    """`fit_texts` per fine-tune in a job file: pruned, then fitted; the same job again fits nothing
    more; a raw fine-tune with fit_texts and a missing texts file are refused before any pruning."""
    texts = tmp_path / "texts.txt"
    shutil.copy(pruned["root"] / "texts.txt", texts)
    store = tmp_path / "store"

    def job(values: str, fit_texts) -> str:
        path = tmp_path / f"job-{values}.yaml"
        path.write_text(json.dumps({
            "base": pruned["base"], "store": str(store), "keep": 0.25, "prefix_map": {"bert.": ""},
            "block_bytes": 1000, "finetunes": [{"source": pruned["ft"], "name": "q", "values": values,
                                                "fit_texts": str(fit_texts)}]}))
        return str(path)

    assert cli_main(["prune", "--job", job("sign", texts), "--quiet"]) == 0
    fits = Store(store).manifest("q")["scale_fits"]
    assert len(fits) == 1 and fits[0]["texts"] == 48
    capsys.readouterr()
    assert cli_main(["prune", "--job", job("sign", texts), "--quiet"]) == 0
    assert "scales already fitted on" in capsys.readouterr().out
    assert len(Store(store).manifest("q")["scale_fits"]) == 1
    assert cli_main(["prune", "--job", job("raw", texts), "--quiet"]) == 2
    assert "`fit_texts` fits the scales of a lossy value codec" in capsys.readouterr().err
    missing = tmp_path / "nope.txt"
    assert cli_main(["prune", "--job", job("int4", missing), "--quiet"]) == 2
    assert f"`fit_texts` {str(missing)!r} is not a file here" in capsys.readouterr().err
    assert "q" in Store(store).finetunes() and Store(store).manifest("q")["params"]["values"] == "sign"
