"""`ken-dist submit` against a real Ray head started here with `ray start --head` on 127.0.0.1
(token authentication on, free ports, a private temp dir): the prune job succeeds and the store
is complete; status, logs and list work; a wrong token is a clear error. Everything the test
starts carries KEN_TEST_TAG in its environment and is killed by pid afterwards (never `ray stop`,
which would stop other people's Ray too)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import torch
from cluster_helpers import TAG_VAR, kill_tagged, new_tag, wait_gone
from tiny_models import make_finetune, make_tiny_llama

from ken_dist import ken_select
from ken_dist.checkpoints.inventory import open_checkpoint
from ken_dist.checkpoints.reads import read_tensor
from ken_dist.cli import main as cli_main
from ken_dist.subnetwork.view import open_subnetwork

QPROJ = "model.layers.0.self_attn.q_proj.weight"


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def head():
    if shutil.which("ray") is None:
        pytest.skip("the `ray` command is not on PATH")
    tag = new_tag()
    temp = tempfile.mkdtemp(prefix="kdj-", dir="/tmp")  # short: Ray's unix socket paths must fit
    gcs, dash, client, agent, agent_grpc, metrics, env_agent = free_ports(7)
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", **{TAG_VAR: tag})
    cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={env_agent}", "--disable-usage-stats"]
    log = open(os.path.join(temp, "ray-start.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401: up, and it wants the token
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    pytest.fail(f"ray start failed:\n{open(log.name).read()[-3000:]}")
                time.sleep(0.5)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        wait_gone(tag, 15)
        kill_tagged(tag)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def job_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayjob")
    base = make_tiny_llama(root / "base", dtype=torch.bfloat16, seed=0)
    ft = make_finetune(base, root / "ft", seed=3, add_head=False)
    (root / "jobdir").mkdir()
    path = root / "jobdir" / "job.yaml"
    path.write_text(f"base: {base}\nstore: {root / 'store'}\nkeep: 0.25\nblock_bytes: 4096\n"
                    f"finetunes:\n  - {{name: sft, source: {ft}}}\n")
    return {"path": path, "base": base, "ft": ft, "store": root / "store"}


def test_submit_waits_for_a_prune_job_and_the_store_is_complete(head, job_file, capsys):
    rc = cli_main(["submit", str(job_file["path"]), "--address", head, "--wait", "--timeout", "400",
                   "--submission-id", "ken-test-1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ken-test-1: SUCCEEDED" in out and "'sft': ran" in out  # the job's own output came back
    with open_subnetwork(job_file["store"], "sft") as sub:
        t = read_tensor(open_checkpoint(job_file["ft"]).tensors[QPROJ])
        b = read_tensor(open_checkpoint(job_file["base"]).tensors[QPROJ])
        assert torch.equal(sub.get_tensor(QPROJ), torch.where(ken_select(t, keep=0.25), t, b))

    assert cli_main(["job", "status", "ken-test-1", "--address", head, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "SUCCEEDED"
    assert cli_main(["job", "logs", "ken-test-1", "--address", head]) == 0
    assert "already complete" not in capsys.readouterr().out
    assert cli_main(["job", "list", "--address", head]) == 0
    assert "ken-test-1" in capsys.readouterr().out

    # submitted again: the store is complete, the job is a no-op and says so
    rc = cli_main(["submit", str(job_file["path"]), "--address", head, "--wait", "--timeout", "300"])
    assert rc == 0 and "already complete in the store, nothing to do" in capsys.readouterr().out


def test_a_wrong_token_or_no_cluster_is_a_clear_error(head, job_file, monkeypatch, tmp_path, capsys):
    bad = tmp_path / "token"
    bad.write_text("not-the-token")
    assert cli_main(["job", "list", "--address", head, "--token-file", str(bad)]) == 2
    assert "token authentication" in capsys.readouterr().err
    (port,) = free_ports(1)
    assert cli_main(["job", "list", "--address", f"http://127.0.0.1:{port}"]) == 2
    assert "cannot reach the Ray Jobs API" in capsys.readouterr().err
    assert cli_main(["job", "status", "no-such-job", "--address", head]) == 2
    assert "no such Ray job" in capsys.readouterr().err


def test_a_port_holding_401_is_not_taken_for_a_refused_token():
    """Found in CI: an unreachable head on port 40113 was reported as a token refusal."""
    from ken_dist.runtime.submit import _client_error

    address = "http://127.0.0.1:40113"
    down = _client_error(address, ConnectionError(f"Failed to connect to Ray at address: {address}."))
    assert "cannot reach the Ray Jobs API" in str(down)
    refused = _client_error(address, RuntimeError("Request failed with status code 401: Unauthorized"))
    assert "token authentication" in str(refused)
