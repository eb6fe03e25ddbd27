"""The CUDA path (bf16 autocast, channels_last, float64 statistics on the GPU) against the CPU path.

Skipped on machines without a CUDA GPU; `scripts/gpu_check.sh` runs it where there is one.
Tolerances: the backbone runs in bfloat16 on CUDA (8-bit mantissa), so embeddings and the Gaussians
fitted from them agree with float32 CPU results to about 1e-2; the statistics themselves are float64
on both devices and agree to 1e-12 on identical embeddings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from padim_ray.config import ClusterConfig, ModelConfig
from padim_ray.embedding import Embedder
from padim_ray.fit import fit_model
from padim_ray.gaussian import StatsAccumulator
from padim_ray.score import Scorer
from padim_ray.stc import scene_videos
from padim_ray.store import open_model
from padim_ray.video import WorkUnit, iter_unit_frames
from conftest import relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

MODEL = ModelConfig(backbone="resnet18", weights="none", image_size=256)  # R18-Rd100 at the paper's size
BF16_TOLERANCE = 3e-2  # relative to the largest value, embeddings and Gaussians
MAP_TOLERANCE = 5e-2  # distances weigh small deviations from the mean by the precision: bf16 errors grow


def _frames(stc_root, count: int = 16) -> np.ndarray:
    video = scene_videos(stc_root, "01")[0]
    return np.stack([f for _, f in iter_unit_frames(WorkUnit(0, str(video)), size=MODEL.image_size)][:count])


def test_cuda_embeddings_match_cpu(stc_root):
    frames = _frames(stc_root)
    on_cpu = Embedder(MODEL, "cpu")(frames).numpy()
    on_gpu = Embedder(MODEL, "cuda")(frames).cpu().numpy()
    assert on_gpu.shape == on_cpu.shape == (16, 100, 64, 64)
    assert relative_error(on_gpu, on_cpu) <= BF16_TOLERANCE


def test_cuda_statistics_equal_cpu_statistics_on_identical_embeddings():
    rng = np.random.default_rng(5)
    embeddings = torch.from_numpy(rng.normal(1e4, 1.0, size=(64, 8, 4, 4)).astype(np.float32))
    on_cpu, on_gpu = StatsAccumulator(16, 8, "cpu"), StatsAccumulator(16, 8, "cuda")
    for batch in embeddings.split(10):
        on_cpu.update(batch)
        on_gpu.update(batch.cuda())
    cpu_stats, gpu_stats = on_cpu.stats(), on_gpu.stats()
    assert relative_error(gpu_stats.mean.numpy(), cpu_stats.mean.numpy()) <= 1e-12
    assert relative_error(gpu_stats.m2.numpy(), cpu_stats.m2.numpy()) <= 1e-12


def test_gpu_fit_and_maps_match_cpu(ray_local, stc_root, tmp_path):
    videos = scene_videos(stc_root, "01")
    on_gpu = open_model(fit_model(videos, tmp_path / "gpu", MODEL, ClusterConfig(gpus_per_actor=1.0)).out)
    on_cpu = open_model(fit_model(videos, tmp_path / "cpu", MODEL, ClusterConfig(actors=1, gpus_per_actor=0.0, cpus_per_actor=1.0)).out)
    assert on_gpu.attrs["frames"] == on_cpu.attrs["frames"] == 60
    for name in ("mean", "covariance"):
        assert relative_error(on_gpu.read(name), on_cpu.read(name)) <= BF16_TOLERANCE
    frames = _frames(stc_root, 4)  # one model, scored on each device: only the bf16 embeddings differ
    maps_gpu = Scorer(on_cpu.path, device="cuda").maps(frames, (180, 320)).cpu().numpy()
    maps_cpu = Scorer(on_cpu.path, device="cpu").maps(frames, (180, 320)).numpy()
    assert relative_error(maps_gpu, maps_cpu) <= MAP_TOLERANCE
