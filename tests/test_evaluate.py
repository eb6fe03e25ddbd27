"""Evaluation of scored STC clips, the `evaluate`/`score`/`render` commands, and their bad inputs."""

from __future__ import annotations

import json
import shutil

import av
import numpy as np
import pytest
import zarr
from PIL import Image

from padim_ray.config import FORMAT_VERSION
from padim_ray.evaluate import resize_masks
from helpers import SMALL_CLUSTER_OPTIONS, assert_clean_failure, run

SMALL_SCORE = [*SMALL_CLUSTER_OPTIONS, "--batch-size", "5"]


@pytest.fixture(scope="module")
def scored(small_model, stc_root, tmp_path_factory):
    """The synthetic scene's test clip scored through the CLI."""
    from helpers import start_local_ray

    start_local_ray()
    out = tmp_path_factory.mktemp("scored") / "maps"
    clip = stc_root / "testing" / "frames" / "01_0001"
    result = run("score", small_model, clip, "--out", out, "--map-dtype", "float32", *SMALL_SCORE)
    assert result.exit_code == 0, result.output
    assert f"maps: {out} (12 frames of 1 inputs" in result.stdout
    return out


def test_evaluate_command_writes_metrics_and_plots(scored, stc_root, tmp_path):
    result = run("evaluate", "stc", "--scene", "01", "--root", stc_root, "--maps", scored, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "01_0001" in result.stdout and "01 pooled" in result.stdout
    [report] = json.loads((tmp_path / "metrics.json").read_text())
    pooled = report["pooled"]
    frame_mask = np.load(stc_root / "testing" / "test_frame_mask" / "01_0001.npy")
    assert pooled["frames"] == 12 and pooled["anomalous_frames"] == frame_mask.sum() > 0
    assert 0.0 <= pooled["pixel_auroc"] <= 1.0 and 0.0 <= pooled["pro"] <= 1.0
    assert json.loads((tmp_path / "scene_01" / "metrics.json").read_text())["pooled"] == pooled
    for name in ("roc.png", "scores.png"):
        assert (tmp_path / "scene_01" / name).stat().st_size > 10_000


def test_masks_are_resized_nearest_to_the_map_size():
    masks = np.zeros((1, 480, 856), dtype=np.uint8)
    masks[0, 100:200, 300:500] = 1
    small = resize_masks(masks, (64, 64))
    assert set(np.unique(small)) == {0, 1} and abs(small.mean() - masks.mean()) < 0.01


def test_render_writes_a_playable_mp4(scored, stc_root, tmp_path):
    clip = stc_root / "testing" / "frames" / "01_0001"
    out = tmp_path / "videos" / "clip.mp4"  # its folder is created
    result = run("render", scored, clip, "--out", out)
    assert result.exit_code == 0, result.output
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 12 and frames[0].shape == (180 + 60, 320, 3)


def test_missing_mask_file(scored, stc_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(stc_root / "testing", root / "testing")
    mask = root / "testing" / "test_pixel_mask" / "01_0001.npy"
    mask.unlink()
    out = tmp_path / "eval"
    result = run("evaluate", "stc", "--scene", "01", "--root", root, "--maps", scored, "--out", out)
    assert_clean_failure(result, f"mask file {mask} not found", out=out)
    with_model = run("evaluate", "stc", "--scene", "01", "--root", root, "--model", "unused", "--out", out)
    assert_clean_failure(with_model, f"mask file {mask} not found", out=out)  # checked before scoring


def test_model_of_another_format_version(small_model, stc_root, tmp_path):
    model = tmp_path / "old_model"
    shutil.copytree(small_model, model)
    zarr.open_group(str(model), mode="r+").attrs["format_version"] = FORMAT_VERSION + 1
    out = tmp_path / "maps"
    result = run("score", model, stc_root / "testing" / "frames" / "01_0001", "--out", out, *SMALL_SCORE)
    assert_clean_failure(result, f"model {model} has format version {FORMAT_VERSION + 1}", out=out)


def test_frames_with_another_channel_count(ray_local, small_model, stc_root, tmp_path):
    folder = tmp_path / "rgba"
    folder.mkdir()
    for i in range(3):
        Image.new("RGBA", (64, 48), (10 * i, 20, 30, 255)).save(folder / f"{i:03d}.png")
    out = tmp_path / "maps"
    result = run("score", small_model, folder, "--out", out, *SMALL_SCORE)
    assert_clean_failure(result, f"frame {folder / '000.png'} has 4 channels (RGBA)", out=out)


def test_empty_folder(small_model, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "maps"
    result = run("score", small_model, tmp_path / "empty", "--out", out, *SMALL_SCORE)
    assert_clean_failure(result, f"folder {tmp_path / 'empty'} holds neither frames nor videos", out=out)


def test_evaluate_all_scenes_without_a_model(stc_root, tmp_path):
    """(Scoring first with --model: README's tour, tests/test_readme.py.)"""
    missing = run("evaluate", "stc", "--scene", "all", "--root", stc_root, "--model", str(tmp_path / "none_{scene}"), "--out", tmp_path / "eval")
    assert_clean_failure(missing, "no model matches")
