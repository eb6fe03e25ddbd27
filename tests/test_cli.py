"""The command line on bad input: one-line error naming the path, exit 1, nothing left at the target."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from padim_ray.store import open_model
from helpers import SMALL_CLUSTER_OPTIONS, SMALL_FIT, assert_clean_failure, relative_error, run

def test_missing_root(tmp_path):
    root, out = tmp_path / "nowhere", tmp_path / "model"
    assert_clean_failure(run("fit", "stc", "--scene", "01", "--root", root, "--out", out), str(root), "--root", out=out)


def test_scene_without_videos(stc_root, tmp_path):
    out = tmp_path / "model"
    result = run("fit", "stc", "--scene", "05", "--root", stc_root, "--out", out)
    assert_clean_failure(result, "no training videos for scene 05", str(stc_root), out=out)


@pytest.fixture
def broken_root(stc_root, tmp_path):
    """A copy of the synthetic root whose training folder gets one bad video (scene 01)."""
    root = tmp_path / "root"
    shutil.copytree(stc_root / "training", root / "training")
    return root


def test_unreadable_video(broken_root, tmp_path):
    bad = broken_root / "training" / "videos" / "01_003.avi"
    bad.write_bytes(b"not a video" * 1000)
    out = tmp_path / "model"
    result = run("fit", "stc", "--scene", "01", "--root", broken_root, "--out", out, *SMALL_FIT)
    assert_clean_failure(result, f"cannot open video {bad}", out=out)


def test_truncated_video_fails_during_the_distributed_fit(ray_local, broken_root, tmp_path):
    good = broken_root / "training" / "videos" / "01_001.avi"
    bad = broken_root / "training" / "videos" / "01_003.avi"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out = tmp_path / "model"
    result = run("fit", "stc", "--scene", "01", "--root", broken_root, "--out", out, *SMALL_FIT)
    assert_clean_failure(result, f"video {bad} is truncated", "of 30 frames", out=out)


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder this process cannot create entries in (root ignores modes, so it gets sysfs)."""
    if os.geteuid() == 0:
        return Path("/sys/fs")
    folder = tmp_path / "readonly"
    folder.mkdir(mode=0o555)
    return folder


def test_output_not_writable(stc_root, readonly_dir):
    out = readonly_dir / "model"
    result = run("fit", "stc", "--scene", "01", "--root", stc_root, "--out", out, *SMALL_FIT)
    assert_clean_failure(result, f"output folder {readonly_dir} is not writable", out=out)


@pytest.fixture
def no_cluster(monkeypatch):
    """Connecting to Ray fails the test: what is checked before any cluster work is refused without it."""

    def connect(address=None):
        raise AssertionError("connected to Ray before refusing the command")

    for module in ("padim_ray.fit", "padim_ray.scenes"):
        monkeypatch.setattr(f"{module}.connect", connect)


@pytest.mark.parametrize("scene, option", [("01", "--out"), ("all", "--out"), ("01", "--checkpoint-dir"), ("all", "--checkpoint-dir")])
def test_output_under_a_file_is_refused_before_ray_starts(stc_root, tmp_path, no_cluster, scene, option):
    blocker = tmp_path / "models"
    blocker.write_text("a file, not a folder")
    target = blocker / "sub" / "stc_{scene}"
    outputs = ["--out", target] if option == "--out" else ["--out", tmp_path / "stc_{scene}", "--checkpoint-dir", target]
    result = run("fit", "stc", "--scene", scene, "--root", stc_root, *outputs, *SMALL_FIT)
    message = f"output folder {blocker / 'sub'} cannot be created: {blocker} is a file; choose another {option}"
    assert_clean_failure(result, message, out=tmp_path / "stc_01")
    assert blocker.read_text() == "a file, not a folder"


def test_existing_output_needs_overwrite(stc_root, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = run("fit", "stc", "--scene", "01", "--root", stc_root, "--out", out, *SMALL_FIT)
    assert result.exit_code == 1 and f"output {out} already exists; pass --overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "user data"


def test_unknown_backbone_lists_the_valid_ones(stc_root, tmp_path):
    result = run("fit", "stc", "--scene", "01", "--root", stc_root, "--out", tmp_path / "m", "--backbone", "vgg")
    assert result.exit_code == 2 and "resnet18" in result.output


def test_fit_videos_needs_paths_and_out(tmp_path):
    assert_clean_failure(run("fit", "videos", "--out", tmp_path / "m"), "PATHS and --out")


@pytest.mark.parametrize("damage", ["truncated", "unreadable"])
def test_skip_bad_inputs_fits_the_rest_and_says_what_was_left_out(ray_local, broken_root, small_model, tmp_path, damage):
    good = broken_root / "training" / "videos" / "01_001.avi"
    bad = broken_root / "training" / "videos" / "01_003.avi"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2] if damage == "truncated" else b"not a video" * 1000)
    out = tmp_path / "model"
    result = run("fit", "stc", "--scene", "01", "--root", broken_root, "--out", out, *SMALL_FIT, "--skip-bad-inputs")
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-2:]
    assert last[0].startswith("skipped 1 input(s) that cannot be decoded") and last[1].startswith(f"  {bad}: ")
    assert ("is truncated" if damage == "truncated" else "cannot open video") in last[1]
    model, reference = open_model(out), open_model(small_model)  # small_model: 01_001 and 01_002 only
    assert model.attrs["skipped_inputs"] == [{"path": str(bad), "reason": last[1].split(": ", 1)[1]}]
    assert [Path(s["path"]).name for s in model.attrs["sources"]] == ["01_001.avi", "01_002.avi"]
    assert model.attrs["frames"] == 60
    for name in ("mean", "m2"):
        assert relative_error(model.read(name), reference.read(name)) <= 1e-9, name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("option, value, message", [
    ("--dims", "0", "--dims must be at least 1"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--actors", "0", "--actors must be at least 1"),
    ("--image-size", "7", "--image-size must be a multiple of 16 of at least 32"),
    ("--frame-stride", "0", "--frame-stride must be at least 1"),
    ("--fan-in", "1", "--fan-in must be at least 2"),
    ("--max-retries", "-1", "--max-retries must be at least 0"),
    ("--checkpoint-every", "-5", "--checkpoint-every must be at least 0 seconds"),
    ("--image-size", "100000", "--image-size must be a multiple of 16 of at least 32 and at most 1024"),
    ("--batch-size", "100000", "--batch-size must be at least 1 and at most 256"),
    ("--frame-stride", "10000000", "--frame-stride must be at least 1 and at most 100000"),
])
def test_numeric_options_are_checked_before_any_cluster_work(stc_root, tmp_path, option, value, message):
    out = tmp_path / "model"
    args = ["fit", "stc", "--scene", "01", "--root", stc_root, "--out", out, "--weights", "none", option, value]
    result = run(*args, "--address", "ray://127.0.0.1:1")  # connecting would fail: the check comes first
    assert_clean_failure(result, message, f"got {value}", out=out)


def test_failures_inside_ray_end_in_one_line_with_the_traceback_in_a_file(ray_local, small_model, stc_root, tmp_path):
    model, out = tmp_path / "model", tmp_path / "maps"
    shutil.copytree(small_model, model)
    for chunk in (model / "precision" / "c").rglob("*"):  # arrays read inside the score actors fail there
        if chunk.is_file():
            chunk.write_bytes(b"garbage")
    result = run("score", model, stc_root / "testing" / "frames" / "01_0001", "--out", out, *SMALL_CLUSTER_OPTIONS)
    assert_clean_failure(result, "traceback in ", "--verbose shows it", out=out)
    log_file = result.stderr.strip().split("traceback in ")[1].split(";")[0]
    assert "Traceback" in Path(log_file).read_text()


@pytest.mark.parametrize("fps", ["0", "-3", "100000"])
def test_render_fps_is_bounded_before_anything_is_read(tmp_path, fps):
    out = tmp_path / "video.mp4"
    result = run("render", tmp_path / "no-maps", tmp_path / "no-clip", "--out", out, "--fps", fps)
    assert_clean_failure(result, "--fps must be at least 1 and at most 240", out=out)


def test_render_refuses_its_inputs_and_an_existing_out(tmp_path):
    video, frames, maps = tmp_path / "clip.mp4", tmp_path / "frames", tmp_path / "maps"
    video.write_bytes(b"a user's video")
    frames.mkdir()
    (frames / "000.jpg").write_bytes(b"a user's frame")
    cases = [
        (maps, video, video, "--overwrite", f"--out {video} would overwrite the input {video}"),
        (maps, frames, frames / "out.mp4", "--overwrite", f"--out {frames / 'out.mp4'} would overwrite the input {frames}"),
        (video, frames, video, "--overwrite", f"--out {video} would overwrite the input {video}"),  # the maps argument too
        (maps, frames, video, "--no-overwrite", f"output {video} already exists; pass --overwrite"),
    ]
    for maps_arg, input_arg, out, overwrite, message in cases:
        assert_clean_failure(run("render", maps_arg, input_arg, "--out", out, overwrite), message)
    assert video.read_bytes() == b"a user's video" and sorted(p.name for p in frames.iterdir()) == ["000.jpg"]


def test_overwrite_refuses_what_is_not_a_store_of_its_kind(small_model, stc_root, tmp_path):
    clip = stc_root / "testing" / "frames" / "01_0001"
    before = sorted(p.name for p in clip.iterdir())
    model_files = sorted(p.relative_to(small_model) for p in small_model.rglob("*"))
    assert_clean_failure(
        run("score", small_model, clip, "--out", clip, "--overwrite"),
        f"{clip}: holds files that are not a padim-ray anomaly-map store; choose another --out",
    )
    assert_clean_failure(
        run("score", small_model, clip, "--out", small_model, "--overwrite"),
        f"{small_model}: holds files that are not a padim-ray anomaly-map store",
    )
    assert_clean_failure(
        run("fit", "videos", clip, "--out", clip, "--overwrite", *SMALL_FIT),
        f"{clip}: holds files that are not a padim-ray model",
    )
    assert sorted(p.name for p in clip.iterdir()) == before
    assert sorted(p.relative_to(small_model) for p in small_model.rglob("*")) == model_files


def test_an_input_given_twice_is_refused(small_model, stc_root, tmp_path):
    videos = stc_root / "training" / "videos"
    video = videos / "01_001.avi"
    out = tmp_path / "model"
    message = f"input {video} is given twice (also as {video}); pass each input once"
    assert_clean_failure(run("fit", "videos", video, videos, "--out", out, *SMALL_FIT), message, out=out)  # also inside the folder
    assert_clean_failure(run("update", small_model, video, video, "--out", out), message, out=out)
    assert_clean_failure(run("score", small_model, video, video, "--out", out), message, out=out)
