"""Decoding throughput without Ray: the package's PyAV decode path (padim_ray.video.iter_unit_frames,
frames scaled to 256x256 by FFmpeg) in 1 and in P processes at once, each on its own STC-sized clip
(856x480 synthetic scene, mpeg4 at 8 Mbit/s; links to one file, so every process decodes the same
bytes). The rate at P processes is what a node can feed its actors; rates are marginal over two
frame counts per process, so opening a video is reported apart.

    python scripts/bench_decode.py [--frames 256 1024] [--processes 1 15] [--source synthetic] [--json PATH]
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import runrecord
from benchlib import IMAGE_SIZE, Row, clips, parse_args

DEFAULT_PROCESSES = [1, max(1, (os.cpu_count() or 2) - 1)]  # one, and every core but the driver's


def decode(video: str, frames: int) -> float:
    """Seconds to open `video` and decode its first `frames` frames at 256x256 (must all be there)."""
    from padim_ray.video import WorkUnit, iter_unit_frames

    started = time.perf_counter()
    count = sum(1 for _ in zip(range(frames), iter_unit_frames(WorkUnit(0, video), size=IMAGE_SIZE)))
    if count != frames:
        raise SystemExit(f"{video} has {count} frames, fewer than {frames}")
    return time.perf_counter() - started


def rate(pool: ProcessPoolExecutor, videos: list[Path], frames: int) -> float:
    """Wall seconds for every video of `videos` to decode `frames` frames, one process each."""
    started = time.perf_counter()
    list(pool.map(decode, map(str, videos), [frames] * len(videos)))
    return time.perf_counter() - started


def main() -> None:
    args = parse_args(__doc__, "decode", lambda p: p.add_argument("--processes", type=int, nargs="+", default=DEFAULT_PROCESSES))
    n1, n2 = args.frames
    most = max(args.processes)
    videos = clips([n2 * most], args.source, args.cache, most)[n2 * most]  # `most` links to one n2-frame clip
    rows = []
    print(f"decoding {args.source} at {IMAGE_SIZE}x{IMAGE_SIZE}, {n1} and {n2} frames per process", flush=True)
    for processes in args.processes:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(decode, map(str, videos[:processes]), [1] * processes))  # start the workers, untimed
            seconds = [min(rate(pool, videos[:processes], n) for _ in range(args.repeat)) for n in (n1, n2)]
        row = Row(f"decode, {processes} processes", [n1 * processes, n2 * processes], seconds, [0, 0])
        rows.append({**row.to_dict(row), "processes": processes, "per_process_fps": row.marginal_fps and row.marginal_fps / processes})
        print(f"  {processes:2d} processes: {row.marginal_fps or float('nan'):.0f} frames/s marginal "
              f"({(row.marginal_fps or 0) / processes:.0f} per process), {row.fixed_seconds or 0:.2f} s fixed", flush=True)
        runrecord.write(args.json, runrecord.record("decode", rows, source=str(args.source)))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
