"""Shared fixtures: one local Ray instance per session, an S3 server, small synthetic STC data, a small fitted model."""

from __future__ import annotations

import logging
import uuid
from collections import Counter

import pytest
import ray

from padim_ray.config import ClusterConfig
from padim_ray.files import Location
from padim_ray.synthetic import make_synthetic
from helpers import BUCKET, SMALL_CLUSTER, SMALL_DATA, SMALL_MODEL, ray_started_with_endpoint, remove_ray_temp_dirs, start_local_ray


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Files with the most slow tests first, each file's tests in their order: with `--dist loadfile` a
    worker takes the next file when it finishes one, so both end on short files at about the same time."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable


@pytest.fixture
def ray_local():
    start_local_ray()
    yield


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
    if ray.is_initialized() and ray_started_with_endpoint() != s3:
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
    remove_ray_temp_dirs()


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


@pytest.fixture(scope="session")
def small_model(stc_root, tmp_path_factory):
    """SMALL_MODEL fitted on the synthetic scene 01 (a real distributed fit)."""
    from padim_ray.fit import fit_model
    from padim_ray.stc import scene_videos

    start_local_ray()
    out = tmp_path_factory.mktemp("models") / "small"
    fit_model(scene_videos(stc_root, "01"), out, SMALL_MODEL, SMALL_CLUSTER)
    return out
