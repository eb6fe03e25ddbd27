"""The distributed fit on a real local Ray cluster: exactness, split independence, frame accounting."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import ray
import torch

from padim_ray.config import ClusterConfig
from padim_ray.embedding import Embedder
from padim_ray.accounting import Accounting, FrameAccountingError
from padim_ray.fit import fit_model
from padim_ray.runtime import ClusterError, plan_actors
from padim_ray.stc import scene_videos
from padim_ray.store import open_model
from padim_ray.video import NOT_LAST, WorkUnit, iter_unit_frames
from helpers import SMALL_MODEL, assert_statistics_split_independent, reference_gaussians, relative_error



@pytest.mark.slow
def test_statistics_do_not_depend_on_the_split(ray_local, actors1, actors3):
    assert_statistics_split_independent(actors1, actors3)


def _direct_embeddings(videos, model) -> np.ndarray:
    """Embeddings of every frame, decoded as the pipeline does, embedded in this process one frame at a time."""
    embedder = Embedder(model)
    frames = [frame for i, path in enumerate(videos) for _, frame in iter_unit_frames(WorkUnit(i, str(path)), size=model.image_size)]
    return torch.cat([embedder(frame[None]) for frame in frames]).numpy()


@pytest.mark.slow
def test_fit_end_to_end_matches_reference_and_actor_count(ray_local, small_model, stc_root, tmp_path, actors3):
    """Three actors equal one (`small_model`: SMALL_MODEL on scene 01 with one actor), and both the reference."""
    videos = scene_videos(stc_root, "01")
    three = fit_model(videos, tmp_path / "three", SMALL_MODEL, actors3)
    a, b = open_model(small_model), open_model(three.out)
    assert three.frames == a.attrs["frames"] == b.attrs["frames"] == 60
    assert [s["frames"] for s in a.attrs["sources"]] == [30, 30]
    for name in ("mean", "covariance"):
        assert relative_error(b.read(name), a.read(name)) <= 1e-6
    ref_mean, ref_cov = reference_gaussians(_direct_embeddings(videos, SMALL_MODEL))
    assert relative_error(a.read("mean"), ref_mean) <= 1e-5
    assert relative_error(a.read("covariance"), ref_cov) <= 1e-5
    precision = a.read("precision").astype(np.float64)
    assert relative_error(a.read("covariance") @ precision, np.broadcast_to(np.eye(16), precision.shape)) <= 1e-4
    assert a.attrs["channel_indices"] == b.attrs["channel_indices"] and len(a.attrs["channel_indices"]) == 16
    assert a.attrs["grid"] == [16, 16] and a.attrs["weights_identity"] == "random-init(seed=1024)"


def test_frame_stride_keeps_every_nth_frame(ray_local, stc_root, tmp_path, actors1):
    model = dataclasses.replace(SMALL_MODEL, frame_stride=4)
    result = fit_model(scene_videos(stc_root, "01"), tmp_path / "m", model, actors1)
    assert result.frames == 2 * 8  # frames 0, 4, ..., 28 of each 30-frame video


def _accounting(used: dict[int, list[int]], totals: dict[int, int]) -> Accounting:
    accounting = Accounting()
    for uid, indices in used.items():
        last = np.full(len(indices), NOT_LAST)
        if uid in totals:
            last[-1] = totals[uid]
        accounting.add_batch(np.full(len(indices), uid), np.array(indices), last)
    return accounting


def test_accounting_catches_missing_extra_and_twice_used_frames():
    units = [WorkUnit(0, "a.avi"), WorkUnit(1, "b.avi")]
    assert _accounting({0: [0, 1, 2], 1: [0, 1]}, {0: 3, 1: 2}).check(units) == 5
    with pytest.raises(FrameAccountingError, match="b.avi was never fully decoded"):
        _accounting({0: [0, 1, 2], 1: [0, 1]}, {0: 3}).check(units)
    with pytest.raises(FrameAccountingError, match="b.avi: decoded 2 frames but used 1"):
        _accounting({0: [0, 1, 2], 1: [1]}, {0: 3, 1: 2}).check(units)
    with pytest.raises(FrameAccountingError, match=r"b.avi: decoded 2 frames but used 2 \(1 twice\)"):
        _accounting({0: [0, 1, 2], 1: [1, 1]}, {0: 3, 1: 2}).check(units)
    with pytest.raises(FrameAccountingError, match=r"frames \[1\] of work unit 1 were used twice"):
        _accounting({1: [0, 1]}, {}).merge(_accounting({1: [1]}, {1: 2}))
    partial = _accounting({0: [0, 2], 1: [0]}, {0: 3})  # frame 1 of a.avi and b.avi's end are missing
    assert {uid: used.tolist() for uid, used in partial.unfinished(units).items()} == {0: [0, 2], 1: [0]}
    restored = Accounting.from_arrays(partial.to_arrays())
    assert restored.totals == partial.totals and restored.count == 3 and restored.indices(0).tolist() == [0, 2]


def test_actors_that_would_starve_decoding_are_refused(ray_local):
    with pytest.raises(ClusterError, match="fewer than 1 of the cluster's 4 CPUs for decoding"):
        plan_actors(ClusterConfig(actors=4, cpus_per_actor=1.0))
    with pytest.raises(ClusterError, match="the cluster has 0 GPUs after waiting 1 s for the autoscaler"):
        plan_actors(ClusterConfig(actors=1, gpus_per_actor=1.0, gpu_wait=1.0))
    plan = plan_actors(ClusterConfig())  # CPU cluster: one actor per node, torch on all its cores
    assert [(spec.num_cpus, spec.num_gpus, spec.threads) for spec in plan] == [(3.0, 0.0, 4)]
    assert plan[0].node_id == ray.get_runtime_context().get_node_id()
