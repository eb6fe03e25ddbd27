"""Scoring throughput and memory against the bare backbone, measured in one run: the yardstick is the backbone using the whole machine.

A model (R18-Rd100 at 256x256, random init: offline) is fitted once on the smaller video, untimed.
Then, at two frame counts of 768x576 video: decode-only and the bare backbone on the whole machine
(scripts/benchlib.py), and the command end to end, `padim-ray score MODEL VIDEO --out OUT` (maps at
native 768x576, the default), start to exit.

    python scripts/bench_score.py [--frames 128 1024] [--json PATH]   # default: runs/bench/score/ (scripts/runrecord.py)
"""

from __future__ import annotations

from pathlib import Path

from bench_fit import fit_command
from benchlib import against_bare, measure, padim_ray


def fit_once(videos: dict[int, list[Path]], tmp: Path) -> None:
    """The model to score, untimed."""
    measure(fit_command(videos[min(videos)], tmp / "model"))


def score_command(videos: list[Path], tmp: Path, scratch: Path) -> list[str]:
    """`padim-ray score` of `videos` with the model prepared in `tmp`, maps into `scratch`."""
    return padim_ray("score", tmp / "model", *videos, "--out", scratch / "maps")


if __name__ == "__main__":
    against_bare(__doc__, "score", score_command, prepare=fit_once)
