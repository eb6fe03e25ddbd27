"""Shared fixtures: one local Ray instance per session, small synthetic STC data, small model configs."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import ray

from padim_ray.config import ClusterConfig, ModelConfig
from padim_ray.synthetic import SyntheticSpec, make_synthetic

# a small but real model: random-init ResNet18, 64x64 input -> 16x16 = 256 positions, d = 16
SMALL_MODEL = ModelConfig(backbone="resnet18", weights="none", image_size=64, dims=16)
SMALL_DATA = SyntheticSpec(train_videos=2, train_frames=30, test_clips=1, test_frames=12, width=320, height=180)
LOCAL_CPUS = 4  # logical CPUs of the test cluster: room for 3 actors of 0.5 CPU plus decoding


def start_local_ray() -> None:
    """Start (or keep) the session's local Ray instance; tests that need another cluster stop it first.

    Its own temp dir keeps it out of /tmp/ray, so `ray.init(address="auto")` elsewhere on the machine
    (a user's padim-ray, a benchmark) never attaches to it, and the suite never touches theirs.
    """
    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=LOCAL_CPUS, object_store_memory=1 << 30, include_dashboard=False,
            _temp_dir=tempfile.mkdtemp(prefix="padim-ray-tests-"),
        )


@pytest.fixture
def ray_local():
    start_local_ray()
    yield


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end():
    yield
    ray.shutdown()


@pytest.fixture
def actors3() -> ClusterConfig:
    """Three CPU actors of half a CPU each, with a batch size that does not divide the frame count."""
    return ClusterConfig(actors=3, cpus_per_actor=0.5, batch_size=7, fan_in=2)


@pytest.fixture
def actors1() -> ClusterConfig:
    return ClusterConfig(actors=1, cpus_per_actor=0.5, batch_size=16)


@pytest.fixture(scope="session")
def stc_root(tmp_path_factory):
    """A small synthetic dataset in the ShanghaiTech layout (scene 01)."""
    return make_synthetic(tmp_path_factory.mktemp("stc"), SMALL_DATA)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def reference_gaussians(embeddings: np.ndarray, eps: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Two-pass float64 reference: np.mean and np.cov per position, plus eps * I.

    Args:
        embeddings: (N, d, h, w).
    Returns:
        mean (P, d) and covariance (P, d, d).
    """
    n, d = embeddings.shape[:2]
    x = embeddings.reshape(n, d, -1).astype(np.float64).transpose(2, 0, 1)  # (P, N, d)
    mean = x.mean(axis=1)
    covariance = np.stack([np.cov(x[p], rowvar=False) for p in range(x.shape[0])]) + eps * np.eye(d)
    return mean, covariance


@pytest.fixture(scope="session")
def small_model(stc_root, tmp_path_factory):
    """SMALL_MODEL fitted on the synthetic scene 01 (a real distributed fit)."""
    from padim_ray.fit import fit_model
    from padim_ray.stc import scene_videos

    start_local_ray()
    out = tmp_path_factory.mktemp("models") / "small"
    fit_model(scene_videos(stc_root, "01"), out, SMALL_MODEL, ClusterConfig(actors=1, cpus_per_actor=0.5))
    return out
