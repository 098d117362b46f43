"""`ken-dist prune` end to end on one local Ray (shared by the module): many fine-tunes of one
base in one job, job files, resume of missing parts, refusal of other settings, and hostile or
broken input. Every failure must be a clear message naming the file/tensor, exit status 2,
leave complete fine-tunes intact and never mark a fine-tune with holes complete."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_finetune, make_tiny_llama

from ken_dist import ken_select
from ken_dist.checkpoints.inventory import open_checkpoint
from ken_dist.checkpoints.reads import read_tensor
from ken_dist.cli import main as cli_main
from ken_dist.errors import KenError
from ken_dist.job.execute import process_unit
from ken_dist.job.log import read_job_log
from ken_dist.job.plan import PruneParams
from ken_dist.job.spec import FineTuneEntry, JobSpec
from ken_dist.runtime.driver import plan_job
from ken_dist.store.protocol import Store
from ken_dist.subnetwork.view import open_subnetwork

pytestmark = pytest.mark.usefixtures("local_ray")
KEEP = 0.25
QPROJ = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = make_tiny_llama(root / "base", dtype=torch.bfloat16, seed=0)
    return {"root": root, "base": base, "a": make_finetune(base, root / "ft-a", seed=1, add_head=False),
            "b": make_finetune(base, root / "ft-b", seed=2, add_head=False),
            "other_base": make_tiny_llama(root / "other-base", dtype=torch.bfloat16, seed=9)}


def prune(*args, capsys=None):
    rc = cli_main(["prune", *map(str, args), "--quiet"])
    out = capsys.readouterr() if capsys else None
    return rc, (out.out + out.err) if out else ""


def expected(base_dir, ft_dir, name, *, keep=KEEP, k=None):
    b, f = read_tensor(open_checkpoint(base_dir).tensors[name]), read_tensor(open_checkpoint(ft_dir).tensors[name])
    rows = f.reshape(f.shape[0], -1) if f.dim() > 1 else f.reshape(1, -1)
    return torch.where(ken_select(rows, k, keep=None if k else keep).reshape(f.shape), f, b)


@pytest.fixture(scope="module")
def two_ft_store(models, tmp_path_factory):
    """BASE FT1 FT2 in one `ken-dist prune`: the store shared (read-only) by several tests."""
    store = tmp_path_factory.mktemp("two") / "store"
    rc = cli_main(["prune", models["base"], models["a"], models["b"], "--name", "a", "--name", "b",
                   "--store", str(store), "--keep", str(KEEP), "--block-bytes", "2048", "--quiet"])
    assert rc == 0
    return store


def snapshot(store) -> dict:
    return {str(p): p.read_bytes() for p in Path(store).rglob("*") if p.is_file() and p.name != ".lock"}


def unlogged(snap: dict) -> dict:
    return {k: v for k, v in snap.items() if not k.endswith("jobs.jsonl")}


# ------------------------------------------------------------------ many fine-tunes, job files

def test_many_finetunes_in_one_job_loaded_by_name(models, two_ft_store, capsys):
    log = read_job_log(two_ft_store)
    starts = [e for e in log if e["event"] == "start"]
    assert len(starts) == 1 and set(starts[0]["finetunes"]) == {"a", "b"}  # one job, both fine-tunes
    end = [e for e in log if e["event"] == "end"][0]
    assert end["status"] == "ok" and end["finetunes"]["a"]["blocks_run"] > 0 and end["finetunes"]["b"]["blocks_run"] > 0
    assert end["driver_peak_rss"] > 0 and all(w["peak_rss"] > 0 for w in end["workers"].values())
    for name in ("a", "b"):
        with open_subnetwork(two_ft_store, name) as sub:
            assert torch.equal(sub.get_tensor(QPROJ), expected(models["base"], models[name], QPROJ))
    # the finished job again: a no-op
    rc, out = prune(models["base"], models["a"], models["b"], "--name", "a", "--name", "b", "--store",
                    two_ft_store, "--keep", KEEP, "--block-bytes", 2048, capsys=capsys)
    assert rc == 0 and out.count("already complete in the store, nothing to do") == 2
    assert [e["status"] for e in read_job_log(two_ft_store) if e["event"] == "end"][-1] == "nothing to do"


def test_base_is_opened_once_for_all_finetunes(models, monkeypatch, tmp_path):
    import ken_dist.checkpoints.inventory as ck

    seen = []
    real = ck.read_header
    monkeypatch.setattr(ck, "read_header", lambda path: seen.append(path) or real(path))
    job = JobSpec(base=models["base"], store=str(tmp_path / "s"), finetunes=tuple(
        FineTuneEntry(n, models[n], None, PruneParams(keep=KEEP)) for n in ("a", "b")))
    _, plans = plan_job(job)
    for plan in plans:
        plan.spec.checkpoint.identity()
    base_file = os.path.join(models["base"], "model.safetensors")
    assert seen.count(base_file) == 1 and len(plans) == 2


def test_job_file_with_per_finetune_parameters(models, tmp_path, capsys):
    store = tmp_path / "store"
    job = tmp_path / "job.yaml"
    job.write_text(f"""
base: {models['base']}
store: {store}
keep: 0.5
block_bytes: 4KiB
finetunes:
  - {{name: a, source: {models['a']}, k: 8}}
  - {{name: b, path: {models['b']}}}
cluster: {{workers: 2, placement: cpu}}
""")
    rc, out = prune("--job", job, capsys=capsys)
    assert rc == 0, out
    s = Store(store)
    assert s.manifest("a")["params"]["k"] == 8 and s.manifest("a")["params"]["keep"] is None
    assert s.manifest("b")["params"]["keep"] == 0.5
    with open_subnetwork(store, "a") as sub:
        assert torch.equal(sub.get_tensor(QPROJ), expected(models["base"], models["a"], QPROJ, k=8))
    start = [e for e in read_job_log(store) if e["event"] == "start"][0]
    assert start["placement"] == "cpu" and start["block_bytes"] == 4096


# ------------------------------------------------------------------ settings, locks, resume

@pytest.mark.parametrize("change, pattern", [
    (["--keep", "0.5"], r"params\.keep: stored 0\.25, given 0\.5"),
    (["--strategy", "magnitude"], r"params\.strategy: stored \"ken\", given \"magnitude\""),
    (["--base"], r"base\.files"),
])
def test_other_settings_on_the_same_name_are_refused(models, two_ft_store, change, pattern, capsys):
    before = snapshot(two_ft_store)
    base = models["other_base"] if change == ["--base"] else models["base"]
    args = [] if change == ["--base"] else change
    keep = [] if "--keep" in args else ["--keep", KEEP]
    rc, out = prune(base, models["a"], "--name", "a", "--store", two_ft_store, *keep, *args, capsys=capsys)
    assert rc == 2 and re.search(pattern, out), out
    assert "--overwrite" in out and "'a'" in out
    assert unlogged(snapshot(two_ft_store)) == unlogged(before)  # nothing but a "refused" log line


def test_a_second_run_on_the_same_store_is_refused(models, two_ft_store, capsys):
    with Store(two_ft_store) as holder:
        holder.acquire("b")  # as a running prune does
        rc, out = prune(models["base"], models["b"], "--name", "b", "--store", two_ft_store, "--keep", KEEP,
                        capsys=capsys)
    assert rc == 2 and f"being written by another run (pid {os.getpid()}" in out


def test_corrupt_or_missing_part_is_named_and_a_rerun_repairs_it(models, two_ft_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(two_ft_store, store)
    block = Store(store).manifest("a")["tensors"][QPROJ]["blocks"][0]
    part = store / block["file"]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    rc = cli_main(["materialize", str(store), "--finetune", "a", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().err
    assert rc == 2 and str(part) in out and QPROJ in out and "corrupt" in out
    part.unlink()  # as the message says
    rc = cli_main(["materialize", str(store), "--finetune", "a", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().err
    assert rc == 2 and "missing" in out and QPROJ in out
    rc, out = prune(models["base"], models["a"], "--name", "a", "--store", store, "--keep", KEEP,
                    "--block-bytes", 2048, capsys=capsys)
    assert rc == 0 and re.search(r"'a': ran 1 block\(s\), reused \d+ block\(s\)", out), out
    with open_subnetwork(store, "a") as sub:
        assert torch.equal(sub.get_tensor(QPROJ), expected(models["base"], models["a"], QPROJ))


# ------------------------------------------------------------------ hostile and broken input

def _copy_with(src, dst, change):
    """A copy of checkpoint dir `src` with its tensors passed through change(dict)."""
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    change(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), dst)
    return str(dst)


def _truncate(src, dst):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    return str(dst)


def _offsets_past_end(src, dst):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[QPROJ]["data_offsets"][1] += 10**6
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    open(path, "wb").write(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
    return str(dst)


BROKEN = {
    "truncated": (_truncate, r"model\.safetensors.*(truncated|past the end)", None),
    "offsets_past_file": (_offsets_past_end, r"model\.safetensors", QPROJ),
    "shape_mismatch": (lambda s, d: _copy_with(s, d, lambda t: t.__setitem__(QPROJ, t[QPROJ][:16].clone())),
                       r"shape", QPROJ),
    "dtype_mismatch": (lambda s, d: _copy_with(s, d, lambda t: t.__setitem__(QPROJ, t[QPROJ].float())),
                       r"(?i)dtype|BF16|F32", QPROJ),
    "missing_tensor": (lambda s, d: _copy_with(s, d, lambda t: t.pop(QPROJ)), r"(?i)missing|lacks|absent", QPROJ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoints_fail_before_any_work_naming_file_and_tensor(models, two_ft_store, tmp_path, case,
                                                                        capsys):
    make, pattern, tensor = BROKEN[case]
    bad = make(models["a"], tmp_path / "bad")
    before = snapshot(two_ft_store)
    rc, out = prune(models["base"], bad, "--name", "bad", "--store", two_ft_store, "--keep", KEEP, capsys=capsys)
    assert rc == 2 and re.search(pattern, out), out
    if tensor:
        assert tensor in out
    assert "Traceback" not in out
    assert unlogged(snapshot(two_ft_store)) == unlogged(before)  # nothing written


@pytest.mark.parametrize("flag, value, pattern", [("--k", "0", r"k must be >= 1"), ("--keep", "1.5", r"keep must be"),
                                                  ("--keep", "0", r"keep must be")])
def test_k_out_of_range(models, tmp_path, flag, value, pattern, capsys):
    rc, out = prune(models["base"], models["a"], "--store", tmp_path / "s", flag, value, capsys=capsys)
    assert rc == 2 and re.search(pattern, out), out
    assert not (tmp_path / "s").exists()


def test_nan_names_file_tensor_and_row_and_leaves_other_finetunes_intact(models, two_ft_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(two_ft_store, store)
    before = {k: v for k, v in snapshot(store).items() if "/finetunes/a/" in k}

    def poison(t):
        t[QPROJ][5, 3] = float("nan")

    bad = _copy_with(models["a"], tmp_path / "nan", poison)
    rc, out = prune(models["base"], bad, "--name", "bad", "--store", store, "--keep", KEEP, capsys=capsys)
    assert rc == 2, out
    assert os.path.join(bad, "model.safetensors") in out and QPROJ in out and "row 5" in out and "NaN" in out
    assert not Store(store).manifest("bad")["complete"]
    assert {k: v for k, v in snapshot(store).items() if "/finetunes/a/" in k} == before
    with open_subnetwork(store, "a") as sub:
        assert torch.equal(sub.get_tensor(QPROJ), expected(models["base"], models["a"], QPROJ))
    end = [e for e in read_job_log(store) if e["event"] == "end"][-1]
    assert end["status"] == "failed" and "row 5" in end["error"]


def test_inf_in_a_unit_names_file_tensor_and_row(models, tmp_path):
    def poison(t):
        t[QPROJ][7, 0] = float("inf")

    bad = _copy_with(models["a"], tmp_path / "inf", poison)
    job = JobSpec(base=models["base"], store=str(tmp_path / "s"),
                  finetunes=(FineTuneEntry("x", bad, None, PruneParams(keep=KEEP)),))
    base, (plan,) = plan_job(job)
    with Store(job.store, create=True) as store:
        store.begin("x", params=plan.spec.params.as_dict(), base_identity=base.identity(),
                    finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors)
        unit = next(u for u in plan.units if u.tensor == QPROJ)
        with pytest.raises(KenError, match=rf"model\.safetensors: tensor '{re.escape(QPROJ)}' row 7 holds NaN or infinity"):
            process_unit(unit, store)


def test_hostile_tensor_and_finetune_names_stay_inside_the_store(tmp_path, capsys):
    names = ["../../escape.weight", "a/b/../../../c.weight", "/abs.weight", "weird name\t✓.weight", ".hidden",
             "%2E.", "..", "x" * 300]
    gen = torch.Generator().manual_seed(0)
    for which in ("base", "ft"):
        os.makedirs(tmp_path / "in" / which)
        save_file({n: torch.randn(4, 16, generator=gen) for n in names},
                  str(tmp_path / "in" / which / "model.safetensors"))
    before = {p for p in tmp_path.rglob("*")}
    store = tmp_path / "out" / "store"
    rc, out = prune(tmp_path / "in" / "base", tmp_path / "in" / "ft", "--name", "../../../ft", "--store", store,
                    "--keep", KEEP, capsys=capsys)
    assert rc == 0, out
    created = {p for p in tmp_path.rglob("*")} - before
    real_store = os.path.realpath(store)
    assert all(os.path.realpath(p).startswith(real_store) or p in (tmp_path / "out", store) for p in created)
    with open_subnetwork(store, "../../../ft") as sub:
        assert sorted(sub.keys()) == sorted(names)
        for n in names:
            assert torch.equal(sub.get_tensor(n), expected(tmp_path / "in" / "base", tmp_path / "in" / "ft", n))


def _mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); needs root")


def test_full_store_is_a_clear_error_and_never_complete(models, tmp_path, capsys):
    mnt = tmp_path / "full"
    _mount_tmpfs(mnt, "size=48k")
    try:
        rc, out = prune(models["base"], models["a"], "--name", "a", "--store", mnt / "store", "--keep", KEEP,
                        "--block-bytes", 1024, capsys=capsys)
        assert rc == 2 and "No space left on device" in out and "Traceback" not in out, out
        assert "rerun the same command" in out
        manifest = mnt / "store" / "finetunes" / "a" / "manifest.json"
        if manifest.exists():
            assert not json.loads(manifest.read_text())["complete"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_unwritable_store_is_a_clear_error(models, tmp_path, capsys):
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "ro,size=64k")
    try:
        rc, out = prune(models["base"], models["a"], "--store", mnt / "store", "--keep", KEEP, capsys=capsys)
        assert rc == 2 and "Read-only file system" in out and str(mnt / "store") in out, out
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_no_pickle_in_the_package():
    """Checkpoints are never unpickled (that can run code): no torch.load, no pickle import, no
    numpy allow_pickle anywhere in ken_dist. (Ray serializes work-unit descriptors between its
    own processes; that is Ray's transport, not a file format we read.)"""
    root = Path(__file__).resolve().parents[1] / "ken_dist"
    pattern = re.compile(r"torch\.load\b|^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b|allow_pickle\s*=\s*True"
                         r"|pickle\.loads?\(", re.M)
    hits = [f"{p.relative_to(root)}: {m.group(0).strip()}" for p in root.rglob("*.py")
            for m in pattern.finditer(p.read_text())]
    assert not hits, hits
