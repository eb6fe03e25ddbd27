"""`padim-ray watch`: score live cameras (or files replayed as cameras) until stopped, and emit events as they happen.

It runs in one driver process (see docs/design.md, "Live cameras"):
- the cameras come from SOURCE arguments and a camera list file (cameras.py), each with its model and threshold;
- one reader thread per camera (readers.py) decodes, samples to --fps and keeps the newest frames;
- one pool of scoring actors per model (live_scoring.py; a GPU each when the cluster has them) scores
  batches mixed from its cameras, all actors at once, results taken back in order; a lost actor is
  replaced and the batch it held counted as dropped;
- the driver runs one events.RegionTracker per camera on the maps (at the model's input size) with the
  camera's threshold, and writes every notice (opened, updated, closed) as a JSON line on stdout and to
  OUT/events.jsonl (flushed per line), and at each close a JPEG of the event's peak frame with its
  heatmap and box to OUT/snapshots/; with --map-segments, rolling downsampled maps to OUT/maps/ (map_segments.py);
- every --status-every seconds a line per camera (frames read, scored, dropped, reconnects, median
  and p99 latency from capture to score) is logged on stderr, and the same figures are Ray metrics.
Ctrl-C and stop signals end it within a few seconds, open events closed and files flushed; with only
file sources it ends when they all end.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from padim_ray.camera_metrics import CameraMetrics
from padim_ray.cameras import CameraSpec
from padim_ray.config import ConfigError
from padim_ray.decisions import Decision, DecisionOptions, resolve_decision
from padim_ray.embedding import Embedder
from padim_ray.events import Event, Notice, RegionTracker
from padim_ray.live_scoring import Restarts, ScorerPool, actor_plans
from padim_ray.map_segments import MapSegments, SegmentOptions
from padim_ray.readers import Reader, Sample
from padim_ray.runtime import connect, describe_plan
from padim_ray.score import SCORE_REFUSAL
from padim_ray.stop_signals import deferred
from padim_ray.store import open_model
from padim_ray.thresholds import NOT_CALIBRATED
from padim_ray.viz import Marks, draw_boxes, overlay  # imported before a stop needs a snapshot: matplotlib takes seconds to load
from padim_ray.webhook import Webhook

log = logging.getLogger(__name__)
EVENTS_LOG = "events.jsonl"
SNAPSHOTS = "snapshots"
MAPS = "maps"
WEBHOOK_WAIT = 2.0  # seconds the end of a watch waits for queued webhook notices (a stop must end within seconds)
LATENCY_WINDOW = 2000  # latest latencies per camera that the status's median and p99 are read from


@dataclass(frozen=True)
class WatchOptions:
    fps: float = 5.0  # frames taken per second of each source
    realtime: bool = False  # files are replayed at their own frame rate (as cameras), else read as fast as scored
    status_every: float = 10.0  # seconds between status lines
    batch: int = 16  # most frames per scoring call
    scorers: int = 0  # scoring actors per model; 0: one per GPU of the cluster (shared among the models), at least one
    max_restarts: int = 3  # lost scoring actors replaced before watch stops
    decisions: DecisionOptions = DecisionOptions()  # every camera's, unless its camera list entry names a threshold
    webhook: str | None = None  # an http(s) URL every notice is POSTed to (padim_ray.webhook)
    segments: SegmentOptions = SegmentOptions()  # rolling downsampled maps (off by default)

    def __post_init__(self):
        if not 0 < self.fps <= 120:
            raise ConfigError(f"--fps must be above 0 and at most 120, got {self.fps:g}")
        if not self.status_every > 0:
            raise ConfigError(f"--status-every must be above 0 seconds, got {self.status_every:g}")
        if not 0 <= self.scorers <= 64:
            raise ConfigError(f"--scorers must be from 0 (one per GPU) to 64, got {self.scorers}")
        if self.webhook is not None and not self.webhook.lower().startswith(("http://", "https://")):
            raise ConfigError(f"--webhook must be an http:// or https:// URL, got {self.webhook}")


@dataclass
class Camera:
    """One source's reader, tracker, and what its status and snapshots need."""

    name: str
    reader: Reader
    tracker: RegionTracker
    decision: Decision
    pool: ScorerPool  # its model's scoring actors
    recent: collections.deque  # (index, frame, map) of the last frames: an event's peak may precede its opening
    segments: MapSegments | None = None  # its rolling maps (--map-segments)
    in_flight: int = 0  # its samples submitted for scoring and not yet back
    peaks: dict = field(default_factory=dict)  # open event id -> (frame, map) at its peak
    scored: int = 0
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW))
    ending: str = ""  # "ended" (its file was read) or "stopped" (by a stop), once finished

    @property
    def finished(self) -> bool:
        return bool(self.ending)

    def status(self) -> dict:
        stats = self.reader.stats
        latency = np.array(self.latencies) * 1000 if self.latencies else np.full(1, np.nan)
        return {
            "camera": self.name, "read": stats.read, "scored": self.scored, "dropped": stats.dropped, "reconnects": stats.reconnects,
            "latency_ms_median": float(np.median(latency)), "latency_ms_p99": float(np.percentile(latency, 99)),
            "state": self.ending or ("up" if stats.open else "down"), "error": stats.error,
        }


def format_status(status: dict) -> str:
    latency = (f"latency median {status['latency_ms_median']:.0f} ms, p99 {status['latency_ms_p99']:.0f} ms" if status["scored"]
               else "no latency yet")
    line = (f"camera {status['camera']}: {status['state']}, read {status['read']}, scored {status['scored']}, dropped {status['dropped']}, "
            f"reconnects {status['reconnects']}, {latency}")
    return line + (f" ({status['error']})" if status["error"] and status["state"] != "up" else "")


@dataclass
class WatchResult:
    out: Path
    closed: int  # events closed (all cameras)
    cameras: dict[str, dict]  # name -> its last status
    lost_scorers: int = 0  # scoring actors lost and replaced


class EventSink:
    """Notices as JSON lines on stdout and appended to OUT/events.jsonl, each flushed at once; snapshots at closes."""

    def __init__(self, out: Path, stdout=None, webhook: Webhook | None = None):
        self.out, self.webhook = out, webhook
        self.run = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())  # in snapshot names: event ids count from 0 in every run
        (out / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
        self.file = open(out / EVENTS_LOG, "a")
        self.stdout = stdout or sys.stdout
        self.closed = 0

    def emit(self, camera: Camera, notice: Notice, at: float) -> None:
        event = notice.event
        record = {"camera": camera.name, "notice": notice.kind, "time": at, **asdict(event), "threshold": camera.decision.threshold.value}
        if notice.kind == "closed":
            peak = camera.peaks.pop(event.event, None)
            if peak is not None:
                record["snapshot"] = str(self.snapshot(camera, event, *peak))
        line = json.dumps(record) + "\n"
        with deferred():  # a stop waits until the line is in both places
            for stream in (self.file, self.stdout):
                stream.write(line)
                stream.flush()
            self.closed += notice.kind == "closed"
        if self.webhook:
            self.webhook.post(record)

    def snapshot(self, camera: Camera, event: Event, frame: np.ndarray, anomaly_map: np.ndarray) -> Path:
        """The peak frame with the heatmap of its regions over the off level (from there up to the peak) and the event's box, as a JPEG."""
        threshold = camera.decision.threshold.value
        off = camera.decision.events.hysteresis * threshold
        picture = overlay(frame, np.maximum(anomaly_map - off, 0), max(event.peak_score - off, 1e-6))
        scale = (frame.shape[0] / anomaly_map.shape[0], frame.shape[1] / anomaly_map.shape[1])
        draw_boxes(picture, event.peak_frame, Marks(threshold, [event]), scale)
        path = self.out / SNAPSHOTS / f"{camera.name}_{self.run}_{event.event:04d}.jpg"
        Image.fromarray(picture).save(path, quality=90)
        return path

    def close(self) -> None:
        self.file.close()
        if self.webhook:
            self.webhook.close(wait=WEBHOOK_WAIT)


@dataclass(frozen=True)
class ModelPlan:
    """A model's path as its store resolves it, its input size, and the threshold each of its cameras decides with."""

    path: str
    size: int
    decisions: dict[str, Decision]  # camera name -> decision


def plan_models(cameras: list[CameraSpec], options: DecisionOptions) -> dict[str, ModelPlan]:
    """Per model: open it, check this installation reproduces it, resolve its cameras' thresholds (before any cluster work)."""
    plans = {}
    for model in dict.fromkeys(camera.model for camera in cameras):
        store = open_model(model)
        store.check_reproduced(Embedder(store.attributes.model_config), SCORE_REFUSAL)
        decisions = {}
        for camera in (c for c in cameras if c.model == model):
            decision = resolve_decision(store.attributes, replace(options, threshold=camera.threshold or options.threshold))
            if decision is None:
                raise ConfigError(f"watch needs a threshold for camera {camera.name}: {NOT_CALIBRATED}")
            decisions[camera.name] = decision
        plans[model] = ModelPlan(str(store.path), store.attributes.image_size, decisions)
    return plans


def watch(cameras: list[CameraSpec], out: str | Path, options: WatchOptions = WatchOptions(), address: str | None = None, stdout=None) -> WatchResult:
    """Watch `cameras` until stopped (KeyboardInterrupt, re-raised after open events are closed and files
    flushed) or, with only file sources, until they all end."""
    plans = plan_models(cameras, options.decisions)
    if "://" in str(out):
        raise ConfigError(f"watch writes --out to a local folder, got {out}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for model, plan in plans.items():
        thresholds = ", ".join(f"{name} {d.threshold.value:.4g} ({d.threshold.meaning})" for name, d in plan.decisions.items())
        log.info("watch: model %s at %g fps, thresholds: %s", model, options.fps, thresholds)
    connect(address)
    metrics = CameraMetrics()
    sink = EventSink(out, stdout, Webhook(options.webhook) if options.webhook else None)
    restarts, pools, watched = Restarts(options.max_restarts), {}, []
    try:
        for (model, model_plan), actors in zip(plans.items(), actor_plans(len(plans), options.scorers)):
            pools[model] = ScorerPool(model_plan.path, actors, restarts)
        log.info("watch: %d camera(s), scoring actors per model: %s -> %s", len(cameras), describe_plan(actors), out)
        for spec in cameras:
            watched.append(_camera(spec, plans[spec.model], pools[spec.model], out, options))
        _loop(watched, list(pools.values()), sink, metrics, options)
    finally:
        for camera in watched:
            camera.reader.stop(wait=0.2)
            metrics.follow(camera.name, camera.reader.stats)
        for camera in watched:
            _finish(camera, sink, "stopped")
        sink.close()
        for pool in pools.values():
            pool.close()
        for camera in watched:
            log.info("watch: %s", format_status(camera.status()))
    return WatchResult(out, sink.closed, {camera.name: camera.status() for camera in watched}, restarts.lost)


def _camera(spec: CameraSpec, plan: ModelPlan, pool: ScorerPool, out: Path, options: WatchOptions) -> Camera:
    decision = plan.decisions[spec.name]
    tracker = RegionTracker(options.fps, decision.threshold.value, decision.events)
    recent = collections.deque(maxlen=tracker.min_frames + tracker.merge_frames + 2)
    segments = MapSegments(out / MAPS / spec.name, options.segments) if options.segments.seconds else None
    reader = Reader(spec.name, spec.source, options.fps, plan.size, options.realtime).start()
    return Camera(spec.name, reader, tracker, decision, pool, recent, segments)


def _loop(cameras: list[Camera], pools: list[ScorerPool], sink: EventSink, metrics: CameraMetrics, options: WatchOptions) -> None:
    next_status = time.monotonic() + options.status_every
    turn = 0
    while True:
        for camera in cameras:
            if camera.reader.done and not camera.in_flight and not camera.finished:
                _finish(camera, sink, "ended")
        live = [camera for camera in cameras if not camera.finished]
        if not live and not any(pool.busy for pool in pools):
            return
        turn += 1
        submitted = 0
        for pool in pools:
            while pool.has_idle:
                batch = _take_batch([camera for camera in live if camera.pool is pool], turn, options.batch)
                if not batch:
                    break
                pool.submit(np.stack([sample.model_frame for _, sample in batch]), batch)
                for camera, _ in batch:
                    camera.in_flight += 1
                submitted += 1
        finished = [item for pool in pools for item in pool.done()]
        for batch, maps in finished:
            _score(batch, maps, sink, metrics)
        if not submitted and not finished:  # nothing to do until a batch is back or a frame comes
            busy = [pool for pool in pools if pool.busy]
            if busy:
                busy[0].wait(0.01)
            else:
                time.sleep(0.01)
        for camera in live:
            metrics.follow(camera.name, camera.reader.stats)
        if time.monotonic() >= next_status:
            next_status += options.status_every
            for camera in cameras:
                log.info("watch: %s", format_status(camera.status()))


def _take_batch(cameras: list[Camera], turn: int, most: int) -> list[tuple[Camera, Sample]]:
    """Up to `most` samples from `cameras`, an equal share from each, a different camera first each turn."""
    if not cameras:
        return []
    share = max(1, most // len(cameras))
    batch: list[tuple[Camera, Sample]] = []
    for camera in cameras[turn % len(cameras):] + cameras[: turn % len(cameras)]:
        batch += [(camera, sample) for sample in camera.reader.take(min(share, most - len(batch)))]
    return batch


def _score(batch: list[tuple[Camera, Sample]], maps: np.ndarray | None, sink: EventSink, metrics: CameraMetrics) -> None:
    for camera, _ in batch:
        camera.in_flight -= 1
    if maps is None:  # the actor was lost with this batch
        for camera, _ in batch:
            camera.reader.stats.dropped += 1
        return
    now = time.time()
    for (camera, sample), anomaly_map in zip(batch, maps):
        latency = now - sample.captured
        camera.scored += 1
        camera.latencies.append(latency)
        metrics.scored(camera.name, latency)
        camera.recent.append((sample.index, sample.frame, anomaly_map))
        if camera.segments:
            camera.segments.add(sample.index, sample.captured, anomaly_map)
        for notice in camera.tracker.step(sample.index, anomaly_map):
            if notice.kind in ("opened", "updated"):
                _keep_peak(camera, notice.event)
            sink.emit(camera, notice, sample.captured)


def _keep_peak(camera: Camera, event: Event) -> None:
    """Remember the frame and map at the event's peak (among the recent frames; else the latest)."""
    found = next(((frame, m) for index, frame, m in camera.recent if index == event.peak_frame), None)
    camera.peaks[event.event] = found or camera.recent[-1][1:]


def _finish(camera: Camera, sink: EventSink, ending: str) -> None:
    """The camera's end: its open events closed, its last map segment written."""
    if camera.finished:
        return
    camera.ending = ending
    for notice in camera.tracker.finish():
        sink.emit(camera, notice, time.time())
    if camera.segments:
        camera.segments.flush()
