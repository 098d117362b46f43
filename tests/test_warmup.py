"""The kernel is compiled once per machine, and no block waits for it (ken_dist/runtime/warmup.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ken_dist.job.plan import PruneParams
from ken_dist.job.spec import FineTuneEntry, JobSpec
from ken_dist.kernel import STRATEGIES
from ken_dist.runtime.driver import plan_job
from ken_dist.runtime.warmup import cpu_device_for
from ken_dist.store.protocol import Store
from ken_dist.testing.synthetic import LlamaShape, write_pair


def test_one_process_per_machine_compiles_the_others_load(tmp_path):
    """Two processes start warming up at once on a fresh numba cache: one compiles (and says so
    once), the other sees it compiling, waits on the lock and then loads the cache without
    compiling anything."""
    script = textwrap.dedent(f"""
        import sys, time
        from ken_dist.runtime import warmup
        warmup.LOCK_FILE = {str(tmp_path / 'kernel.lock')!r}
        warmup.MARKER_FILE = warmup.LOCK_FILE + ".compiling"
        waited = []
        calls = []
        w = warmup.KernelWarmUp(lambda: calls.append(1), while_waiting=lambda: waited.append(1))
        w.join()
        assert w.error is None, w.error
        import os
        assert not os.path.exists(warmup.MARKER_FILE)  # the compiler removed its marker
        print(len(calls), w.ready.is_set(), len(waited))
    """)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    # the one that waited saw the other compiling (its marker) and could prepare meanwhile
    assert sorted(out.split() for out, _ in outs) == [["0", "True", "1"], ["1", "True", "0"]]
    again = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert again.stdout.split() == ["0", "True", "0"], again.stderr


class _Warm:
    def __init__(self, ready: bool, error: BaseException | None = None):
        self.is_ready, self.error = ready, error

    def settled(self, wait_s: float = 0.0) -> bool:
        return self.is_ready or self.error is not None


def test_only_the_compiled_kernel_waits_for_the_warm_up():
    compiled = [n for n, s in STRATEGIES.items() if s.compiled_kernel]
    assert sorted(compiled) == ["ken", "ken-delta"]
    for name, strategy in STRATEGIES.items():
        assert cpu_device_for(strategy, _Warm(False)) == ("torch" if name in compiled else "cpu")
        assert cpu_device_for(strategy, _Warm(True)) == "cpu"
        assert cpu_device_for(strategy, _Warm(False, RuntimeError("llvm"))) == "cpu"  # the kernel call reports it
        assert cpu_device_for(strategy, None) == "cpu"


@pytest.mark.parametrize(("strategy", "compat"), [("ken", "index"), ("ken", "reference"), ("ken-delta", "index")])
def test_blocks_run_while_compiling_store_the_same_parts(tmp_path, strategy, compat):
    """A block an actor runs on the torch path while the kernel compiles is the block the
    compiled kernel writes, byte for byte (raw values; lossy codecs: tests/test_codecs.py)."""
    from ken_dist.job.execute import process_unit

    base, ft = write_pair(tmp_path / "pair", LlamaShape(hidden=64, intermediate=96, layers=1, vocab=80, heads=4,
                                                        kv_heads=4), dtype="bf16")
    out = {}
    for device in ("cpu", "torch"):
        job = JobSpec(base=str(base), store=str(tmp_path / f"s-{device}"), block_bytes=4096, finetunes=(
            FineTuneEntry("x", str(ft), None, PruneParams(strategy=strategy, keep=0.3, compat=compat)),))
        b, (plan,) = plan_job(job)
        with Store(job.store, create=True) as s:
            s.begin("x", params=plan.spec.params.as_dict(), base_identity=b.identity(),
                    finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors)
            out[device] = {(r["tensor"], r["row_start"]): r["sha256"] for r in
                           (process_unit(u, s, device) for u in plan.units)}
    assert len(out["cpu"]) > 3 and out["cpu"] == out["torch"]
