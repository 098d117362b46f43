"""Resume after kill -9: `ken-dist prune` killed with SIGKILL at random points (during start-up,
and after some blocks were committed), re-run until done, must give a store identical to an
uninterrupted run; re-running a finished job is a no-op that starts no Ray; a killed driver's
private Ray processes go away with it."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from cluster_helpers import (
    TAG_VAR,
    assert_committed_once,
    assert_same_store,
    journal_keys,
    kill_tagged,
    new_tag,
    planned_blocks,
    serial_model_reference,
    serial_reference,
    tagged_pids,
    wait_gone,
)

from ken_dist.job.log import read_job_log
from ken_dist.job.plan import PruneParams
from ken_dist.job.spec import FineTuneEntry, JobSpec
from ken_dist.testing.synthetic import LlamaShape, write_pair

SHAPE = LlamaShape(hidden=128, intermediate=344, layers=2, vocab=512, heads=4, kv_heads=2)
BLOCK_BYTES = 2048
KEEP = 0.25


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base, ft = write_pair(root, SHAPE, dtype="bf16")
    return str(base), str(ft), root


def prune_cmd(base, ft, store):
    return [sys.executable, "-m", "ken_dist.cli", "prune", base, ft, "--store", store, "--name", "sft",
            "--keep", str(KEEP), "--block-bytes", str(BLOCK_BYTES), "--workers", "2"]


def start(cmd, tag):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **{TAG_VAR: tag})
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def journal_lines(store) -> int:
    path = os.path.join(store, "finetunes", "sft", "journal.jsonl")
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def kill_driver(proc, tag) -> None:
    """SIGKILL the driver alone, as `kill -9 PID` would; its Ray must follow it."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # raylet and GCS die with the driver at once; Ray's dashboard and runtime-env agents poll
    # their raylet and were seen to exit 30-75 s later on this 2-core machine under load
    left = wait_gone(tag, timeout=120)
    try:  # cleanup of whatever we started, whatever the outcome
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    kill_tagged(tag)
    assert not left, f"Ray processes of the killed driver still alive after 120 s: {left}"


def kill_when(cmd, ready) -> None:
    """Start `cmd` and kill -9 its driver as soon as ready() (polled every 5 ms) holds."""
    tag = new_tag()
    proc = start(cmd, tag)
    while not ready() and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
    kill_driver(proc, tag)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_a_clean_run(pair, tmp_path):
    base, ft, _ = pair
    rng = random.Random(int(os.environ.get("KEN_TEST_SEED", time.time())))
    clean, store = str(tmp_path / "clean"), str(tmp_path / "killed")
    serial_reference(JobSpec(base=base, store=clean, block_bytes=BLOCK_BYTES,
                             finetunes=(FineTuneEntry("sft", ft, None, PruneParams(keep=KEEP)),)))
    total = planned_blocks(clean, "sft")
    assert total > 300

    # 1: killed at a random moment of start-up (most likely before any block is committed)
    tag = new_tag()
    proc = start(prune_cmd(base, ft, store), tag)
    time.sleep(rng.uniform(0.5, 4.0))
    kill_driver(proc, tag)
    # 2, 3: killed after a random number of further committed blocks
    for _ in range(2):
        target = journal_lines(store) + rng.randint(1, total // 3)
        kill_when(prune_cmd(base, ft, store), lambda: journal_lines(store) >= target)
    committed = len(set(journal_keys(store, "sft")))
    assert 0 < committed < total

    tag = new_tag()
    proc = start(prune_cmd(base, ft, store), tag)
    out, _ = proc.communicate(timeout=300)
    kill_tagged(tag)
    assert proc.returncode == 0, out
    assert f"ran {total - committed} block(s), reused {committed} block(s) from an earlier run" in out
    assert_committed_once(store, "sft", reused=committed)  # so every block exactly once across the runs
    assert_same_store(clean, store, "sft")

    # a finished job again: nothing to do, no Ray started, manifest untouched
    manifest = os.path.join(store, "finetunes", "sft", "manifest.json")
    before = os.stat(manifest).st_mtime_ns
    tag = new_tag()
    t0 = time.time()
    proc = start(prune_cmd(base, ft, store), tag)
    seen_ray = []
    while proc.poll() is None:
        seen_ray += [p for p in tagged_pids(tag) if p != proc.pid]
        time.sleep(0.05)
    out = proc.stdout.read()
    assert proc.returncode == 0, out
    assert "already complete in the store, nothing to do" in out
    assert not seen_ray, "a no-op run started other processes (Ray)"
    assert os.stat(manifest).st_mtime_ns == before
    assert time.time() - t0 < 60
    log = read_job_log(store)
    assert [e["status"] for e in log if e["event"] == "end"][-2:] == ["ok", "nothing to do"]
    starts = [e for e in log if e["event"] == "start"]
    assert len(starts) >= 4 and starts[-1]["finetunes"]["sft"]["already_complete"]  # run 1 may die before its start


def _budgets_recorded(store) -> bool:
    try:
        with open(os.path.join(store, "finetunes", "sft", "manifest.json")) as f:
            return "budget" in json.load(f)
    except (OSError, ValueError):
        return False


@pytest.mark.slow
def test_model_budget_killed_between_and_in_the_passes_resumes_to_the_same_store(pair, tmp_path):
    """A `*-model` job killed (kill -9) once its budgets are recorded (between the passes, spills on
    disk) and again in the selection pass resumes to the store a run without spills writes; the
    resumed selection uses the spills the killed run left, and the finished store has none."""
    base, ft, _ = pair
    rng = random.Random(int(os.environ.get("KEN_TEST_SEED", time.time())))
    clean, store = str(tmp_path / "clean"), str(tmp_path / "killed")
    params = PruneParams(strategy="lowrank-delta-model", keep=KEEP)
    serial_model_reference(JobSpec(base=base, store=clean, block_bytes=BLOCK_BYTES,
                                   finetunes=(FineTuneEntry("sft", ft, None, params),)), spill=False)
    total = planned_blocks(clean, "sft")
    cmd = prune_cmd(base, ft, store) + ["--strategy", "lowrank-delta-model"]
    spills = os.path.join(store, "finetunes", "sft", "spill")

    kill_when(cmd, lambda: _budgets_recorded(store))
    assert journal_lines(store) < total and os.path.isdir(spills)
    target = journal_lines(store) + rng.randint(1, total // 3)
    kill_when(cmd, lambda: journal_lines(store) >= target)
    committed = len(set(journal_keys(store, "sft")))
    assert 0 < committed < total

    tag = new_tag()
    proc = start(cmd, tag)
    out, _ = proc.communicate(timeout=300)
    kill_tagged(tag)
    assert proc.returncode == 0, out
    assert "scoring pass" not in out  # the budgets recorded by the first run serve the resumed ones
    used = re.search(r"(\d+) block\(s\) selected from their spilled candidates, (\d+) read", out)
    assert used and int(used[1]) + int(used[2]) == total - committed and int(used[1]) > int(used[2]), out
    assert_same_store(clean, store, "sft")
    assert not os.path.exists(spills)
