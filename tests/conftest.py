"""Shared fixtures: one local Ray instance per session, small synthetic STC data, small model configs."""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.request
import uuid

import numpy as np
import pytest
import ray

from padim_ray.config import ClusterConfig, ModelConfig
from padim_ray.files import Location
from padim_ray.synthetic import SyntheticSpec, make_synthetic

# a small but real model: random-init ResNet18, 64x64 input -> 16x16 = 256 positions, d = 16
SMALL_MODEL = ModelConfig(backbone="resnet18", weights="none", image_size=64, dims=16)
SMALL_DATA = SyntheticSpec(train_videos=2, train_frames=30, test_clips=1, test_frames=12, width=320, height=180)
LOCAL_CPUS = 4  # logical CPUs of the test cluster: room for 3 actors of 0.5 CPU plus decoding
BUCKET = "padim-test"  # on the test session's own S3 server (moto), never a real one
_RAY_STARTED_WITH = {}  # the S3 endpoint the running local Ray's workers inherited


def start_local_ray() -> None:
    """Start (or keep) the session's local Ray instance; tests that need another cluster stop it first.

    Its own temp dir keeps it out of /tmp/ray, so `ray.init(address="auto")` elsewhere on the machine
    (a user's padim-ray, a benchmark) never attaches to it, and the suite never touches theirs.
    """
    if not ray.is_initialized():
        _RAY_STARTED_WITH["endpoint"] = os.environ.get("AWS_ENDPOINT_URL")
        ray.init(
            address="local", num_cpus=LOCAL_CPUS, object_store_memory=1 << 30, include_dashboard=False,
            _temp_dir=tempfile.mkdtemp(prefix="padim-ray-tests-"),
        )


@pytest.fixture
def ray_local():
    start_local_ray()
    yield


def set_moto_auth(endpoint: str, count: str) -> None:
    """Moto's IAM mode: "0" checks every request from now on, "inf" turns checks off."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(request, timeout=10).read()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on a free local port, the AWS_* variables pointing at it, and a bucket.

    The variables stay set for the rest of the session, so Ray workers started from now on reach it
    exactly as on a cluster whose nodes have AWS_ENDPOINT_URL set (see ray_s3).
    """
    moto_server = pytest.importorskip("moto.server")
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    empty = tmp_path_factory.mktemp("aws") / "none"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)  # read by botocore: no endpoint is passed in code
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", str(empty))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        s3fs.S3FileSystem.clear_instance_cache()  # instances remember the environment they were made in
        Location(f"s3://{BUCKET}").fs.mkdir(BUCKET)
        try:
            yield endpoint
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture
def ray_s3(s3):
    """The session's local Ray, restarted if its workers were started before the S3 variables were set."""
    if ray.is_initialized() and _RAY_STARTED_WITH.get("endpoint") != s3:
        ray.shutdown()
    start_local_ray()
    yield


@pytest.fixture
def prefix(s3) -> Location:
    """A fresh prefix in the test bucket."""
    return Location(f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> Location:
    """A fresh folder: local, or a prefix on the S3 server."""
    if request.param == "local":
        (tmp_path / "root").mkdir()  # local parents must exist, as for --out
        return Location(tmp_path / "root")
    return request.getfixturevalue("prefix")


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
