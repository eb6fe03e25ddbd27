"""The ShanghaiTech Campus layout (DESIGN.md sec. 5): where a scene's videos, frames and masks live."""

from __future__ import annotations

import re
from pathlib import Path

from padim_ray.errors import PadimError

SCENE_PATTERN = re.compile(r"^\d{2}$")


class LayoutError(PadimError):
    """A dataset root that does not have the ShanghaiTech layout."""


def scene_videos(root: str | Path, scene: str) -> list[Path]:
    """The training videos `root/training/videos/SS_*.avi` of one scene, in order."""
    root = Path(root)
    if not SCENE_PATTERN.match(scene):
        raise LayoutError(f"scene {scene!r} is not a two-digit STC scene id like 01")
    if not root.is_dir():
        raise LayoutError(f"STC root {root} not found; pass --root pointing at the folder that holds training/ and testing/")
    videos_dir = root / "training" / "videos"
    if not videos_dir.is_dir():
        raise LayoutError(f"{videos_dir} not found; --root must hold training/videos/SS_VVV.avi (ShanghaiTech layout)")
    videos = sorted(videos_dir.glob(f"{scene}_*.avi"))
    if not videos:
        raise LayoutError(f"no training videos for scene {scene} in {videos_dir} (expected {scene}_001.avi, ...)")
    return videos
