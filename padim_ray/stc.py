"""The ShanghaiTech Campus layout (docs/design.md, "ShanghaiTech Campus layout"): where a scene's videos, frames and masks live."""

from __future__ import annotations

import fnmatch
import io
import re
from pathlib import Path

import numpy as np

from padim_ray.errors import PadimError
from padim_ray.files import Location

SCENE_PATTERN = re.compile(r"^\d{2}$")


class LayoutError(PadimError):
    """A dataset root that does not have the ShanghaiTech layout."""


def scene_videos(root: str | Path | Location, scene: str) -> list[Location]:
    """The training videos `root/training/videos/SS_*.avi` of one scene, in order (root local or a URI)."""
    root = Location(root)
    if not SCENE_PATTERN.match(scene):
        raise LayoutError(f"scene {scene!r} is not a two-digit STC scene id like 01")
    if not root.is_dir():
        raise LayoutError(f"STC root {root} not found; pass --root pointing at the folder that holds training/ and testing/")
    videos_dir = _training_videos(root)
    videos = [video for video in videos_dir.iterdir() if fnmatch.fnmatch(video.name, f"{scene}_*.avi")]
    if not videos:
        raise LayoutError(f"no training videos for scene {scene} in {videos_dir} (expected {scene}_001.avi, ...)")
    return videos


def training_scenes(root: str | Path | Location) -> list[str]:
    """Scene ids that have training videos."""
    videos_dir = _training_videos(root)
    return sorted({v.name[:2] for v in videos_dir.iterdir() if fnmatch.fnmatch(v.name, "[0-9][0-9]_*.avi")})


def scene_path(template: str, scene: str) -> str:
    """`template` with `{scene}` replaced (other braces are left alone: paths may contain them)."""
    return template.replace("{scene}", scene)


def select_scenes(text: str, available: list[str]) -> list[str]:
    """`all` -> every available scene; `01,04` -> those (in that order, each once)."""
    if text.strip() == "all":
        if not available:
            raise LayoutError("no scenes found for --scene all")
        return available
    scenes = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    bad = [scene for scene in scenes if not SCENE_PATTERN.match(scene)]
    if bad or not scenes:
        raise LayoutError(f"--scene {text!r}: give two-digit STC scene ids like 01 or 01,04, or all")
    return scenes


def test_clips(root: str | Path | Location, scene: str) -> list[Location]:
    """The test clip folders `root/testing/frames/SS_CCCC` of one scene, in order."""
    frames_dir = _test_frames(root)
    clips = [p for p in frames_dir.iterdir() if fnmatch.fnmatch(p.name, f"{scene}_*") and p.is_dir()]
    if not clips:
        raise LayoutError(f"no test clips for scene {scene} in {frames_dir} (scene 13 has none in STC)")
    return clips


def test_scenes(root: str | Path | Location) -> list[str]:
    """Scene ids that have test clips."""
    frames_dir = _test_frames(root)
    return sorted({p.name[:2] for p in frames_dir.iterdir() if "_" in p.name and SCENE_PATTERN.match(p.name[:2])})


def mask_paths(root: str | Path | Location, clip: str) -> tuple[Location, Location]:
    """A clip's frame-mask and pixel-mask files, which must exist."""
    testing = Location(root) / "testing"
    paths = (testing / "test_frame_mask" / f"{clip}.npy", testing / "test_pixel_mask" / f"{clip}.npy")
    for path in paths:
        if not path.is_file():
            raise LayoutError(f"mask file {path} not found; STC ships one per test clip (ShanghaiTech layout)")
    return paths


def load_masks(root: str | Path | Location, clip: str, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """A clip's frame mask (T,) and pixel mask (T, H, W; memory-mapped when local), checked against `frames`."""
    frame_path, pixel_path = mask_paths(root, clip)
    frame_mask = _load_npy(frame_path)
    pixel_mask = _load_npy(pixel_path, mmap=True)
    if frame_mask.shape != (frames,):
        raise LayoutError(f"mask {frame_path} has shape {frame_mask.shape}, expected ({frames},): one 0/1 per frame of {clip}")
    if pixel_mask.ndim != 3 or pixel_mask.shape[0] != frames:
        raise LayoutError(f"mask {pixel_path} has shape {pixel_mask.shape}, expected ({frames}, H, W) for clip {clip}")
    return frame_mask, pixel_mask


def _load_npy(path: Location, mmap: bool = False) -> np.ndarray:
    try:
        if not path.is_remote:
            return np.load(path.path, mmap_mode="r" if mmap else None)
        return np.load(io.BytesIO(path.read_bytes()))
    except ValueError as err:
        raise LayoutError(f"mask file {path} is not a readable .npy array ({err}); restore it from the STC archive") from None


def _training_videos(root: str | Path | Location) -> Location:
    return _layout_folder(Location(root) / "training" / "videos", "training/videos/SS_VVV.avi")


def _test_frames(root: str | Path | Location) -> Location:
    return _layout_folder(Location(root) / "testing" / "frames", "testing/frames/SS_CCCC/")


def _layout_folder(folder: Location, holds: str) -> Location:
    """`folder`, which must exist; else the error says what --root must hold."""
    if not folder.is_dir():
        raise LayoutError(f"{folder} not found; --root must hold {holds} (ShanghaiTech layout)")
    return folder
