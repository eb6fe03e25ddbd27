"""Fit throughput and memory against the bare backbone, measured in one run (issue 6).

R18-Rd100 at 256x256 (random init: offline) from 768x576 video, at two frame counts: decode-only and
the bare backbone on the whole machine (scripts/benchlib.py), and the command end to end,
`padim-ray fit videos VIDEO --out OUT --weights none`, start to exit.

    python scripts/bench_fit.py [--frames 128 512] [--json runs/bench_fit.json]
"""

from __future__ import annotations

from pathlib import Path

from benchlib import against_bare, padim_ray


def fit_command(video: Path, out: Path) -> list[str]:
    """R18-Rd100 at 256x256, random init (ImageNet weights cannot be downloaded here)."""
    return padim_ray("fit", "videos", video, "--out", out, "--weights", "none")


if __name__ == "__main__":
    against_bare(__doc__, "fit", lambda n, video, tmp: fit_command(video, tmp / f"model{n}"))
