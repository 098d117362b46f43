"""`ken-dist submit` against a real Ray head started here with `ray start --head` on 127.0.0.1
(token authentication on, free ports, a private temp dir): the prune job succeeds and the store
is complete; status, logs, list and stop work; wait gives up after its timeout; a wrong token
is a clear error. Failures a real head gives only with effort (413, 5xx) and what is uploaded
are checked against a fake Jobs API (cluster_helpers.FakeJobsAPI) with Ray's own client.
Everything the test starts carries KEN_TEST_TAG in its environment and is killed by pid
afterwards (never `ray stop`, which would stop other people's Ray too)."""
import io
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
import zipfile

import pytest
import torch
from cluster_helpers import TAG_VAR, FakeJobsAPI, kill_tagged, new_tag, wait_gone
from tiny_models import make_finetune, make_tiny_llama

from ken_dist import ken_select
from ken_dist.checkpoints.inventory import open_checkpoint
from ken_dist.checkpoints.reads import read_tensor
from ken_dist.cli import main as cli_main
from ken_dist.errors import ClusterError, InputError
from ken_dist.runtime import submit
from ken_dist.runtime.submit import Token, auth_token, http_status
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
    assert shutil.which("ray"), "the `ray` command (installed with ray[default]) is not on PATH: a broken Ray install"
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
            except OSError:  # not listening yet (URLError, reset, timeout)
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


def test_wait_gives_up_after_its_timeout_and_job_stop_stops_the_job(head, capsys):
    """A job that sleeps: wait(timeout) streams its output, then says it still runs (ClusterError,
    on time); `ken-dist job stop` stops it; stopping it again says it already finished."""
    jobs = submit.Jobs(head)
    job_id = jobs.client.submit_job(submission_id="ken-test-sleep", entrypoint="python -c \"import time; "
                                    "print('ken-test sleeping', flush=True); time.sleep(600)\"")
    deadline = time.monotonic() + 120
    while jobs.state(job_id) != "RUNNING":
        assert time.monotonic() < deadline, jobs.info(job_id)
        time.sleep(0.5)
    out = io.StringIO()
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"still RUNNING after 4 s; it keeps running"):
        submit.wait(head, job_id, timeout=4, stream=out)
    assert 4 <= time.monotonic() - t0 < 30
    assert "ken-test sleeping" in out.getvalue()

    assert cli_main(["job", "stop", job_id, "--address", head]) == 0
    assert f"{job_id}: stop requested" in capsys.readouterr().out
    deadline = time.monotonic() + 120
    while jobs.state(job_id) != "STOPPED":
        assert time.monotonic() < deadline, jobs.info(job_id)
        time.sleep(0.5)
    assert cli_main(["job", "stop", job_id, "--address", head]) == 0
    assert f"{job_id}: already finished" in capsys.readouterr().out
    assert cli_main(["job", "logs", job_id, "--follow", "--address", head]) == 1  # ended, not SUCCEEDED
    assert "ken-test sleeping" in capsys.readouterr().out


# ------------------------------------------------------------ without a cluster: a fake Jobs API


def clear_token_env(monkeypatch, home):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))


def test_the_token_comes_from_the_flag_then_the_variable_then_its_path_then_the_home_file(tmp_path, monkeypatch):
    clear_token_env(monkeypatch, tmp_path)
    assert auth_token().value is None and "none found" in auth_token().source
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == Token("from-home", str(tmp_path / ".ray" / "auth_token"))
    by_path = tmp_path / "by-path"
    by_path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(by_path))
    assert auth_token() == Token("from-path", f"RAY_AUTH_TOKEN_PATH={by_path}")
    monkeypatch.setenv("RAY_AUTH_TOKEN", " from-env ")
    assert auth_token() == Token("from-env", "the RAY_AUTH_TOKEN variable")
    flag = tmp_path / "flag"
    flag.write_text("from-flag\n")
    assert auth_token(str(flag)) == Token("from-flag", f"--token-file {flag}")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_token(str(flag)).value is None
    monkeypatch.delenv("RAY_AUTH_MODE")
    (tmp_path / "empty").write_text("\n")
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(InputError, match=str(bad)):
            auth_token(str(bad))
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(InputError, match="RAY_AUTH_TOKEN_PATH"):
        auth_token()


def test_the_chosen_token_is_sent_and_a_refusal_names_where_it_came_from(tmp_path, monkeypatch, capsys):
    clear_token_env(monkeypatch, tmp_path)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("stale")
    with FakeJobsAPI(token="right") as api:
        assert cli_main(["job", "stop", "a-job", "--address", api.address]) == 2
        err = capsys.readouterr().err
        assert "token authentication" in err and f"the token from {tmp_path / '.ray' / 'auth_token'}" in err
        assert api.seen[-1] == ("GET", "/api/version", "Bearer stale")
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        assert cli_main(["job", "stop", "a-job", "--address", api.address]) == 2
        assert "sent no token: none (RAY_AUTH_MODE=disabled)" in capsys.readouterr().err
        monkeypatch.delenv("RAY_AUTH_MODE")
        monkeypatch.setenv("RAY_AUTH_TOKEN", "right")
        assert cli_main(["job", "stop", "a-job", "--address", api.address]) == 0
        assert "a-job: stop requested" in capsys.readouterr().out
        assert api.seen[-1] == ("POST", "/api/jobs/a-job/stop", "Bearer right")


@pytest.mark.parametrize("status, message", [(404, "no such Ray job 'a-job'"),
                                             (500, "failed the request (HTTP 500: Request failed with status code 500")])
def test_job_api_statuses_are_told_apart(tmp_path, monkeypatch, capsys, status, message):
    clear_token_env(monkeypatch, tmp_path)
    with FakeJobsAPI(job_status=status) as api:
        assert cli_main(["job", "status", "a-job", "--address", api.address]) == 2
    err = capsys.readouterr().err
    assert message in err and "cannot reach" not in err


def test_the_status_is_read_from_ray_s_message_not_from_any_number_in_it():
    """Found in CI: an unreachable head on port 40113 was once reported as a token refusal."""
    assert http_status(ConnectionError("Failed to connect to Ray at address: http://127.0.0.1:40113.")) is None
    assert http_status(RuntimeError("Request failed with status code 413: Maximum request body size exceeded.")) == 413
    assert http_status(RuntimeError("Version check returned 404. Please ensure ...")) == 404
    assert http_status(RuntimeError("job at http://127.0.0.1:40113 failed with status code 500")) is None


def write_job(directory, store="/shared/store"):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "job.yaml"
    path.write_text(f"base: /shared/base\nstore: {store}\nkeep: 0.25\nfinetunes:\n  - {{name: sft, source: /shared/ft}}\n")
    return path


def test_submit_uploads_the_job_file_alone_not_the_checkpoint_beside_it(tmp_path, monkeypatch, capsys):
    clear_token_env(monkeypatch, tmp_path)
    job = write_job(tmp_path / "jobdir")
    with open(tmp_path / "jobdir" / "model.safetensors", "wb") as f:
        f.truncate(600 * 2**20)  # sparse: 600 MB that takes no disk
    with FakeJobsAPI() as api:
        assert cli_main(["submit", str(job), "--address", api.address, "--submission-id", "s1"]) == 0
    assert "submitted Ray job s1: ken-dist prune --job job.yaml (uploaded: the job file job.yaml only)" in \
        capsys.readouterr().out
    (upload,) = api.uploads
    with zipfile.ZipFile(io.BytesIO(upload)) as zf:
        assert zf.namelist() == ["job.yaml"] and zf.read("job.yaml") == job.read_bytes()
    (request,) = api.submitted
    assert request["entrypoint"] == "ken-dist prune --job job.yaml"
    assert request["runtime_env"]["working_dir"].startswith("gcs://")  # the uploaded package, not a local path
    assert not list(tmp_path.glob("ken-dist-submit-*"))  # (tempfile's dir is elsewhere; nothing left here)


def test_working_dir_ships_that_directory_and_a_relative_store_needs_it(tmp_path, monkeypatch, capsys):
    clear_token_env(monkeypatch, tmp_path)
    code = tmp_path / "code"
    job = write_job(code / "jobs")
    (code / "helper.py").write_text("x = 1\n")
    with FakeJobsAPI() as api:
        assert cli_main(["submit", str(job), "--address", api.address, "--working-dir", str(code)]) == 0
        with zipfile.ZipFile(io.BytesIO(api.uploads[-1])) as zf:
            assert sorted(zf.namelist()) == ["helper.py", "jobs/job.yaml"]
        assert api.submitted[-1]["entrypoint"] == "ken-dist prune --job jobs/job.yaml"
        relative = write_job(tmp_path / "rel", store="out/store")
        assert cli_main(["submit", str(relative), "--address", api.address]) == 2
        assert "store 'out/store' is a relative path" in capsys.readouterr().err


def test_an_upload_the_head_finds_too_large_is_reported_as_such(tmp_path, monkeypatch, capsys):
    """The head answers 413 to a working directory over its body limit: that is the diagnosis,
    not 'cannot reach the head'."""
    clear_token_env(monkeypatch, tmp_path)
    job = write_job(tmp_path / "big")
    with FakeJobsAPI(upload_status=413) as api:
        assert cli_main(["submit", str(job), "--address", api.address, "--working-dir", str(tmp_path / "big")]) == 2
    err = capsys.readouterr().err
    assert f"refused the working directory {tmp_path / 'big'}" in err and "too large (HTTP 413" in err
    assert "cannot reach" not in err
