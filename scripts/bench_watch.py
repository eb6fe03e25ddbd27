"""How many cameras at 5 frames/s one machine watches with each frame scored within 1 s of its capture
(p99), measured as users run it: `padim-ray watch MODEL CLIP... --realtime` on a fresh local Ray.

Each camera is the first --seconds of vtest.avi (768x576 at 10 frames/s; scripts/fetch_vtest.sh)
replayed at its own rate (--realtime), so that its reader decodes every frame, as it would a live
stream's. The model is R18-Rd100 at 256x256 (random init: offline), fitted once on the clip, untimed;
the threshold is out of reach, so no event is written. For each camera count the command runs until
the clips end; each camera's last status line gives the frames it read, scored and dropped and its
capture-to-score latency (median and p99 over its last 2,000 frames). A count is sustained when no
camera dropped a frame and every camera's p99 is under 1 s.

With --memory-minutes M, it then watches 2 cameras for M minutes (vtest looped back and forth to
that length) and samples the PSS of the command's process tree every 30 s: memory must stay flat.

    python scripts/bench_watch.py [--cameras 1 2 4 8] [--seconds 30] [--scorers N] [--source synthetic] [--memory-minutes 10]
                                  [--json PATH]   # default: runs/bench/watch/
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

import av
import psutil

import runrecord
from bench_fit import fit_command
from benchlib import REPO, footage, measure, padim_ray, resolve_source, tree_pss, workdir

STATUS = re.compile(
    r"camera (?P<camera>\S+): (?P<state>\w+), read (?P<read>\d+), scored (?P<scored>\d+), dropped (?P<dropped>\d+), "
    r"reconnects \d+, latency median (?P<median>\d+) ms, p99 (?P<p99>\d+) ms"
)
P99_LIMIT_MS = 1000
MEMORY_CAMERAS = 2
MEMORY_SAMPLE_SECONDS = 30


def last_statuses(stderr: str) -> dict[str, dict]:
    """Each camera's last status line, parsed."""
    statuses = {}
    for match in STATUS.finditer(stderr):
        statuses[match["camera"]] = {key: (value if key in ("camera", "state") else int(value)) for key, value in match.groupdict().items()}
    return statuses


def watch_command(cameras: int, clip: Path, model: Path, out: Path, fps: float, status_every: int, scorers: int = 0) -> list[str]:
    """`padim-ray watch` of `cameras` replays of `clip` at `fps`, with a threshold no frame reaches."""
    sources = [f"cam{i}={clip}" for i in range(cameras)]
    return padim_ray(
        "watch", model, *sources, "--out", out, "--realtime", "--fps", fps, "--threshold", "1e30", "--status-every", status_every, "--scorers", scorers,
    )


def watch_row(cameras: int, clip: Path, model: Path, out: Path, fps: float, scorers: int) -> dict:
    """`padim-ray watch` of `cameras` replays of `clip`: what they read, scored and dropped, and their latencies."""
    run = measure(watch_command(cameras, clip, model, out, fps, status_every=10, scorers=scorers))
    statuses = last_statuses(run.stderr)
    if len(statuses) != cameras:
        raise SystemExit(f"expected the status of {cameras} cameras, got {sorted(statuses)}:\n{run.stderr[-3000:]}")
    values = list(statuses.values())
    row = {
        "cameras": cameras, "fps": fps, "scorers": scorers, "read": sum(s["read"] for s in values), "scored": sum(s["scored"] for s in values),
        "dropped": sum(s["dropped"] for s in values), "latency_ms_median_worst": max(s["median"] for s in values),
        "latency_ms_p99_worst": max(s["p99"] for s in values), "peak_gib": round(run.peak_bytes / 2**30, 2), "seconds": round(run.seconds, 1),
    }
    row["sustained"] = row["dropped"] == 0 and row["latency_ms_p99_worst"] < P99_LIMIT_MS
    return row


def memory_series(clip: Path, model: Path, out: Path, fps: float) -> list[dict]:
    """PSS of `padim-ray watch` of MEMORY_CAMERAS replays of `clip`, every MEMORY_SAMPLE_SECONDS until the clips end."""
    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: nobody reads it until the end, and a full pipe would block the command
        child = subprocess.Popen(watch_command(MEMORY_CAMERAS, clip, model, out, fps, status_every=60), stdout=subprocess.DEVNULL, stderr=errors)
        root, started, samples = psutil.Process(child.pid), time.monotonic(), []
        while child.poll() is None:
            samples.append({"seconds": round(time.monotonic() - started), "pss_bytes": sum(tree_pss(root).values())})
            try:
                child.wait(MEMORY_SAMPLE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        errors.seek(0)
        stderr = errors.read()
    if child.returncode:
        raise SystemExit(f"watch failed (exit {child.returncode}):\n{stderr[-3000:]}")
    statuses = last_statuses(stderr)
    if sum(s["dropped"] for s in statuses.values()):
        print(f"note: frames were dropped during the memory run: {statuses}")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4, 8], help="camera counts to try")
    parser.add_argument("--seconds", type=int, default=30, help="seconds of footage each camera replays")
    parser.add_argument("--fps", type=float, default=5.0, help="frames taken per second of each camera")
    parser.add_argument("--memory-minutes", type=float, default=0, help="then watch 2 cameras this long, sampling memory (0: not)")
    parser.add_argument("--source", type=Path, default=REPO / "data" / "vtest.avi", help="the footage (scripts/fetch_vtest.sh), or synthetic")
    parser.add_argument("--scorers", type=int, default=0, help="watch --scorers: scoring actors (0: one per GPU, at least one)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "footage", help="re-encoded footage, kept between runs")
    parser.add_argument("--json", type=Path, default=runrecord.default_path("watch"), help="where to write the results (default: runs/bench/)")
    args = parser.parse_args()
    source = resolve_source(args.source, args.cache.resolve()).resolve()
    with av.open(str(source)) as container:
        rate = float(container.streams.video[0].average_rate)
    frames = round(args.seconds * rate)
    clip = footage([frames], source, args.cache.resolve())[frames]
    rows, memory = [], {}
    with workdir() as tmp:
        measure(fit_command([clip], tmp / "model"))
        for cameras in args.cameras:
            rows.append(watch_row(cameras, clip, tmp / "model", tmp / f"watch-{cameras}", args.fps, args.scorers))
            print(rows[-1], flush=True)
        if args.memory_minutes > 0:
            long_frames = round(args.memory_minutes * 60 * rate)
            long_clip = footage([long_frames], source, args.cache.resolve())[long_frames]
            samples = memory_series(long_clip, tmp / "model", tmp / "watch-memory", args.fps)
            memory = {"memory": {"cameras": MEMORY_CAMERAS, "minutes": args.memory_minutes, "samples": samples}}
            print(memory, flush=True)
    runrecord.write(args.json.resolve(), runrecord.record("watch", rows, clip_seconds=args.seconds, source=args.source.name, **memory))
    print(f"{'cameras':>8} {'read':>6} {'scored':>7} {'dropped':>8} {'median ms':>10} {'p99 ms':>7} {'peak GiB':>9}  sustained")
    for row in rows:
        print(
            f"{row['cameras']:>8} {row['read']:>6} {row['scored']:>7} {row['dropped']:>8} {row['latency_ms_median_worst']:>10} "
            f"{row['latency_ms_p99_worst']:>7} {row['peak_gib']:>9}  {'yes' if row['sustained'] else 'no'}"
        )
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
