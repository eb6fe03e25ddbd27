"""What several test modules share: the small configs (one spelling, the CLI options derived from it),
the session's local Ray, references, the CLI runner, and the fit on given embeddings that recovery
tests disturb. Fixtures live in conftest.py; test modules import from here, never from each other."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import ray
import torch
from typer.testing import CliRunner

from padim_ray.checkpoint import Checkpoints
from padim_ray.cli import app
from padim_ray.config import ClusterConfig, ModelConfig
from padim_ray.accumulate import accumulate, actor_name
from padim_ray.gaussian import finalize
from padim_ray.files import Location
from padim_ray.synthetic import SyntheticSpec
from padim_ray.video import NOT_LAST, WorkUnit
from holding import held_identity_embedder

# a small but real model: random-init ResNet18, 64x64 input -> 16x16 = 256 positions, d = 16
SMALL_MODEL = ModelConfig(backbone="resnet18", weights="none", image_size=64, dims=16)
SMALL_CLUSTER = ClusterConfig(actors=1, cpus_per_actor=0.5)  # one actor of half a CPU: room for others beside it
SMALL_DATA = SyntheticSpec(train_videos=2, train_frames=30, test_clips=1, test_frames=12, width=320, height=180)
LOCAL_CPUS = 4  # logical CPUs of the test cluster: room for 3 actors of 0.5 CPU plus decoding
BUCKET = "padim-test"  # on the test session's own S3 server (moto), never a real one
TESTS = Path(__file__).parent
BIN = Path(sys.executable).parent  # the venv's padim-ray and ray


def cluster_options(cluster: ClusterConfig) -> list[str]:
    """The CLI options that ask for `cluster`'s actors (those set)."""
    options = {"--actors": cluster.actors, "--cpus-per-actor": cluster.cpus_per_actor, "--batch-size": cluster.batch_size}
    return [word for option, value in options.items() if value is not None for word in (option, str(value))]


def model_options(model: ModelConfig) -> list[str]:
    """The CLI options of `fit` that give `model`."""
    return ["--backbone", model.backbone, "--weights", model.weights, "--image-size", str(model.image_size), "--dims", str(model.dims)]


SMALL_CLUSTER_OPTIONS = cluster_options(SMALL_CLUSTER)
# `fit` of SMALL_MODEL on SMALL_CLUSTER, uncalibrated as fit_model's default: the calibration's two passes cost ~16 s
# a fit here (test_calibrate.py tests it); a test that wants it passes --calibration F after these (the last one counts)
SMALL_FIT = [*model_options(SMALL_MODEL), *SMALL_CLUSTER_OPTIONS, "--calibration", "0"]

_RAY_TEMP_DIRS: list[str] = []  # the temp dirs of the local Rays this session started (logs, sockets)


def start_local_ray() -> None:
    """Start (or keep) the session's local Ray instance; tests that need another cluster stop it first.

    Its own temp dir keeps it out of /tmp/ray, so `ray.init(address="auto")` elsewhere on the machine
    (a user's padim-ray, a benchmark) never attaches to it, and the suite never touches theirs.
    """
    if not ray.is_initialized():
        _RAY_TEMP_DIRS.append(tempfile.mkdtemp(prefix="padim-ray-tests-"))
        ray.init(
            address="local", num_cpus=LOCAL_CPUS, object_store_memory=1 << 30, include_dashboard=False, _temp_dir=_RAY_TEMP_DIRS[-1],
        )


def remove_ray_temp_dirs() -> None:
    """Remove the temp dirs of the local Rays this session started, once they are shut down (3 MB to 400 MB each)."""
    while _RAY_TEMP_DIRS:
        shutil.rmtree(_RAY_TEMP_DIRS.pop(), ignore_errors=True)


def set_moto_auth(endpoint: str, count: str) -> None:
    """Moto's IAM mode: "0" checks every request from now on, "inf" turns checks off."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(request, timeout=10).read()


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


# --- the command line, in this process ---

def run(*args):
    """`padim-ray ARGS` in this process (typer's CliRunner); paths may be Path or Location."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_failure(result, *fragments: str, out: Path | None = None) -> None:
    """Exit 1, the last stderr line is `error: ...` naming every fragment, no traceback, no store.

    Lines echoed from Ray workers (prefixed "(Name pid=N)") are Ray's logs, not this process's output.
    """
    assert result.exit_code == 1, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in last
    own_lines = [line for line in (result.output + result.stderr).splitlines() if "pid=" not in line]
    assert not [line for line in own_lines if "Traceback" in line]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# --- the fit's statistics on given embeddings (no backbone): split independence and recovery ---

GRID, DIMS = (5, 6), 8
EMBEDDINGS = np.random.default_rng(11).normal(1e4, 1.0, size=(150, DIMS, *GRID))  # mean = 1e4 x std
CHECKPOINT_EACH_BATCH = dict(batch_size=5, fan_in=2, checkpoint_every=0.0, shard_bytes=7 * DIMS * DIMS * 8)

# feeds the dataset's `frame` column (already embeddings) to the statistics unchanged; a lambda so
# that Ray pickles it by value (workers cannot import the tests)
identity_embedder = lambda device: lambda frames: torch.as_tensor(frames, device=device)  # noqa: E731


def embeddings_dataset(embeddings: np.ndarray, rows_per_unit: int = 10):
    """A source like the decoder's output whose `frame` column holds embeddings.

    Returns (frames_for, units) for accumulate: frames_for(todo) streams the rows of the units in
    `todo` less the frame indices listed there.
    """
    n = len(embeddings)
    unit = np.arange(n) // rows_per_unit
    index = np.arange(n) % rows_per_unit
    total = np.full(n, NOT_LAST)
    last = np.r_[unit[1:] != unit[:-1], True]
    total[last] = np.bincount(unit)
    rows = [{"frame": embeddings[i], "unit": unit[i], "index": index[i], "unit_total": total[i]} for i in range(n)]

    def frames_for(todo: dict, credits) -> ray.data.Dataset:  # rows already in memory: nothing to hold back
        wanted = [r for r in rows if int(r["unit"]) in todo and int(r["index"]) not in set(todo[int(r["unit"])].tolist())]
        return ray.data.from_items(wanted, override_num_blocks=min(12, len(wanted)))

    return frames_for, [WorkUnit(uid, f"unit{uid}") for uid in range(int(unit.max()) + 1)]


def distributed_statistics(embeddings: np.ndarray, cluster: ClusterConfig):
    """Run the real actor + tree-reduction path on given embeddings; returns (mean, m2, shards)."""
    frames_for, units = embeddings_dataset(embeddings)
    positions = GRID[0] * GRID[1]
    accumulated = accumulate(frames_for, units, identity_embedder, positions, DIMS, cluster)
    assert accumulated.accounting.check(units) == accumulated.count == len(embeddings)
    shards = ray.get(accumulated.roots)
    assert [s.positions for s in shards] == [stop - start for start, stop in accumulated.bounds]
    mean = np.concatenate([s.mean.numpy() for s in shards])
    m2 = np.concatenate([s.m2.numpy() for s in shards])
    return mean, m2, shards


def assert_statistics_split_independent(cluster_a: ClusterConfig, cluster_b: ClusterConfig) -> None:
    """The statistics of the same embeddings on two cluster configs: equal, and equal to the two-pass reference."""
    rng = np.random.default_rng(7)
    embeddings = rng.normal(1e4, 1.0, size=(203, DIMS, *GRID))  # mean = 1e4 x std
    shard_bytes = 7 * DIMS * DIMS * 8  # 7 positions per shard: several shards, one partial
    mean_a, m2_a, shards = distributed_statistics(embeddings, dataclasses.replace(cluster_a, shard_bytes=shard_bytes))
    mean_b, m2_b, _ = distributed_statistics(embeddings, dataclasses.replace(cluster_b, shard_bytes=shard_bytes))
    assert len(shards) == 5
    assert relative_error(mean_a, mean_b) <= 1e-12
    assert relative_error(m2_a, m2_b) <= 1e-12
    ref_mean, ref_cov = reference_gaussians(embeddings)
    covariance = np.concatenate([finalize(s, 0.01).covariance.numpy() for s in shards])
    assert relative_error(mean_a, ref_mean) <= 1e-9
    assert relative_error(covariance, ref_cov) <= 1e-9


class Disturbance(threading.Thread):
    """Acts once on a fit whose stats actors are held after their first checkpoint (holding.py), on the
    first checkpoint file in `folder` (a local folder or a bucket prefix) that `act` accepts, then
    releases the actors. The fit cannot end before it has acted."""

    def __init__(self, folder):
        super().__init__(daemon=True)
        self.checkpoints, self.done = Checkpoints(Location(folder)), None
        self.release = Path(tempfile.gettempdir()) / f"padim-release-{uuid.uuid4().hex[:12]}"  # run_fit removes it

    def act(self, file: Location) -> bool:
        raise NotImplementedError

    def run(self):
        deadline = time.monotonic() + 120
        try:
            while self.done is None and time.monotonic() < deadline:
                self.done = next((file for file in self.checkpoints.files() if self.act(file)), None)
                time.sleep(0.01 if not self.checkpoints.path.is_remote else 0.05)
        finally:
            self.release.touch()  # also when it never acted: the fit ends and the test fails on `done`


class ActorKiller(Disturbance):
    """Kills the stats actor of the first checkpoint (`ray.kill`)."""

    def act(self, file: Location) -> bool:
        ray.kill(ray.get_actor(actor_name(file)))
        return True


def run_fit(cluster: ClusterConfig, checkpoint_dir=None, disturbance: Disturbance | None = None):
    """accumulate() over EMBEDDINGS; with a `disturbance`, the actors are held until it has acted."""
    frames_for, units = embeddings_dataset(EMBEDDINGS)
    checkpoints = Checkpoints.open(checkpoint_dir, {"test": "recovery"}) if checkpoint_dir else None
    embedder = held_identity_embedder(disturbance.release) if disturbance else identity_embedder
    if disturbance:
        disturbance.start()
    try:
        accumulated = accumulate(frames_for, units, embedder, GRID[0] * GRID[1], DIMS, cluster, checkpoints)
    finally:
        if checkpoints:
            checkpoints.lease.release()  # the files stay for the test to inspect; the lease (a bucket's heartbeat thread) goes
        if disturbance:
            disturbance.join()
            disturbance.release.unlink(missing_ok=True)
    if disturbance:
        assert disturbance.done is not None, f"{type(disturbance).__name__} never acted: the test did not test recovery"
    assert accumulated.accounting.check(units) == accumulated.count == len(EMBEDDINGS)  # every frame once
    shards = ray.get(accumulated.roots)
    return accumulated, np.concatenate([s.mean.numpy() for s in shards]), np.concatenate([s.m2.numpy() for s in shards])
