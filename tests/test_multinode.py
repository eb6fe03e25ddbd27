"""The fit on a 3-node ray.cluster_utils.Cluster equals the single-actor fit."""

from __future__ import annotations

import os

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from padim_ray.config import ClusterConfig
from padim_ray.fit import fit_model
from padim_ray.stc import scene_videos
from padim_ray.store import open_model
from padim_ray.accumulate import actor_name
from helpers import (
    CHECKPOINT_EACH_BATCH, SMALL_MODEL, Disturbance, assert_statistics_split_independent, relative_error, run_fit,
)

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # a Ray cluster of its own; the session's local Ray stops meanwhile


@pytest.fixture(scope="module")
def three_nodes(small_model):
    """Head + 2 workers, 2 + 1 + 1 logical CPUs, on this machine; the local Ray is stopped meanwhile,
    after it fitted `small_model` (the single-actor reference), and later tests start it again."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 300 << 20})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=300 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    os.environ.pop("RAY_ADDRESS", None)  # set by Cluster; later tests start their own Ray


def spread_actors() -> ClusterConfig:
    """Three actors of 0.5 CPU; Ray places them over the nodes."""
    return ClusterConfig(actors=3, cpus_per_actor=0.5, batch_size=5, fan_in=2)


def test_three_node_statistics_equal_single_actor(three_nodes, actors1):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    assert_statistics_split_independent(actors1, spread_actors())


class NodeRemover(Disturbance):
    """Removes the worker node of the first stats actor that checkpoints there (the actor, its decode
    tasks and the objects on that node are lost with it)."""

    def __init__(self, cluster, folder):
        super().__init__(folder)
        self.cluster = cluster

    def act(self, file) -> bool:
        [actor] = list_actors(filters=[("name", "=", actor_name(file))])
        node = next((n for n in self.cluster.worker_nodes if n.node_id == actor.node_id), None)
        if node is not None:
            self.cluster.remove_node(node, allow_graceful=False)
        return node is not None


def test_lost_node_is_redone_exactly(three_nodes, tmp_path):
    _, mean_ref, m2_ref = run_fit(ClusterConfig(actors=1, cpus_per_actor=0.5, **CHECKPOINT_EACH_BATCH))
    cluster = ClusterConfig(actors=3, cpus_per_actor=0.5, **CHECKPOINT_EACH_BATCH)
    accumulated, mean, m2 = run_fit(cluster, tmp_path / "checkpoints", NodeRemover(three_nodes, tmp_path / "checkpoints"))
    assert accumulated.lost_actors == 1
    assert relative_error(mean, mean_ref) <= 1e-12
    assert relative_error(m2, m2_ref) <= 1e-12
    three_nodes.add_node(num_cpus=1, object_store_memory=300 << 20)  # back to three for the next test
    three_nodes.wait_for_nodes()


def test_three_node_fit_equals_local_single_actor_fit(three_nodes, small_model, stc_root, tmp_path):
    """`small_model` is SMALL_MODEL fitted on scene 01 by one actor on the local Ray (before three_nodes)."""
    videos = scene_videos(stc_root, "01")
    earlier = {actor.actor_id for actor in list_actors(filters=[("class_name", "=", "StatsActor")])}
    multi = open_model(fit_model(videos, tmp_path / "multi", SMALL_MODEL, spread_actors()).out)
    stats_actors = [a for a in list_actors(filters=[("class_name", "=", "StatsActor")]) if a.actor_id not in earlier]
    assert len({actor.node_id for actor in stats_actors}) == 3  # one actor per node
    single = open_model(small_model)
    assert multi.attrs["frames"] == single.attrs["frames"] == 60
    for name in ("mean", "covariance"):
        assert relative_error(multi.read(name), single.read(name)) <= 1e-6

