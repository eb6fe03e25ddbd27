"""Fit and score throughput as a ratio of the bare backbone's forward throughput, measured in one run.

The bare forward embeds already-decoded, already-resized frames in this process with the same number
of torch threads an actor gets; the fit and score runs decode, embed, accumulate / score and write
through Ray on the same machine. Ray start-up is excluded (Ray is started before timing).

    python scripts/bench_throughput.py [--backbone resnet18] [--videos 4] [--frames-per-video 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from padim_ray.config import ClusterConfig, ModelConfig
from padim_ray.embedding import Embedder
from padim_ray.fit import fit_model
from padim_ray.score import score_inputs
from padim_ray.stc import scene_videos, test_clips
from padim_ray.synthetic import SyntheticSpec, make_synthetic
from padim_ray.video import WorkUnit, iter_unit_frames


def bare_forward_fps(model: ModelConfig, frames: np.ndarray, batch_size: int, threads: int) -> float:
    torch.set_num_threads(threads)
    embedder = Embedder(model)
    embedder(frames[:batch_size])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(frames), batch_size):
        embedder(frames[start : start + batch_size])
    return len(frames) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames-per-video", type=int, default=100)
    args = parser.parse_args()
    weights = "imagenet" if args.backbone == "efficientnet_lite0" else "none"  # offline: random init
    model = ModelConfig(backbone=args.backbone, weights=weights)
    cluster = ClusterConfig()
    with tempfile.TemporaryDirectory() as tmp:
        spec = SyntheticSpec(train_videos=args.videos, train_frames=args.frames_per_video, test_clips=2, test_frames=args.frames_per_video)
        root = make_synthetic(Path(tmp) / "data", spec)
        videos = scene_videos(root, "01")
        frames = np.stack([f for _, f in iter_unit_frames(WorkUnit(0, str(videos[0])))])
        frames = torch.nn.functional.interpolate(  # pre-resized: the bare forward does no resizing work
            torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(model.image_size,) * 2, mode="bilinear"
        ).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        ray.init(address="local", include_dashboard=False)
        plan_threads = max(1, int(cluster.cpus_per_actor))
        bare = bare_forward_fps(model, frames, cluster.batch_size, plan_threads)
        started = time.perf_counter()
        fitted = fit_model(videos, Path(tmp) / "model", model, cluster)
        fit_fps = fitted.frames / (time.perf_counter() - started)
        started = time.perf_counter()
        scored = score_inputs(fitted.out, test_clips(root, "01"), Path(tmp) / "maps", cluster=cluster)
        score_fps = sum(scored.frames.values()) / (time.perf_counter() - started)
    print(f"{args.backbone}: bare forward {bare:.1f} frames/s ({plan_threads} torch thread(s))")
    print(f"fit   {fit_fps:.1f} frames/s  = {fit_fps / bare:.2f} x bare ({fitted.frames} frames, {args.videos} videos)")
    print(f"score {score_fps:.1f} frames/s  = {score_fps / bare:.2f} x bare ({sum(scored.frames.values())} frames, maps at 856x480)")


if __name__ == "__main__":
    main()
