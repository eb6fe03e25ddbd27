"""Scoring throughput and memory against the bare backbone, measured in one run (issue 6).

A model (R18-Rd100 at 256x256, random init: offline) is fitted once on the smaller video, untimed.
Then, at two frame counts of 768x576 video: decode-only and the bare backbone on the whole machine
(scripts/benchlib.py), and the command end to end, `padim-ray score MODEL VIDEO --out OUT` (maps at
native 768x576, the default), start to exit; then the same with `--compile on`, as jobs of 3000+
frames run by default (torch.compile; after one untimed warm-up run, so both counts start from a
warm compile cache).

    python scripts/bench_score.py [--frames 128 1024] [--json runs/bench_score.json]
"""

from __future__ import annotations

from pathlib import Path

from bench_fit import fit_command
from benchlib import against_bare, measure, padim_ray, warm_compile_cache


def prepare(videos: dict[int, Path], tmp: Path) -> None:
    """The model to score (untimed), then one `--compile on` scoring run to warm the compile cache."""
    measure(fit_command(videos[min(videos)], tmp / "model"))
    warm_compile_cache(score_command(0, videos[min(videos)], tmp, "--compile", "on"))


def score_command(n: int, video: Path, tmp: Path, *options: str) -> list[str]:
    return padim_ray("score", tmp / "model", video, "--out", tmp / f"maps{n}{''.join(options)}", *options)


if __name__ == "__main__":
    compiled = {"padim-ray score --compile on": lambda n, video, tmp: score_command(n, video, tmp, "--compile", "on")}
    against_bare(__doc__, "score", score_command, prepare=prepare, variants=compiled)
