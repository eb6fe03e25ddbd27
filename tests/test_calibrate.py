"""Calibration: removing a slice's statistics exactly (Chan's merge run backwards), scoring footage with the
model without it, and the record `fit --calibration` and `padim-ray calibrate` store in the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from padim_ray.calibrate import calibration_slice, check_fraction, seen_units
from padim_ray.config import ClusterConfig, ConfigError
from padim_ray.embedding import Embedder
from padim_ray.files import Location
from padim_ray.fit import fit_model
from padim_ray.frame_scores import statistics_of, stored_statistics, without
from padim_ray.gaussian import GaussianStats, finalize, merge_stats, remove_stats
from padim_ray.leases import Lease
from padim_ray.score import score_inputs
from padim_ray.stc import scene_videos
from padim_ray.store import open_model
from padim_ray.map_store import read_scores
from padim_ray.video import WorkUnit, iter_unit_frames, make_units
from helpers import (
    SMALL_CLUSTER, SMALL_CLUSTER_OPTIONS, SMALL_FIT, SMALL_MODEL, assert_clean_failure, cluster_options, reference_gaussians, relative_error, run,
    start_local_ray,
)


def _embeddings(seed: int, n: int, loc: float) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, 1.0, size=(n, 5, 3, 4))  # (N, d, h, w)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(2, 60), st.integers(1, 60), st.sampled_from([0.0, 3.0, 1e4]))
def test_removal_equals_the_statistics_of_the_rest(seed, kept, removed, loc):
    """Removing a part's statistics leaves those of the other embeddings, and merging the part back gives the total."""
    x = _embeddings(seed, kept + removed, loc)
    order = np.random.default_rng(seed + 1).permutation(len(x))  # the part is any subset, not a tail
    rest, part = x[order[:kept]], x[order[kept:]]
    total = GaussianStats.from_embeddings(torch.from_numpy(x))
    left = remove_stats(total, GaussianStats.from_embeddings(torch.from_numpy(part)))
    direct = GaussianStats.from_embeddings(torch.from_numpy(rest))
    assert left.count == kept and left.mean.dtype == left.m2.dtype == torch.float64
    scale = np.abs(direct.mean.numpy()).max()
    assert np.abs(left.mean.numpy() - direct.mean.numpy()).max() <= 1e-12 * scale
    # M2's rounding is relative to the total's M2 (the cancellation), and a tiny rest has a tiny M2
    assert np.abs(left.m2.numpy() - direct.m2.numpy()).max() <= 1e-9 * np.abs(total.m2.numpy()).max()
    if kept >= 2:
        mean, covariance = reference_gaussians(rest)
        assert relative_error(finalize(left, 0.01).covariance.numpy(), covariance) <= 1e-9
    back = merge_stats(left, GaussianStats.from_embeddings(torch.from_numpy(part)))
    assert relative_error(back.m2.numpy(), total.m2.numpy()) <= 1e-12


def test_removal_needs_a_smaller_part_of_the_same_shape():
    total = GaussianStats.from_embeddings(torch.from_numpy(_embeddings(0, 10, 0.0)))
    assert remove_stats(total, GaussianStats.empty(12, 5)) is total
    with pytest.raises(ValueError, match="nothing would be left"):
        remove_stats(total, total)
    with pytest.raises(ValueError, match="cannot remove statistics of shape"):
        remove_stats(total, GaussianStats.empty(12, 4))


# --- the slice rule (no Ray) ---

def test_the_slice_is_whole_units_when_there_are_enough_else_the_end_of_each_input():
    videos = [WorkUnit(i, f"/v/{i:02d}.avi", frames=100, fps=25.0) for i in range(40)]
    picked = calibration_slice(videos, {u.uid: 100 for u in videos}, 0.05)  # round(2.0) = 2 whole units, spread
    assert [(u.uid, u.path, u.start, u.stop) for u in picked] == [(0, "/v/10.avi", 0, None), (1, "/v/30.avi", 0, None)]
    assert calibration_slice(videos, {u.uid: 100 for u in videos}, 0.0) == []
    folder = [WorkUnit(40 + i, "/f", start, min(start + 256, 600), min(256, 600 - start)) for i, start in enumerate((0, 256, 512))]
    units = videos[:2] + folder
    totals = {0: 100, 1: 98, 40: 256, 41: 256, 42: 88}  # video 1 decoded to fewer frames than its header said
    ends = calibration_slice(units, totals, 0.05)
    assert [(u.uid, u.path, u.start, u.stop) for u in ends] == [(0, "/v/00.avi", 95, None), (1, "/v/01.avi", 93, None), (2, "/f", 570, 600)]
    strided = calibration_slice(units[:1], {0: 34}, 0.1, stride=3)  # frames 0, 3, ..., 99: the last 3 fitted are 93, 96, 99
    assert [(u.start, u.stop) for u in strided] == [(93, None)]
    gap = calibration_slice(folder[:1] + folder[2:], {40: 256, 42: 88}, 0.4)  # the middle unit was left out (undecodable)
    assert [(u.start, u.stop) for u in gap] == [(512, 600)]  # not across the gap: only frames the fit holds


def test_fractions_out_of_range_are_refused():
    for bad in (-0.1, 0.5, float("nan")):
        with pytest.raises(ConfigError, match="--calibration must be at least 0"):
            check_fraction(bad)
    assert check_fraction(0) == 0.0 and check_fraction(0.05) == 0.05


def test_video_units_decode_from_start_to_stop(stc_root):
    video = str(scene_videos(stc_root, "01")[0])
    every = dict(iter_unit_frames(WorkUnit(0, video), size=64))
    for start, stop, stride in ((24, None, 1), (5, 9, 1), (7, None, 4)):
        part = list(iter_unit_frames(WorkUnit(0, video, start, stop), stride, size=64))
        assert [i for i, _ in part] == [i for i in range(30)[start:stop] if i % stride == 0]
        assert all(np.array_equal(frame, every[i]) for i, frame in part)


# --- on real videos, real Ray, real zarr ---
# Folders of PNG frames decoded from scene 01's two training videos: `head0`, `head1` (their first 24
# frames) and `tail0`, `tail1` (their last 6). The cluster embeds one frame per batch, so a frame's
# embedding is the same bits in every run (a batch's composition can change a convolution's last bits)
# and statistics of the same frames differ only by float64 rounding.
CLUSTER = ClusterConfig(actors=1, cpus_per_actor=0.5, batch_size=1)


def _write_frames(folder: Path, frames: list[np.ndarray]) -> Path:
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def footage(stc_root, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("footage")
    folders = {}
    for i, video in enumerate(scene_videos(stc_root, "01")):
        frames = [frame for _, frame in iter_unit_frames(WorkUnit(0, str(video)))]
        folders[f"head{i}"], folders[f"tail{i}"] = _write_frames(root / f"head{i}", frames[:24]), _write_frames(root / f"tail{i}", frames[24:])
    return folders


@pytest.fixture(scope="module")
def models(footage, tmp_path_factory) -> dict[str, Path]:
    """`all`: fitted on head0, tail0, head1, tail1 with --calibration 0.45, which sets aside round(0.45 * 4) = 2
    whole units spread evenly (units 1 and 3: the tails); `heads`: fitted on the heads alone."""
    start_local_ray()
    root = tmp_path_factory.mktemp("calibrated")
    fit_model([footage[name] for name in ("head0", "tail0", "head1", "tail1")], root / "all", SMALL_MODEL, CLUSTER, calibration=0.45)
    fit_model([footage["head0"], footage["head1"]], root / "heads", SMALL_MODEL, CLUSTER)
    return {"all": root / "all", "heads": root / "heads"}


@pytest.fixture(scope="module")
def tail_scores(models, footage, tmp_path_factory) -> list[np.ndarray]:
    """The tails' frame scores as `score_inputs` writes them, with the model fitted without them."""
    out = tmp_path_factory.mktemp("maps") / "tails"
    result = score_inputs(models["heads"], [footage["tail0"], footage["tail1"]], out, cluster=CLUSTER)
    table = read_scores(out)
    return [table[table["input"] == input_id]["score"].to_numpy() for input_id in result.frames]


@pytest.mark.slow  # the module's fits and passes: ~80 s here for the first, ~10-20 s each after
def test_removal_equals_a_fit_without_the_removed_frames(models, footage):
    """Acceptance: the model fitted on heads and tails with the tails' statistics removed is the model fitted on the heads."""
    store = open_model(models["all"])
    embedder = Embedder(store.attributes.model_config)
    tails = seen_units(make_units([footage["tail0"], footage["tail1"]])[0], store)
    part, accounting = statistics_of(tails, SMALL_MODEL, embedder, CLUSTER)
    assert len(tails) == 2 and accounting.count == 12
    left = ray.get(without(stored_statistics(store.path, embedder, CLUSTER), part))
    direct = open_model(models["heads"])
    assert [s.count for s in left] == [48] * len(left) and direct.attributes.frames == 48
    mean, m2 = (np.concatenate([getattr(s, name).numpy() for s in left]) for name in ("mean", "m2"))
    covariance = np.concatenate([finalize(s, SMALL_MODEL.eps).covariance.numpy() for s in left])
    errors = {name: relative_error(ours, direct.read(name)) for name, ours in (("mean", mean), ("m2", m2), ("covariance", covariance))}
    print(f"removal vs direct fit, max |difference| / max |value|: {errors}")
    assert max(errors.values()) <= 1e-9, errors


@pytest.mark.slow
def test_fit_records_the_scores_of_its_slice_by_the_model_without_it(models, footage, tail_scores):
    model = open_model(models["all"])
    calibration = model.attributes.calibration
    assert model.attributes.frames == 60  # the model itself holds every frame
    assert calibration["inputs"] == [{"path": Location(footage[t]).uri, "start": 0, "stop": 6, "frames": 6, "fps": 24.0} for t in ("tail0", "tail1")]
    assert calibration["frames"] == 12 and calibration["seconds"] == 0.5 and calibration["fps"] == 24.0
    assert calibration["held_out"] is True and calibration["score"] == "max" and len(calibration["quantiles"]) == 101
    for recorded, scored in zip(calibration["sequences"], tail_scores, strict=True):
        np.testing.assert_allclose(recorded, scored, rtol=1e-4)
    recorded = np.concatenate(calibration["sequences"])
    assert calibration["quantiles"][0] == recorded.min() and calibration["quantiles"][100] == recorded.max()
    assert calibration["quantiles"][50] == np.median(recorded)


@pytest.mark.slow
def test_fit_videos_calibrates_on_the_end_of_each_video(ray_local, stc_root, tmp_path):
    """Two inputs are too few for whole units: the fit holds out the last round(0.1 * 30) = 3 frames of each video."""
    videos = scene_videos(stc_root, "01")
    result = run("fit", "videos", *videos, "--out", tmp_path / "m", *SMALL_FIT, "--calibration", "0.1")
    assert result.exit_code == 0, result.output
    assert "calibration: 6 frames (0.2 s of footage in 2 part(s), held out of the fit)" in result.output
    model = open_model(tmp_path / "m").attributes
    assert model.frames == 60 and model.calibration["held_out"] is True
    assert [(e["path"], e["start"], e["stop"], e["frames"]) for e in model.calibration["inputs"]] == [(v.uri, 27, None, 3) for v in videos]
    assert [len(s) for s in model.calibration["sequences"]] == [3, 3] and min(min(s) for s in model.calibration["sequences"]) > 0


def _array_bytes(model: Path) -> dict[str, bytes]:
    """Every file of a model store but its root metadata (the attributes)."""
    return {str(p.relative_to(model)): p.read_bytes() for p in sorted(model.rglob("*")) if p.is_file() and p != model / "zarr.json"}


@pytest.mark.slow
def test_calibrate_holds_out_inputs_the_model_was_fitted_on(models, footage, tail_scores, tmp_path):
    model = Path(shutil.copytree(models["all"], tmp_path / "model"))
    record = open_model(model).attrs
    record["calibration"] = None
    (model / "zarr.json").write_text(json.dumps({**json.loads((model / "zarr.json").read_text()), "attributes": record}))  # uncalibrated
    arrays = _array_bytes(model)
    result = run("calibrate", model, footage["tail0"], footage["tail1"], *cluster_options(CLUSTER))
    assert result.exit_code == 0, result.output
    assert "calibration: 12 frames (0.5 s of footage in 2 part(s), held out of the fit)" in result.output
    calibration = open_model(model).attributes.calibration
    assert calibration["held_out"] is True and calibration["frames"] == 12
    assert calibration["inputs"] == [{"path": Location(footage[t]).uri, "start": 0, "stop": 6, "frames": 6, "fps": 24.0} for t in ("tail0", "tail1")]
    for recorded, scored in zip(calibration["sequences"], tail_scores, strict=True):  # scored by the model fitted on the heads
        np.testing.assert_allclose(recorded, scored, rtol=1e-4)
    assert _array_bytes(model) == arrays


@pytest.mark.slow
def test_calibrate_on_unseen_footage_scores_with_the_model_as_it_is(small_model, stc_root, tmp_path):
    model = Path(shutil.copytree(small_model, tmp_path / "model"))
    assert open_model(model).attributes.calibration is None  # fitted without --calibration
    arrays = _array_bytes(model)
    clip = stc_root / "testing" / "frames" / "01_0001"
    result = run("calibrate", model, clip, *SMALL_CLUSTER_OPTIONS)
    assert result.exit_code == 0, result.output
    calibration = open_model(model).attributes.calibration
    assert calibration["held_out"] is False and calibration["frames"] == 12
    score_inputs(small_model, [clip], tmp_path / "maps", cluster=SMALL_CLUSTER)
    expected = read_scores(tmp_path / "maps")["score"].to_numpy()
    np.testing.assert_allclose(calibration["sequences"][0], expected, rtol=1e-4)
    assert _array_bytes(model) == arrays


def test_calibrate_errors_are_one_line(small_model, stc_root, tmp_path):
    assert_clean_failure(run("calibrate", tmp_path / "none", stc_root), "not found")
    model = Path(shutil.copytree(small_model, tmp_path / "model"))
    assert_clean_failure(run("calibrate", model, *scene_videos(stc_root, "01"), *SMALL_CLUSTER_OPTIONS), "too few would be left")
    assert_clean_failure(run("calibrate", model, tmp_path / "missing.avi"), "does not exist")
    lease = Lease(Location(model), "--out")  # e.g. an update replacing the model
    try:
        assert_clean_failure(run("calibrate", model, stc_root / "testing" / "frames" / "01_0001"), f"model {model} is being written by")
    finally:
        lease.release()
    for bad in ("-0.1", "0.5"):
        result = run("fit", "videos", stc_root / "training" / "videos", "--out", tmp_path / "m", *SMALL_FIT, "--calibration", bad)
        assert_clean_failure(result, "--calibration must be at least 0", out=tmp_path / "m")
    assert open_model(model).attributes.calibration is None
