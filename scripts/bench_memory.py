"""Peak memory of `padim-ray fit` at large frame counts: does it stay flat as the footage grows?

One fit per count (R18-Rd100 at 256x256, random init) on the benchmark footage, each its own local
Ray; prints seconds, the peak PSS of the whole process tree (scripts/benchlib.py) and the PSS of
each process at that peak, largest first; writes them as JSON (scripts/runrecord.py).

    python scripts/bench_memory.py [--frames 1024 4096] [--json PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import runrecord
from bench_fit import fit_command
from benchlib import REPO, footage, measure, workdir

PROCESSES_SHOWN = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--json", type=Path, default=runrecord.default_path("memory"), help="where to write the results")
    args = parser.parse_args()
    videos = footage(args.frames, REPO / "data" / "vtest.avi", REPO / "runs" / "footage")
    rows = []
    for n, video in videos.items():
        with workdir() as tmp:
            run = measure(fit_command([video], tmp / "model"), n)
        print(f"padim-ray fit at {n} frames: {run.seconds:.1f} s, peak {run.peak_bytes / 2**30:.2f} GiB", flush=True)
        for process, pss in sorted(run.peak_parts.items(), key=lambda item: -item[1])[:PROCESSES_SHOWN]:
            print(f"  {pss / 2**30:6.2f} GiB  {process}", flush=True)
        largest = dict(sorted(run.peak_parts.items(), key=lambda item: -item[1])[:PROCESSES_SHOWN])
        rows.append({"frames": n, "seconds": run.seconds, "peak_bytes": run.peak_bytes, "processes": largest})
        runrecord.write(args.json, runrecord.record("memory", rows))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
