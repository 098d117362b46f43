"""A worker's memory is bounded by the kernel chunk, not by the block or the checkpoint: a unit
is selected in chunks of rows (execute.SELECT_CHUNK_ELEMENTS) with the same result as one call.
benchmarks/memory_bound.py measures a whole job under a memory cap; this checks the mechanism."""
import json
import subprocess
import sys
import textwrap

import pytest

from ken_dist.errors import KenError
from ken_dist.job import execute
from ken_dist.job.plan import PruneParams
from ken_dist.job.spec import FineTuneEntry, JobSpec
from ken_dist.runtime.driver import plan_job
from ken_dist.store.protocol import Store
from ken_dist.testing.synthetic import LlamaShape, write_pair

SHAPE = LlamaShape(hidden=64, intermediate=96, layers=1, vocab=80, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base, ft = write_pair(tmp_path_factory.mktemp("pair"), SHAPE, dtype="bf16")
    return str(base), str(ft)


def run_units(pair, store, strategy, device=None, compat="index"):
    """Every unit of the pair (one block per tensor) through process_unit; {key: sha256}."""
    job = JobSpec(base=pair[0], store=str(store), block_bytes=2**30, finetunes=(
        FineTuneEntry("x", pair[1], None, PruneParams(strategy=strategy, keep=0.3, seed=5, compat=compat)),))
    base, (plan,) = plan_job(job)
    with Store(job.store, create=True) as s:
        s.begin("x", params=plan.spec.params.as_dict(), base_identity=base.identity(),
                finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors)
        return {u.key: execute.process_unit(u, s, device)["sha256"] for u in plan.units}


@pytest.mark.parametrize("strategy", ["ken", "magnitude", "random"])
def test_chunked_selection_writes_the_same_parts(pair, tmp_path, monkeypatch, strategy):
    whole = run_units(pair, tmp_path / "whole", strategy)
    monkeypatch.setitem(execute.SELECT_CHUNK_ELEMENTS, "cpu", 7 * 64)  # 7 rows of 64 per kernel call
    assert run_units(pair, tmp_path / "chunked", strategy) == whole


@pytest.mark.parametrize(("strategy", "compat"), [("ken", "index"), ("ken", "reference"), ("ken-delta", "index"),
                                                  ("lowrank-delta-block", "index")])
def test_the_gpu_code_path_writes_the_same_parts(pair, tmp_path, strategy, compat):
    """A GPU actor's path (torch tensors from read to store), run on the CPU ("torch")."""
    assert (run_units(pair, tmp_path / "torch", strategy, "torch", compat)
            == run_units(pair, tmp_path / "numpy", strategy, compat=compat))


def test_a_nan_row_is_named_by_its_tensor_row_across_chunks(pair, tmp_path, monkeypatch):
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(pair[1], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.embed_tokens.weight"][37, 2] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"))
    monkeypatch.setitem(execute.SELECT_CHUNK_ELEMENTS, "cpu", 10 * 64)
    with pytest.raises(KenError, match=r"'model\.embed_tokens\.weight' row 37 holds NaN"):
        run_units((pair[0], str(bad)), tmp_path / "s", "ken")
    assert os.path.exists(bad)


def test_a_32_mib_unit_costs_a_worker_well_under_its_unchunked_peak(tmp_path):
    """Measured in a fresh process (peak RSS, VmHWM): a [4096, 4096] bf16 block (32 MiB) used to
    cost ~650 MiB above the imports when handed to the kernel at once; chunked, ~200 MiB."""
    code = textwrap.dedent(f"""
        import sys
        from ken_dist.job.execute import process_unit
        from ken_dist.job.spec import FineTuneEntry, JobSpec
        from ken_dist.job.plan import PruneParams
        from ken_dist.runtime.driver import plan_job
        from ken_dist.store.protocol import Store

        def kib(field):
            return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024

        import os, torch
        from safetensors.torch import save_file
        root = {str(tmp_path)!r}
        gen = torch.Generator().manual_seed(0)
        base = {{"q_proj.weight": torch.randn(4096, 4096, generator=gen) * 0.02, "norm.weight": torch.ones(64)}}
        ft = {{k: v + torch.randn(v.shape, generator=gen) * 0.002 for k, v in base.items()}}
        for name, sd in (("base", base), ("ft", ft)):
            os.makedirs(os.path.join(root, name))
            save_file({{k: v.to(torch.bfloat16) for k, v in sd.items()}}, os.path.join(root, name, "model.safetensors"))
        del base, ft
        b, f = os.path.join(root, "base"), os.path.join(root, "ft")
        job = JobSpec(base=str(b), store={str(tmp_path / 's')!r}, block_bytes=64 * 2**20,
                      finetunes=(FineTuneEntry("x", str(f), None, PruneParams(keep=0.25)),))
        base, (plan,) = plan_job(job)
        s = Store(job.store, create=True)
        s.begin("x", params=plan.spec.params.as_dict(), base_identity=base.identity(),
                finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors)
        process_unit(next(u for u in plan.units if u.tensor.endswith("norm.weight")), s)  # imports, JIT
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS: the peak below is the unit's alone
        before = kib("VmRSS")
        unit = next(u for u in plan.units if u.tensor.endswith("q_proj.weight"))
        assert unit.rows == 4096
        process_unit(unit, s)
        print(kib("VmHWM") - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.split()[-1])
    assert extra < 400 * 2**20, f"a 32 MiB unit raised peak RSS by {extra / 2**20:.0f} MiB"


def _torch_input_parts(pair, store, strategy) -> dict:
    """What process_unit writes, written instead from torch tensors through the public select()."""
    from ken_dist.checkpoints.reads import read_rows, read_tensor
    from ken_dist.kernel import STRATEGIES, select

    job = JobSpec(base=pair[0], store=str(store), block_bytes=4096,
                  finetunes=(FineTuneEntry("x", pair[1], None, PruneParams(strategy=strategy, keep=0.3, seed=5)),))
    base, (plan,) = plan_job(job)
    out = {}
    with Store(job.store, create=True) as s:
        s.begin("x", params=plan.spec.params.as_dict(), base_identity=base.identity(),
                finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors)
        for u in plan.units:
            if u.action == "whole":
                rec = s.write_whole("x", u.tensor, read_tensor(u.ft_info))
            else:
                values = read_rows(u.ft_info, u.row_start, u.row_end)
                base_rows = read_rows(u.base_info, u.row_start, u.row_end) if STRATEGIES[strategy].needs_base else None
                mask = select(strategy, values, base_rows, keep=0.3, seed=u.seed, row_offset=u.row_start)
                rec = s.write_block("x", u.tensor, u.row_start, u.row_end, mask, values)
            out["|".join(map(str, u.key))] = rec["sha256"]
    return out


def test_cpu_actors_never_import_torch(pair, tmp_path):
    """A CPU actor's whole job (the actor class, reads, selection by row and by block, whole
    tensors, the scoring pass, the store) runs on numpy: without torch an actor starts ~1.5 s
    sooner and holds ~180 MB less. Its parts are byte-identical to those written from torch
    tensors through the public select()."""
    code = textwrap.dedent(f"""
        import json, sys
        from ken_dist.job.execute import process_unit, score_unit
        from ken_dist.job.spec import FineTuneEntry, JobSpec
        from ken_dist.job.plan import PruneParams
        from ken_dist.runtime.actors import SelectionActor
        from ken_dist.runtime.driver import plan_job
        from ken_dist.store.protocol import Store

        out = {{}}
        for strategy in ("ken", "magnitude", "lowrank-delta-block"):
            job = JobSpec(base={pair[0]!r}, store={str(tmp_path)!r} + "/" + strategy, block_bytes=4096,
                          finetunes=(FineTuneEntry("x", {pair[1]!r}, None,
                                                   PruneParams(strategy=strategy, keep=0.3, seed=5)),))
            base, (plan,) = plan_job(job)
            Store(job.store, create=True).begin("x", params=plan.spec.params.as_dict(),
                                                base_identity=base.identity(),
                                                finetune_identity=plan.spec.checkpoint.identity(),
                                                tensors=plan.tensors)
            actor = SelectionActor(job.store, want_gpu=False)
            assert actor.device == "cpu"
            out[strategy] = {{"|".join(map(str, u.key)): process_unit(u, actor.store, actor.device)["sha256"]
                             for u in plan.units}}
        job = JobSpec(base={pair[0]!r}, store="/nonexistent", block_bytes=4096,
                      finetunes=(FineTuneEntry("x", {pair[1]!r}, None,
                                               PruneParams(strategy="magnitude-model", keep=0.3)),))
        unit = next(u for u in plan_job(job)[1][0].units if u.action == "prune")
        assert sum(score_unit(unit)["counts"]) == unit.elements
        print(json.dumps({{"torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch"), "parts": out}}))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["torch"] == []
    for strategy, parts in result["parts"].items():
        assert len(parts) > 10
        assert parts == _torch_input_parts(pair, tmp_path / f"torch-{strategy}", strategy), strategy
