"""Fit throughput and memory against the bare backbone, measured in one run (issue 6).

R18-Rd100 at 256x256 (random init: offline) from 768x576 video, at two frame counts: decode-only and
the bare backbone on the whole machine (scripts/benchlib.py), and the command end to end,
`padim-ray fit videos VIDEO --out OUT --weights none`, start to exit (at these counts `--compile auto`
runs the backbone eager); the same with `--compile on`, as jobs of 3000+ frames run by default
(torch.compile; after one untimed warm-up run, so both counts start from a warm compile cache and
the fixed seconds show the warm start); and the same with a checkpoint of each
stats actor every 2 s (issue 7: what checkpointing costs; the default is every 300 s).

    python scripts/bench_fit.py [--frames 128 1024] [--json runs/bench_fit.json]
"""

from __future__ import annotations

from pathlib import Path

from benchlib import against_bare, padim_ray, warm_compile_cache


CHECKPOINT_EVERY = 2.0  # seconds: ~8 saves of the 330 MB accumulator in a 512-frame fit here


def fit_command(video: Path, out: Path, *options: str) -> list[str]:
    """R18-Rd100 at 256x256, random init (ImageNet weights cannot be downloaded here)."""
    return padim_ray("fit", "videos", video, "--out", out, "--weights", "none", *options)


def warm_up(videos: dict[int, Path], tmp: Path) -> None:
    warm_compile_cache(fit_command(videos[min(videos)], tmp / "warm", "--compile", "on"))


if __name__ == "__main__":
    import torch

    compiles = not torch.cuda.is_available()  # GPU actors run eager: --compile changes nothing there
    variants = {"padim-ray fit --compile on": lambda video, tmp, scratch: fit_command(video, scratch / "model", "--compile", "on")} if compiles else {}
    variants[f"padim-ray fit --checkpoint-every {CHECKPOINT_EVERY:g}"] = (
        lambda video, tmp, scratch: fit_command(video, scratch / "model", "--checkpoint-every", str(CHECKPOINT_EVERY))
    )
    against_bare(__doc__, "fit", lambda video, tmp, scratch: fit_command(video, scratch / "model"), prepare=warm_up if compiles else None, variants=variants)
