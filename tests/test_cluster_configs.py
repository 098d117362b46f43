"""cluster/ and jobs/ files: the launcher YAML passes Ray's own schema, the KubeRay RayJob is
well formed, both run a valid `ken-dist prune --job ...` with the store on shared storage, and
the example job file documents and validates every field."""
import re
import shlex
from pathlib import Path

import pytest
import yaml

from ken_dist.cli.commands import build_parser
from ken_dist.job import spec as jobspec

ROOT = Path(__file__).resolve().parents[1]
SHARED = "/mnt/shared"


def parse_entrypoint(command: str):
    argv = shlex.split(command)
    assert argv[0] == "ken-dist", command
    args = build_parser().parse_args(argv[1:])
    assert args.verb == "prune" and args.job and not args.finetunes, command
    return args


def test_launcher_config_passes_rays_schema_and_runs_the_entrypoint():
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    from ray.autoscaler._private import util  # Ray's own config schema (needs jsonschema, a Ray dependency)

    util.validate_config(util.fillout_defaults(config))
    types = config["available_node_types"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values()), "no GPU worker node type"
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0  # the head runs the driver only
    meta = config["metadata"]["ken_dist"]
    args = parse_entrypoint(meta["entrypoint"])
    assert args.job.startswith(SHARED + "/") and meta["store"].startswith(SHARED + "/")
    assert any(SHARED in cmd and "mount" in cmd for cmd in config["setup_commands"])


def test_kuberay_rayjob_runs_the_entrypoint_with_shared_storage_everywhere():
    docs = list(yaml.safe_load_all((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert job["apiVersion"].startswith("ray.io/") and "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert parse_entrypoint(job["spec"]["entrypoint"]).job.startswith(SHARED + "/")
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for group in groups:
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims[mounts[SHARED]] == pvc["metadata"]["name"]
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    assert any(gpus) and not all(gpus)  # a GPU group and a CPU-only group: a mixed cluster


def test_example_job_documents_and_validates_every_field():
    path = ROOT / "jobs" / "example_job.yaml"
    text = path.read_text()
    job = jobspec.load_job_file(path)
    assert len(job.finetunes) == 4 and job.finetunes[1].params.k == 1024
    keys = set(re.findall(r"^\s*-?\s*([a-z_]+):", text, re.M))
    documented = jobspec._JOB_FIELDS | jobspec._FT_FIELDS | jobspec._CLUSTER_FIELDS
    assert documented <= keys, f"fields missing from {path.name}: {sorted(documented - keys)}"


def test_jobs_entrypoint_script_builds_the_same_command(tmp_path, monkeypatch):
    import runpy
    import sys

    seen = {}
    monkeypatch.setattr("ken_dist.cli.main", lambda argv: seen.setdefault("argv", argv) and 0)
    monkeypatch.setattr(sys, "argv", ["prune_job.py", "job.yaml", "--quiet"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(ROOT / "jobs" / "prune_job.py"), run_name="__main__")
    assert seen["argv"] == ["prune", "--job", "job.yaml", "--quiet"]
