"""The Ray pipeline on a GPU against the same pipeline on the CPU: stats actors that checkpoint on
CUDA, the reduction, and score actors on CUDA. Skipped without a CUDA GPU; `scripts/gpu_check.sh`
runs it where there is one (the Ray-free maths are step (a), scripts/check_cuda.py, run in CI too).

Both devices run the backbone in strict float32 (TF32 off), so embeddings agree to ~1e-5 of their
channel's scale; tolerances are per element, each against its own scale: a mean against its
position's standard deviation, a covariance entry against sqrt(c_ii c_jj), a map value against
itself (maps are positive).
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from padim_ray.config import ClusterConfig, ModelConfig, ScoreConfig
from padim_ray.fit import fit_model
from padim_ray.score import score_inputs
from padim_ray.stc import scene_videos
from padim_ray.store import open_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

MODEL = ModelConfig(backbone="resnet18", weights="none", image_size=256)  # R18-Rd100 at the paper's size
ON_GPU = ClusterConfig(actors=1, gpus_per_actor=1.0, checkpoint_every=0.0)  # checkpoints after every batch, from CUDA
ON_CPU = ClusterConfig(actors=1, gpus_per_actor=0.0, cpus_per_actor=1.0)
TOLERANCE = 1e-3  # per element, of its own scale (see above)


def assert_within(actual: np.ndarray, expected: np.ndarray, scale: np.ndarray, name: str) -> None:
    ratio = np.abs(actual.astype(np.float64) - expected) / scale
    assert ratio.max() <= TOLERANCE, f"{name}: worst element off by {ratio.max():.2e} of its scale"


def test_gpu_fit_and_score_match_cpu(ray_local, stc_root, tmp_path):
    videos = scene_videos(stc_root, "01")
    on_gpu = open_model(fit_model(videos, tmp_path / "gpu", MODEL, ON_GPU).out)
    on_cpu = open_model(fit_model(videos, tmp_path / "cpu", MODEL, ON_CPU).out)
    assert on_gpu.attrs["frames"] == on_cpu.attrs["frames"] == 60
    covariance = on_cpu.read("covariance")
    diagonal = np.sqrt(np.einsum("pii->pi", covariance))
    assert_within(on_gpu.read("mean"), on_cpu.read("mean"), diagonal, "mean")
    assert_within(on_gpu.read("covariance"), covariance, diagonal[:, :, None] * diagonal[:, None, :], "covariance")

    clip = stc_root / "testing" / "frames" / "01_0001"
    maps = {}
    for name, cluster in (("gpu", ON_GPU), ("cpu", ON_CPU)):  # one model, scored by score actors on each device
        result = score_inputs(on_cpu.path, [clip], tmp_path / f"maps_{name}", score=ScoreConfig(map_dtype="float32"), cluster=cluster)
        maps[name] = zarr.open_group(str(result.out / "maps.zarr"), mode="r")["01_0001"][:].astype(np.float64)
        assert len(pq.read_table(result.out / "scores.parquet")) == 12
    assert_within(maps["gpu"], maps["cpu"], np.abs(maps["cpu"]) + 1e-3 * np.median(maps["cpu"]), "maps")
