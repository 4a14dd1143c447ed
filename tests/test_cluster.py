"""Offline checks of `cluster.yaml`, the Ray cluster-launcher config (no cloud contacted).

`ray up` first fills the config with the provider's defaults and validates it against
Ray's JSON schema (`prepare_config`, `validate_config`); both run here, as they would on a
laptop. What follows in `ray up` (IAM roles, key pairs, subnets, the AMI) needs boto3 and
AWS credentials and is not tested. Then rayvid's own rules: GPUs only on autoscaling
workers, rayvid installed on every node, data and checkpoints on shared storage.

    pytest tests/test_cluster.py
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
SHARED = "/mnt/shared"
# vCPUs and GPUs per instance type used in cluster.yaml, from the EC2 instance-type pages,
# so that `resources` never advertises hardware the instance does not have.
EC2_HARDWARE = {
    "m6i.2xlarge": (8, 0),
    "g5.2xlarge": (8, 1),
    "g6e.12xlarge": (48, 4),
}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw: dict) -> dict:
    """The config as `ray up` sees it after filling defaults (offline part of ray up)."""
    return prepare_config(json.loads(json.dumps(raw)))  # a deep copy


def test_matches_ray_schema(raw: dict):
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(raw, json.loads(schema_path.read_text()))


def test_prepared_config_passes_ray_validation(prepared: dict):
    validate_config(prepared)  # schema again, plus head type and max_workers rules
    assert prepared["provider"]["type"] == "aws"
    assert prepared["cluster_name"] == "rayvid"
    # prepare_config merged the common setup into the head's and the workers' lists.
    assert any("pip install" in c for c in prepared["head_setup_commands"])
    assert any("pip install" in c for c in prepared["worker_setup_commands"])


def _node_types(cfg: dict) -> tuple[dict, dict]:
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    return head, workers


def test_head_has_no_gpu_and_some_cpu(raw: dict):
    head, _ = _node_types(raw)
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) >= 2  # job drivers and Ray Data tasks run here


def test_gpu_workers_autoscale_from_zero(raw: dict):
    _, workers = _node_types(raw)
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    assert gpu, "no GPU worker type"
    for name, spec in gpu.items():
        assert spec.get("min_workers", 0) == 0, name
        assert spec["max_workers"] >= 1, name
    mins = sum(v.get("min_workers", 0) for v in raw["available_node_types"].values())
    assert raw["max_workers"] >= max(mins, 1)
    assert raw["idle_timeout_minutes"] > 0


def test_resources_match_instance_types(raw: dict):
    for name, spec in raw["available_node_types"].items():
        cpus, gpus = EC2_HARDWARE[spec["node_config"]["InstanceType"]]
        assert spec["resources"].get("GPU", 0) == gpus, name
        assert 0 < spec["resources"]["CPU"] <= cpus, name


def test_every_node_type_names_an_image(raw: dict):
    # Ray's default AMI (`latest_dlami`) is an Ubuntu 18.04 DLAMI, too old for Ray 2.60.
    for name, spec in raw["available_node_types"].items():
        assert spec["node_config"].get("ImageId", "latest_dlami") != "latest_dlami", name


def test_setup_installs_rayvid_from_the_synced_copy(raw: dict):
    remote = next(r for r, local in raw["file_mounts"].items() if Path(REPO, local) == REPO)
    assert (REPO / "pyproject.toml").is_file()
    installs = [c for c in raw["setup_commands"] if re.search(rf"pip install .*-e {remote}", c)]
    assert installs, f"no `pip install -e {remote}` in setup_commands"
    assert ".gitignore" in raw["rsync_filter"]  # .venv, runs/, data/ stay on the laptop


def test_shared_storage_is_mounted_for_data_and_runs(raw: dict):
    init = "\n".join(raw["initialization_commands"])
    assert re.search(rf"mount -t nfs4? .* {SHARED}\b", init), "no NFS/EFS mount"
    for sub in ("rayvid/data", "rayvid/runs"):
        assert f"{SHARED}/{sub}" in init


def test_start_commands(raw: dict):
    head_start = "\n".join(raw["head_start_ray_commands"])
    worker_start = "\n".join(raw["worker_start_ray_commands"])
    assert raw["head_start_ray_commands"][0] == "ray stop"
    assert raw["worker_start_ray_commands"][0] == "ray stop"
    port = re.search(r"ray start --head .*--port=(\d+)", head_start).group(1)
    assert f"--address=$RAY_HEAD_IP:{port}" in worker_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    # Token auth on every node, with the token that file_mounts puts there.
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "~/.ray/auth_token" in raw["file_mounts"]


def test_commands_are_valid_shell(prepared: dict):
    keys = (
        "initialization_commands", "head_setup_commands", "worker_setup_commands",
        "head_start_ray_commands", "worker_start_ray_commands",
    )  # fmt: skip
    for key in keys:
        for cmd in prepared[key]:
            res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert res.returncode == 0, f"{key}: {cmd}\n{res.stderr}"
