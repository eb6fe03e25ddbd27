"""Every command on object storage: the same STC scene and commands from and to a real S3 protocol
server (moto on 127.0.0.1) give what they give on local paths, and storage failures are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from padim_ray.files import Location
from padim_ray.store import open_model
from padim_ray.map_store import open_maps, read_scores
from helpers import BUCKET, SMALL_CLUSTER_OPTIONS, SMALL_FIT, assert_clean_failure, relative_error, run, set_moto_auth

SMALL_SCORE = [*SMALL_CLUSTER_OPTIONS, "--batch-size", "5", "--map-dtype", "float32"]


@pytest.fixture(scope="module")
def bucket_root(stc_root, s3) -> Location:
    """The synthetic STC scene uploaded to the bucket."""
    root = Location(f"s3://{BUCKET}/datasets/stc")
    root.fs.put(str(stc_root), root.path, recursive=True)
    assert (root / "training" / "videos" / "01_001.avi").is_file()
    return root


def assert_models_equal(actual: Location, expected, tolerance: float = 1e-9) -> None:
    a, b = open_model(actual), open_model(expected)
    assert a.attrs["frames"] == b.attrs["frames"]
    for name in ("mean", "m2", "covariance"):
        assert relative_error(a.read(name), b.read(name)) <= tolerance, name


def only_objects(prefix: Location) -> list[str]:
    """Top-level names under a prefix (an empty prefix does not exist on S3)."""
    return [p.name for p in prefix.iterdir()] if prefix.exists() else []


@pytest.mark.slow
def test_fit_score_evaluate_from_and_to_the_bucket_equal_local(ray_s3, bucket_root, small_model, stc_root, prefix, tmp_path):
    model = prefix / "models" / "stc_01"
    result = run("fit", "stc", "--scene", "01", "--root", bucket_root, "--out", model, "--checkpoint-every", "0", *SMALL_FIT)
    assert result.exit_code == 0, result.output
    assert f"model: {model} (60 frames" in result.stdout
    assert_models_equal(model, small_model)
    assert only_objects(prefix / "models") == ["stc_01"]  # checkpoints (saved at every batch) removed
    assert open_model(model).attrs["sources"][0]["path"] == (bucket_root / "training" / "videos" / "01_001.avi").uri

    maps, local_maps = prefix / "maps", tmp_path / "maps"
    clip = "testing/frames/01_0001"
    assert run("score", model, bucket_root / clip, "--out", maps, *SMALL_SCORE).exit_code == 0
    assert run("score", small_model, stc_root / clip, "--out", local_maps, *SMALL_SCORE).exit_code == 0
    remote, local = open_maps(maps)["01_0001"][:], open_maps(local_maps)["01_0001"][:]
    assert remote.shape == local.shape == (12, 180, 320)
    assert relative_error(remote, local) <= 1e-5  # models equal to 1e-9, maps in float32
    assert read_scores(maps)["frame"].tolist() == list(range(12))

    report = prefix / "evaluation"
    result = run("evaluate", "stc", "--scene", "01", "--root", bucket_root, "--maps", maps, "--out", report)
    assert result.exit_code == 0, result.output
    assert f"report: {report / 'metrics.json'}" in result.stdout
    assert run("evaluate", "stc", "--scene", "01", "--root", stc_root, "--maps", local_maps, "--out", tmp_path / "eval").exit_code == 0
    [remote_report] = json.loads((report / "metrics.json").read_bytes())
    [local_report] = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("pixel_auroc", "frame_auroc", "pro"):
        assert remote_report["pooled"][key] == pytest.approx(local_report["pooled"][key], abs=1e-6), key
    assert sorted(only_objects(report / "scene_01")) == ["metrics.json", "roc.png", "scores.png"]

    video = tmp_path / "clip.mp4"
    result = run("render", maps, bucket_root / clip, "--out", video)
    assert result.exit_code == 0, result.output
    assert video.stat().st_size > 0


@pytest.mark.slow
def test_update_a_model_in_the_bucket(ray_s3, bucket_root, small_model, prefix):
    videos = bucket_root / "training" / "videos"
    first, updated = prefix / "first", prefix / "updated"
    assert run("fit", "videos", videos / "01_001.avi", "--out", first, *SMALL_FIT).exit_code == 0
    refused = run("update", first, videos / "01_002.avi", *SMALL_CLUSTER_OPTIONS)
    assert_clean_failure(refused, first.uri, "--out")
    result = run("update", first, videos / "01_002.avi", "--out", updated, *SMALL_CLUSTER_OPTIONS)
    assert result.exit_code == 0, result.output
    assert_models_equal(updated, small_model)
    assert open_model(first).attrs["frames"] == 30  # the base model is left as it was


def test_storage_failures_are_one_line(ray_s3, bucket_root, small_model, prefix, s3):
    missing_bucket = "s3://padim-no-such-bucket/stc"
    assert_clean_failure(run("fit", "stc", "--scene", "01", "--root", missing_bucket, "--out", prefix / "m", *SMALL_FIT), missing_bucket)
    missing_model = prefix / "no-model"
    clip = bucket_root / "testing" / "frames" / "01_0001"
    assert_clean_failure(run("score", missing_model, clip, "--out", prefix / "maps"), missing_model.uri, "not found")
    missing_video = bucket_root / "training" / "videos" / "01_999.avi"
    assert_clean_failure(run("fit", "videos", missing_video, "--out", prefix / "m", *SMALL_FIT), missing_video.uri, "does not exist")
    set_moto_auth(s3, "0")  # from now on, the test keys are refused
    try:
        result = run("fit", "stc", "--scene", "01", "--root", bucket_root, "--out", prefix / "m", *SMALL_FIT)
    finally:
        set_moto_auth(s3, "inf")
    assert_clean_failure(result, bucket_root.uri, "access denied")
    assert only_objects(prefix) == []  # no partial output anywhere


def test_checkpoints_on_the_bucket_save_claim_and_read_back(ray_s3, prefix):
    import ray
    import torch

    from padim_ray.accounting import Accounting
    from padim_ray.checkpoint import Checkpoints, checkpoint_shards, lost_marker, save_checkpoint
    from padim_ray.gaussian import StatsAccumulator

    checkpoints = Checkpoints.open(prefix / "ckpt", {"fit": 1})
    with pytest.raises(Exception, match="belongs to a fit with other fit"):
        Checkpoints.open(prefix / "ckpt", {"fit": 2})
    accumulator = StatsAccumulator(positions=6, dims=3).update(torch.randn(5, 3, 2, 3))
    accounting = Accounting()
    accounting.add_batch(np.zeros(5, np.int64), np.arange(5), np.full(5, -1))
    file = checkpoints.new_file()
    save_checkpoint(file, accumulator, accounting)
    save_checkpoint(file, accumulator, accounting)  # replaced, not duplicated
    assert checkpoints.files() == [file]
    claimed = checkpoints.claim(file)
    assert lost_marker(file).exists() and checkpoints.files() == [claimed]
    held, *shards = ray.get(checkpoint_shards.options(num_returns=3).remote(claimed, [(0, 4), (4, 6)]))
    assert held.count == 5
    expected = accumulator.stats()
    np.testing.assert_allclose(np.concatenate([s.mean.numpy() for s in shards]), expected.mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.concatenate([s.m2.numpy() for s in shards]), expected.m2.numpy(), rtol=1e-12)
    checkpoints.remove()
    assert not (prefix / "ckpt").exists()


@pytest.mark.slow
def test_a_killed_stats_actor_is_redone_from_its_checkpoint_on_the_bucket(ray_s3, prefix):
    from padim_ray.config import ClusterConfig
    from helpers import CHECKPOINT_EACH_BATCH, EMBEDDINGS, ActorKiller, run_fit

    cluster = ClusterConfig(actors=2, cpus_per_actor=0.5, **CHECKPOINT_EACH_BATCH)
    accumulated, mean, m2 = run_fit(cluster, prefix / "checkpoints", ActorKiller(prefix / "checkpoints"))  # claims the file: copy + delete on S3
    assert accumulated.lost_actors == 1
    x = EMBEDDINGS.reshape(len(EMBEDDINGS), EMBEDDINGS.shape[1], -1).transpose(2, 0, 1)  # (P, N, d) float64
    deviations = x - x.mean(axis=1, keepdims=True)
    assert relative_error(mean, x.mean(axis=1)) <= 1e-12
    assert relative_error(m2, np.einsum("pni,pnj->pij", deviations, deviations)) <= 1e-10
