"""Shared fixtures: one local Ray instance per session, an S3 server, small synthetic STC data, a small fitted model."""

from __future__ import annotations

import logging
import os
import uuid

# Before torch loads OpenMP here or in any process started from here (Ray workers, commands): the suite
# runs two pytest workers, each with actors and decoders, on the machine's cores, and OpenMP threads that
# spin while they wait for the others took the cores from them (two Lite0 embedders with 2 threads each
# on 2 cores: 25 frames/s in all spinning, 63 passive; alone, one does 69 spinning and 43 passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import ray

from padim_ray.config import ClusterConfig
from padim_ray.files import Location
from padim_ray.synthetic import make_synthetic
from helpers import BUCKET, SMALL_CLUSTER, SMALL_DATA, SMALL_MODEL, remove_ray_temp_dirs, start_local_ray


# Test files by the time their tests took here (2 cores, both pytest workers busy), longest first. With
# `--dist loadfile --no-loadscope-reorder` a worker takes the next file in this order when it finishes one,
# so both end on short files at about the same time (ordered by test count, as xdist does by default, the
# 100 s demo came last and ran alone for a minute). Files not listed follow in collection order; only the
# order changes, every test runs.
LONGEST_FIRST = [
    "test_watch.py", "test_demo.py", "test_recovery.py", "test_readme.py", "test_unattended.py", "test_multinode.py",
    "test_calibrate.py", "test_score_recovery.py", "test_cloud.py", "test_scenes.py", "test_real_footage.py", "test_fit.py",
    "test_cli.py", "test_devices.py", "test_score.py", "test_job_submit.py", "test_decisions.py", "test_video.py",
]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Files in LONGEST_FIRST's order, then the others; each file's tests in their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


@pytest.fixture
def ray_local():
    start_local_ray()
    yield


@pytest.fixture(scope="session", autouse=True)
def _s3_server(tmp_path_factory):
    """A moto S3 server on a free local port, the AWS_* variables pointing at it, and a bucket; None without moto.

    Started before anything else (autouse), and its variables stay set for the whole session, so every
    local Ray the session starts has workers that reach it exactly as on a cluster whose nodes have
    AWS_ENDPOINT_URL set, and no Ray is restarted for a test that needs it.
    """
    try:
        from moto import server as moto_server
    except ImportError:
        yield None
        return
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


@pytest.fixture(scope="session")
def s3(_s3_server):
    """The session's S3 server's endpoint (see _s3_server); skips a test where moto is not installed."""
    if _s3_server is None:
        pytest.skip("moto is not installed (pip install -e '.[test]')")
    return _s3_server


@pytest.fixture
def ray_s3(s3):
    """The session's local Ray, whose workers reach the S3 server (its variables are set before any Ray starts: _s3_server)."""
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
