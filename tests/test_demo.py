"""`ken-dist demo`, the README's first command, end to end as a user runs it: a fresh interpreter,
a private local Ray, the generated pair, the prune, the summary and the bit-exact check.

Not marked slow: CI must run the README's first command (about a minute on 2 cores)."""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from cluster_helpers import TAG_VAR, kill_tagged, new_tag

from ken_dist.cli.demo import DEMO_SHAPE
from ken_dist.store.protocol import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def short_tmp():
    """The demo's temp dir and its Ray session go under TMPDIR; Ray's socket paths must stay under
    107 bytes, too short for pytest's tmp_path."""
    path = tempfile.mkdtemp(prefix="kd-demo-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_demo_prunes_summarizes_and_rebuilds_bit_exact(short_tmp):
    """A new user's first run: an empty numba cache, so the kernel compiles (said once) first."""
    tag = new_tag()  # every process the demo starts (its Ray too) carries it, so cleanup finds only ours
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", TMPDIR=short_tmp,
               NUMBA_CACHE_DIR=os.path.join(short_tmp, "numba"), **{TAG_VAR: tag})
    try:
        run = subprocess.run([sys.executable, "-m", "ken_dist.cli", "demo"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    finally:
        kill_tagged(tag)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout

    summary = re.search(r"^fine-tune 'demo-sft': (\d+) tensors pruned, (\d+) stored whole; kept ([\d,]+) of "
                        r"([\d,]+) pruned weights \((\d+\.\d)%\)$", out, re.M)
    assert summary, out
    pruned, whole, kept, weights = (int(g.replace(",", "")) for g in summary.groups()[:4])
    assert pruned + whole == len(DEMO_SHAPE.tensors()) and pruned > 0
    assert weights <= DEMO_SHAPE.parameters() and kept == round(0.25 * weights)  # keep 0.25 of every row
    assert summary.group(5) == "25.0"

    sizes = re.search(r"^  stored .* = (\d+\.\d+) x the dense fine-tune \(.*\); pruned part (\d+\.\d+) x the "
                      r"information bound$", out, re.M)
    assert sizes and 0.2 < float(sizes.group(1)) < 0.5, out

    store = re.search(r"^store: (\S+)   time: \d+\.\d s$", out, re.M)
    assert store and store.group(1).startswith(short_tmp), out
    assert Store(store.group(1)).manifest("demo-sft")["complete"]
    assert glob.glob(os.path.join(os.path.dirname(store.group(1)), "materialized", "*.safetensors"))

    assert out.rstrip().splitlines()[-1].endswith("bit-exact vs in-memory KEN: True"), out
    assert re.search(r"^\[ken-dist\] 100\.0%  \d+ blocks", run.stderr, re.M), run.stderr
    assert run.stderr.count("compiling the selection kernel (first run on this machine") == 1, run.stderr
    compiled = re.findall(r"^\[ken-dist\] the selection kernel compiled in [\d.]+ s", run.stderr, re.M)
    assert len(compiled) == 1 and run.stderr.index("compiling the selection kernel") < run.stderr.index(compiled[0])
