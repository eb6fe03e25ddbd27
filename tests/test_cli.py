"""The command line on bad input: one-line error naming the path, exit 1, nothing left at the target."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from padim_ray.cli import app
from padim_ray.store import open_model

SMALL_FIT = ["--weights", "none", "--image-size", "64", "--dims", "16", "--actors", "1", "--cpus-per-actor", "0.5"]


def run(*args: str):
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


def test_fit_stc_writes_a_model(ray_local, stc_root, tmp_path):
    out = tmp_path / "model"
    result = run("fit", "stc", "--scene", "01", "--root", stc_root, "--out", out, *SMALL_FIT)
    assert result.exit_code == 0, result.output
    assert f"model: {out} (60 frames" in result.stdout
    assert open_model(out).attrs["frames"] == 60


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
