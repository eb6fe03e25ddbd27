"""Which device an actor computes on, and the backbone arithmetic a model records.

Ray 2.60 no longer hides GPUs from actors that reserved none, so an actor must follow the GPUs its
resources reserve (Ray's GPU ids), not the GPUs torch can see. Ray's fake GPU resources on this CPU
machine show what each actor is given; the rule itself is checked with CUDA visible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from padim_ray.checkpoint import CheckpointError, Checkpoints
from padim_ray.config import ClusterConfig, ConfigError, ModelConfig
from padim_ray.embedding import Embedder
from padim_ray.fit import _identity
from padim_ray import runtime
from padim_ray.devices import choose_device
from padim_ray.runtime import ClusterError, plan_actors
from padim_ray.store import open_model
from padim_ray.video import WorkUnit
from helpers import SMALL_MODEL, relative_error

# an actor built on SplitConsumer (as the stats and score actors are), on a local Ray with one fake GPU
PROBE_ACTORS = """
import json, sys, tempfile
import ray
from padim_ray.streaming import SplitConsumer

@ray.remote
class Probe(SplitConsumer):
    def report(self):
        return {"gpu_ids": [int(i) for i in ray.get_gpu_ids()], "device": str(self.device)}

ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="prd-"))
reports = {gpus: ray.get(Probe.options(num_cpus=0.5, num_gpus=gpus).remote(1).report.remote()) for gpus in (0, 1)}
print(json.dumps(reports))
ray.shutdown()
"""


def test_device_rule_follows_reserved_gpus_not_visible_ones():
    assert choose_device([], cuda_available=True) == torch.device("cpu")  # CUDA visible, no GPU reserved
    assert choose_device([3], cuda_available=True) == torch.device("cuda", 0)  # Ray made the reserved GPU cuda:0
    assert choose_device([0], cuda_available=False) == torch.device("cpu")  # a fake GPU: no CUDA behind it


@pytest.mark.slow
def test_actors_get_only_the_gpus_they_reserve():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-c", PROBE_ACTORS], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    reports = json.loads(run.stdout.strip().splitlines()[-1])
    assert reports["0"] == {"gpu_ids": [], "device": "cpu"}  # with a GPU on the node, none reserved: the CPU
    reserved = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert reports["1"] == {"gpu_ids": [0], "device": reserved}


def test_a_gpu_wait_on_a_local_ray_fails_at_once_in_one_line(ray_local, monkeypatch):
    """No autoscaler can add GPUs to a local Ray this process started (the session's was): no wait."""
    monkeypatch.setitem(runtime._STARTED_HERE, "local", True)
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"^64 actors x 1 GPUs need 64 GPUs; this machine has 0 and its local Ray no autoscaler .*--gpus-per-actor") as error:
        plan_actors(ClusterConfig(actors=64, gpus_per_actor=1.0, gpu_wait=600.0))
    assert time.monotonic() - started < 60 and "\n" not in str(error.value)  # at once, not after --gpu-wait


def test_a_model_records_its_backbone_dtype(small_model):
    assert open_model(small_model).attrs["config"]["backbone_dtype"] == "float32"


def test_bfloat16_embeddings_differ_from_float32_within_bfloat16_rounding():
    frames = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    as_float32 = Embedder(SMALL_MODEL)(frames).numpy()
    as_bfloat16 = Embedder(ModelConfig(**{**SMALL_MODEL.to_dict(), "backbone_dtype": "bfloat16"}))(frames).numpy()
    assert 1e-4 < relative_error(as_bfloat16, as_float32) < 5e-2  # honoured (it differs), and only by rounding


def test_a_resume_in_another_backbone_dtype_is_refused(tmp_path):
    """A checkpoint's identity holds the dtype: float32 and bfloat16 statistics never meet in one model."""
    units = [WorkUnit(0, "a.avi", frames=10)]
    as_bfloat16 = ModelConfig(**{**SMALL_MODEL.to_dict(), "backbone_dtype": "bfloat16"})
    Checkpoints.open(tmp_path / "c", _identity(SMALL_MODEL, Embedder(SMALL_MODEL), units))
    with pytest.raises(CheckpointError, match=r"belongs to a fit with other config"):
        Checkpoints.open(tmp_path / "c", _identity(as_bfloat16, Embedder(as_bfloat16), units))


def test_an_unknown_backbone_dtype_is_refused():
    with pytest.raises(ConfigError, match=r"--backbone-dtype must be float32 or bfloat16, got float16"):
        ModelConfig(backbone_dtype="float16")


# the shipped cluster configs as the driver sees them: a head with no CPU, GPU workers from zero (fake GPUs)
PLAN_ON_A_GPU_CLUSTER = """
import json
from ray.cluster_utils import Cluster
from padim_ray.config import ClusterConfig
from padim_ray.runtime import ClusterError, connect, plan_actors

def plan(**options):
    try:
        return [(s.num_cpus, s.num_gpus, s.threads) for s in plan_actors(ClusterConfig(**options))]
    except ClusterError as err:
        return str(err)

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
connect(cluster.address)
walkthrough = {"actors": 4, "gpus_per_actor": 1.0, "gpu_wait": 0.0}
before = {"default": plan(), "walkthrough": plan(**walkthrough)}
cluster.add_node(num_cpus=48, num_gpus=4)  # a gpu_4x worker
cluster.wait_for_nodes()
print(json.dumps({"before": before, "after": {"default": plan(), "walkthrough": plan(**walkthrough)}}))
"""


@pytest.mark.slow
@pytest.mark.cluster
def test_a_cluster_that_grows_only_gpu_workers_is_planned_as_the_walkthrough_says():
    """Before the autoscaler adds a GPU worker the driver sees no GPU and no CPU: the default plan names
    --gpus-per-actor; cluster/README.md's options ask for the GPUs (and fail in one line without them)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="prc-")
    run = subprocess.run([sys.executable, "-c", PLAN_ON_A_GPU_CLUSTER], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    plans = json.loads(run.stdout.strip().splitlines()[-1])
    assert "pass --actors N --gpus-per-actor 1" in plans["before"]["default"]
    assert plans["before"]["walkthrough"].startswith("4 actors x 1 GPUs need 4 GPUs, the cluster has 0 GPUs after waiting 0 s")
    assert plans["after"]["walkthrough"] == plans["after"]["default"] == [[1.0, 1.0, 1]] * 4
    readme = (Path(__file__).parent.parent / "cluster" / "README.md").read_text()
    fits = [line for line in readme.split("## 3.")[1].split("## 4.")[0].splitlines() if "padim-ray fit" in line]
    assert len(fits) == 2 and all("--actors 4 --gpus-per-actor 1" in line for line in fits)
    evaluation = readme.split("## 4.")[1].split("## 5.")[0]  # its scoring actors are planned the same way
    assert "padim-ray evaluate" in evaluation and "--actors 4 --gpus-per-actor 1" in evaluation
