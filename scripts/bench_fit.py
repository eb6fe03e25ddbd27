"""Fit throughput and memory against the bare backbone, measured in one run: the yardstick is the backbone using the whole machine.

R18-Rd100 at 256x256 (random init: offline) from 768x576 video, at two frame counts: decode-only and
the bare backbone on the whole machine (scripts/benchlib.py), and the command end to end,
`padim-ray fit videos VIDEO --out OUT --weights none`, start to exit; then the same with a checkpoint
of each stats actor every 2 s (what checkpointing costs a fit; the default is every 300 s).

    python scripts/bench_fit.py [--frames 128 1024] [--json PATH]   # default: runs/bench/fit/ (scripts/runrecord.py)
"""

from __future__ import annotations

from pathlib import Path

from benchlib import against_bare, padim_ray


CHECKPOINT_EVERY = 2.0  # seconds: ~8 saves of the 330 MB accumulator in a 512-frame fit here


def fit_command(videos: list[Path], out: Path, *options: str) -> list[str]:
    """R18-Rd100 at 256x256, random init (ImageNet weights cannot be downloaded here)."""
    return padim_ray("fit", "videos", *videos, "--out", out, "--weights", "none", *options)


if __name__ == "__main__":
    checkpointing = {
        f"padim-ray fit --checkpoint-every {CHECKPOINT_EVERY:g}":
            lambda videos, tmp, scratch: fit_command(videos, scratch / "model", "--checkpoint-every", str(CHECKPOINT_EVERY)),
    }
    against_bare(__doc__, "fit", lambda videos, tmp, scratch: fit_command(videos, scratch / "model"), variants=checkpointing)
