"""Many scenes in one job: `fit stc --scene all` against the same scenes fitted one after another.

Both run on one local Ray started before the clock (so Ray's start-up is not counted), on a synthetic
STC-shaped dataset of SCENES scenes of one 856x480 video each, R18-Rd100 at 256x256 (random-init
weights, as everywhere offline). What the job saves is the time between scenes: probing the next
scene's videos and writing the finished scene's model overlap the next scene's embedding.

    python scripts/bench_scenes.py [--scenes 3] [--frames 128]
    python scripts/bench_scenes.py child {sequential,all} ROOT FRAMES   # one timed measurement
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import runrecord  # noqa: E402
from benchlib import measure, number, workdir  # noqa: E402

MODEL = {"backbone": "resnet18", "weights": "none"}


def child(mode: str, root: str, frames: int) -> None:
    """Fit every scene of `root` (sequentially or as one job) on a fresh local Ray; print the time."""
    import ray

    from padim_ray.config import ModelConfig
    from padim_ray.fit import fit_model
    from padim_ray.scenes import fit_scenes, plan_scenes
    from padim_ray.stc import training_scenes

    ray.init(address="local", include_dashboard=False)
    Path("models").mkdir()
    scenes = training_scenes(root)
    model = ModelConfig(**MODEL)
    started = time.monotonic()
    if mode == "all":
        fit_scenes(plan_scenes(root, scenes, "models/stc_{scene}", None, overwrite=False), model)
    else:
        for scene in scenes:
            fit_model(sorted(Path(root, "training", "videos").glob(f"{scene}_*.avi")), f"models/stc_{scene}", model)
    print(json.dumps({"frames": frames * len(scenes), "seconds": time.monotonic() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--frames", type=int, default=128, help="frames per scene")
    parser.add_argument("--json", type=Path, default=runrecord.default_path("scenes"), help="where to write the results")
    args = parser.parse_args()
    from padim_ray.synthetic import SyntheticSpec, make_synthetic

    spec = SyntheticSpec(scenes=tuple(f"{i:02d}" for i in range(1, args.scenes + 1)), train_videos=1, train_frames=args.frames, test_clips=0)
    with workdir() as tmp:
        root = make_synthetic(tmp / "stc", spec)
        runs = {}
        for mode in ("sequential", "all"):
            with workdir():
                runs[mode] = measure([sys.executable, __file__, "child", mode, root, args.frames], args.scenes * args.frames)
    frames = args.scenes * args.frames
    print(f"{args.scenes} scenes x {args.frames} frames (856x480), R18-Rd100 at 256x256, one local Ray started before the clock")
    print(f"{'run':<34}{'seconds':>9}{'frames/s':>10}{'peak GiB':>10}")
    for mode, label in (("sequential", "one fit per scene, in turn"), ("all", "fit stc --scene all")):
        run = runs[mode]
        print(f"{label:<34}{number(run.seconds, '.1f'):>9}{number(frames / run.seconds, '.1f'):>10}{number(run.peak_bytes / 2**30, '.2f'):>10}")
    print(f"the job takes {runs['all'].seconds / runs['sequential'].seconds:.2f}x the time of fitting the scenes in turn")
    rows = [{"mode": mode, "seconds": run.seconds, "peak_bytes": run.peak_bytes} for mode, run in runs.items()]
    runrecord.write(args.json, runrecord.record("scenes", rows, scenes=args.scenes, frames_per_scene=args.frames))
    print(f"written {args.json}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
