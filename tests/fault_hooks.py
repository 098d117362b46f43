"""A selection strategy that sleeps before selecting, so a test can kill a worker or remove a
node while units are surely running. Its picks are KEN's, so results compare with `ken`.

Ray workers load it through `runtime_env={"worker_process_setup_hook": "fault_hooks.setup"}`
with this directory on PYTHONPATH; the test process calls setup() and teardown() around its use
(registered only meanwhile, so other tests that list the strategies never see it)."""
import time

from ken_dist.kernel import STRATEGIES, register

SLOW_SECONDS = 0.25


def _slow_ken(rows, base, k, *, seed, row_offset, compat, device):
    """KEN after a pause (tests only)."""
    time.sleep(SLOW_SECONDS)
    return STRATEGIES["ken"].fn(rows, base, k, seed=seed, row_offset=row_offset, compat=compat, device=device)


def setup():
    if "slow-ken" not in STRATEGIES:
        register("slow-ken")(_slow_ken)


def teardown():
    STRATEGIES.pop("slow-ken", None)
