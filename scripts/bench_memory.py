"""Peak memory of `padim-ray fit` at large frame counts: does it stay flat? (issue 6)

One fit per count (R18-Rd100 at 256x256, random init) on the benchmark footage, each its own local
Ray; prints seconds, the peak PSS of the whole process tree (scripts/benchlib.py) and the PSS of
each process at that peak, largest first.

    python scripts/bench_memory.py [--frames 1024 4096]
"""

from __future__ import annotations

import argparse

from bench_fit import fit_command
from benchlib import REPO, footage, measure, workdir

PROCESSES_SHOWN = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args()
    videos = footage(args.frames, REPO / "data" / "vtest.avi", REPO / "runs" / "footage")
    for n, video in videos.items():
        with workdir() as tmp:
            run = measure(fit_command([video], tmp / "model"), n)
        print(f"padim-ray fit at {n} frames: {run.seconds:.1f} s, peak {run.peak_bytes / 2**30:.2f} GiB", flush=True)
        for process, pss in sorted(run.peak_parts.items(), key=lambda item: -item[1])[:PROCESSES_SHOWN]:
            print(f"  {pss / 2**30:6.2f} GiB  {process}", flush=True)


if __name__ == "__main__":
    main()
