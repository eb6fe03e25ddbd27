"""The files in cluster/ and the Dockerfile are valid for the tools that read them, agree with the
installed Ray and the package version, and hold placeholders, never credentials.

Launcher configs go through Ray's own schema and config preparation (prepare_config +
validate_config, all offline); the cloud-side bootstrap (`ray up` resolving IAM, subnets, AMIs,
projects) needs cloud credentials and is not run here. KubeRay manifests are checked for the fields
the KubeRay CRDs require; no Kubernetes API server is involved.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).parent.parent
CLUSTER = ROOT / "cluster"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
LAUNCHER = ["aws-gpu.yaml", "gcp-gpu.yaml"]
KUBERAY = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]
FIT = "padim-ray fit stc --scene 01 --root {s}://my-bucket/shanghaitech --out {s}://my-bucket/models/stc_01 --actors 4 --gpus-per-actor 1"


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_schema_and_preparation(name):
    text = (CLUSTER / name).read_text()
    config = yaml.safe_load(text)
    jsonschema.validate(config, json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text()))
    prepared = prepare_config(config)
    validate_config(prepared)

    types = prepared["available_node_types"]
    head, workers = types.pop(prepared["head_node_type"]), types.values()
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    assert sorted(w["resources"]["GPU"] for w in workers) == [1, 4]
    assert all(w["min_workers"] == 0 and w["max_workers"] > 0 for w in workers)
    assert prepared["docker"]["image"] == RAY_IMAGE
    # padim-ray from the user's checkout, mounted on every node: never a name asked of a package index
    assert prepared["setup_commands"][0].startswith("pip install --no-cache-dir ~/padim-ray ")
    assert not re.search(r"padim[-_]ray\s*(==|@)", text)
    sources = {remote: local for remote, local in prepared["file_mounts"].items() if remote.startswith("~/padim-ray/")}
    assert sorted(sources.values()) == ["./README.md", "./padim_ray", "./pyproject.toml"]
    assert all((ROOT / local).exists() and remote == f"~/padim-ray/{local[2:]}" for remote, local in sources.items())
    assert f'"ray[data,default]=={ray.__version__}"' in prepared["setup_commands"][0]
    # token auth on every node, dashboard on the head's localhost only (reached through `ray dashboard`)
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    for command in prepared["head_start_ray_commands"][1:] + prepared["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in command and "dashboard-host" not in command
    assert "SecurityGroupIds" not in text  # no ports opened beyond Ray's defaults (SSH)
    # the flagship command, in the header, on this cloud's object storage
    header = " ".join(line.lstrip("# ").rstrip(" \\") for line in text.splitlines() if line.startswith("#"))
    assert FIT.format(s={"aws": "s3", "gcp": "gs"}[prepared["provider"]["type"]]) in header
    # workers reach the bucket through the instance's identity, a marked placeholder
    for node_type in workers:
        node = node_type["node_config"]
        identity = node["IamInstanceProfile"]["Arn"] if "IamInstanceProfile" in node else node["serviceAccounts"][0]["email"]
        assert re.fullmatch(r"arn:aws:iam::123456789012:instance-profile/[\w-]+|[\w-]+@my-project\.iam\.gserviceaccount\.com", identity)


def _ray_object(name):
    docs = list(yaml.safe_load_all((CLUSTER / name).read_text()))
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    (obj,) = [d for d in docs if d["apiVersion"] == "ray.io/v1"]
    return obj, accounts


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_has_the_fields_kuberay_requires(name):
    obj, accounts = _ray_object(name)
    spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
    assert obj["kind"] == {"kuberay-raycluster.yaml": "RayCluster", "kuberay-rayjob.yaml": "RayJob"}[name]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head.get("serviceType", "ClusterIP") == "ClusterIP"
    pods = [head["template"]["spec"]]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"]
        (worker,) = group["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1
        pods.append(group["template"]["spec"])
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    for pod in pods:
        assert pod["serviceAccountName"] in accounts
        assert all(c["image"] == f"REGISTRY/padim-ray:{VERSION}" for c in pod["containers"])
    if obj["kind"] == "RayJob":
        assert obj["spec"]["entrypoint"] == FIT.format(s="s3") and obj["spec"]["shutdownAfterJobFinishes"] is True


def test_dockerfile_builds_on_the_installed_rays_image():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == [RAY_IMAGE]
    assert f"docker build -t REGISTRY/padim-ray:{VERSION} ." in dockerfile
    assert f'"ray[data,default]=={ray.__version__}"' in dockerfile and "pip install --no-cache-dir ." in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "data", "models"} <= set(ignored)


def _marked(lines, i):
    """A value line is marked when it, or the comments and bare keys right above it, say CHANGE."""
    j = i
    while j >= 0 and (j == i or lines[j].lstrip().startswith("#") or lines[j].rstrip().endswith(":")):
        if "CHANGE" in lines[j]:
            return True
        j -= 1
    return False


def assert_only_placeholders(text: str) -> None:
    """No keys or tokens; account ids, buckets and projects only the documented placeholders."""
    assert not re.search(r"AKIA[0-9A-Z]{16}|(?i:secret_access_key|private key-----|auth_token:\s*\S)", text)
    assert set(re.findall(r"(?<!\d)\d{12}(?!\d)", text)) <= {"123456789012"}
    assert set(re.findall(r"\b(?:s3|gs)://([\w.-]+)", text)) <= {"my-bucket"}
    assert set(re.findall(r"@([\w-]+)\.iam\.gserviceaccount\.com", text)) <= {"my-project"}


@pytest.mark.parametrize("name", LAUNCHER + KUBERAY + ["../Dockerfile"])
def test_no_credentials_only_marked_placeholders(name):
    text = (CLUSTER / name).read_text()
    assert_only_placeholders(text)
    lines = text.splitlines()
    unmarked = [
        line for i, line in enumerate(lines)
        if not line.lstrip().startswith("#") and re.search(r"123456789012|my-project|my-bucket|REGISTRY/", line) and not _marked(lines, i)
    ]
    assert not unmarked


def test_walkthrough_uses_only_placeholders():
    text = (CLUSTER / "README.md").read_text()
    assert_only_placeholders(text)
    assert "`CHANGE:`" in text and "my-bucket" in text  # says which values are the user's
