"""`fit stc --scene all` / `--scene 01,02`: one model per scene in one job, from disk and from a bucket."""

from __future__ import annotations

import shutil

import pytest

from padim_ray.fit import fit_model
from padim_ray.stc import scene_videos
from padim_ray.files import Location
from padim_ray.store import open_model
from padim_ray.synthetic import SyntheticSpec, make_synthetic
from helpers import SMALL_CLUSTER, SMALL_FIT, SMALL_MODEL, assert_clean_failure, relative_error, run

TWO_SCENES = SyntheticSpec(scenes=("01", "02"), train_videos=1, train_frames=20, test_clips=0, width=160, height=96)


@pytest.fixture(scope="module")
def two_scenes(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("two-scenes"), TWO_SCENES)


def assert_same_model(actual, expected) -> None:
    a, b = open_model(actual), open_model(expected)
    assert a.attrs["frames"] == b.attrs["frames"]
    for name in ("mean", "m2", "covariance"):
        assert relative_error(a.read(name), b.read(name)) <= 1e-9, name


@pytest.mark.slow
def test_every_scene_in_one_job_from_disk_and_from_a_bucket(ray_s3, two_scenes, tmp_path, prefix):
    result = run("fit", "stc", "--scene", "all", "--root", two_scenes, "--out", tmp_path / "stc_{scene}", *SMALL_FIT)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["scene", "videos", "frames", "seconds", "model"]
    for line, scene in zip(lines[1:3], ("01", "02")):
        assert line.split()[:3] == [scene, "1", "20"] and line.endswith(str(tmp_path / f"stc_{scene}"))
    assert lines[3].split()[:3] == ["all", "2", "40"]

    # each model is the scene's own fit (the second scene: it ran beside the first)
    reference = fit_model(scene_videos(two_scenes, "02"), tmp_path / "ref_02", SMALL_MODEL, SMALL_CLUSTER)
    assert_same_model(tmp_path / "stc_02", reference.out)
    assert relative_error(open_model(tmp_path / "stc_01").read("mean"), open_model(tmp_path / "stc_02").read("mean")) > 1e-3

    root = prefix / "stc"
    root.fs.put(str(two_scenes), root.path, recursive=True)
    out = f"{prefix}/models/stc_{{scene}}"
    result = run("fit", "stc", "--scene", "01,02", "--root", root, "--out", out, *SMALL_FIT)
    assert result.exit_code == 0, result.output
    for scene in ("01", "02"):
        assert_same_model(Location(out.format(scene=scene)), tmp_path / f"stc_{scene}")
    assert sorted(p.name for p in (prefix / "models").iterdir()) == ["stc_01", "stc_02"]  # no checkpoints left


@pytest.mark.slow
def test_a_failed_scene_names_what_was_fitted_and_what_is_left(ray_s3, two_scenes, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(two_scenes / "training", root / "training")
    bad = root / "training" / "videos" / "02_001.avi"
    bad.write_bytes(b"not a video" * 1000)
    result = run("fit", "stc", "--scene", "all", "--root", root, "--out", tmp_path / "m_{scene}", *SMALL_FIT)
    assert_clean_failure(result, "scene 02:", f"cannot open video {bad}", "fitted: 01", "rerun the same command")
    assert open_model(tmp_path / "m_01").attrs["frames"] == 20  # the good scene's model is kept
    assert not (tmp_path / "m_02").exists()

    shutil.copy(two_scenes / "training" / "videos" / "02_001.avi", bad)  # fixed: the rerun fits only scene 02
    result = run("fit", "stc", "--scene", "all", "--root", root, "--out", tmp_path / "m_{scene}", *SMALL_FIT)
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.strip().splitlines()[1:3]]
    assert rows[0][:4] == ["01", "1", "20", "kept"] and rows[1][:3] == ["02", "1", "20"] and rows[1][3] != "kept"
    assert open_model(tmp_path / "m_02").attrs["frames"] == 20


@pytest.mark.parametrize("scene, out, extra, message", [
    ("01,02", "models/one", [], "--out"),
    ("all", "m_{scene}", ["--checkpoint-dir", "ckpt"], "--checkpoint-dir"),
    ("01,x", "m_{scene}", [], "two-digit STC scene ids"),
    ("01,07", "m_{scene}", [], "no training videos for scene 07"),
])
def test_scene_lists_are_checked_before_any_work(two_scenes, tmp_path, scene, out, extra, message):
    result = run("fit", "stc", "--scene", scene, "--root", two_scenes, "--out", tmp_path / out, *extra, "--address", "127.0.0.1:1")
    assert_clean_failure(result, message)
    if "{scene}" not in out or extra:
        assert "must contain {scene} when fitting several scenes" in result.stderr


def test_existing_scene_outputs_are_not_clobbered(two_scenes, tmp_path):
    (tmp_path / "m_02").mkdir()
    result = run("fit", "stc", "--scene", "all", "--root", two_scenes, "--out", tmp_path / "m_{scene}", "--address", "127.0.0.1:1")
    assert_clean_failure(result, f"output {tmp_path / 'm_02'} already exists and is not a model", "--overwrite")
