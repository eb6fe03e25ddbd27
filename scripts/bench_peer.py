"""padim-ray's fit against anomalib's PaDiM on the same frames, measured in one run: speed, peak memory and the two fits' Gaussians.

At two frame counts of 768x576 video (vtest.avi re-encoded at 8 Mbit/s), R18-Rd100 at 256x256,
random init on both sides (offline):
  bare backbone      torchvision's ResNet18 to layer3 on pre-resized frames, batch 32, every core
  anomalib PaDiM     what anomalib's training does, without Lightning: decord decodes with resize to
                     256x256, ImageNet normalisation, PadimModel (resnet18, layer1-3, n_features 100)
                     in training mode embeds batches of 32 into its memory bank, then PadimModel.fit()
                     (MultiVariateGaussian); start to exit
  padim-ray fit      `padim-ray fit videos VIDEO --out OUT --weights none`, start to exit
The rows take turns over --repeat rounds (default 3), each keeping its median time per count.
Then both Gaussian fits on IDENTICAL embeddings (padim_ray's Embedder on the first 64 frames): the
largest relative difference of the means and of the inverse covariances, per position
(max |ours - theirs| / max |ours|). anomalib inverts in float32 with 0.01 I + 1e-5 I; we in float64
with 0.01 I, so the difference is also shown against ours with anomalib's eps.

anomalib comes with the `bench` extra; install it apart from the project's environment:
    python3 -m venv ../benchvenv && . ../benchvenv/bin/activate && pip install -e '.[bench]'
    python scripts/bench_peer.py [--frames 128 1024] [--repeat 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench_fit import fit_command
from benchlib import (
    BATCH, component_rows, decode_resized, footage, measure_rows, number, parse_args, report, resized_batches, workdir,
)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INSTALL = "python3 -m venv ../benchvenv && . ../benchvenv/bin/activate && pip install -e '.[bench]'"


def anomalib_fit(video: Path) -> dict:
    """Child: anomalib's PaDiM training on `video` (its Lightning module's training_step, then fit)."""
    import torch
    from anomalib.models.image.padim.torch_model import PadimModel

    torch.set_num_threads(os.cpu_count())
    model = PadimModel(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False, n_features=100)
    model.train()  # in training mode forward() appends the batch's embeddings to the memory bank
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    frames = 0
    for batch in resized_batches(video):
        model((torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - mean) / std)
        frames += len(batch)
    model.fit()
    return {"frames": frames}


def gaussian_difference(video: Path, frames: int) -> dict:
    """Both Gaussian fits on the same padim_ray embeddings of `video`'s first `frames` frames."""
    import torch
    from anomalib.models.components import MultiVariateGaussian

    from padim_ray.config import ModelConfig
    from padim_ray.embedding import Embedder
    from padim_ray.gaussian import GaussianStats, finalize

    pixels = decode_resized(video)[:frames]
    embedder = Embedder(ModelConfig(weights="none"))
    embeddings = torch.cat([embedder(pixels[i : i + BATCH]) for i in range(0, len(pixels), BATCH)])  # (B, d, h, w)
    theirs = MultiVariateGaussian()
    theirs.fit(embeddings)
    stats = GaussianStats.from_embeddings(embeddings)
    ours, ours_their_eps = finalize(stats, 0.01), finalize(stats, 0.01 + 1e-5)

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.flatten(1), b.to(a.dtype).flatten(1)
        return ((a - b).abs().amax(1) / a.abs().amax(1)).max().item()

    return {
        "frames": len(pixels),
        "mean": relative(ours.mean, theirs.mean.T),  # theirs: (d, P)
        "inverse_covariance": relative(ours.precision, theirs.inv_covariance),
        "inverse_covariance_same_eps": relative(ours_their_eps.precision, theirs.inv_covariance),
    }


def main() -> None:
    args = parse_args(__doc__, "peer", lambda p: p.add_argument("--child", type=Path, help=argparse.SUPPRESS))
    try:
        import anomalib
    except ImportError:
        raise SystemExit(f"anomalib is missing: it comes with the bench extra, in a venv of its own:\n    {INSTALL}") from None
    if args.child:
        print(json.dumps(anomalib_fit(args.child)))
        return
    videos = footage(args.frames, args.source, args.cache)
    with workdir():
        commands = {
            **component_rows("backbone"),
            f"anomalib {anomalib.__version__} PaDiM": lambda inputs, scratch: [sys.executable, Path(__file__).resolve(), "--child", inputs[0]],
            "padim-ray fit": lambda inputs, scratch: fit_command(inputs, scratch / "model"),
        }
        bare, peer, fit = measure_rows(commands, {n: [video] for n, video in videos.items()}, args.repeat)
    speedup = fit.ratio(peer)
    gaussians = gaussian_difference(videos[args.frames[0]], 64)
    notes = [
        f"padim-ray fit / anomalib PaDiM: {number(speedup, '.2f')}x marginal frames/s (target >= 1.5)",
        f"Gaussians on identical embeddings ({gaussians['frames']} frames), max relative difference per position: "
        f"mean {gaussians['mean']:.1e}, inverse covariance {gaussians['inverse_covariance']:.1e} "
        f"({gaussians['inverse_covariance_same_eps']:.1e} against ours with anomalib's 0.01 + 1e-5)",
    ]
    extra = {"anomalib": anomalib.__version__, "fit_over_anomalib": speedup, "gaussians": gaussians}
    report("peer", [bare, peer, fit], bare, args.json, extra, notes)


if __name__ == "__main__":
    main()
