"""A worker's memory is bounded by the kernel chunk, not by the block or the checkpoint: a unit
is selected in chunks of rows (execute.SELECT_CHUNK_ELEMENTS) with the same result as one call.
benchmarks/memory_bound.py measures a whole job under a memory cap; this checks the mechanism."""
import subprocess
import sys
import textwrap

import pytest

from ken_dist import execute
from ken_dist.errors import KenError
from ken_dist.jobspec import FineTuneEntry, JobSpec
from ken_dist.plan import PruneParams
from ken_dist.runtime.driver import plan_job
from ken_dist.store import Store
from ken_dist.synthetic import LlamaShape, write_pair

SHAPE = LlamaShape(hidden=64, intermediate=96, layers=1, vocab=80, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base, ft = write_pair(tmp_path_factory.mktemp("pair"), SHAPE, dtype="bf16")
    return str(base), str(ft)


def run_units(pair, store, strategy):
    """Every unit of the pair (one block per tensor) through process_unit; {key: sha256}."""
    job = JobSpec(base=pair[0], store=str(store), block_bytes=2**30,
                  finetunes=(FineTuneEntry("x", pair[1], None, PruneParams(strategy=strategy, keep=0.3, seed=5)),))
    base, (plan,) = plan_job(job)
    with Store(job.store, create=True) as s:
        s.begin("x", params=plan.spec.params.as_dict(), base_identity=base.identity(),
                finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors)
        return {u.key: execute.process_unit(u, s)["sha256"] for u in plan.units}


@pytest.mark.parametrize("strategy", ["ken", "magnitude", "random"])
def test_chunked_selection_writes_the_same_parts(pair, tmp_path, monkeypatch, strategy):
    whole = run_units(pair, tmp_path / "whole", strategy)
    monkeypatch.setitem(execute.SELECT_CHUNK_ELEMENTS, "cpu", 7 * 64)  # 7 rows of 64 per kernel call
    assert run_units(pair, tmp_path / "chunked", strategy) == whole


def test_a_nan_row_is_named_by_its_tensor_row_across_chunks(pair, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file
    import os
    import shutil

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
        from ken_dist.execute import process_unit
        from ken_dist.jobspec import FineTuneEntry, JobSpec
        from ken_dist.plan import PruneParams
        from ken_dist.runtime.driver import plan_job
        from ken_dist.store import Store

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
