"""Shared pieces of the benchmarks: footage, timed children with their peak memory, marginal rates, reports.

Every measurement runs as a child process, once per frame count and round, on the same footage: the
first N frames of OpenCV's vtest.avi (768x576, real pedestrians), re-encoded at 8 Mbit/s. Rows take
turns over `--repeat` rounds and keep their median time per count (this shared 2-core machine varies
by 10-20% from minute to minute, so one run per row is not enough to compare rows). A rate is marginal,
(n2 - n1) / (t2 - t1), so start-up costs cancel; what they cost is reported separately as the fixed
seconds t1 - n1 / rate. A child that times itself (a component: decoding, the bare backbone) prints
`{"frames": n, "seconds": t}` as its last line, its set-up excluded; a command (`padim-ray fit`) is
timed from start to exit. Peak memory is the PSS (shared pages split among their users, so the Ray
object store counts once) of the child and all its descendants, which includes the local Ray
cluster a child starts, sampled every second.

The yardsticks, in every table: decode-only is the package's decode path (work units -> Ray Data
blocks of 256x256 uint8 frames) consumed with iter_batches on a local Ray; the bare backbone is
torchvision's ResNet18 up to layer3 as shipped, on frames already decoded, resized and normalised,
batch 32, torch on every core (or the GPU): the physical limit of any PaDiM-R18 on this machine, and
the denominator of every ratio. The embedder row is padim_ray's Embedder alone on the same frames
(batch norms folded into convolutions, channels_last), to show what the pipeline around it costs.

Children run in a temp dir with a private Ray temp dir and no RAY_ADDRESS (`workdir`), and start their
own local Ray (`address="local"`), so they never attach to (or disturb) another cluster on the machine.

    python scripts/benchlib.py decode VIDEO...     # child: the package's decode path on a local Ray
    python scripts/benchlib.py backbone VIDEO...   # child: the bare backbone on pre-resized frames
    python scripts/benchlib.py embedder VIDEO...   # child: padim-ray's Embedder on pre-resized frames
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil

import runrecord

REPO = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 256  # ModelConfig's default, the paper's STC size
BATCH = 32  # ClusterConfig's default batch size
SYNTHETIC = "synthetic"  # --source value for generated STC-sized footage
BARE = "bare backbone (torchvision)"  # the yardstick row, denominator of every ratio
SAMPLE_SECONDS = 1.0  # memory sampling interval
BITRATE = 8_000_000  # PyAV's default (~200 kbit/s) smears real footage (docs/design.md, "Video facts")


def parse_args(doc: str, name: str, extra=None) -> argparse.Namespace:
    """The options every benchmark takes; `extra(parser)` adds a script's own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs=2, default=[128, 1024], metavar=("N1", "N2"), help="the two frame counts")
    parser.add_argument("--json", type=Path, default=runrecord.default_path(name), help="where to write the results (default: runs/bench/)")
    parser.add_argument(
        "--source", type=Path, default=REPO / "data" / "vtest.avi",
        help="vtest.avi (scripts/fetch_vtest.sh), or `synthetic`: an STC-sized 856x480 synthetic scene, looped",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every row; each keeps its median time per count")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "footage", help="re-encoded footage, kept between runs")
    parser.add_argument(
        "--clips", type=int, default=1,
        help="inputs per frame count: N / CLIPS frames of the source, CLIPS times (each clip is a work unit with its own decoder)",
    )
    if extra:
        extra(parser)
    args = parser.parse_args()
    if not 0 < args.frames[0] < args.frames[1]:
        parser.error(f"--frames needs 0 < N1 < N2, got {args.frames}")
    if args.repeat < 1:
        parser.error(f"--repeat needs at least 1, got {args.repeat}")
    if args.clips < 1 or any(n % args.clips for n in args.frames):
        parser.error(f"--clips must be at least 1 and divide both frame counts, got {args.clips} for {args.frames}")
    args.json, args.cache = args.json.resolve(), args.cache.resolve()  # children run elsewhere
    args.source = args.source if str(args.source) == SYNTHETIC else args.source.resolve()
    return args


# --- footage ---------------------------------------------------------------------------------------


def footage(counts: list[int], source: Path, cache: Path) -> dict[int, Path]:
    """n frames of `source` re-encoded (mpeg4 in .avi, 8 Mbit/s, source size and rate), per n."""
    source = resolve_source(source, cache)
    if not source.exists():
        raise SystemExit(f"{source} is missing: run `bash scripts/fetch_vtest.sh` or pass --source")
    videos = {}
    for n in counts:
        path = cache / f"{source.stem}_{n}.avi"
        if not path.exists():
            _reencode(source, path, n)
        videos[n] = path
    return videos


def clips(counts: list[int], source: Path, cache: Path, per_count: int) -> dict[int, list[Path]]:
    """Per n, `per_count` inputs of n / per_count frames of `source` each: links to one re-encoded
    video under distinct names, so that each is a work unit of its own (decoded by its own task) at
    the cost of decoding distinct videos."""
    videos = footage([n // per_count for n in counts], source, cache)
    if per_count == 1:
        return {n: [videos[n]] for n in counts}
    inputs = {}
    for n in counts:
        video = videos[n // per_count]
        inputs[n] = [video.with_name(f"{video.stem}_clip{i:02d}.avi") for i in range(per_count)]
        for link in inputs[n]:
            if not link.exists():
                os.link(video, link)
    return inputs


def resolve_source(source: Path, cache: Path) -> Path:
    """`source`, or for --source synthetic a 256-frame STC-sized (856x480) synthetic scene with walkers
    (padim_ray.synthetic), made once in `cache`."""
    if str(source) != SYNTHETIC:
        return source
    from padim_ray.synthetic import SyntheticSpec, make_synthetic

    cache.mkdir(parents=True, exist_ok=True)
    clip = cache / "synthetic.avi"
    if not clip.exists():
        root = make_synthetic(cache / "synthetic-scene", SyntheticSpec(train_videos=1, train_frames=256, test_clips=0))
        (root / "training" / "videos" / "01_001.avi").rename(clip)
    return clip


def _reencode(source: Path, target: Path, frames: int) -> None:
    """The first `frames` frames of `source`, looping back to its start if it is shorter (ping-pong,
    so the loop has no jump), re-encoded at 8 Mbit/s."""
    import av

    with av.open(str(source)) as src:
        decoded = src.streams.video[0]
        rate = decoded.average_rate
        pictures = [frame.to_ndarray(format="rgb24") for _, frame in zip(range(frames), src.decode(decoded))]
    cycle = pictures + pictures[-2:0:-1]  # forwards, then backwards
    partial = target.with_suffix(".partial.avi")
    with av.open(str(partial), "w") as dst:
        stream = dst.add_stream("mpeg4", rate=rate)
        stream.height, stream.width = pictures[0].shape[:2]
        stream.pix_fmt, stream.bit_rate = "yuv420p", BITRATE
        stream.thread_type = "AUTO"
        for index in range(frames):
            dst.mux(stream.encode(av.VideoFrame.from_ndarray(cycle[index % len(cycle)], format="rgb24")))
        dst.mux(stream.encode())
    partial.rename(target)


def resized_batches(video: Path, batch: int = BATCH, size: int = IMAGE_SIZE) -> Iterator[np.ndarray]:
    """`video`'s frames as (<= batch, size, size, 3) uint8, resized by decord while decoding, read in order."""
    import decord

    reader = decord.VideoReader(str(video), width=size, height=size, num_threads=1)
    frames = []
    while True:
        try:
            frames.append(reader.next().asnumpy())
        except StopIteration:
            break
        if len(frames) == batch:
            yield np.stack(frames)
            frames = []
    if frames:
        yield np.stack(frames)


def decode_resized(video: Path) -> np.ndarray:
    """All of `video`'s frames as (T, 256, 256, 3) uint8."""
    return np.concatenate(list(resized_batches(video)))


# --- timed children and their memory ---------------------------------------------------------------


def tree_pss(root: psutil.Process) -> dict[str, int]:
    """PSS in bytes of `root` and each of its descendants, keyed 'pid title' (e.g. '812 ray::IDLE')."""
    parts = {}
    for _ in range(5):  # listing fails when a child ends meanwhile
        try:
            procs = [root, *root.children(recursive=True)]
            break
        except psutil.NoSuchProcess:
            procs = [root]
    for proc in procs:
        try:
            parts[f"{proc.pid} {' '.join(proc.cmdline())[:60]}"] = proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return parts


@dataclass
class Run:
    seconds: float  # the child's own timing if it printed one, else start to exit
    peak_parts: dict[str, int]  # PSS of each process when the child's process tree peaked
    stdout: str
    stderr: str

    @property
    def peak_bytes(self) -> int:
        """Peak PSS of the child's process tree."""
        return sum(self.peak_parts.values())


@contextmanager
def workdir() -> Iterator[Path]:
    """A temp dir made the current one, with a Ray temp dir inside and RAY_ADDRESS unset, for this
    process and its children: they start their own local Ray, never attach to another cluster, and
    their Ray workers do not import from the folder the benchmark was started in."""
    saved = dict(os.environ), Path.cwd()
    with tempfile.TemporaryDirectory(prefix="pb", dir="/tmp") as tmp:  # short: Ray's socket paths stay < 107 chars
        os.environ.pop("RAY_ADDRESS", None)
        os.environ["RAY_TMPDIR"] = f"{tmp}/ray"
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(saved[1])
            os.environ.clear()
            os.environ.update(saved[0])


def measure(command: list[str], frames: int | None = None) -> Run:
    """Run `command` as a child; its time, the peak PSS of its process tree, its stdout and stderr.

    A child whose last stdout line is JSON with `seconds` timed itself; with `frames` given, its
    `frames` (when it reports them) must match.
    """
    started = time.monotonic()
    child = subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak_parts, done = psutil.Process(child.pid), {}, threading.Event()

    def sample() -> None:
        # reading PSS costs ~80 ms of CPU for a Ray process tree: sample once a second at the lowest
        # priority, so the sampler does not slow the many-process commands it measures
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        nonlocal peak_parts
        while not done.is_set():
            parts = tree_pss(root)
            if sum(parts.values()) > sum(peak_parts.values()):
                peak_parts = parts
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = child.communicate()
    seconds = time.monotonic() - started
    done.set()
    sampler.join()
    if child.returncode:
        print(*err.strip().splitlines()[-40:], sep="\n", file=sys.stderr)
        raise SystemExit(f"failed (exit {child.returncode}): {' '.join(map(str, command))}")
    report = _last_json(out)
    if frames is not None and report.get("frames", frames) != frames:
        raise SystemExit(f"{' '.join(map(str, command))} handled {report['frames']} frames, not {frames}")
    return Run(report.get("seconds", seconds), peak_parts, out, err)


def _last_json(out: str) -> dict:
    lines = out.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}
    return report if isinstance(report, dict) else {}


def padim_ray(*args) -> list[str]:
    """The padim-ray command run by this Python (`python -m padim_ray`) with `args`, on a fresh local Ray.

    Without an address it would first try Ray's "auto", which attaches to ANY Ray running on the
    machine, even one another process started with ray.init().
    """
    return [sys.executable, "-m", "padim_ray", *map(str, args), "--address", "local"]


def component(kind: str, videos: list[Path]) -> list[str]:
    """The command of one of this file's children (`decode`, `backbone`, `embedder`) on `videos`."""
    return [sys.executable, str(Path(__file__).resolve()), kind, *map(str, videos)]


# --- rates and reports -----------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    frames: list[int]
    seconds: list[float]
    peak_bytes: list[int]

    @property
    def fps(self) -> list[float]:
        return [n / t for n, t in zip(self.frames, self.seconds)]

    @property
    def marginal_fps(self) -> float | None:
        """(n2 - n1) / (t2 - t1); None when the larger count did not take longer (too few frames to tell)."""
        (n1, n2), (t1, t2) = self.frames, self.seconds
        return (n2 - n1) / (t2 - t1) if t2 > t1 else None

    @property
    def fixed_seconds(self) -> float | None:
        return None if self.marginal_fps is None else self.seconds[0] - self.frames[0] / self.marginal_fps

    def ratio(self, bare: Row) -> float | None:
        return None if None in (self.marginal_fps, bare.marginal_fps) else self.marginal_fps / bare.marginal_fps

    def to_dict(self, bare: Row) -> dict:
        properties = {"fps": self.fps, "marginal_fps": self.marginal_fps, "fixed_seconds": self.fixed_seconds}
        return {**asdict(self), **properties, "ratio_to_bare": self.ratio(bare)}


def measure_rows(commands: dict, videos: dict[int, Path], repeat: int) -> list[Row]:
    """One table row per `commands` entry (row name -> `command(video, scratch)`), run at every frame count.

    Each run gets an empty `scratch` folder for its outputs, removed after it.

    The rows take turns, `repeat` rounds of all of them, and each row keeps the median time per count
    (and its largest peak): a slow spell of a shared machine then lands on every row instead of one.
    """
    seconds = {name: {n: [] for n in videos} for name in commands}
    peaks = {name: {n: 0 for n in videos} for name in commands}
    for round_ in range(1, repeat + 1):
        for name, command in commands.items():
            for n, video in videos.items():
                with tempfile.TemporaryDirectory(prefix="run", dir=Path.cwd()) as scratch:
                    run = measure(command(video, Path(scratch)), n)
                seconds[name][n].append(run.seconds)
                peaks[name][n] = max(peaks[name][n], run.peak_bytes)
                print(f"  [{round_}/{repeat}] {name} at {n} frames: {run.seconds:.1f} s, peak {run.peak_bytes / 2**30:.2f} GiB", flush=True)
    return [Row(name, list(videos), [float(np.median(seconds[name][n])) for n in videos], list(peaks[name].values())) for name in commands]


def component_rows(*kinds: str) -> dict:
    """Rows of this file's children: "decode", "backbone" (the bare yardstick, BARE) or "embedder"."""
    names = {"decode": "decode-only", "backbone": BARE, "embedder": "padim-ray embedder alone"}
    return {names[kind]: lambda videos, scratch, kind=kind: component(kind, videos) for kind in kinds}


def against_bare(doc: str, name: str, command, prepare=None, variants: dict | None = None) -> None:
    """A benchmark's main: decode-only, the bare backbone, the embedder and `command(videos, tmp, scratch)`,
    each at both counts (see measure_rows; `videos` are the --clips inputs of one count).

    `prepare(videos, tmp)` runs first, untimed (e.g. the fit a scoring benchmark needs); `variants`
    (row name -> command like `command`) are measured in the same rounds.
    """
    args = parse_args(doc, name)
    videos = clips(args.frames, args.source, args.cache, args.clips)
    with workdir() as tmp:
        if prepare:
            prepare(videos, tmp)
        ours = {row: lambda inputs, scratch, run=run: run(inputs, tmp, scratch) for row, run in {f"padim-ray {name}": command, **(variants or {})}.items()}
        rows = measure_rows({**component_rows("decode", "backbone", "embedder"), **ours}, videos, args.repeat)
    report(name, rows, next(row for row in rows if row.name == BARE), args.json, {"repeat": args.repeat})


def report(name: str, rows: list[Row], bare: Row, json_path: Path, extra: dict | None = None, notes: list[str] = ()) -> None:
    """Print the markdown table (rates relative to `bare`) and `notes`, and write everything as JSON."""
    n1, n2 = rows[0].frames
    print(f"\n| {name} | frames/s @{n1} | frames/s @{n2} | marginal frames/s | ÷ bare | fixed s | peak GiB @{n1} | peak GiB @{n2} |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [
            *(f"{f:.1f}" for f in row.fps),
            number(row.marginal_fps, ".1f"),
            number(row.ratio(bare), ".2f"),
            number(row.fixed_seconds, ".1f"),
            *(f"{p / 2**30:.2f}" for p in row.peak_bytes),
        ]
        print(f"| {row.name} | " + " | ".join(cells) + " |")
    print("", *notes, sep="\n")
    versions = {"torch": _version("torch"), "ray": _version("ray")}
    result = runrecord.record(name, [row.to_dict(bare) for row in rows], versions=versions, bare=bare.name, **(extra or {}))
    runrecord.write(json_path, result)
    print(f"written {json_path}")


def number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# --- children --------------------------------------------------------------------------------------


def decode_only(videos: list[Path]) -> dict:
    """The package's decode path (work units -> Ray Data blocks of resized uint8 frames) on a local Ray."""
    import ray

    from padim_ray.config import ClusterConfig
    from padim_ray.frames import frames_dataset
    from padim_ray.video import make_units

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    units, _ = make_units(videos)
    started = time.perf_counter()
    dataset = frames_dataset(units, IMAGE_SIZE, 1, ClusterConfig().decode_batch)
    rows = sum(len(block["frame"]) for block in dataset.iter_batches(batch_size=None))
    return {"frames": rows, "seconds": time.perf_counter() - started}


def bare_backbone(videos: list[Path]) -> dict:
    """torchvision's ResNet18 up to layer3 as shipped (random init, eval, NCHW float32 with torch's
    defaults: on CUDA, cuDNN may use TF32) on frames already decoded, resized and normalised, batch
    32, every core or the GPU; the physical limit any PaDiM-R18 on this machine is measured against.
    Warm-up excluded."""
    import torch
    from torchvision.models import resnet18
    from torchvision.models.feature_extraction import create_feature_extractor

    device, frames = _prepare_torch(videos)
    backbone = create_feature_extractor(resnet18().eval(), return_nodes=["layer1", "layer2", "layer3"]).to(device)
    batches = [
        ((torch.from_numpy(frames[i : i + BATCH]).permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.225).contiguous()
        for i in range(0, len(frames), BATCH)
    ]
    with torch.inference_mode():
        return _timed_batches(lambda batch: backbone(batch.to(device, non_blocking=True)), batches, device)


def embedder_only(videos: list[Path]) -> dict:
    """padim_ray's Embedder (batch norms folded, channels_last, positions-major output) on the same
    decoded, resized uint8 frames, batch 32, every core or the GPU."""
    from padim_ray.config import ModelConfig
    from padim_ray.embedding import Embedder

    device, frames = _prepare_torch(videos)
    embedder = Embedder(ModelConfig(weights="none"), device)
    return _timed_batches(embedder, [frames[i : i + BATCH] for i in range(0, len(frames), BATCH)], device)


def _prepare_torch(videos: list[Path]):
    """The device, and every frame of `videos` decoded and resized by the package's decode path (PyAV)."""
    import torch

    from padim_ray.video import WorkUnit, iter_unit_frames

    torch.set_num_threads(os.cpu_count())
    frames = np.stack([frame for video in videos for _, frame in iter_unit_frames(WorkUnit(0, str(video)), size=IMAGE_SIZE)])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu"), frames


def _timed_batches(step, batches: list, device) -> dict:
    import torch

    step(batches[0])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"frames": sum(len(b) for b in batches), "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    kind, videos = sys.argv[1], [Path(p) for p in sys.argv[2:]]
    print(json.dumps({"decode": decode_only, "backbone": bare_backbone, "embedder": embedder_only}[kind](videos)))
