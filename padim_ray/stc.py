"""The ShanghaiTech Campus layout (DESIGN.md sec. 5): where a scene's videos, frames and masks live."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import numpy as np

from padim_ray.errors import PadimError
from padim_ray.storage import Location

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
    videos_dir = root / "training" / "videos"
    if not videos_dir.is_dir():
        raise LayoutError(f"{videos_dir} not found; --root must hold training/videos/SS_VVV.avi (ShanghaiTech layout)")
    videos = [video for video in videos_dir.iterdir() if fnmatch.fnmatch(video.name, f"{scene}_*.avi")]
    if not videos:
        raise LayoutError(f"no training videos for scene {scene} in {videos_dir} (expected {scene}_001.avi, ...)")
    return videos


def test_clips(root: str | Path, scene: str) -> list[Path]:
    """The test clip folders `root/testing/frames/SS_CCCC` of one scene, in order."""
    root = Path(root)
    frames_dir = root / "testing" / "frames"
    if not frames_dir.is_dir():
        raise LayoutError(f"{frames_dir} not found; --root must hold testing/frames/SS_CCCC/ (ShanghaiTech layout)")
    clips = sorted(p for p in frames_dir.glob(f"{scene}_*") if p.is_dir())
    if not clips:
        raise LayoutError(f"no test clips for scene {scene} in {frames_dir} (scene 13 has none in STC)")
    return clips


def test_scenes(root: str | Path) -> list[str]:
    """Scene ids that have test clips."""
    frames_dir = Path(root) / "testing" / "frames"
    return sorted({p.name[:2] for p in frames_dir.glob("*_*") if p.is_dir() and SCENE_PATTERN.match(p.name[:2])})


def mask_paths(root: str | Path, clip: str) -> tuple[Path, Path]:
    """A clip's frame-mask and pixel-mask files, which must exist."""
    testing = Path(root) / "testing"
    paths = (testing / "test_frame_mask" / f"{clip}.npy", testing / "test_pixel_mask" / f"{clip}.npy")
    for path in paths:
        if not path.is_file():
            raise LayoutError(f"mask file {path} not found; STC ships one per test clip (ShanghaiTech layout)")
    return paths


def load_masks(root: str | Path, clip: str, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """A clip's frame mask (T,) and pixel mask (T, H, W, memory-mapped), checked against `frames`."""
    frame_path, pixel_path = mask_paths(root, clip)
    frame_mask = np.load(frame_path)
    pixel_mask = np.load(pixel_path, mmap_mode="r")
    if frame_mask.shape != (frames,):
        raise LayoutError(f"mask {frame_path} has shape {frame_mask.shape}, expected ({frames},): one 0/1 per frame of {clip}")
    if pixel_mask.ndim != 3 or pixel_mask.shape[0] != frames:
        raise LayoutError(f"mask {pixel_path} has shape {pixel_mask.shape}, expected ({frames}, H, W) for clip {clip}")
    return frame_mask, pixel_mask
