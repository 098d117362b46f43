"""The driver on a multi-node cluster (ray.cluster_utils.Cluster, every node on 127.0.0.1):
GPU placement with the CPU fallback, a worker process killed mid-task, a node removed mid-job.
One cluster for the module: a head (1 CPU), a GPU node (1 CPU, 1 fake GPU), a CPU node (1 CPU).
Units use the `slow-ken` strategy (tests/fault_hooks.py: KEN after a 0.25 s pause), so units
are surely running when a worker or node goes, and the results still compare with KEN's."""
import os
import signal
import threading
import time

import fault_hooks
import pytest
import ray
import torch
from cluster_helpers import TAG_VAR, assert_committed_once, kill_tagged, new_tag, tagged_pids

from ken_dist import ken_select
from ken_dist.checkpoints.inventory import open_checkpoint
from ken_dist.checkpoints.reads import read_tensor
from ken_dist.errors import ClusterError
from ken_dist.job.log import read_job_log
from ken_dist.job.plan import PruneParams
from ken_dist.job.spec import FineTuneEntry, JobSpec
from ken_dist.runtime import run_job
from ken_dist.runtime.pool import ActorPool, plan_slots
from ken_dist.subnetwork.view import open_subnetwork
from ken_dist.testing.synthetic import LlamaShape, write_pair

TESTS = os.path.dirname(os.path.abspath(__file__))
KEEP = 0.25
SHAPE = LlamaShape(hidden=64, intermediate=128, layers=1, vocab=128, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    tag = new_tag()
    saved = {k: os.environ.get(k) for k in (TAG_VAR, "PYTHONPATH")}
    os.environ[TAG_VAR] = tag  # inherited by every Ray process of this cluster
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, saved["PYTHONPATH"]) if p)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": False})
    try:
        c.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": "fault_hooks.setup"})
        fault_hooks.setup()  # here too: the driver validates the strategy name
        yield c, tag
    finally:
        fault_hooks.teardown()
        ray.shutdown()
        c.shutdown()
        kill_tagged(tag)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base, ft = write_pair(tmp_path_factory.mktemp("pair"), SHAPE, dtype="bf16")
    return str(base), str(ft)


def job_for(pair, store, strategy="slow-ken", block_bytes=2048):
    base, ft = pair
    return JobSpec(base=base, store=str(store), block_bytes=block_bytes,
                   finetunes=(FineTuneEntry("sft", ft, None, PruneParams(strategy=strategy, keep=KEEP)),))


def assert_pruned_like_ken(pair, store):
    """Every tensor equals KEN run in memory; every planned block was committed exactly once."""
    base, ft = open_checkpoint(pair[0]), open_checkpoint(pair[1])
    with open_subnetwork(store, "sft") as sub:
        for name, info in ft.tensors.items():
            t, b = read_tensor(info), read_tensor(base.tensors[name])
            mask = ken_select(t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1), keep=KEEP)
            assert torch.equal(sub.get_tensor(name), torch.where(mask.reshape(t.shape), t, b)), name
    assert_committed_once(store, "sft")


def run_in_thread(job, **kw):
    box = {}

    def target():
        try:
            box["result"] = run_job(job, quiet=True, **kw)
        except BaseException as exc:  # noqa: BLE001 - handed to the test, which fails with it
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def wait_for_blocks(store, n, thread, timeout=120):
    path = os.path.join(store, "finetunes", "sft", "journal.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and thread.is_alive():
        if os.path.exists(path) and open(path, "rb").read().count(b"\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} blocks committed in {timeout} s")


def test_placement_policy_counts():
    res = {"CPU": 8, "GPU": 2}
    assert plan_slots(res, None, "mixed", 100) == [True, True] + [False] * 6
    assert plan_slots(res, None, "gpu", 100) == [True, True]
    assert plan_slots(res, None, "cpu", 100) == [False] * 8
    assert plan_slots(res, 3, "mixed", 100) == [True, True, False]
    assert plan_slots({"CPU": 4}, None, "mixed", 2) == [False, False]  # never more actors than units
    with pytest.raises(Exception, match="no GPU"):
        plan_slots({"CPU": 4}, None, "gpu", 10)


def test_gpu_actors_get_a_gpu_and_fall_back_to_cpu_here(cluster, pair, tmp_path):
    # the mixed policy: 1 GPU actor + 1 CPU actor per CPU left (pure, so checked exactly)
    assert plan_slots(ray.cluster_resources(), None, "mixed", 100) == [True, False, False]
    # GPU actors only, so the GPU actor surely runs blocks and reports how it ran them
    store = tmp_path / "gpu"
    assert run_job(job_for(pair, store, strategy="ken"), quiet=True, placement="gpu")["sft"]["complete"]
    workers = [e for e in read_job_log(store) if e["event"] == "end"][-1]["workers"]
    assert workers and all(w["gpu_requested"] for w in workers.values()), workers
    want = "cuda" if torch.cuda.is_available() else "cpu"
    for w in workers.values():
        assert w["gpu_ids"] == ["0"]  # Ray scheduled it with num_gpus=1 ...
        assert w["device"] == want  # ... and it runs the CUDA path only where torch sees CUDA
    assert_pruned_like_ken(pair, store)
    # a mixed pool completes the same job (which actors get blocks depends on start-up timing)
    store = tmp_path / "mixed"
    assert run_job(job_for(pair, store, strategy="ken"), quiet=True)["sft"]["complete"]
    workers = [e for e in read_job_log(store) if e["event"] == "end"][-1]["workers"]
    assert all(w["gpu_ids"] == [] and w["device"] == "cpu" for w in workers.values() if not w["gpu_requested"])
    assert_pruned_like_ken(pair, store)


def test_worker_killed_mid_task_is_retried(cluster, pair, tmp_path):
    _, tag = cluster
    store = str(tmp_path / "store")
    thread, box = run_in_thread(job_for(pair, store), placement="cpu")
    wait_for_blocks(store, 3, thread)
    actors = tagged_pids(tag, "SelectionActor")
    assert actors, "no selection actor process found"
    os.kill(actors[0], signal.SIGKILL)  # each unit sleeps 0.25 s: it dies mid-task
    thread.join(300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    end = [e for e in read_job_log(store) if e["event"] == "end"][-1]
    assert end["status"] == "ok"
    assert set(end["workers"]) - {str(p) for p in actors}, "no restarted worker process ran the retried unit"
    assert_pruned_like_ken(pair, store)


def test_node_removed_mid_job_does_not_stop_it(cluster, pair, tmp_path):
    c, _ = cluster
    node = c.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # the node we will lose
    store = str(tmp_path / "store")
    thread, box = run_in_thread(job_for(pair, store), placement="cpu")  # 4 CPUs: one actor per node
    wait_for_blocks(store, 6, thread)
    c.remove_node(node)
    thread.join(300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    end = [e for e in read_job_log(store) if e["event"] == "end"][-1]
    assert end["status"] == "ok"
    assert end["actors_replaced"] >= 1  # the actor of the lost node was replaced, its blocks re-run
    assert_pruned_like_ken(pair, store)


def test_an_actor_that_cannot_open_the_store_is_a_clear_error(cluster, tmp_path):
    """The store must be on storage every node mounts: an actor that cannot open it stops the job
    with that diagnosis, instead of the job waiting for actors that never come up."""
    pool = ActorPool(str(tmp_path / "not-a-store"), [False])
    try:
        with pytest.raises(ClusterError, match=r"could not open the store .*not-a-store.* every node mounts"):
            for _ in range(120):
                ready, _ = ray.wait(pool.startups(), num_returns=1, timeout=1)
                for ref in ready:
                    pool.started(ref)
    finally:
        pool.shutdown()
