"""Crash consistency of every writer: `ken-dist materialize`, `ken-dist viz` and a model-budget
prune (`--strategy lowrank-delta-model`) killed with SIGKILL at random points.

After each kill nothing half-written may look complete (a materialize output directory exists
only when whole; viz's index.html and stats.json are whole or absent, and every image index.html
names is whole), and a rerun gives exactly what a clean run gives. Kill points: a few in CI,
many more with KEN_FUZZ_LONG=1; the delays are drawn from a seeded generator (KEN_FUZZ_SEED)
so a failure reproduces.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from harness import LONG

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED = int(os.environ.get("KEN_FUZZ_SEED", "16"))


def kill_points(ci: int) -> int:
    return ci * 10 if LONG else ci


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ken_dist.cli", *args]


def env(tag: str | None = None) -> dict:
    from cluster_helpers import TAG_VAR

    out = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONPATH=REPO)
    if tag:
        out[TAG_VAR] = tag
    return out


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, **kw)


def start(cmd: list[str], tag: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(tag), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def kill_after(proc: subprocess.Popen, delay: float, until=None) -> bool:
    """SIGKILL proc `delay` s after start (after `until()` first holds, when given); False if it
    ended on its own first."""
    t0 = time.time()
    while until is not None and not until() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.005)
    end = time.time() + delay
    while time.time() < end and proc.poll() is None:
        time.sleep(0.005)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def tree(root: str) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for fn in files:
            path = os.path.join(dirpath, fn)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


# ---- materialize ---------------------------------------------------------------------------------

def test_materialize_killed_at_random_points_is_absent_or_whole_and_reruns_clean(fixtures, tmp_path):
    store = fixtures["real_store"]
    clean = str(tmp_path / "clean")
    t0 = time.time()
    done = run(cli("materialize", store, "--finetune", "sft", "--out", clean))
    took = time.time() - t0
    assert done.returncode == 0, done.stderr
    want = tree(clean)
    rng = random.Random(SEED)
    killed = 0
    for i in range(kill_points(2)):
        out = str(tmp_path / f"out{i}")
        proc = start(cli("materialize", store, "--finetune", "sft", "--out", out))
        if i % 2:  # while writing: the temporary directory exists
            killed += kill_after(proc, rng.uniform(0, 0.3), until=lambda: os.path.exists(out + ".tmp"))
        else:
            killed += kill_after(proc, rng.uniform(0.2, 1.0) * took)
        if os.path.exists(out):  # it finished its rename before the kill: then it is whole
            assert tree(out) == want, f"kill {i}: {out} exists but differs from a clean run"
            shutil.rmtree(out)
        again = run(cli("materialize", store, "--finetune", "sft", "--out", out))
        assert again.returncode == 0, f"kill {i}: rerun failed:\n{again.stderr}"
        assert tree(out) == want, f"kill {i}: rerun differs from a clean run"
        assert not os.path.exists(out + ".tmp"), f"kill {i}: {out}.tmp left after the rerun"
    assert killed, "no run was killed before it ended; the kill points missed every run"


# ---- viz -----------------------------------------------------------------------------------------

_TIMING = re.compile(rb"rendered in [0-9.]+ s")


def _viz_tree(out: str) -> dict:
    """Files of a viz directory, with the timing fields (which differ between any two runs) removed."""
    files = {}
    for rel in tree(out):
        with open(os.path.join(out, rel), "rb") as f:
            data = f.read()
        if rel == "stats.json":
            doc = json.loads(data)
            doc.pop("seconds", None)
            data = json.dumps(doc, sort_keys=True).encode()
        elif rel == "index.html":
            data = _TIMING.sub(b"rendered in - s", data)
        files[rel] = hashlib.sha256(data).hexdigest()
    return files


def _assert_viz_whole_or_absent(out: str, want: dict, what: str) -> None:
    """No cut file under a real name: stats.json parses, index.html is the clean one, and every
    PNG present (temporary files aside) is byte-identical to the clean run's."""
    if not os.path.isdir(out):
        return
    got = _viz_tree(out)
    for rel, digest in got.items():
        if rel.endswith(".tmp") or os.path.basename(rel).startswith("."):
            continue
        assert rel in want, f"{what}: unexpected file {rel}"
        assert digest == want[rel], f"{what}: {rel} is not whole (differs from a clean run)"


def test_viz_killed_at_random_points_leaves_whole_files_and_reruns_clean(fixtures, tmp_path):
    store = fixtures["real_store"]
    clean = str(tmp_path / "clean")
    args = ("--finetune", "sft", "--quiet")
    t0 = time.time()
    done = run(cli("viz", store, *args, "--out", clean))
    took = time.time() - t0
    assert done.returncode == 0, done.stderr
    want = _viz_tree(clean)
    assert "index.html" in want and "stats.json" in want
    rng = random.Random(SEED + 1)
    killed = 0
    for i in range(kill_points(2)):
        out = str(tmp_path / f"viz{i}")
        proc = start(cli("viz", store, *args, "--out", out))
        if i % 2:  # while rendering: the output directory exists
            killed += kill_after(proc, rng.uniform(0, 0.5), until=lambda: os.path.isdir(out))
        else:
            killed += kill_after(proc, rng.uniform(0.3, 1.0) * took)
        _assert_viz_whole_or_absent(out, want, f"kill {i}")
        again = run(cli("viz", store, *args, "--out", out))
        assert again.returncode == 0, f"kill {i}: rerun failed:\n{again.stderr}"
        got = {k: v for k, v in _viz_tree(out).items() if not k.endswith(".tmp")}
        assert got == want, f"kill {i}: rerun differs from a clean run: {sorted(set(got) ^ set(want))}"
    assert killed, "no run was killed before it ended"


# ---- a model-budget prune ----------------------------------------------------------------------------

@pytest.mark.slow
def test_model_budget_prune_killed_at_random_points_resumes_to_the_clean_store(fixtures, tmp_path):
    from cluster_helpers import assert_same_store, kill_tagged, new_tag, wait_gone
    from conftest import REAL_BLOCK_BYTES, REAL_KEEP

    from ken_dist.store.protocol import Store

    def prune(store):
        return cli("prune", fixtures["real_base"], fixtures["real_ft"], "--store", store, "--name", "sft",
                   "--keep", str(REAL_KEEP), "--block-bytes", str(REAL_BLOCK_BYTES), "--strategy",
                   "lowrank-delta-model", "--workers", "2", "--quiet")

    clean = str(tmp_path / "clean")
    t0 = time.time()
    done = run(prune(clean))
    took = time.time() - t0
    assert done.returncode == 0, done.stderr
    rng = random.Random(SEED + 2)
    store = str(tmp_path / "killed")
    killed = 0
    for i in range(kill_points(1) + 3):
        if i >= kill_points(1):
            if killed:
                break
            # every run so far ended before its kill (this one outpaced the clean run, which paid the
            # first run's costs): start from scratch and kill earlier
            shutil.rmtree(store, ignore_errors=True)
        tag = new_tag()
        proc = start(prune(store), tag)
        killed += kill_after(proc, rng.uniform(0.3, 1.0) * took * 0.5 ** max(0, i - kill_points(1) + 1))
        left = wait_gone(tag, 120)  # its private Ray goes with it
        kill_tagged(tag)
        assert not left, f"kill {i}: Ray processes of the killed driver still alive: {left}"
        if os.path.exists(os.path.join(store, "ken_store.json")):
            m = Store(store).manifest("sft") if os.path.exists(
                os.path.join(store, "finetunes", "sft", "manifest.json")) else None
            assert m is None or not m["complete"] or Store(store).budgets("sft") is not None, \
                f"kill {i}: complete without budgets"
    assert killed, "no run was killed before it ended"
    again = run(prune(store))
    assert again.returncode == 0, again.stderr
    assert_same_store(clean, store, "sft")
