"""Peak memory of a whole fit (driver + every Ray process) at 1x and 4x the frames.

PaDiM's statistics have a fixed size, so a streaming fit should need the same memory for any number
of frames. Each run is a fresh local Ray started by a child process; a sampler sums the PSS
(shared pages split among their users, so the object store is counted once) of that process and all
its descendants every 0.2 s.

    python scripts/bench_memory.py [--frames-per-video 100] [--videos 2] [--factor 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def tree_pss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(command: list[str]) -> tuple[int, float, str]:
    """Run `command`, return (peak PSS of its process tree in bytes, seconds, stdout)."""
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    root, peak, done = psutil.Process(child.pid), 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_pss(root))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = child.communicate()
    done.set()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"run failed: {' '.join(command)}")
    return peak, time.monotonic() - started, out


def run_fit(root: str, out: str) -> None:
    """Child: one fit on a fresh local Ray, default R18-Rd100 at 256x256 (random init: offline)."""
    import ray

    from padim_ray.config import ClusterConfig, ModelConfig
    from padim_ray.fit import fit_model
    from padim_ray.stc import scene_videos

    ray.init(address="local", num_cpus=2, object_store_memory=1 << 30, include_dashboard=False)
    result = fit_model(scene_videos(root, "01"), out, ModelConfig(weights="none"), ClusterConfig(actors=1))
    print(json.dumps({"frames": result.frames}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames-per-video", type=int, default=100)
    parser.add_argument("--videos", type=int, default=2, help="videos in the base run")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_fit(*args.child)
        return
    from padim_ray.synthetic import SyntheticSpec, make_synthetic

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for videos in (args.videos, args.videos * args.factor):
            root = make_synthetic(
                Path(tmp) / f"data{videos}",
                SyntheticSpec(train_videos=videos, train_frames=args.frames_per_video, test_clips=0, width=428, height=240),
            )
            out = Path(tmp) / f"model{videos}"
            peak, seconds, stdout = measure([sys.executable, __file__, "--child", str(root), str(out)])
            frames = json.loads(stdout.strip().splitlines()[-1])["frames"]
            rows.append((frames, peak, seconds))
            print(f"{frames:6d} frames: peak {peak / 2**30:.2f} GiB (driver + Ray), {seconds:.0f} s", flush=True)
    ratio = rows[1][1] / rows[0][1]
    print(f"peak memory ratio {rows[1][0]} / {rows[0][0]} frames: {ratio:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
