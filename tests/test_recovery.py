"""A fit that survives lost stats actors: exactly once, equal to an undisturbed fit (identical embeddings)."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import ray
import torch

from padim_ray.checkpoint import Checkpoints
from padim_ray.config import ClusterConfig
from padim_ray.fit import FitLostError, accumulate, actor_name
from conftest import relative_error, start_local_ray
from test_fit import DIMS, GRID, embeddings_dataset

# the identity embedder of test_fit, slowed so that a fit lasts long enough to be interrupted
slow_identity_embedder = lambda device: lambda frames: (time.sleep(0.03), torch.as_tensor(frames, device=device))[1]  # noqa: E731

EMBEDDINGS = np.random.default_rng(11).normal(1e4, 1.0, size=(150, DIMS, *GRID))  # mean = 1e4 x std
CHECKPOINT_EACH_BATCH = dict(batch_size=5, fan_in=2, checkpoint_every=0.0, shard_bytes=7 * DIMS * DIMS * 8)


class ActorKiller(threading.Thread):
    """Kills the stats actor of the first checkpoint file that appears in `folder` (`ray.kill`)."""

    def __init__(self, folder):
        super().__init__(daemon=True)
        self.folder, self.killed = folder, None

    def run(self):
        deadline = time.monotonic() + 120
        while self.killed is None and time.monotonic() < deadline:
            for file in self.folder.glob("actor-*.npz"):
                ray.kill(ray.get_actor(actor_name(str(file))))
                self.killed = file
                break
            time.sleep(0.01)


def run_fit(cluster: ClusterConfig, checkpoint_dir=None, kill: bool = False):
    frames_for, units = embeddings_dataset(EMBEDDINGS)
    checkpoints = Checkpoints.open(checkpoint_dir, {"test": "recovery"}) if checkpoint_dir else None
    killer = ActorKiller(checkpoint_dir) if kill else None
    if killer:
        killer.start()
    accumulated = accumulate(frames_for, units, slow_identity_embedder, GRID[0] * GRID[1], DIMS, cluster, checkpoints)
    if killer:
        killer.join()
        assert killer.killed is not None, "no actor was killed: the test did not test recovery"
    assert accumulated.accounting.check(units) == accumulated.count == len(EMBEDDINGS)  # every frame once
    shards = ray.get(accumulated.roots)
    return accumulated, np.concatenate([s.mean.numpy() for s in shards]), np.concatenate([s.m2.numpy() for s in shards])


@pytest.fixture(scope="module")
def undisturbed():
    start_local_ray()
    return run_fit(ClusterConfig(actors=1, cpus_per_actor=0.5, **CHECKPOINT_EACH_BATCH))


@pytest.mark.parametrize("actors", [2, 1], ids=["a-survivor-redoes", "new-actors-redo"])
def test_killed_stats_actor_is_redone_from_its_checkpoint(ray_local, undisturbed, tmp_path, actors):
    cluster = ClusterConfig(actors=actors, cpus_per_actor=0.5, **CHECKPOINT_EACH_BATCH)
    accumulated, mean, m2 = run_fit(cluster, tmp_path / "checkpoints", kill=True)
    assert accumulated.lost_actors == 1
    _, mean_ref, m2_ref = undisturbed
    assert relative_error(mean, mean_ref) <= 1e-12
    assert relative_error(m2, m2_ref) <= 1e-12


def test_losing_more_actors_than_max_retries_fails_in_one_line(ray_local, tmp_path):
    cluster = ClusterConfig(actors=1, cpus_per_actor=0.5, max_retries=0, **CHECKPOINT_EACH_BATCH)
    with pytest.raises(FitLostError, match=r"1 stats actors were lost, more than --max-retries 0 .*rerun the same command to resume") as error:
        run_fit(cluster, tmp_path / "checkpoints", kill=True)
    assert "\n" not in str(error.value)
    assert list((tmp_path / "checkpoints").glob("actor-*.npz"))  # the lost actor's work is kept for a rerun
